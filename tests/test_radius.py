"""Certified radii (lipbound.radius): soundness against attacks, brute force in the ball and
closed forms; the margin certificate vs the sqrt(2) one; search tightness; bad inputs.

Soundness means: no class change within the certified radius. It is checked three ways,
all of which can fail: (1) every verified attack radius is >= the certified radius; (2)
20k points sampled uniformly in the ball and on its sphere, and projected gradient ascent on
the best rival's margin restricted to the ball, never change the class; (3) closed forms
(a linear classifier's exact robust radius).
"""

from __future__ import annotations

import copy
import inspect
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lipbound import Analyzer, Guarantee, InputError
from lipbound.radius import METHODS, RadiusResult, certified_radii, certified_radius

SQRT2 = math.sqrt(2.0)

# cheap settings of the attacks for tests (any verified radius bounds the minimum from
# above, so weaker attacks keep the comparison valid; examples/radius_testsets.py runs the
# defaults). Options a constructor does not know are dropped, so the tests follow the
# attacks' API.
CHEAP = {"pgd": {"steps": 20, "restarts": 2}, "cw": {"binary_steps": 3, "steps": 30},
         "ifgsm": {"steps": 5, "rounds": 2}, "gradient": {"max_steps": 100, "rounds": 2}}
CHEAPER = {"pgd": {"steps": 10, "restarts": 1}}


# ------------------------------------------------------------------------------ helpers


def _attacks(model, x0, methods, options=None):
    attacks = pytest.importorskip("lipbound.attacks")
    opts = {}
    for m in methods:
        cls = attacks.ATTACKS[m]
        params = inspect.signature(cls.__init__).parameters
        opts[m] = {k: v for k, v in (options or CHEAP).get(m, {}).items() if k in params}
    return attacks.run_attacks(model, x0, methods=methods, seed=0, options=opts)


def _assert_below_attacks(results: list[RadiusResult], attacks, x0) -> None:
    best = max(r.radius for r in results)
    n_success = 0
    for a in attacks:
        if not a.success:
            continue
        n_success += 1
        dist = float((a.x_adv.double() - x0.double().to(a.x_adv.device)).norm())
        assert math.isclose(dist, a.radius, rel_tol=1e-6)
        assert a.adversarial_class != a.original_class
        for r in results:
            assert r.radius <= a.radius, (r.method, r.radius, a.method, a.radius)
        assert best <= dist
    assert n_success >= 1, "no attack succeeded: the comparison would be vacuous"


def _margins(model: nn.Module, xs: torch.Tensor, cls: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, xs.shape[0], 2048):
            z = model(xs[i:i + 2048])
            other = z.clone()
            other[:, cls] = -math.inf
            out.append(z[:, cls] - other.max(dim=1).values)
    return torch.cat(out)


def _assert_same_class(model, model64, xs: torch.Tensor, cls: int, what: str) -> float:
    """Margins of a batch in the model's dtype; points whose margin is within float32
    rounding of 0 are decided in float64 (the certificate is about exact arithmetic)."""
    m = _margins(model, xs.to(torch.float32 if model64 is not model else xs.dtype), cls)
    close = m <= 1e-3 * (1 + m.abs().max())
    if bool(close.any()):
        m64 = _margins(model64, xs[close].double(), cls)
        assert bool((m64 > 0).all()), f"class changed at a point {what}"
        m = m.double()
        m[close] = m64
    assert bool((m > 0).all()), f"class changed at a point {what}"
    return float(m.min())


