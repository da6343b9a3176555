"""The ends of the float64 range and the model's own floating-point type.

* a radius or row norm beyond float64 (``ȳ = inf``) gives the ReLU slope's limit 1, never a
  NaN that drops the row;
* a model whose forward pass overflows, or whose coefficients (weights times folded scales)
  underflow when squared, is refused with the fix;
* a certified radius is for the model's own class at ``x0``: when the float32 model and the
  exact network disagree there (a near tie), the radius is 0 with the reason.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import n_examples
from lipbound import Analyzer
from lipbound.errors import InputError
from lipbound.radius import certified_radius

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _scalar_chain(w1: float, w2: float) -> nn.Module:
    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(w1)
        m[0].bias.zero_()
        m[2].weight.fill_(w2)
        m[2].bias.zero_()
    return m


@settings(max_examples=n_examples(20))
@given(w=st.floats(1.0, 1e3), log_eps=st.floats(290.0, 307.0), x=st.floats(-10.0, 10.0))
def test_huge_radius_keeps_the_active_slope(w: float, log_eps: float, x: float) -> None:
    """relu(w x) w on a ball of radius 1e290..1e307: the ball reaches the active side, so the
    local constant is exactly w^2 (the row norm times eps overflows to inf)."""
    m = _scalar_chain(w, w)
    an = Analyzer(m, (1,))
    x0 = torch.tensor([[x]], dtype=DT)
    res = an.local_bound(x0, 10.0 ** log_eps)
    assert math.isfinite(res.value)
    assert res.value >= w * w
    assert an.global_bound().value >= w * w


def test_huge_radius_on_a_wider_network() -> None:
    """Random 2-4-2 network with weights scaled by 1e140 and 1e-140 (the product is O(1)):
    at eps = 1e200 every ReLU can switch, so the bound must reach the largest local gradient
    norm seen over random points of a huge ball."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(4, 2, generator=g, dtype=DT) * 1e140)
        m[0].bias.zero_()
        m[2].weight.copy_(torch.randn(2, 4, generator=g, dtype=DT) * 1e-140)
    an = Analyzer(m, (2,))
    x0 = torch.tensor([[0.3, -0.2]], dtype=DT)
    val = an.local_bound(x0, 1e200).value
    assert math.isfinite(val)
    # exact Jacobians at random directions: the network is positively homogeneous, so the
    # activation patterns at unit directions are those of the huge ball
    worst = 0.0
    for _ in range(200):
        u = torch.randn(1, 2, generator=g, dtype=DT)
        u = u / u.norm()
        jac = torch.autograd.functional.jacobian(lambda z: m(z), u).reshape(2, 2)
        worst = max(worst, float(torch.linalg.matrix_norm(jac, 2)))
    assert val >= worst


def test_overflowing_forward_pass_is_refused() -> None:
    m = _scalar_chain(1e160, 1e160)
    with pytest.raises(InputError, match="not finite.*rescale"):
        Analyzer(m, (1,))


def test_underflow_through_folded_scales_is_refused() -> None:
    """Weights 1e-100 and a batch-norm scale 1e-100 each pass the 1e-150 floor alone, but
    the block's coefficients are their product, whose square underflows to 0: the bound
    would be 0 for a network that does move."""
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 1))
    m = m.to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(1e-100)
        m[0].bias.fill_(1.0)
        m[1].weight.fill_(1e-100)
        m[1].running_var.fill_(1.0)
    with pytest.raises(InputError, match="1e-150.*folded scales.*rescale"):
        Analyzer(m, (2,))


def _near_tie(bias1: float) -> nn.Module:
    """float32 scores 1e8 and 1e8 + bias1: float32 rounds both to 1e8 when bias1 < 4."""
    m = nn.Sequential(nn.Linear(1, 2)).eval()
    with torch.no_grad():
        m[0].weight.fill_(1e8)
        m[0].bias.copy_(torch.tensor([0.0, bias1]))
    return m


