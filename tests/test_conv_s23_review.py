"""Session 23 review of the convolution and pooling internals every bound rests on: the
Winograd products and their error bound ``Δ`` (against an explicit absolute operator and a
long-double reference), how ``Δ`` enters a Lanczos run's value, the polyphase circulant bound
and the exact route against the SVD of the convolution's matrix, and the pooling rules
against torch's own Jacobians and brute-force window counts."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from core_helpers import n_examples
from lipbound import spectral
from lipbound.ops import winograd
from lipbound.ops.winograd import WinogradConv
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
    report the Kuczynski-Wozniakowski value of the same Krylov dimension)."""
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
        assert plain.method == fast.method == "lanczos"
        assert fast.estimate < plain.estimate  # the fast run was kept, and its products erred
        assert fast.value >= plain.value >= 1.0
