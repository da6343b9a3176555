"""Session 23 review of the convolution and pooling internals every bound rests on: the
Winograd products and their error bound ``Δ`` (against an explicit absolute operator and a
long-double reference), how ``Δ`` enters a Lanczos run's value, the polyphase circulant bound
and the exact route against the SVD of the convolution's matrix, and the pooling rules
against torch's own Jacobians and brute-force window counts."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import n_examples
from lipbound import Analyzer, spectral
from lipbound.ops import winograd
from lipbound.ops.conv import ConvOp, circulant_norm_bound
from lipbound.ops.pooling import adaptive_avgpool2d_rule, avgpool2d_rule, maxpool2d_rule
from lipbound.ops.winograd import WinogradConv
from lipbound.results import Guarantee
from lipbound.spectral import spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


# ------------------------------------------------------------------------------ Winograd
def test_winograd_inputs_of_two_sizes_sharing_a_padded_buffer():
    """Inputs of 10 and 9 rows need the same padded buffer (3 tiles of 4 rows plus 2): the
    buffer was keyed by its own size, so the 9-row input read the 10-row input's last row
    where its zero padding belongs (an error of ~7 on entries of size ~3)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=DT)
    wg = WinogradConv(w, (1, 1))
    x10 = torch.randn(1, 2, 10, 10, generator=g, dtype=DT)
    x9 = torch.randn(1, 2, 9, 9, generator=g, dtype=DT)
    delta = wg.error_bound()
    for x in (x9, x10, x9, x10):
        err = float((wg.conv(x) - F.conv2d(x, w, padding=1)).norm())
        assert err <= delta * float(x.norm())
    # likewise for the transpose (its padding r - 1 - p = 1 as well) and for 5x5
    w5 = torch.randn(2, 3, 5, 5, generator=g, dtype=DT)
    wg5 = WinogradConv(w5, (2, 2))
    for n in (8, 7, 8, 7):
        y = torch.randn(1, 2, n, n, generator=g, dtype=DT)
        err = float((wg5.conv_t(y) - F.conv_transpose2d(y, w5, padding=2)).norm())
        assert err <= wg5.error_bound() * float(y.norm())


def _abs_winograd(wg: WinogradConv, w: torch.Tensor) -> WinogradConv:
    """The same tiling with every matrix replaced by its absolute value: its ``conv`` /
    ``conv_t`` apply the non-negative map ``N`` of the error analysis (per tile
    ``Σ_c |A^T| ((|G| |w_kc| |G|^T) ⊙ (|B^T| |d_c| |B|)) |A|``) to a non-negative input."""
    a = WinogradConv.__new__(WinogradConv)
    a.__dict__.update(wg.__dict__)
    a._local = threading.local()
    g = wg._g.abs()
    a._kb, a._ka = wg._kb.abs(), wg._ka.abs()
    a._u = WinogradConv._transform(g, w.abs())
    a._ut = WinogradConv._transform(g, w.flip(2, 3).transpose(0, 1).abs())
    return a


def _longdouble_conv(x: torch.Tensor, w: torch.Tensor, p: tuple[int, int]) -> np.ndarray:
    """The correlation in numpy's long double (64-bit significand here): an independent
    reference whose own error is ~2^11 times below float64's."""
    xn = np.pad(x.numpy().astype(np.longdouble), ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    wn = w.numpy().astype(np.longdouble)
    r = wn.shape[-1]
    ho, wo = xn.shape[2] - r + 1, xn.shape[3] - r + 1
    out = np.zeros((xn.shape[0], wn.shape[0], ho, wo), dtype=np.longdouble)
    for a in range(r):
        for b in range(r):
            out += np.einsum("kc,bchw->bkhw", wn[:, :, a, b], xn[:, :, a:a + ho, b:b + wo])
    return out


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 60, reason="no extended long double")
@settings(max_examples=n_examples(25), deadline=None)
@given(r=st.sampled_from([3, 5]), k=st.integers(1, 4), c=st.integers(1, 4),
       h=st.integers(0, 8), w=st.integers(0, 8), data=st.data(), seed=st.integers(0, 10 ** 6))
