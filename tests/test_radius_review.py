"""Adversarial review of the certified radius, bound_many and their CLI JSON (session 20).

Each test names the defect it pins and fails on the code before its fix. The soundness of
the radii themselves was checked against an independent exact reference (minimal adversarial
distance by enumerating activation regions, one least-distance problem per region and rival)
on a few thousand small networks; that check lives here in a small form,
``test_radii_never_exceed_the_exact_minimal_adversarial_distance``.
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from torch import nn

from core_helpers import mlp
from lipbound import Analyzer, Guarantee
from lipbound.batch import bound_many
from lipbound.cli import main

# ------------------------------------------------------------------ exact reference


def _ldp(g: np.ndarray, h: np.ndarray) -> np.ndarray | None:
    """min ||z|| subject to g z >= h (Lawson & Hanson's least-distance programming through
    NNLS); None when infeasible."""
    m, n = g.shape
    e = np.vstack([g.T, h[None, :]])
    f = np.zeros(n + 1)
    f[-1] = 1.0
    u, _ = nnls(e, f, maxiter=50 * (m + n + 1))
    r = e @ u - f
    if np.linalg.norm(r) < 1e-12 or abs(r[-1]) < 1e-14:
        return None
    return -r[:n] / r[-1]


def _exact_min_distance(layers: list[tuple[np.ndarray, np.ndarray]], x0: np.ndarray) -> float:
    """The smallest L2 distance from ``x0`` to a point where some class scores at least the
    predicted one, for the ReLU MLP ``layers`` (ReLU after all but the last): the minimum over
    activation patterns (closed polytopes on which the network is affine) and rivals."""
    n = x0.size
    h = x0
    for k, (w, b) in enumerate(layers):
        h = w @ h + b
        if k < len(layers) - 1:
            h = np.maximum(h, 0)
    c = int(np.argmax(h))
    best = math.inf
    widths = [w.shape[0] for w, _ in layers[:-1]]
    for bits in itertools.product((0.0, 1.0), repeat=sum(widths)):
        a_mat, a_vec = np.eye(n), np.zeros(n)
        rows, rhs, off = [], [], 0
        for w, b in layers[:-1]:
            pa, pb = w @ a_mat, w @ a_vec + b
            s = np.array(bits[off:off + w.shape[0]])
            off += w.shape[0]
            sign = 2 * s - 1
            rows.append(sign[:, None] * pa)
            rhs.append(-sign * pb)
            a_mat, a_vec = s[:, None] * pa, s * pb
        w, b = layers[-1]
        fa, fb = w @ a_mat, w @ a_vec + b
        for j in range(fa.shape[0]):
            if j == c:
                continue
            g = np.vstack(rows + [(fa[j] - fa[c])[None, :]])
            hh = np.concatenate(rhs + [np.array([fb[c] - fb[j]])]) - g @ x0
            nrm = np.linalg.norm(g, axis=1)
            keep = nrm > 0
            if np.any(hh[~keep] > 0):
                continue
            gz, hz = g[keep] / nrm[keep, None], hh[keep] / nrm[keep]
            z = _ldp(gz, hz)
            if z is None or np.any(gz @ z < hz - 1e-9 * (1 + np.linalg.norm(z))):
                continue
            best = min(best, float(np.linalg.norm(z)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_radii_never_exceed_the_exact_minimal_adversarial_distance(seed):
    """Every certified radius (local, margin, global; plain, tight, without reuse, with
    Lanczos) is at most the exact minimal adversarial distance of the float64 network. (Held
    on the code before this session too: the reference guards future changes.)"""
    from lipbound.radius import certified_radii

    rng = np.random.default_rng(seed)
    n = 1 + seed % 3
    dims = [n, 4, 3, 3]
    layers = [(rng.standard_normal((dims[i + 1], dims[i])), 0.5 * rng.standard_normal(dims[i + 1]))
              for i in range(len(dims) - 1)]
    x0 = rng.standard_normal(n)
    exact = _exact_min_distance(layers, x0)
    model = mlp(layers)
    x = torch.from_numpy(x0).reshape(1, n)
    for kw in ({}, {"tight": True, "reuse_tol": 0.0}, {"spectral": "lanczos", "reuse_tol": 0.5}):
        for r in certified_radii(model, x, **kw):
            assert r.radius <= exact * (1 + 1e-9), (kw, r.method, r.radius, exact)
            assert r.radius > 0  # not vacuous: these inputs are away from the boundary


# ---------------------------------------------------------------- JSON of bound_many

CANCEL = textwrap.dedent("""
    import torch
    from torch import nn

    D = torch.float64

    def make():
        # finite forward pass (the two hidden units are equal, their difference cancels) but
        # a product of layer norms beyond float64: the global bound, and the local bound at
        # an input where the first layer is on, are inf
        m = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(),
                          nn.Linear(2, 3)).double()
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor([[1e150, 0, 0, 0], [1e150, 0, 0, 0]], dtype=D))
            m[0].bias.zero_()
            m[2].weight.copy_(torch.tensor([[1e150, -1e150], [-1e150, 1e150]], dtype=D))
            m[2].bias.zero_()
            m[4].weight.copy_(torch.tensor([[1e150, 0], [0, 1e150], [0, 0]], dtype=D))
            m[4].bias.copy_(torch.tensor([0.5, 1.0, -1.0], dtype=D))
        return {"model": m.eval(), "input_shape": (4,)}
