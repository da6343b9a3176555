"""The memory the tight bound's rows take at their peak, estimated before any is formed.

:func:`lipbound.tight.tight_local_bound` refuses a construction whose rows would take more
than its cap (``max_bytes``): the hybrid starts at a later boundary, or the paper's product is
reported. The cap is there to fall back instead of exhausting memory, so the estimate here is
an upper estimate of the peak of everything the construction allocates, computed from the
shapes alone (cheap: no tensor is formed). It follows the construction step by step (the
code of :mod:`lipbound.tight`, whose decisions, rows on windows or dense, it repeats):

* each sweep (the output rows, then each unstable secant's deviation rows) holds its rows and
  their error bounds, on windows of their grid where :mod:`lipbound.tight` keeps them there
  (``_one_hot``, ``_seed_windows``, ``_back_local``, ``_pool_local``: the windows grow by a
  kernel per step backwards, cut to the grid) and dense elsewhere (rows of a fully connected
  layer, rows after a block not handled on windows, the pooling seeds that ``_seed_windows``
  declines);
* each backward step: the rows it receives and returns, the centred rows and the
  magnitudes of the error bound, the convolutions' internal buffers (CPU ``conv2d`` and
  ``conv_transpose2d`` unfold their input for the whole batch: ``kh kw`` times the rows; the
  rows on windows go through
  :func:`lipbound.ops.conv_transpose.conv_transpose2d_rows`, one chunk's columns at a time
  where :func:`lipbound.ops.conv_transpose.chunk_rows` says so), the
  window crops and their padding, the diagonal scales on windows, the fully connected layers'
  transposed copy and ``|W|``, the pooling centre's gathered entries;
* each boundary where norms are taken: the rows on the boundary's columns (dense, ``R x n``:
  the windows are scattered or gathered, with their ``int64`` indices), the negated rows
  rebuilt (``_Mirror``), the scaled rows and their error bound, the Gram matrix of the
  spectral norm (``min(R, n)^2``) and the eigensolver's copy of it, or the per-row norms;
* what stays formed across sweeps: the pooling seed rows, the identity of the outputs, the
  start of the current sweep (held by its caller), and the secants' per-unit tensors.

Coefficients are counted per step with some slack (a transient counted as alive through the
whole step), never below the tensors the step holds at once. ``tests/test_tight_memory.py``
compares the estimate with the bytes the construction really allocates (the CPU allocator's
events under :mod:`torch.profiler`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import AffineBlock, Block, PoolBlock
from .ops.conv import ConvOp
from .ops.conv_transpose import chunk_rows
from .ops.linear import LinearOp

F8 = 8
"""Bytes of a float64 (or int64) entry."""

SLACK = 1 << 20
"""Bytes added for the small tensors of the construction (scalars, index vectors, caches)."""

MARGIN = 1.1
"""Headroom on the whole estimate (allocations the model does not follow tensor by tensor:
the allocator's rounding, library workspaces). Measured on CPU (``tests/test_tight_memory.py``,
the peak of the bytes allocated under :mod:`torch.profiler`; ``notes/tightness_spike.md``
section 7), the estimate with it was 1.11-2.0 times the peak on CIFAR-10 and 1.12-1.83 on
random conv / pooling nets where the rows dominate: at least 1.01 without it. Not covered:
rows made dense by a padded max pooling, where the estimate came to 0.98 of the peak on a
small net with two padded pools (session 20; the cap only decides whether to form). On CUDA
the convolutions do not unfold the whole batch: the estimate is larger than needed there."""


def grid(shape) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of a spatial shape, None for others."""
    return tuple(int(s) for s in shape) if len(shape) == 3 else None  # type: ignore[return-value]


def local_conv(b: Block) -> bool:
    """Whether rows at the block's output can be pulled back on their windows: a convolution
    without an output scale between grids (diagonal scales allowed)."""
    if not isinstance(b, AffineBlock):
        return False
    m = b.mixing
    return (isinstance(m, ConvOp) and m.out_scale is None
            and grid(b.out_shape) is not None and grid(b.in_shape) is not None
            and tuple(m.in_shape) == tuple(b.in_shape)
            and tuple(m.out_shape) == tuple(b.out_shape))


