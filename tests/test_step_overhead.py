"""The cheaper per-step forms of the Lanczos engine and its products do what the forms they
replaced did, bit for bit: gather / scatter along the coordinate axis (index_select and
indexed assignment before), the dense tridiagonal matrix of the stopping checks (diag sums
before), and the channel-subset renumbering (integer division per index before)."""

from __future__ import annotations

import pytest
import torch

from lipbound._indexing import gather_cols, scatter_cols
from lipbound.analyzer import _positive
from lipbound.lanczos import _tridiagonal

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