def _ball_check(model: nn.Module, x0: torch.Tensor, cls: int, radius: float, *,
                n: int = 20_000, pgd_starts: int = 16, pgd_steps: int = 60, seed: int = 0
                ) -> float:
    """Brute force inside the closed ball of ``radius``: uniform samples inside, samples on
    the sphere, and projected gradient ascent on ``max_j z_j - z_c`` (the strongest
    first-order attack restricted to the ball), from ``x0`` and random starts. Returns the
    smallest margin seen; asserts that the class never changed anywhere."""
    model = copy.deepcopy(model).cpu().eval()
    model64 = copy.deepcopy(model).double()
    fast = model if next(model.parameters()).dtype == torch.float32 else model64
    x0 = x0.detach().double().cpu()
    d = x0[0].numel()
    what = f"within the certified radius {radius}"
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, d, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    rad = torch.full((n,), radius, dtype=torch.float64)
    half = n // 2  # the first half uniform inside the ball, the second half on the sphere
    rad[:half] *= torch.rand(half, generator=g, dtype=torch.float64) ** (1.0 / d)
    xs = x0 + (dirs * rad[:, None]).reshape(n, *x0.shape[1:])
    worst = _assert_same_class(fast, model64, xs, cls, what)
    # projected gradient ascent of the best rival's margin, inside the ball (float64)
    start = torch.randn(pgd_starts, d, generator=g, dtype=torch.float64)
    start = start / start.norm(dim=1, keepdim=True) * radius * 0.5
    start[0] = 0.0
    x = (x0 + start.reshape(pgd_starts, *x0.shape[1:])).clone()
    step = 2.5 * radius / pgd_steps
    for _ in range(pgd_steps):
        x.requires_grad_(True)
        z = model64(x)
        other = z.clone()
        other[:, cls] = -math.inf
        marg = z[:, cls] - other.max(dim=1).values
        (gr,) = torch.autograd.grad(-marg.sum(), x)
        with torch.no_grad():
            assert bool((marg > 0).all()), f"PGD changed the class {what}"
            worst = min(worst, float(marg.min()))
            gn = gr.flatten(1).norm(dim=1).clamp_min(1e-300)
            x = x + step * gr / gn.reshape(-1, *([1] * (x.dim() - 1)))
            delta = (x - x0).flatten(1)
            dn = delta.norm(dim=1).clamp_min(1e-300)
            scale = torch.clamp(radius / dn, max=1.0)
            x = (x0.flatten(1) + delta * scale[:, None]).reshape(x.shape).detach()
    final = _margins(model64, x, cls)
    assert bool((final > 0).all()), f"PGD changed the class {what}"
    return min(worst, float(final.min()))


def _check_margin_vs_local(results: list[RadiusResult]) -> float:
    by = {r.method: r for r in results}
    if "margin" in by and "local" in by:
        assert by["margin"].radius >= by["local"].radius, (by["margin"], by["local"])
        return by["margin"].radius / by["local"].radius
    return math.nan


def _random_net(seed: int, n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = n_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers).double().eval()


# ------------------------------------------------------------------------- closed forms