def hybrid_starts(start: int, tail_starts: int, n_blocks: int) -> range:
    """The boundaries ``j > 0`` where the hybrid ``F_0 ... F_(j-1) B_j(M_j)`` is formed: from
    ``start`` (the earliest whose tail fits; 0: the whole network, ``B_0`` itself, is the first
    of the ``tail_starts`` tried) up to ``tail_starts`` of them."""
    return range(max(start, 1), min(start + tail_starts, n_blocks))


def local_pool(b: PoolBlock) -> bool:
    """Whether rows at a max pooling block's output can be pulled back on their windows
    (:func:`lipbound.tight._pool_local`): spatial grids, no padding, and no window past the
    border (``ceil_mode`` windows cut by it are left to the dense step, where their missing
    members are no index at all)."""
    op = b.op
    g_in, g_out = grid(b.in_shape), grid(b.out_shape)
    if g_in is None or g_out is None or tuple(op.padding) != (0, 0):
        return False
    (s1, s2), (kh, kw), (d1, d2) = op.stride, op.kernel, op.dilation
    return ((g_out[1] - 1) * s1 + d1 * (kh - 1) + 1 <= g_in[1]
            and (g_out[2] - 1) * s2 + d2 * (kw - 1) + 1 <= g_in[2])


@dataclass(frozen=True)
class SecantSize:
    """What the estimate needs of an unstable secant (:class:`lipbound.tight._Secant`).

    ``kind``: ``"relu"`` or ``"pool"``; ``rows``: its deviation rows; ``cols``: the outputs
    that can deviate (the columns of the boundary after it); pooling only: ``seed`` the window
    size ``(h, w)`` of its seed rows (None: dense, where ``_seed_windows`` declines),
    ``pairs`` the two-winner windows (the second row of each is rebuilt by negation, not
    pulled back), ``taps`` the nonzeros of its centre (``len(out_idx)``)."""

    kind: str
    rows: int
    cols: int
    seed: tuple[int, int] | None = None
    pairs: int = 0
    taps: int = 0


# A row set's place: (window, channels, h, w) on windows of its grid, (False, n, 1, 1) dense.
_Place = tuple[bool, int, int, int]


def _per_row(p: _Place) -> int:
    return p[1] * p[2] * p[3]


def _dense(n: int) -> _Place:
    return (False, int(n), 1, 1)


def _conv_geometry(m: ConvOp) -> tuple[int, int, int, int, int, int, int, int]:
    kh, kw = (int(k) for k in m.weight.shape[-2:])
    (s1, s2), (p1, p2), (d1, d2) = m.stride, m.padding, m.dilation
    return kh, kw, int(s1), int(s2), int(p1), int(p2), int(d1), int(d2)


def _conv_columns(m: ConvOp, rows: int, transpose: bool = False) -> int:
    """Entries of the CPU convolutions' unfolded input for ``rows`` rows through ``m``'s
    transpose: ``conv_transpose2d`` unfolds to ``C_in kh kw x (its input's pixels)``,
    ``conv2d`` (the flipped kernel, stride 1: :meth:`lipbound.ops.conv.ConvOp.lin_t` where
    it pays) to ``C_out kh kw x (C_in's grid pixels)``. ``transpose``: ``conv_transpose2d``
    in any case (``abs_lin_t``)."""
    kh, kw = (int(k) for k in m.weight.shape[-2:])
    c_out, ho, wo = (int(s) for s in m.out_shape)
    c_in, hi, wi = (int(s) for s in m.in_shape)
    flip = not transpose and getattr(m, "_use_flip", True)
    return rows * kh * kw * (c_out * hi * wi if flip else c_in * ho * wo)