@pytest.mark.parametrize("method", ["local", "margin", "global"])
def test_radius_refused_when_float32_and_exact_classes_differ(method: str) -> None:
    m = _near_tie(1.0)
    x0 = torch.ones(1, 1)
    assert int(m(x0).argmax()) == 0  # float32: a tie, argmax takes the first
    res = certified_radius(m, x0, method=method)
    assert res.predicted_class == 1  # exact: class 1 by a margin of 1
    assert res.radius == 0.0
    assert "float32" in res.details["reason"] and "class 0" in res.details["reason"]


def test_radius_when_float32_and_exact_classes_agree() -> None:
    """The same network with a margin float32 resolves (64 against an ulp of 8 near x0 = 1):
    a positive radius (the margin's gradient is 0, so the search reaches its cap)."""
    m = _near_tie(64.0)
    x0 = torch.ones(1, 1)
    assert int(m(x0).argmax()) == 1
    res = certified_radius(m, x0, method="margin", max_eps=0.01)
    assert res.predicted_class == 1 and res.radius > 0


def _kink_case(n: int = 8) -> tuple[torch.Tensor, float]:
    """An input and bias where ``sum(x) + b`` is positive exactly (rationals) but negative
    as float64 computes it: one 1 and small terms that each vanish against it."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    for _ in range(5000):
        x = torch.cat([torch.ones(1, dtype=DT), torch.rand(n - 1, generator=g, dtype=DT) * 1e-16])
        b = -(1.0 + 2.0 ** -52 * float(torch.randint(1, 4, (1,), generator=g)))
        w, bb = torch.ones(1, n, dtype=DT), torch.tensor([b], dtype=DT)
        xs = x.unsqueeze(0)
        # as the analysis computes it, and as nn.Linear does (addmm: another order)
        computed = max(float((xs @ w.T + bb)[0, 0]), float(torch.addmm(bb, xs, w.T)[0, 0]))
        exact = sum(Fraction(float(v)) for v in x) + Fraction(b)
        if computed < 0 < exact:
            return x.unsqueeze(0), b
    raise AssertionError("no kink case found")  # pragma: no cover


def test_relu_just_on_at_x0_though_float64_says_off() -> None:
    """The pre-activation is +O(1e-17) exactly and -2e-16 as computed: with eps far below
    both, the ReLU is on in the whole ball and the local constant is 3 sqrt(n). A bound from
    the computed sign alone would be 0."""
    x0, b = _kink_case()
    n = x0.shape[1]
    m = nn.Sequential(nn.Linear(n, 1), nn.ReLU(), nn.Linear(1, 1)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[0].bias.fill_(b)
        m[2].weight.fill_(3.0)
        m[2].bias.zero_()
    an = Analyzer(m, (n,))
    for eps in (1e-30, 1e-20):
        assert an.local_bound(x0, eps).value >= 3.0 * math.sqrt(n)


def test_radius_not_certified_for_a_class_decided_by_rounding() -> None:
    """Scores ``sum(x) + b`` and 0: class 0 exactly, class 1 as float64 computes it, by a
    margin of 2e-16. The margin is within the forward pass's rounding, so no radius."""
    x0, b = _kink_case()
    n = x0.shape[1]
    m = nn.Sequential(nn.Linear(n, 2)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].weight[0].fill_(1.0)
        m[0].bias.copy_(torch.tensor([b, 0.0], dtype=DT))
    for method in ("local", "margin", "global"):
        res = certified_radius(m, x0, method=method)
        assert res.radius == 0.0, (method, res.radius)
        assert "rounding" in res.details["reason"]


def _exact_forward(m: nn.Sequential, x: list) -> list:
    """The network in rational arithmetic on its float64 parameters."""
    from fractions import Fraction

    v = [t if isinstance(t, Fraction) else Fraction(float(t)) for t in x]
    for layer in m:
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().tolist()
            b = layer.bias.detach().tolist()
            v = [sum((Fraction(w[i][k]) * v[k] for k in range(len(v))), Fraction(b[i]))
                 for i in range(len(w))]
        elif isinstance(layer, nn.BatchNorm1d):
            # folded as lipbound folds it: the float64 scale and shift are the exact reference
            sc = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).detach()
            sh = (layer.bias - layer.running_mean * sc).detach()
            v = [Fraction(float(sc[i])) * v[i] + Fraction(float(sh[i])) for i in range(len(v))]
        elif isinstance(layer, nn.ReLU):
            v = [max(t, 0) for t in v]
        else:  # pragma: no cover
            raise TypeError(layer)
    return v


