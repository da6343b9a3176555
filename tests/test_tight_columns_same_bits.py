"""Session 22's speed-ups of the tight bound must not change a bit.

* ``_Local.columns`` (the rows on a boundary's columns) forms its indices once per distinct
  window corner (:func:`lipbound.tight._window_index`) and ``_norm_parts`` forms the error
  matrix in place: the rows, error bounds and norms must be those of session 21's code (kept
  here as the reference, :func:`_columns_s21`, :func:`_norm_parts_s21`), bit for bit, on
  random windows and on the tight bounds (whole network, hybrids, per row) of random float64
  nets and of the MNIST LeNet with the reference patched in.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipbound.tight as T
from lipbound import Analyzer
from lipbound.tight import tight_local_bound
from test_tight_tail import _row_last, _setup, _x0, deep_net

DT = torch.float64


def _columns_s21(self, cols):
    """Session 21's ``_Local.columns`` (the reference)."""
    if cols is None:
        return self.dense()
    c_, hh, ww = self.grid
    h, w = self.g.shape[-2:]
    ch, rem = cols // (hh * ww), cols % (hh * ww)
    dy = rem[None, :] // ww - self.r0[:, None]
    dx = rem[None, :] % ww - self.c0[:, None]
    ok = (dy >= 0) & (dy < h) & (dx >= 0) & (dx < w)
    idx = (ch[None, :] * (h * w) + dy.clamp(0, h - 1) * w + dx.clamp(0, w - 1))
    zero = self.g.new_zeros(())
    return (torch.where(ok, self.g.reshape(self.g.shape[0], -1).gather(1, idx), zero),
            torch.where(ok, self.e.reshape(self.e.shape[0], -1).gather(1, idx), zero))


def _norm_parts_s21(g, e, cols, scale):
    """Session 21's ``_norm_parts`` (the reference)."""
    if cols is not None:
        g, e = g[:, cols], e[:, cols]
    if g.numel() == 0:
        return None, 0.0
    if scale is not None:
        m = g * scale[:, None]
        err = (e + (2.0 * T.U) * g.abs()) * scale[:, None] * (1.0 + 4.0 * T.U) + \
            T._absolute(1)
    else:
        m, err = g, e
    return m, T.norm_up(err) * (1.0 + 2.0 * T.gamma(err.numel() + 4))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bit patterns (``-0.0`` and ``0.0`` differ)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), c=st.integers(1, 4), hh=st.integers(1, 12),
       ww=st.integers(1, 12), rows=st.integers(1, 40), shared=st.booleans(),
       frac=st.floats(0.0, 1.0), scaled=st.booleans())