def test_winograd_error_bound_is_the_norm_of_its_absolute_operator(r, k, c, h, w, data, seed):
    """The derivation of ``Δ`` step by step, on kernels and inputs spanning 12 decades:
    (1) the computed products are within ``γ_L N |x|`` of the exact correlation entry by
    entry (long-double reference), ``L = 2 c + 200``; (2) ``γ_L ||N||_2 <= Δ`` for the explicit
    matrix of ``N`` (and of its transposed counterpart), so ``||ŷ - y|| <= Δ ||x||``.
    Observed: (1) at most 2 % of the componentwise bound, (2) ``γ_L ||N||_2 / Δ <= 0.4``."""
    h, w = h + r, w + r
    p = (data.draw(st.integers(0, r - 1)), data.draw(st.integers(0, r - 1)))
    g = torch.Generator().manual_seed(seed)
    wt = torch.randn(k, c, r, r, generator=g, dtype=DT) \
        * 10.0 ** torch.randint(-6, 6, (k, c, r, r), generator=g).to(DT)
    wg = WinogradConv(wt, p)
    delta = wg.error_bound()
    nu = (2 * c + 200) * 2.0 ** -53
    gam = nu / (1 - nu)
    ab = _abs_winograd(wg, wt)
    n_in = c * h * w
    ho, wo = h + 2 * p[0] - r + 1, w + 2 * p[1] - r + 1
    nmat = ab.conv(torch.eye(n_in, dtype=DT).reshape(n_in, c, h, w)).reshape(n_in, -1)
    ntmat = ab.conv_t(torch.eye(k * ho * wo, dtype=DT).reshape(-1, k, ho, wo)).reshape(
        k * ho * wo, -1)
    for m in (nmat, ntmat):
        assert gam * float(torch.linalg.matrix_norm(m, 2)) * (1 + 1e-12) <= delta
    x = torch.randn(2, c, h, w, generator=g, dtype=DT) \
        * 10.0 ** torch.randint(-5, 5, (2, c, h, w), generator=g).to(DT)
    err = np.abs(wg.conv(x).numpy().astype(np.longdouble) - _longdouble_conv(x, wt, p))
    comp = gam * ab.conv(x.abs()).numpy().astype(np.longdouble)
    assert bool((err <= comp).all())
    for b in range(2):
        assert float(np.sqrt((err[b] ** 2).sum())) <= delta * float(x[b].norm())


# ------------------------------------------------------------- Δ inside a Lanczos run
def test_kept_fast_run_covers_products_with_errors_of_the_stated_size(monkeypatch):
    """``spectral_upper`` keeps a run with fast products whose error is at most
    ``fast_error ||x||`` (per product, mv and rmv) below ``FAST_REL_ERROR`` times its estimate,
    and inflates its value for them. Products that err by that much in the direction of the top
    eigenvector, with the sign of the input's component on it (a pattern the error bound
    allows), lower the Ritz value by ~8.8 η relative: the former factor 1 + 4 η reported less
    than the same run with exact products (the a posteriori bound is switched off so that both
    report the Kuczynski-Wozniakowski value of the same Krylov dimension). Fast products are
    off by default since session 24 (``FAST_REL_ERROR = 0``): this checks the opt-in path."""
    monkeypatch.setattr(spectral, "FAST_REL_ERROR", 1e-8)
    monkeypatch.setattr(spectral, "overlap_floor", lambda n, fp: None)
    n = 2000
    s = (torch.linspace(0.0, 1.0, n, dtype=DT) ** 0.5).sqrt()  # ||M|| = 1, a slow top
    top = torch.zeros(n, dtype=DT)
    top[-1] = 1.0
    eps = 0.99 * spectral.FAST_REL_ERROR * 0.999

    def erring(v: torch.Tensor, sign_of: torch.Tensor) -> torch.Tensor:
        out = v * s
        if winograd.is_enabled():
            sg = torch.sign(sign_of @ top)
            out = out - eps * v.norm(dim=1, keepdim=True) * sg[:, None] * top[None, :]
        return out

    def mv(v: torch.Tensor) -> torch.Tensor:
        return erring(v, v)

    def rmv(y: torch.Tensor) -> torch.Tensor:
        return erring(y, y * s)

    kw = dict(n_in=n, n_out=n, cols=torch.arange(n), rows=torch.arange(n), device="cpu",
              apply_flops=float(n), mode="lanczos", steps=64, failure_prob=1e-6)
    for seed in range(3):
        plain = spectral_upper(mv, rmv, generator=torch.Generator().manual_seed(seed), **kw)
        fast = spectral_upper(mv, rmv, generator=torch.Generator().manual_seed(seed),
                              fast_error=eps, **kw)
        assert plain.method == "lanczos" and fast.method == "lanczos-winograd"
        assert fast.estimate < plain.estimate  # the fast run was kept, and its products erred
        assert fast.value >= plain.value >= 1.0