def _window_columns(m: ConvOp, r: int, c_o: int, h: int, w: int, per_out: int) -> int:
    """Entries of the columns of :func:`lipbound.ops.conv_transpose.conv_transpose2d_rows`
    for ``r`` rows of ``c_o x h x w`` through ``m``'s transpose (no padding; ``per_out``: one
    row's output), besides the output: torch's ``conv_transpose2d`` unfolds the whole batch
    (``C_in kh kw`` per input pixel); the chunks hold up to three copies of one chunk's
    columns at once (the product's result, its reordering, the fold's; measured: two without
    groups, three with), its fold's output and a copy of its rows."""
    kh, kw = (int(k) for k in m.weight.shape[-2:])
    per = m.groups * int(m.weight.shape[1]) * kh * kw * h * w
    chunk = chunk_rows(r, (h, w), tuple(m.weight.shape), m.groups, m.weight.device,
                       torch.float64)
    if not chunk:
        return r * per
    return chunk * (3 * per + per_out + c_o * h * w)


def _local_step(b: Block, p: _Place, r: int, centre: bool) -> tuple[_Place, int] | None:
    """The place of ``r`` rows on windows after one backward step through ``b`` and the
    step's peak (entries), or None where the block is not handled on windows."""
    _, c_o, h, w = p
    so = r * c_o * h * w
    if isinstance(b, PoolBlock):
        op = b.op
        g_in = grid(b.in_shape)
        if g_in is None or not local_pool(b):
            return None
        (s1, s2), (kh, kw), (d1, d2) = op.stride, op.kernel, op.dilation
        hi, wi = (h - 1) * s1 + d1 * (kh - 1) + 1, (w - 1) * s2 + d2 * (kw - 1) + 1
        if hi > g_in[1] or wi > g_in[2]:
            return None
        sn = r * g_in[0] * hi * wi
        # received rows and error bound, the divisors, q, eq and their terms; out, err and
        # the last step's two products
        return (True, g_in[0], hi, wi), 7 * so + 4 * sn
    if not local_conv(b):
        return None
    m: ConvOp = b.mixing  # type: ignore[assignment]
    g_in = grid(b.in_shape)
    kh, kw, s1, s2, p1, p2, d1, d2 = _conv_geometry(m)
    hi, wi = (h - 1) * s1 + d1 * (kh - 1) + 1, (w - 1) * s2 + d2 * (kw - 1) + 1
    hs, ws = min(hi, g_in[1]), min(wi, g_in[2])
    c_i = g_in[0]
    sn, sf = r * c_i * hs * ws, r * c_i * hi * wi
    cols = _window_columns(m, r, c_o, h, w, c_i * hi * wi)
    if hs == hi and ws == wi and p1 == 0 and p2 == 0:
        conv = sf + cols  # (no crop)
    else:  # the crop: padded (by at most the padding per side), gathered, made contiguous
        pad = r * c_i * (hi + 2 * p1) * (wi + 2 * p2) if (p1 or p2) else 0
        conv = sf + max(cols, pad + 2 * sn)
    if m.groups > 1:
        conv += sf + so  # (per-group slices and outputs)
    held_o = 2 + (4 if centre and b.relu else 1) + (4 if b.s_out is not None else 0)
    held_n = 1 + (2 if b.s_in is not None else 0)
    return (True, c_i, hs, ws), held_o * so + held_n * sn + conv