def test_linear_classifier_margin_radius_is_the_exact_robust_radius():
    """For f(x) = W x + b the distance to the nearest decision boundary is exactly
    min_j delta_j / ||w_c - w_j||; the margin certificate must reach it (within tol) and
    never exceed it, and the local certificate is delta / (sqrt(2) ||W||)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5)).double().eval()
    x0 = torch.randn(1, 6, dtype=torch.float64)
    w, b = net[0].weight.detach(), net[0].bias.detach()
    y = (w @ x0[0] + b)
    c = int(y.argmax())
    exact = min(float((y[c] - y[j]) / (w[c] - w[j]).norm()) for j in range(5) if j != c)
    delta = float(y[c] - torch.cat([y[:c], y[c + 1:]]).max())
    tol = 1e-4
    an = Analyzer(net, (6,), spectral="exact")
    loc, mar, glo = certified_radii(an, x0, tol=tol)
    assert mar.radius <= exact
    assert mar.radius >= exact / (1 + tol) ** 2
    closed = delta / (SQRT2 * float(torch.linalg.matrix_norm(w, ord=2)))
    assert loc.radius <= closed and loc.radius >= closed / (1 + tol) ** 2
    assert glo.radius <= closed and glo.radius >= closed * (1 - 1e-8)
    # just beyond the exact radius the class does change (the bound is attained)
    j = min((k for k in range(5) if k != c),
            key=lambda k: float((y[c] - y[k]) / (w[c] - w[k]).norm()))
    u = (w[j] - w[c]) / (w[j] - w[c]).norm()
    x_adv = x0 + exact * (1 + 1e-6) * u
    assert int(net(x_adv).argmax()) != c


def test_tiny_paper_network_exact_values():
    """The paper's 3-D network with its nominal input: deterministic radii, consistent with
    a brute-force check in the ball and with every attack."""
    from lipbound import zoo
    from lipbound.inputs import load_sample

    lm = zoo.load_model("tiny")
    x0 = load_sample("tiny:x0", entry=lm.entry).x
    res = certified_radii(lm.model, x0)
    assert all(r.guarantee == Guarantee.CERTIFIED_LOWER and r.failure_prob == 0 for r in res)
    _check_margin_vs_local(res)
    _ball_check(lm.model, x0, res[0].predicted_class, max(r.radius for r in res), n=4000)
    _assert_below_attacks(res, _attacks(lm.model, x0, list(CHEAP) + ["fgsm"]), x0)


# ----------------------------------------------------------------- property-based tests


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_in=st.integers(2, 6),
       hidden=st.lists(st.integers(3, 12), min_size=1, max_size=3),
       n_out=st.integers(2, 5))
def test_random_networks_sound_and_ordered(seed, n_in, hidden, n_out):
    """Random float64 ReLU networks, exact spectral norms: the largest certificate survives
    brute force in its ball; margin >= local >= global (up to the search tolerance, for
    independent searches); each radius passes its own test and its upper end fails."""
    net = _random_net(seed, n_in, tuple(hidden), n_out)
    x0 = torch.randn(1, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    tol = 1e-3
    # reuse_tol=0: the search's tightness claims below refer to fresh bounds
    loc = certified_radius(net, x0, method="local", tol=tol, spectral="exact", reuse_tol=0)
    mar = certified_radius(net, x0, method="margin", tol=tol, spectral="exact", reuse_tol=0)
    glo = certified_radius(net, x0, method="global", tol=tol, spectral="exact")
    if loc.margin == 0:
        return
    assert mar.radius >= loc.radius / (1 + tol)
    assert loc.radius >= glo.radius / (1 + tol)
    _ball_check(net, x0, loc.predicted_class, mar.radius, n=2000, pgd_starts=4, pgd_steps=30,
                seed=seed)
    # tightness: the result passes its own test, and a failing radius lies within tol
    an = Analyzer(net, (n_in,), spectral="exact")
    t = loc.details["threshold"]
    assert loc.radius * an.local_bound(x0, loc.radius).value < t
    if loc.upper is not None:
        assert loc.upper <= loc.radius * (1 + tol) * (1 + 1e-12)
        assert loc.upper * an.local_bound(x0, loc.upper).value >= t
    c = torch.zeros(n_out - 1, n_out, dtype=torch.float64)
    rivals = [j for j in range(n_out) if j != mar.predicted_class]
    c[:, mar.predicted_class] = 1.0
    c[torch.arange(n_out - 1), rivals] = -1.0
    assert mar.details["rivals"] == rivals
    y = an.forward(x0)[0]
    deltas = y[mar.predicted_class] - y[rivals]
    thresholds = torch.tensor(mar.details["thresholds"], dtype=torch.float64)
    assert bool((thresholds <= deltas).all())
    rows = an.local_bound_rows(x0, mar.radius, c).values
    assert bool((mar.radius * rows < thresholds).all())
    if mar.upper is not None:
        assert mar.upper <= mar.radius * (1 + tol) * (1 + 1e-12)
        rows_hi = an.local_bound_rows(x0, mar.upper, c).values
        assert not bool((mar.upper * rows_hi < thresholds).all())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_in=st.integers(2, 6),
       hidden=st.lists(st.integers(3, 12), min_size=1, max_size=3),
       n_out=st.integers(2, 5))
def test_reused_factors_only_loosen_the_radius(seed, n_in, hidden, n_out):
    """The search reuses layer factors of larger radii (reuse_tol > 0). With exact spectral
    norms a reused factor is the norm of a dominating masked operator, so every bound can only
    grow: the radius passes the test with fresh bounds (an independent analyzer), is never
    above the fresh search's radius (times 1 + tol), survives brute force in its ball, and the
    caller's analyzer is left as it was."""
    net = _random_net(seed, n_in, tuple(hidden), n_out)
    x0 = torch.randn(1, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    tol = 1e-3
    for method in ("local", "margin"):
        fresh = certified_radius(net, x0, method=method, tol=tol, spectral="exact",
                                 reuse_tol=0)
        an = Analyzer(net, (n_in,), spectral="exact")
        reuse = certified_radius(net, x0, method=method, tol=tol, analyzer=an, reuse_tol=0.05)
        assert an.reuse_tol == 0 and an._memo == {}
        assert reuse.details["reuse_tol"] == 0.05
        if fresh.margin == 0:
            return
        assert reuse.radius <= fresh.radius * (1 + tol) * (1 + 1e-12)
        ref = Analyzer(net, (n_in,), spectral="exact")
        if method == "local":
            t = reuse.details["threshold"]
            assert reuse.radius * ref.local_bound(x0, reuse.radius).value < t
        else:
            c = torch.zeros(n_out - 1, n_out, dtype=torch.float64)
            rivals = reuse.details["rivals"]
            c[:, reuse.predicted_class] = 1.0
            c[torch.arange(n_out - 1), rivals] = -1.0
            rows = ref.local_bound_rows(x0, reuse.radius, c).values
            thresholds = torch.tensor(reuse.details["thresholds"], dtype=torch.float64)
            assert bool((reuse.radius * rows < thresholds).all())
    _ball_check(net, x0, reuse.predicted_class, reuse.radius, n=1000, pgd_starts=2,
                pgd_steps=20, seed=seed)


def test_mnist_reuse_is_used_and_costs_little_radius(mnist):
    """On a real network the default search does reuse factors, and its radius stays within
    a few percent of the search without reuse (a tightness regression check); the
    probabilistic radius is re-checked by an independent analyzer as before."""
    from lipbound.inputs import load_sample

    lm, an = mnist
    x0 = load_sample("mnist:test/3", entry=lm.entry).x
    reuse = certified_radius(an, x0)
    fresh = certified_radius(an, x0, reuse_tol=0)
    assert reuse.details["reused_evaluations"] > 0
    assert fresh.details["reused_evaluations"] == 0
    assert 0.95 * fresh.radius <= reuse.radius <= fresh.radius * 1.05
    if reuse.guarantee == Guarantee.PROBABILISTIC_LOWER:
        checks = reuse.details["rechecks"]
        assert checks and checks[-1]["passed"]
        # a union bound over the re-checks run
        assert reuse.failure_prob == pytest.approx(checks[-1]["failure_prob"] * len(checks),
                                                   rel=1e-12)
    assert an.reuse_tol == 0


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "x", True])
def test_bad_reuse_tol_is_an_input_error(bad):
    net = _random_net(0, 3, (4,), 2)
    x0 = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="reuse_tol"):
        certified_radius(net, x0, reuse_tol=bad)
    with pytest.raises(InputError, match="reuse_tol"):
        certified_radii(net, x0, reuse_tol=bad)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(1e-3, 10.0))