""")


def _strict_json(text: str):
    def refuse(const: str):
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=refuse)


def test_bound_many_json_is_strict_json_when_a_bound_is_infinite(capsys, tmp_path):
    """Defect (fails before the fix): ``lipbound bound --json`` with several inputs printed
    ``"bound": Infinity`` (InputBound.to_dict and the summary were not passed through the
    JSON rule of every other ``to_dict``), which strict JSON parsers reject. The single-input
    path already printed ``"inf"``."""
    src = tmp_path / "nets.py"
    src.write_text(CANCEL)
    xs = tmp_path / "xs.npy"
    np.save(xs, np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]], dtype=np.float64))
    rc = main(["bound", "--model", f"{src}:make", "--input", str(xs), "--method", "both",
               "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    obj = _strict_json(out)
    rows = obj["rows"]
    assert len(rows) == 4
    glob = [r for r in rows if r["method"] == "global"]
    assert [r["bound"] for r in glob] == ["inf", "inf"]  # a valid (infinite) upper bound
    assert all(r["guarantee"].endswith("upper bound") for r in rows)
    assert obj["summary"]["methods"]["global"]["bound"]["max"] == "inf"


def test_input_bound_to_dict_follows_the_json_rule():
    """Defect (fails before the fix): ``InputBound.to_dict`` returned a float ``inf`` that
    ``json.dumps`` writes as ``Infinity``."""
    from lipbound.batch import InputBound

    row = InputBound(0, "[0]", None, 1, None, "global", math.inf,
                     Guarantee.CERTIFIED, 0.0, 0.1)
    d = row.to_dict()
    assert d["bound"] == "inf"
    _strict_json(json.dumps(d))


def test_bound_many_rows_keep_order_and_their_own_guarantee():
    """Interleaved, duplicated inputs of different classes on one shared analyzer: each row
    equals a fresh analyzer's bound of its own input (exact spectral norms), in input order.
    (Held before this session.)"""
    torch.manual_seed(4)  # its inputs fall in three different classes
    model = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double().eval()
    xs = torch.randn(4, 3, dtype=torch.float64) * 2
    order = [0, 1, 0, 2, 3, 1, 3]
    eps = [0.05, 0.5, 1.0, 0.2, 0.05, 0.05, 2.0]
    an = Analyzer(model, (3,), spectral="exact")
    an.local_bound(xs[2:3], 3.0)  # state from another input and radius first
    rows = bound_many(an, xs[order], eps)
    assert len({int(model(xs[i:i + 1]).argmax()) for i in range(4)}) >= 2
    for i, r in enumerate(rows):
        fresh = Analyzer(model, (3,), spectral="exact")
        fresh.global_bound()  # bound_many shares the global factors
        ref = fresh.local_bound(xs[order[i]:order[i] + 1], eps[i])
        assert r.index == i and r.eps == eps[i]
        assert r.predicted == int(fresh.forward(xs[order[i]:order[i] + 1]).argmax())
        assert r.bound == pytest.approx(ref.value, rel=1e-12)
        assert r.guarantee == ref.guarantee


# ------------------------------------------------------- failure probability of re-checks


def test_recheck_failure_probability_adds_each_twins_own(monkeypatch):
    """Defect (fails before the fix): a probabilistic radius confirmed by the second re-check
    reported ``failure_prob`` = (the confirming twin's probability) x 2. The union bound is
    over the twins' own probabilities: the first twin tested a larger radius, where more
    layers can take the probabilistic route (here its test has 5e-6, the confirming one
    1e-6), so the old value 2e-6 undercounted the 6e-6 of the tests that ran."""
    from lipbound import radius as rad

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    an = Analyzer(net, (3,), seed=7)
    root = 0.01
    twins_seen = []

    def fake_test(a, pb, eps):
        k = (a.seed - an.seed) // 1_000_003  # 0: the search, k >= 1: the k-th twin
        twins_seen.append(k)
        grow, fp = {0: (1.0, 1e-6), 1: (1.01, 5e-6)}.get(k, (1.0, 1e-6))
        ratio = eps / root * grow
        return rad._Eval(eps, ratio < 1, ratio, ratio, Guarantee.PROBABILISTIC, fp, 0)

    monkeypatch.setitem(rad._TESTS, "local", fake_test)
    r = rad.certified_radius(an, torch.zeros(1, 3, dtype=torch.float64), method="local")
    checks = r.details["rechecks"]
    assert [c["passed"] for c in checks] == [False, True]
    assert {1, 2} <= set(twins_seen)
    assert r.guarantee == Guarantee.PROBABILISTIC_LOWER
    assert r.radius < root
    assert r.failure_prob >= 5e-6 + 1e-6
    assert r.failure_prob == pytest.approx(sum(c["failure_prob"] for c in checks), rel=1e-12)


# ------------------------------------------------------ CLI: models without parameters

BUFFER_MODELS = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class BufferNet(nn.Module):  # weights held in buffers (e.g. a frozen, exported network)
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("w1", torch.randn(5, 4, generator=g))
            self.register_buffer("b1", torch.randn(5, generator=g))
            self.register_buffer("w2", torch.randn(3, 5, generator=g))

        def forward(self, x):
            return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)

    class Affine(nn.Module):  # no tensors at all
        def forward(self, x):
            return x * 2.0 - 1.0

    def buffers():
        return {"model": BufferNet().eval(), "input_shape": (4,)}

    def affine():
        return {"model": Affine().eval(), "input_shape": (4,)}
""")


