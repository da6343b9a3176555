"""Winograd F(4x4, 3x3) and F(2x2, 5x5) products (lipbound.ops.winograd) against PyTorch's
conv2d and conv_transpose2d, their adjointness, the Toom-Cook matrices against the published
ones and a direct correlation, when they are used, their rigorous error bound against
observed errors, and bounds computed through them against exact norms and against the
direct products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import n_examples, spectral_norm
from lipbound import Analyzer, spectral
from lipbound.ops import winograd
from lipbound.ops.conv import ConvOp, conv2d_rule
from lipbound.ops.winograd import Winograd3x3, WinogradConv, eligible, toom_cook
from lipbound.results import Guarantee
from lipbound.spectral import spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@settings(max_examples=n_examples(60), deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 12), k=st.integers(1, 12), h=st.integers(1, 23),
       w=st.integers(1, 23), r=st.sampled_from([3, 5]), p=st.integers(0, 4),
       seed=st.integers(0, 10 ** 6))
def test_matches_conv2d_and_its_transpose(b, c, k, h, w, r, p, seed):
    p = min(p, r - 1)
    if h + 2 * p < r or w + 2 * p < r:
        return  # no output pixel
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, c, r, r, generator=g, dtype=DT)
    x = torch.randn(b, c, h, w, generator=g, dtype=DT)
    wg = WinogradConv(weight, (p, p))
    ref = F.conv2d(x, weight, padding=p)
    y = wg.conv(x)
    assert y.shape == ref.shape and _rel(y, ref) <= 1e-12
    yt = torch.randn(ref.shape, generator=g, dtype=DT)
    ref_t = F.conv_transpose2d(yt, weight, padding=p)
    z = wg.conv_t(yt)
    assert z.shape == ref_t.shape == x.shape and _rel(z, ref_t) <= 1e-12
    # adjoint pair: <A x, y> = <x, A^T y>
    lhs, rhs = float((y * yt).sum()), float((x * z).sum())
    assert abs(lhs - rhs) <= 1e-11 * float(y.norm() * yt.norm())


def test_toom_cook_matrices():
    """F(4, 3) on 0, ±1, ±2, ∞ gives Lavin & Gray's matrices; every F(m, r) computes the 1-D
    correlation of a tile exactly (up to rounding)."""
    bt, g, at = toom_cook(4, 3)
    lavin_bt = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                             [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
                            dtype=DT)
    lavin_g = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                            [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                           dtype=DT)
    lavin_at = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                             [0, 1, -1, 8, -8, 1]], dtype=DT)
    assert torch.equal(bt, lavin_bt) and torch.equal(at, lavin_at)
    assert torch.allclose(g, lavin_g, rtol=0, atol=1e-16)
    gen = torch.Generator().manual_seed(0)
    for m, r in ((4, 3), (2, 5), (2, 3), (3, 3), (3, 4)):
        bt, g, at = toom_cook(m, r)
        for _ in range(5):
            d = torch.randn(m + r - 1, generator=gen, dtype=DT)
            f = torch.randn(r, generator=gen, dtype=DT)
            y = at @ ((g @ f) * (bt @ d))
            ref = torch.stack([(f * d[i:i + r]).sum() for i in range(m)])
            assert torch.allclose(y, ref, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError):
        toom_cook(4, 5)  # needs 7 finite points
    with pytest.raises(ValueError):
        WinogradConv(torch.zeros(2, 2, 7, 7, dtype=DT), (1, 1))


@pytest.mark.parametrize("max_tiles", [1, 3, 7, 10 ** 6])
@pytest.mark.parametrize("b", [1, 2])
def test_bands_of_tile_rows(monkeypatch, max_tiles, b):
    """Big images are transformed in bands of tile rows: same result for any band size."""
    monkeypatch.setattr(winograd, "MAX_TILES", max_tiles)
    g = torch.Generator().manual_seed(max_tiles + b)
    for r, p in ((3, 0), (3, 1), (3, 2), (5, 0), (5, 2), (5, 4)):
        weight = torch.randn(6, 5, r, r, generator=g, dtype=DT)
        x = torch.randn(b, 5, 19, 22, generator=g, dtype=DT)
        wg = WinogradConv(weight, (p, p))
        ref = F.conv2d(x, weight, padding=p)
        assert _rel(wg.conv(x), ref) <= 1e-12
        yt = torch.randn(ref.shape, generator=g, dtype=DT)
        assert _rel(wg.conv_t(yt), F.conv_transpose2d(yt, weight, padding=p)) <= 1e-12


def test_asymmetric_padding_and_large_values():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 4, 3, 3, generator=g, dtype=DT) * 1e150
    x = torch.randn(2, 4, 13, 9, generator=g, dtype=DT) * 1e-140
    wg = Winograd3x3(weight, (2, 0))
    ref = F.conv2d(x, weight, padding=(2, 0))
    assert _rel(wg.conv(x), ref) <= 1e-12
    yt = torch.randn(ref.shape, generator=g, dtype=DT)
    assert _rel(wg.conv_t(yt), F.conv_transpose2d(yt, weight, padding=(2, 0))) <= 1e-12


def test_eligibility():
    w = torch.zeros(128, 128, 3, 3, dtype=DT)
    ok = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, out_hw=(56, 56),
              device="cpu")
    assert eligible(w, **ok)
    w5 = torch.zeros(128, 128, 5, 5, dtype=DT)
    assert eligible(w5, **ok)  # F(2x2, 5x5) at 56x56
    assert eligible(w5, **{**ok, "padding": (4, 3)})
    assert not eligible(w5, **{**ok, "padding": (5, 1)})
    assert eligible(torch.zeros(192, 64, 5, 5, dtype=DT), **{**ok, "out_hw": (27, 27)})
    assert not eligible(w5, **{**ok, "out_hw": (14, 14)})  # small 5x5 outputs: conv2d
    assert not eligible(torch.zeros(128, 128, 7, 7, dtype=DT), **ok)
    assert not eligible(torch.zeros(128, 128, 3, 5, dtype=DT), **ok)
    assert not eligible(w, **{**ok, "stride": (2, 2)})
    assert not eligible(w, **{**ok, "dilation": (2, 1)})
    assert not eligible(w, **{**ok, "groups": 2})
    assert not eligible(w, **{**ok, "padding": (3, 1)})
    assert eligible(w, **{**ok, "out_hw": (14, 14)})  # small output, small kernel
    assert eligible(torch.zeros(384, 256, 3, 3, dtype=DT), **{**ok, "out_hw": (13, 13)})
    assert not eligible(torch.zeros(512, 512, 3, 3, dtype=DT), **{**ok, "out_hw": (14, 14)})
    assert not eligible(w, **{**ok, "out_hw": (12, 12)})
    assert not eligible(torch.zeros(128, 3, 3, 3, dtype=DT), **ok)
    assert not eligible(torch.zeros(32, 32, 3, 3, dtype=DT), **ok)  # mixing 16 < 24
    assert eligible(torch.zeros(64, 64, 3, 3, dtype=DT), **ok)  # 32
    assert not eligible(w, **{**ok, "device": "cuda"})


def _op(c: int, k: int, n: int, p: int, seed: int) -> ConvOp:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, k, 3, padding=p).double()
    ho = n + 2 * p - 2
    return conv2d_rule(conv, "conv", (c, n, n), (k, ho, ho))


def test_convop_uses_it_only_when_enabled_and_eligible(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_MIXING", 8.0)
    big = _op(16, 16, 26, 1, 0)
    assert big._winograd() is not None
    small = _op(16, 16, 10, 1, 0)
    assert small._winograd() is None  # 10x10 output: conv2d
    x = torch.randn(3, *big.in_shape, dtype=DT)
    y = torch.randn(3, *big.out_shape, dtype=DT)
    calls = []
    real = Winograd3x3._correlate
    monkeypatch.setattr(Winograd3x3, "_correlate",
                        lambda self, *a: calls.append(1) or real(self, *a))
    # outside winograd.enabled() (dense matrices, row norms, the exact route): conv2d, exactly
    # (the transpose as conv2d with the flipped kernel where that pays: the same sums)
    ref_x = F.conv2d(x, big.weight, None, 1, 1)
    ref_y = F.conv_transpose2d(y, big.weight, None, 1, 1)
    flip_y = F.conv2d(y, big.weight.flip(2, 3).transpose(0, 1), None, 1, 1)
    assert torch.equal(big.lin(x), ref_x)
    assert torch.equal(big.lin_t(y), flip_y if big._use_flip else ref_y)
    assert _rel(flip_y, ref_y) <= 1e-13 and not calls
    with winograd.enabled():
        fast_x, fast_y = big.lin(x), big.lin_t(y)
        assert torch.equal(small.lin(x[:, :, :10, :10]),
                           F.conv2d(x[:, :, :10, :10], small.weight, None, 1, 1))
    assert len(calls) == 2 and not winograd.is_enabled()
    assert _rel(fast_x, ref_x) <= 1e-12 and _rel(fast_y, ref_y) <= 1e-12
    monkeypatch.setattr(ConvOp, "use_winograd", False)
    big._wg = None
    assert big._winograd() is None and big.winograd_error() is None


@pytest.mark.parametrize("r", [3, 5])
@pytest.mark.parametrize("kind", ["gauss", "tiny-tap", "mixed-scales", "positive"])
def test_error_bound_covers_the_observed_error(kind, r):
    """||ŷ - y|| <= Δ ||x|| for the computed products (conv and transpose), Δ the rigorous
    componentwise bound; on kernels built to make Winograd inaccurate too."""
    g = torch.Generator().manual_seed(7)
    k, c, n = 24, 20, 19
    p = r // 2
    w = torch.randn(k, c, r, r, generator=g, dtype=DT)
    if kind == "tiny-tap":
        w[:, :, p, p] = 1e-12
    elif kind == "mixed-scales":
        w = w * 10.0 ** torch.randint(-8, 8, (k, c, r, r), generator=g).to(DT)
    elif kind == "positive":
        w = w.abs()
    wg = WinogradConv(w, (p, p))
    delta = wg.error_bound()
    assert delta > 0 and wg.error_bound() == delta  # cached
    for _ in range(3):
        x = torch.randn(2, c, n, n, generator=g, dtype=DT)
        if kind == "mixed-scales":
            x = x * 10.0 ** torch.randint(-6, 6, x.shape, generator=g).to(DT)
        y = F.conv2d(x, w, padding=p)
        for b in range(2):
            assert float((wg.conv(x)[b] - y[b]).norm()) <= delta * float(x[b].norm())
        yt = torch.randn(y.shape, generator=g, dtype=DT)
        z = F.conv_transpose2d(yt, w, padding=p)
        for b in range(2):
            assert float((wg.conv_t(yt)[b] - z[b]).norm()) <= delta * float(yt[b].norm())


def test_certified_routes_never_use_it():
    """A masked operator made of one tiny tap beside large taps: Winograd would compute it
    with a large relative error. The exact (certified) route forms the matrix with conv2d,
    so its value is >= the true norm (the tap itself)."""
    g = torch.Generator().manual_seed(0)
    c, h = 48, 26
    for _ in range(5):
        w = torch.randn(c, c, 3, 3, generator=g, dtype=DT)
        w[0, 0, 1, 1] = 1e-12 * (1 + float(torch.rand(1, generator=g, dtype=DT)))
        op = ConvOp("c", (c, h, h), (c, h - 2, h - 2), w, None, 1, 0, 1, 1)
        assert op._winograd() is not None
        i, j = (int(v) for v in torch.randint(0, h - 2, (2,), generator=g))
        col = torch.tensor([(i + 1) * h + (j + 1)])
        row = torch.tensor([i * (h - 2) + j])

        def mv(v, op=op):
            return op.lin(v.reshape(-1, c, h, h)).reshape(v.shape[0], -1)

        def rmv(y, op=op):
            return op.lin_t(y.reshape(-1, c, h - 2, h - 2)).reshape(y.shape[0], -1)

        sb = spectral_upper(mv, rmv, n_in=c * h * h, n_out=c * (h - 2) ** 2, cols=col,
                            rows=row, device="cpu", apply_flops=1e6, mode="exact")
        assert sb.guarantee == Guarantee.CERTIFIED and sb.value >= float(w[0, 0, 1, 1])


def test_lanczos_falls_back_when_the_error_is_not_negligible(monkeypatch):
    """fast_error far above FAST_REL_ERROR x the norm: the run is repeated with conv2d and
    the same start vector, so the value equals the run without fast products (opt-in: fast
    products are off by default since session 24)."""
    monkeypatch.setattr(spectral, "FAST_REL_ERROR", 1e-8)
    monkeypatch.setattr(winograd, "MIN_MIXING", 8.0)
    op = _op(16, 16, 26, 1, 3)
    mv = lambda v: op.lin(v.reshape(-1, *op.in_shape)).reshape(v.shape[0], -1)  # noqa: E731
    rmv = lambda y: op.lin_t(y.reshape(-1, *op.out_shape)).reshape(y.shape[0], -1)  # noqa: E731
    kw = dict(n_in=op.in_dim, n_out=op.out_dim, cols=torch.arange(op.in_dim),
              rows=torch.arange(op.out_dim), device="cpu", apply_flops=op.flops(),
              mode="lanczos", steps=20, failure_prob=1e-6)
    plain = spectral_upper(mv, rmv, generator=torch.Generator().manual_seed(5), **kw)
    big_err = spectral_upper(mv, rmv, generator=torch.Generator().manual_seed(5),
                             fast_error=1.0, **kw)
    assert big_err.value == plain.value and big_err.estimate == plain.estimate
    small_err = spectral_upper(mv, rmv, generator=torch.Generator().manual_seed(5),
                               fast_error=op.winograd_error(), **kw)
    assert small_err.value >= plain.value * (1 - 1e-12)
    assert small_err.value == pytest.approx(plain.value, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_bounds_through_winograd_are_sound_and_match(monkeypatch, seed):
    """A small CNN whose convolutions take the Winograd path (thresholds lowered): its
    layer factors by Lanczos equal those computed with conv2d products up to rounding, and
    its global convolution factors are >= the exact norms of the dense matrices (opt-in:
    fast products are off by default since session 24)."""
    monkeypatch.setattr(spectral, "FAST_REL_ERROR", 1e-8)
    monkeypatch.setattr(winograd, "MIN_OUTPUT_PIXELS", 1)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_MIXING", 0.0)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 12 * 12, 5)).double().eval()
    x0 = torch.randn(1, 2, 10, 10, dtype=DT)
    res = {}
    for use in (True, False):
        monkeypatch.setattr(ConvOp, "use_winograd", use)
        an = Analyzer(net, (2, 10, 10), spectral="lanczos", seed=seed)
        res[use] = (an.local_bound(x0, 0.3), an.global_bound())
        convs = [b.mixing for b in an.blocks if isinstance(getattr(b, "mixing", None), ConvOp)]
        assert len(convs) == 2
        assert all((op._winograd() is not None) == use for op in convs)
        if use:
            g = res[use][1]
            for i, b in enumerate(an.blocks):
                if isinstance(getattr(b, "mixing", None), ConvOp):
                    assert g.layers[i].global_factor >= spectral_norm(b.mixing.dense_matrix())
    for i in range(2):
        a, b = res[True][i], res[False][i]
        assert a.value == pytest.approx(b.value, rel=1e-9)
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert la.global_factor == pytest.approx(lb.global_factor, rel=1e-9, nan_ok=True)
            assert la.local == pytest.approx(lb.local, rel=1e-9, nan_ok=True)


def test_local_bound_with_a_tiny_live_tap_is_sound():
    """End to end (default spectral route): a convolution whose only live connection is a
    1e-12 tap next to large (inactive) taps. The certified local bound must stay >= the
    true local constant (the gradient: the network is linear on the ball)."""
    c, h = 48, 26
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        c1, c2 = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=0)
        lin = nn.Linear(c * 24 * 24, 1, bias=False)
        with torch.no_grad():
            c1.weight.zero_()
            c1.weight[0, 0, 1, 1] = 1.0
            c1.bias.fill_(-1.0)
            c1.bias[0] = -0.5
            w2 = torch.randn(c, c, 3, 3, generator=g, dtype=DT)
            w2[:, 0] = -10.0
            w2[:, 0, 1, 1] = 1e-12 * (1 + torch.rand(c, generator=g, dtype=DT))
            c2.weight.copy_(w2.float())
            c2.bias.zero_()
            taps = c2.weight[:, 0, 1, 1].double()
            out = torch.zeros(1, c, 24, 24, dtype=DT)
            out[0, :, 9, 9] = taps / taps.norm()
            lin.weight.copy_(out.reshape(1, -1).float())
        net = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), lin).double().eval()
        x0 = torch.zeros(1, 1, h, h, dtype=DT)
        x0[0, 0, 10, 10] = 1.0
        x = x0.clone().requires_grad_(True)
        net(x).sum().backward()
        true = float(x.grad.norm())
        res = Analyzer(net, (1, h, h)).local_bound(x0, 0.01)
        assert res.value >= true