# ------------------------------------------------------ circulant bound and exact route
def _rayleigh_lower(mat: np.ndarray) -> float:
    """``||M v|| / ||v||`` in long double for the SVD's top right singular vector ``v``: a
    lower bound of ``||M||_2`` (up to the long double's own ~1e-19 rounding)."""
    _, _, vt = np.linalg.svd(mat)
    v = vt[0].astype(np.longdouble)
    mv = mat.astype(np.longdouble) @ v
    return float(np.sqrt((mv * mv).sum() / (v * v).sum()))


@settings(max_examples=n_examples(60), deadline=None)
@given(groups=st.integers(1, 2), c_in_g=st.integers(1, 3), c_out_g=st.integers(1, 3),
       kh=st.integers(1, 4), kw=st.integers(1, 4), s1=st.integers(1, 3), s2=st.integers(1, 3),
       p1=st.integers(0, 3), p2=st.integers(0, 3), d1=st.integers(1, 3), d2=st.integers(1, 3),
       h=st.integers(1, 9), w=st.integers(1, 9), scaled=st.booleans(), spread=st.booleans(),
       seed=st.integers(0, 10 ** 6))
def test_circulant_and_exact_route_against_the_svd(groups, c_in_g, c_out_g, kh, kw, s1, s2,
                                                    p1, p2, d1, d2, h, w, scaled, spread,
                                                    seed):
    """Every padding / stride / dilation / group combination torch accepts (weights over 10
    decades, per-position output scales of both signs): the certified circulant bound and
    the exact route are >= a long-double Rayleigh quotient of the matrix built by applying
    ``conv2d`` to basis vectors (not the op's own scattering), the exact route within 1e-8 of
    the SVD, and masked exact routes bound their submatrices. (1500 random cases checked
    once this session: circulant >= the quotient in all, tight to 1e-12 where exact.)"""
    g = torch.Generator().manual_seed(seed)
    wt = torch.randn(c_out_g * groups, c_in_g, kh, kw, generator=g, dtype=DT)
    if spread:
        wt = wt * 10.0 ** torch.randint(-5, 5, wt.shape, generator=g).to(DT)
    c_in = c_in_g * groups
    n_in = c_in * h * w
    try:
        basis = F.conv2d(torch.eye(n_in, dtype=DT).reshape(n_in, c_in, h, w), wt, None,
                         (s1, s2), (p1, p2), (d1, d2), groups)
    except RuntimeError:  # no output (kernel larger than the padded input)
        return
    sc = torch.randn(basis.shape[2:], generator=g, dtype=DT) if scaled else None
    if sc is not None:
        basis = basis * sc
    op = ConvOp("c", (c_in, h, w), tuple(basis.shape[1:]), wt, None, (s1, s2), (p1, p2),
                (d1, d2), groups, out_scale=sc)
    mat = basis.reshape(n_in, -1).T.contiguous()
    lower = _rayleigh_lower(mat.numpy())
    assert circulant_norm_bound(op) >= lower
    sb = spectral_upper(op_mv(op), op_rmv(op), n_in=op.in_dim, n_out=op.out_dim,
                        cols=torch.arange(op.in_dim), rows=torch.arange(op.out_dim),
                        device="cpu", dense=op.dense_matrix, apply_flops=op.flops(),
                        mode="exact")
    assert sb.guarantee == Guarantee.CERTIFIED and sb.value >= lower
    assert sb.value <= float(np.linalg.norm(mat.numpy(), 2)) * (1 + 1e-8)
    rows = torch.nonzero(torch.rand(op.out_dim, generator=g) < 0.5).reshape(-1)
    cols = torch.nonzero(torch.rand(op.in_dim, generator=g) < 0.5).reshape(-1)
    if rows.numel() and cols.numel():
        sub = spectral_upper(op_mv(op), op_rmv(op), n_in=op.in_dim, n_out=op.out_dim,
                             cols=cols, rows=rows, device="cpu", apply_flops=op.flops(),
                             mode="exact")
        assert sub.value >= _rayleigh_lower(mat[rows][:, cols].numpy())


