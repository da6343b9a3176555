"""Each rule of docs/method.md on its own, by brute force or closed form.

* rule 1 (ReLU secant slope), in exact rational arithmetic;
* rule 3 (upper limit of a pre-activation) through a one-layer net: an upper bound over the
  ball, attained at x0 + eps D a_i / ||D a_i||;
* rules 2-4 (mask and affine-ReLU bound): sampled ratios <= ||R A D||, and the analyzer's
  layer factors equal ||R A D|| computed here independently;
* rule 6 (max pooling) for many kernel/stride/padding/dilation/ceil_mode combinations;
* batch-norm folding; the one-pass row norms against the materialised matrix;
* closed forms: a single Linear / Conv2d layer, products, merged linear runs, output maps.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import (
    DT,
    ball_samples,
    linear_part,
    matrix_of,
    n_examples,
    random_batchnorm,
    random_normalize,
    ratios,
    spectral_norm,
)
from lipbound import Analyzer, Guarantee
from lipbound.blocks import AffineBlock, PoolBlock
from lipbound.graph import chain_forward
from lipbound.spectral import SAFETY

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TIGHT = 1e-8  # an upper bound may exceed the exact value by at most this (relative)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =========================================================================== rule 1
def _relu(v: Fraction) -> Fraction:
    return v if v > 0 else Fraction(0)


def secant_slope(y0: Fraction, ybar: Fraction) -> Fraction:
    """method.md rule 1: r = (relu(ybar) - relu(y0)) / (ybar - y0), 0 when ybar = y0."""
    if ybar == y0:
        return Fraction(0)
    return (_relu(ybar) - _relu(y0)) / (ybar - y0)


_FL = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=n_examples(300))
@given(y0=_FL, gap=st.floats(0, 1e3), ys=st.lists(st.floats(-1e6, 1e3), min_size=1,
                                                  max_size=20))
def test_rule1_relu_secant_slope(y0, gap, ys):
    y0, ybar = Fraction(y0), Fraction(y0) + Fraction(gap)
    r = secant_slope(y0, ybar)
    if ybar == y0:
        # ybar = y0 arises only for a pre-activation that cannot move (||a_i D|| = 0 or
        # eps = 0): the only y is y0 and r = 0 is exact there
        assert r == 0 and abs(_relu(y0) - _relu(y0)) <= r * 0
        return
    # the three cases of the rule
    if y0 >= 0:
        assert r == 1
    elif ybar > 0:
        assert r == ybar / (ybar - y0) and 0 < r < 1
    else:
        assert r == 0
    # the inequality for every y <= ybar (no lower limit needed), exactly
    for y in [Fraction(v) for v in ys] + [ybar, y0, y0 - 1000, Fraction(0)]:
        if y > ybar:
            continue
        assert abs(_relu(y) - _relu(y0)) <= r * abs(y - y0), (y0, ybar, y)
    # tight at ybar, so no smaller slope works
    assert abs(_relu(ybar) - _relu(y0)) == r * abs(ybar - y0)


# =========================================================================== rule 3
def _one_layer(kind: str, seed: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    g = _gen(seed)
    if kind == "linear":
        n, m = 2 + seed % 9, 1 + seed % 7
        lin = nn.Linear(n, m).to(DT)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(m, n, generator=g, dtype=DT))
            lin.bias.copy_(torch.randn(m, generator=g, dtype=DT))
        return nn.Sequential(lin), (n,)
    c = 1 + seed % 3
    conv = nn.Conv2d(c, 2 * c, 3, stride=1 + seed % 2, padding=seed % 2, dilation=1,
                     groups=c if seed % 4 == 0 else 1).to(DT)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=DT))
        conv.bias.copy_(torch.randn(2 * c, generator=g, dtype=DT))
    mods: list[nn.Module] = []
    if kind == "conv-bn":
        mods.append(random_normalize(c, g, spatial_dims=2))
    mods.append(conv)
    if kind == "conv-bn":
        mods.append(random_batchnorm(2 * c, g))
    return nn.Sequential(*mods).to(DT).eval(), (c, 5, 6)


@settings(max_examples=n_examples(40))
@given(kind=st.sampled_from(["linear", "conv", "conv-bn"]), seed=st.integers(0, 10 ** 5),
       eps=st.floats(-3, 1).map(lambda u: 10.0 ** u), masked=st.booleans())
def test_rule3_ybar_is_attained_upper_limit(kind, seed, eps, masked):
    pre, shape = _one_layer(kind, seed)
    model = nn.Sequential(*pre, nn.ReLU()).eval()
    an = Analyzer(model, shape, spectral="exact")
    assert len(an.blocks) == 1
    b = an.blocks[0]
    assert isinstance(b, AffineBlock) and b.relu
    g = _gen(seed + 1)
    x0 = torch.randn(1, *shape, generator=g, dtype=DT)
    n = math.prod(shape)
    d = (torch.rand(n, generator=g) < 0.5).to(DT) if masked else torch.ones(n, dtype=DT)
    # the analyzer's pieces: y0 and ||a_i^T D|| in one pass
    y0 = b.forward(x0).reshape(-1)
    rn = torch.sqrt(b.sq_rows(d[None])[0])
    ybar = y0 + eps * rn
    ybar_safe = ybar + SAFETY * (y0.abs() + eps * rn)  # the analyzer's stated margin
    # reference: the model's own pre-activation and matrix
    with torch.no_grad():
        y0_ref = pre(x0).reshape(-1)
    a = matrix_of(linear_part(pre), shape)
    rn_ref = (a * d).norm(dim=1)
    torch.testing.assert_close(y0, y0_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rn, rn_ref, rtol=1e-12, atol=1e-14)
    # brute force: no point of the (masked) ball exceeds ybar
    dx = ball_samples(g, shape, eps, 600) * d.reshape(1, *shape)
    nrm = dx.flatten(1).norm(dim=1)
    dx = dx[nrm > 0]
    with torch.no_grad():
        ys = pre(x0 + dx).flatten(1)
    assert bool((ys <= ybar_safe).all())
    # attained at x0 + eps D a_i / ||D a_i||
    rows = torch.nonzero(rn_ref > 0).reshape(-1)
    if rows.numel():
        dirs = (a[rows] * d) / rn_ref[rows, None]
        with torch.no_grad():
            yat = pre(x0 + eps * dirs.reshape(-1, *shape)).flatten(1)
        yi = yat[torch.arange(rows.numel()), rows]
        assert bool((yi <= ybar_safe[rows]).all())
        scale = y0[rows].abs() + eps * rn[rows]
        assert bool(((yi - ybar[rows]).abs() <= 1e-12 * scale).all())


# =========================================================================== rules 2-4
def _rule_r(y0: torch.Tensor, ybar: torch.Tensor) -> torch.Tensor:
    """R of rule 1 from rule 3's ybar (no safety margin)."""
    return torch.where(y0 >= 0, torch.ones_like(y0),
                       torch.where(ybar > 0, ybar / (ybar - y0), torch.zeros_like(y0)))