def test_margin_rows_never_exceed_sqrt2_local(seed, eps):
    """The inequality behind 'margin >= local': for the same eps (same prefix, exact
    spectral norms), L_j = P ||(e_c - e_j)^T A D|| <= sqrt(2) P ||A D|| = sqrt(2) L."""
    net = _random_net(seed, 4, (8, 6), 4)
    x0 = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    an = Analyzer(net, (4,), spectral="exact")
    y = an.forward(x0)[0]
    c = int(y.argmax())
    rows = torch.zeros(3, 4, dtype=torch.float64)
    rows[:, c] = 1.0
    rows[torch.arange(3), [j for j in range(4) if j != c]] = -1.0
    lj = an.local_bound_rows(x0, eps, rows).values
    lval = an.local_bound(x0, eps).value
    assert bool((lj <= SQRT2 * lval * (1 + 1e-9)).all()), (lj, lval)


# --------------------------------------------------------------------------- zoo inputs


def test_compnet_all_methods_and_all_attacks():
    from lipbound import zoo
    from lipbound.inputs import load_sample

    lm = zoo.load_model("compnet")
    x0 = load_sample("compnet:zeros", entry=lm.entry).x
    res = certified_radii(lm.model, x0)
    assert [r.method for r in res] == list(METHODS)
    _check_margin_vs_local(res)
    _ball_check(lm.model, x0, res[0].predicted_class, max(r.radius for r in res), n=6000)
    _assert_below_attacks(res, _attacks(lm.model, x0, list(CHEAP) + ["fgsm"]), x0)


@pytest.fixture(scope="module")
def mnist():
    from lipbound import zoo

    lm = zoo.load_model("mnist")
    return lm, Analyzer(lm.model, lm.entry.input_shape, name="mnist")