def _dense_step(b: Block, r: int, centre: bool, taps: int) -> int:
    """The peak (entries) of :func:`lipbound.tight._back` on ``r`` dense rows."""
    so, sn = r * b.out_dim, r * b.in_dim
    if isinstance(b, PoolBlock):
        # received rows and error bound; gathered entries (values, error terms and their
        # temporaries); out, err and the last step's two products
        return 2 * so + 4 * r * taps + 4 * sn
    m = b.mixing
    so_s = so if b.s_out is not None else 0
    sn_s = sn if b.s_in is not None else 0
    err = isinstance(m, LinearOp) and m.err is not None
    # the products' internals: A^T (lin_t) and |A|^T (abs_lin_t) of the rows
    if isinstance(m, ConvOp):
        scaled = so if m.out_scale is not None else 0
        lin = _conv_columns(m, r) + scaled
        abs_ = _conv_columns(m, r, transpose=True) + scaled + int(m.weight.numel())
    elif isinstance(m, LinearOp):
        w = int(m.weight.numel())
        lin = so + 2 * sn  # the rows transposed, the product and its transpose
        abs_ = w if w <= 4_000_000 else 512 * b.in_dim + 2 * sn  # |W| (in slices when big)
    elif m is not None:  # (other ops: copies of the rows and products, and a matrix)
        extra = sum(int(t.numel()) for t in (getattr(m, "weight", None),
                                             getattr(m, "pmat", None)) if t is not None)
        lin = abs_ = 2 * so + 2 * sn + extra
    else:
        lin = abs_ = 0
    # received rows and error bound (held by the caller), and the centred ones
    base = 2 * so + (2 * so if centre and b.relu else 0)
    phases = [
        so,  # the centring's magnitudes
        so_s + lin + sn + sn_s,  # out = A^T rows (scaled before and after)
        # out, |rows| (then the error bound's terms in place), the stored product's error term
        sn + so + ((2 * so + so_s + 2 * sn) if err else 0),
        sn + so + (sn if err else 0) + 2 * so_s + abs_ + sn + sn_s,  # |A|^T of the terms
        sn + so + (sn if err else 0) + 2 * sn,  # the sum with the product's error term
    ]
    return base + max(phases)


def _step(b: Block, p: _Place, r: int, centre: bool, taps: int, on_grid: bool
          ) -> tuple[_Place, int]:
    """The place after one backward step and its peak (entries), the received rows
    included. ``on_grid``: rows on windows are on ``b``'s output grid (``_back_local``'s
    check; else they go on densely)."""
    if p[0]:
        got = _local_step(b, p, r, centre) if on_grid else None
        if got is not None:
            return got
        # the dense rows scattered from the windows (with their indices); the windows stay
        # held by the caller through the dense step
        win = r * _per_row(p)
        d = r * b.out_dim
        peak = 2 * win + max(2 * d + 3 * win, _dense_step(b, r, centre, taps))
        return _dense(b.in_dim), peak
    return _dense(b.in_dim), _dense_step(b, r, centre, taps)


def _columns(p: _Place, dim: int, n: int | None, r_pull: int, r_full: int) -> tuple[int, int]:
    """The peak (entries) of taking the rows (``r_pull`` held, ``r_full`` after rebuilding
    the negated ones) on ``n`` columns of ``dim`` (None: all), and the columns' count."""
    n_c = dim if n is None else n
    if p[0]:
        if n is None:  # scattered on the whole grid (linear indices of the windows)
            peak = r_pull * (2 * dim + 3 * _per_row(p))
        else:  # gathered: int64 rows and columns and indices, the mask, values, selections
            peak = 7 * r_pull * n_c
    else:
        peak = 0 if n is None else 2 * r_pull * n_c
    if r_full != r_pull:  # the negated rows rebuilt (_Mirror)
        r_neg = r_full - r_pull
        peak = max(peak, 2 * r_pull * n_c + max(r_full + 2 * r_neg, 2 * r_full) * n_c)
    return peak, n_c


def _norm(r: int, n: int, scaled: bool, each_row: bool) -> int:
    """The peak (entries) of a norm of ``r`` rows on ``n`` columns (rows and error bound
    included): :func:`lipbound.tight._norm_bound` (``exact_norm``: the scaled copy and the
    Gram matrix of the smaller side, the eigensolver's copy of it) or ``_row_bound``."""
    s = r * n
    if each_row:
        return 4 * s
    g2 = min(r, n) ** 2
    small = 4 * min(r, n) + 64
    if scaled:
        return max(7 * s, 5 * s + 2 * g2 + small, 6 * s + g2)
    return max(5 * s, 3 * s + 2 * g2 + small, 4 * s + g2)


