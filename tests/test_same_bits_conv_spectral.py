"""Session 23's fast paths give the same bits as the straightforward forms they replace.

Each test runs the fast path and a reference (the code it replaced, kept here) on small
random inputs, edge values included (signed zeros, subnormals, inf, NaN), and compares bit
patterns, not values within a tolerance. No timing is asserted (benchmarks/README.md,
"Session 23", has the measurements).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from lipbound import spectral
from lipbound.ops.base import gamma
from lipbound.ops.conv import (
    _U,
    ConvOp,
    _cholesky_upper_neg,
    _max_freq_norm,
    _Plan,
    circulant_norm_bound,
)
from lipbound.spectral import exact_norm

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


# --- _Plan.poly_weight: the kernel itself where there is one phase -------------------------

def _poly_weight_loop(plan: _Plan, weight: torch.Tensor) -> torch.Tensor:
    """The tap-by-tap form (every geometry; sessions up to 22 used it everywhere)."""
    wp = weight.new_zeros(plan.shape)
    for a in range(weight.shape[2]):
        for b in range(weight.shape[3]):
            wp[:, :, plan.p_of[a], plan.q_of[b], plan.a_idx[a], plan.b_idx[b]] = \
                weight[:, :, a, b]
    return wp.reshape(plan.c_out, plan.rows, plan.taps)


def _edge_weight(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = w.view(-1)
    edge = torch.tensor([-0.0, 0.0, 5e-324, -2.0 ** -1070, 1e300, -1e-310],
                        dtype=torch.float64)
    idx = torch.randperm(flat.numel(), generator=gen)[:min(flat.numel(), edge.numel())]
    flat[idx] = edge[:idx.numel()]
    return w


def test_poly_weight_is_the_tap_loop_bit_for_bit():
    rng = random.Random(23)
    gen = torch.Generator().manual_seed(23)
    identity = 0
    for _ in range(300):
        kh, kw = rng.randint(1, 6), rng.randint(1, 6)
        s1, s2 = rng.randint(1, 4), rng.randint(1, 4)
        d1, d2 = rng.randint(1, 3), rng.randint(1, 3)
        if rng.random() < 0.3:
            d1, d2 = s1, s2  # strided and dilated alike: one phase, taps in place
        if rng.random() < 0.3:
            s1 = s2 = 1
        groups = rng.choice([1, 2, 3])
        c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
        w = _edge_weight((c_out, c_in // groups, kh, kw), gen)
        if rng.random() < 0.3:  # a non-contiguous kernel
            w = w.transpose(2, 3).contiguous().transpose(2, 3)
        grid = (rng.randint(kh * d1, 24), rng.randint(kw * d2, 24))
        plan = _Plan(w, groups, (s1, s2), (d1, d2), grid)
        identity += plan.shape[2:] == (1, 1, kh, kw)
        got, ref = plan.poly_weight(w), _poly_weight_loop(plan, w)
        assert got.shape == ref.shape and got.is_contiguous()
        assert torch.equal(_bits(got), _bits(ref))
        # a fresh tensor: writing to it leaves the kernel alone
        assert got.data_ptr() != w.data_ptr()
    assert 60 < identity < 300  # both forms exercised


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_circulant_bound_unchanged_by_the_poly_weight_fast_path(monkeypatch, stride, dilation):
    gen = torch.Generator().manual_seed(7)
    for c_in, c_out, k, h in [(1, 6, 5, 14), (3, 4, 3, 9), (4, 4, 3, 8)]:
        w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64)
        span = dilation * (k - 1) + 1
        hw = max(h, span)
        ho = (hw + 2 - span) // stride + 1
        op = ConvOp("c", (c_in, hw, hw), (c_out, ho, ho), w, None, stride, 1, dilation, 1)
        fast = circulant_norm_bound(op)
        with monkeypatch.context() as m:
            m.setattr(_Plan, "poly_weight", _poly_weight_loop)
            ref = circulant_norm_bound(op)
        assert fast is not None and math.isfinite(fast)
        assert fast == ref


def test_max_freq_norm_same_value_both_poly_weight_forms(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    for c_in, c_out, k in [(1, 6, 5), (6, 16, 5), (3, 8, 3)]:
        w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64)
        plan = _Plan(w, 1, (1, 1), (1, 1), (12, 12))
        fast = _max_freq_norm(plan, w, 64 * 2 ** 20)
        with monkeypatch.context() as m:
            m.setattr(_Plan, "poly_weight", _poly_weight_loop)
            ref = _max_freq_norm(plan, w, 64 * 2 ** 20)
        assert fast == ref


# --- exact_norm: the scale by amax ----------------------------------------------------------

def _max_not_amax(self, *args, **kwargs):
    """``Tensor.amax`` as the full ``max()`` it replaced (for a full reduction)."""
    if args or kwargs:
        return _AMAX(self, *args, **kwargs)
    return self.max()


_AMAX = torch.Tensor.amax


def _edge_matrix(k: int, n: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    m = torch.randn(k, n, generator=gen, dtype=torch.float64) * scale
    flat = m.view(-1)
    for v in (-0.0, 0.0, 5e-324, -5e-324):
        flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = v
    return m


@pytest.mark.parametrize("route", ["cpu-views", "device"])
def test_exact_norm_same_bits_with_max_and_amax(monkeypatch, route):
    if route == "device":
        monkeypatch.setattr(spectral, "_NUMPY_DEVICES", ())
    gen = torch.Generator().manual_seed(5)
    shapes = [(1, 1), (1, 7), (7, 1), (3, 5), (17, 10), (25, 101), (101, 25), (64, 64),
              (120, 33)]
    for k, n in shapes:
        for scale in (1.0, 2.0 ** -1060, 2.0 ** 1000, 3e-5):
            m = _edge_matrix(k, n, gen, scale)
            for mat in (m, m.T, m.T.contiguous().T, -m):
                fast = exact_norm(mat)
                with monkeypatch.context() as p:
                    p.setattr(torch.Tensor, "amax", _max_not_amax)
                    ref = exact_norm(mat)
                assert fast == ref or (math.isnan(fast) and math.isnan(ref))
                assert math.copysign(1.0, fast) == math.copysign(1.0, ref)


def test_exact_norm_special_entries_unchanged(monkeypatch):
    cases = [torch.zeros(3, 4), -torch.zeros(4, 3), torch.tensor([[1.0, math.inf]]),
             torch.tensor([[math.nan, 1.0], [2.0, 3.0]]), torch.tensor([[-math.inf, 0.0]]),
             torch.full((2, 5), 5e-324), torch.full((5, 2), -5e-324)]
    for c in cases:
        c = c.to(torch.float64)
        fast = exact_norm(c)
        with monkeypatch.context() as p:
            p.setattr(torch.Tensor, "amax", _max_not_amax)
            ref = exact_norm(c)
        assert (fast == ref and math.copysign(1.0, fast) == math.copysign(1.0, ref)) \
            or (math.isnan(fast) and math.isnan(ref))


def test_scale_of_exact_norm_is_the_largest_magnitude():
    """amax of |M| on the transposed view is max_ij |M_ij| exactly (numpy as the referee)."""
    gen = torch.Generator().manual_seed(9)
    for k, n in [(2, 1), (9, 4), (293, 164), (40, 3)]:
        m = _edge_matrix(k, n, gen, 1.0)
        t = m.T  # the layout exact_norm scales when rows < columns
        assert float(t.abs().amax()) == float(np.max(np.abs(m.numpy())))
        assert math.copysign(1.0, float(t.abs().amax())) == 1.0


# --- ops.conv._cholesky_upper_neg: the completion test on a copied diagonal -----------------

def _old_cholesky_upper_neg(neg: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Session 22's form: elementwise tests on the factor's strided complex diagonal."""
    n = neg.shape[-1]
    g_c = gamma(4 * (n + 1))
    if not n * g_c < 0.5 or neg.shape[0] == 0:
        return torch.full(neg.shape[:1], math.inf, dtype=torch.float64, device=neg.device)
    b_diag = neg.diagonal(dim1=-2, dim2=-1)
    saved = b_diag.clone()
    g_max = saved.real.abs().amax(-1)
    try:
        b_diag.add_(level[:, None])
        trace = b_diag.real.sum(-1)
        fac, info = torch.linalg.cholesky_ex(neg, upper=True)
    finally:
        b_diag.copy_(saved)
    r_diag = fac.diagonal(dim1=-2, dim2=-1)
    ok = (info == 0) & (r_diag.real > 0).all(-1) & torch.isfinite(r_diag).all(-1)
    up = (level + g_c * trace / ((1.0 - gamma(n)) * (1.0 - n * g_c))
          + _U * (level + g_max) + n * n * 2.0 ** -1000 * (1.0 + level + g_max))
    up = up * (1.0 + 32.0 * _U)
    ok &= torch.isfinite(up) & torch.isfinite(level) & (level > 0)
    return torch.where(ok, up, math.inf)