@settings(max_examples=n_examples(40))
@given(seed=st.integers(0, 10 ** 5), n=st.integers(3, 10), m=st.integers(1, 12),
       eps=st.floats(-3, 1).map(lambda u: 10.0 ** u), bias=st.sampled_from([0.0, 1.0, 3.0]))
def test_rule4_affine_relu_layer(seed, n, m, eps, bias):
    g = _gen(seed)
    lin = nn.Linear(n, m).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g, dtype=DT))
        lin.bias.copy_(torch.randn(m, generator=g, dtype=DT) * bias)
        if m > 1 and seed % 3 == 0:
            lin.weight[0] = 0.0  # a row that cannot move
    model = nn.Sequential(lin, nn.ReLU()).eval()
    x0 = torch.randn(1, n, generator=g, dtype=DT)
    w = lin.weight.detach()
    y0 = (x0 @ w.T + lin.bias.detach()).reshape(-1)
    rn = w.norm(dim=1)
    ybar = y0 + eps * rn
    r = torch.where(rn > 0, _rule_r(y0, ybar), torch.zeros_like(y0))
    bound = spectral_norm(r[:, None] * w)
    # brute force: ratios of the layer never exceed ||R A D||
    dx = ball_samples(g, (n,), eps, 900)
    assert float(ratios(model, x0, dx).max()) <= bound
    # the analyzer computes the same factor (with its safety margins, never below)
    res = Analyzer(model, (n,), spectral="exact").local_bound(x0, eps)
    assert res.value >= bound
    assert res.value <= bound * (1 + 1e-6) + 1e-300
    assert res.layers[0].active_out == int(((ybar > 0) & (rn > 0)).sum())