def test_columns_and_norm_parts_match_session_21(seed: int, c: int, hh: int, ww: int,
                                                 rows: int, shared: bool, frac: float,
                                                 scaled: bool) -> None:
    """Random windows (corners shared by many rows or all distinct, signed zeros, any
    columns): the same rows, error bounds, scaled matrix and error norm, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    h = int(torch.randint(1, hh + 1, (1,), generator=g))
    w = int(torch.randint(1, ww + 1, (1,), generator=g))
    n_corner = 2 if shared else rows
    r0 = torch.randint(0, hh - h + 1, (n_corner,), generator=g)
    c0 = torch.randint(0, ww - w + 1, (n_corner,), generator=g)
    pick = torch.randint(0, n_corner, (rows,), generator=g)
    vals = torch.randn(rows, c, h, w, generator=g, dtype=DT)
    vals[torch.rand(rows, c, h, w, generator=g) < 0.3] = -0.0
    err = torch.rand(rows, c, h, w, generator=g, dtype=DT) * 1e-15
    loc = T._Local(vals, err, r0[pick], c0[pick], (c, hh, ww))
    n = c * hh * ww
    cols = torch.nonzero(torch.rand(n, generator=g) < frac).reshape(-1)
    new, ref = loc.columns(cols), _columns_s21(loc, cols)
    assert all(_same_bits(a, b) for a, b in zip(new, ref, strict=True))
    scale = torch.rand(rows, generator=g, dtype=DT) + 0.25 if scaled else None
    (m_new, en_new), (m_ref, en_ref) = T._norm_parts(*new, None, scale), \
        _norm_parts_s21(*ref, None, scale)
    assert en_new == en_ref
    assert (m_new is None) == (m_ref is None)
    if m_new is not None:
        assert _same_bits(m_new, m_ref)


def _reference(monkeypatch) -> None:
    monkeypatch.setattr(T._Local, "columns", _columns_s21)
    monkeypatch.setattr(T, "_norm_parts", _norm_parts_s21)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.03, 0.3, 3.0])
def test_tight_bounds_match_session_21_on_random_nets(monkeypatch, seed: int,
                                                      eps: float) -> None:
    """Whole network with the later hybrids, and per row: the same outcome as with session
    21's columns and norm parts."""
    net, shape = deep_net(seed)
    x0 = _x0("deep", shape, seed)
    an = Analyzer(net, shape, spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, eps)
    cm = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed + 3), dtype=DT)
    paper = an.local_bound_rows(x0, eps, cm)
    key, rblocks = an._blocks_for(cm)
    rrec: list = []
    _, rbounds, _ = an._propagate(key, rblocks, x, eps, stop_before_last=True, record=rrec)
    new = (tight_local_bound(blocks, x, eps, rec, bounds),
           tight_local_bound(rblocks, x, eps, rrec, rbounds, row_last=_row_last(paper)))
    _reference(monkeypatch)
    ref = (tight_local_bound(blocks, x, eps, rec, bounds),
           tight_local_bound(rblocks, x, eps, rrec, rbounds, row_last=_row_last(paper)))
    assert new == ref
    assert new[0].value is not None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), c=st.integers(1, 3), hh=st.integers(1, 10),
       ww=st.integers(1, 10), rows=st.integers(1, 30), frac=st.floats(0.05, 1.0),
       all_cols=st.booleans(), mirror=st.booleans(),
       scale=st.sampled_from([1e-140, 1e-20, 1.0, 3e7, 1e140]), rank=st.integers(1, 4))