def _hermitian_batch(batch: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(batch, n, 2 * n, generator=gen, dtype=torch.complex128)
    if n > 1:
        k[::3, :, 1:] *= 1e-9  # nearly rank one: levels close to the top eigenvalue
    g = k @ k.mH
    lam = torch.linalg.eigvalsh(g)[:, -1]
    return g, lam


@pytest.mark.parametrize("n", [1, 2, 3, 6, 15, 32])
def test_cholesky_certificate_same_bits_as_elementwise_tests(n):
    gen = torch.Generator().manual_seed(100 + n)
    g, lam = _hermitian_batch(60, n, gen)
    rel = torch.tensor([-1e-3, -1e-12, 0.0, 1e-15, 1e-12, 1e-9, 1e-3, 1.0], dtype=torch.float64)
    for r in rel:
        level = lam * (1.0 + r)
        level[::8] = torch.tensor([0.0, -1.0, math.inf, math.nan, 1e-300, 1e300, 5e-324,
                                   2.0])
        neg_a, neg_b = (-g).clone(), (-g).clone()
        got = _cholesky_upper_neg(neg_a, level)
        ref = _old_cholesky_upper_neg(neg_b, level)
        assert torch.equal(_bits(got), _bits(ref))
        assert torch.equal(_bits(torch.view_as_real(neg_a)), _bits(torch.view_as_real(-g)))
    # both outcomes occur (the certificate is not vacuous here)
    assert bool(torch.isfinite(got).any()) and bool((got == math.inf).any())


def test_completion_test_on_crafted_factors(monkeypatch):
    """Factors whose diagonals hold every special value, in the real and the imaginary part,
    with info 0 or not: the copied-diagonal test and the elementwise one agree."""
    specials = [1.0, 2.5, -1.0, 0.0, -0.0, 5e-324, -5e-324, math.inf, -math.inf, math.nan,
                1e308]
    gen = torch.Generator().manual_seed(3)
    batch, n = 400, 4
    fac = torch.randn(batch, n, n, generator=gen, dtype=torch.complex128)
    re = torch.tensor(specials, dtype=torch.float64)
    pick = torch.randint(len(specials), (batch, n, 2), generator=gen)
    vals = re[pick]
    easy = torch.rand(batch, n, generator=gen) < 0.7  # mostly ordinary positive entries
    vals[..., 0] = torch.where(easy, vals[..., 0].abs().clamp(1.0, 2.0), vals[..., 0])
    vals[..., 1] = torch.where(easy, 0.0, vals[..., 1])
    fac.diagonal(dim1=-2, dim2=-1).copy_(torch.view_as_complex(vals.contiguous()))
    info = torch.where(torch.rand(batch, generator=gen) < 0.1, 2, 0).to(torch.int32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda a, upper=False: (fac.clone(), info.clone()))
    neg = -torch.eye(n, dtype=torch.complex128).expand(batch, n, n).clone()
    level = torch.full((batch,), 3.0, dtype=torch.float64)
    got = _cholesky_upper_neg(neg.clone(), level)
    ref = _old_cholesky_upper_neg(neg.clone(), level)
    assert torch.equal(_bits(got), _bits(ref))
    assert 0 < int(torch.isfinite(got).sum()) < batch