@settings(max_examples=n_examples(25))
@given(seed=st.integers(0, 10_000), bn=st.booleans(), log_scale=st.floats(-2.0, 6.0),
       log_eps=st.floats(-12.0, 0.0))
def test_nominal_error_bounds_the_exact_output(seed: int, bn: bool, log_scale: float,
                                               log_eps: float) -> None:
    """Against the exact (rational) forward pass: ``||f̂(x0) - f(x0)|| <= nominal_error``,
    for random networks with large biases (cancellation), with and without a merged
    Linear-BatchNorm-Linear run, from the local factors and from the global ones."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(seed)
    widths = [4, 6, 5, 3]
    layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
    if bn:
        layers += [nn.BatchNorm1d(widths[1]), nn.Linear(widths[1], widths[1])]
    layers += [nn.ReLU(), nn.Linear(widths[1], widths[2]), nn.ReLU(),
               nn.Linear(widths[2], widths[3])]
    m = nn.Sequential(*layers).to(DT).eval()
    scale = 10.0 ** log_scale
    with torch.no_grad():
        for layer in m:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=DT))
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=DT) * scale)
            elif isinstance(layer, nn.BatchNorm1d):
                n = layer.num_features
                layer.weight.copy_(torch.randn(n, generator=g, dtype=DT))
                layer.bias.copy_(torch.randn(n, generator=g, dtype=DT) * scale)
                layer.running_mean.copy_(torch.randn(n, generator=g, dtype=DT) * scale)
                layer.running_var.copy_(torch.rand(n, generator=g, dtype=DT) + 0.5)
    x0 = torch.randn(1, widths[0], generator=g, dtype=DT) * scale
    an = Analyzer(m, (widths[0],))
    computed = an.forward(x0).reshape(-1).tolist()
    exact = _exact_forward(m, x0[0].tolist())
    dist_sq = sum((Fraction(c) - t) ** 2 for c, t in zip(computed, exact, strict=True))
    res = an.local_bound(x0, 10.0 ** log_eps)
    assert Fraction(res.nominal_error) ** 2 >= dist_sq
    _, glob, _, _ = an.nominal_error(x0)
    assert Fraction(glob) ** 2 >= dist_sq


def test_nominal_error_carries_an_early_cancellation_forward() -> None:
    """x + 1e8 rounds to a multiple of 2^-26 (an error up to 7e-9), the next layer removes
    the 1e8 again, and the last layer's weight 1e6 turns the early error into ~1e-3: a bound
    from the last layer's own rounding alone (~1e-10) would be far too small."""
    from fractions import Fraction

    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU(),
                      nn.Linear(1, 1)).to(DT).eval()
    with torch.no_grad():
        for layer, (w, b) in zip([m[0], m[2], m[4]], [(1.0, 1e8), (1.0, -1e8), (1e6, 0.0)],
                                 strict=True):
            layer.weight.fill_(w)
            layer.bias.fill_(b)
    x0 = torch.tensor([[1.0 + 1e-9 * math.pi]], dtype=DT)
    an = Analyzer(m, (1,))
    computed = Fraction(float(an.forward(x0)[0, 0]))
    exact = _exact_forward(m, x0[0].tolist())[0]
    assert abs(computed - exact) > Fraction(1, 10**4)  # the early error did carry through
    for eps in (1e-12, 1e-3):
        assert Fraction(an.local_bound(x0, eps).nominal_error) >= abs(computed - exact)
    assert Fraction(an.nominal_error(x0)[1]) >= abs(computed - exact)