def _lazy_fits(p: _Place, r_pull: int, r_full: int, n: int) -> bool:
    """``lipbound.tight._lazy_fits`` on the replayed place: rows on windows whose windows
    (rows and error bounds of the rows pulled) take at most the gathered ``r_full x n``."""
    return p[0] and n > 0 and 2 * r_pull * _per_row(p) <= r_full * n


def _lazy_norm(p: _Place, r_full: int) -> int:
    """The peak (entries) of ``lipbound.tight._Lazy.bounds`` on the windows: the rows
    with the negated ones rebuilt and their error bounds, the windows' grid indices, the
    scaled rows, the error terms, the mask, and a product's two temporaries."""
    return 8 * r_full * _per_row(p) + 2 * p[1] * 64


def _sweep(blocks: list[Block], secs: list[SecantSize | None], taps: list[int], begin: int,
           p: _Place, r_pull: int, r_full: int, at: list[dict[int, int | None]], stop: int,
           scaled: bool, each_row: bool, lazy: bool = False) -> int:
    """The peak (entries) of one sweep of rows placed at ``p`` at boundary ``begin``, down
    to ``stop``: the held rows, each step, the norms at the boundaries in ``at`` (each a
    dict boundary -> column count, None: all), taken one after the other. ``lazy``: the
    deferred norms (``at[1]``'s, and the input's where ``at[1]`` has any) whose windows take
    at most the gathered matrix's entries are held on them (:class:`lipbound.tight._Lazy`):
    only the bounds' temporaries are counted there (:func:`_lazy_norm`)."""
    peak = 0
    k = begin
    while True:
        held = 2 * r_pull * _per_row(p)
        dim = blocks[k].in_dim if k < len(blocks) else blocks[-1].out_dim
        # the norms at one boundary are taken in turn: the rows on the last one's columns
        # stay (names of the sweep) until the next step's rows replace them
        kept = 0
        for i, cs in enumerate(at):
            if k in cs:
                n_c = dim if cs[k] is None else cs[k]
                if lazy and scaled and not each_row and (i == 1 or (k == 0 and at[1])) and \
                        _lazy_fits(p, r_pull, r_full, n_c):
                    peak = max(peak, held + kept + _lazy_norm(p, r_full))
                    continue
                ext, n_c = _columns(p, dim, cs[k], r_pull, r_full)
                peak = max(peak, held + kept + max(ext, _norm(r_full, n_c, scaled, each_row)))
                kept = 2 * r_full * n_c
        if k <= stop:
            return peak
        b = blocks[k - 1]
        on = p[0] and grid(b.out_shape) is not None and \
            grid(b.out_shape) == grid(blocks[k].in_shape)
        p, step = _step(b, p, r_pull, True, taps[k - 1], on)
        # the new rows' checks: magnitudes, a mask and a selection of the rows, then of the
        # error bound
        peak = max(peak, kept + step, 5 * r_pull * _per_row(p))
        k -= 1


def fixed_bytes(blocks: list[Block], taps: list[int]) -> int:
    """Bytes of the secants' per-unit tensors (centres, half-widths, boxes, masks, the
    pooling centres and windows), those kept and the largest block's temporaries."""
    kept = 0
    top = 0
    for b, tp in zip(blocks, taps, strict=True):
        kept += 8 * b.out_dim + 4 * b.in_dim + 4 * tp
        if isinstance(b, PoolBlock):
            kh, kw = b.op.kernel
            kept += kh * kw * b.out_dim // 8 + b.out_dim
        elif isinstance(b.mixing, LinearOp):  # the transposed copy its products keep
            kept += int(b.mixing.weight.numel())
        top = max(top, 12 * (b.in_dim + b.out_dim) + 12 * tp)
    return F8 * (kept + top)


