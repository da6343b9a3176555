"""Regression tests for the findings of the session-5 adversarial review (each failed before
its fix): a block size too big for the dimension, Winograd buffers shared across threads,
caches made inside ``torch.inference_mode``, norms too small to rescale, the compact maps'
buffers, and the failure probability of a block run followed by a single-vector run."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import lipbound.spectral as spectral_mod
from core_helpers import spectral_norm
from lipbound import Analyzer
from lipbound.analyzer import _masked_maps
from lipbound.blocks import AffineBlock
from lipbound.lanczos import LanczosResult
from lipbound.ops.conv import ConvOp
from lipbound.ops.dense import DenseProducts
from lipbound.ops.winograd import WinogradConv
from lipbound.posterior import block_overlap_floor, overlap_floor
from lipbound.spectral import BLOCK_SHARE, lanczos_top, spectral_upper

DT = torch.float64


def _orth(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def test_block_too_big_runs_a_single_vector_without_the_block_floor():
    """n < 3 b: the single-vector method runs, and the block floor (far above a single
    vector's) must not feed its a posteriori bound."""
    n, b, delta = 23, 8, 1e-6
    c_block = block_overlap_floor(n, b, delta)
    for t in range(60):
        g = torch.Generator().manual_seed(t)
        s = torch.rand(n, generator=g, dtype=DT)
        s[0] = 1.0
        s[1:] *= 0.95
        m = s[:, None] * _orth(n, g).T
        res = lanczos_top(lambda v, m=m: v @ m.T, lambda y, m=m: y @ m, torch.arange(n), n, 6,
                          torch.Generator().manual_seed(10_000 + t), "cpu", block=b,
                          post_c=c_block, post_stop=1.01, stop_theta=4.0)
        # no a posteriori bound is claimed (the true norm is 1; the Ritz value is below it)
        assert res.block == 1 and math.isinf(res.post_sqrt)
        assert res.sqrt_theta <= 1.0 + 1e-12


def test_winograd_products_are_thread_safe():
    """Two threads using one layer's Winograd products at once get their own results."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, 3, 3, generator=g, dtype=DT)
    wg = WinogradConv(w, (1, 1))
    bad = [0, 0]

    def worker(tid: int) -> None:
        gg = torch.Generator().manual_seed(tid)
        for _ in range(60):
            x = torch.randn(1, 32, 28, 28, generator=gg, dtype=DT)
            y, yt = wg.conv(x), wg.conv_t(x)
            ref, ref_t = F.conv2d(x, w, None, 1, 1), F.conv_transpose2d(x, w, None, 1, 1)
            if float((y - ref).abs().max()) > 1e-9 * float(ref.abs().max()) or \
                    float((yt - ref_t).abs().max()) > 1e-9 * float(ref_t.abs().max()):
                bad[tid] += 1
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == [0, 0]


def test_caches_made_during_bounds_serve_autograd_later():
    """The flipped kernel and the transposed dense copy are made inside a bound (inference
    mode) but must be ordinary tensors: a later differentiable product works."""
    g = torch.Generator().manual_seed(1)
    conv = ConvOp("c", (32, 9, 9), (32, 7, 7), torch.randn(32, 32, 3, 3, generator=g,
                                                            dtype=DT), None, 1, 0, 1, 1)
    assert conv._use_flip
    prod = DenseProducts(torch.randn(20, 30, generator=g, dtype=DT))
    with torch.inference_mode():
        conv.lin_t(torch.randn(1, 32, 7, 7, dtype=DT))
        prod.rmv(torch.randn(4, 20, dtype=DT))
    y = torch.randn(1, 32, 7, 7, dtype=DT, requires_grad=True)
    conv.lin_t(y).square().sum().backward()
    z = torch.randn(4, 20, dtype=DT, requires_grad=True)
    prod.rmv(z).square().sum().backward()
    assert y.grad is not None and z.grad is not None


@pytest.mark.parametrize("block", [1, 8])
@pytest.mark.parametrize("expo", [-1000, -1030, -1060, -1072])
def test_norms_too_small_to_rescale_are_never_underestimated(block, expo):
    """Operators near the bottom of float64: a bound is never below the true norm (and the
    block route does not crash)."""
    g = torch.Generator().manual_seed(-expo + block)
    n = 40
    base = torch.randn(n, n, generator=g, dtype=DT)
    mat = base * math.ldexp(1.0, expo)
    true = spectral_norm(base) * math.ldexp(1.0, expo)
    res = spectral_upper(lambda v: v @ mat.T, lambda y: y @ mat, n_in=n, n_out=n,
                         cols=torch.arange(n), rows=torch.arange(n), device="cpu",
                         apply_flops=float(n * n), mode="lanczos", steps=12,
                         failure_prob=1e-6, generator=torch.Generator().manual_seed(0),
                         block=block)
    assert res.value >= true, (res, true)


def test_masked_maps_sides_do_not_share_buffers():
    """maps(False) and maps(True) of one object, on a square layer (same buffer shapes)."""
    g = torch.Generator().manual_seed(2)
    op = ConvOp("c", (4, 6, 6), (4, 6, 6), torch.randn(4, 4, 3, 3, generator=g, dtype=DT),
                None, 1, 1, 1, 1)
    blk = AffineBlock([op], relu=True)
    d = (torch.rand(blk.in_dim, generator=g, dtype=DT) < 0.5).to(DT)
    r = torch.rand(blk.out_dim, generator=g, dtype=DT) * (
        torch.rand(blk.out_dim, generator=g, dtype=DT) < 0.5)
    cols, rows = torch.nonzero(d > 0).reshape(-1), torch.nonzero(r > 0).reshape(-1)
    dense = op.dense_matrix() * r[:, None] * d[None, :]
    maps = _masked_maps(blk, r, d, rows, cols)
    mv_c, rmv_c = maps(False)
    rmv_c(mv_c(torch.randn(1, cols.numel(), generator=g, dtype=DT)))
    mv_t, rmv_t = maps(True)
    v = torch.randn(1, rows.numel(), generator=g, dtype=DT)
    gram = (dense @ dense.T)[rows][:, rows]
    assert torch.allclose(rmv_t(mv_t(v)), v @ gram.T, rtol=1e-12, atol=1e-12)


def test_block_run_and_its_single_vector_retry_share_the_failure_probability(monkeypatch):
    """A block run without a bound is followed by a single-vector run; their floors come
    from shares of δ that add up to δ (a union bound), and δ is what is reported."""
    n, delta = 200, 1e-6
    seen = []
    real = spectral_mod.run_lanczos

    def spy(*a, block=1, post_c=None, **kw):
        seen.append((block, post_c))
        res = real(*a, block=block, post_c=post_c, **kw)
        if block > 1:  # pretend the block run found no bound
            return LanczosResult(res.theta, res.vector, res.k, res.dim,
                                 sqrt_theta=res.sqrt_theta, image=res.image,
                                 matvecs=res.matvecs, block=block)
        return res
    monkeypatch.setattr(spectral_mod, "run_lanczos", spy)
    g = torch.Generator().manual_seed(3)
    mat = torch.randn(n, n, generator=g, dtype=DT)
    res = spectral_upper(lambda v: v @ mat.T, lambda y: y @ mat, n_in=n, n_out=n,
                         cols=torch.arange(n), rows=torch.arange(n), device="cpu",
                         apply_flops=float(n * n), mode="lanczos", steps=30,
                         failure_prob=delta, generator=torch.Generator().manual_seed(0),
                         block=8)
    assert [b for b, _ in seen] == [8, 1]
    # (abs=0: pytest.approx's default absolute tolerance 1e-12 passed any floor below it,
    # the whole delta given to the retry included: mutation M12 of notes/mutation_s25.py)
    assert seen[0][1] == pytest.approx(block_overlap_floor(n, 8, delta * BLOCK_SHARE),
                                       rel=1e-9, abs=0)
    # the single-vector run splits its share between KW and the a posteriori bound
    assert seen[1][1] == pytest.approx(overlap_floor(n, delta * (1 - BLOCK_SHARE) / 2),
                                       rel=1e-9, abs=0)
    assert res.failure_prob == delta and res.value >= spectral_norm(mat)


def test_two_threads_on_one_analyzer_give_the_sequential_bounds():
    """Local bounds from two threads sharing an analyzer (Winograd layers included) equal the
    bounds computed one after the other."""
    import lipbound.ops.winograd as wmod

    g = torch.Generator().manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Conv2d(24, 24, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(24, 24, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(24 * 26 * 26, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.1)
    net.eval()
    xs = [torch.randn(1, 24, 26, 26, generator=g, dtype=DT) for _ in range(2)]
    old = (wmod.MIN_MIXING, wmod.MIN_OUTPUT_PIXELS, spectral_mod.FAST_REL_ERROR)
    # (fast products are off by default since session 24: the opt-in path uses the buffers)
    wmod.MIN_MIXING, wmod.MIN_OUTPUT_PIXELS, spectral_mod.FAST_REL_ERROR = 8.0, 16, 1e-8
    try:
        an = Analyzer(net, (24, 26, 26), spectral="lanczos", lanczos_steps=16)
        assert an.blocks[0].fast_error() is not None  # Winograd in use
        seq = [an.local_bound(x, 0.05).value for x in xs]
        got: list[float] = [0.0, 0.0]

        def work(i: int) -> None:
            got[i] = an.local_bound(xs[i], 0.05).value
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        wmod.MIN_MIXING, wmod.MIN_OUTPUT_PIXELS, spectral_mod.FAST_REL_ERROR = old
    assert got == pytest.approx(seq, rel=1e-12)


def test_analyzers_with_winograd_layers_copy_and_pickle():
    """The per-thread Winograd buffers are caches: deep copies and pickles of an analyzer
    that has used them work and give the same bounds."""
    import copy
    import pickle

    import lipbound.ops.winograd as wmod

    g = torch.Generator().manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 12 * 12, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.1)
    net.eval()
    x0 = torch.randn(1, 16, 12, 12, generator=g, dtype=DT)
    old = (wmod.MIN_MIXING, wmod.MIN_OUTPUT_PIXELS, spectral_mod.FAST_REL_ERROR)
    # (fast products are off by default since session 24: the opt-in path uses the buffers)
    wmod.MIN_MIXING, wmod.MIN_OUTPUT_PIXELS, spectral_mod.FAST_REL_ERROR = 4.0, 16, 1e-8
    try:
        an = Analyzer(net, (16, 12, 12), spectral="lanczos", lanczos_steps=12)
        assert an.blocks[0].fast_error() is not None  # Winograd in use
        first = an.local_bound(x0, 0.05).value
        for twin in (copy.deepcopy(an), pickle.loads(pickle.dumps(an))):
            assert twin.local_bound(x0, 0.05).value == pytest.approx(first, rel=1e-12)
    finally:
        wmod.MIN_MIXING, wmod.MIN_OUTPUT_PIXELS, spectral_mod.FAST_REL_ERROR = old


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_float32_update_at_every_scale(monkeypatch, scale):
    """The float32 Gram-Schmidt update scales its coefficients into float32's range: large
    operators no longer overflow (it crashed with a certified alternative) and small ones no
    longer lose orthogonality; the run is the float64 run's."""
    import lipbound.lanczos as lz
    from lipbound.spectral import bound_from_run, run_parameters

    n = lz.F32_UPDATE_MIN_N
    s = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=DT) * 0.9
    s[0] = 1.0
    s = s * scale
    prm = run_parameters(n, 48, 1e-7, [(2.0 * scale, "alt")], 1)

    def run():
        return lz.run_lanczos(lambda v: v * s, lambda y: y * s, n, 48,
                              torch.Generator().manual_seed(0), "cpu",
                              stop_theta=prm.stop_theta, kw_full=prm.kw_full,
                              post_c=prm.post_c, post_stop=prm.post_stop)
    fast = run()
    monkeypatch.setattr(lz, "F32_UPDATE_MIN_N", 10 ** 12)
    ref = run()
    assert fast.k == ref.k and fast.sqrt_theta == pytest.approx(ref.sqrt_theta, rel=1e-12)
    assert fast.post_sqrt == pytest.approx(ref.post_sqrt, rel=1e-9)
    sb = bound_from_run(fast, n, 1e-7, prm.delta_kw, [(2.0 * scale, "alt")])
    assert sb.value >= scale


@pytest.mark.parametrize("block", [1, 8])
def test_overflowing_products_fall_back_to_the_alternative(block):
    """Products that overflow (entries near 1e307): no crash, the certified alternative."""
    g = torch.Generator().manual_seed(6)
    mat = torch.randn(300, 400, generator=g, dtype=DT) * 1e307
    res = spectral_upper(lambda v: v @ mat.T, lambda y: y @ mat, n_in=400, n_out=300,
                         cols=torch.arange(400), rows=torch.arange(300), device="cpu",
                         apply_flops=1.2e5, mode="lanczos", steps=16, failure_prob=1e-6,
                         generator=torch.Generator().manual_seed(0), block=block,
                         certified_alternatives=((1.7e308, "big"),))
    assert res.method == "big" and res.value == 1.7e308