def test_nominal_error_of_constant_neurons_is_carried() -> None:
    """A neuron whose row cannot move (it reads only constant inputs: 1e8 and 0.3 from
    bias-only neurons) still rounds (1e8 + 0.3 - 1e8 is off by ~5e-9), and a weight 1e6 on
    it turns that into ~5e-3 at the output: the error of coordinates outside the movable
    mask must be carried too."""
    from fractions import Fraction

    m = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(),
                      nn.Linear(2, 1)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0], [0.0], [0.0]], dtype=DT))
        m[0].bias.copy_(torch.tensor([0.0, 1e8, 0.3], dtype=DT))
        m[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=DT))
        m[2].bias.copy_(torch.tensor([0.0, -1e8], dtype=DT))
        m[4].weight.copy_(torch.tensor([[1.0, 1e6]], dtype=DT))
        m[4].bias.zero_()
    x0 = torch.tensor([[1.0]], dtype=DT)
    an = Analyzer(m, (1,))
    computed = Fraction(float(an.forward(x0)[0, 0]))
    exact = _exact_forward(m, x0[0].tolist())[0]
    assert abs(computed - exact) > Fraction(1, 10**3)
    for eps in (1e-9, 0.5):
        assert Fraction(an.local_bound(x0, eps).nominal_error) >= abs(computed - exact)


# ---- below the normal range: squares, products and roundings on the subnormal grid ----

def _bn(n: int, scale: float) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(n, eps=0.0).to(DT)
    with torch.no_grad():
        bn.weight.fill_(scale)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    return bn


def _lin(w: list, b: list) -> nn.Linear:
    layer = nn.Linear(len(w[0]), len(w)).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w, dtype=DT))
        layer.bias.copy_(torch.tensor(b, dtype=DT))
    return layer


@pytest.mark.parametrize("before", [True, False])
def test_a_scale_whose_square_underflows_is_refused(before: bool) -> None:
    """A batch-norm scale 1e-200 next to a layer of 1e100: every coefficient is 1e-100 (their
    product passes the 1e-150 floor), but the row norms square the scale alone (0): the bound
    was 0, global and local, for a network of Lipschitz constant 1e-100."""
    lin = _lin([[1e100, 0.0], [0.0, 1e100]], [0.0, 0.0])
    layers = [_bn(2, 1e-200), lin] if before else [lin, _bn(2, 1e-200), nn.ReLU(),
                                                   _lin([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])]
    m = nn.Sequential(*layers).to(DT).eval()
    with pytest.raises(InputError, match="1e-150.*partial product"):
        Analyzer(m, (2,))


def test_a_partial_product_that_underflows_when_squared_is_refused() -> None:
    """Scale 1e-100, weight 1e-100, then a scale 1e100: each part and the whole product
    (1e-100) pass the floor, but the row norms form (1e-100 * 1e-100)^2 = 0 before the last
    scale."""
    m = nn.Sequential(_bn(2, 1e-100), _lin([[1e-100, 0.0], [0.0, 1e-100]], [1.0, 1.0]),
                      _bn(2, 1e100), nn.ReLU(), _lin([[1.0, 1.0]], [0.0])).to(DT).eval()
    with pytest.raises(InputError, match="1e-150.*partial product"):
        Analyzer(m, (2,))


def test_product_of_factors_below_the_normal_range() -> None:
    """Seven layers of weight 1e-50 (all ReLUs on): the product of the factors, 1e-350, was
    rounded to 0 (global and local). The exact Lipschitz constant is the product of the
    weights; every reported bound must be at least that."""
    layers: list[nn.Module] = []
    for _ in range(7):
        layers += [_lin([[1e-50]], [1.0]), nn.ReLU()]
    m = nn.Sequential(*layers[:-1]).to(DT).eval()
    exact = Fraction(1e-50) ** 7
    an = Analyzer(m, (1,))
    assert Fraction(an.global_bound().value) >= exact
    assert Fraction(an.local_bound(torch.zeros(1, 1, dtype=DT), 1.0).value) >= exact
    rows = an.local_bound_rows(torch.zeros(1, 1, dtype=DT), 1.0, torch.ones(1, 1, dtype=DT))
    assert Fraction(float(rows.values[0])) >= exact


