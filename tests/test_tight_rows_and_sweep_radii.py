"""Loose ends closed in session 24: each test failed on the code before its fix (or pins a
behaviour a fix must keep: the same bits, soundness)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from cli_helpers import run_err, run_json
from lipbound import Analyzer
from lipbound.analyzer import TIGHT_ROWS
from lipbound.batch import bound_many
from lipbound.errors import InputError

DT = torch.float64


def _mlp(seed: int = 0, widths=(3, 8, 8, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(DT).eval()


# ------------------------------------------------------------------ 1. tight_rows validated
BAD_ROWS = (-3, 0, 2.5, 2.0, True, False, "7", [4], float("nan"))


@pytest.mark.parametrize("rows", [*BAD_ROWS, 4, TIGHT_ROWS, np.int64(4)])
def test_tight_rows_with_tight_off_is_refused_naming_the_fix(rows):
    """A row budget with ``tight=False`` budgets a bound that is not computed: refused (it was
    silently ignored, even ``tight_rows=-3``), in the Analyzer, the top-level function and
    bound_many, before any work."""
    net = _mlp()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    an = Analyzer(net, (3,))
    calls = (lambda: an.local_bound(x0, 0.1, tight_rows=rows),
             lambda: an.local_bound(x0, 0.1, tight=False, tight_rows=rows),
             lambda: an.local_bound_rows(x0, 0.1, torch.eye(3, dtype=DT), tight_rows=rows),
             lambda: lipbound.local_bound(net, x0, 0.1, tight_rows=rows),
             lambda: lipbound.local_bound(an, x0, 0.1, tight_rows=rows),
             lambda: bound_many(an, [x0], 0.1, tight_rows=rows))
    for call in calls:
        with pytest.raises(InputError, match=r"tight_rows=.*tight=False.*pass tight=True.*"
                                             r"drop tight_rows"):
            call()


@pytest.mark.parametrize("rows", BAD_ROWS)
def test_invalid_tight_rows_with_tight_on_is_refused(rows):
    """Not a count of rows: refused (``2.0`` and ``"7"`` were read as 2 and 7)."""
    net = _mlp()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    an = Analyzer(net, (3,))
    for call in (lambda: an.local_bound(x0, 0.1, tight=True, tight_rows=rows),
                 lambda: an.local_bound_rows(x0, 0.1, torch.eye(3, dtype=DT), tight=True,
                                             tight_rows=rows),
                 lambda: lipbound.local_bound(net, x0, 0.1, tight=True, tight_rows=rows),
                 lambda: bound_many(an, [x0], 0.1, tight=True, tight_rows=rows)):
        with pytest.raises(InputError, match=r"tight_rows must be an integer >= 1"):
            call()


def test_valid_tight_rows_give_the_same_bits_in_every_spelling():
    """``None`` is the default budget; an int, a NumPy integer and a one-element integer
    tensor are the same budget; tight=False without a budget is the plain bound."""
    net = _mlp(2)
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    an = Analyzer(net, (3,), spectral="exact")
    default = an.local_bound(x0, 0.5, tight=True).value
    assert an.local_bound(x0, 0.5, tight=True, tight_rows=None).value == default
    assert an.local_bound(x0, 0.5, tight=True, tight_rows=TIGHT_ROWS).value == default
    one = an.local_bound(x0, 0.5, tight=True, tight_rows=1)
    for rows in (np.int64(1), torch.tensor(1)):
        assert an.local_bound(x0, 0.5, tight=True, tight_rows=rows).value == one.value
    plain = an.local_bound(x0, 0.5)
    assert an.local_bound(x0, 0.5, tight=False).value == plain.value
    assert lipbound.local_bound(an, x0, 0.5).value == plain.value


def test_cli_tight_rows_is_checked_with_and_without_tight(capsys):
    for argv, match in (
            (["--tight-rows", "-3"], r"--tight-rows needs --tight \(-3 is the row budget"
                                     r".*add --tight.*drop --tight-rows"),
            (["--tight-rows", "5"], r"--tight-rows needs --tight \(5 is.*add --tight"),
            (["--tight", "--tight-rows", "0"], "--tight-rows must be a positive integer"),
            (["--tight", "--tight-rows", "-3"], "--tight-rows must be a positive integer")):
        err = run_err(capsys, ["bound", "--model", "tiny", "--eps", "0.5", *argv])
        assert re.search(match, err), err
    plain = run_json(capsys, ["bound", "--model", "tiny", "--eps", "0.5"])
    tight = run_json(capsys, ["bound", "--model", "tiny", "--eps", "0.5", "--tight",
                              "--tight-rows", "1"])
    assert plain["source"] != "tight" and tight["value"] <= plain["value"]


# ------------------------------------------------------------------ 2. radius tight_rows
def _radius_net() -> tuple[nn.Module, torch.Tensor]:
    """A 2-D classifier whose tight bound needs 29 rows at radius 0.5 (3 outputs and 26
    deviation rows): small budgets give the paper's product or the hybrid."""
    net = _mlp(1, (2, 16, 16, 16, 3))
    return net, torch.randn(1, 2, dtype=DT, generator=torch.Generator().manual_seed(1))