@settings(max_examples=n_examples(30))
@given(seed=st.integers(0, 10 ** 5), eps=st.floats(-2, 1).map(lambda u: 10.0 ** u))
def test_rules_2_to_4_second_layer_uses_the_mask(seed, eps):
    """Two affine-ReLU layers: the second layer's factor is ||R2 A2 D1|| with D1 the outputs
    of layer 1 that can move (ybar1 > 0) and radius eps * L1 (rules 2, 3, 4, 8)."""
    g = _gen(seed)
    n, h, m = 4, 7, 5
    l1, l2 = nn.Linear(n, h).to(DT), nn.Linear(h, m).to(DT)
    with torch.no_grad():
        for lin in (l1, l2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=DT))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=DT) * 2)
    model = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU()).eval()
    x0 = torch.randn(1, n, generator=g, dtype=DT)
    res = Analyzer(model, (n,), spectral="exact").local_bound(x0, eps)
    w1, w2 = l1.weight.detach(), l2.weight.detach()
    y1 = (x0 @ w1.T + l1.bias.detach()).reshape(-1)
    ybar1 = y1 + eps * w1.norm(dim=1)
    d1 = (ybar1 > 0).to(DT)
    f1 = res.layers[0]
    assert f1.local >= spectral_norm(_rule_r(y1, ybar1)[:, None] * w1)
    f2 = res.layers[1]
    assert f2.active_in == int(d1.sum())
    assert f2.radius_in == pytest.approx(eps * f1.local, rel=1e-12)
    y2 = (torch.relu(y1) @ w2.T + l2.bias.detach()).reshape(-1)
    rn2 = (w2 * d1).norm(dim=1)
    ybar2 = y2 + f2.radius_in * rn2
    r2 = torch.where(rn2 > 0, _rule_r(y2, ybar2), torch.zeros_like(y2))
    exact2 = spectral_norm(r2[:, None] * w2 * d1[None, :])
    assert f2.local >= exact2
    assert f2.local <= exact2 * (1 + 1e-6) + 1e-300
    assert res.value == pytest.approx(f1.local * f2.local, rel=1e-12)


# =========================================================================== rule 6
MAXPOOL_CONFIGS = [
    # kernel, stride, padding, dilation, ceil_mode, (H, W)
    (2, 2, 0, 1, False, (6, 6)),
    (2, None, 0, 1, False, (7, 5)),
    (3, 2, 1, 1, False, (7, 7)),
    (3, 1, 1, 1, False, (5, 6)),
    (2, 1, 0, 1, False, (5, 5)),
    (3, 2, 1, 2, False, (9, 9)),
    (2, 3, 1, 1, True, (7, 8)),
    (3, 3, 0, 1, True, (8, 8)),
    (3, 2, 0, 2, True, (9, 7)),
    ((2, 3), (1, 2), (1, 0), (1, 2), False, (6, 7)),
    (4, 1, 2, 1, False, (5, 5)),
    (3, 2, 1, 1, True, (6, 6)),
    ((3, 2), (2, 1), (1, 1), (2, 1), True, (8, 6)),
    (5, 2, 2, 1, True, (12, 12)),
    (3, 1, 0, 1, False, (12, 12)),
    ((3, 1), 1, 0, 1, False, (5, 2)),  # max count 3: sqrt(3) rounds down in float64
]