def mib(n: int) -> str:
    """``n`` bytes in MiB, for messages (a decimal below 100 MiB)."""
    x = n / 2**20
    return f"{x:.1f} MiB" if x < 100 else f"{x:.0f} MiB"


def seed_bytes(b: PoolBlock, s: SecantSize) -> int:
    """Bytes of a pooling secant's seed rows (and the indices that form them): on windows
    (rows and their zero error bound) or dense."""
    c = grid(b.in_shape)
    per = c[0] * s.seed[0] * s.seed[1] if (s.seed is not None and c is not None) else b.in_dim
    return F8 * (2 * s.rows * per + 6 * s.taps)


def peak_bytes(blocks: list[Block], secs: list[SecantSize | None], taps: list[int],
               lives: list[int | None], start: int, tail_starts: int,
               each_row: bool = False, lazy: bool = False) -> int:
    """An upper estimate of the bytes the construction from boundary ``start`` allocates at
    its peak (see the module docstring).

    Args:
        blocks: the analyzer's blocks (a chain).
        secs: per block, its unstable secant's sizes (None: stable or not a ReLU / pooling).
        taps: per block, the nonzeros of a pooling centre (0 for other blocks).
        lives: per boundary ``k`` (``0..K``), the coordinates that may move there (None: all).
        start: the boundary the construction starts at (0: the whole network).
        tail_starts: the boundaries tried from ``start`` (:func:`hybrid_starts`).
        each_row: the output rows' norms are taken per row (the margin certificate).
        lazy: the deferred norms are held on windows where they fit (:class:`lipbound.tight.
            _Lazy`; with :func:`deferred_bytes` ``lazy=True``, which counts their
            formation): their matrices are not gathered in the sweeps.
    """
    n_blocks = len(blocks)
    n_out = blocks[-1].out_dim
    unstable = [t for t in range(start, n_blocks) if secs[t] is not None and secs[t].rows]
    cols: dict[int, int | None] = {0: None} if start == 0 else {}
    for t in unstable:
        if t + 1 < n_blocks:
            cols[t + 1] = secs[t].cols
    mcols: dict[int, int | None] = {j: lives[j] for j in hybrid_starts(start, tail_starts,
                                                                        n_blocks)}
    at = [cols, mcols]
    stop = min([*cols, *mcols])
    seeds = sum(seed_bytes(blocks[t], secs[t]) // F8 for t in unstable
                if secs[t].kind == "pool")
    # the outputs' identity (kept) and its zero error bound, swept back densely
    out = n_out * n_out + _sweep(blocks, secs, taps, n_blocks, _dense(n_out), n_out, n_out,
                                 at, stop, False, each_row)
    worst = out
    prev = 0  # the previous sweep's start, held until the next one's is formed
    stale = 0  # a dense one-hot seed of an earlier ReLU (its name outlives its sweep)
    for t in unstable:
        s, b = secs[t], blocks[t]
        if s.kind == "relu":
            g = grid(b.out_shape)
            p0 = (True, g[0], 1, 1) if g is not None else _dense(b.out_dim)
            dense_seed = 0 if g is not None else s.rows * b.out_dim
            p, first = _step(b, p0, s.rows, False, taps[t], True)
            first = max(first, 5 * s.rows * _per_row(p))  # (the first step's check)
            start_rows = 2 * s.rows * _per_row(p) + dense_seed
            r_pull = r_full = s.rows
            begin_extra = start_rows
        else:
            g = grid(b.in_shape)
            p = (True, g[0], *s.seed) if (s.seed is not None and g is not None) else \
                _dense(b.in_dim)
            per = _per_row(p)
            r_full = s.rows
            r_pull = s.rows - s.pairs
            first = 2 * s.rows * per  # (the negation test on the seeds)
            # the kept rows' copies (with negated rows), the dense seeds' zero error bound
            begin_extra = (2 * r_pull * per if s.pairs else 0) + (0 if p[0] else
                                                                  s.rows * per)
            dense_seed = 0
            start_rows = begin_extra
        sweep = _sweep(blocks, secs, taps, t, p, r_pull, r_full, at, stop, True, False, lazy)
        worst = max(worst, stale + max(prev + first, sweep + begin_extra))
        prev = start_rows
        stale = max(stale, dense_seed)
    return int(MARGIN * (F8 * (n_out * n_out + seeds + worst) + fixed_bytes(blocks, taps))
               ) + SLACK