def op_mv(op: ConvOp):
    return lambda v: op.lin(v.reshape(-1, *op.in_shape)).reshape(v.shape[0], -1)


def op_rmv(op: ConvOp):
    return lambda y: op.lin_t(y.reshape(-1, *op.out_shape)).reshape(y.shape[0], -1)


# ------------------------------------------------------------------------------- pooling
def _torch_window_counts(pool: nn.Module, c: int, hw: tuple[int, int]) -> torch.Tensor:
    """Per input element, the outputs that move when it alone rises above a background of
    -1 to 1 (it is then the maximum of exactly its windows): torch's own window structure,
    padding, dilation and ceil_mode included."""
    h, w = hw
    x = -torch.ones(h * w, c, h, w, dtype=DT)
    x[:, 0].view(h * w, -1)[torch.arange(h * w), torch.arange(h * w)] = 1.0
    base = pool(-torch.ones(1, c, h, w, dtype=DT))
    return (pool(x) != base)[:, 0].flatten(1).sum(1).reshape(h, w)


@settings(max_examples=n_examples(80), deadline=None)
@given(k1=st.integers(1, 4), k2=st.integers(1, 4), s1=st.integers(1, 4), s2=st.integers(1, 4),
       d1=st.integers(1, 3), d2=st.integers(1, 3), data=st.data(), ceil=st.booleans(),
       h=st.integers(1, 10), w=st.integers(1, 10), seed=st.integers(0, 10 ** 6))
