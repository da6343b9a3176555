"""A tighter local bound: secant centres plus deviations ("centre-plus-deviation").

The paper's local bound (Avant & Morgansen, *Analytical Bounds on the Local Lipschitz Constants
of ReLU Networks*, IEEE TNNLS 2023; method.md rules 1-8, :meth:`lipbound.Analyzer.local_bound`)
is a product of per-layer factors. This module computes a second bound on the same quantity,
under the same event as that product (certified when its factors are), and the analyzer
reports the smaller one (``local_bound(..., tight=True)``). The
derivation and its measurements are in ``notes/tightness_spike.md``; in short:

* **Secants.** For ``x`` in the ball, ``f(x) - f(x0) = Q(x) (x - x0)`` with ``Q(x)`` the
  chain of the fixed affine maps and *secants*: a ReLU unit contributes a slope ``s`` in
  ``[lo, hi]`` (``hi`` = the paper's ``r``; ``lo = y0 / (y0 - ylow)`` for a unit active at x0
  that may turn off, ``1`` for a stably active one, ``0`` otherwise; spike Lemma 1), a max
  pooling window a row ``w`` of the simplex over its possible winners ``P`` (Lemma 2).
* **Centres.** Every secant is a fixed centre plus a deviation: ReLU ``c = (lo + hi) / 2``
  (computed; any fixed ``c`` works) with ``|s - c| <= rho``; a pooling window with ``|P| > 1``
  the mean ``1_P / p`` with ``|(w - 1_P/p)^T v| <= sqrt(1 - 1/p) ||(I - 11^T/p) v_P||``;
  stable units and windows have no deviation.
* **Telescoping** (Lemma 3) with support-restricted, nested tails: for a boundary ``j`` and
  columns ``cols`` (all at the input, else the rows where the secant before ``j`` deviates),
  ``B_j = ||N_(j->K) I_cols|| + sum_(t >= j) B_(t+1) dev_t(N_(j->t) I_cols)`` bounds the
  secant product from ``j`` to the output on vectors supported on ``cols``, ``N`` being the
  centre network. So does the paper's product of the layer factors after ``j`` (when
  certified); each ``B_j`` is the smaller one, and ``B_0`` bounds the local constant.
* **Hybrid** (when the rows of the whole network exceed their budget): for a boundary ``j``,
  the paper's argument bounds the change there, ``||z_j(x) - z_j(x0)|| <= F_0 ... F_(j-1)
  ||x - x0||`` (its factors, the head), and that change is supported on the coordinates
  ``M_j`` that may move; the tail from ``j`` is the secant product of the blocks ``>= j``
  applied to it, bounded by ``B_j`` with columns ``M_j``. So ``F_0 ... F_(j-1) B_j(M_j)``
  bounds the local constant too, with only the tail's rows (see :func:`tight_local_bound`).

Every norm is of a matrix whose rows come out of batched vector-Jacobian products through the
centre network: the output rows (``n_out``) and the deviation rows of each unstable secant,
one backward sweep each. They are computed in float64 and bounded rigorously: an entrywise
bound ``E`` on ``|Ĝ - G|`` is carried backwards next to the rows (``|A|^T`` applied to the
error and ``γ_n`` times the rows' magnitudes, the stored rounding bound of a product of layers,
folded layers' scale uncertainty, the correctly rounded divisions of the pooling centre, an
absolute term for products below the normal range, at least :data:`ERR_FLOOR`), and
``||G|| <= exact_norm(Ĝ) + ||E||_F``
(:func:`lipbound.spectral.exact_norm` is certified). The ReLU limits are those of the exact
network (the nominal pass's rounding ``e_out`` included, mirror image of the library's
``ȳ``), the half-widths are rounded up and the sums of the bound too. Where a quantity is
non-finite or outside ``[1e-150, 1e150]`` (where float64 squares and products underflow or
overflow), where even the last block's rows exceed their budget, or for layers not handled
(a max pooling window entirely in the padding), no new bound is formed and the reason is
returned.

A deviation row is carried on a window of its grid (``_Local``: exactly zero outside, for the
exact and the computed row alike, so its error bound is 0 there) that grows by a kernel at
each step, and a two-winner pooling window's second row, the first's negation, is rebuilt by
negation (``_Mirror``) instead of being pulled back. The memory cap (``max_bytes``) is checked
against an estimate of the construction's peak made before any row is formed
(:mod:`lipbound.tight_memory`: windowed sizes where the rows are on windows, dense where they
are dense, with the steps' temporaries and the norms' matrices).

The deviation norms of the candidates that compete (the hybrids' boundaries; the whole
network's at the input, where hybrids compete with it) are deferred (:class:`_Deferred`):
each is formed only where its candidate may be the smallest (a lower bound on the norm, from
power iterations, bounds the candidate from below: every step is monotone in the norms); the
result is the same bits as with every norm formed. Their matrices are held (within the cap, with the
estimate: :func:`lipbound.tight_memory.deferred_bytes`) until the candidates are compared: as
their rows' windows where those are smaller (:class:`_Lazy`: the lower and upper bounds come
from the windows, the matrix is gathered only where the norm is formed), else gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import AffineBlock, Block, PoolBlock
from .ops.base import UNDERFLOW, DiagOp, gamma, norm_up, product_up, safe_norm
from .ops.conv import ConvOp
from .ops.conv_transpose import conv_transpose2d_rows
from .ops.linear import LinearOp
from .results import Guarantee
from .spectral import SAFETY, SpectralBound, exact_norm
from .tight_memory import SecantSize, deferred_bytes, hybrid_starts, mib, peak_bytes, seed_bytes
from .tight_memory import grid as _grid
from .tight_memory import local_conv as _local_conv
from .tight_memory import local_pool as _local_pool

U = 2.0 ** -53
"""Unit roundoff of float64."""

SAFE_LOW = 1e-150
"""Nonzero magnitudes below this are refused (their squares or products could underflow)."""

SAFE_HIGH = 1e150
"""Magnitudes above this are refused (their squares or products could overflow)."""

DEFAULT_ROWS = 2048
"""Default budget of vector-Jacobian rows (outputs plus deviation rows of unstable secants)."""

DEFAULT_BYTES = 1 << 30
"""Default memory cap of the construction, in bytes: the estimate of its peak
(:func:`lipbound.tight_memory.peak_bytes`: the rows and their error bounds, on windows where
they are, the backward steps' temporaries, the norms' matrices), made before any row is
formed."""


ERR_FLOOR = 2.0 ** -800
"""The least absolute term of the rows' error bounds (:func:`_absolute`). A product below the
normal range rounds absolutely (by up to ``2^-1075``), which ``k 2^-1074`` bounds for ``k``
such products; any larger term bounds it too. This one is a normal number, and so is its
product with one factor above ``2^-222`` (a weight, a centre): float64 arithmetic on subnormal
numbers is slow on Intel CPUs (an assist per operation); smaller factors can still give
subnormal terms (speed only, never the bound). Carried through ``|W|`` by rows that are 0,
it grows like ``|W|``'s products: with weights near ``2^400`` per layer (session 21's review,
``tests/test_tight_floor_and_chunks.py``) the tight bound is then no smaller than the paper's
product, which is reported (sound, no longer tighter); up to ``2^300`` the values are the
same. With ``k 2^-1074`` the error bounds of the rows' zero entries were subnormal
(94 % of the entries on CIFAR-10's rows, 93 % of which are 0), and their transposed
convolution by ``|W|`` took 2080 ms against 79 ms for the rows themselves (session 21, Intel
Xeon, one thread: CIFAR-10's tight bound at eps 1e-3 took 7.3 s, 1.68 s with this floor, the
same value; MNIST at eps 1e-3 / 1e-2 / 0.1 33 / 51 / 189 ms, with it and the chunked
transposed convolutions 15 / 26 / 84 ms). Its size is ``1.5e-241``: the norms of the error
bounds it adds are far below the smallest bound formed (:data:`SAFE_LOW`, ``1e-150``)."""


def _absolute(k: float) -> float:
    """The absolute term of ``k`` products' rounding below the normal range, ``k 2^-1074``,
    raised to :data:`ERR_FLOOR` (a larger allowance: still a bound)."""
    return max(k * UNDERFLOW, ERR_FLOOR)


class _Fallback(Exception):
    """The new bound is not formed; the message says why."""


def _up(x: float) -> float:
    """``x`` rounded up past the rounding of the operation that produced it (a few ulps)."""
    if x == 0.0 or math.isinf(x):
        return x
    return math.nextafter(x * (1.0 + 4.0 * U), math.inf)


def _check_tensor(t: Tensor, what: str, nonzero_low: bool = True) -> None:
    """Fallback when ``t`` has a non-finite entry, a magnitude above :data:`SAFE_HIGH` or (with
    ``nonzero_low``) a nonzero magnitude below :data:`SAFE_LOW`."""
    if t.numel() == 0:
        return
    a = t.abs()
    top = float(a.max())
    if not math.isfinite(top) or top > SAFE_HIGH:
        raise _Fallback(f"{what} has a magnitude {top:.3g} outside the safe range [1e-150, "
                        "1e150]")
    if nonzero_low:
        low = float(torch.where(a > 0, a, math.inf).min())
        if low < SAFE_LOW:
            raise _Fallback(f"{what} has a nonzero magnitude {low:.3g} below 1e-150")


@dataclass
class _Secant:
    """The secant set of one block. ReLU: centre ``c`` and half-widths ``rho`` (per output);
    pooling: the centre as a sparse list (``out_idx``, ``in_idx``, ``div``: weight ``1/div``)
    and the deviation seeds (rows of ``p e_l - 1_P`` at the pooling input, scaled by
    ``scale``). ``sigma``: the outputs that can deviate (sorted indices)."""

    kind: str
    sigma: Tensor
    c: Tensor | None = None
    rho: Tensor | None = None
    out_idx: Tensor | None = None
    in_idx: Tensor | None = None
    div: Tensor | None = None
    count: int = 1
    seeds: Tensor | None = None
    scale: Tensor | None = None
    taps: tuple[Tensor, Tensor] | None = None
    local: _Local | None = None
    """The deviation rows on windows of the pooling input (then ``seeds`` is None)."""
    n_dev: int = 0
    """Pooling: the number of deviation rows (also when they were not formed)."""
    live: Tensor | None = None
    """The outputs that may move on the ball (sorted indices; None: all of them)."""
    seed_hw: tuple[int, int] | None = None
    """Pooling: the window size of the deviation rows' seeds (None: dense; what
    :func:`_seed_windows` makes of them), known before they are formed."""
    pairs: int = 0
    """Pooling: the unstable windows with two possible winners (each one's second row is the
    first's negation, rebuilt instead of pulled back)."""

    def size(self) -> SecantSize:
        """What :func:`lipbound.tight_memory.peak_bytes` needs of this secant."""
        if self.kind == "relu":
            return SecantSize("relu", self.rows, self.rows)
        return SecantSize("pool", self.rows, int(self.sigma.numel()), self.seed_hw,
                          self.pairs, int(self.out_idx.numel()))

    @property
    def rows(self) -> int:
        """Deviation rows of this secant."""
        if self.kind == "relu":
            return int(self.sigma.numel())
        return self.n_dev


def _windows(b: PoolBlock, device) -> Tensor:
    """``(n_windows, k)`` flat input indices of each window of a max pooling block, in the
    order of the flat output, its members in the kernel's row-major order. A member in the
    padding (or past the border, for a ``ceil_mode`` window) is ``b.in_dim``, an index past
    every input: callers extend their vectors by one entry there that never wins (``-inf``,
    as torch's padding) and never moves. Every window has an input member (windows entirely
    in the padding are refused by the layer's rule; a fallback here otherwise)."""
    op = b.op
    shape = tuple(op.in_shape)
    if len(shape) < 2 or len(tuple(op.out_shape)) < 2:
        raise _Fallback(f"max pooling {op.name}: input without a spatial grid")
    h, w = shape[-2:]
    ho, wo = tuple(op.out_shape)[-2:]
    lead = math.prod(shape[:-2])
    (kh, kw), (s1, s2) = op.kernel, op.stride
    (p1, p2), (d1, d2) = op.padding, op.dilation

    def taps(n_out: int, s: int, p: int, k: int, dl: int, size: int) -> tuple[Tensor, Tensor]:
        at = (torch.arange(n_out, device=device) * s - p)[:, None] + \
            torch.arange(k, device=device)[None, :] * dl
        return at, (at >= 0) & (at < size)

    rows, ok_r = taps(ho, s1, p1, kh, d1, h)
    cols, ok_c = taps(wo, s2, p2, kw, d2, w)
    flat = rows[:, None, :, None] * w + cols[None, :, None, :]  # (ho, wo, kh, kw)
    ok = ok_r[:, None, :, None] & ok_c[None, :, None, :]
    base = torch.arange(lead, device=device) * (h * w)
    idx = base[:, None, None, None, None] + flat[None]
    win = torch.where(ok[None], idx, torch.full_like(idx, b.in_dim)).reshape(lead * ho * wo,
                                                                             kh * kw)
    if win.shape[0] != b.out_dim:
        raise _Fallback(f"max pooling {op.name}: {win.shape[0]} windows for {b.out_dim} "
                        "outputs")
    if bool((win == b.in_dim).all(dim=1).any()):
        raise _Fallback(f"max pooling {op.name} has a window entirely in the padding")
    return win


def _relu_secant(b: AffineBlock, rec: dict) -> tuple[_Secant, Tensor, Tensor]:
    """The ReLU secant of an affine-ReLU block from its recorded limits, and the box
    ``[relu(ylow), relu(ȳ)]`` of its outputs (valid for the exact network on the ball)."""
    y0, e_out, rn, eps_k, r = rec["y0"], rec["e_out"], rec["rn"], rec["eps_k"], rec["r"]
    _check_tensor(y0, f"a pre-activation of {b.name} at x0", nonzero_low=False)
    _check_tensor(e_out, f"the nominal rounding bound of {b.name}", nonzero_low=False)
    _check_tensor(rn, f"a row norm of {b.name}")
    if not (0.0 <= eps_k <= SAFE_HIGH):
        raise _Fallback(f"the radius {eps_k:.3g} at {b.name} is outside the safe range")
    er = eps_k * rn
    if b.fold_factor > 1.0:  # (+ UNDERFLOW: as the library's ȳ, this product's rounding
        er = er * b.fold_factor + UNDERFLOW  # below the normal range; the same ȳ bit for bit)
    _check_tensor(er, f"a pre-activation radius of {b.name}", nonzero_low=False)
    marg = SAFETY * (y0.abs() + er)
    y_lo = y0 - e_out
    ylow = y_lo - er - marg  # the mirror image of the library's ȳ
    ybar = y0 + e_out + er + marg
    # a lower bound on the exact nominal pre-activation
    y0_lo = y_lo - SAFETY * y0.abs()
    frac = y0_lo / (y0_lo - ylow).clamp_min(SAFE_LOW)
    lo = torch.where(ylow > 0, 1.0, torch.where(y0_lo > 0, frac * (1.0 - 1e-12), 0.0))
    lo = torch.minimum(lo.clamp(0.0, 1.0), r)
    hi = r
    c = (lo + hi) / 2
    c = torch.where(c < SAFE_LOW, 0.0, c)  # any fixed centre works; none below the safe range
    rho = torch.maximum(hi - c, c - lo)
    unstable = lo < hi
    rho = torch.where(unstable, (rho * (1.0 + 4.0 * U) + UNDERFLOW).clamp_min(SAFE_LOW), 0.0)
    sigma = torch.nonzero(unstable).reshape(-1)
    # an output with ȳ <= 0 is 0 at every point of the ball (x0 included): it cannot move
    live = torch.nonzero(ybar > 0).reshape(-1)
    return (_Secant("relu", sigma, c=c, rho=rho, live=live), ylow.clamp_min(0.0),
            ybar.clamp_min(0.0))


def _pool_secant(b: PoolBlock, d: Tensor, lo: Tensor, hi: Tensor, used: int, max_rows: int,
                 max_bytes: int, form: bool = True, live_in: Tensor | None = None
                 ) -> tuple[_Secant, Tensor, Tensor]:
    """The max pooling secant from the box ``[lo, hi]`` of its inputs and their mask ``d``,
    and the box of its outputs. Fallback before its deviation rows are formed when, with the
    ``used`` rows before them, they exceed ``max_rows``, or would take over ``max_bytes``
    (:func:`lipbound.tight_memory.seed_bytes`: on windows where :func:`_seed_windows` forms
    them there).
    ``form=False``: the rows are counted (``n_dev``), not formed (nor checked). ``live_in``:
    the inputs that may move (None: all); a window of inputs that cannot move cannot either
    (its ``live`` output)."""
    win = _windows(b, d.device)
    n_w, k = win.shape
    if bool((win == b.in_dim).any()):
        # members in the padding: one more entry that never wins (-inf, as torch pads) and
        # never moves; the box returned below is that of real members (each window has one)
        lo = torch.cat([lo, lo.new_full((1,), -math.inf)])
        hi = torch.cat([hi, hi.new_full((1,), -math.inf)])
        d = torch.cat([d, d.new_zeros(1)])
    best_lo = lo[win].amax(dim=1, keepdim=True)
    poss = hi[win] >= best_lo  # possible winners (Lemma 2)
    moving = d[win].amax(dim=1) > 0
    p = poss.sum(dim=1)
    unstable = moving & (p > 1)
    # stable windows: the one possible winner (a moving window), or any element (a constant
    # window: its inputs do not move, so any row is its secant) but the padding's: there a
    # possible winner (one of the largest lower limits: a real member)
    first = torch.where(poss & moving[:, None], 1, 0).argmax(dim=1)
    rows_w = torch.arange(n_w, device=d.device)
    padded = win[rows_w, first] == b.in_dim
    first = torch.where(padded, poss.to(torch.int8).argmax(dim=1), first)
    st = ~unstable
    out_s, in_s = rows_w[st], win[st, first[st]]
    uw, ul = torch.nonzero(poss & unstable[:, None], as_tuple=True)
    out_u, in_u = uw, win[uw, ul]
    pu = p[uw].to(torch.float64)
    out_idx = torch.cat([out_s, out_u])
    in_idx = torch.cat([in_s, in_u])
    div = torch.cat([torch.ones(out_s.numel(), dtype=torch.float64, device=d.device), pu])
    counts = torch.zeros(b.in_dim, dtype=torch.long, device=d.device)
    counts.index_add_(0, in_idx, torch.ones_like(in_idx))
    count = max(1, int(counts.max()) if counts.numel() else 1)
    sigma = torch.nonzero(unstable).reshape(-1)
    live = None
    if live_in is not None:
        can = torch.zeros(b.in_dim + 1, dtype=torch.bool, device=d.device)  # (+ padding)
        can[live_in] = True
        live = torch.nonzero(can[win].any(dim=1)).reshape(-1)
    seeds = scale = None
    sec = _Secant("pool", sigma, out_idx=out_idx, in_idx=in_idx, div=div, count=count,
                  n_dev=int(uw.numel()), live=live, seed_hw=_seed_size(b, uw, in_u),
                  pairs=int((p[unstable] == 2).sum()))
    if uw.numel() and form:
        # row l of window w: p e_l - 1_P (integers: exact); the deviation is
        # sqrt(1 - 1/p) / p times its image (spike, pooling mean centre)
        m = uw.numel()
        # (checked before the rows are formed: a constant 200 x 200 image gave 640000 rows of
        # 640000 entries, a 1.4 TB allocation that raised instead of falling back)
        if used + m > max_rows:
            raise _Fallback(f"{used + m} rows of vector-Jacobian products, {m} of them "
                            f"deviation rows of the unstable windows of max pooling {b.name}, "
                            f"exceed the budget of {max_rows}")
        need = seed_bytes(b, sec.size())
        if need > max_bytes:
            raise _Fallback(f"the deviation rows of max pooling {b.name} need about "
                            f"{mib(need)} ({'on windows' if sec.seed_hw else 'dense'}), over "
                            f"the cap of {mib(max_bytes)}")
        dev = d.device
        # the other members of the same window: -1 each (the rows of a window are
        # consecutive, uw being sorted: every pair of rows of one window, O(m k) of them)
        pw = p[uw]
        cnt = torch.bincount(uw, minlength=n_w)
        start = torch.cumsum(cnt, 0) - cnt
        ri = torch.repeat_interleave(torch.arange(m, device=dev), pw)
        offs = torch.cumsum(pw, 0) - pw
        ci = start[uw][ri] + (torch.arange(ri.numel(), device=dev) - offs[ri])
        local = _seed_windows(b, m, in_u, pu, ri, in_u[ci])
        if local is None:
            seeds = torch.zeros(m, b.in_dim, dtype=torch.float64, device=dev)
            seeds[torch.arange(m, device=dev), in_u] = pu
            seeds.index_put_((ri, in_u[ci]), torch.full((ri.numel(),), -1.0,
                                                        dtype=torch.float64, device=dev),
                             accumulate=True)
        scale = torch.tensor([math.sqrt((q - 1.0) / q) / q * (1.0 + 1e-14)
                              for q in pu.tolist()], dtype=torch.float64, device=d.device)
    sec.seeds, sec.scale = seeds, scale
    if seeds is None and uw.numel() and form:
        sec.local = local
    return sec, lo[win].amax(dim=1), hi[win].amax(dim=1)


def _seed_size(b: PoolBlock, uw: Tensor, mem: Tensor) -> tuple[int, int] | None:
    """The window size of the pooling deviation rows that :func:`_seed_windows` forms (the
    box of each unstable window's possible winners; a row's window members are its window's),
    None where it would decline; ``uw``, ``mem``: each (unstable window, possible winner)."""
    grid = _grid(b.in_shape)
    if grid is None or uw.numel() == 0:
        return None
    _, hh, ww = grid
    top, bot, left, right = _member_box(uw, mem, int(uw.max()) + 1, hh, ww)
    has = bot >= 0
    fit = _fit_windows(top[has], bot[has], left[has], right[has], hh, ww)
    return None if fit is None else (fit[2], fit[3])


def _member_box(ri: Tensor, mem: Tensor, m: int, hh: int, ww: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top, bottom, left and right grid coordinates of the members ``mem`` (flat indices on
    an ``hh x ww`` grid) of each of ``m`` groups (``ri``: each member's group); a group
    without members gets ``(hh, -1, ww, -1)``."""
    dev = ri.device
    my, mx = (mem % (hh * ww)) // ww, mem % ww
    top = torch.full((m,), hh, dtype=torch.long, device=dev).scatter_reduce(0, ri, my, "amin")
    bot = torch.full((m,), -1, dtype=torch.long, device=dev).scatter_reduce(0, ri, my, "amax")
    left = torch.full((m,), ww, dtype=torch.long, device=dev).scatter_reduce(0, ri, mx, "amin")
    right = torch.full((m,), -1, dtype=torch.long, device=dev).scatter_reduce(0, ri, mx,
                                                                               "amax")
    return top, bot, left, right


def _seed_windows(b: PoolBlock, m: int, own: Tensor, pu: Tensor, ri: Tensor, mem: Tensor
                  ) -> _Local | None:
    """The pooling deviation rows ``p e_own - 1_P`` on windows, exactly what
    :func:`_to_local` makes of the dense rows (the same window size and corners: the box of
    each row's window members, its nonzeros), without forming them densely; None where that
    would decline (no grid, windows over half of it). ``ri``, ``mem``: each (row, member of
    its window) pair."""
    grid = _grid(b.in_shape)
    if grid is None:
        return None
    c_, hh, ww = grid
    dev = own.device
    my, mx = (mem % (hh * ww)) // ww, mem % ww
    top, bot, left, right = _member_box(ri, mem, m, hh, ww)
    fit = _fit_windows(top, bot, left, right, hh, ww)
    if fit is None:
        return None
    r0, c0, hs, ws = fit
    g = torch.zeros(m, c_, hs, ws, dtype=torch.float64, device=dev)
    rem = own % (hh * ww)
    g[torch.arange(m, device=dev), own // (hh * ww), rem // ww - r0, rem % ww - c0] = pu
    g.index_put_((ri, mem // (hh * ww), my - r0[ri], mx - c0[ri]),
                 torch.full((ri.numel(),), -1.0, dtype=torch.float64, device=dev),
                 accumulate=True)
    return _Local(g, torch.zeros_like(g), r0, c0, grid)


def _abs_t(b: AffineBlock, v: Tensor) -> Tensor:
    """``|S_in| |A|^T |S_out| v`` for rows ``v`` (the stored matrix's magnitudes)."""
    if b.mixing is None:
        return v if b.s_in is None else v * b.s_in.abs()
    if b.s_out is not None:
        v = v * b.s_out.abs()
    m = b.mixing
    v = m.abs_lin_t(v.reshape(v.shape[0], *m.out_shape)).reshape(v.shape[0], -1)
    return v if b.s_in is None else v * b.s_in.abs()


def _err_t(b: AffineBlock, v: Tensor) -> Tensor | None:
    """``|S_in| err^T |S_out| v`` for a block whose matrix is a stored product of layers
    (entrywise rounding bound ``err``), None for others."""
    m = b.mixing
    if not isinstance(m, LinearOp) or m.err is None:
        return None
    if b.s_out is not None:
        v = v * b.s_out.abs()
    v = v.reshape(v.shape[0], -1) @ m.err
    return v if b.s_in is None else v * b.s_in.abs()


def _scale_top(b: AffineBlock) -> float:
    """The largest magnitude of the block's diagonal scales (at least 1)."""
    t = 1.0
    for s in (b.s_in, b.s_out):
        if s is not None:
            t = max(t, float(s.abs().max()))
    return t


def _scale_rel(b: AffineBlock) -> float:
    """``f`` with ``|S* - S| <= f |S|`` for the block's exact diagonal scales ``S*`` against the
    stored ``s_in`` / ``s_out``: the folded layers' uncertainty (``fold_factor``) and the
    rounding of the stored scales, which are float64 products of the diagonal layers' scales
    (a product of ``k`` factors is within ``γ_(k-1)`` of the exact one; ``fold_factor`` holds
    that term only when some layer is folded). A stored product that rounded to exactly 1 is
    dropped (``s_in`` None) but still differs from the exact one: the layers are counted."""
    k = sum(isinstance(op, DiagOp) for op in b.ops)
    if k < 2:  # a single layer's scale is stored as it is
        return b.fold_factor - 1.0
    return max(b.fold_factor - 1.0, 4.0 * (k + 1) * U)


def _back(b: Block, sec: _Secant | None, g: Tensor, e: Tensor, centre: bool = True
          ) -> tuple[Tensor, Tensor]:
    """Rows ``g`` (with entrywise error bound ``e`` against the exact rows) at the output of
    block ``b`` pulled back to its input through the block's centre map (``centre=False``:
    through its affine part only). Returns the computed rows and their new error bound."""
    if isinstance(b, PoolBlock):
        vals = g[:, sec.out_idx] / sec.div  # correctly rounded divisions (exact for 1)
        out = g.new_zeros(g.shape[0], b.in_dim).index_add_(1, sec.in_idx, vals)
        gm = gamma(sec.count + 1)
        ev = e[:, sec.out_idx] / sec.div + gm * vals.abs()
        err = g.new_zeros(g.shape[0], b.in_dim).index_add_(1, sec.in_idx, ev)
        return out, err * (1.0 + 2.0 * gamma(sec.count + 8)) + _absolute(sec.count + 4)
    if centre and b.relu:
        g = g * sec.c
        # |fl(ĝ c) - g c| <= |ĝ - g| c + u |ĝ c| (+ an absolute term below the normal range)
        e = (e * sec.c).add_(g.abs(), alpha=2.0 * U).add_(_absolute(2))
    m = b.mixing
    n = 0 if m is None else m.inner_length_t()
    out = b.lin_t(g)
    f = _scale_rel(b)  # the exact scales (folded layers, products of scales) against the stored
    ga = g.abs()
    et = _err_t(b, ga + e)
    # e (1 + f) + (|ĝ| + e) f + γ_(n+4) |ĝ| = e (1 + 2f) + (f + γ_(n+4)) |ĝ|: non-negative
    # terms, whose few roundings the factor 1 + 2γ_(n+10) below covers (in place: these are
    # the biggest tensors of the sweep)
    w = ga.mul_(f + gamma(n + 4)).add_(e, alpha=1.0 + 2.0 * f) if f > 0.0 else \
        ga.mul_(gamma(n + 4)).add_(e)
    del ga
    err = _abs_t(b, w).mul_(1.0 + 2.0 * gamma(n + 10))
    del w
    if et is not None:
        err = err + et * ((1.0 + f) * (1.0 + 2.0 * gamma(b.mixing.out_dim + 10)))
    top = _scale_top(b)
    return out, err.add_(_absolute((n + 8) * top * top))


def _norm_bound(g: Tensor, e: Tensor, cols: Tensor | None, scale: Tensor | None) -> float:
    """An upper bound on ``||diag(scale) G[:, cols]||_2`` for the exact rows ``G`` (computed
    ``g``, entrywise error ``<= e``)."""
    m, en = _norm_parts(g, e, cols, scale)
    return 0.0 if m is None else _up(exact_norm(m) + en)


def _norm_parts(g: Tensor, e: Tensor, cols: Tensor | None, scale: Tensor | None
                ) -> tuple[Tensor | None, float]:
    """The matrix ``M`` whose :func:`lipbound.spectral.exact_norm` plus ``en`` (the norm of
    its error bound) :func:`_norm_bound` returns (rounded up), and ``en``; ``M`` None for an
    empty matrix (norm 0)."""
    if cols is not None:
        g, e = g[:, cols], e[:, cols]
    if g.numel() == 0:
        return None, 0.0
    if scale is not None:
        sc = scale[:, None]
        m = g * sc
        # (e + 2u |g|) s (1 + 4u) + the absolute term, each operation in place in this
        # order: the same roundings as forming each term anew (addition commutes exactly)
        err = g.abs().mul_(2.0 * U).add_(e).mul_(sc).mul_(1.0 + 4.0 * U).add_(_absolute(1))
    else:
        m, err = g, e
    return m, norm_up(err) * (1.0 + 2.0 * gamma(err.numel() + 4))


DEFER_NORMS = True
"""Whether the deviation norms of the candidates that compete (the hybrids' boundaries, and
the whole network's at the input where hybrids compete with it) are deferred
(:class:`_Deferred`: formed only where their candidate may be the smallest; the same results,
bit for bit). False: every norm formed in the sweep (for tests and comparisons). Session 21:
in a tight radius search on the MNIST LeNet the hybrid from the first boundary (conv1's live
units: the largest matrices) was never the smallest and the whole network rarely (18 % of the
evaluations); their norms were two thirds of the norms' time, and the search took 26 % less
time with them deferred."""

LAZY_GATHER = True
"""Whether a deferred norm's matrix stays on its rows' windows until it is formed
(:class:`_Lazy`, where they take at most its memory); False: gathered in the sweep, as in
session 21 (for tests and comparisons). The same results either way, bit for bit."""

LOW_SLACK = 1e-6
"""Relative margin of :func:`_norm_low` below the power iteration's value (far above its
rounding): its bound stays below the exact norm :func:`_norm_bound` would return."""

POWER_STEPS = 3
"""Power iterations of :func:`_norm_low` (from the largest row)."""


def _norm_low(m: Tensor) -> float:
    """A lower bound on ``||M||_2`` (so on :func:`_norm_bound`'s value for ``M``): the Rayleigh
    quotient ``||M v|| / ||v||`` after :data:`POWER_STEPS` power iterations from the largest
    row of ``M`` (scaled by its largest magnitude), :data:`LOW_SLACK` below. Its only use is
    to skip a norm that cannot change a result (:class:`_Deferred`): it is never reported."""
    peak = float(m.abs().max())
    if not (0.0 < peak < math.inf):
        return 0.0
    ms = m / peak
    v = ms[int(torch.linalg.vector_norm(ms, dim=1).argmax())]
    for _ in range(POWER_STEPS):
        v = ms.T @ (ms @ v)
        top = float(v.abs().max())
        if not (0.0 < top < math.inf):
            return 0.0
        v = v / top
    q = float(torch.linalg.vector_norm(ms @ v)) / float(torch.linalg.vector_norm(v))
    return q * peak * (1.0 - LOW_SLACK) if math.isfinite(q) else 0.0


class _Deferred:
    """A norm of a competing candidate's deviation rows (:func:`_norm_bound` of ``m`` with
    error norm ``en``; :data:`DEFER_NORMS`) formed only where a result needs it: ``low`` and
    ``high`` bound the value it would have (``low``: :func:`_norm_low`; ``high``: twice the
    Frobenius norm plus ``en``, above what :func:`lipbound.spectral.exact_norm` returns), both
    raised to :data:`SAFE_LOW` as the value is (:func:`_floor`). :func:`_segments` forms the
    value (:meth:`value`: the same bits as :func:`_norm_bound`, once) unless the candidate
    it enters cannot be the one kept even with ``low``."""

    def __init__(self, m: Tensor | _Lazy, en: float | None) -> None:
        self.m: Tensor | _Lazy | None = m
        self.en = en
        if isinstance(m, _Lazy):
            low, high = m.bounds()
            self.low, self.high = _floor(low), _floor(high)
        else:
            self.low = _floor(_norm_low(m))
            self.high = _floor(2.0 * (norm_up(m) + en))
        self._value: float | None = None

    def value(self) -> float:
        """The norm bound (:func:`_norm_bound`, :func:`_floor`); fallback above the safe
        range, as every norm."""
        if self._value is None:
            m, en = self.m.matrix() if isinstance(self.m, _Lazy) else (self.m, self.en)
            x = _safe_norm(_up(exact_norm(m) + en))  # (m kept if it raises)
            self.m = None
            self._value = _floor(x)
        return self._value


class _Lazy:
    """The matrix of a deferred norm (:class:`_Deferred`), not gathered yet: the rows on
    windows (``rows``: a :class:`_Local`, or a :class:`_Mirror` of one) with their scale,
    on columns ``cols`` (None: all). :meth:`matrix` gathers it (:func:`_columns`,
    :func:`_norm_parts`: the sweep's steps, the same bits); :meth:`bounds` bounds its norm
    bound from the windows without gathering. Used where the windows take at most the
    gathered matrix's memory (:func:`_lazy_fits`): most deferred norms are never formed
    (session 22: 70 % in a tight radius search on the MNIST LeNet), and gathering them (the
    rows' window indices on the boundary's columns, their error bounds and the error matrix)
    was about a third of the search's time."""

    def __init__(self, rows: _Local | _Mirror, cols: Tensor | None, scale: Tensor) -> None:
        self.rows, self.cols, self.scale = rows, cols, scale

    def matrix(self) -> tuple[Tensor, float]:
        """``(M, en)`` of :func:`_norm_parts` for the gathered rows (what the sweep forms)."""
        g, e = _columns(self.rows, self.cols)
        m, en = _norm_parts(g, e, None, self.scale)
        return (g.new_zeros(0, 0), 0.0) if m is None else (m, en)

    def bounds(self) -> tuple[float, float]:
        """A lower and an upper bound on the norm bound that :meth:`matrix` leads to (before
        :func:`_floor`), from the windows.

        Lower: the Rayleigh quotient of :func:`_norm_low` (from the largest row, the same
        number of power iterations, :data:`LOW_SLACK` below), with the products taken on the
        windows: ``M v`` sums each row's window entries times ``v`` there, ``M^T u`` adds the
        rows' windows into the grid. ``M``'s entries (``g s`` on the columns, 0 elsewhere)
        are those :meth:`matrix` forms; only the order of the sums differs, whose rounding
        (relative to ``||M||``, at most ``sqrt(R) γ_n``) is far below :data:`LOW_SLACK`.
        Upper: twice ``||M||_F + ||Err||_F`` (the norm bound is at most ``||M||_2 + ||Err||_F``
        with a few roundings), where ``||Err||_F <= ||(e + 2u|g|) s (1 + 4u)||_F + a
        sqrt(R n)`` (``Err``'s entries are those plus the absolute term ``a`` of
        :func:`_norm_parts`, on ``R x n`` entries; the triangle inequality)."""
        rows = self.rows
        src = neg = None
        if isinstance(rows, _Mirror):
            rows, src, neg = rows.rows, rows.src, rows.neg
        g, e, r0, c0 = rows.g, rows.e, rows.r0, rows.c0
        if src is not None:
            g, e, r0, c0 = g[src], e[src], r0[src], c0[src]
            g[neg] = -g[neg]
        r, c_, h, w = g.shape
        _, hh, ww = rows.grid
        n_grid = c_ * hh * ww
        n = n_grid if self.cols is None else int(self.cols.numel())
        # the grid index of each row's window entries
        at = torch.arange(c_ * h * w, device=g.device)
        base = (at // (h * w)) * (hh * ww) + ((at % (h * w)) // w) * ww + at % w
        idx = base[None, :] + (r0 * ww + c0)[:, None]
        sc = self.scale[:, None, None, None]
        m = (g * sc).reshape(r, -1)
        x = g.abs().mul_(2.0 * U).add_(e).mul_(sc).mul_(1.0 + 4.0 * U).reshape(r, -1)
        if self.cols is not None:
            off = torch.ones(n_grid, dtype=torch.bool, device=g.device)
            off[self.cols] = False
            off = off[idx]
            m.masked_fill_(off, 0.0)
            x.masked_fill_(off, 0.0)
            del off
        a = _absolute(1)
        en_hi = (norm_up(x) + a * math.sqrt(r * n)) * (1.0 + 2.0 * gamma(r * n + 4))
        del x
        high = 2.0 * (norm_up(m) + en_hi)
        peak = float(m.abs().max())
        if not (0.0 < peak < math.inf):
            return 0.0, high
        ms = m.div_(peak)
        flat = idx.reshape(-1)

        def times(v: Tensor) -> Tensor:  # M v (v on the grid)
            return (ms * v[idx]).sum(dim=1)

        top_row = int(torch.linalg.vector_norm(ms, dim=1).argmax())
        v = ms.new_zeros(n_grid).index_put_((idx[top_row],), ms[top_row], accumulate=True)
        for _ in range(POWER_STEPS):
            v = ms.new_zeros(n_grid).index_add_(0, flat, (ms * times(v)[:, None]).reshape(-1))
            top = float(v.abs().max())
            if not (0.0 < top < math.inf):
                return 0.0, high
            v = v / top
        q = float(torch.linalg.vector_norm(times(v))) / float(torch.linalg.vector_norm(v))
        return (q * peak * (1.0 - LOW_SLACK) if math.isfinite(q) else 0.0), high


def _lazy_fits(rows: tuple[Tensor, Tensor] | _Local | _Mirror, cols: Tensor | None) -> bool:
    """Whether a deferred norm's rows are held on windows (:class:`_Lazy`): rows on windows
    whose windows (rows and error bounds) take at most the gathered matrix's memory (so at
    most what :func:`lipbound.tight_memory.deferred_bytes` counts for it)."""
    full = rows.src.numel() if isinstance(rows, _Mirror) else None
    if isinstance(rows, _Mirror):
        rows = rows.rows
    if not isinstance(rows, _Local):
        return False
    r = rows.g.shape[0]
    n = math.prod(rows.grid) if cols is None else int(cols.numel())
    if r == 0 or n == 0:  # (nothing to hold: the gathered path forms no matrix)
        return False
    return 2 * r * math.prod(rows.g.shape[1:]) <= (full or r) * n


def _row_bound(g: Tensor, e: Tensor, cols: Tensor | None) -> list[float]:
    """Per row: an upper bound on ``||G[row, cols]||`` for the exact rows ``G`` (computed
    ``g``, entrywise error ``<= e``)."""
    if cols is not None:
        g, e = g[:, cols], e[:, cols]
    if g.shape[1] == 0:
        return [0.0] * g.shape[0]
    # (power-of-two scaled norms: exact scaling, no underflow of the squares that matter;
    # their rounding is within γ of the column count)
    up = 1.0 + 2.0 * gamma(g.shape[1] + 8)
    v = (safe_norm(g, dim=1) * up + safe_norm(e, dim=1) * up) * (1.0 + 4.0 * U)
    return [_up(x) for x in v.tolist()]


# --- rows on windows of their grid -------------------------------------------------------
# A deviation row starts at one unit (ReLU) or one pooling window and, pulled back through
# convolutions and pooling, stays supported on a window of the spatial grid that grows by a
# kernel at each step: its exact values (and those of the computed rows) are exactly 0
# outside it, so |Ĝ - G| = 0 there and the rows and their error bounds are carried on the
# window alone (``_Local``). Inside the window the steps are those of :func:`_back`, entry
# for entry; a product's terms are summed in another order (the window's convolution), which
# the same bound γ_n covers (it holds for any order).


@dataclass
class _Local:
    """Rows ``g`` and their error bounds ``e``, shaped ``(R, C, h, w)``, each on the window of
    its grid ``(C, H, W)`` whose top-left corner is ``(r0[i], c0[i])`` (the window lies inside
    the grid); the exact rows and the computed ones are 0 outside the window."""

    g: Tensor
    e: Tensor
    r0: Tensor
    c0: Tensor
    grid: tuple[int, int, int]

    def dense(self) -> tuple[Tensor, Tensor]:
        """The rows and error bounds on the whole grid, flat ``(R, C H W)``."""
        return _scatter(self, self.g), _scatter(self, self.e)

    def columns(self, cols: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(g[:, cols], e[:, cols])`` of the rows on the whole grid (all columns: None)."""
        if cols is None:
            return self.dense()
        idx, out = _window_index(self.r0, self.c0, self.g.shape[-2:], self.grid, cols)
        r = self.g.shape[0]
        g = self.g.reshape(r, -1).gather(1, idx).masked_fill_(out, 0.0)
        e = self.e.reshape(r, -1).gather(1, idx).masked_fill_(out, 0.0)
        return g, e


def _window_index(r0: Tensor, c0: Tensor, hw: tuple[int, int], grid: tuple[int, int, int],
                  cols: Tensor) -> tuple[Tensor, Tensor]:
    """For rows on ``h x w`` windows with top-left corners ``(r0, c0)`` of a grid ``(C, H,
    W)``: the flat window index of each grid entry ``cols`` (``(R, len(cols))``; 0 where the
    entry is outside the row's window) and where it is outside (``out``). Formed once per
    distinct corner (rows of a unit's channels or of a pooling window's members share one)
    and copied to the rows; the same entries as computing each row's."""
    c_, hh, ww = grid
    h, w = (int(s) for s in hw)
    r = r0.shape[0]
    code = r0 * ww + c0
    uniq, inv = torch.unique(code, return_inverse=True)
    few = 2 * uniq.numel() <= r
    if few:
        r0, c0 = uniq // ww, uniq % ww
    rem = cols % (hh * ww)
    dy = (rem // ww)[None, :] - r0[:, None]
    dx = (rem % ww)[None, :] - c0[:, None]
    out = (dy < 0) | (dy >= h) | (dx < 0) | (dx >= w)
    idx = dy.mul_(w).add_(dx).add_(((cols // (hh * ww)) * (h * w))[None, :])
    del dx
    idx.masked_fill_(out, 0)
    if few:
        idx, out = idx.index_select(0, inv), out.index_select(0, inv)
    return idx, out


def _crop(t: Tensor, dr: Tensor, dc: Tensor, hs: int, ws: int) -> Tensor:
    """``t[i, :, dr[i]:dr[i]+hs, dc[i]:dc[i]+ws]`` for every row ``i`` of ``t`` (``(R, C, h,
    w)``; ``(1, C, h, w)``: the same tensor for every row), zero where the window leaves
    ``t``."""
    h, w = t.shape[-2:]
    pads = (max(0, -int(dc.min())), max(0, int(dc.max()) + ws - w),
            max(0, -int(dr.min())), max(0, int(dr.max()) + hs - h))
    if any(pads):
        t = F.pad(t, pads)
        dr, dc = dr + pads[2], dc + pads[0]
    ar_h = torch.arange(hs, device=t.device)
    ar_w = torch.arange(ws, device=t.device)
    ri = (dr[:, None] + ar_h)[:, :, None]
    ci = (dc[:, None] + ar_w)[:, None, :]
    n = torch.arange(dr.shape[0], device=t.device) if t.shape[0] > 1 else \
        torch.zeros(dr.shape[0], dtype=torch.long, device=t.device)
    return t[n[:, None, None], :, ri, ci].permute(0, 3, 1, 2).contiguous()


def _scatter(loc: _Local, t: Tensor) -> Tensor:
    """Window values ``t`` (shaped like ``loc.g``) placed on the whole grid, zero elsewhere:
    flat ``(R, C H W)``."""
    c_, hh, ww = loc.grid
    r, _, h, w = t.shape
    out = t.new_zeros(r, c_, hh, ww)
    ri = (loc.r0[:, None] + torch.arange(h, device=t.device))[:, :, None]
    ci = (loc.c0[:, None] + torch.arange(w, device=t.device))[:, None, :]
    n = torch.arange(r, device=t.device)[:, None, None]
    out[n, :, ri, ci] = t.permute(0, 2, 3, 1)
    return out.reshape(r, -1)


def _window(t: Tensor, grid: tuple[int, int, int], loc: _Local) -> Tensor:
    """The values of a flat per-grid-entry tensor ``t`` (a centre, a scale) on each row's
    window: ``(R, C, h, w)``."""
    h, w = loc.g.shape[-2:]
    return _crop(t.reshape(1, *grid), loc.r0, loc.c0, h, w)


def _fit_windows(top: Tensor, bot: Tensor, left: Tensor, right: Tensor, hh: int, ww: int,
                 most: float = 0.5) -> tuple[Tensor, Tensor, int, int] | None:
    """One window size ``(hs, ws)`` holding every row's box ``[top, bot] x [left, right]`` of
    an ``hh x ww`` grid, and each row's top-left corner ``(r0, c0)`` (the window inside the
    grid); None when the windows would cover over ``most`` of the grid."""
    hs, ws = int((bot - top).max()) + 1, int((right - left).max()) + 1
    if hs * ws > most * hh * ww:
        return None
    return top.clamp(max=hh - hs), left.clamp(max=ww - ws), hs, ws


def _to_local(g: Tensor, e: Tensor | None, shape, most: float = 0.5) -> _Local | None:
    """Dense rows ``g`` with error bounds ``e`` (flat, on a grid of ``shape``; None: 0) on the
    smallest common window size that holds every row's nonzeros (those of ``g`` or ``e``:
    outside them the exact rows are 0); None for a shape without a grid or windows over
    ``most`` of its area."""
    grid = _grid(shape)
    if grid is None or g.shape[0] == 0:
        return None
    c_, hh, ww = grid
    nz = ((g != 0) if e is None else (g != 0) | (e != 0)).reshape(g.shape[0], c_, hh, ww)
    nz = nz.any(dim=1)
    rows_nz, cols_nz = nz.any(dim=2), nz.any(dim=1)
    if not bool(rows_nz.any(dim=1).all()):
        return None  # (a zero row: the sweep's check refuses it)
    ar_h = torch.arange(hh, device=g.device)
    ar_w = torch.arange(ww, device=g.device)
    top = torch.where(rows_nz, ar_h, hh).amin(dim=1)
    bot = torch.where(rows_nz, ar_h, -1).amax(dim=1)
    left = torch.where(cols_nz, ar_w, ww).amin(dim=1)
    right = torch.where(cols_nz, ar_w, -1).amax(dim=1)
    fit = _fit_windows(top, bot, left, right, hh, ww, most)
    if fit is None:
        return None
    r0, c0, hs, ws = fit
    gw = _crop(g.reshape(-1, *grid), r0, c0, hs, ws)
    ew = torch.zeros_like(gw) if e is None else _crop(e.reshape(-1, *grid), r0, c0, hs, ws)
    return _Local(gw, ew, r0, c0, grid)


def _one_hot(sigma: Tensor, shape) -> _Local | None:
    """The rows ``e_i`` (``i`` in ``sigma``, flat indices of a grid of ``shape``) on windows
    of one entry (what :func:`_to_local` gives for them); None without a grid."""
    grid = _grid(shape)
    if grid is None:
        return None
    c_, hh, ww = grid
    n = sigma.numel()
    # (the strides _crop leaves on one-entry windows: the same convolution kernels run)
    g = torch.zeros(n, 1, 1, c_, dtype=torch.float64, device=sigma.device).permute(0, 3, 1, 2)
    g[torch.arange(n, device=sigma.device), sigma // (hh * ww), 0, 0] = 1.0
    rem = sigma % (hh * ww)
    return _Local(g, torch.zeros_like(g), rem // ww, rem % ww, grid)


def _regrid(r0: Tensor, hi: int, size: int) -> tuple[Tensor, int]:
    """The window of ``hi`` entries from ``r0`` (which may reach outside ``[0, size)``) cut to
    the grid: the new top-left ``r`` (its offset in the old window is ``r - r0``) and size."""
    hs = min(hi, size)
    return (r0.clamp(0, size - hs)), hs


def _back_local(b: Block, sec: _Secant | None, loc: _Local, centre: bool = True
                ) -> _Local | None:
    """:func:`_back` on windows (the same steps, entry for entry); None where the block is
    not handled on windows (the caller goes on with the dense rows)."""
    if isinstance(b, PoolBlock):
        return _pool_local(b, sec, loc)
    if not _local_conv(b) or _grid(b.out_shape) != loc.grid:
        return None
    m: ConvOp = b.mixing  # type: ignore[assignment]
    g, e = loc.g, loc.e
    ga = None
    if centre and b.relu:
        cw = _window(sec.c, loc.grid, loc)
        g = g * cw
        ga = g.abs()
        e = (e * cw).add_(ga, alpha=2.0 * U).add_(_absolute(2))
    n = m.inner_length_t()
    # the window's transposed convolution (no padding: the whole image of the window), then
    # cut to the input grid (entries outside it belong to the padding: dropped, as A^T does)
    grid_in = _grid(b.in_shape)
    h, w = g.shape[-2:]
    kh, kw = m.weight.shape[-2:]
    (s1, s2), (p1, p2), (d1, d2) = m.stride, m.padding, m.dilation
    hi, wi = (h - 1) * s1 + d1 * (kh - 1) + 1, (w - 1) * s2 + d2 * (kw - 1) + 1
    ro, co = loc.r0 * s1 - p1, loc.c0 * s2 - p2
    r0, hs = _regrid(ro, hi, grid_in[1])
    c0, ws = _regrid(co, wi, grid_in[2])
    new = _Local(g, e, r0, c0, grid_in)

    def conv_t(y: Tensor, weight: Tensor) -> Tensor:
        # (float64 on the CPU: in chunks of rows where that pays, the same products summed
        # within the same γ_n; conv_transpose2d_rows)
        full = conv_transpose2d_rows(y, weight, m.stride, (0, 0), (0, 0), m.groups,
                                     m.dilation)
        if hs == hi and ws == wi and bool((r0 == ro).all()) and bool((c0 == co).all()):
            return full
        return _crop(full, r0 - ro, c0 - co, hs, ws)

    y = g if b.s_out is None else g * _window(b.s_out, loc.grid, loc)
    out = conv_t(y, m.weight)
    if b.s_in is not None:
        out = out * _window(b.s_in, grid_in, _Local(out, out, r0, c0, grid_in))
    f = _scale_rel(b)
    ga = g.abs() if ga is None else ga
    w_ = ga.mul_(f + gamma(n + 4)).add_(e, alpha=1.0 + 2.0 * f) if f > 0.0 else \
        ga.mul_(gamma(n + 4)).add_(e)
    del ga
    if b.s_out is not None:
        w_ = w_ * _window(b.s_out, loc.grid, loc).abs()
    err = conv_t(w_, m.weight.abs())
    if b.s_in is not None:
        err = err * _window(b.s_in, grid_in, _Local(err, err, r0, c0, grid_in)).abs()
    err.mul_(1.0 + 2.0 * gamma(n + 10))
    top = _scale_top(b)
    new.g, new.e = out, err.add_(_absolute((n + 8) * top * top))
    return new


def _pool_taps(b: PoolBlock, sec: _Secant) -> tuple[Tensor, Tensor]:
    """The pooling centre per output entry: ``member`` ``(kh, kw, C, Ho, Wo)`` (whether the
    window's input at each tap has weight ``1 / div``) and ``div`` ``(C, Ho, Wo)`` (1 where
    the window is stable); kept on the secant."""
    if sec.taps is None:
        op = b.op
        c_, hh, ww = _grid(b.in_shape)
        _, ho, wo = _grid(b.out_shape)
        (s1, s2), (kh, kw), (d1, d2) = op.stride, op.kernel, op.dilation
        o, i = sec.out_idx, sec.in_idx
        oy, ox = (o % (ho * wo)) // wo, o % wo
        iy, ix = (i % (hh * ww)) // ww, i % ww
        ky, kx = (iy - oy * s1) // d1, (ix - ox * s2) // d2
        member = torch.zeros(kh, kw, c_ * ho * wo, dtype=torch.bool, device=o.device)
        member[ky, kx, o] = True
        div = torch.ones(c_ * ho * wo, dtype=torch.float64, device=o.device)
        div[o] = sec.div
        sec.taps = (member.reshape(kh, kw, c_, ho, wo), div.reshape(c_, ho, wo))
    return sec.taps


def _pool_local(b: PoolBlock, sec: _Secant, loc: _Local) -> _Local | None:
    """The pooling centre's transpose (:func:`_back`) of rows on windows, tap by tap: the
    input window of the output window's pooling windows (no padding: inside the grid). Each
    input entry sums the same terms as :func:`_back`'s (non-overlapping windows: one)."""
    op = b.op
    grid_in, grid_out = _grid(b.in_shape), _grid(b.out_shape)
    if grid_in is None or grid_out != loc.grid or not _local_pool(b):
        return None
    h, w = loc.g.shape[-2:]
    (s1, s2), (kh, kw), (d1, d2) = op.stride, op.kernel, op.dilation
    hi, wi = (h - 1) * s1 + d1 * (kh - 1) + 1, (w - 1) * s2 + d2 * (kw - 1) + 1
    r0, c0 = loc.r0 * s1, loc.c0 * s2
    if hi > grid_in[1] or wi > grid_in[2] or bool((r0 + hi > grid_in[1]).any()) or \
            bool((c0 + wi > grid_in[2]).any()):
        return None
    member, div = _pool_taps(b, sec)
    dw = _window(div, grid_out, loc)
    q = loc.g / dw  # correctly rounded divisions (exact for 1)
    eq = loc.e / dw + gamma(sec.count + 1) * q.abs()
    out = q.new_zeros(q.shape[0], grid_in[0], hi, wi)
    err = torch.zeros_like(out)
    zero = q.new_zeros(())
    for ky in range(kh):
        for kx in range(kw):
            mk = _window(member[ky, kx], grid_out, loc)
            sl = (slice(None), slice(None), slice(ky * d1, ky * d1 + (h - 1) * s1 + 1, s1),
                  slice(kx * d2, kx * d2 + (w - 1) * s2 + 1, s2))
            out[sl] += torch.where(mk, q, zero)
            err[sl] += torch.where(mk, eq, zero)
    err = err * (1.0 + 2.0 * gamma(sec.count + 8)) + _absolute(sec.count + 4)
    return _Local(out, err, r0, c0, grid_in)


@dataclass
class _Mirror:
    """Rows of which some are the negations of others, held once: row ``i`` of the whole set
    is ``sign_i`` times row ``src[i]`` of ``rows`` (``neg``: where the sign is -1). The exact
    rows are negations too (linear maps), and ``|(-ĝ) - (-g)| = |ĝ - g|``: the partner's error
    bound holds for the rebuilt row. Negation commutes exactly with every step (products,
    sums, divisions and their roundings are odd in the rows; the error bounds depend on
    magnitudes), so where a row's products do not depend on the other rows of its batch (the
    CPU's convolutions) the rebuilt rows are those that pulling both back gives, bit for
    bit."""

    rows: tuple[Tensor, Tensor] | _Local
    src: Tensor
    neg: Tensor


def _mirrors(rows: tuple[Tensor, Tensor] | _Local
             ) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
    """Which rows to pull back (``keep``) and how to rebuild the others (``src``, ``neg`` of
    :class:`_Mirror`): a row that is the negation of the one before it (on the same window)
    is rebuilt; ``(None, None)`` when there is none. A pooling window with two possible
    winners has the seed rows ``e_a - e_b`` and ``e_b - e_a``, consecutive."""
    if isinstance(rows, _Local):
        n = rows.g.shape[0]
        v = rows.g.reshape(n, -1)
        place = (rows.r0[1:] == rows.r0[:-1]) & (rows.c0[1:] == rows.c0[:-1])
    else:
        v = rows[0]
        n = v.shape[0]
        place = True
    if n < 2:
        return None, None
    second = torch.zeros(n, dtype=torch.bool, device=v.device)
    second[1:] = (v[1:] == -v[:-1]).all(dim=1) & place
    second[1:] &= ~second[:-1].clone()  # pairs, not chains: the row before is kept
    if not bool(second.any()):
        return None, None
    # each kept row's place among the kept, which a negated row shares with its partner
    src = torch.cumsum(~second, 0) - 1
    return torch.nonzero(~second).reshape(-1), (src, second)


def _select(rows: tuple[Tensor, Tensor] | _Local, keep: Tensor
            ) -> tuple[Tensor, Tensor] | _Local:
    """Rows ``keep`` of a row set (dense or on windows: the same window size)."""
    if isinstance(rows, _Local):
        return _Local(rows.g[keep], rows.e[keep], rows.r0[keep], rows.c0[keep], rows.grid)
    return rows[0][keep], rows[1][keep]


def _parts(rows: tuple[Tensor, Tensor] | _Local | _Mirror) -> tuple[Tensor, Tensor]:
    """The computed rows and error bounds held (windows or dense), for the checks."""
    if isinstance(rows, _Mirror):
        rows = rows.rows
    return (rows.g, rows.e) if isinstance(rows, _Local) else rows


def _pull(b: Block, sec: _Secant | None, rows: tuple[Tensor, Tensor] | _Local | _Mirror,
          centre: bool = True) -> tuple[Tensor, Tensor] | _Local | _Mirror:
    """One backward step of rows (dense ``(g, e)`` or on windows): :func:`_back_local` where
    the block allows, else :func:`_back` on the dense rows."""
    if isinstance(rows, _Mirror):
        return _Mirror(_pull(b, sec, rows.rows, centre), rows.src, rows.neg)
    if isinstance(rows, _Local):
        new = _back_local(b, sec, rows, centre)
        if new is not None:
            return new
        rows = rows.dense()
    return _back(b, sec, rows[0], rows[1], centre=centre)


def _columns(rows: tuple[Tensor, Tensor] | _Local | _Mirror, cols: Tensor | None
             ) -> tuple[Tensor, Tensor]:
    """The rows and their error bounds on columns ``cols`` (None: all), dense."""
    if isinstance(rows, _Mirror):
        g, e = _columns(rows.rows, cols)
        g = g[rows.src]
        g[rows.neg] = -g[rows.neg]
        return g, e[rows.src]
    if isinstance(rows, _Local):
        return rows.columns(cols)
    g, e = rows
    return (g, e) if cols is None else (g[:, cols], e[:, cols])


@dataclass(frozen=True)
class TightOutcome:
    """The result of :func:`tight_local_bound`: ``value`` (an upper bound on the local
    Lipschitz constant under the event of the ``factors``: certified when they all are; the
    limits use their radii and the hybrid multiplies its head by them) or None with
    ``reason``; ``rows`` VJP rows used."""

    value: float | None
    reason: str
    rows: int
    unstable: tuple[int, ...] = ()
    row_values: tuple[float, ...] | None = None
    """With ``row_last`` (:func:`tight_local_bound`): the bound of each output row's scalar
    function ``e_i^T f``, and ``value`` their maximum."""
    start: int = 0
    """The boundary (the input of block ``start``) where the construction starts: 0 for the
    whole network; ``j > 0`` for the hybrid (the paper's factors of blocks ``0..j-1`` times
    the tail's bound ``B_j``), formed when the whole network's rows exceed the budget."""
    tail: int = 0
    """The hybrid's boundary whose value is reported (``value``; per row: the largest row's),
    at least ``start``; 0 for the whole network."""
    full_rows: int = 0
    """Rows the whole network's construction needs (over ``max_rows`` when ``start > 0``)."""
    full_reason: str = ""
    """Why the whole network's construction was not formed (when ``start > 0``)."""


TAIL_STARTS: int | None = None
"""Boundaries tried by the hybrid: the earliest whose tail fits the budget and the next ones,
at most this many (None: every one up to the last block's input); where the whole network
fits, it is the first of them (boundary 0) and the later ones are hybrids too
(:func:`lipbound.tight_memory.hybrid_starts`). Each adds the norms of the tail's rows on that
boundary's columns, no further sweep: on the MNIST LeNet at eps = 0.3 the tail from ``pool1``
(the earliest) gives 10525 (no gain), from ``fc1`` 7772, at the same cost (0.48 s); at eps =
0.1, where the whole network fits, the whole network gives 653 and the tail from ``conv2`` 587
(session 20: about 20 % more time there)."""


def tight_local_bound(blocks: list[Block], x0: Tensor, eps: float, records: list[dict],
                      factors: list[SpectralBound], *, max_rows: int = DEFAULT_ROWS,
                      max_bytes: int = DEFAULT_BYTES,
                      row_last: list[float] | None = None,
                      tail_starts: int | None = TAIL_STARTS, min_start: int = 0
                      ) -> TightOutcome:
    """The centre-plus-deviation bound ``B_0`` (see the module docstring), or the hybrid.

    **Hybrid** (when the whole network's rows exceed ``max_rows`` or ``max_bytes``): for a
    boundary ``j`` (the input of block ``j``) let ``z_j(x)`` be the vector there. The paper's
    argument (method.md rule 8) gives ``||z_j(x) - z_j(x0)|| <= F_0 ... F_(j-1) ||x - x0||``
    (``F`` the paper's factors, the head), and ``z_j(x) - z_j(x0)`` is supported on the
    coordinates ``M_j`` that may move (ReLU outputs with ``ȳ > 0``, pooling windows with such
    an input; all after other layers). The tail ``g`` (blocks ``j..K-1``) satisfies
    ``f(x) - f(x0) = g(z_j(x)) - g(z_j(x0)) = Q_(j->K)(x) (z_j(x) - z_j(x0))`` with the
    secants of blocks ``>= j`` (their limits hold on the ball: they are the records'), so the
    telescoping bounds it by ``B_j(M_j) ||z_j(x) - z_j(x0)||``, where ``B_j(M_j)`` is the
    expansion with columns ``M_j`` (the secants before ``j`` are not used). Hence
    ``L(x0, eps) <= F_0 ... F_(j-1) B_j(M_j)``. Only the tail's rows are needed (outputs and
    the deviation rows of the secants ``>= j``), swept back to ``j`` only. The earliest
    ``j`` whose tail fits is used, and the later boundaries too, up to ``tail_starts`` of
    them (the smallest value is returned; where the whole network fits, ``j = 0`` is its
    ``B_0`` and the later boundaries' hybrids compete with it). The head factors are the
    paper's factors themselves (the limits of the tail use them already): the hybrid holds
    under the same event as the paper's product.

    Args:
        blocks: the analyzer's blocks (a chain).
        x0: the nominal input (float64, on the analysis device).
        eps: the ball radius.
        records: per block, what :meth:`lipbound.Analyzer._propagate` recorded (affine blocks:
            ``y0``, ``e_out``, ``rn``, ``eps_k``, ``r``, ``moving``; pooling: the mask ``d``).
        factors: the paper's local factors of the blocks (certified ones bound tails; all of
            them are the hybrid's head).
        max_rows: most rows of vector-Jacobian products (outputs plus deviation rows).
        max_bytes: most memory of the construction (its peak as
            :func:`lipbound.tight_memory.peak_bytes` estimates it before forming anything).
        row_last: per output row: the bound of each row's scalar function is wanted (the
            margin certificate, :meth:`lipbound.Analyzer.local_bound_rows`), and this is the
            paper's last factor of row i (``||e_i^T A D||``, certified) for its tails. Then
            ``records`` and ``factors`` may leave out the last block (an affine one).
        tail_starts: how many boundaries the hybrid tries (at least 1; None: all).
        min_start: the earliest boundary the construction may start at (> 0: the hybrid even
            where the whole network fits; for tests and comparisons).

    Returns:
        A :class:`TightOutcome`; ``value`` None when the bound was not formed (``reason``).
    """
    try:
        return _tight(blocks, x0, eps, records, factors, max_rows, max_bytes, row_last,
                      len(blocks) if tail_starts is None else max(1, int(tail_starts)),
                      int(min_start))
    except _Fallback as exc:
        return TightOutcome(None, str(exc), 0)
    except NotImplementedError as exc:
        # a user-registered layer (lipbound.ops.registry.register_rule) without |A|^T
        # products (abs_lin_t), which the rows' rounding bound needs
        return TightOutcome(None, "a layer's op does not implement a product the rows' "
                            f"rounding bound needs (abs_lin_t: |A|^T y){': ' if str(exc) else ''}"
                            f"{exc}", 0)


def _tail_start(blocks: list[Block], secs: list[_Secant | None], max_rows: int,
                max_bytes: int, min_start: int = 0, lives: list[Tensor | None] | None = None,
                tail_starts: int = 1, each_row: bool = False
                ) -> tuple[int | None, int, str, bool]:
    """The earliest boundary ``j >= min_start`` whose tail (blocks ``j..K-1``: the outputs and the
    deviation rows of its secants) fits ``max_rows`` and whose construction's memory
    (:func:`lipbound.tight_memory.peak_bytes`: rows on windows where they are, dense where
    not, with the steps' temporaries and the norms' matrices) fits ``max_bytes`` (None: none
    does), the whole network's rows, and why the whole network does not fit ("" when it
    does). ``lives``: the coordinates that may move at each boundary (None: all); the hybrid
    tries ``tail_starts`` boundaries; ``each_row``: the output rows' norms per row. Last:
    whether the hybrid norms may be deferred (:class:`_Deferred`): the estimate plus their
    matrices (:func:`lipbound.tight_memory.deferred_bytes`) fit ``max_bytes``."""
    n_blocks = len(blocks)
    n_out = blocks[-1].out_dim
    dev = [0 if s is None else s.rows for s in secs]
    sizes = [None if s is None or not s.rows else s.size() for s in secs]
    taps = [0 if s is None or s.kind != "pool" else int(s.out_idx.numel()) for s in secs]
    live_n = [None if v is None else int(v.numel())
              for v in (lives if lives is not None else [None] * (n_blocks + 1))]

    said: dict[int, str] = {}

    def fits(j: int) -> str:
        if j not in said:  # (boundary 0's is asked twice: once for the reason)
            said[j] = fitting(j)
        return said[j]

    def fitting(j: int) -> str:
        rows = n_out + sum(dev[j:])
        if rows > max_rows:
            return (f"{rows} rows of vector-Jacobian products ({n_out} outputs and "
                    f"{rows - n_out} deviation rows of unstable units) exceed the budget "
                    f"of {max_rows}")
        need = peak_bytes(blocks, sizes, taps, live_n, j, tail_starts, each_row)
        if need > max_bytes:
            return (f"the rows need about {mib(need)} at their peak (estimated), over the "
                    f"cap of {mib(max_bytes)}")
        return ""

    why = fits(0)
    start = next((j for j in range(max(0, min_start), n_blocks) if not fits(j)), None)
    # the deferred norms' matrices (not counted by the choice of the start): held where
    # they fit under the cap with the construction's estimate (on windows where they fit,
    # LAZY_GATHER: the sweeps do not gather them; deferred_bytes counts the windows and the
    # formation of one)
    defer = start is not None and peak_bytes(
        blocks, sizes, taps, live_n, start, tail_starts, each_row, lazy=LAZY_GATHER
    ) + deferred_bytes(blocks, sizes, live_n, start, tail_starts,
                       taps=taps if LAZY_GATHER else None) <= max_bytes
    return start, n_out + sum(dev), why, defer


def _tight(blocks: list[Block], x0: Tensor, eps: float, records: list[dict],
           factors: list[SpectralBound], max_rows: int, max_bytes: int,
           row_last: list[float] | None = None, tail_starts: int | None = None,
           min_start: int = 0) -> TightOutcome:
    if not (SAFE_LOW <= eps <= SAFE_HIGH):
        raise _Fallback(f"the radius {eps:.3g} is outside the safe range [1e-150, 1e150]")
    n_blocks = len(blocks)
    if not n_blocks:
        # (an identity network: nn.Identity, an empty nn.Sequential; since session 22, was
        # IndexError) the paper's product of no factors, 1, is exact
        raise _Fallback("the network has no layer (the identity)")
    last = blocks[-1]
    if row_last is not None:
        if not isinstance(last, AffineBlock) or last.relu or len(row_last) != last.out_dim:
            raise _Fallback("per-row bounds need a last affine layer")
        if len(records) == n_blocks - 1:  # (the last block's limits are not needed)
            records = [*records, None]
    if len(records) != n_blocks:
        raise _Fallback("the limits of some layers were not recorded")
    z = x0.reshape(-1).to(torch.float64)
    _check_tensor(z, "the input x0", nonzero_low=False)
    for b in blocks:
        if isinstance(b, AffineBlock):
            for s in (b.s_in, b.s_out):
                if s is not None:
                    _check_tensor(s, f"a scale of {b.name}")
            if b.mixing is not None:
                _check_tensor(b.mixing.row_abs(), f"the absolute row sums of {b.name}")
    marg = SAFETY * (z.abs() + eps)
    lo, hi = z - eps - marg, z + eps + marg  # the box of the exact inputs in the ball
    # the secants, the pooling ones' rows counted but not formed yet; the coordinates that
    # may move at each boundary (lives[k]: at the input of block k; None: all)
    secs: list[_Secant | None] = []
    boxes: dict[int, tuple[Tensor, Tensor]] = {}  # the input boxes of unstable pooling
    lives: list[Tensor | None] = [None]
    for t, (b, rec) in enumerate(zip(blocks, records, strict=True)):
        if isinstance(b, PoolBlock):
            box = (lo, hi)
            sec, lo, hi = _pool_secant(b, rec["d"].reshape(-1), lo, hi, 0, 0, 0, form=False,
                                       live_in=lives[-1])
            if sec.rows:
                boxes[t] = box
            live = sec.live
        elif b.relu:
            sec, lo, hi = _relu_secant(b, rec)
            live = sec.live
        elif rec is None:  # the last block (per-row bounds): no limits needed after it
            sec = live = None
        else:
            sec = live = None
            y0, e_out, rn, eps_k = rec["y0"], rec["e_out"], rec["rn"], rec["eps_k"]
            _check_tensor(y0, f"a value of {b.name} at x0", nonzero_low=False)
            er = eps_k * rn
            if b.fold_factor > 1.0:  # (as in _relu_secant)
                er = er * b.fold_factor + UNDERFLOW
            _check_tensor(er, f"a radius of {b.name}", nonzero_low=False)
            mg = SAFETY * (y0.abs() + er)
            lo, hi = y0 - e_out - er - mg, y0 + e_out + er + mg
        secs.append(sec)
        lives.append(live)
    start, full_rows, full_reason, defer = _tail_start(blocks, secs, max_rows, max_bytes,
                                                      min_start, lives, tail_starts,
                                                      row_last is not None)
    if start is None:
        raise _Fallback(full_reason or f"no tail from block {min_start} on")
    n_out = blocks[-1].out_dim
    counts = tuple(0 if s is None else s.rows for s in secs)
    unstable = [t for t in range(start, n_blocks) if counts[t] > 0]
    rows = n_out + sum(counts[start:])
    for t in unstable:  # the tail's pooling rows, formed now (they fit)
        if secs[t].kind == "pool":
            secs[t], _, _ = _pool_secant(blocks[t], records[t]["d"].reshape(-1), *boxes[t],
                                         0, max_rows, max_bytes, live_in=lives[t])
    del boxes
    # boundaries where a segment starts: the input (all columns; the whole network), the
    # hybrid's boundaries (the columns that may move there), and after each unstable secant
    # (its deviating outputs)
    cols: dict[int, Tensor | None] = {0: None} if start == 0 else {}
    for t in unstable:
        if t + 1 < n_blocks:
            cols[t + 1] = secs[t].sigma
    mcols: dict[int, Tensor | None] = {j: lives[j] for j in hybrid_starts(start, tail_starts,
                                                                           n_blocks)}
    stop = min([*cols, *mcols])
    dev = x0.device
    # the hybrid boundaries' deviation norms are deferred (_Deferred: formed where a result
    # needs them) where their matrices fit under the cap with the estimate
    defer = defer and DEFER_NORMS

    def sweep(begin: int, held: tuple[Tensor, Tensor] | _Local | _Mirror,
              scale: Tensor | None, each_row: bool = False) -> tuple[dict, dict]:
        """The norms of the rows ``held`` (at boundary ``begin``) pulled back to every segment
        start below: at ``cols`` (``got``) and ``mcols`` (``gotm``); ``each_row``: per row."""
        got: dict = {}
        gotm: dict = {}
        k = begin
        while True:
            for where, cs in ((got, cols), (gotm, mcols)):
                if k in cs:
                    if defer and scale is not None and not each_row and (
                            where is gotm or (k == 0 and mcols)):
                        if LAZY_GATHER and _lazy_fits(held, cs[k]):
                            # (gathered where the norm is formed; rows on windows: not
                            # changed in place by the later steps)
                            where[k] = _Deferred(_Lazy(held, cs[k], scale), None)
                            continue
                        g, e = _columns(held, cs[k])
                        m, en = _norm_parts(g, e, None, scale)
                        del g, e
                        where[k] = 0.0 if m is None else _Deferred(m, en)
                        del m
                        continue
                    g, e = _columns(held, cs[k])
                    where[k] = _row_bound(g, e, None) if each_row else \
                        _norm_bound(g, e, None, scale)
            if k <= stop:
                return got, gotm
            held = _pull(blocks[k - 1], secs[k - 1], held)
            k -= 1
            g, e = _parts(held)
            _check_tensor(g, "a row of the centre network")
            _check_tensor(e, "a rounding bound of the centre network's rows", nonzero_low=False)

    eye = torch.eye(n_out, dtype=torch.float64, device=dev)
    v, vm = sweep(n_blocks, (eye, torch.zeros_like(eye)), None, each_row=row_last is not None)
    d: dict[int, dict[int, float]] = {}
    dm: dict[int, dict[int, float]] = {}
    for t in unstable:
        s = secs[t]
        if s.kind == "relu":
            held = _one_hot(s.sigma, blocks[t].out_shape)
            if held is None:
                g = torch.zeros(s.rows, blocks[t].out_dim, dtype=torch.float64, device=dev)
                g[torch.arange(s.rows, device=dev), s.sigma] = 1.0
                held = (g, torch.zeros_like(g))
            held = _pull(blocks[t], s, held, centre=False)
            _check_tensor(held.g if isinstance(held, _Local) else held[0], "a row of a layer")
            scale = s.rho[s.sigma]
        else:
            g, scale = s.seeds, s.scale
            held = s.local if g is None else \
                _to_local(g, None, blocks[t].in_shape) or (g, torch.zeros_like(g))
            keep, twin = _mirrors(held)  # (rows that are another's negation: not pulled back)
            if keep is not None:
                held = _Mirror(_select(held, keep), *twin)
        d[t], dm[t] = sweep(t, held, scale)
    vals = [y for x in (*v.values(), *vm.values())
            for y in (x if isinstance(x, list) else [x])]
    for x in vals + [y for dd in (*d.values(), *dm.values()) for y in dd.values()]:
        if isinstance(x, _Deferred):
            if x.high <= SAFE_HIGH:
                continue  # (its value is below: no fallback)
            x.value()  # (raises above the safe range)
        else:
            _safe_norm(x)
    # a bound below the safe range (rows that are 0 but for their rounding allowance) is
    # raised to it: still an upper bound, and every product of two stays normal
    d, dm = ({t: {j: x if isinstance(x, _Deferred) else _floor(x) for j, x in dd.items()}
              for t, dd in dn.items()} for dn in (d, dm))
    certified = [f.guarantee == Guarantee.CERTIFIED for f in factors]
    info = {"start": start, "full_rows": full_rows, "full_reason": full_reason}
    if row_last is None:
        b0, at = _segments({j: _floor(x) for j, x in v.items()}, d, cols, unstable, n_blocks,
                           [f.value for f in factors], certified,
                           {j: _floor(x) for j, x in vm.items()}, dm)
        return TightOutcome(b0, "", rows, counts, tail=at, **info)
    # per output row i: the same expansion for the scalar function e_i^T f (its tails are
    # the row's own, the deviations shared); the paper's tails end with the row's last factor
    out = []
    ats = []
    for i, last_i in enumerate(row_last):
        vi = {j: _floor(x[i]) for j, x in v.items()}
        vmi = {j: _floor(x[i]) for j, x in vm.items()}
        values = [f.value for f in factors[:n_blocks - 1]] + [float(last_i)]
        bi, at = _segments(vi, d, cols, unstable, n_blocks, values,
                           [*certified[:n_blocks - 1], True], vmi, dm)
        out.append(bi)
        ats.append(at)
    top = max(range(len(out)), key=out.__getitem__)
    return TightOutcome(max(out), "", rows, counts, tuple(out), tail=ats[top], **info)


def _safe_norm(x: float) -> float:
    """``x``, or the fallback where a norm is above the safe range (or NaN)."""
    if not x <= SAFE_HIGH:
        raise _Fallback(f"a norm {x:.3g} above the safe range [1e-150, 1e150]")
    return x


def _floor(x: float) -> float:
    """``x`` raised to :data:`SAFE_LOW` when positive (an upper bound still)."""
    return max(x, SAFE_LOW) if x > 0 else 0.0


def _segments(v: dict[int, float], d: dict[int, dict[int, float]], cols: dict,
              unstable: list[int], n_blocks: int, factors: list[float],
              certified: list[bool], vm: dict[int, float] | None = None,
              dm: dict[int, dict[int, float]] | None = None) -> tuple[float, int]:
    """The nested recursion: ``B_j`` for every segment start ``j`` in ``cols`` (from the last
    to the first), the smaller of the expansion and (when its factors are certified) the
    paper's product of ``factors[j:]``. Without ``vm``: returns ``(B_0, 0)``. With ``vm``
    (the hybrid: the output rows' norms on the columns that may move at each boundary ``j``
    tried, ``dm`` the deviation rows' there): ``B_j(M_j)`` the same way, and returns the
    smallest ``F_0 ... F_(j-1) B_j(M_j)`` and its ``j``."""
    b_of: dict[int, float] = {n_blocks: 1.0}
    for j in sorted(cols, reverse=True):
        if j > 0:  # (B_0 below: its deviation norms may be deferred)
            b_of[j] = _expansion(j, v[j], _pick(d, j, "value"), b_of, unstable, factors,
                                 certified)

    def whole(how: str) -> float:
        return _expansion(0, v[0], _pick(d, 0, how), b_of, unstable, factors, certified)

    def hybrid(j: int, how: str) -> float:
        return product_up([*factors[:j], _expansion(j, vm[j], _pick(dm, j, how), b_of,
                                                    unstable, factors, certified)])

    if not vm:
        return whole("value"), 0
    # the whole network (when formed) competes with the hybrids: on the MNIST LeNet at
    # eps = 0.1 the tail from conv2 gives 588 against the whole network's 653. The smallest
    # value is kept, the first in this order on ties (B_0, then the boundaries upwards)
    cands = ([(0, whole, _any_deferred(d, 0))] if 0 in cols else []) + \
        [(j, (lambda how, j=j: hybrid(j, how)), _any_deferred(dm, j)) for j in sorted(vm)]
    # a candidate with deferred norms: its value with their lower bounds is at most its value
    # (every step is monotone in the norms: sums and products rounded up or correctly,
    # minima, maxima); with their upper bounds, whether a fallback above the safe range is
    # possible. Where one is, every value is formed in order, as without deferral.
    lows: list[float | None] = []
    try:
        for _, f, lazy in cands:
            if lazy:
                lows.append(f("low"))
                f("high")
            else:
                lows.append(None)
    except _Fallback:
        lows = [None] * len(cands)
    vals = {i: c[1]("value") for i, c in enumerate(cands) if lows[i] is None}
    best, at = math.inf, -1

    def keep(i: int, val: float) -> None:
        nonlocal best, at
        if val < best or (val == best and 0 <= at and i < at):  # (NaN: never)
            best, at = val, i

    for i, val in vals.items():
        keep(i, val)
    for i in sorted((i for i in range(len(cands)) if lows[i] is not None),
                    key=lambda i: (lows[i] if lows[i] == lows[i] else -math.inf, i)):
        low = lows[i]
        if at >= 0 and (low > best or (low == best and i > at)):
            continue  # (its value is at least low: not the first smallest)
        keep(i, cands[i][1]("value"))
    if at < 0:
        raise _Fallback("no finite hybrid bound (a head factor is not finite)")
    return best, cands[at][0]


def _any_deferred(dm: dict[int, dict[int, float | _Deferred]], j: int) -> bool:
    """Whether a norm at boundary ``j`` is deferred."""
    return any(isinstance(dd.get(j), _Deferred) for dd in dm.values())


def _pick(dm: dict[int, dict[int, float | _Deferred]], j: int, how: str
          ) -> dict[int, dict[int, float]]:
    """The norms at boundary ``j``: deferred ones as their ``low`` or ``high`` bound or their
    ``value`` (formed now)."""
    def one(x: float | _Deferred) -> float:
        if not isinstance(x, _Deferred):
            return x
        return x.value() if how == "value" else getattr(x, how)
    return {t: {j: one(dd[j])} for t, dd in dm.items() if j in dd}


def _expansion(j: int, vj: float, d: dict[int, dict[int, float]], b_of: dict[int, float],
               unstable: list[int], factors: list[float], certified: list[bool]) -> float:
    """``B_j``: the norm ``vj`` of the output rows at ``j`` plus, for each unstable secant
    ``t >= j``, its deviation ``d[t][j]`` times the tail ``b_of[t + 1]``; at most the paper's
    product of ``factors[j:]`` when those are certified. Fallback above the safe range."""
    terms = [vj] + [_up(b_of[t + 1] * d[t][j]) for t in unstable if t >= j]
    val = _up(math.fsum(terms))
    if all(certified[j:]):
        val = min(val, product_up(factors[j:]))
    if not val <= SAFE_HIGH:
        raise _Fallback(f"a segment bound {val:.3g} above the safe range")
    return _floor(val)