def _window_counts(pool: nn.MaxPool2d, hw: tuple[int, int]) -> torch.Tensor:
    """How many pooling windows contain each input element, found by torch itself: the
    element set to 1 over a background of -1 is the max of exactly its windows."""
    h, w = hw
    x = -torch.ones(h * w, 1, h, w, dtype=DT)
    x.view(h * w, -1)[torch.arange(h * w), torch.arange(h * w)] = 1.0
    with torch.no_grad():
        y = pool(x)
    return (y == 1.0).flatten(1).sum(dim=1).reshape(h, w)


def _exact_ratio_ok(bound: float, pool: nn.Module, x0: torch.Tensor, dx: torch.Tensor,
                    mask_out: torch.Tensor | None = None) -> None:
    """Integer-valued x0 and dx: every max, difference and sum of squares below is exact in
    float64, so ``bound >= ||P(x0+dx)-P(x0)|| / ||dx||`` is checked exactly (as squares in
    rational arithmetic), without any rounding of the test's own."""
    assert bool((x0 == x0.round()).all()) and bool((dx == dx.round()).all())
    with torch.no_grad():
        diff = pool(x0 + dx) - pool(x0.expand_as(dx))
    num = (diff * diff).flatten(1).sum(dim=1)
    den = (dx * dx).flatten(1).sum(dim=1)
    b2 = Fraction(bound) ** 2
    for nu, de in zip(num.tolist(), den.tolist(), strict=True):
        if de > 0:
            assert b2 * int(de) >= int(nu), (bound, nu, de)
    if mask_out is not None:
        moved = (diff != 0).any(dim=0)
        assert not bool((moved & (mask_out == 0)).any())


def _int_perturbations(g: torch.Generator, shape, n: int, mask=None) -> torch.Tensor:
    dense = torch.randint(-3, 4, (n, *shape), generator=g).to(DT)
    sparse = dense * (torch.rand(n, *shape, generator=g) < 0.1)
    single = torch.zeros(n, math.prod(shape), dtype=DT)
    single[torch.arange(n), torch.randint(0, math.prod(shape), (n,), generator=g)] = \
        torch.randint(1, 30, (n,), generator=g).to(DT)
    dx = torch.cat([dense, sparse, single.reshape(n, *shape)])
    return dx if mask is None else dx * mask


@pytest.mark.parametrize("cfg", MAXPOOL_CONFIGS, ids=str)
def test_rule6_max_pooling_constant(cfg):
    k, s, p, dil, ceil, hw = cfg
    pool = nn.MaxPool2d(k, s, p, dil, ceil_mode=ceil)
    c = 2
    shape = (c, *hw)
    model = nn.Sequential(pool).eval()
    an = Analyzer(model, shape)
    (blk,) = an.blocks
    assert isinstance(blk, PoolBlock)
    counts = _window_counts(pool, hw)
    cmax = int(counts.max())
    glob = an.global_bound()
    assert glob.guarantee in (Guarantee.CERTIFIED, Guarantee.EXACT)
    # sound: >= sqrt(cmax) exactly (compared as squares); tight: equal up to rounding
    assert Fraction(glob.value) ** 2 >= cmax, (glob.value, cmax)
    assert glob.value <= math.sqrt(cmax) * (1 + TIGHT)
    # the closed form of method.md for no dilation is an upper bound, equal on big inputs
    kk, ss = nn.modules.utils._pair(k), nn.modules.utils._pair(s if s is not None else k)
    if nn.modules.utils._pair(dil) == (1, 1):
        closed = math.ceil(kk[0] / ss[0]) * math.ceil(kk[1] / ss[1])
        assert cmax <= closed
        if min(hw) >= 12:
            assert cmax == closed
    # the pair attaining it: raise the most shared element above everything else
    g = _gen(sum(hw))
    i, j = divmod(int(torch.argmax(counts)), hw[1])
    x0 = torch.randint(-10, 10, (1, *shape), generator=g).to(DT)
    x0[0, 0, i, j] = 20.0
    dx = torch.zeros(1, *shape, dtype=DT)
    dx[0, 0, i, j] = 1.0
    with torch.no_grad():
        diff = pool(x0 + dx) - pool(x0)
    assert float((diff * diff).sum()) == cmax  # ratio^2 = cmax exactly: the constant is attained
    _exact_ratio_ok(glob.value, pool, x0, dx)
    loc = an.local_bound(x0, 1.0)
    _exact_ratio_ok(loc.value, pool, x0, dx)
    # random dense / sparse / single-element integer pairs, with many ties in x0
    for lo_hi in ((-5, 6), (0, 1), (-100, 101)):
        x0 = torch.randint(*lo_hi, (1, *shape), generator=g).to(DT)
        _exact_ratio_ok(glob.value, pool, x0, _int_perturbations(g, shape, 150))