def _smallest_class_change(net: nn.Module, x0: torch.Tensor) -> float:
    """Brute force over 720 rays and 800 radii up to 4: the smallest radius at which a point
    of another class was found (an upper bound on the smallest class-changing perturbation)."""
    c = int(net(x0).argmax())
    ang = torch.arange(720, dtype=DT) * (2 * torch.pi / 720)
    dirs = torch.stack([ang.cos(), ang.sin()], 1)
    rad = torch.arange(1, 801, dtype=DT) * 5e-3
    with torch.no_grad():
        cls = net(x0 + (rad[None, :, None] * dirs[:, None, :]).reshape(-1, 2)).argmax(1)
    changed = cls.reshape(720, 800) != c
    assert bool(changed.any())
    first = changed.to(torch.int8).argmax(1)[changed.any(1)]
    return float(rad[first].min())


def test_radius_tight_rows_budget_is_sound_and_below_the_default():
    """The radius functions take a row budget for their tight bounds (they refused it): a
    budget of 1 row gives the paper's product at every radius (the same radii as without
    tight), 10 rows the hybrid, the default the whole construction; every radius is below
    the smallest class change found by brute force, and the small budgets' radii are below
    the default's (here much tighter)."""
    from lipbound.radius import certified_radii

    net, x0 = _radius_net()
    found = _smallest_class_change(net, x0)
    kw = {"methods": ("local", "margin"), "spectral": "exact"}
    plain = certified_radii(net, x0, **kw)
    runs = {rows: certified_radii(net, x0, tight=True, tight_rows=rows, **kw)
            for rows in (1, 10, None)}
    for rows, res in runs.items():
        for r in res:
            assert 0 < r.radius < found
            assert r.details["tight"] and r.details["tight_rows"] == (rows or TIGHT_ROWS)
    assert [r.radius for r in runs[1]] == [r.radius for r in plain]
    for small in (1, 10):
        for r, d in zip(runs[small], runs[None], strict=True):
            assert r.radius <= d.radius * (1 + 2e-3)
    assert runs[None][0].radius > 2 * runs[1][0].radius  # (0.644 against 0.183)
    an = Analyzer(net, (2,), spectral="exact")
    eps = runs[10][0].radius
    assert "exceed the budget of 1" in an.local_bound(x0, eps, tight=True, tight_rows=1).notes[-1]
    assert "tail from block" in an.local_bound(x0, eps, tight=True, tight_rows=10).notes[-1]