@pytest.mark.slow
def test_mnist_digit8_paper_numbers_attacks_and_ball(mnist):
    """The paper's setting: local certificate ~0.052 (ours must certify at least 0.045), the
    global one ~0.0005 or less, attacks ~3.4-5.4; all five attacks above every
    certificate; no class change in the margin certificate's ball."""
    from lipbound.inputs import load_sample

    lm, an = mnist
    x0 = load_sample("mnist:8", entry=lm.entry).x
    res = certified_radii(an, x0)
    by = {r.method: r for r in res}
    assert by["local"].predicted_class == 8
    assert 0.045 <= by["local"].radius
    assert by["global"].radius <= 1e-3
    assert by["global"].radius <= by["local"].radius <= by["margin"].radius
    for r in res:
        assert r.guarantee in (Guarantee.CERTIFIED_LOWER, Guarantee.PROBABILISTIC_LOWER)
        assert (r.failure_prob > 0) == (r.guarantee == Guarantee.PROBABILISTIC_LOWER)
    # the search's own record: the radius passed, a failing radius within tol above it
    for r in (by["local"], by["margin"]):
        passed = [e for e, _, ok in r.details["evaluations"] if ok]
        assert r.radius in passed or r.details.get("rechecks")
        assert r.upper is not None and r.upper <= r.radius * (1 + r.tol) * (1 + 1e-9)
        assert any(e == r.upper and not ok for e, _, ok in r.details["evaluations"])
    _assert_below_attacks(res, _attacks(lm.model, x0, list(CHEAP) + ["fgsm"]), x0)
    _ball_check(lm.model, x0, 8, by["margin"].radius)


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["mnist:2", "mnist:3", "mnist:test/0-9"])
def test_mnist_inputs_below_attacks(ref):
    """Sample digits and 10 real test images: certificates (coarse tol) below FGSM and PGD,
    margin >= local on every input.
    The 100-image run with every attack is examples/radius_testsets.py."""
    from lipbound import zoo
    from lipbound.inputs import load_samples

    lm = zoo.load_model("mnist")
    an = Analyzer(lm.model, lm.entry.input_shape)
    for s in load_samples(ref, entry=lm.entry):
        res = certified_radii(an, s.x, methods=("local", "margin"), tol=0.2)
        _check_margin_vs_local(res)
        _assert_below_attacks(res, _attacks(lm.model, s.x, ["fgsm", "pgd"], CHEAPER), s.x)


@pytest.mark.slow
def test_cifar10_dog_and_test_images():
    """CIFAR-10: the dog (ball check: 4000 samples and PGD in the ball) and 5 test images;
    margin >= local on each. The 100-image run is examples/radius_testsets.py."""
    from lipbound import zoo
    from lipbound.inputs import load_sample, load_samples

    lm = zoo.load_model("cifar10")
    an = Analyzer(lm.model, lm.entry.input_shape)
    x0 = load_sample("cifar10:dog", entry=lm.entry).x
    res = certified_radii(an, x0, methods=("local", "margin"), tol=0.1)
    _check_margin_vs_local(res)
    _assert_below_attacks(res, _attacks(lm.model, x0, ["fgsm", "pgd"], CHEAPER), x0)
    _ball_check(lm.model, x0, res[0].predicted_class, res[1].radius, n=4000, pgd_starts=6,
                pgd_steps=30)
    for s in load_samples("cifar10:test/0-4", entry=lm.entry):
        res = certified_radii(an, s.x, methods=("local", "margin"), tol=0.3)
        _check_margin_vs_local(res)
        _assert_below_attacks(res, _attacks(lm.model, s.x, ["fgsm", "pgd"], CHEAPER), s.x)


# ---------------------------------------------------------------------------- bad input


def _two_class_net(tied: bool) -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 3)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 0, 0] if tied else [0, 1.0, 0],
                                          [0, 0, 1.0]]))
        net[0].bias.zero_()
    return net


@pytest.mark.parametrize("method", METHODS)
def test_tie_gives_zero_with_a_plain_reason(method):
    net = _two_class_net(tied=True)
    r = certified_radius(net, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64),
                         method=method)
    assert r.radius == 0.0 and r.margin == 0.0
    assert "tie" in r.details["reason"] and "decision boundary" in r.details["reason"]
    assert r.n_bound_evaluations == 0