@pytest.mark.parametrize("cfg", MAXPOOL_CONFIGS[:8], ids=str)
def test_rule6_masked_max_pooling(cfg):
    """Locally only the movable inputs count (the refinement in ops/pooling.py), and an output
    can move only if its window holds a movable input."""
    k, s, p, dil, ceil, hw = cfg
    pool = nn.MaxPool2d(k, s, p, dil, ceil_mode=ceil)
    shape = (2, *hw)
    (blk,) = Analyzer(nn.Sequential(pool).eval(), shape).blocks
    op = blk.op
    counts = _window_counts(pool, hw)
    g = _gen(7)
    for _ in range(5):
        mask = (torch.rand(shape, generator=g) < 0.3).to(DT)
        spatial = mask.amax(dim=0) > 0
        cm = int(counts[spatial].max()) if bool(spatial.any()) else 0
        val = op.local_constant(mask)
        assert Fraction(val) ** 2 >= cm
        assert val <= math.sqrt(cm) * (1 + TIGHT)
        mask_out = op.propagate_mask(mask)
        x0 = torch.randint(-5, 6, (1, *shape), generator=g).to(DT)
        _exact_ratio_ok(val, pool, x0, _int_perturbations(g, shape, 60, mask), mask_out)


# =========================================================================== batch norm
def _fold_bn_after(conv: nn.Module, bn: nn.Module) -> nn.Module:
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    folded = type(conv)(*_ctor_args(conv), bias=True).to(DT)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * s.view(shape))
        b = conv.bias if conv.bias is not None else torch.zeros_like(s)
        folded.bias.copy_((b - bn.running_mean) * s + bn.bias)
    return folded


def _ctor_args(m: nn.Module) -> tuple:
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
            m.groups)


