"""The tight bound's rows on windows of their grid (:mod:`lipbound.tight`, ``_Local``) against
the dense rows (:func:`lipbound.tight._back`), step by step and end to end, in float64.

A step on windows sums a product's terms in another order than the dense step (the window's
own transposed convolution), so the rows may differ in their last bits: they must lie within
the sum of the two error bounds (both bound the distance to the same exact rows), the dense
rows must be zero outside the window, and the error bounds must agree (the same terms) up to
their own rounding. A rational-arithmetic check covers the windowed bound against the exact
rows, and deliberate breakages of the windowed step fail the comparison."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from core_helpers import randomize_batchnorm_
from lipbound import Analyzer
from lipbound.blocks import PoolBlock
from lipbound.tight import (
    _back,
    _back_local,
    _Local,
    _pool_secant,
    _Secant,
    _to_local,
)
from test_tight import raw_tight

DT = torch.float64


def _conv_block(seed: int, k: int, s: int, p: int, d: int, groups: int, bn: str,
                relu: bool, hw: int = 9):
    """An affine(-ReLU) convolution block from a small net (``bn``: "" / "before" (a scale
    ``s_in``) / "after" (``s_out``))."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    if bn == "before":
        layers.append(nn.BatchNorm2d(4))
    layers.append(nn.Conv2d(4, 6, k, stride=s, padding=p, dilation=d, groups=groups))
    if bn == "after":
        layers.append(nn.BatchNorm2d(6))
    if relu:
        layers.append(nn.ReLU())
    net = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                randomize_batchnorm_(m, g)
    net = nn.Sequential(*net, nn.Flatten()).eval()
    an = Analyzer(net, (4, hw, hw), spectral="exact")
    blocks = [b for b in an.blocks if not isinstance(b, PoolBlock) and b.mixing is not None]
    return blocks[0], g


def _sparse_rows(g: torch.Generator, shape, n: int, box: int) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """``n`` rows on random ``box x box`` windows of a grid ``shape`` (all channels), with
    entrywise error bounds on the same windows."""
    c, h, w = shape
    rows = torch.zeros(n, c, h, w, dtype=DT)
    err = torch.zeros_like(rows)
    for i in range(n):
        bh, bw = min(box, h), min(box, w)
        r = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        q = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        rows[i, :, r:r + bh, q:q + bw] = torch.randn(c, bh, bw, generator=g, dtype=DT)
        err[i, :, r:r + bh, q:q + bw] = torch.rand(c, bh, bw, generator=g, dtype=DT) * 1e-12
    rows[rows.abs() < 0.2] = 0.0  # exact zeros inside the windows too
    return rows.reshape(n, -1), err.reshape(n, -1)


def _relu_secant(g: torch.Generator, b) -> _Secant:
    c = torch.rand(b.out_dim, generator=g, dtype=DT)
    c[torch.rand(b.out_dim, generator=g) < 0.3] = 0.0  # stably inactive units: c = 0
    return _Secant("relu", torch.arange(b.out_dim), c=c, rho=torch.zeros_like(c))


def _mismatch(b, sec, rows: torch.Tensor, err: torch.Tensor, centre: bool = True,
              exact: bool = False) -> str | None:
    """What differs between the windowed step and the dense one (None: they agree)."""
    gd, ed = _back(b, sec, rows, err, centre=centre)
    loc = _to_local(rows, err, b.out_shape, most=1.0)
    assert loc is not None
    new = _back_local(b, sec, loc, centre=centre)
    assert new is not None
    gl, el = new.dense()
    inside = _Local(torch.ones_like(new.g), new.e, new.r0, new.c0, new.grid).dense()[0] > 0
    if bool((gd[~inside] != 0).any()):
        return "the dense rows are nonzero outside the window"
    # (outside the window the dense error bound holds the absolute terms alone, each at
    # least ERR_FLOOR = 2^-800, 1.5e-241, summed through the kernel's magnitudes)
    if bool((ed[~inside] > 1e-200).any()):
        return "the dense error bound is more than an underflow term outside the window"
    if exact:
        if not (torch.equal(gl, gd) and torch.equal(el[inside], ed[inside])):
            return "not bit-identical"
        return None
    if bool(((gl - gd).abs() > el + ed).any()):
        return "the rows differ by more than their error bounds"
    tol = 1e-12 * ed[inside] + 1e-200  # (the absolute terms, ERR_FLOOR and up: see above)
    if bool(((el[inside] - ed[inside]).abs() > tol).any()):
        return "the error bounds differ beyond their own rounding"
    return None