def test_constant_network_is_capped_at_max_eps():
    net = nn.Sequential(nn.Linear(3, 3)).double().eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    for r in certified_radii(net, torch.zeros(1, 3, dtype=torch.float64), max_eps=50.0):
        assert r.radius == 50.0 and "max_eps" in r.details["reason"]


def test_max_eps_caps_a_large_radius():
    net = _two_class_net(tied=False)
    x0 = torch.tensor([[5.0, 0.0, 0.0]], dtype=torch.float64)
    r = certified_radius(net, x0, max_eps=0.1)
    assert r.radius == 0.1 and "at least" in r.details["reason"]


@pytest.mark.parametrize("x0", [
    torch.tensor([[float("nan"), 0.0, 0.0]]),
    torch.tensor([[0.0, float("inf"), 0.0]]),
    torch.zeros(2, 3),           # a batch of two
    torch.zeros(1, 4),           # wrong size
    [[0.0, 0.0, 0.0]],           # not a tensor
])
def test_bad_inputs_raise_input_error(x0):
    with pytest.raises(InputError):
        certified_radius(_two_class_net(tied=False), x0)


@pytest.mark.parametrize("kw, needle", [
    ({"tol": 0.0}, "tol"), ({"tol": 1.0}, "tol"), ({"tol": float("nan")}, "tol"),
    ({"tol": "x"}, "tol"), ({"max_eps": 0.0}, "max_eps"), ({"max_eps": -1.0}, "max_eps"),
    ({"max_eps": float("inf")}, "max_eps"), ({"start": -1.0}, "start"),
    ({"method": "exact"}, "method"), ({"max_evaluations": 1}, "max_evaluations"),
])
def test_bad_settings_raise_input_error(kw, needle):
    with pytest.raises(InputError, match=needle):
        certified_radius(_two_class_net(tied=False), torch.ones(1, 3), **kw)


def test_non_vector_and_single_class_outputs_raise():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(InputError, match="vector of class scores"):
        certified_radius(conv, torch.zeros(1, 1, 5, 5))
    one = nn.Sequential(nn.Linear(3, 1)).eval()
    with pytest.raises(InputError, match="n >= 2"):
        certified_radius(one, torch.zeros(1, 3))