def _fold_bn_before(bn: nn.Module, conv: nn.Conv2d) -> nn.Conv2d:
    """BN -> Conv without padding = one conv: W' = W diag(s), b' = b + sum W t."""
    assert conv.padding == (0, 0)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    t = (bn.bias - bn.running_mean * s).detach()
    folded = type(conv)(*_ctor_args(conv), bias=True).to(DT)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * s.view(1, -1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=DT)
        folded.bias.copy_(b + (conv.weight * t.view(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
    return folded


def _bn_cases(seed: int):
    g = _gen(seed)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).to(DT)
    conv0 = nn.Conv2d(3, 4, 3, stride=1, padding=0, dilation=2).to(DT)
    lin = nn.Linear(10, 6).to(DT)
    for m in (conv, conv0, lin):
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=DT))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=DT))
    bn_after = random_batchnorm(4, g)
    bn_before = random_batchnorm(3, g)
    bn1d = random_batchnorm(6, g, dims=1)
    head = nn.Linear(4 * 3 * 3, 2).to(DT)
    head0 = nn.Linear(4 * 3 * 3, 2).to(DT)
    head1 = nn.Linear(6, 2).to(DT)
    return [
        ("conv-bn", (3, 6, 6),
         nn.Sequential(conv, bn_after, nn.ReLU(), nn.Flatten(), head),
         nn.Sequential(_fold_bn_after(conv, bn_after), nn.ReLU(), nn.Flatten(), head)),
        ("bn-conv", (3, 7, 7),
         nn.Sequential(bn_before, conv0, nn.ReLU(), nn.Flatten(), head0),
         nn.Sequential(_fold_bn_before(bn_before, conv0), nn.ReLU(), nn.Flatten(), head0)),
        ("linear-bn1d", (10,),
         nn.Sequential(lin, bn1d, nn.ReLU(), head1),
         nn.Sequential(_fold_bn_after(lin, bn1d), nn.ReLU(), head1)),
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batchnorm_folding(seed):
    for name, shape, with_bn, folded in _bn_cases(seed):
        with_bn, folded = with_bn.eval(), folded.eval()
        g = _gen(seed + 100)
        x = torch.randn(5, *shape, generator=g, dtype=DT)
        with torch.no_grad():
            ref = with_bn(x)
            torch.testing.assert_close(folded(x), ref, rtol=1e-12, atol=1e-12)
        an = Analyzer(with_bn, shape, spectral="exact")
        an_f = Analyzer(folded, shape, spectral="exact")
        # the op chain reproduces the model
        torch.testing.assert_close(chain_forward(an.ops, x), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(an.forward(x), ref, rtol=1e-12, atol=1e-12)
        # the BN is folded into the conv's block: same bounds as the folded conv
        assert len(an.blocks) == len(an_f.blocks), name
        assert an.global_bound().value == pytest.approx(an_f.global_bound().value, rel=1e-9)
        x0 = x[:1]
        for eps in (1e-3, 0.1, 3.0):
            assert an.local_bound(x0, eps).value == pytest.approx(
                an_f.local_bound(x0, eps).value, rel=1e-9), (name, eps)
        # the first layer's global factor is the norm of the folded layer
        first = folded[0]
        norm = spectral_norm(matrix_of(linear_part(nn.Sequential(first)), shape))
        f = an.global_bound().layers[0].global_factor
        assert norm <= f <= norm * (1 + TIGHT), name


# =========================================================================== row norms
def _rownorm_cases():
    g = _gen(5)

    def rnd(m):
        with torch.no_grad():
            for p_ in m.parameters():
                p_.copy_(torch.randn(p_.shape, generator=g, dtype=DT))
        return m.to(DT)
    cases = [("linear", (9,), nn.Sequential(rnd(nn.Linear(9, 7))))]
    for k, s, p, d, grp in [(3, 1, 0, 1, 1), (3, 2, 1, 1, 1), (3, 1, 2, 2, 1), (2, 2, 0, 1, 2),
                            (3, 1, 1, 1, 4), ((1, 3), (2, 1), (0, 1), (1, 2), 2),
                            (3, 3, 1, 1, 1), (1, 1, 0, 1, 1)]:
        conv = rnd(nn.Conv2d(4, 8, k, s, p, d, grp))
        cases.append((f"conv k{k} s{s} p{p} d{d} g{grp}", (4, 7, 8), nn.Sequential(conv)))
    for k, s, p, cip, div in [(2, 2, 0, True, None), (3, 2, 1, True, None),
                              (3, 2, 1, False, None), (3, 1, 1, False, None),
                              (2, 1, 1, False, None), (3, 2, 1, True, 4)]:
        cases.append((f"avgpool k{k} s{s} p{p} cip{cip} div{div}", (2, 7, 8),
                      nn.Sequential(nn.AvgPool2d(k, s, p, count_include_pad=cip,
                                                 divisor_override=div))))
    for out in [(4, 4), (3, 3), (8, 8), (1, 1), (5, 2), (2, 8)]:
        cases.append((f"adaptive {out}", (2, 8, 8), nn.Sequential(nn.AdaptiveAvgPool2d(out))))
    cases.append(("adaptive 7x5->3x4", (2, 7, 5), nn.Sequential(nn.AdaptiveAvgPool2d((3, 4)))))
    cases.append(("normalize-conv-bn", (3, 6, 6), nn.Sequential(
        random_normalize(3, g, 2), rnd(nn.Conv2d(3, 4, 3, 1, 1)), random_batchnorm(4, g))))
    cases.append(("bn-conv", (3, 6, 6), nn.Sequential(
        random_batchnorm(3, g), rnd(nn.Conv2d(3, 2, 3, 2, 1)))))
    cases.append(("normalize-linear-bn1d", (6,), nn.Sequential(
        random_normalize(6, g, 0), rnd(nn.Linear(6, 5)), random_batchnorm(5, g, 1))))
    cases.append(("normalize-avgpool", (3, 6, 6), nn.Sequential(
        random_normalize(3, g, 2), nn.AvgPool2d(2, 2, 1, count_include_pad=False))))
    cases.append(("conv-avgpool (composed)", (2, 6, 6), nn.Sequential(
        rnd(nn.Conv2d(2, 3, 3, 1, 1)), nn.AvgPool2d(2))))
    cases.append(("linear-bn1d-linear (merged)", (5,), nn.Sequential(
        rnd(nn.Linear(5, 6)), random_batchnorm(6, g, 1), nn.Dropout(0.5),
        rnd(nn.Linear(6, 4)))))
    return cases


@pytest.mark.parametrize("case", _rownorm_cases(), ids=lambda c: c[0])
def test_one_pass_row_norms_match_the_matrix(case):
    name, shape, model = case
    model = model.to(DT).eval()
    an = Analyzer(model, shape, spectral="exact")
    assert len(an.blocks) == 1, [b.name for b in an.blocks]
    b = an.blocks[0]
    assert isinstance(b, AffineBlock) and not b.relu
    a = matrix_of(linear_part(model), shape)
    n = a.shape[1]
    # the block's linear map and its transpose are the model's
    torch.testing.assert_close(matrix_of(b.lin, (n,)), a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(matrix_of(b.lin_t, (a.shape[0],)), a.T, rtol=1e-12,
                               atol=1e-14)
    g = _gen(11)
    masks = [torch.ones(n, dtype=DT), torch.zeros(n, dtype=DT)]
    masks += [(torch.rand(n, generator=g) < q).to(DT) for q in (0.1, 0.5, 0.9)]
    for d in masks:
        got = b.sq_rows(d[None])[0]
        ref = (a * a) @ d
        tol = 1e-12 * float(((a * a).sum(dim=1)).max())
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=tol)
    # and the block's affine map is the model
    x = torch.randn(3, *shape, generator=g, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(b.forward(x).reshape(3, -1), model(x).reshape(3, -1),
                                   rtol=1e-12, atol=1e-12)
    # the global factor of a single affine block is its spectral norm
    norm = spectral_norm(a)
    glob = an.global_bound()
    assert norm <= glob.value <= norm * (1 + TIGHT), name


# =========================================================================== closed forms
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (7, 1), (5, 8), (12, 3), (40, 30)])
def test_single_linear_layer_bound_is_its_norm(shape):
    m, n = shape
    g = _gen(m * 100 + n)
    lin = nn.Linear(n, m).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g, dtype=DT))
    model = nn.Sequential(lin).eval()
    norm = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    x0 = torch.randn(1, n, generator=g, dtype=DT)
    for mode in ("exact", "auto", "lanczos"):
        an = Analyzer(model, (n,), spectral=mode, lanczos_steps=8)
        results = [an.local_bound(x0, 0.01), an.global_bound(), an.local_bound(x0, 5.0)]
        for res in results:
            assert res.value >= norm, (mode, res)
            if mode != "lanczos":
                assert res.value <= norm * (1 + TIGHT), (mode, res)
                assert res.guarantee == Guarantee.CERTIFIED