@pytest.mark.parametrize("factory", ["buffers", "affine"])
@pytest.mark.parametrize("cmd", [["bound"], ["radius"]])
def test_cli_accepts_models_without_parameters(capsys, tmp_path, factory, cmd):
    """Defect (fails before the fix): ``lipbound bound`` and ``lipbound radius`` took the
    device from ``next(model.parameters())`` and died with a StopIteration traceback for a
    model whose weights are buffers (or that has no tensors), which the library itself
    analyses."""
    src = tmp_path / "nets.py"
    src.write_text(BUFFER_MODELS)
    x = tmp_path / "x.npy"
    np.save(x, np.linspace(-1, 1, 4, dtype=np.float32))
    rc = main([*cmd, "--model", f"{src}:{factory}", "--input", str(x), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    obj = _strict_json(out)
    if cmd == ["radius"]:
        assert obj["certified_radius"] > 0
        assert obj["certified_guarantee"] == "certified lower bound"
        if factory == "affine":  # y = 2x - 1: classes 3 and 2 at distance (x3 - x2)/sqrt(2)
            assert obj["certified_radius"] <= (2 / 3) / math.sqrt(2)
    else:
        assert obj["value"] > 0 and obj["guarantee"].endswith("upper bound")


@pytest.mark.parametrize("tight", [False, True])
def test_radius_records_tight_and_takes_an_input_that_requires_grad(tight):
    """The result says whether the tight bound was used (details "tight"), and an input with
    ``requires_grad`` gives the same radius without a torch warning (it warned on ``float``
    of a tensor that requires grad)."""
    import warnings

    from lipbound.radius import certified_radius

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x0 = torch.randn(1, 3, dtype=torch.float64)
    plain = certified_radius(net, x0, method="local", tight=tight, spectral="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = certified_radius(net, x0.clone().requires_grad_(True), method="local",
                               tight=tight, spectral="exact")
    assert res.details["tight"] is tight and plain.details["tight"] is tight
    assert res.radius == plain.radius


def test_eps_file_errors_name_the_problem(tmp_path):
    """An empty ``eps`` field said "None is not a number", a directory "does not exist"."""
    from lipbound.cli.bound_many import read_eps_file
    from lipbound.errors import InputError

    csv_file = tmp_path / "r.csv"
    csv_file.write_text("name,eps\na,0.1\nb,\n")
    with pytest.raises(InputError, match="line 3: the radius is missing"):
        read_eps_file(csv_file)
    with pytest.raises(InputError, match="is a directory, not a file"):
        read_eps_file(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        read_eps_file(tmp_path / "nope.txt")