def test_max_pool_constants_against_torch_window_counts(k1, k2, s1, s2, d1, d2, data, ceil,
                                                        h, w, seed):
    """Global constant = sqrt(max windows per element), and the masked constant = the same
    over the movable elements, with the counts read off torch's max_pool2d itself (stride
    below, equal to or above the kernel, padding, dilation, ceil_mode); each is attained by
    raising the most shared element, so both are exact up to their upward rounding. An
    output outside the propagated mask never moves under a masked perturbation."""
    p1, p2 = data.draw(st.integers(0, k1 // 2)), data.draw(st.integers(0, k2 // 2))
    pool = nn.MaxPool2d((k1, k2), (s1, s2), (p1, p2), (d1, d2), ceil_mode=ceil)
    c = 2
    try:
        out = pool(torch.zeros(1, c, h, w, dtype=DT))
    except RuntimeError:
        return
    if out.numel() == 0:
        return
    if bool(torch.isinf(pool(torch.ones(1, c, h, w, dtype=DT))).any()):
        with pytest.raises(NotImplementedError, match="padding"):
            maxpool2d_rule(pool, "p", (c, h, w), tuple(out.shape[1:]))
        return
    op = maxpool2d_rule(pool, "p", (c, h, w), tuple(out.shape[1:]))
    counts = _torch_window_counts(pool, c, (h, w))
    assert torch.equal(op.counts.to(torch.int64), counts)
    cmax = int(counts.max())
    assert op.global_constant() ** 2 >= cmax
    assert op.global_constant() <= math.sqrt(cmax) * (1 + 1e-11)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(c, h, w, generator=g) < 0.3).to(DT)
    movable = mask.amax(0) > 0
    cm = int(counts[movable].max()) if bool(movable.any()) else 0
    loc = op.local_constant(mask)
    assert loc ** 2 >= cm and loc <= math.sqrt(cm) * (1 + 1e-11)
    x0 = torch.randint(-4, 5, (1, c, h, w), generator=g).to(DT)
    dx = torch.randint(-3, 4, (40, c, h, w), generator=g).to(DT) * mask
    diff = pool(x0 + dx) - pool(x0)
    num = (diff * diff).flatten(1).sum(1)
    den = (dx * dx).flatten(1).sum(1)
    assert bool((num <= loc * loc * den).all())  # integers: exact sums, loc^2 >= cm exactly
    moved = (diff != 0).any(0)
    assert not bool((moved & (op.propagate_mask(mask) == 0)).any())


def _jacobian(fn, shape) -> torch.Tensor:
    n = math.prod(shape)
    return fn(torch.eye(n, dtype=DT).reshape(n, *shape)).reshape(n, -1).T


@settings(max_examples=n_examples(80), deadline=None)
@given(k1=st.integers(1, 4), k2=st.integers(1, 4), s=st.sampled_from([None, 1, 2, 3, (1, 2)]),
       data=st.data(), ceil=st.booleans(), include=st.booleans(),
       divisor=st.sampled_from([None, 1, 3, 7]), h=st.integers(1, 9), w=st.integers(1, 9))
def test_avg_pool_op_is_torch_avg_pool(k1, k2, s, data, ceil, include, divisor, h, w):
    """The average pooling op (a depthwise convolution with per-position scales) has exactly
    torch's Jacobian for every accepted setting; ceil_mode windows that hang over the border
    are refused (1592 of 2048 settings accepted and equal in this session's sweep)."""
    p1, p2 = data.draw(st.integers(0, k1 // 2)), data.draw(st.integers(0, k2 // 2))
    pool = nn.AvgPool2d((k1, k2), s, (p1, p2), ceil_mode=ceil, count_include_pad=include,
                        divisor_override=divisor)
    shape = (2, h, w)
    try:
        out = pool(torch.zeros(1, *shape, dtype=DT))
    except RuntimeError:
        return
    if out.numel() == 0:
        return
    try:
        op = avgpool2d_rule(pool, "p", shape, tuple(out.shape[1:]))
    except NotImplementedError as exc:
        assert ceil and "ceil_mode" in str(exc)
        return
    ref = _jacobian(pool, shape)
    got = _jacobian(op.lin, shape)
    assert torch.allclose(got, ref, rtol=1e-15, atol=0.0)
    assert circulant_norm_bound(op) >= _rayleigh_lower(ref.numpy())


@pytest.mark.parametrize("hw", [(5, 5), (6, 7), (7, 4), (1, 3)])
@pytest.mark.parametrize("out", [(1, 1), (2, 3), (3, 3), (4, 9), (7, 7), (6, 2), (None, 2)])
def test_adaptive_avg_pool_op_is_torch_adaptive_avg_pool(hw, out):
    pool = nn.AdaptiveAvgPool2d(out)
    shape = (2, *hw)
    op = adaptive_avgpool2d_rule(pool, "p", shape, tuple(pool(torch.zeros(1, *shape)).shape[1:]))
    fn = op.lin if hasattr(op, "lin") else op.forward
    assert torch.allclose(_jacobian(fn, shape), _jacobian(pool, shape), rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("scale", [1e-120, 1e-160, 1e-200, 1e-300])
def test_winograd_error_bound_of_small_taps_does_not_underflow(scale):
    """Δ multiplied two sums of ~|w| before its square root: for taps below ~1e-154 that
    product underflowed and Δ came out 0, which spectral_upper reads as an all-zero kernel
    (exact products, no inflation), while the products err as usual (~2e-14 |w| here). Δ now
    scales with the taps (the same relative value, 1.4e-9, at every scale) and bounds the
    observed error."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, generator=g, dtype=DT)
    rel = WinogradConv(w, (1, 1)).error_bound()
    ws = w * scale
    wg = WinogradConv(ws, (1, 1))
    delta = wg.error_bound()
    assert delta >= rel * scale * (1 - 1e-12) and delta <= rel * scale * 1.01
    x = torch.randn(2, 16, 20, 20, generator=g, dtype=DT)
    diff = (wg.conv(x) - F.conv2d(x, ws, padding=1)) / scale  # in range for the norms
    for b in range(2):
        assert float(diff[b].norm()) * scale <= delta * float(x[b].norm())


@pytest.mark.parametrize("seed", range(12))
def test_pooling_networks_bound_sampled_ratios_and_jacobians(seed):
    """End to end: a strided / padded / dilated convolution, ReLU, max pooling (random
    kernel, stride, padding, dilation, ceil_mode), average pooling without the padding in
    its divisor (or with a divisor override) and a linear head: the local bound is >= every
    sampled ratio ``||f(x) - f(x0)|| / ||x - x0||`` in the ball and the global bound >= those
    and the Jacobian's norm at sampled points (observed at most 0.25 and 0.63 of them)."""
    g = torch.Generator().manual_seed(seed)

    def ri(a: int, b: int) -> int:
        return int(torch.randint(a, b, (1,), generator=g))

    torch.manual_seed(seed)
    k = ri(1, 4)
    conv = nn.Conv2d(2, 3, ri(1, 4), stride=ri(1, 3), padding=ri(0, 3), dilation=ri(1, 3))
    mp = nn.MaxPool2d(k, ri(1, 3), ri(0, k // 2 + 1), ri(1, 3), ceil_mode=bool(ri(0, 2)))
    ap = nn.AvgPool2d(ri(1, 3), ri(1, 3), count_include_pad=False,
                      divisor_override=(None, 3)[ri(0, 2)])
    body = nn.Sequential(conv, nn.ReLU(), mp, ap).double()
    shape = (2, 9, 8)
    try:
        out = body(torch.zeros(1, *shape, dtype=DT))
    except RuntimeError:  # a pooling window larger than its input
        return
    net = nn.Sequential(body, nn.Flatten(), nn.Linear(out.numel(), 3)).double().eval()
    if not bool(torch.isfinite(net(torch.randn(1, *shape, dtype=DT))).all()):
        return
    an = Analyzer(net, shape, spectral="exact")
    x0 = torch.randn(1, *shape, generator=g, dtype=DT)
    eps = 0.5
    loc = an.local_bound(x0, eps)
    glob = an.global_bound()
    assert loc.guarantee == glob.guarantee == Guarantee.CERTIFIED
    with torch.no_grad():
        d = torch.randn(2000, *shape, generator=g, dtype=DT)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps \
            * torch.rand(2000, 1, 1, 1, generator=g, dtype=DT)
        ratio = float(((net(x0 + d) - net(x0)).norm(dim=1) / d.flatten(1).norm(dim=1)).max())
    assert ratio <= loc.value <= glob.value * (1 + 1e-9)
    for j in range(5):
        jac = torch.autograd.functional.jacobian(lambda z: net(z.unsqueeze(0))[0], x0[0] + d[j])
        assert float(torch.linalg.matrix_norm(jac.reshape(3, -1), 2)) <= glob.value