def _ratio_sq(m: nn.Sequential, x0: list, x: list) -> Fraction:
    """``||f(x) - f(x0)||^2 / ||x - x0||^2`` in exact arithmetic: a lower bound on the local
    constant at ``x0`` over any ball that holds ``x``."""
    fx, f0 = _exact_forward(m, x), _exact_forward(m, x0)
    num = sum((a - b) ** 2 for a, b in zip(fx, f0, strict=True))
    den = sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(x, x0, strict=True))
    return num / den


def test_radius_propagated_below_the_normal_range() -> None:
    """eps = 2^-1000 times a first factor 2^-100 is 2^-1100, rounded to 0: the next ReLU,
    2^-620 below its kink with a row of 2^500, looked dead (a bound of 0), and it turns on
    at x = eps."""
    m = nn.Sequential(_lin([[2.0 ** -100]], [0.0]), nn.ReLU(), _lin([[2.0 ** 500]], [-2.0 ** -620]),
                      nn.ReLU(), _lin([[1.0]], [0.0])).to(DT).eval()
    eps = 2.0 ** -1000
    low = _ratio_sq(m, [0.0], [eps])
    assert low > 0
    res = Analyzer(m, (1,)).local_bound(torch.zeros(1, 1, dtype=DT), eps)
    assert Fraction(res.value) ** 2 >= low


def test_upper_limit_rounded_on_the_subnormal_grid() -> None:
    """eps * ||a|| = 1.4 of the smallest subnormal rounds to 1 of it, just cancelling a bias of
    -1 of it: ȳ was 0, the row dead (a bound of 0), though x = eps gives +0.4."""
    u = 2.0 ** -1074
    m = nn.Sequential(_lin([[math.ldexp(1.4, -474)]], [-u]), nn.ReLU(),
                      _lin([[1.0]], [0.0])).to(DT).eval()
    eps = 2.0 ** -600
    low = _ratio_sq(m, [0.0], [eps])
    assert low > 0
    res = Analyzer(m, (1,)).local_bound(torch.zeros(1, 1, dtype=DT), eps)
    assert Fraction(res.value) ** 2 >= low


def test_forward_rounding_below_the_normal_range() -> None:
    """100 products of 0.49 of the smallest subnormal each round to 0 and the bias is -1 of
    it: the computed pre-activation is -1, the exact one +48, but the relative rounding bound
    is 0 there: the ReLU looked dead (a bound of 0), or half on. The exact network is on at
    x0 and stays on over the (tiny) ball: its local constant is ||w||."""
    n, w = 100, 2.0 ** -480
    x0 = [math.ldexp(0.49, -594)] * n
    m = nn.Sequential(_lin([[w] * n], [-2.0 ** -1074]), nn.ReLU(),
                      _lin([[1.0]], [0.0])).to(DT).eval()
    assert _exact_forward(m, x0)[0] > 0
    eps = 2.0 ** -700
    res = Analyzer(m, (n,)).local_bound(torch.tensor([x0], dtype=DT), eps)
    assert Fraction(res.value) ** 2 >= n * Fraction(w) ** 2


def test_nominal_error_not_lost_when_squared() -> None:
    """The first layer's rounding error (exact 2^-704, computed 0, bound about 2^-651) is
    below 1e-154: torch's norm of it is 0, so the nominal error was lost, and a row of 2^500
    whose computed pre-activation is -2^-300 (exact +2^-204) looked dead (a bound of 0)."""
    s = 2.0 ** -600
    a = 1.0 + 2.0 ** -52
    x0 = [s * a, s * (1.0 + 2.0 ** -51)]
    # two equal rows: torch's norm of a single entry is its magnitude, of two it squares
    m = nn.Sequential(_lin([[a, -1.0], [a, -1.0]], [0.0, 0.0]), nn.ReLU(),
                      _lin([[2.0 ** 500, 0.0]], [-2.0 ** -300]), nn.ReLU(),
                      _lin([[1.0]], [0.0])).to(DT).eval()
    an = Analyzer(m, (2,))
    x0t = torch.tensor([x0], dtype=DT)
    assert float(an.forward(x0t)[0, 0]) == 0.0 and _exact_forward(m, x0)[0] > 0
    eps = 2.0 ** -900
    step = Fraction(eps) / 2  # x = x0 + step (1, -1): in the ball, and the ReLUs stay on
    low = _ratio_sq(m, x0, [Fraction(x0[0]) + step, Fraction(x0[1]) - step])
    assert low > 0
    assert Fraction(an.local_bound(x0t, eps).value) ** 2 >= low
    exact_out = _exact_forward(m, x0)[0]
    assert Fraction(an.nominal_error(x0t)[1]) >= abs(exact_out)


