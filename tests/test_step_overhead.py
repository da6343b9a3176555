"""The cheaper per-step forms of the Lanczos engine and its products do what the forms they
replaced did, bit for bit: gather / scatter along the coordinate axis (index_select and
indexed assignment before), the dense tridiagonal matrix of the stopping checks (diag sums
before), the channel-subset renumbering (integer division per index before), and the
per-layer forms of the local bound (rule 3's masks formed once, a whole selection of the exact
route's matrix used without an indexed copy, active counts carried from layer to layer)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipbound import Analyzer
from lipbound._indexing import gather_cols, scatter_cols
from lipbound.analyzer import SAFETY, _positive, _relu_slopes
from lipbound.lanczos import _tridiagonal
from lipbound.spectral import exact_norm, spectral_upper

DT = torch.float64


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_full,frac", [(1, 1.0), (50, 0.3), (3000, 0.7)])
def test_gather_and_scatter_match_indexing(batch: int, n_full: int, frac: float) -> None:
    g = torch.Generator().manual_seed(n_full + batch)
    idx = torch.nonzero(torch.rand(n_full, generator=g) < frac).reshape(-1)
    x = torch.randn(batch, n_full, generator=g, dtype=DT)
    assert torch.equal(gather_cols(x, idx), x.index_select(1, idx))
    v = torch.randn(batch, idx.numel(), generator=g, dtype=DT)
    old = torch.zeros(batch, n_full, dtype=DT)
    old[:, idx] = v
    new = torch.zeros(batch, n_full, dtype=DT)
    assert scatter_cols(new, idx, v) is new
    assert torch.equal(new, old)


@pytest.mark.parametrize("m", [1, 2, 7, 40])
def test_tridiagonal_matches_diag_sums(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    diag = torch.randn(m, generator=g, dtype=DT).tolist()
    off = torch.rand(max(m - 1, 0), generator=g, dtype=DT).tolist()
    if m > 2:  # signed zeros: the sums with zeros turn -0.0 into +0.0
        diag[1], off[0] = -0.0, -0.0
    ref = torch.diag(torch.tensor(diag, dtype=DT))
    if m > 1:
        b = torch.tensor(off, dtype=DT)
        ref += torch.diag(b, 1) + torch.diag(b, -1)
    t = _tridiagonal(diag, off)
    assert torch.equal(t, ref)
    assert torch.equal(torch.signbit(t), torch.signbit(ref))
    assert torch.equal(torch.linalg.eigvalsh(t), torch.linalg.eigvalsh(ref))


@pytest.mark.parametrize("seed", range(5))
def test_positive_entries_of_a_channel_subset_are_the_renumbered_indices(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c, per = 9, 13
    m = torch.rand(c, per, generator=g, dtype=DT) - 0.6
    m[torch.rand(c, generator=g) < 0.4] = 0.0  # whole channels off
    m = m.clamp_min(0).reshape(-1)
    idx = _positive(m)
    ch = torch.nonzero(m.reshape(c, per).amax(1) > 0).reshape(-1)
    # the renumbering the analyzer made before
    pos = torch.full((c,), -1, dtype=torch.int64)
    pos[ch] = torch.arange(ch.numel())
    renumbered = pos[idx // per] * per + idx % per
    sub = m.reshape(c, per).index_select(0, ch).reshape(-1)
    assert torch.equal(_positive(sub), renumbered)


# ------------------------------------------------------------------ per-layer forms (session 17)
def _slopes_before(y0, e_out, rn, eps_k, moving):
    """Rule 3 as the analyzer computed it before its masks and products were shared."""
    y_hi = y0 + e_out
    ybar = y_hi + eps_k * rn + SAFETY * (y0.abs() + eps_k * rn)
    den = ybar - y_hi
    r = torch.where(y_hi >= 0, torch.ones_like(y0),
                    torch.where(ybar > 0, ybar / den, torch.zeros_like(y0)))
    r = torch.where(~torch.isfinite(den) | torch.isnan(r), torch.ones_like(r), r)
    r = torch.where(moving, r, torch.zeros_like(r))
    d_out = ((ybar > 0) & moving).to(DT)
    return r, d_out, y_hi >= 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps_k", [0.0, 1e-300, 0.3, 1e200, math.inf])
def test_relu_slopes_match_the_unshared_form(seed: int, eps_k: float) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 400
    y0 = torch.randn(n, generator=g, dtype=DT) * 10.0 ** torch.randint(-6, 6, (n,), generator=g)
    rn = torch.rand(n, generator=g, dtype=DT) * 10.0 ** torch.randint(-8, 8, (n,), generator=g)
    e_out = torch.rand(n, generator=g, dtype=DT) * 1e-12
    # the ends of the range: signed zeros, a kink exactly at 0, infinities and NaN
    y0[:8] = torch.tensor([0.0, -0.0, -1e-320, 1e-320, -math.inf, math.inf, -1e308, math.nan])
    rn[8:14] = torch.tensor([0.0, math.inf, 1e300, 1e-300, math.inf, 0.0])
    y0[8:14] = torch.tensor([-1.0, -1.0, -1e300, -1e-300, 2.0, -0.0])
    e_out[14:17] = torch.tensor([0.0, math.inf, 1e300])
    y0[17:19], e_out[17:19], rn[17:19] = 0.0, 0.0, 1.0  # ybar exactly 0 when eps_k = 0
    moving = rn > 0
    moving[torch.rand(n, generator=g) < 0.1] = False
    r, on, may_be_on = _relu_slopes(y0, e_out, rn, eps_k, moving)
    r_ref, d_ref, may_ref = _slopes_before(y0, e_out, rn, eps_k, moving)
    assert r.dtype == DT and torch.equal(r, r_ref)
    assert torch.equal(torch.signbit(r), torch.signbit(r_ref))
    assert torch.equal(on.to(DT), d_ref) and torch.equal(on, d_ref > 0)
    assert torch.equal(may_be_on, may_ref)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("frac", [1.0, 0.6])
def test_exact_route_uses_a_whole_selection_as_the_indexed_copy(layout: str, frac: float) -> None:
    g = torch.Generator().manual_seed(7)
    m = torch.randn(23, 37, generator=g, dtype=DT)
    if layout == "transposed":
        m = torch.randn(37, 23, generator=g, dtype=DT).T  # not contiguous
    rows = torch.nonzero(torch.rand(23, generator=g) < frac).reshape(-1)
    cols = torch.nonzero(torch.rand(37, generator=g) < frac).reshape(-1)
    sb = spectral_upper(lambda v: v @ m.T, lambda y: y @ m, n_in=37, n_out=23, cols=cols,
                        rows=rows, device="cpu", dense=lambda: m, apply_flops=23.0 * 37,
                        mode="exact")
    assert sb.method == "svd"
    assert sb.value == exact_norm(m[rows][:, cols])  # bit for bit: the copy indexing makes
    assert sb.value >= float(torch.linalg.matrix_norm(m[rows][:, cols], ord=2))


def test_active_counts_chain_through_the_layers() -> None:
    """A layer's active inputs are counted once, as the previous layer's active outputs: the
    counts are those of the masks (checked against the input size and a second radius)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()
    x0 = torch.randn(1, 2, 8, 8, dtype=DT)
    for eps in (1e-3, 0.5):
        res = Analyzer(net, (2, 8, 8)).local_bound(x0, eps)
        lay = res.layers
        assert lay[0].active_in == 2 * 8 * 8
        for a, b in zip(lay[:-1], lay[1:], strict=True):
            assert b.active_in == a.active_out
        assert lay[-1].active_out <= 3