def test_lazy_bounds_bracket_the_gathered_norm(seed: int, c: int, hh: int, ww: int,
                                               rows: int, frac: float, all_cols: bool,
                                               mirror: bool, scale: float, rank: int) -> None:
    """A deferred norm held on windows (:class:`lipbound.tight._Lazy`): its value is the
    gathered one's bits (:func:`_norm_bound` of the gathered rows), ``low <= value <= high``
    with no tolerance, ``low`` below the SVD's norm of the gathered matrix and at least its
    largest row's norm (the power iteration's start) within the slack."""
    g = torch.Generator().manual_seed(seed)
    h = int(torch.randint(1, hh + 1, (1,), generator=g))
    w = int(torch.randint(1, ww + 1, (1,), generator=g))
    r0 = torch.randint(0, hh - h + 1, (rows,), generator=g)
    c0 = torch.randint(0, ww - w + 1, (rows,), generator=g)
    vals = (torch.randn(rows, rank, generator=g, dtype=DT)
            @ torch.randn(rank, c * h * w, generator=g, dtype=DT)).reshape(rows, c, h, w)
    vals[torch.rand(rows, c, h, w, generator=g) < 0.3] = 0.0
    vals = vals * scale
    err = vals.abs() * 1e-15 + 1e-300
    loc = T._Local(vals, err, r0, c0, (c, hh, ww))
    held = loc
    n_full = rows
    if mirror:  # every other row rebuilt as the negation of the one before
        src = torch.arange(rows).repeat_interleave(2)[: rows + rows // 2]
        neg = torch.zeros(src.numel(), dtype=torch.bool)
        neg[1::2] = True
        n_full = src.numel()
        held = T._Mirror(loc, src, neg)
    cols = None if all_cols else \
        torch.nonzero(torch.rand(c * hh * ww, generator=g) < frac).reshape(-1)
    if cols is not None and cols.numel() == 0:
        return
    sc = torch.rand(n_full, generator=g, dtype=DT) + 0.5
    gg, ee = T._columns(held, cols)
    eager = T._floor(T._norm_bound(gg, ee, None, sc))
    lazy = T._Deferred(T._Lazy(held, cols, sc), None)
    low, high = lazy.low, lazy.high
    assert lazy.value() == eager
    assert low <= eager <= high
    m = gg * sc[:, None]
    peak = float(m.abs().max())
    if peak > 0:
        svd = float(torch.linalg.svdvals(m / peak)[0]) * peak
        top_row = float(torch.linalg.vector_norm(m / peak, dim=1).max()) * peak
        assert low <= svd * (1 + 1e-12)
        assert low >= T._floor(top_row * (1 - 1e-5))
    else:
        assert low == 0.0


def _gather_flags(monkeypatch, lazy: bool) -> None:
    monkeypatch.setattr(T, "LAZY_GATHER", lazy)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("eps", [0.03, 0.3, 3.0])
def test_lazy_gathering_gives_the_same_results(monkeypatch, seed: int, eps: float) -> None:
    """Whole network with the later hybrids competing, and per row: the same outcome with the
    deferred matrices held on windows as gathered in the sweep (session 21) and as with
    every norm formed."""
    net, shape = deep_net(seed)
    x0 = _x0("deep", shape, seed)
    an = Analyzer(net, shape, spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, eps)
    made = []
    init = T._Lazy.__init__

    def count(self, *a):
        made.append(1)
        init(self, *a)

    monkeypatch.setattr(T._Lazy, "__init__", count)
    out = {}
    for lazy, defer in ((True, True), (False, True), (False, False)):
        _gather_flags(monkeypatch, lazy)
        monkeypatch.setattr(T, "DEFER_NORMS", defer)
        out[lazy, defer] = tight_local_bound(blocks, x, eps, rec, bounds)
    assert out[True, True] == out[False, True] == out[False, False]
    assert out[True, True].value is not None
    assert made or eps == 0.03  # (held on windows somewhere at the larger radii)


def test_same_values_on_mnist(monkeypatch) -> None:
    """MNIST LeNet at mnist:8: the analyzer's tight local bounds at eps 0.1 (the whole network
    and the hybrids competing) and 0.3 (hybrids only) and the margin rows at 0.1 are the same
    bits as with the deferred matrices gathered in the sweep, and as with session 21's
    columns and norm parts too; some norms held on windows are never formed."""
    from lipbound.inputs import load_sample
    from lipbound.zoo import load_model

    lm = load_model("mnist")
    x0 = load_sample("mnist:8", entry=lm.entry).x
    shape = tuple(x0.shape[1:])
    cm = torch.eye(10, dtype=DT)[[3, 5, 0]] - torch.eye(10, dtype=DT)[[8, 8, 8]]
    made, formed = [], []
    init, matrix = T._Lazy.__init__, T._Lazy.matrix

    def count_init(self, *a):
        made.append(1)
        init(self, *a)

    def count_matrix(self):
        formed.append(1)
        return matrix(self)

    monkeypatch.setattr(T._Lazy, "__init__", count_init)
    monkeypatch.setattr(T._Lazy, "matrix", count_matrix)

    def values() -> list:
        out = []
        for eps in (0.1, 0.3):
            an = Analyzer(lm.model, shape)
            out.append(an.local_bound(x0, eps, tight=True).value)
        an = Analyzer(lm.model, shape)
        out.append(an.local_bound_rows(x0, 0.1, cm, tight=True).values.tolist())
        return out

    new = values()
    assert 0 < len(formed) < len(made)
    _gather_flags(monkeypatch, False)
    assert values() == new
    _reference(monkeypatch)
    assert values() == new