def test_slope_when_the_upper_limit_is_far_from_the_nominal_value() -> None:
    """y0 = -a (a = 9e298) and eps ||a_i|| just below the largest float: ȳ is finite and
    positive, but ȳ - y0 overflows, and the slope ȳ / inf was 0: a bound of 0 for a network of
    local constant 3.3e150 (its ReLU turns on at x = eps)."""
    big = 1.7976931348623157e308
    a, w = 0.5e-9 * big, 2.0 ** 500
    eps = math.nextafter(big - a, 0.0) / w
    m = nn.Sequential(_lin([[w]], [-a]), nn.ReLU(), _lin([[1.0]], [0.0])).to(DT).eval()
    low = _ratio_sq(m, [0.0], [eps])
    assert low > 0
    res = Analyzer(m, (1,)).local_bound(torch.zeros(1, 1, dtype=DT), eps)
    assert Fraction(res.value) ** 2 >= low


def _subnormal_case(seed: int) -> tuple[nn.Sequential, list, list, list, float]:
    """A small random MLP whose weights (2^±600), biases (down to the smallest subnormal),
    input and radius put its values anywhere from the subnormal range up."""
    import random

    rng = random.Random(seed)
    widths = [rng.randint(1, 4) for _ in range(rng.randint(2, 4))] + [rng.randint(1, 2)]
    ws, bs, layers = [], [], []
    for k in range(len(widths) - 1):
        ex = rng.randint(-600, 600)
        w = [[rng.choice([-1, 1]) * math.ldexp(rng.uniform(1, 2), ex) for _ in range(widths[k])]
             for _ in range(widths[k + 1])]
        bexp = rng.choice([-1074, -1070, -1060, -1030, -1000, -900, -600, -300, -100, 0])
        b = [rng.choice([-1, 0, 1]) * math.ldexp(rng.randint(1, 60), bexp)
             for _ in range(widths[k + 1])]
        ws.append(w)
        bs.append(b)
        layers.append(_lin(w, b))
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    xexp = rng.choice([-1074, -1060, -1000, -800, -600, -300, 0])
    x0 = [rng.choice([-1, 1]) * math.ldexp(rng.uniform(0, 64), xexp) for _ in range(widths[0])]
    eps = math.ldexp(1.0, rng.randint(-1074, 0))
    return nn.Sequential(*layers).to(DT).eval(), ws, bs, x0, eps


@settings(max_examples=n_examples(150), deadline=None)
@given(seed=st.integers(0, 2**32))
def test_local_bound_below_the_normal_range_random(seed: int) -> None:
    """Random small networks near the subnormal range: the local bound's square is at least
    the exact ratio ``||f(x) - f(x0)||^2 / ||x - x0||^2`` at rational points of the ball (the
    old code reported 0 for 7 of 222 such networks: products, radii and rounding bounds lost
    below the normal range)."""
    import random

    m, _, _, x0, eps = _subnormal_case(seed)
    try:
        an = Analyzer(m, (len(x0),))
    except InputError:
        return  # coefficients whose squares underflow: refused, as documented
    value = an.local_bound(torch.tensor([x0], dtype=DT), eps).value
    assert not math.isnan(value)
    if math.isinf(value):
        return
    rng = random.Random(seed + 1)
    for _ in range(8):
        d = [Fraction(rng.randint(-1000, 1000)) for _ in x0]
        nd = sum(v * v for v in d)
        if nd == 0:
            continue
        s = Fraction(eps) / (math.isqrt(int(nd)) + 1) * Fraction(rng.choice([1, 2, 8, 1000]), 1000)
        x = [Fraction(a) + s * di for a, di in zip(x0, d, strict=True)]
        assert Fraction(value) ** 2 >= _ratio_sq(m, x0, x)


