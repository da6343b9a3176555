"""Deferred norms of the tight bound (session 21, :class:`lipbound.tight._Deferred`).

The deviation norms of the competing candidates (the hybrids' boundaries, the whole network's
at the input) are formed only where their candidate may be the smallest. The results must be
the same bits as with every norm formed (``DEFER_NORMS = False``): on random nets
(whole-network and per-row forms, small and large radii), on the MNIST LeNet, where some
norms are indeed skipped, and against session 20's selection loop on random values with
ties. The lower bound that decides the skips is below the norm bound it stands for (and at
least the largest row's norm), the upper bound above it, and a deferred value is the eager
one bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipbound.tight as T
from lipbound import Analyzer
from lipbound.tight import tight_local_bound
from test_tight_tail import _row_last, _setup, _x0, deep_net

DT = torch.float64


def _matrix(seed: int, rows: int, cols: int, rank: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, rank, generator=g, dtype=DT) @ torch.randn(rank, cols, generator=g,
                                                                      dtype=DT)
    m[torch.rand(rows, cols, generator=g, dtype=DT) < 0.3] = 0.0
    return m * scale


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 40), cols=st.integers(1, 40),
       rank=st.integers(1, 6), scale=st.sampled_from([1e-140, 1e-20, 1.0, 3e7, 1e140]))
def test_deferred_bounds_bracket_the_norm_bound(seed: int, rows: int, cols: int, rank: int,
                                                scale: float) -> None:
    """``low <= value <= high`` (no tolerance), ``value`` is :func:`_norm_bound`'s bits,
    ``low`` at least the largest row's norm (the power iteration's start) within its slack,
    and below the SVD's norm."""
    m = _matrix(seed, rows, cols, rank, scale)
    e = m.abs() * 1e-15
    sc = torch.rand(rows, generator=torch.Generator().manual_seed(seed + 1), dtype=DT) + 0.5
    eager = T._norm_bound(m, e, None, sc)
    mm, en = T._norm_parts(m, e, None, sc)
    if mm is None or float(mm.abs().max()) == 0.0:
        return
    d = T._Deferred(mm, en)
    top_row = float(torch.linalg.vector_norm(mm / scale, dim=1).max()) * scale
    svd = float(torch.linalg.svdvals(mm / scale)[0]) * scale
    low, high = d.low, d.high
    assert d.value() == T._floor(eager)
    assert low <= d.value() <= high
    assert low <= svd * (1 + 1e-12)
    assert low >= T._floor(top_row * (1 - 1e-5))


def _outcomes(monkeypatch, *args, **kw):
    monkeypatch.setattr(T, "DEFER_NORMS", False)
    eager = tight_local_bound(*args, **kw)
    monkeypatch.setattr(T, "DEFER_NORMS", True)
    return eager, tight_local_bound(*args, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.03, 0.3, 3.0])
def test_deferred_norms_give_the_same_results(monkeypatch, seed: int, eps: float) -> None:
    """Whole network (with the later hybrids competing) and per-row form: the same outcome
    with and without deferral (values, rows' values, the boundary reported)."""
    net, shape = deep_net(seed)
    x0 = _x0("deep", shape, seed)
    an = Analyzer(net, shape, spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, eps)
    eager, lazy = _outcomes(monkeypatch, blocks, x, eps, rec, bounds)
    assert eager == lazy
    cm = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed + 3), dtype=DT)
    paper = an.local_bound_rows(x0, eps, cm)
    key, blocks = an._blocks_for(cm)
    rec = []
    _, bounds, _ = an._propagate(key, blocks, x, eps, stop_before_last=True, record=rec)
    eager, lazy = _outcomes(monkeypatch, blocks, x, eps, rec, bounds,
                            row_last=_row_last(paper))
    assert eager == lazy


def test_deferred_norms_skipped_on_mnist_same_values(monkeypatch) -> None:
    """MNIST LeNet, eps 0.1 (the whole network and the later hybrids compete): some deferred
    norms are never formed, and the outcome and the analyzer's local and per-row bounds are
    the same bits as with every norm formed."""
    from lipbound.inputs import load_sample
    from lipbound.zoo import load_model

    lm = load_model("mnist")
    x0 = load_sample("mnist:8", entry=lm.entry).x
    shape = tuple(x0.shape[1:])
    eps = 0.1
    made, formed = [], []
    init, value = T._Deferred.__init__, T._Deferred.value

    def count_init(self, m, en):
        made.append(1)
        init(self, m, en)

    def count_value(self):
        if self._value is None:
            formed.append(1)
        return value(self)

    monkeypatch.setattr(T._Deferred, "__init__", count_init)
    monkeypatch.setattr(T._Deferred, "value", count_value)
    an = Analyzer(lm.model, shape, spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, eps)
    eager, lazy = _outcomes(monkeypatch, blocks, x, eps, rec, bounds)
    assert eager == lazy and lazy.value is not None
    assert len(formed) < len(made)
    cm = torch.eye(10, dtype=DT)[[3, 5]] - torch.eye(10, dtype=DT)[[8, 8]]
    res = {}
    for defer in (False, True):
        monkeypatch.setattr(T, "DEFER_NORMS", defer)
        an = Analyzer(lm.model, shape, spectral="exact")
        res[defer] = (an.local_bound(x0, eps, tight=True).value,
                      an.local_bound_rows(x0, eps, cm, tight=True).values.tolist())
    assert res[False] == res[True]
    assert all(math.isfinite(v) for v in res[True][1])