CONV_CONFIGS = [(3, 1, 0, 1, 1), (3, 2, 1, 1, 1), (3, 1, 2, 2, 1), (2, 2, 0, 1, 2),
                (3, 1, 1, 1, 2), (5, 3, 2, 1, 1), ((1, 3), (2, 1), (0, 1), (1, 2), 1)]


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=str)
def test_single_conv_layer_global_bound(cfg):
    k, s, p, d, grp = cfg
    g = _gen(17)
    conv = nn.Conv2d(2, 4, k, s, p, d, grp).to(DT)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=DT))
    shape = (2, 7, 6)
    model = nn.Sequential(conv).eval()
    norm = spectral_norm(matrix_of(linear_part(model), shape))
    for mode in ("exact", "auto", "lanczos"):
        res = Analyzer(model, shape, spectral=mode, lanczos_steps=12).global_bound()
        assert res.value >= norm, (mode, res.layers)
        if mode == "exact":
            assert res.value <= norm * (1 + TIGHT), res.layers


def test_products_and_merged_linear_runs():
    g = _gen(23)

    def lin(n, m):
        layer = nn.Linear(n, m).to(DT)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(m, n, generator=g, dtype=DT))
        return layer
    l1, l2, l3 = lin(6, 9), lin(9, 4), lin(4, 3)
    w1, w2, w3 = (m.weight.detach() for m in (l1, l2, l3))
    # rule 8: ReLU between layers -> product of the norms
    model = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3).eval()
    prod = spectral_norm(w1) * spectral_norm(w2) * spectral_norm(w3)
    res = Analyzer(model, (6,), spectral="exact").global_bound()
    assert prod <= res.value <= prod * (1 + TIGHT)
    # no ReLU between: one matrix W3 W2 diag(s) W1 (BN and dropout in between)
    bn = random_batchnorm(9, g, dims=1)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    model = nn.Sequential(l1, bn, nn.Dropout(0.3), l2, l3).eval()
    an = Analyzer(model, (6,), spectral="exact")
    assert len(an.blocks) == 1
    exact = spectral_norm(w3 @ w2 @ (s[:, None] * w1))
    res = an.global_bound()
    assert exact <= res.value <= exact * (1 + TIGHT)
    x0 = torch.randn(1, 6, generator=g, dtype=DT)
    loc = an.local_bound(x0, 0.3)
    assert exact <= loc.value <= exact * (1 + TIGHT)
    # conv followed by average pooling without ReLU: the composed map's norm
    conv = nn.Conv2d(2, 3, 3, 1, 1).to(DT)
    model = nn.Sequential(conv, nn.AvgPool2d(2), nn.Flatten(), lin(3 * 3 * 3, 2)).eval()
    mat = matrix_of(linear_part(model), (2, 6, 6))
    res = Analyzer(model, (2, 6, 6), spectral="exact").global_bound()
    assert res.value >= spectral_norm(mat)