def test_local_bound_refused_when_the_forward_pass_at_x0_overflows() -> None:
    """x0 = 1e10 into a weight -1e300: the pre-activation is -inf in float64 (exactly -1e310),
    its rounding bound inf, and y0 + e = NaN made the ReLU look off: a bound of 0, though
    x = x0 - 1e11 turns it on (a ratio of 9e299). The float64 nominal values are needed:
    refused."""
    m = nn.Sequential(_lin([[-1e300]], [0.0]), nn.ReLU(), _lin([[1.0]], [0.0])).to(DT).eval()
    assert _ratio_sq(m, [1e10], [Fraction(1e10) - Fraction(1e11)]) > 0
    an = Analyzer(m, (1,))
    with pytest.raises(InputError, match="forward pass at x0 overflows"):
        an.local_bound(torch.tensor([[1e10]], dtype=DT), 1e11)


def test_margin_rows_after_a_constant_layer_with_an_infinite_row_norm() -> None:
    """A ReLU that stays off over the ball (a factor 0) before a last layer of 1e200 (its row
    norms overflow to inf): each row's bound is 0 (the last layer's input is constant), not
    the NaN of inf * 0."""
    m = nn.Sequential(_lin([[1.0]], [-10.0]), nn.ReLU(),
                      _lin([[1e200], [-1e200]], [0.0, 0.0])).to(DT).eval()
    rb = Analyzer(m, (1,)).local_bound_rows(torch.zeros(1, 1, dtype=DT), 1.0,
                                            torch.eye(2, dtype=DT))
    assert rb.values.tolist() == [0.0, 0.0]
    assert not bool(torch.isnan(rb.nominal_error).any())


def test_margin_row_of_norm_zero_after_an_infinite_prefix() -> None:
    """Two factors of 1e200 overflow the prefix product to inf; a row of the certificate
    whose last-layer norm is 0 (it reads a zero weight) is constant: 0, not inf * 0 = NaN."""
    m = nn.Sequential(_lin([[1e200]], [-1e250]), nn.ReLU(), _lin([[1e200]], [1.0]), nn.ReLU(),
                      _lin([[1.0], [0.0]], [0.0, 0.0])).to(DT).eval()
    rb = Analyzer(m, (1,)).local_bound_rows(torch.zeros(1, 1, dtype=DT), 1e60,
                                            torch.eye(2, dtype=DT))
    assert rb.values.tolist() == [math.inf, 0.0]


def test_local_bound_with_a_zero_factor_after_an_overflowing_product() -> None:
    """Factors 1e200, 1e200 (their product inf), then a layer of weight 0 (factor 0): the
    network is constant over the ball, so its bound is 0, not inf * 0 = NaN."""
    m = nn.Sequential(_lin([[1e200]], [-1e250]), nn.ReLU(), _lin([[1e200]], [1.0]), nn.ReLU(),
                      _lin([[0.0]], [1.0]), nn.ReLU(), _lin([[1.0]], [0.0])).to(DT).eval()
    res = Analyzer(m, (1,)).local_bound(torch.zeros(1, 1, dtype=DT), 1e60)
    assert res.value == 0.0


@pytest.mark.parametrize("method", ["global", "local", "margin"])
def test_radius_with_margins_below_the_normal_range(method: str) -> None:
    """Logits of 2^-1070 (margin 2^-1069, subnormal): the radius stays below the exact
    distance to a class change (x0 itself), and the global radius's search for the largest
    r with r L < t in floats ends (one ulp of r at a time moved the subnormal product only
    every ~2^50 steps: it never returned)."""
    import signal

    w, x0 = 2.0 ** -480, 2.0 ** -590
    m = nn.Sequential(_lin([[w], [-w]], [0.0, 0.0])).to(DT).eval()
    an = Analyzer(m, (1,))

    def hang(*_):
        raise TimeoutError("the radius search did not end")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        r = certified_radius(an, torch.tensor([[x0]], dtype=DT), method=method)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert 0 < r.radius < x0