def test_nonfinite_scores_raise():
    net = nn.Sequential(nn.Linear(2, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.fill_(1e300)
        net[0].bias.zero_()
    with pytest.raises(InputError, match="NaN/inf"):
        certified_radius(net, torch.tensor([[1e300, 1e300]], dtype=torch.float64))


def test_analyzer_must_match_model_and_options():
    a, b = _two_class_net(False), _two_class_net(False)
    an = Analyzer(a, (3,))
    with pytest.raises(InputError, match="different model"):
        certified_radius(b, torch.ones(1, 3), analyzer=an)
    with pytest.raises(InputError, match="spectral=.exact. given with an Analyzer"):
        certified_radius(a, torch.ones(1, 3), analyzer=an, spectral="exact")
    with pytest.raises(InputError, match="methods"):
        certified_radii(a, torch.ones(1, 3), methods=("local", "nope"))
    r = certified_radius(an, torch.tensor([[1.0, 0.2, 0.0]]))  # an Analyzer as the model
    assert r.radius > 0


def test_result_to_dict_is_json():
    r = certified_radius(_two_class_net(False), torch.tensor([[1.0, 0.2, 0.0]]))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["method"] == "local" and d["radius"] == r.radius
    # a radius is a lower bound on the smallest adversarial perturbation, never an upper one
    assert d["guarantee"] == "certified lower bound" and d["tol"] == 1e-3
    assert d["guarantee_text"] == "deterministic" and "lower bound" in d["quantity"]
    with pytest.raises(AttributeError):
        r.radius = 1.0  # frozen


# ---------------------------------------------------------------------------------- CLI


def test_cli_single_json_and_many_inputs(tmp_path, capsys):
    from lipbound.cli import main

    assert main(["radius", "--model", "tiny", "--json", "--attacks", "fgsm"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"certified_radius", "certified", "attacks", "seconds", "model", "input",
            "predicted", "margin"} <= set(out)
    assert [c["method"] for c in out["certified"]] == ["local", "margin", "global"]
    assert out["certified_radius"] == max(c["radius"] for c in out["certified"])
    assert out["attacks"][0]["radius"] >= out["certified_radius"]
    batch = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    np.save(tmp_path / "b.npy", batch)
    assert main(["radius", "--model", "compnet", "--input", str(tmp_path / "b.npy"),
                 "--methods", "local,global", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "violations (certified > attack): 0" in text
    lines = (tmp_path / "o" / "radius.csv").read_text().splitlines()
    assert lines[0].split(",")[:7] == ["index", "input", "label", "predicted", "margin",
                                       "local_radius", "global_radius"]
    assert len(lines) == 5
    assert (tmp_path / "o" / "radius.png").stat().st_size > 0
    assert (tmp_path / "o" / "radius.pdf").stat().st_size > 0
    assert main(["radius", "--model", "tiny", "--attacks", "nope"]) == 2
    assert "unknown attack" in capsys.readouterr().err


def _fake_attack(x_adv, radius, cls_from, cls_to):
    from lipbound.attacks.base import AttackResult

    def run_attacks(model, x0, methods=None, seed=0):
        return [AttackResult("fgsm", True, radius, x_adv, cls_from, cls_to, 0.0)]
    return run_attacks


def _exact_class_change_point(an, x0: torch.Tensor, c: int) -> torch.Tensor:
    """A far random point where the exact network (float64 pass plus its rounding bound)
    predicts another class than ``c`` (skips the test when 200 draws find none)."""
    from lipbound.radius import exact_class_change

    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = 30 * torch.randn(x0.shape, generator=gen)
        if exact_class_change(an, x, c) == "changes":
            return x
    pytest.skip("no class change found")


@pytest.mark.parametrize("exact_changes", [False, True])
def test_cli_violation_only_when_the_exact_network_changes_class(capsys, monkeypatch,
                                                                 exact_changes):
    """A verified attack closer than the certified radius is a violation (exit 1) when the
    network in exact arithmetic changes class at it too; a class change of the float32 model
    that the exact network does not make is noted as rounding, not a violation."""
    import lipbound.attacks as attacks
    from lipbound.analyzer import Analyzer
    from lipbound.cli import main
    from lipbound.inputs import load_sample
    from lipbound.radius import exact_class_change
    from lipbound.zoo import load_model

    lm = load_model("compnet")
    x0 = load_sample("compnet:zeros", entry=lm.entry).x
    an = Analyzer(lm.model, lm.entry.input_shape)
    y0 = an.forward(x0).reshape(-1)
    c = int(torch.argmax(y0))
    if exact_changes:
        # a far point where the exact network (float64 pass plus its rounding bound) predicts
        # another class, reported (falsely) at a tiny radius
        x = _exact_class_change_point(an, x0, c)
    else:
        x = x0.clone()  # the exact network keeps its class at x0 itself
        assert exact_class_change(an, x, c) == "keeps"
    monkeypatch.setattr(attacks, "run_attacks", _fake_attack(x, 1e-9, c, (c + 1) % 10))
    rc = main(["radius", "--model", "compnet", "--json", "--attacks", "fgsm",
               "--methods", "global"])
    io = capsys.readouterr()
    out = json.loads(io.out)
    assert out["min_attack_radius"] == 1e-9 < out["certified_radius"]
    assert out["violation"] is exact_changes
    assert out["closer_attack_is_float32_rounding"] is (not exact_changes)
    assert rc == (1 if exact_changes else 0)
    assert ("this is a bug" in io.err) is exact_changes
    assert ("float32 rounding" in io.err) is (not exact_changes)


def test_cli_violation_when_a_farther_closer_attack_changes_the_exact_class(capsys,
                                                                             monkeypatch):
    """Every attack closer than the certified radius is checked, not only the closest: the
    closest can be float32 rounding (the exact network keeps its class there) while the next
    one is a real class change of the exact network inside the certified ball."""
    import lipbound.attacks as attacks
    from lipbound.analyzer import Analyzer
    from lipbound.attacks.base import AttackResult
    from lipbound.cli import main
    from lipbound.inputs import load_sample
    from lipbound.zoo import load_model

    lm = load_model("compnet")
    x0 = load_sample("compnet:zeros", entry=lm.entry).x
    an = Analyzer(lm.model, lm.entry.input_shape)
    c = int(torch.argmax(an.forward(x0).reshape(-1)))
    far = _exact_class_change_point(an, x0, c)

    def run_attacks(model, x0, methods=None, seed=0):
        if methods == ["fgsm"]:  # the closest: the exact network keeps its class (x0 itself)
            return [AttackResult("fgsm", True, 1e-9, x0.clone(), c, (c + 1) % 10, 0.0)]
        return [AttackResult("pgd", True, 2e-9, far, c, (c + 1) % 10, 0.0)]

    monkeypatch.setattr(attacks, "run_attacks", run_attacks)
    rc = main(["radius", "--model", "compnet", "--json", "--attacks", "fgsm,pgd",
               "--methods", "global"])
    io = capsys.readouterr()
    out = json.loads(io.out)
    assert out["min_attack_radius"] == 1e-9 < 2e-9 < out["certified_radius"]
    assert out["violation"] is True
    assert out["closer_attack_is_float32_rounding"] is False
    assert rc == 1
    assert "this is a bug" in io.err


def test_probabilistic_radius_text_rounds_the_failure_probability_up():
    from dataclasses import replace

    from lipbound.results import Guarantee

    r = certified_radius(_two_class_net(False), torch.tensor([[1.0, 0.2, 0.0]]))
    p = replace(r, guarantee=Guarantee.PROBABILISTIC_LOWER, failure_prob=1.4e-6)
    assert p.guarantee_text == "probabilistic (failure prob <= 2e-06)"  # not 1e-06


def test_recheck_backs_off_when_twins_draw_slightly_larger_bounds():
    """A twin's probabilistic bound can exceed the search's by a fraction of a percent. The
    fixed-point step eps/ratio aims at ratio 1 exactly, so a later twin whose bound is a
    little larger again fails it (ratios 1.0042, 1.0006, 1.0006 on a CIFAR-10 test image,
    which then got radius 0). The re-checks back off beyond the step and confirm a radius
    within a few percent; a passing re-check reports its own (independent) evaluation."""
    from lipbound import radius as rad

    net = _random_net(0, 3, (4,), 2)
    an = Analyzer(net, (3,))
    pb = rad._problem(an, torch.zeros(1, 3, dtype=torch.float64))
    root = 0.01
    tested = []

    def noisy_test(twin, pb_, eps):  # twin k's bound is larger by 0.4 % per twin
        k = len(tested)
        tested.append(eps)
        ratio = eps / root * (1 + 0.004 * (k + 1))
        return rad._Eval(eps, ratio < 1, ratio, ratio, Guarantee.PROBABILISTIC, 1e-6, 0)

    start = rad._Eval(root * 0.999, True, 0.999, 0.999, Guarantee.PROBABILISTIC, 1e-6, 0)
    chk, log, n = rad._recheck(an, noisy_test, pb, start, 1)
    assert chk is not None and chk.ok and n == len(log) == 2
    assert [e["passed"] for e in log] == [False, True]
    assert 0.97 * root < chk.eps < root / 1.008  # a few percent below the root, not 0
    assert tested[0] == start.eps  # the search's radius is tested first, as it is


def test_radius_guarantee_says_lower_bound():
    """A certified radius is a lower bound on the smallest adversarial perturbation: its
    guarantee says so in the Python API too (not the Lipschitz bound's "upper bound")."""
    from lipbound.results import lower_bound_from

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                              torch.nn.Linear(6, 3)).eval()
    x0 = torch.randn(1, 4)
    for spectral in ("exact", "lanczos"):
        an = Analyzer(net, (4,), spectral=spectral)
        for r in certified_radii(an, x0, methods=("local", "margin", "global")):
            assert r.guarantee in (Guarantee.CERTIFIED_LOWER, Guarantee.PROBABILISTIC_LOWER)
            assert not r.guarantee.is_upper_bound
            assert r.guarantee.value.endswith("lower bound") and r.guarantee_label == \
                r.guarantee.value
    assert lower_bound_from(Guarantee.CERTIFIED) is Guarantee.CERTIFIED_LOWER
    assert lower_bound_from(Guarantee.EXACT) is Guarantee.CERTIFIED_LOWER
    assert lower_bound_from(Guarantee.PROBABILISTIC) is Guarantee.PROBABILISTIC_LOWER
    with pytest.raises(ValueError):
        lower_bound_from(Guarantee.ESTIMATE)