def test_output_map_closed_form():
    g = _gen(29)
    lin = nn.Linear(8, 5).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 8, generator=g, dtype=DT))
    model = nn.Sequential(lin).eval()
    an = Analyzer(model, (8,), spectral="exact")
    x0 = torch.randn(1, 8, generator=g, dtype=DT)
    w = lin.weight.detach()
    for c in [torch.eye(5, dtype=DT)[:2], torch.randn(3, 5, generator=g, dtype=DT),
              torch.tensor([[1.0, -1.0, 0.0, 0.0, 0.0]], dtype=DT),
              torch.tensor([0.0, 0.0, 1.0, 0.0, -1.0], dtype=DT)]:
        exact = spectral_norm(c.reshape(-1, 5) @ w)
        for res in (an.local_bound(x0, 0.5, output_map=c), an.global_bound(output_map=c)):
            assert exact <= res.value <= exact * (1 + TIGHT)


def test_diagonal_layers_closed_forms():
    g = _gen(31)
    bn = random_batchnorm(3, g)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    expected = float(s.abs().max())
    res = Analyzer(nn.Sequential(bn).eval(), (3, 4, 4)).global_bound()
    assert expected <= res.value <= expected * (1 + TIGHT)
    norm = random_normalize(3, g, 2)
    res = Analyzer(nn.Sequential(norm).to(DT).eval(), (3, 4, 4)).global_bound()
    assert norm.lipschitz <= res.value <= norm.lipschitz * (1 + TIGHT)
    for mod in (nn.Dropout(0.5), nn.Identity(), nn.Flatten()):
        res = Analyzer(nn.Sequential(mod).eval(), (3, 4, 4)).global_bound()
        assert 1.0 <= res.value <= 1.0 + TIGHT