GEOMETRIES = [  # (kernel, stride, padding, dilation, groups, scale)
    (3, 1, 0, 1, 1, ""), (3, 1, 1, 1, 1, "after"), (2, 1, 1, 1, 2, "before"),
    (3, 2, 1, 1, 1, ""), (3, 2, 2, 2, 2, "after"), (1, 1, 0, 1, 1, "before"),
    (5, 1, 2, 1, 1, ""), (4, 3, 3, 1, 1, "after"),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("relu", [True, False])  # (through the ReLU centre, or not)
def test_conv_step_on_windows_matches_dense(geom, relu: bool) -> None:
    """A convolution block's step on windows against the dense step (strides, padding beyond
    the kernel's reach, dilation, groups, diagonal scales before and after, the ReLU
    centre), rows on windows of 1 x 1 up to the whole grid."""
    k, s, p, d, groups, bn = geom
    b, g = _conv_block(sum(geom[:5]) + relu, k, s, p, d, groups, bn, True)
    sec = _relu_secant(g, b)
    for box in (1, 2, 4, 99):
        rows, err = _sparse_rows(g, b.out_shape, 7, box)
        assert _mismatch(b, sec, rows, err, centre=relu) is None, (geom, box)


def test_first_step_and_one_hot_rows() -> None:
    """One-hot rows through a block's affine part alone (the first step of a ReLU secant's
    rows): a row of the matrix, the same bits as the dense step."""
    b, g = _conv_block(3, 3, 1, 1, 1, 1, "", True)
    idx = torch.randperm(b.out_dim, generator=g)[:20]
    rows = torch.zeros(20, b.out_dim, dtype=DT)
    rows[torch.arange(20), idx] = 1.0
    sec = _relu_secant(g, b)
    assert _mismatch(b, sec, rows, torch.zeros_like(rows), centre=False, exact=True) is None


def test_one_hot_rows_on_windows() -> None:
    """``_one_hot`` gives what ``_to_local`` gives for the same one-hot rows."""
    from lipbound.tight import _one_hot

    shape = (3, 5, 4)
    sigma = torch.tensor([0, 7, 19, 20, 41, 59])
    rows = torch.zeros(sigma.numel(), 60, dtype=DT)
    rows[torch.arange(sigma.numel()), sigma] = 1.0
    a, b = _one_hot(sigma, shape), _to_local(rows, torch.zeros_like(rows), shape)
    for x, y in ((a.g, b.g), (a.e, b.e), (a.r0, b.r0), (a.c0, b.c0)):
        assert torch.equal(x, y)
    assert a.grid == b.grid and torch.equal(a.dense()[0], rows)


def _pool_block_and_secant(k: int, s: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.MaxPool2d(k, stride=s, dilation=d),
                        nn.Flatten()).to(DT).eval()
    an = Analyzer(net, (3, 10, 10), spectral="exact")
    b = next(b for b in an.blocks if isinstance(b, PoolBlock))
    mid = torch.randn(b.in_dim, generator=g, dtype=DT)
    wid = torch.rand(b.in_dim, generator=g, dtype=DT) * 0.8
    mask = (torch.rand(b.in_dim, generator=g) < 0.9).to(DT)
    sec, _, _ = _pool_secant(b, mask, mid - wid, mid + wid, 0, 10**6, 1 << 30)
    return b, sec, g


@pytest.mark.parametrize("k,s,d", [(2, 2, 1), (3, 3, 1), (2, 1, 1), (3, 2, 1), (2, 2, 2)])
def test_pool_step_on_windows_matches_dense(k: int, s: int, d: int) -> None:
    """The pooling centre's transpose on windows, tap by tap, against the dense one: the same
    bits for windows that do not overlap (one term per input), within the error bounds for
    overlapping ones."""
    b, sec, g = _pool_block_and_secant(k, s, d, 10 * k + s + d)
    assert bool((sec.div > 1).any())  # some unstable windows: 1 / p weights
    overlap = s < (k - 1) * d + 1
    for box in (1, 2, 3, 99):
        rows, err = _sparse_rows(g, b.out_shape, 6, box)
        assert _mismatch(b, sec, rows, err, exact=not overlap) is None, (k, s, d, box)


def _seeds(sec) -> torch.Tensor:
    """A pooling secant's deviation rows, dense."""
    return sec.seeds if sec.seeds is not None else sec.local.dense()[0]


@pytest.mark.parametrize("k,s,d", [(2, 2, 1), (3, 2, 1), (2, 1, 1), (3, 3, 2)])
def test_seed_rows_on_windows_as_from_dense(monkeypatch, k: int, s: int, d: int) -> None:
    """The pooling deviation rows built on windows are what ``_to_local`` makes of the dense
    rows, bit for bit (the same windows), and the same rows."""
    import lipbound.tight as tight

    b, sec, _ = _pool_block_and_secant(k, s, d, 200 + k + s + d)
    assert sec.seeds is None and sec.local is not None
    monkeypatch.setattr(tight, "_seed_windows", lambda *a: None)
    b2, dense, _ = _pool_block_and_secant(k, s, d, 200 + k + s + d)
    assert dense.local is None and dense.rows == sec.rows
    ref = _to_local(dense.seeds, None, b.in_shape)
    a = sec.local
    assert a.grid == ref.grid
    for x, y in ((a.g, ref.g), (a.e, ref.e), (a.r0, ref.r0), (a.c0, ref.c0)):
        assert x.shape == y.shape and x.stride() == y.stride() and torch.equal(x, y)
    assert torch.equal(a.dense()[0], dense.seeds)


def _rebuilt(sec) -> torch.Tensor | None:
    """The pooling secant's seed rows as the sweep rebuilds them from the rows it keeps."""
    from lipbound.tight import _columns, _Mirror, _mirrors, _select

    out = []
    seeds = _seeds(sec)
    for held in ((seeds, torch.zeros_like(seeds)), _to_local(seeds, None, (3, 10, 10))):
        keep, twin = _mirrors(held)
        if keep is None:
            return None
        out.append(_columns(_Mirror(_select(held, keep), *twin), None)[0])
    assert torch.equal(out[0], out[1])  # (dense rows and rows on windows alike)
    return out[0]


@pytest.mark.parametrize("k,s,d", [(2, 2, 1), (3, 2, 1), (2, 1, 1)])
def test_mirrored_rows_rebuild_the_seeds(monkeypatch, k: int, s: int, d: int) -> None:
    """A window with two possible winners has two deviation rows, each the other's negation:
    one is pulled back and the other rebuilt by negation, which gives every seed row again
    (bit for bit); a rebuild without the sign does not."""
    import lipbound.tight as tight

    b, sec, g = _pool_block_and_secant(k, s, d, 100 + k + s + d)
    rows = _rebuilt(sec)
    assert rows is not None and rows.shape[0] < 2 * _seeds(sec).shape[0]
    assert torch.equal(rows, _seeds(sec))
    real = tight._mirrors
    monkeypatch.setattr(tight, "_mirrors", lambda rows: (lambda k_, t_: (
        k_, (t_[0], torch.zeros_like(t_[1]))) if k_ is not None else (k_, t_))(*real(rows)))
    assert not torch.equal(_rebuilt(sec), _seeds(sec))  # (a rebuild without the sign)


def test_windowed_bound_against_exact_rationals() -> None:
    """The windowed rows' error bound covers the exact rows (rational arithmetic from the same
    float64 weights) through a padded convolution with a ReLU centre."""
    b, g = _conv_block(11, 3, 1, 1, 1, 1, "", True, hw=5)
    sec = _relu_secant(g, b)
    rows, err = _sparse_rows(g, b.out_shape, 2, 2)
    err.zero_()
    new = _back_local(b, sec, _to_local(rows, err, b.out_shape, most=1.0), centre=True)
    gl, el = new.dense()
    # the block's matrix, exactly: the convolution of basis vectors (single products)
    a = b.lin(torch.eye(b.in_dim, dtype=DT)).T  # (out_dim, in_dim)
    cf = [Fraction(float(v)) for v in sec.c]
    for i in range(rows.shape[0]):
        cent = [Fraction(float(rows[i, o])) * cf[o] for o in range(b.out_dim)]
        nz = [o for o in range(b.out_dim) if cent[o] != 0]
        for j in range(b.in_dim):
            exact = sum((cent[o] * Fraction(float(a[o, j])) for o in nz), Fraction(0))
            assert abs(Fraction(float(gl[i, j])) - exact) <= Fraction(float(el[i, j]))


def _breaks(monkeypatch, name: str, fake, pool: bool = False) -> bool:
    """Whether the step comparison notices a breakage of the windowed step."""
    import lipbound.tight as tight

    if pool:
        b, sec, g = _pool_block_and_secant(2, 2, 1, 7)
    else:
        b, g = _conv_block(5, 3, 1, 1, 1, 1, "after", True)
        sec = _relu_secant(g, b)
    rows, err = _sparse_rows(g, b.out_shape, 7, 2)
    monkeypatch.setattr(tight, name, fake(getattr(tight, name)))
    try:
        return _mismatch(b, sec, rows, err) is not None
    finally:
        monkeypatch.undo()


def test_breakages_are_caught(monkeypatch) -> None:
    """Deliberately wrong windowed steps fail the comparison: the window placed one entry off,
    the ReLU centre read at the wrong place, a pooling window's weight at the wrong tap."""
    assert _breaks(monkeypatch, "_regrid",
                   lambda f: lambda r0, hi, size: ((r0 + 1).clamp(0, size - min(hi, size)),
                                                   min(hi, size)))
    assert _breaks(monkeypatch, "_window",
                   lambda f: lambda t, grid, loc: f(t.flip(0), grid, loc))

    def rolled(f):
        def taps(b, sec):
            member, div = f(b, sec)
            sec.taps = None
            return member.roll(1, dims=1), div
        return taps

    assert _breaks(monkeypatch, "_pool_taps", rolled, pool=True)
    # and the unbroken steps pass the same comparison
    assert not _breaks(monkeypatch, "_regrid", lambda f: f)
    assert not _breaks(monkeypatch, "_pool_taps", lambda f: f, pool=True)


def _pool_net(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Convolutions (padding, stride 2, batch norm), max pooling and fully connected layers;
    seed 2: an average pooling with an output scale between two ReLU convolutions (rows on
    windows go on densely from there)."""
    torch.manual_seed(seed)
    mid: list[nn.Module] = [nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                            nn.ReLU()] if seed == 2 else []
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 5, 3, stride=1, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                        *mid, nn.Conv2d(5, 4, 3, stride=2, dilation=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.ReLU(),
                        nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        bn = net[4]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval(), torch.randn(1, 2, 16, 16, dtype=DT)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_bound_with_windows_equals_dense_rows(monkeypatch, seed: int, eps: float) -> None:
    """The whole tight bound (single and per-row) with rows on windows against the same bound
    with every row dense (``_to_local`` declined): equal up to the rows' rounding, the same
    row counts (an integer in the outcome)."""
    import lipbound.tight as tight

    net, x0 = _pool_net(seed)
    an = Analyzer(net, (2, 16, 16), spectral="exact")

    def both() -> list:
        out = []
        for row_last in (None, [1e6, 2e6, 3e6]):
            out.append(raw_tight(an, x0, eps, row_last=row_last)[0])
        return out

    calls: list[bool] = []
    real = tight._back_local

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(tight, "_back_local", spy)
    fast = both()
    assert sum(calls) >= 4  # the windowed steps ran
    mirrored = []
    real_mirrors = tight._mirrors

    def spy_mirrors(rows):
        out = real_mirrors(rows)
        mirrored.append(out[0] is not None)
        return out

    monkeypatch.setattr(tight, "_mirrors", spy_mirrors)
    monkeypatch.setattr(tight, "_to_local", lambda g, e, shape, most=0.5: None)
    dense = both()  # (dense rows, negated rows still rebuilt)
    monkeypatch.setattr(tight, "_mirrors", lambda rows: (None, None))
    slow = both()  # (every row pulled back, dense)
    assert any(mirrored)
    for f, s in zip(dense, slow, strict=True):  # (the same bits: negation is exact)
        assert f.value == s.value and f.row_values == s.row_values
    assert fast[0].value is not None and fast[1].row_values is not None
    for f, s in zip(fast, slow, strict=True):
        assert f.reason == s.reason
        assert isinstance(f.rows, int) and f.rows == s.rows and f.unstable == s.unstable
        assert math.isclose(f.value, s.value, rel_tol=1e-12, abs_tol=0.0)
        if f.row_values is not None:
            for a, b in zip(f.row_values, s.row_values, strict=True):
                assert math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def test_broken_twins_change_the_bound(monkeypatch) -> None:
    """A rebuild that takes a negated row's partner one place off (an earlier bug of this
    code) changes the whole bound, which the exact comparison above would catch."""
    import lipbound.tight as tight

    net, x0 = _pool_net(1)
    an = Analyzer(net, (2, 16, 16), spectral="exact")
    good = raw_tight(an, x0, 0.1)[0]
    real = tight._mirrors

    def off_by_one(rows):
        keep, twin = real(rows)
        if keep is None:
            return keep, twin
        src, neg = twin
        return keep, (torch.where(neg, (src - 1).clamp_min(0), src), neg)

    monkeypatch.setattr(tight, "_mirrors", off_by_one)
    bad = raw_tight(an, x0, 0.1)[0]
    assert good.value is not None and bad.value != good.value