def test_no_deferral_without_room_under_the_cap(monkeypatch) -> None:
    """Where the estimate plus the deferred matrices exceed ``max_bytes`` every norm is
    formed in the sweep (no :class:`_Deferred`), with the same outcome."""
    net, shape = deep_net(1)
    x0 = _x0("deep", shape, 1)
    an = Analyzer(net, shape, spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, 3.0)
    made = []
    init = T._Deferred.__init__

    def count_init(self, m, en):
        made.append(1)
        init(self, m, en)

    monkeypatch.setattr(T._Deferred, "__init__", count_init)
    roomy = tight_local_bound(blocks, x, 3.0, rec, bounds)
    assert made
    made.clear()
    monkeypatch.setattr(T, "deferred_bytes", lambda *a, **k: 1 << 60)
    tight_ = tight_local_bound(blocks, x, 3.0, rec, bounds)
    assert not made and tight_ == roomy


def _reference_segments(v, d, cols, unstable, n_blocks, factors, certified, vm, dm):
    """The selection without deferral (session 20's loop): B_0 first, then the hybrids
    upwards, a later one kept only when strictly smaller."""
    from lipbound.ops.base import product_up

    b_of = {n_blocks: 1.0}
    for j in sorted(cols, reverse=True):
        b_of[j] = T._expansion(j, v[j], d, b_of, unstable, factors, certified)
    best, at = (b_of[0], 0) if 0 in cols else (math.inf, -1)
    for j in sorted(vm):
        val = product_up([*factors[:j], T._expansion(j, vm[j], dm, b_of, unstable, factors,
                                                      certified)])
        if val < best:
            best, at = val, j
    return best, at


def _fake(value: float, low: float, high: float) -> T._Deferred:
    x = object.__new__(T._Deferred)
    x.m, x.en, x.low, x.high, x._value = None, 0.0, low, high, value
    return x


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n_blocks=st.integers(2, 6), whole=st.booleans(),
       coarse=st.booleans())
def test_lazy_selection_matches_the_eager_loop(data, n_blocks: int, whole: bool,
                                               coarse: bool) -> None:
    """:func:`lipbound.tight._segments` with deferred norms (lower bounds anywhere from half
    the value to the value itself, upper bounds above it; coarse values: ties) returns the
    value and boundary of the eager loop, bit for bit, and forms no more than it."""
    vals = st.sampled_from([0.5, 1.0, 2.0, 4.0]) if coarse else \
        st.floats(1e-3, 1e3, allow_nan=False)
    unstable = [t for t in range(n_blocks) if data.draw(st.booleans())]
    cols = {0: None} if whole else {}
    for t in unstable:
        if t + 1 < n_blocks:
            cols[t + 1] = None
    hyb = list(range(1, n_blocks))
    v = {j: data.draw(vals) for j in cols}
    vm = {j: data.draw(vals) for j in hyb}
    d = {t: {j: data.draw(vals) for j in cols if j <= t} for t in unstable}
    dm = {t: {j: data.draw(vals) for j in hyb if j <= t} for t in unstable}
    factors = [data.draw(vals) for _ in range(n_blocks)]
    certified = [data.draw(st.booleans()) for _ in range(n_blocks)]
    want = _reference_segments(v, d, cols, unstable, n_blocks, factors, certified, vm, dm)

    def lazy(x: float, j: int) -> float | T._Deferred:
        if j != 0 and data.draw(st.booleans()):
            return x  # (some formed in the sweep)
        low = x * data.draw(st.sampled_from([0.5, 0.9, 0.999999, 1.0]))
        return _fake(x, low, x * data.draw(st.sampled_from([1.0, 2.0])))

    dl = {t: {j: lazy(x, j) if j == 0 else x for j, x in dd.items()} for t, dd in d.items()}
    dml = {t: {j: lazy(x, j) for j, x in dd.items()} for t, dd in dm.items()}
    got = T._segments(v, dl, cols, unstable, n_blocks, factors, certified, vm, dml)
    assert got == want