def _start_place(blocks: list[Block], secs: list[SecantSize | None], taps: list[int],
                 t: int) -> tuple[int, _Place, int, int]:
    """Where unstable secant ``t``'s rows are at the start of their sweep (as
    :func:`peak_bytes` replays it): the boundary, the place, the rows pulled and the rows
    after rebuilding the negated ones."""
    s, b = secs[t], blocks[t]
    if s.kind == "relu":
        g = grid(b.out_shape)
        p0 = (True, g[0], 1, 1) if g is not None else _dense(b.out_dim)
        p, _ = _step(b, p0, s.rows, False, taps[t], True)
        return t, p, s.rows, s.rows
    g = grid(b.in_shape)
    p = (True, g[0], *s.seed) if (s.seed is not None and g is not None) else _dense(b.in_dim)
    return t, p, s.rows - s.pairs, s.rows


def deferred_bytes(blocks: list[Block], secs: list[SecantSize | None],
                   lives: list[int | None], start: int, tail_starts: int,
                   taps: list[int] | None = None) -> int:
    """The bytes the deferred norms of the construction from ``start`` hold (every one at
    once: :class:`lipbound.tight._Deferred`, the scaled deviation rows of each unstable
    secant ``t`` on the columns that may move at each hybrid boundary ``j <= t``, and on the
    input's for the whole network where hybrids compete with it), with the margin of
    :func:`peak_bytes`; on top of its estimate. Arguments as there (``taps``: None, every
    matrix counted gathered). With ``taps``, a norm whose rows are on windows that take at
    most the gathered matrix's entries (rows and error bounds, the rows pulled) is counted
    as those windows: :class:`lipbound.tight._Lazy` holds them instead (session 22; the
    same decision, :func:`_lazy_fits`, on the window sizes replayed as :func:`peak_bytes`
    does), plus the largest formation of one of them (gathered, scaled, its norm: formed
    after the sweeps, with every deferred norm held)."""
    n_blocks = len(blocks)
    entries = form = 0
    hybrids = hybrid_starts(start, tail_starts, n_blocks)
    for t in range(start, n_blocks):
        s = secs[t]
        if s is None or not s.rows:
            continue
        at: dict[int, int] = {}
        if start == 0 and len(hybrids):  # (the whole network's, at the input)
            at[0] = blocks[0].in_dim
        for j in hybrids:
            if j <= t:
                at[j] = lives[j] if lives[j] is not None else blocks[j].in_dim
        if not at:
            continue
        places: dict[int, tuple[_Place, int, int]] = {}
        if taps is not None:
            k, p, r_pull, r_full = _start_place(blocks, secs, taps, t)
            while True:
                places[k] = (p, r_pull, r_full)
                if k <= min(at):
                    break
                b = blocks[k - 1]
                on = p[0] and grid(b.out_shape) is not None and \
                    grid(b.out_shape) == grid(blocks[k].in_shape)
                p, _ = _step(b, p, r_pull, True, taps[k - 1], on)
                k -= 1
        for j, n in at.items():
            gathered = s.rows * n
            if j in places and _lazy_fits(*places[j], n):
                p, r_pull, r_full = places[j]
                gathered = 2 * r_pull * _per_row(p)
                # formed later (lipbound.tight._Lazy.matrix): gathered, scaled, the norm
                dim = blocks[j].in_dim
                ext, n_c = _columns(p, dim, None if j == 0 else n, r_pull, r_full)
                form = max(form, max(ext, _norm(r_full, n_c, True, False)))
            entries += gathered
    return int(MARGIN * F8 * (entries + form))