def test_radius_tight_rows_reach_every_tight_bound_including_the_rechecks(monkeypatch):
    """With Lanczos factors the search's radius is re-checked by independent analyzers: their
    tight bounds use the budget too."""
    from lipbound.radius import certified_radii

    seen: list[tuple[str, object]] = []
    real_lb, real_rows = Analyzer.local_bound, Analyzer.local_bound_rows

    def lb(self, *a, **kw):
        seen.append(("local", kw.get("tight_rows")))
        return real_lb(self, *a, **kw)

    def rows(self, *a, **kw):
        seen.append(("rows", kw.get("tight_rows")))
        return real_rows(self, *a, **kw)

    monkeypatch.setattr(Analyzer, "local_bound", lb)
    monkeypatch.setattr(Analyzer, "local_bound_rows", rows)
    net = _mlp(1, (2, 64, 64, 3))
    x0 = torch.randn(1, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    res = certified_radii(net, x0, methods=("local", "margin"), tight=True, tight_rows=10,
                          spectral="lanczos", lanczos_steps=12)
    assert all(r.guarantee.name == "PROBABILISTIC_LOWER" for r in res)
    assert all(r.details["rechecks"] for r in res)
    assert {k for k, _ in seen} == {"local", "rows"}
    assert all(v == 10 for _, v in seen)


@pytest.mark.parametrize("rows", [-3, 0, 2.5, True, "7"])
def test_radius_functions_check_tight_rows(rows):
    from lipbound.radius import certified_radii, certified_radius

    net, x0 = _radius_net()
    an = Analyzer(net, (2,))
    for call in (lambda: certified_radius(net, x0, tight=True, tight_rows=rows),
                 lambda: certified_radius(None, x0, analyzer=an, tight=True, tight_rows=rows),
                 lambda: certified_radii(an, x0, tight=True, tight_rows=rows)):
        with pytest.raises(InputError, match="tight_rows must be an integer >= 1"):
            call()
    for call in (lambda: certified_radius(net, x0, tight_rows=4),
                 lambda: certified_radii(an, x0, tight=False, tight_rows=4)):
        with pytest.raises(InputError, match="pass tight=True.*drop tight_rows"):
            call()


def test_cli_radius_tight_rows(capsys):
    base = ["radius", "--model", "tiny", "--methods", "local,margin"]
    err = run_err(capsys, [*base, "--tight-rows", "5"])
    assert "--tight-rows needs --tight" in err and "add --tight" in err
    err = run_err(capsys, [*base, "--tight", "--tight-rows", "0"])
    assert "--tight-rows must be a positive integer" in err
    plain = run_json(capsys, [*base, "--spectral", "exact"])
    one = run_json(capsys, [*base, "--spectral", "exact", "--tight", "--tight-rows", "1"])
    full = run_json(capsys, [*base, "--spectral", "exact", "--tight"])
    for p, o, f in zip(plain["certified"], one["certified"], full["certified"], strict=True):
        assert o["details"]["tight_rows"] == 1 and f["details"]["tight_rows"] == TIGHT_ROWS
        assert o["radius"] == p["radius"]  # (the paper's product at every radius)
        assert o["radius"] <= f["radius"] * (1 + 2e-3)


# ------------------------------------------------------------------ 3. sweep radii
@pytest.mark.parametrize("radii, match", [
    ({0.1, 0.2}, r"got a set, which has no order.*pass sorted\("),
    (frozenset({0.1}), r"got a frozenset, which has no order"),
    ({0.1: "a", 0.2: "b"}.keys(), "got a dict_keys, which has no order"),
    ({0.1: 1.0, 0.2: 2.0}, r"got a dict \(its keys would be read.*list\(.*values\(\)\)"),
    (np.array([[0.1, 0.2]]), r"one-dimensional.*shape \(1, 2\).*flatten\(\)"),
    (torch.tensor([[0.1], [0.2]]), r"one-dimensional.*shape \(2, 1\)"),
    ("0.1,0.2", "got the string"),
])
def test_sweep_and_bound_many_refuse_unordered_or_nested_radii(radii, match):
    """Sets and dicts were taken (in the set's order; a dict's keys); a 2-D array failed on
    its first row with a message about one radius."""
    from lipbound.sweep import sweep

    net = _mlp()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    an = Analyzer(net, (3,))
    with pytest.raises(InputError, match=match):
        sweep(an, x0, radii, methods="local")
    with pytest.raises(InputError, match=match):
        bound_many(an, [x0, x0], radii)


def test_sweep_takes_ordered_radii_in_their_order():
    from lipbound.sweep import sweep

    net = _mlp()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    an = Analyzer(net, (3,), spectral="exact")
    want = [0.3, 0.1, 0.2]
    ref = [r.points[0].value for r in sweep(an, x0, want, methods="local").rows]
    for radii in (tuple(want), np.array(want), torch.tensor(want, dtype=DT),
                  (e for e in want), {"a": 0.3, "b": 0.1, "c": 0.2}.values()):
        res = sweep(an, x0, radii, methods="local")
        assert [r.eps for r in res.rows] == want
        assert [r.points[0].value for r in res.rows] == ref


# ------------------------------------------------------------------ 4. what a sweep leaves
def test_what_a_sweep_leaves_on_the_callers_analyzer():
    """The docstring of ``sweep`` (and ``Analyzer.reuse_copy``) says what the caller's
    analyzer keeps: the global factors (with "global" among the methods) and the draw counts,
    not the memory of layer factors nor ``reuse_tol``. (It said "not changed".)"""
    from lipbound.sweep import sweep

    net = _mlp(4, (3, 40, 40, 3))
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    an = Analyzer(net, (3,), spectral="lanczos")
    sweep(an, x0, [0.1, 1.0], methods="local")
    assert not an._global and an._draws and not an._memo and an.reuse_tol == 0.0
    sweep(an, x0, [0.1, 1.0], methods=("local", "global"))
    assert an._global and not an._memo and an.reuse_tol == 0.0
    doc = " ".join((sweep.__doc__ or "").split())
    assert "analyzer is not changed" not in doc
    assert "the caller's analyzer does keep what the copy shares with it" in doc


# ------------------------------------------------------------------ 5. demo's radii exactly
def test_demo_table_shows_each_radius_exactly(capsys, monkeypatch):
    """The demo's table showed eps with four decimals (0.0010, and 0.1235 for 0.123456: a
    larger ball than the one bounded); now as lipbound bound shows it (fmt_eps). (The radii
    below the table are left out here: tests/test_cli.py runs the whole demo.)"""
    import lipbound.radius
    from lipbound.cli import main

    monkeypatch.setattr(lipbound.radius, "certified_radii", lambda *a, **kw: [])
    assert main(["demo", "--eps-list", "0.001,0.123456", "--spectral", "lanczos"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("local ", "tight "))]
    assert len(rows) == 4
    assert sorted({r[1] for r in rows}) == ["0.001", "0.123456"]


# ------------------------------------------------------------------ 6. masks are 0/1
def test_every_mask_the_analyzer_builds_is_zero_one(monkeypatch):
    """``_masked_maps`` needs a 0/1 mask ``d`` (a d above 1 would not be sound); it is 0/1
    by construction (its docstring names where): every mask built by a block, by max pooling
    and by a channel subset, and every one passed to ``_masked_maps``, on an MLP, a conv
    net with max pooling, a conv net with dead channels (channel subsets) and MNIST."""
    import lipbound.analyzer as A
    from lipbound import inputs, zoo
    from lipbound.ops.pooling import MaxPoolOp

    seen: dict[str, list[torch.Tensor]] = {"maps": [], "block": [], "pool": [], "subset": []}

    def wrap(name, real, pick):
        def f(*a, **kw):
            out = real(*a, **kw)
            seen[name].extend(pick(a, out))
            return out
        return f

    monkeypatch.setattr(A, "_masked_maps", wrap("maps", A._masked_maps, lambda a, o: [a[2]]))
    monkeypatch.setattr(A.Analyzer, "_affine_factor", wrap(
        "block", A.Analyzer._affine_factor, lambda a, o: [a[4], a[5], o[1]]))
    monkeypatch.setattr(MaxPoolOp, "propagate_mask", wrap(
        "pool", MaxPoolOp.propagate_mask, lambda a, o: [a[1], o]))
    monkeypatch.setattr(A.Analyzer, "_channel_subset", wrap(
        "subset", A.Analyzer._channel_subset, lambda a, o: [o[2]] if o[5] is not None else []))

    torch.manual_seed(5)
    dead = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 16, 4)).to(DT).eval()
    with torch.no_grad():
        dead[0].bias[:4] = -1e3  # channels 0-3 never turn on: the next conv's subset
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Linear(36, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    lm = zoo.load_model("mnist")
    cases = [(_mlp(3, (5, 30, 30, 4)), (5,)), (pooled, (1, 8, 8)), (dead, (2, 8, 8)),
             (lm.model, tuple(lm.entry.input_shape))]
    g = torch.Generator().manual_seed(6)
    for net, shape in cases:
        an = Analyzer(net, shape, spectral="lanczos")
        if net is lm.model:  # (the paper's bound only: the tight one takes longer here)
            x0 = inputs.load_sample("mnist:8", entry=lm.entry).x
            an.local_bound(x0, 0.1)
            continue
        x0 = torch.randn(1, *shape, generator=g, dtype=DT)
        for eps in (1e-3, 0.1, 3.0):
            an.local_bound(x0, eps)
        an.local_bound(x0, 0.1, tight=True)
        an.local_bound_rows(x0, 0.1, torch.eye(int(net(x0).shape[1]), dtype=DT))
    for name, masks in seen.items():
        assert masks, name  # (each kind was reached)
        for m in masks:
            assert bool(((m == 0) | (m == 1)).all()), name
        assert any(bool((m == 0).any()) for m in masks), name  # (not only all-ones masks)


# ------------------------------------------------------------------ 7. block Lanczos span
def test_block_lanczos_reports_a_full_span_only_when_it_has_one():
    """``_run_block``'s flag for a rank-deficient end that spans all ``n`` coordinates could
    not be set (the remainder is factorised only while at most ``n - b`` vectors are
    spanned) and was removed: an early end reports its own basis (``dim = k b < n``, not
    exact), a run through all ``n / b`` block steps ``dim = n`` and the exact norm."""
    from lipbound.lanczos import run_lanczos

    g = torch.Generator().manual_seed(0)
    n = 40
    low = torch.randn(12, 2, generator=g, dtype=DT) @ torch.randn(2, n, generator=g, dtype=DT)
    full = torch.randn(n, n, generator=g, dtype=DT)
    for b in (4, 5):
        # (since session 25 a rank-deficient remainder no longer ends the run: the rank-2
        # operator's run goes on to the full span, where the Ritz value is the norm; a run
        # of fewer steps ends with its own basis)
        res = run_lanczos(lambda v: v @ low.T, lambda y: y @ low, n, 30,
                          torch.Generator().manual_seed(1), "cpu", block=b)
        assert res.block == b and res.dim == res.k * b == n
        norm = float(torch.linalg.matrix_norm(low, 2))
        assert res.sqrt_theta == pytest.approx(norm, rel=1e-12)
        res = run_lanczos(lambda v: v @ low.T, lambda y: y @ low, n, 3,
                          torch.Generator().manual_seed(1), "cpu", block=b)
        assert res.block == b and res.dim == res.k * b < n
        assert res.sqrt_theta <= norm * (1 + 1e-12)
    res = run_lanczos(lambda v: v @ full.T, lambda y: y @ full, n, 30,
                      torch.Generator().manual_seed(1), "cpu", block=4)
    assert res.dim == n and res.k == n // 4
    assert res.sqrt_theta == pytest.approx(float(torch.linalg.matrix_norm(full, 2)), rel=1e-12)


# ------------------------------------------------------------------ 8. radius_available
def test_radius_available_is_deprecated_and_bench_radius_always_measures():
    """``lipbound.radius`` is part of the package: ``bench_radius``'s "not available" branch
    (return None) and the CLI's note for it could not happen and were removed;
    ``radius_available`` stays for old callers, always True, with a DeprecationWarning."""
    import inspect

    import lipbound.bench as lb

    with pytest.warns(DeprecationWarning, match="always True"):
        assert lb.radius_available() is True
    assert inspect.signature(lb.bench_radius).return_annotation == "RadiusBench"


# ------------------------------------------------------------------ 9. integer casts
class _Cast(nn.Module):
    def __init__(self, cast):
        super().__init__()
        self.fc, self.cast = nn.Linear(3, 3), cast

    def forward(self, x):
        return self.fc(self.cast(x).float())


@pytest.mark.parametrize("cast, dtype", [
    (lambda x: x.to(torch.int32), "torch.int32"),
    (lambda x: x.to(dtype=torch.int64), "torch.int64"),
    (lambda x: x.to("cpu", torch.int16), "torch.int16"),
    (lambda x: x.int(), "torch.int32"),
    (lambda x: x.long(), "torch.int64"),
    (lambda x: x.type(torch.uint8), "torch.uint8"),
    (lambda x: x.to(torch.bool), "torch.bool"),
    (lambda x: x.to(torch.zeros(1, dtype=torch.int32).dtype), "torch.int32"),
])
def test_integer_cast_is_refused_naming_the_problem_and_the_fix(cast, dtype):
    """An integer (or boolean) cast in forward was refused as "tensor method .to() (no rule
    for this operation)": now the message says it casts to an integer type, which has no
    finite Lipschitz constant, and that casting to float32 / float64 is read as the
    identity. (Not supported: still refused.)"""
    from lipbound.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=rf"casts to {dtype}.*no finite Lipschitz "
                       r"constant.*remove the cast, or cast to torch.float32"):
        lipbound.local_bound(_Cast(cast).eval(), torch.randn(1, 3), 0.1)


def test_half_precision_cast_names_the_fix_and_float_casts_still_work():
    from lipbound.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"casts to torch.float16.*cast to "
                       r"torch.float32 or torch.float64 instead"):
        lipbound.local_bound(_Cast(lambda x: x.half()).eval(), torch.randn(1, 3), 0.1)
    for cast in (lambda x: x.double(), lambda x: x.to(torch.float64), lambda x: x.to(x.dtype)):
        assert lipbound.local_bound(_Cast(cast).eval(), torch.randn(1, 3), 0.1).value > 0
