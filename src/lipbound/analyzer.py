"""Global and local Lipschitz upper bounds (Avant & Morgansen, *Analytical Bounds on the Local
Lipschitz Constants of ReLU Networks*, IEEE TNNLS 2023; method.md rules 1-8).

:class:`Analyzer` traces a model once and then answers many bound queries (different inputs,
radii and output maps), sharing what does not depend on them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _parallel
from . import spectral as _spectral_mod
from ._indexing import gather_cols, scatter_cols
from ._modelinfo import (
    changed_contents,
    changed_tensor,
    content_snapshot,
    find_counters,
    model_device,
    mutable_attributes,
    tensor_state,
    unwrap_model,
    wrapper_problem,
)
from ._progress import NULL_BAR, NullBar, progress_bar
from .blocks import TINY_WEIGHT, AffineBlock, Block, PoolBlock, build_blocks
from .errors import ExactRouteTooLarge, InputError, UnsupportedModelError
from .graph import trace_model, x0_shape_hint
from .ops.base import MIN_NORMAL, UNDERFLOW, norm_up, product_up
from .ops.conv import ConvOp, circulant_hint, circulant_probe
from .ops.dense import DenseProducts
from .ops.linear import LinearOp
from .results import BoundResult, Guarantee, LayerFactor, combine_guarantees
from .spectral import SAFETY, SpectralBound, _materialize, kw_factor, spectral_upper
from .validation import (
    check_bool,
    check_eps,
    check_example_input,
    check_failure_prob,
    check_finite,
    check_input,
    check_input_shape,
    check_int,
    check_plain_tensor,
    check_reuse_tol,
    check_tight,
    resolve_device,
)

log = logging.getLogger(__name__)

def _without_autograd(fn: Callable) -> Callable:
    """Run a bound computation in ``torch.inference_mode``: no gradients are ever taken
    through it, and skipping autograd's bookkeeping (version counters, dispatch) makes the
    many small tensor operations of a Lanczos run ~10 % cheaper (MNIST's local bound: 10.3
    -> 9.3 ms). Caches an analyzer builds there are only read afterwards; the buffers that
    are written in place later (Winograd's padded inputs) are created outside it, and tensors
    handed to the caller are ordinary ones."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            return fn(*args, **kwargs)
    return wrapper


EXACT_BUDGET = 1e9
"""Flop budget under which the "auto" mode takes the exact (certified) SVD route."""

DENSE_CACHE_ELEMENTS = 4_000_000
"""Blocks whose matrix has at most this many entries keep it after first use (32 MB)."""

LOCAL_QUANTITY = ("local Lipschitz constant relative to x0: sup ||f(x)-f(x0)||/||x-x0|| over "
                  "0<||x-x0||<=eps (L2)")
GLOBAL_QUANTITY = "global Lipschitz constant: sup ||f(x)-f(y)||/||x-y|| over all x != y (L2)"


PROBE_MIN_FLOPS = 500_000
"""Convolutions from this many multiply-adds per product get the circulant bound's test
vector in global bounds (two to four products; below, a whole Lanczos run costs about as
much: MNIST LeNet's layers)."""

HINT_MARGIN = 0.002
"""How far a lower estimate of a convolution's circulant bound must exceed the predicted
Lanczos value before a global bound runs Lanczos first (:meth:`Analyzer._lanczos_first`)."""

TIGHT_ROWS = 2048
"""Default budget of vector-Jacobian rows of the tight local bound (:mod:`lipbound.tight`)."""

MEMO_ENTRIES = 8
"""Layer factors remembered per layer for reuse (:meth:`Analyzer._reuse`)."""

MEMO_ELEMENTS = 16_000_000
"""Layers whose masks (times MEMO_ENTRIES) exceed this many numbers are not remembered."""


CIRCULANT_BUDGET = 5e10
"""Flops always granted to the certified circulant bound of a convolution (global factors)."""


def _check_magnitudes(blocks: list[Block]) -> None:
    """Refuse blocks with non-finite coefficients (a product of layers that overflowed), and
    blocks whose linear coefficients could underflow when squared: an entry of a
    block's matrix is a product of a weight and the folded diagonal scales (batch norm,
    normalisation, pooling scales), so the product of the parts' smallest nonzero magnitudes
    (a lower bound on every nonzero entry) must stay above ``TINY_WEIGHT``; for a product of
    layers the weight's part is the smaller of its matrix's and its rounding bound's (the row
    norms square their sum, and the error norm the bound)."""
    bad, huge = [], []
    for b in blocks:
        if not isinstance(b, AffineBlock):
            continue
        # each part a factor of every entry, in the order the row norms multiply their
        # squares (AffineBlock.sq_rows: s_in², then the weights', out_scale², s_out²); a
        # part's alternatives (a product of layers' matrix and its rounding bound, whose sum
        # the row norms square) share one smallest magnitude
        parts: list[tuple[Tensor | None, ...]] = [(b.s_in,)]
        if b.mixing is not None:
            # (a spatial matrix's coefficients, adaptive average pooling, are its pmat)
            weight = getattr(b.mixing, "weight", getattr(b.mixing, "pmat", None))
            parts += [(weight, getattr(b.mixing, "err", None)),
                      (getattr(b.mixing, "out_scale", None),)]
        parts.append((b.s_out,))
        low_all = 1.0
        # every square is formed alone, and the partial products in that order: each part's
        # smallest magnitude and each running product must stay above TINY_WEIGHT, not only
        # the whole product (a batch-norm scale 1e-200 before a layer of 1e100: coefficients
        # 1e-100, but the scale's square is 0 and the bound was 0)
        low_min = 1.0
        for alternatives in parts:
            low = math.inf
            for j, t in enumerate(alternatives):
                if t is None:
                    continue
                flat = t.reshape(-1)
                for s in range(0, flat.numel(), 1 << 22):  # in chunks: no full-size temporaries
                    a = flat[s:s + (1 << 22)].abs()
                    if j == 0 and not bool(torch.isfinite(a).all()):
                        huge.append(b.name)
                        break
                    # (an infinite rounding bound is sound, if loose: only its size counts)
                    a = a[(a > 0) & torch.isfinite(a)]
                    if a.numel():
                        low = min(low, float(a.min()))
            if math.isfinite(low):
                low_all *= low
                low_min = min(low_min, low, low_all)
        if low_min < TINY_WEIGHT:
            bad.append(f"{b.name} (smallest nonzero |coefficient| {low_min:.3g}, weights "
                       "times folded scales, or a scale or partial product alone)")
    if huge:
        raise InputError("non-finite coefficients (inf/nan) in " + ", ".join(dict.fromkeys(huge))
                         + ": a product of consecutive layers overflows float64; rescale "
                         "these layers (e.g. divide the weights by 2^k and multiply the next "
                         "layer's by 2^k)")
    if bad:
        raise InputError("coefficients below 1e-150 in magnitude in " + ", ".join(bad) +
                         ": their squares underflow in float64, so the bounds could not be "
                         "trusted; rescale these layers (e.g. multiply the weights by 2^k and "
                         "divide the next layer's by 2^k), or zero such coefficients")


CHANNEL_SUBSET_MIN = 0.05
"""A convolution's Lanczos products run on the channels that can move when that saves at
least this fraction of its multiply-adds (see :meth:`Analyzer._channel_subset`)."""

COMPACT_FRACTION = 0.6
"""A dense layer's masked matrix is copied to its active part when that is at most this
fraction of the matrix (the copy costs about as much as a few products)."""


def _compact(b: AffineBlock, dense, rows: Tensor, cols: Tensor, r: Tensor, d: Tensor) -> Tensor:
    """``(R A D)[rows][:, cols]`` of a block with a dense matrix, without forming R A D."""
    m = b.mixing.dense() if b.mixing is not None else None
    # (index_select: the entries of r[rows] and d[cols], with less overhead than indexing)
    rs, cs = r.index_select(0, rows), d.index_select(0, cols)
    if m is None:
        if isinstance(dense, _LazyConvMatrix):  # the submatrix, without the whole matrix
            return dense.sub(rows, cols) * rs[:, None] * cs[None, :]
        m = dense()
    else:
        rs = rs if b.s_out is None else rs * b.s_out[rows]
        cs = cs if b.s_in is None else cs * b.s_in[cols]
    # rows / cols are sorted and distinct: all of them means the identity selection
    sub = m if rows.numel() == m.shape[0] else m.index_select(0, rows)
    if cols.numel() != m.shape[1]:
        sub = sub.index_select(1, cols)
    return sub * rs[:, None] * cs[None, :]


class _LazyConvMatrix:
    """A convolution block's matrix for the exact route, on an analyzer's first request: the
    masked submatrix is scattered directly (:meth:`ConvOp.dense_submatrix`, bit-identical);
    the whole matrix is formed, and kept in ``store``, only when called."""

    def __init__(self, b: AffineBlock, store: dict, key: tuple[str, int]):
        self.b, self.store, self.key = b, store, key

    def __call__(self) -> Tensor:
        mat = self.store.get(self.key)
        if mat is None:
            mat = self.store[self.key] = self.b.with_scales(self.b.mixing.dense_matrix())
        return mat

    def sub(self, rows: Tensor, cols: Tensor) -> Tensor:
        return self.b.with_scales(self.b.mixing.dense_submatrix(rows, cols), rows, cols)


DENSE_BLOCK = 8
"""Block size of the Lanczos runs on big dense (fully connected) operators: their products
are memory-bound, so 8 vectors cost about 1.5 single products, and the block run's a
posteriori bound needs about 3x fewer steps (see :mod:`lipbound.lanczos`)."""

DENSE_BLOCK_MIN = 2_000_000
"""Dense matrices with fewer entries (16 MB) stay with single-vector runs: they are read
from the cache, so a block of products costs nearly a block of single ones (CIFAR-10's
1600 x 512 layer: no faster, and 0.3 % looser on its trained weights)."""


def _fast_error(b: Block) -> float | None:
    """``b.fast_error()`` when Lanczos runs may use fast (Winograd) products
    (``lipbound.spectral.FAST_REL_ERROR > 0``, the default), else None: with them off the fast
    products, and their transformed kernels, are not even built."""
    if _spectral_mod.FAST_REL_ERROR <= 0.0:
        return None
    fe = getattr(b, "fast_error", None)
    return fe() if fe is not None else None


def _block_size(b: AffineBlock, entries: int | None = None) -> int:
    """Lanczos block size for a block's operator: block runs where the products are dense
    and big (memory-bound), single vectors where they are convolutions (compute-bound: ``b``
    vectors cost ``b`` products, and a block run needs more vectors in all) or small.
    ``entries``: the size of the matrix the products read (default: the whole layer)."""
    if not isinstance(b.mixing, LinearOp):
        return 1
    n = b.in_dim * b.out_dim if entries is None else entries
    return DENSE_BLOCK if n >= DENSE_BLOCK_MIN else 1


def _positive(m: Tensor) -> Tensor:
    """The sorted indices of the positive entries of the flat mask ``m``."""
    return torch.nonzero(m > 0).reshape(-1)


def _masked_maps(b: AffineBlock, r: Tensor, d: Tensor, rows: Tensor, cols: Tensor):
    """Compact-coordinate maps of ``M = R A D`` for the Lanczos engine (see
    :func:`lipbound.spectral.spectral_upper`): scatter and gather take the place of the 0/1
    mask ``D`` (and of zero rows of ``R``), so a step makes no pass for them; with every
    coordinate active no scatter or gather is made either.

    ``d`` must hold only 0 and 1 (``cols``: its ones): the maps of one orientation drop
    ``D`` for the gather / scatter on ``cols``, those of the other multiply by ``d``, and
    rule 2 needs ``D`` to be a projection; a ``d`` above 1 would make the norm of another
    operator, not a bound. It is 0/1 by construction, so it is not checked here (this runs
    for every Lanczos factor): the masks are ``torch.ones`` at the input
    (:meth:`Analyzer._propagate`), a boolean cast to float64 after an affine block (``on``
    / ``moving`` in :meth:`Analyzer._affine_local`) and after max pooling
    (:meth:`lipbound.ops.pooling.MaxPoolOp.propagate_mask`), and whole channels selected
    from those (:meth:`Analyzer._channel_subset`). tests/test_tight_rows_and_sweep_radii.py
    checks every mask the analyzer builds and passes here, on several networks. (A check here,
    where ``d`` is not all ones, would cost 0.05-0.2 ms per factor on the 2-core CPU of session
    24, under 0.1 % of a CIFAR-10 local bound: small, but the construction already guarantees
    it.)"""
    all_in = cols.numel() == b.in_dim
    all_out = rows.numel() == b.out_dim
    d_full = None if bool((d == 1).all()) else d

    def maps(swap: bool):
        # buffers kept per shape, for this pair of maps only (the two sides scatter onto
        # different coordinates): inactive coordinates are zero and stay zero (only the
        # active ones are ever written); a buffer is read, never kept, by the layer's maps
        buffers: dict[tuple[int, int], Tensor] = {}
        # the masked product's input R y (mv_t: R v), likewise reused: a fresh tensor of a
        # full layer's size costs more to allocate than to fill (CIFAR-10 conv1: 36 us
        # against 11 us a step); it is only read by the layer's linear part, which returns
        # a new tensor
        scaled: dict[tuple[int, ...], Tensor] = {}

        def scatter(v: Tensor, idx: Tensor, n: int) -> Tensor:
            out = buffers.get((v.shape[0], n))
            if out is None:
                out = buffers[(v.shape[0], n)] = v.new_zeros(v.shape[0], n)
            return scatter_cols(out, idx, v)

        def times(y: Tensor, s: Tensor) -> Tensor:  # y * s into a reused buffer
            out = scaled.get(tuple(y.shape))
            if out is None:
                out = scaled[tuple(y.shape)] = torch.empty_like(y)
            return torch.mul(y, s, out=out)

        def fresh(x: Tensor, buf: Tensor) -> Tensor:
            # the linear parts return new tensors; should one ever return (a view of) its
            # input, the result must not be the buffer that the next call overwrites
            return x.clone() if x.data_ptr() == buf.data_ptr() else x

        if not swap:
            def mv_c(v: Tensor) -> Tensor:  # compact cols -> R A D v (full output)
                return b.lin(v if all_in else scatter(v, cols, b.in_dim)).mul_(r)

            def rmv_c(y: Tensor) -> Tensor:  # full output -> D A^T R y on cols
                ry = times(y, r)
                x = fresh(b.lin_t(ry), ry)
                return x if all_in else gather_cols(x, cols)
            return mv_c, rmv_c
        r_rows = r if all_out else r.index_select(0, rows)

        def mv_t(v: Tensor) -> Tensor:  # compact rows -> D A^T R v (full input)
            y = times(v, r_rows)
            x = fresh(b.lin_t(y), y) if all_out else b.lin_t(scatter(y, rows, b.out_dim))
            return x if d_full is None else x.mul_(d_full)

        def rmv_t(x: Tensor) -> Tensor:  # full input (masked) -> R A D x on rows
            z = b.lin(x)
            return z.mul_(r) if all_out else gather_cols(z, rows).mul_(r_rows)
        return mv_t, rmv_t
    return maps


def _relu_slopes(y0: Tensor, e_out: Tensor, rn: Tensor, eps_k: float, moving: Tensor,
                 fold: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Rule 3 for a ReLU layer: ``(r, on, may_be_on)``, the slopes ``r`` of the rows, the rows
    that can be on somewhere in the ball (``ȳ > 0`` and moving: the output mask), and those
    that may be on at the exact nominal point (``y0 + e_out >= 0``).

    With float64 safety margins (a larger ``ȳ``, and a larger ``y0`` below the kink, only
    raise the slope): the nominal pass's rounding ``e_out``, absolute, and a relative margin
    for the row norms ``rn`` and this arithmetic. Each product and mask is formed once (the
    same values as forming it again); the constant branches are scalars (the same float64
    ``0.0`` / ``1.0`` as filled tensors). ``fold``: the block's
    :attr:`~lipbound.blocks.AffineBlock.fold_factor`, by which the exact layer's row norms may
    exceed the stored ones ``rn`` (a constant a float32 model rounds: up to ~1.2e-7 relative,
    beyond the margin ``SAFETY``)."""
    y_hi = y0 + e_out
    er = eps_k * rn
    if fold > 1.0:  # (+ UNDERFLOW: this product's rounding below the normal range)
        er = er * fold + UNDERFLOW
    ybar = y_hi + er + SAFETY * (y0.abs() + er)
    del er
    den = ybar - y_hi
    may_be_on = y_hi >= 0
    up = ybar > 0
    r = torch.where(may_be_on, 1.0, torch.where(up, ybar / den, 0.0))
    # a radius or row norm beyond float64 (ȳ = inf, inf / inf), or a finite ȳ whose distance
    # from y_hi overflows (ȳ / inf = 0 dropped a row that turns on: a bound of 0 for a
    # network of local constant 3e150): the slope's limit 1 (an infinite ȳ makes den
    # infinite or NaN)
    r = torch.where(~torch.isfinite(den) | torch.isnan(r), 1.0, r)
    del den
    r = torch.where(moving, r, 0.0)
    return r, up & moving, may_be_on


@dataclass(frozen=True)
class _MemoEntry:
    r: Tensor
    d: Tensor
    sb: SpectralBound


@dataclass(frozen=True)
class RowBounds:
    """Per-output-row local bounds: ``values[j]`` bounds the local constant of the scalar
    function ``x -> C[j] f(x)`` relative to x0 (used by margin certificates)."""

    values: Tensor
    guarantee: Guarantee
    failure_prob: float
    prefix: tuple[LayerFactor, ...]
    eps: float
    nominal_error: Tensor | None = None
    """Per row: a bound on ``|ĝ_j - C[j] f(x0)|``, the computed float64 value
    ``nominal_values[j]`` against the exact one (valid under the same event as ``values``)."""
    nominal_values: Tensor | None = None
    notes: tuple[str, ...] = ()
    """With ``tight=True``: whether, and for how many rows, the tight bound was smaller."""


class _Settings(NamedTuple):
    """The checked settings of an analyzer (:func:`_settings`)."""

    model: nn.Module  # (unwrapped)
    wrapper: nn.Module | None  # (DataParallel / torch.compile around it, if any)
    input_shape: tuple[int, ...]
    spectral: str
    lanczos_steps: int
    failure_prob: float
    seed: int
    name: str


def _settings(model: object, input_shape: Sequence[int] | None, x0: Tensor | None,
              spectral: object, lanczos_steps: object, failure_prob: object, seed: object,
              name: object, notes: object) -> _Settings:
    """Check the constructor arguments of an :class:`Analyzer` (and of
    :class:`lipbound.residual.ResidualAnalyzer`, which takes the same): an
    :class:`~lipbound.errors.InputError` naming each bad one and its fix."""
    problem = wrapper_problem(model)
    if problem is not None:
        raise InputError(problem)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # DataParallel / torch.compile: the module they run (same function, same tensors);
    # the wrapper is kept to see it run another module later (a new .module, a hook)
    inner = unwrap_model(model)
    if input_shape is None:
        if x0 is None:
            raise InputError("give input_shape or an example input x0")
        x0 = check_example_input(x0)
        input_shape = tuple(x0.shape[1:]) if x0.dim() > 1 else tuple(x0.shape)
    if spectral not in ("auto", "exact", "lanczos"):
        raise InputError(f"spectral must be 'auto', 'exact' or 'lanczos', got {spectral!r}")
    failure_prob = check_failure_prob(failure_prob)
    lanczos_steps = check_int(lanczos_steps, "lanczos_steps", 4)
    seed = check_int(seed, "seed", 0)
    if name is not None and not isinstance(name, str):
        raise InputError(f"name must be a string (the network's name in results), got "
                         f"{type(name).__name__}")
    if isinstance(notes, (str, bytes)):  # (tuple() would keep it letter by letter)
        raise InputError(f"notes must be a sequence of strings, got the string {notes!r}; "
                         f"pass [{notes!r}]")
    return _Settings(inner, model if inner is not model else None,
                     check_input_shape(input_shape), str(spectral), int(lanczos_steps),
                     float(failure_prob), int(seed), name or type(inner).__name__)


class Analyzer:
    """Sound Lipschitz bounds for one model.

    Args:
        model: an ``nn.Module`` in eval mode whose forward is a chain of supported layers.
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``; or give ``x0``.
        x0: an example input (its shape without the batch dimension is used).
        device: ``None``/``"auto"`` (the model's device), ``"cpu"`` or ``"cuda"``.
        spectral: ``"auto"`` (exact SVD when cheap, else Lanczos with a probabilistic
            guarantee), ``"exact"`` (always certified; slow on big layers), ``"lanczos"``.
        lanczos_steps: Krylov dimension of the Lanczos runs (more = tighter inflation).
        failure_prob: total failure probability budget of a probabilistic bound; split
            evenly over the layers that use Lanczos.
        seed: seed of the Lanczos start vectors, an integer >= 0 (the probability is over
            this draw, for a network fixed independently of it: against weights that may have
            been built knowing the seed, pass a secret one, see docs/guarantees.md).
        name: a name for the model used in results.
        notes: caveats copied into every result (e.g. "seeded random weights"). A float32
            model whose own forward pass differs from the analysed function by more than the
            chain check's float32 tolerance, explained by its float32 rounding (large weights
            summed with cancellation), adds one starting "float32 rounding" (see
            docs/guarantees.md).

    The analyzer holds a float64 snapshot of the model's weights. Once the model's parameters
    or buffers change (an optimiser step, ``load_state_dict``, an in-place edit under
    ``torch.no_grad()``, ``model.to(...)``, a replaced layer), every bound or forward pass
    raises :class:`~lipbound.errors.InputError`: build a new analyzer. So it does while the
    model is in training mode (``model.train()``; ``model.eval()`` lets it go on). Writes through
    ``p.data`` (which torch's version counters do not record) are found by comparing the
    tensors with a copy kept for that purpose (one more copy of the model's tensors).

    Example:
        >>> an = Analyzer(model, input_shape=(1, 28, 28))          # doctest: +SKIP
        >>> an.local_bound(x0, 0.1).value                           # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int] | None = None, *,
                 x0: Tensor | None = None, device: str | torch.device | None = None,
                 spectral: str = "auto", lanczos_steps: int = 64, failure_prob: float = 1e-6,
                 seed: int = 0, name: str | None = None, notes: Sequence[str] = ()):
        st = _settings(model, input_shape, x0, spectral, lanczos_steps, failure_prob, seed,
                       name, notes)
        model = st.model
        self._wrapper = st.wrapper
        self.model = model
        self.input_shape = st.input_shape
        self.device = resolve_device(device, model_device(model, torch.device("cpu")))
        self.spectral = st.spectral
        self.lanczos_steps = st.lanczos_steps
        self.failure_prob = st.failure_prob
        self.seed = st.seed
        self.name = st.name
        self.notes = tuple(notes)
        mutable = mutable_attributes(model)
        found: list[str] = []  # (a float32 model accepted within its own rounding)
        try:
            ops = trace_model(model, self.input_shape, notes=found)  # (runs the model)
        except UnsupportedModelError as exc:
            # a residual network: say what analyses it (lipbound.residual)
            from .residual import _intake_threads
            from .residual_graph import residual_note
            with _intake_threads(self.input_shape, None):  # (small inputs: one thread)
                note = residual_note(model, self.input_shape)
            if note is None:
                raise
            raise UnsupportedModelError(exc.nodes, note=note[0], residual=note[1]) from exc
        self.notes = tuple(dict.fromkeys((*self.notes, *found)))
        # integer attributes and containers that the model's forward changes at every call
        # are counts of its calls (lipbound's attacks run it too); the others are watched, as
        # torch.fx recorded them in the graph (x / self.max_val)
        self._counters = find_counters(model, self.input_shape, mutable)
        # the analysed network is a float64 snapshot of the model now; later changes to the
        # model's tensors are refused (_check_model), not silently ignored
        self._tensor_state = tensor_state(model, self._counters)
        self._contents = content_snapshot(model)  # writes through .data (no version counter)
        self._stale: str | None = None  # a copy made after the model changed: why
        self.ops = [op.to(self.device) for op in ops]
        self.blocks = build_blocks(self.ops)
        _check_magnitudes(self.blocks)
        for b in self.blocks:  # the forward-error coefficients, once, off every bound's clock
            if isinstance(b, AffineBlock) and b.mixing is not None:
                b.mixing.row_abs()
        self.output_shape = self.ops[-1].out_shape if self.ops else self.input_shape
        self._variants: dict[str, list[Block]] = {"": self.blocks}
        self._global: dict[str, list[SpectralBound]] = {}
        self._warm: dict[tuple[str, int], Tensor] = {}
        self._dense: dict[tuple[str, int], Tensor] = {}
        self._subsets: dict[tuple[str, int], tuple[Tensor, Tensor, AffineBlock]] = {}
        self._dense_requests: dict[tuple[str, int], int] = {}
        self._memo: dict[tuple, list[_MemoEntry]] = {}
        self._queries: dict[tuple, int] = {}
        # computations of each layer's local factor so far: each one draws a fresh start
        # vector (see _gen), so its operator, however earlier results chose it, is fixed
        # before its draw
        self._draws: dict[tuple[str | None, int, int], int] = {}  # (None: any output map)
        self._skipped_queries = 0
        self.reuse_tol = 0.0
        """Relative looseness a reused layer factor may have (see :meth:`_reuse`). 0: reuse
        only a factor computed for the very same masked operator."""
        # Warm starts keep the bound valid but make the Ritz value (and so the inflated bound)
        # larger, never smaller; off by default (benchmarks/README.md).
        self.warm_start = False

    def reuse_copy(self, reuse_tol: float) -> Analyzer:
        """A shallow copy that shares the traced graph, the exact dense matrices, the global
        factors, the seed and the count of each layer's draws (so that no start vector is
        drawn twice), with its own (empty) memory of layer factors and the given
        ``reuse_tol`` (see :meth:`_reuse`). Used by sweeps and radius searches.

        What the copy computes reaches this analyzer through the shared parts (sound: each is
        a fact about the model or a count): the global factors (if the copy computes the
        global bound, this analyzer's later local bounds can use them too, and report the
        global bound where it is smaller), the exact dense matrices and channel subsets (the
        same values, kept), the Lanczos vectors kept for warm starts (used only with
        ``warm_start``, off by default) and the draw counts (this analyzer's later Lanczos
        factors draw fresh start vectors, so a probabilistic value can differ in its last
        digits from that of an analyzer that made no copy; each one is a valid bound). This
        analyzer's memory of layer factors, its counts of queries and its ``reuse_tol`` are
        not touched."""
        import copy

        reuse_tol = check_reuse_tol(reuse_tol)
        twin = copy.copy(self)
        twin._memo = {}
        twin._queries = {}
        # the draw counters are shared: no start vector is used twice in the family
        twin._draws = self._draws
        # (copy.copy goes through __getstate__, which drops the wrapper: a twin of the same
        # model watches it too)
        twin._wrapper = self.__dict__.get("_wrapper")
        twin._skipped_queries = 0
        twin.reuse_tol = reuse_tol
        return twin

    def count_skipped_query(self) -> None:
        """Record a bound that a caller skipped because of earlier results (e.g. a sweep that
        reports the global bound once the local one reached it): which bounds are computed
        then depends on the random draws, so the union bound of reused factors must count
        the skipped query too (see :meth:`_reuse`)."""
        self._skipped_queries += 1

    # ------------------------------------------------------------------ helpers
    def __getstate__(self) -> dict:
        # copies and pickles hold a copy of the model: its tensors are new objects, so the
        # record is taken again on arrival, and a model that had already changed stays refused
        state = dict(self.__dict__)
        state["_stale"] = self._stale or self._changed()
        state["_tensor_state"] = None
        state["_wrapper"] = None  # (its change, if any, is in _stale)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tensor_state = tensor_state(self.model, self.__dict__.get("_counters"))

    def _changed(self) -> str | None:
        """What changed in the model since this analyzer was built, or ``None``."""
        wrapper = self.__dict__.get("_wrapper")
        if wrapper is not None and unwrap_model(wrapper) is not self.model:
            return (f"the {type(wrapper).__name__} it was built for now runs another module, "
                    "or got a forward hook or a forward of its own")
        return (changed_tensor(self._tensor_state, self.model, self.__dict__.get("_counters"))
                or changed_contents(self._contents))

    def _check_model(self) -> None:
        """Refuse to answer for a model whose parameters or buffers changed after this
        analyzer was built (its bounds would be those of the old weights)."""
        what = self._stale or self._changed()
        if what is not None:
            raise InputError(
                f"the model changed after this Analyzer was built ({what}); the analyzer "
                "holds a float64 snapshot of the weights it was built with, so its bounds "
                "would be those of the old model: build a new Analyzer(model, input_shape) "
                "after changing the model")

    def forward(self, x: Tensor) -> Tensor:
        """The network in float64 on the analysis device (batched): ``x`` of shape
        ``(N, *input_shape)`` (or ``input_shape`` for one input) gives ``(N, *output_shape)``.

        Raises:
            InputError: ``x`` is not a real tensor of that shape (a wrong shape is refused,
                not reshaped).
        """
        self._check_model()
        if not isinstance(x, Tensor):
            raise InputError(f"x must be a tensor of shape (N, *input_shape), got "
                             f"{type(x).__name__}")
        check_plain_tensor(x, "x")
        if tuple(x.shape) == self.input_shape:
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise InputError(f"x has shape {tuple(x.shape)} but the model expects (N, {shape}) "
                             f"(input_shape {self.input_shape} with a batch dimension); "
                             "reshape or resize the input")
        check_finite(x, "x")
        x = x.to(device=self.device, dtype=torch.float64)
        for b in self._variants[""]:
            x = b.forward(x)
            if isinstance(b, AffineBlock) and b.relu:
                x = torch.relu(x)
        return x

    def nominal_error(self, x0: Tensor) -> tuple[Tensor, float, Guarantee, float]:
        """The float64 output at ``x0`` (``(1, *input_shape)``, flat) and a bound on its L2
        distance from the exact network's output there, from the global layer factors:
        ``Δ_(l+1) <= G_l Δ_l + ||ρ_l||`` (``ρ_l`` the block's own rounding, see
        :meth:`lipbound.ops.base.Op.forward_error`; ReLU and max pooling are 1-Lipschitz).
        Also the guarantee and failure probability of that bound (those of the global
        factors it uses)."""
        self._check_model()
        x0 = check_input(x0, self.input_shape)
        facs = self._global_factors("", self.blocks)
        x = x0.to(device=self.device, dtype=torch.float64)
        delta = 0.0
        for b, f in zip(self.blocks, facs, strict=True):
            x, rho = b.forward_rounding(x)
            # (no square or product lost below the normal range: rounded up, scaled)
            rn = norm_up(rho)
            delta = product_up((f.value, delta)) + rn if delta > 0 else rn
            if isinstance(b, AffineBlock) and b.relu:
                x = torch.relu(x)
        g = combine_guarantees([f.guarantee for f in facs]) if facs else Guarantee.CERTIFIED
        fp = 0.0 if g == Guarantee.CERTIFIED else min(1.0, sum(f.failure_prob for f in facs))
        return x.reshape(-1), delta * (1 + 1e-6), g, fp

    def _blocks_for(self, output_map: Tensor | None) -> tuple[str, list[Block]]:
        if output_map is None:
            return "", self.blocks
        try:
            raw = torch.as_tensor(output_map)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"output_map must be a (m, n_out) matrix (a tensor), got "
                             f"{type(output_map).__name__}") from exc
        check_plain_tensor(raw, "output_map")  # (a complex map would lose its imaginary part)
        c = raw.to(dtype=torch.float64, device=self.device)
        if c.dim() == 1:
            c = c.unsqueeze(0)
        n_out = math.prod(self.output_shape)
        if c.dim() != 2 or c.shape[1] != n_out:
            raise InputError(f"output_map must have shape (m, {n_out}) for this model's "
                             f"{n_out} outputs, got {tuple(c.shape)}")
        if c.shape[0] == 0:
            raise InputError(f"output_map has no rows (shape {tuple(c.shape)}); it needs at "
                             f"least one row: a (m, {n_out}) matrix with m >= 1, or None for "
                             "the whole output")
        check_finite(c, "output_map", "pass a finite matrix")
        key = hashlib.sha1(c.detach().cpu().numpy().tobytes()).hexdigest()
        if key not in self._variants:
            from .ops.base import ReshapeOp
            extra = []
            if len(self.output_shape) != 1:
                extra.append(ReshapeOp("flatten-output", self.output_shape, (n_out,)))
            extra.append(LinearOp("output_map", c, None))
            blocks = build_blocks(self.ops + extra)
            # the map is multiplied into the last layers: their product is a new matrix, whose
            # squares may underflow like any block's (a map of 1e-100 after a layer of 1e-100
            # gave a bound of 0)
            _check_magnitudes(blocks)
            self._variants[key] = blocks
        return key, self._variants[key]

    def _blocks_for_scale(self, scale: Tensor) -> tuple[str, list[Block]]:
        """The blocks of ``diag(scale) f``: the network followed by an elementwise scale
        (``scale`` shaped like the output; a non-negative vector such as the secant slopes
        of a ReLU after the network, :mod:`lipbound.residual`), folded into the last affine
        layer like a batch norm. Cheap for any output size (no ``n x n`` output map)."""
        from .ops.base import DiagOp

        c = scale.detach().to(dtype=torch.float64, device=self.device).reshape(
            self.output_shape)
        key = "scale:" + hashlib.sha1(c.cpu().numpy().tobytes()).hexdigest()
        if key not in self._variants:
            # each bound of a residual block has slopes of its own: the caches of earlier
            # scales (a dense matrix per layer, remembered factors) are dropped, so that many
            # bounds (a radius search) do not pile them up; the counts of draws stay (the
            # union bound of reused factors counts every computation)
            for old in [k for k in self._variants if k.startswith("scale:")]:
                del self._variants[old]
                for store in (self._dense, self._dense_requests, self._subsets, self._warm,
                              self._memo):
                    for k in [k for k in store if k[0] == old]:
                        del store[k]
            op = DiagOp("slopes", self.output_shape, c, torch.zeros_like(c))
            blocks = build_blocks(self.ops + [op])
            _check_magnitudes(blocks)
            self._variants[key] = blocks
        return key, self._variants[key]

    def _n_spectral(self, blocks: list[Block]) -> int:
        """Number of layers that may use the probabilistic route (they share the budget)."""
        return max(1, sum(isinstance(b, AffineBlock) and b.mixing is not None for b in blocks))

    def _gen(self, i: int, draw: int = 0) -> torch.Generator:
        """The generator of the start vectors of layer ``i``'s ``draw``-th computation.

        Salted so that the start vectors are not the draws of ``torch.manual_seed(seed)``
        that users commonly initialise their weights with (the start must be independent of
        the operator). Every later computation of a layer (``draw >= 1``: sweeps, radius
        searches, many inputs on one analyzer) gets its own stream, so its start vector is
        independent of everything earlier results decided, its operator included."""
        if draw == 0:
            salted = ((self.seed * 1_000_003 + i) ^ 0x2545F4914F6CDD1D) & ((1 << 63) - 1)
        else:
            digest = hashlib.sha256(f"lipbound:{self.seed}:{i}:{draw}".encode()).digest()
            salted = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
        return torch.Generator().manual_seed(salted)

    def _next_draw(self, key: str, i: int) -> int:
        """The stream index (:meth:`_gen`) of this computation of layer ``i``'s local factor
        under this seed: 0 for the first computation of the layer under any output map, then
        1, 2, ... across all of them. The computations under each output map are counted too
        (``(key, i, seed)``, the union bound of :meth:`_reuse`).

        Since session 22 the stream index is counted per layer, not per output map: before,
        the first computation of a layer under an ``output_map`` drew the start vector of
        the first computation without one (the same stream), so a radius chosen from a
        plain bound and then tested with a margin map was tested with the draws that chose
        it. A single output map (and the first computation under any) keeps its streams."""
        n = self._draws.get((key, i, self.seed), 0)
        self._draws[(key, i, self.seed)] = n + 1
        # (None never names an output map: those are "" or a digest)
        d = self._draws.get((None, i, self.seed), 0)
        self._draws[(None, i, self.seed)] = d + 1
        return d

    def _bar(self, progress: bool, what: str, blocks: list[Block]) -> NullBar:
        """A bar over the layers of one bound (see :mod:`lipbound._progress`)."""
        if not progress:  # the usual case, on the hot path: no work at all
            return NULL_BAR
        return progress_bar(progress, len(blocks), f"{what} {self.name}", "layer")

    # ------------------------------------------------------------------ global
    def _global_factors(self, key: str, blocks: list[Block],
                        bar: NullBar = NULL_BAR) -> list[SpectralBound]:
        if key in self._global:
            return self._global[key]
        delta = self.failure_prob / self._n_spectral(blocks)
        show = bar is not NULL_BAR
        # layers whose products are small run side by side, one core each (the factors are
        # independent, and each is computed as on one thread alone); the others first, one
        # after another with every thread. Not on the forced exact route: its memory check
        # sees one layer's matrix at a time
        flops = [_lanczos_flops(b) for b in blocks]
        small = [i for i, f in enumerate(flops) if f <= _parallel.MAX_FLOPS] \
            if self.spectral != "exact" else []
        workers = _parallel.workers_for(self.device, [flops[i] for i in small])
        threaded = set(small) if workers > 1 else set()
        out: list[SpectralBound | None] = [None] * len(blocks)
        n_done = 0
        for i, b in enumerate(blocks):
            if i in threaded:
                continue
            if show:
                bar.update(int(n_done > 0))
                bar.label(_layer_label(i, b))
            out[i] = self._global_factor(b, i, delta)
            n_done += 1
        if threaded:
            todo = sorted(threaded)
            if show:
                bar.update(int(n_done > 0))
                bar.label(f"{len(todo)} layers on {workers} threads")

            got = _parallel.run_in_threads(
                lambda i: self._global_factor(blocks[i], i, delta), todo, workers,
                cost=flops.__getitem__, done=(lambda _i: bar.update()) if show else None)
            for i, sb in zip(todo, got, strict=True):
                out[i] = sb
        for i, b in enumerate(blocks):  # the rounding of matrices formed as products of layers
            extra = b.err_norm() if isinstance(b, AffineBlock) else 0.0
            if extra > 0 and not math.isinf(out[i].value):
                out[i] = replace(out[i], value=out[i].value + extra)
            if isinstance(b, AffineBlock) and b.fold_factor > 1.0:  # folded layers' rounding
                out[i] = replace(out[i], value=out[i].value * b.fold_factor)
        self._global[key] = out
        return out

    def _global_factor(self, b: Block, i: int, delta: float) -> SpectralBound:
        """The global factor of block ``i`` (independent of every other block's)."""
        if isinstance(b, PoolBlock):
            v = b.op.global_constant()
            return SpectralBound(v, Guarantee.CERTIFIED, 0.0, "closed-form", v)
        if b.mixing is None:  # (its folded layers' rounding: _global_factors multiplies)
            s = b.s_in
            v = float(s.abs().max()) * (1 + SAFETY) if s is not None else 1.0
            return SpectralBound(v, Guarantee.CERTIFIED, 0.0, "closed-form", v)
        frob = math.sqrt(float(b.sq_rows(torch.ones(1, b.in_dim, dtype=torch.float64,
                                                    device=self.device)).sum()))
        with _naming(b.name):
            early, (wave, step) = self._lanczos_first(b, i, frob, delta)
            if early is not None:
                return early
            # the hint's plane wave serves as the probe when it sits at the frequency the
            # circulant bound finds (its first power step is already made)
            alts, probe = self._block_alternatives(b, frob, wave=wave)
            if wave is None or probe is not wave[1]:
                step = None
            return self._global_run(b, i, delta, alts, probe, step)

    def _global_run(self, b: AffineBlock, i: int, delta: float,
                    alts: tuple[tuple[float, str], ...],
                    probe: Tensor | None = None,
                    probe_step: tuple[float, Tensor] | None = None) -> SpectralBound:
        """``spectral_upper`` on a whole block (every row and column), with the block's own
        random draws (``_gen(10_000 + i)``)."""
        return spectral_upper(
            b.lin, b.lin_t, n_in=b.in_dim, n_out=b.out_dim,
            cols=torch.arange(b.in_dim, device=self.device),
            rows=torch.arange(b.out_dim, device=self.device), device=self.device,
            dense=b.dense_fn(), apply_flops=b.apply_flops(), mode=self.spectral,
            steps=self.lanczos_steps, failure_prob=delta, generator=self._gen(10_000 + i),
            certified_alternatives=alts, fast_error=_fast_error(b), block=_block_size(b),
            probe=probe, probe_step=probe_step)

    def _lanczos_first(self, b: AffineBlock, i: int, frob: float, delta: float
                       ) -> tuple[SpectralBound | None,
                                  tuple[tuple[int, Tensor] | None,
                                        tuple[float, Tensor] | None]]:
        """The global factor of a stride-1 convolution whose circulant bound is predicted to
        lose to the Lanczos run, computed without it unless needed (see Returns for when the
        prediction says otherwise or cannot be made).

        Prediction (:func:`lipbound.ops.conv.circulant_hint`, two products more): ``c_lo``,
        a lower estimate of the circulant bound, exceeds ``ℓ sqrt(f)`` (``ℓ`` a Rayleigh
        quotient of the hint's plane wave, ``f`` the completed run's KW factor) by
        ``HINT_MARGIN``. Then Lanczos runs with the Frobenius alternative only; the circulant
        bound is computed afterwards only if the run's value is above ``c_lo`` (where it
        could be smaller), and the smaller certified-or-probabilistic value is kept. The
        result is never looser than the usual order's (which may also stop the run early
        against the circulant bound); a wrong prediction costs time only.

        Returns ``(factor, (None, None))`` when Lanczos ran first; otherwise ``(None, (wave,
        step))`` with the hint's ``wave = (frequency, plane wave)`` and its first power step
        ``step = (ℓ, A^T A wave)`` (the usual order may take them as its probe), both
        ``None`` when no hint was computed."""
        nothing = (None, None)
        m = b.mixing
        if (not isinstance(m, ConvOp) or self.spectral == "exact"
                or b.apply_flops() < PROBE_MIN_FLOPS):
            return None, nothing
        hint = circulant_hint(m)
        if hint is None:
            return None, nothing
        c_lo, vec, fidx = hint
        if vec.numel() != b.in_dim:
            return None, nothing
        for s in (b.s_in, b.s_out):
            if s is not None:
                c_lo *= float(s.abs().max())
        x = vec.to(self.device).reshape(1, -1)
        y = b.lin(x)
        ny = float(torch.linalg.vector_norm(y))
        z = b.lin_t(y)
        ell = float(torch.linalg.vector_norm(z)) / ny if ny > 0 else 0.0
        n = min(b.in_dim, b.out_dim)
        # the KW share of the run's failure probability (all of it without a posteriori
        # bound, n < 3), as in spectral.run_parameters
        f = kw_factor(n, min(self.lanczos_steps, n), delta / 2 if n >= 3 else delta)
        if f is None or not (math.isfinite(ell) and ell > 0
                             and c_lo > ell * math.sqrt(f) * (1 + HINT_MARGIN)):
            return None, ((fidx, vec), (ell, z))  # (spectral_upper checks the step)
        sb = self._global_run(b, i, delta, ((frob * (1 + SAFETY), "frobenius"),))
        if sb.value > c_lo * (1 + SAFETY):  # the circulant bound (>= c_lo) might be smaller
            alts, _ = self._block_alternatives(b, frob, with_probe=False)
            for val, label in alts:
                if val < sb.value:
                    sb = SpectralBound(val, Guarantee.CERTIFIED, 0.0, label, sb.estimate,
                                       sb.vector)
        return sb, nothing

    def _block_alternatives(self, b: AffineBlock, frob: float, with_probe: bool = True,
                            wave: tuple[int, Tensor] | None = None
                            ) -> tuple[tuple[tuple[float, str], ...], Tensor | None]:
        """Cheap deterministic upper bounds on ||A|| of a block, and for a convolution whose
        Lanczos run costs enough (``PROBE_MIN_FLOPS``) the circulant bound's test vector
        (:func:`lipbound.ops.conv.circulant_probe`; ``spectral_upper`` may then report the
        circulant bound without a run)."""
        alts = [(frob * (1 + SAFETY), "frobenius")]
        probe = None
        if isinstance(b.mixing, ConvOp):
            # computed when within the default budget, or when it costs well under the
            # Lanczos run it may cut short (2 x steps products; measured on VGG-16 layers)
            budget = max(CIRCULANT_BUDGET, 2.0 * self.lanczos_steps * b.apply_flops())
            c, probe = circulant_probe(b.mixing, budget_flops=budget,
                                       probe=with_probe
                                       and b.apply_flops() >= PROBE_MIN_FLOPS, wave=wave)
            if c is not None:
                for s in (b.s_in, b.s_out):
                    if s is not None:
                        c *= float(s.abs().max())
                alts.append((c * (1 + SAFETY), "fft-circulant"))
        return tuple(alts), probe

    @_without_autograd
    def global_bound(self, *, output_map: Tensor | None = None,
                     progress: bool = False) -> BoundResult:
        """Product of per-layer global constants (method.md rule 8).

        Args:
            output_map: optional matrix C: bound ``C f`` instead of ``f``.
            progress: show a bar over the layers on stderr while the factors are computed
                (only on a terminal, and only after a few seconds: see
                :mod:`lipbound._progress`); the result is the same either way.
        """
        t0 = time.perf_counter()
        progress = check_bool(progress, "progress")
        self._check_model()
        key, blocks = self._blocks_for(output_map)
        if key in self._global:
            facs = self._global[key]
        else:
            with self._bar(progress, "global bound", blocks) as bar:
                facs = self._global_factors(key, blocks, bar)
        layers = []
        # rounded up: a product below the normal range would round on its grid, or to 0
        value = product_up(f.value for f in facs)
        for i, (b, f) in enumerate(zip(blocks, facs, strict=True)):
            layers.append(LayerFactor(i, b.name, b.kind, math.nan, f.value, math.nan,
                                      f.guarantee, f.failure_prob, f.method, b.in_dim,
                                      b.out_dim))
        g = combine_guarantees([f.guarantee for f in facs])
        fp = min(1.0, sum(f.failure_prob for f in facs))
        return BoundResult(value=value, guarantee=g, method="global", quantity=GLOBAL_QUANTITY,
                           eps=None, seconds=time.perf_counter() - t0, layers=tuple(layers),
                           failure_prob=fp, model=self.name, notes=self.notes,
                           source="global")

    # ------------------------------------------------------------------ local
    def _propagate(self, key: str, blocks: list[Block], x0: Tensor, eps: float,
                   stop_before_last: bool = False, bar: NullBar = NULL_BAR,
                   record: list | None = None, nom0: tuple[float, float] = (0.0, 0.0),
                   resume: tuple[int, tuple] | None = None):
        """Run rules 1-8 through the blocks. Returns (layer factors, spectral bounds,
        state before the last block). ``record``: a list that receives, per block, the limits
        the tight bound needs (:mod:`lipbound.tight`); None (the default) records nothing.
        ``nom0``: the nominal error ``(Δ, η)`` of ``x0`` itself, for a network analysed as a
        part of a larger one (:mod:`lipbound.residual`): the exact nominal input is within
        ``Δ`` of ``x0`` in L2 (every coordinate is movable at the input, so ``η`` plays no
        part there); the bound is then relative to that exact point. ``(0, 0)`` (the
        default): ``x0`` is exact. ``resume``: ``(k, state)`` with ``state`` the last item
        an earlier call returned after exactly ``k`` blocks (``stop_before_last`` over ``k +
        1`` blocks) whose first ``k`` blocks are those of ``blocks`` (the same operators),
        with the same ``x0``, ``eps`` and ``nom0``: the run continues at block ``k`` from
        there, and the layer factors and bounds returned are those of blocks ``k`` onwards
        only (the caller keeps the first ``k``' bounds). Used by :mod:`lipbound.residual`
        for a branch's scaled bound after its rows; ``None`` (the default) starts at block
        0."""
        delta = self.failure_prob / self._n_spectral(blocks)
        gl = self._global.get(key)
        x = x0.to(device=self.device, dtype=torch.float64)
        # the computed nominal point against the exact one (rounding): an L2 bound on the
        # movable coordinates (mask d) and a bound on every other coordinate
        nom = nom0
        # (every mask d is 0/1 by construction, as _masked_maps needs: ones here, a boolean
        # cast after each block)
        d = torch.ones(math.prod(self.input_shape), dtype=torch.float64, device=self.device)
        eps_k = eps
        k0 = 0
        if resume is not None:
            k0, (x, d, eps_k, nom) = resume
        layers: list[LayerFactor] = []
        bounds: list[SpectralBound] = []
        n = len(blocks) - (1 if stop_before_last else 0)
        show = bar is not NULL_BAR  # nothing at all on the hot path without a bar
        n_active: int | None = None  # the number of positive entries of d, once known
        for i in range(k0, n):
            b = blocks[i]
            if show:
                bar.update(int(i > 0))
                bar.label(_layer_label(i, b))
            gfac = gl[i].value if gl is not None else math.nan
            if isinstance(b, PoolBlock):
                if record is not None:
                    record.append({"d": d})
                mask = d.reshape(b.in_shape)
                v = b.op.local_constant(mask)
                sb = SpectralBound(v, Guarantee.CERTIFIED, 0.0, "closed-form", v)
                d_out = b.op.propagate_mask(mask).reshape(-1)
                x = b.forward(x)
                # a window with a movable input: (max |δ|)^2 <= Σ_movable δ^2 + η^2; others <= η
                dl, eta = nom
                n_mov = float(d_out.sum())
                nom = (v * dl + (math.sqrt(n_mov) * eta if eta > 0 else 0.0), eta)
            else:
                with _naming(b.name):
                    sb, d_out, x, nom = self._affine_local(
                        b, i, x, nom, d, eps_k, delta, gl[i] if gl is not None else None, key,
                        record)
            # (the active inputs of a layer are the previous layer's active outputs: counted
            # once)
            n_in = int((d > 0).sum()) if n_active is None else n_active
            n_active = int((d_out > 0).sum())
            layers.append(LayerFactor(i, b.name, b.kind, sb.value, gfac, eps_k, sb.guarantee,
                                      sb.failure_prob, sb.method, n_in, n_active))
            bounds.append(sb)
            eps_k = product_up((eps_k, sb.value))  # (rounded up below the normal range)
            d = d_out
        return layers, bounds, (x, d, eps_k, nom)

    @staticmethod
    def _nominal_total(nom: tuple[float, float], d: Tensor) -> float:
        """An L2 bound on the whole nominal error from its two parts."""
        dl, eta = nom
        if eta > 0:
            dl += math.sqrt(float(d.numel() - d.sum())) * eta
        return dl * (1 + 1e-9)

    def _affine_local(self, b: AffineBlock, i: int, x: Tensor, nom: tuple[float, float],
                      d: Tensor, eps_k: float, delta: float, gfac: SpectralBound | None,
                      key: str, record: list | None = None):
        """Rules 2-4 for one affine(-ReLU) block at the computed nominal input ``x``.
        ``nom = (Δ, η)``: the exact nominal input differs from ``x`` by at most ``Δ`` in L2 on
        the movable coordinates (``d``) and by at most ``η`` on each other one. Returns
        (factor, output mask, next computed nominal input, its ``nom``).

        The exact nominal pre-activation is within ``e_i = ||a_i^T D|| Δ + |a_i|_1 η + ρ_i``
        of the computed one (Cauchy-Schwarz, absolute row sums, and the block's own rounding
        ``ρ``), so the slopes use ``y0 + e`` (rule 1's slope only grows with ``y0`` and
        ``ȳ``). Rows that are off at both nominal points carry no error; of the others, the
        movable ones (``S``, where ``r = 1``, so ``||S A D|| <= ||R A D||``, the factor computed
        here) give ``Δ' <= ||R A D|| Δ + ||(|A|_1 η + ρ)_S||`` and the rest ``η' = max e``: the
        error grows like the local bound, not like worst-case interval arithmetic (which loses
        every sign in VGG-16's last layers)."""
        y0, rho = b.forward_rounding(x)
        y0 = y0.reshape(-1)
        if y0.numel() and not math.isfinite(float(y0.abs().amax())):  # (NaN propagates)
            # an inf or NaN pre-activation (inf - inf, inf * 0 further on) has no sign: its
            # ReLU looked off (NaN comparisons are false), and the bound was 0
            raise InputError(f"the float64 forward pass at x0 overflows (inf/NaN "
                             f"pre-activations in layer {b.name}): the local bound needs "
                             "its values; rescale the input or the weights")
        rn = torch.sqrt(b.sq_rows(d.unsqueeze(0))[0].clamp_min(0))
        # a square beyond float64 (a weight above 1.3e154) makes a row norm inf, or NaN where
        # it meets a zero of the mask or of a convolution's padding (inf * 0): such a row may
        # move, by an unknown amount (NaN would leave it out: a factor of 0 was reported)
        rn = torch.where(torch.isnan(rn), math.inf, rn)
        moving = rn > 0
        dl, eta = nom
        local = rho  # the block's own rounding and the error of the non-movable inputs
        if eta > 0:
            # (+ UNDERFLOW: the product's rounding below the normal range)
            local = local + b.row_abs().to(rho.device) * (eta * (1 + 1e-6)) + UNDERFLOW
        # (+ 2 UNDERFLOW: the products' rounding below the normal range, here and in ybar's
        # eps_k * rn, where rounding 1.4 of the smallest subnormal down to 1 made a row look
        # dead that turns on)
        e_out = (local + rn * (dl * (1 + 1e-6)) if dl > 0 else local) + 2 * UNDERFLOW
        if record is not None:  # (the tight bound's limits: lipbound.tight)
            record.append({"y0": y0, "e_out": e_out, "rn": rn, "eps_k": eps_k, "r": None})
        if b.relu:
            r, on, may_be_on = _relu_slopes(y0, e_out, rn, eps_k, moving, b.fold_factor)
            if record is not None:
                record[-1]["r"] = r
            d_out = on.to(torch.float64)  # (0/1: _masked_maps relies on it)
            x_next = torch.relu(y0).reshape(1, *b.out_shape)
            # the next nominal error (before the factor, so that these vectors are freed
            # before its Lanczos run): a ReLU off at both the computed and the exact nominal
            # point adds none
            on_d = may_be_on & on
            off_d = may_be_on & ~on
            del may_be_on, on
        else:
            r = moving.to(torch.float64)
            d_out = r.clone()  # (0/1: _masked_maps relies on it)
            on_d, off_d = moving, ~moving  # (d_out > 0, and its complement)
            x_next = y0.reshape(1, *b.out_shape)
        # scaled before squaring: torch's norm of entries below 1e-154 is 0
        dl_out = norm_up(torch.where(on_d, local, 0.0)) * (1 + 1e-6)
        eta_out = float(torch.where(off_d, e_out, 0.0).max()) if bool(off_d.any()) else 0.0
        del on_d, off_d, local, e_out, rho
        sb, d_out, x_next = self._affine_factor(b, i, r, d, d_out, x_next, rn, delta, gfac, key)
        if dl > 0:
            dl_out += product_up((sb.value, dl, 1 + 1e-6))
        return sb, d_out, x_next, (dl_out, eta_out)

    def _affine_factor(self, b: AffineBlock, i: int, r: Tensor, d: Tensor, d_out: Tensor,
                       x_next: Tensor, rn: Tensor, delta: float, gfac: SpectralBound | None,
                       key: str):
        """Rule 4: an upper bound on ``||R A D||`` (exact, closed form, certified
        alternatives, remembered, or Lanczos)."""
        if b.mixing is None:
            # diagonal linear part: ||R diag(s) D|| = max |r_i s_i| over movable coordinates
            # (r <= 1 mathematically, so the value never exceeds the global max |s_i|)
            s_ = b.s_in.abs() if b.s_in is not None else torch.ones_like(r)
            gmax = float(s_.max()) * (1 + SAFETY) if b.s_in is not None else 1.0
            v = min(float((r * s_ * d).max()) * (1 + SAFETY), gmax) if r.numel() else 0.0
            v *= b.fold_factor  # (the folded layers' own rounding: their exact scales)
            return SpectralBound(v, Guarantee.CERTIFIED, 0.0, "closed-form", v), d_out, x_next
        cols, rows = _positive(d), _positive(r)
        # ||R A D||_F, scaled by its largest row so that no square underflows (r may be tiny)
        rrn = r * rn
        top = float(rrn.max()) if rrn.numel() else 0.0
        frob = top * math.sqrt(float(((rrn / top) ** 2).sum())) * (1 + SAFETY) \
            if 0.0 < top < math.inf else 0.0 if top == 0.0 else math.inf
        alts = [(frob, "frobenius")]
        if gfac is not None and gfac.guarantee == Guarantee.CERTIFIED:
            alts.append((float(r.max()) * gfac.value if r.numel() else 0.0,
                         "max(r)*global"))

        def mv(v: Tensor) -> Tensor:
            return b.lin(v * d) * r

        def rmv(y: Tensor) -> Tensor:
            return b.lin_t(y * r) * d

        # the certified alternative max(r)*global exists only once the global factors are
        # known: factors computed with and without it are remembered apart, and so are those
        # of other settings (route, steps, failure budget, seed of the draws)
        memo_key = (key, i, gfac is not None, self.spectral, self.lanczos_steps,
                    self.failure_prob, self.seed)
        self._queries[memo_key] = self._queries.get(memo_key, 0) + 1
        reused = self._reuse(memo_key, r, d)
        if reused is not None:
            return reused, d_out, x_next
        draw = self._next_draw(key, i)
        dense = b.dense_fn()
        lo, hi = sorted((int(cols.numel()), int(rows.numel())))
        if dense is None and (self.spectral == "exact" or (
                self.spectral == "auto" and 4.0 * hi * lo * lo <= EXACT_BUDGET)):
            # the exact route will be taken: keep the block's matrix across calls
            dense = self._cached_dense(b, key, i)
        warm_key = (key, i)
        na, ma = int(cols.numel()), int(rows.numel())
        everything = na == b.in_dim and ma == b.out_dim  # nothing to leave out
        if dense is not None and not everything and (
                na * ma <= COMPACT_FRACTION * b.in_dim * b.out_dim
                or lo * lo * hi <= EXACT_BUDGET):
            # the masked matrix restricted to its active rows and columns, formed once: every
            # later product (Lanczos) reads only that part. Same operator, same start vector
            # (drawn on the active coordinates in the same order).
            mc = _compact(b, dense, rows, cols, r, d)
            prod = DenseProducts(mc)
            sb = spectral_upper(
                prod.mv, prod.rmv, n_in=na, n_out=ma,
                cols=torch.arange(na, device=self.device),
                rows=torch.arange(ma, device=self.device), device=self.device,
                dense=lambda: mc, apply_flops=float(na * ma), mode=self.spectral,
                steps=self.lanczos_steps, failure_prob=delta, generator=self._gen(i, draw),
                certified_alternatives=tuple(alts), exact_budget=EXACT_BUDGET,
                block=DENSE_BLOCK if na * ma >= DENSE_BLOCK_MIN else 1)
            sb = replace(sb, vector=None)  # in compacted coordinates: no warm start
        else:
            dense_masked = None
            if dense is not None:
                def dense_masked() -> Tensor:
                    return dense() * r[:, None] * d[None, :]
            warm = [self._warm[warm_key]] if self.warm_start and warm_key in self._warm \
                else None
            # the Lanczos products run on the channels that can move (same operator, same
            # compact coordinates in the same order, so the same start vector)
            lb, lr, ld, lrows, lcols, in_ch = self._channel_subset(b, key, i, r, d, rows, cols)
            sb = spectral_upper(mv, rmv, n_in=b.in_dim, n_out=b.out_dim, cols=cols, rows=rows,
                                device=self.device, dense=dense_masked,
                                apply_flops=b.apply_flops(),
                                mode=self.spectral, steps=self.lanczos_steps,
                                failure_prob=delta, generator=self._gen(i, draw),
                                certified_alternatives=tuple(alts), exact_budget=EXACT_BUDGET,
                                warm=warm, fast_error=_fast_error(lb), block=_block_size(b),
                                compact_maps=_masked_maps(lb, lr, ld, lrows, lcols))
            if sb.vector is not None and in_ch is not None and sb.vector.numel() != b.in_dim:
                # an image of the channel subset's maps: back to the block's input space
                full = sb.vector.new_zeros(b.in_shape[0], b.in_dim // b.in_shape[0])
                full.index_copy_(0, in_ch, sb.vector.reshape(in_ch.numel(), -1))
                sb = replace(sb, vector=full.reshape(-1))
        # max(r) times the global factor already bounds the exact block: the global factor
        # holds the same two terms
        if sb.method != "max(r)*global":
            extra = b.err_norm(r, d)  # the rounding of a matrix formed as a product of layers
            if extra > 0 and not math.isinf(sb.value):
                sb = replace(sb, value=sb.value + extra)
            if b.fold_factor > 1.0:  # the folded layers' (batch norm's) own rounding
                sb = replace(sb, value=sb.value * b.fold_factor)
            if alts[-1][1] == "max(r)*global" and alts[-1][0] < sb.value:
                # with those terms the other alternatives can pass it: it stays the bound
                # (a local factor is never above the global one)
                sb = replace(sb, value=alts[-1][0], guarantee=Guarantee.CERTIFIED,
                             failure_prob=0.0, method="max(r)*global")
        if sb.vector is not None:
            self._warm[warm_key] = sb.vector
        self._remember(memo_key, r, d, sb)
        return sb, d_out, x_next

    def _channel_subset(self, b: AffineBlock, key: str, i: int, r: Tensor, d: Tensor,
                        rows: Tensor, cols: Tensor):
        """``(block, r, d, rows, cols, in_ch)`` for the Lanczos products of ``R A D``: for an
        ungrouped convolution whose masks leave whole channels out (a ReLU that cannot turn
        on anywhere in a channel, an input channel that cannot move), the convolution
        between the remaining channels (:meth:`AffineBlock.channel_subset`) with the masks
        and active coordinates renumbered on it; otherwise the block itself (``in_ch`` None).
        The two operators have the same nonzero entries, so the same norm, and the active
        coordinates keep their order. CIFAR-10's conv2 at eps = 0.1 keeps 24 of its 32
        output channels (and conv3 24 of 32 inputs): their products are 25 % cheaper."""
        m = b.mixing
        plain = (b, r, d, rows, cols, None)
        if not (isinstance(m, ConvOp) and m.groups == 1 and len(b.in_shape) == 3
                and tuple(b.in_shape) == tuple(m.in_shape)
                and tuple(b.out_shape) == tuple(m.out_shape)):
            return plain
        c_in, c_out = b.in_shape[0], b.out_shape[0]
        in_ch = torch.nonzero(d.reshape(c_in, -1).amax(1) > 0).reshape(-1)
        out_ch = torch.nonzero(r.reshape(c_out, -1).amax(1) > 0).reshape(-1)
        ni, no = int(in_ch.numel()), int(out_ch.numel())
        if ni == 0 or no == 0 or ni * no > (1.0 - CHANNEL_SUBSET_MIN) * c_in * c_out:
            return plain
        hit = self._subsets.get((key, i))
        if hit is not None and torch.equal(hit[0], in_ch) and torch.equal(hit[1], out_ch):
            sub = hit[2]
        else:
            with torch.inference_mode(False):  # a cache: ordinary tensors
                sub = b.channel_subset(in_ch, out_ch)
            self._subsets[(key, i)] = (in_ch, out_ch, sub)

        r2 = r.reshape(c_out, -1).index_select(0, out_ch).reshape(-1)
        d2 = d.reshape(c_in, -1).index_select(0, in_ch).reshape(-1)
        # rows / cols (the positive entries of r / d, sorted) renumbered on the subset: every
        # one lies in a kept channel, and keeping whole channels in order keeps their order,
        # so they are the positive entries of r2 / d2 (no integer division per index)
        return (sub, r2, d2, _positive(r2), _positive(d2), in_ch)

    def _remember(self, memo_key: tuple, r: Tensor, d: Tensor,
                  sb: SpectralBound) -> None:
        if (r.numel() + d.numel()) * MEMO_ENTRIES > MEMO_ELEMENTS:
            return
        entries = self._memo.setdefault(memo_key, [])
        entries.append(_MemoEntry(r.clone(), d.clone(), replace(sb, vector=None)))
        del entries[:-MEMO_ENTRIES]

    def _reuse(self, memo_key: tuple, r: Tensor, d: Tensor) -> SpectralBound | None:
        """A layer factor computed earlier for the same layer, when it provably bounds this
        one. ``||R A D|| <= ||R' A D'||`` whenever ``0 <= r <= r'`` and ``0 <= d <= d'``
        elementwise (``R = S R'``, ``D = D' T`` with diagonal ``0 <= S, T <= I``), whatever
        input produced the masks. The bound of such a dominating operator is reused when it
        is within ``reuse_tol`` of a lower estimate of this operator's norm (the estimate of a
        dominated operator, which is below this one's norm), or always when ``reuse_tol`` is
        ``inf``; with ``reuse_tol = 0`` only a factor of the very same operator is reused
        (same masks). A reused factor keeps its guarantee; a reused probabilistic factor
        carries a union bound over the layer's computations (the same operator) or queries (a
        dominating one) so far, as which computation supplies it depends on earlier results
        (each computation draws its own start vector, :meth:`_gen`)."""
        entries = self._memo.get(memo_key)
        if not entries:
            return None
        upper: SpectralBound | None = None
        lower = 0.0
        for e in entries:
            if e.r.shape != r.shape or e.d.shape != d.shape:
                continue
            if torch.equal(e.r, r) and torch.equal(e.d, d):
                # which earlier computation has these masks depends on earlier results (the
                # radii a search chose, what a sweep skipped): a union bound over the layer's
                # computations so far, each of which failed with probability <= its delta
                n = self._draws.get((memo_key[0], memo_key[1], self.seed), 1)
                if n > 1 and e.sb.failure_prob > 0:
                    return replace(e.sb, failure_prob=min(1.0, e.sb.failure_prob * n))
                return e.sb
            if self.reuse_tol <= 0:
                continue
            if bool((r <= e.r).all()) and bool((d <= e.d).all()):
                if upper is None or e.sb.value < upper.value:
                    upper = e.sb
            elif bool((e.r <= r).all()) and bool((e.d <= d).all()):
                lower = max(lower, e.sb.estimate)
        if upper is not None and (math.isinf(self.reuse_tol) or (
                lower > 0 and upper.value <= (1 + self.reuse_tol) * lower)):
            # Which factor is reused (or whether one is) depends on earlier results. Each
            # computation of the layer drew a fresh start vector after its operator was fixed
            # (see _gen), so each failed with probability <= delta whatever chose it; a union
            # bound over the layer's queries so far (at least its computations) covers the
            # choice. The estimate must describe this operator: the dominated one's is below
            # its norm.
            queries = self._queries.get(memo_key, 1) + self._skipped_queries
            fp = min(1.0, upper.failure_prob * queries)
            return replace(upper, method=f"reused {upper.method}", estimate=lower,
                           failure_prob=fp)
        return None

    def _cached_dense(self, b: AffineBlock, key: str, i: int):
        """The block's matrix, formed once when it is small enough to keep, so that repeated
        exact SVDs (radius bisection, sweeps) skip it: a convolution's by scattering its taps
        (on the first request only its masked submatrix, see :class:`_LazyConvMatrix`), any
        other block's by applying it to basis vectors."""
        if b.in_dim * b.out_dim > DENSE_CACHE_ELEMENTS:
            return None
        ck = (key, i)
        if isinstance(b.mixing, ConvOp):
            lazy = _LazyConvMatrix(b, self._dense, ck)
            n = self._dense_requests[ck] = self._dense_requests.get(ck, 0) + 1
            if n == 1 and ck not in self._dense:
                # a single bound (fresh analyzer) needs only its masked submatrix (MNIST conv2:
                # 1 ms instead of 3.4 ms); the whole matrix is kept from the second request on
                return lazy
            mat = lazy()
        else:
            mat = self._dense.get(ck)
            if mat is None:
                cols = torch.arange(b.in_dim, device=self.device)
                rows = torch.arange(b.out_dim, device=self.device)
                mat = self._dense[ck] = _materialize(b.lin, b.lin_t, b.in_dim, b.out_dim, cols,
                                                     rows, self.device)
        return lambda: mat

    def _check(self, x0: Tensor, eps: float) -> tuple[Tensor, float]:
        self._check_model()
        eps = check_eps(eps)
        x0 = check_input(x0, self.input_shape)
        return x0, eps

    @_without_autograd
    def local_bound(self, x0: Tensor, eps: float, *, output_map: Tensor | None = None,
                    progress: bool = False, tight: bool = False,
                    tight_rows: int | None = None) -> BoundResult:
        """Upper bound on the local Lipschitz constant of ``f`` (or ``C f``) relative to x0
        over the L2 ball of radius ``eps`` (method.md rules 1-8).

        Args:
            x0: the nominal input, shape ``(1, *input_shape)``.
            eps: the ball radius (> 0, finite).
            output_map: optional matrix C: bound ``C f`` instead of ``f``.
            progress: show a bar over the layers on stderr (only on a terminal, and only
                after a few seconds: see :mod:`lipbound._progress`); the result is the same
                either way.
            tight: also compute the centre-plus-deviation bound (:mod:`lipbound.tight`) and
                report the smaller of it and the paper's product (a note says which, with
                both values). Costs vector-Jacobian products: the outputs plus the rows of
                the units that may switch. Beyond ``tight_rows`` rows, the hybrid: the
                paper's factors of the first blocks times the construction on the rest of
                the network from the earliest block whose rows fit (the same guarantee;
                :func:`lipbound.tight.tight_local_bound`); when even the outputs do not fit,
                the paper's product alone, with a note.
            tight_rows: the budget of those rows, an integer >= 1 (``None``: the default,
                :data:`TIGHT_ROWS`); only with ``tight=True`` (a budget given with
                ``tight=False`` is refused: :func:`lipbound.validation.check_tight`).
        """
        t0 = time.perf_counter()
        progress = check_bool(progress, "progress")
        x0, eps = self._check(x0, eps)
        tight_rows = check_tight(tight, tight_rows) or TIGHT_ROWS
        key, blocks = self._blocks_for(output_map)
        record: list | None = [] if tight else None
        with self._bar(progress, "local bound", blocks) as bar:
            layers, bounds, state = self._propagate(key, blocks, x0, eps, bar=bar,
                                                    record=record)
        nominal = self._nominal_total(state[3], state[1])
        local_nominal = nominal  # (valid under the local factors' event)
        value = product_up(sb.value for sb in bounds)  # (rounded up below the normal range)
        local_value = value
        global_note = None
        g = combine_guarantees([sb.guarantee for sb in bounds]) if bounds else Guarantee.EXACT
        fp = min(1.0, sum(sb.failure_prob for sb in bounds))
        notes = list(self.notes)
        source = "product"
        if key in self._global:
            gv = product_up(f.value for f in self._global[key])
            gg = combine_guarantees([f.guarantee for f in self._global[key]])
            if gv < value and (gg == Guarantee.CERTIFIED or g != Guarantee.CERTIFIED):
                global_note = ("the global bound was smaller than the layer-wise local product "
                               "and is reported instead")
                notes.append(global_note)
                gfp = min(1.0, sum(f.failure_prob for f in self._global[key]))
                # min(local, global) fails if either fails: the probabilities add up, unless
                # the reported global bound is certified (then it cannot fail)
                fp = 0.0 if gg == Guarantee.CERTIFIED else min(1.0, fp + gfp)
                value, g, source = gv, gg, "global"
                nominal = math.nan  # from the local factors: not covered by this guarantee
        if g == Guarantee.CERTIFIED:
            fp = 0.0
        if record is not None:
            value, g, fp, nominal, more, tight_used = self._tight(
                blocks, x0, eps, record, bounds, tight_rows, value, g, fp, nominal,
                local_nominal, local_value)
            if tight_used:
                source = "tight"
                if global_note is not None:
                    # the tight bound is reported, not the global one (its note says both)
                    notes.remove(global_note)
            notes.append(more)
        return BoundResult(value=value, guarantee=g, method="local", quantity=LOCAL_QUANTITY,
                           eps=eps, seconds=time.perf_counter() - t0, layers=tuple(layers),
                           failure_prob=fp, model=self.name, notes=tuple(notes),
                           nominal_error=nominal, source=source)

    def _tight(self, blocks: list[Block], x0: Tensor, eps: float, record: list,
               bounds: list[SpectralBound], tight_rows: int, value: float, g: Guarantee,
               fp: float, nominal: float, local_nominal: float,
               local_value: float | None = None
               ) -> tuple[float, Guarantee, float, float, str, bool]:
        """The smaller of the paper's bound (``value``, ``g``, ``fp``) and the tight one
        (:func:`lipbound.tight.tight_local_bound`), a note saying which was reported, and
        whether it was the tight one.

        The tight bound's norms are exact; its limits use the paper's radii, so it holds
        under the same event as the local product (certified when that is). So does the
        nominal error from the local factors (``local_nominal``), reported with it: not a
        NaN that sends callers (the radius search) to the global factors' nominal error, whose
        failure probability the tight result does not count. ``local_value``: the paper's
        (local) product, when ``value`` is the global bound instead (the note gives both)."""
        from ._rounding import g_up
        from .tight import tight_local_bound

        # what ``value`` is, for the notes
        what = ("the global bound" if local_value is not None and local_value != value
                else "the paper's product")
        x = x0.to(device=self.device, dtype=torch.float64)
        out = tight_local_bound(blocks, x, eps, record, bounds, max_rows=tight_rows)
        # (upper bounds in the notes rounded up: lipbound._rounding)
        if out.value is None:
            return value, g, fp, nominal, (f"tight bound not formed ({out.reason}): {what} "
                                           f"{g_up(value, 6)} is reported"), False
        lg, lfp = _product_guarantee(bounds)
        how = _tight_how(blocks, out)
        if out.value < value:
            paper = value if local_value is None else local_value
            note = (f"tight bound ({how}) {g_up(out.value, 6)} reported; the paper's product is "
                    f"{g_up(paper, 6)}")
            if paper != value:
                note += f" and the global bound {g_up(value, 6)}"
            # the nominal error from the local factors: valid under the local product's event
            # (the hybrid's head is those factors themselves)
            return out.value, lg, lfp, local_nominal, note, True
        return value, g, fp, nominal, (f"{what} {g_up(value, 6)} reported; the tight bound "
                                       f"({how}) is {g_up(out.value, 6)}"), False

    def local_bound_rows(self, x0: Tensor, eps: float, output_map: Tensor, *,
                         tight: bool = False, tight_rows: int | None = None) -> RowBounds:
        """Local bounds for each row of ``output_map`` separately, in one pass: all layers but
        the last are shared, and the last factor of row j is the exact norm
        ``||c_j^T A D||`` (a vector norm).

        With ``tight=True`` each row's value is the smaller of that and the row's own
        centre-plus-deviation bound (:mod:`lipbound.tight`: the deviation terms shared, the
        tails per row), under the same guarantee; ``tight_rows`` as in :meth:`local_bound`.
        """
        tight_rows = check_tight(tight, tight_rows) or TIGHT_ROWS
        rb = self._local_bound_rows(x0, eps, output_map, tight_rows if tight else None)
        # an ordinary tensor for the caller (the computation ran without autograd)
        return replace(rb, values=rb.values.clone())

    @_without_autograd
    def _local_bound_rows(self, x0: Tensor, eps: float, output_map: Tensor,
                          tight_rows: int | None = None) -> RowBounds:
        """Local bounds for each row of ``output_map`` separately, in one pass: all layers but
        the last are shared, and the last factor of row j is the exact norm
        ``||c_j^T A D||`` (a vector norm)."""
        x0, eps = self._check(x0, eps)
        key, blocks = self._blocks_for(output_map)
        last = blocks[-1]
        if not isinstance(last, AffineBlock) or last.relu:
            raise InputError("local_bound_rows needs a model whose last layer is affine")
        record: list | None = [] if tight_rows is not None else None
        layers, bounds, (x, d, eps_k, nom) = self._propagate(key, blocks, x0, eps,
                                                              stop_before_last=True,
                                                              record=record)
        prefix = product_up(sb.value for sb in bounds)  # (rounded up below the normal range)
        m = last.out_dim
        eye = torch.eye(m, dtype=torch.float64, device=self.device)
        rowsv = last.lin_t(eye) * d  # (m, in_dim): rows of A D
        # NaN: an infinite entry times a zero of the mask, a row that may move by an unknown
        # amount
        norms = rowsv.norm(dim=1).nan_to_num(math.inf, math.inf)
        err = last.err_rows(d)  # the rounding of a matrix formed as a product of layers
        if err is not None:
            norms = norms + err
        norms = norms * ((1 + SAFETY) * last.fold_factor)
        # the rows' nominal values (the last block computes C f): the exact row j is within
        # ||e_j^T A D|| Δ + |e_j^T A|_1 η + ρ_j of the computed one
        rows_at_x0, rho = last.forward_rounding(x)
        dl, eta = nom
        # (+ UNDERFLOW: the products' rounding below the normal range)
        nominal = (norms * dl if dl > 0 else 0.0) + rho.reshape(-1) + 2 * UNDERFLOW
        if eta > 0:
            nominal = nominal + last.row_abs().to(nominal.device) * eta
        nominal = nominal * (1 + 1e-6)
        # a factor 0 before the last layer (its input is constant): every row's is 0, also
        # where the last layer's row norm is infinite (inf * 0 was NaN)
        values = norms * prefix if prefix > 0 else torch.zeros_like(norms)
        # (and a row of norm 0 is constant, even after an infinite factor)
        values = torch.where(norms == 0, 0.0, values)
        low = (values < MIN_NORMAL) & (norms > 0)
        if prefix > 0 and bool(low.any()):  # rounded up below the normal range (or to 0)
            for j in torch.nonzero(low).reshape(-1).tolist():
                values[j] = product_up((float(norms[j]), prefix))
        g, fp = _product_guarantee(bounds)
        # the analyzer's caveats (the user's, a float32 model accepted within its rounding),
        # as on every BoundResult (session 25 review: RowBounds carried none of them)
        notes: tuple[str, ...] = self.notes
        if record is not None:
            from .tight import tight_local_bound

            # the per-row tight bounds: limits and factors of the same propagation (the same
            # event), the rows' last factors as the paper's tails end
            out = tight_local_bound(blocks, x0.to(device=self.device, dtype=torch.float64),
                                    eps, record, bounds, max_rows=tight_rows,
                                    row_last=norms.tolist())
            if out.row_values is None:
                notes += (f"tight bound not formed ({out.reason})",)
            else:
                tv = torch.tensor(out.row_values, dtype=values.dtype, device=values.device)
                smaller = tv < values
                values = torch.where(smaller, tv, values)
                notes += (f"tight bound ({_tight_how(blocks, out, rows=True)}) smaller "
                         f"for {int(smaller.sum())} of {tv.numel()} rows",)
        return RowBounds(values=values.cpu(), guarantee=g, failure_prob=fp,
                         prefix=tuple(layers), eps=eps, nominal_error=nominal.cpu(),
                         nominal_values=rows_at_x0.reshape(-1).cpu(), notes=notes)


def _tight_how(blocks: list[Block], out, rows: bool = False) -> str:
    """How the tight bound ``out`` (:class:`lipbound.tight.TightOutcome`) was formed, for a
    note: the whole network, or the hybrid (the paper's factors of the blocks before the tail,
    the tight construction from the tail's first block on; per row: the first tail tried)."""
    if out.start == 0:
        if rows or not out.tail:
            return f"centre plus deviation, {out.rows} VJP rows"
        # the whole network formed, and a hybrid from a later block was smaller
        return (f"centre plus deviation, {out.rows} VJP rows; smallest with the paper's "
                f"factors before block {out.tail} ({blocks[out.tail].name}) and the "
                "construction from there")
    j = out.start if rows else out.tail
    where = f"tails from block {j} ({blocks[j].name}) on" if rows else \
        f"tail from block {j} ({blocks[j].name})"
    return (f"{where}, {out.rows} VJP rows, the paper's factors before it; for the whole "
            f"network: {out.full_reason}")


def _product_guarantee(bounds: list[SpectralBound]) -> tuple[Guarantee, float]:
    """The guarantee and failure probability of a product of the factors ``bounds`` (a union
    bound over the probabilistic ones; 0 when all are certified, or there are none)."""
    g = combine_guarantees([sb.guarantee for sb in bounds]) if bounds else Guarantee.CERTIFIED
    return g, 0.0 if g == Guarantee.CERTIFIED else min(1.0, sum(sb.failure_prob
                                                                for sb in bounds))


def check_analyzer_settings(an: Analyzer, **given: tuple[Any, Any]) -> None:
    """Refuse settings of a new analyzer (``name=(value, default)``) given together with an
    existing :class:`Analyzer` whose own setting differs: the analyzer's would be used and the
    caller's ignored (session 25: ``sweep(an, ..., spectral="exact")`` ran an ``"auto"``
    analyzer). A value equal to the default (not given) or to the analyzer's is fine.

    Raises:
        InputError: naming the setting and the fix.
    """
    for key, (value, default) in given.items():
        if value is None or value is default or (type(value) is type(default)
                                                 and value == default):
            continue
        have: Any = getattr(an, key)
        if key == "device":
            same = _same_device(resolve_device(value, have), have)
        elif key == "input_shape":
            same = check_input_shape(value) == tuple(have)
        else:
            same = value == have
        if not same:
            raise InputError(f"{key}={value!r} given with an Analyzer built with {key}="
                             f"{have!r}; the Analyzer's own would be used: build the Analyzer "
                             f"with it (Analyzer(model, input_shape, {key}=...)), or leave it "
                             "out")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` (no index) is the current CUDA device, so
    ``device="cuda"`` matches an analyzer on ``cuda:0`` (its model's parameters' device)."""
    def index(d: torch.device) -> torch.device:
        if d.type == "cuda" and d.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return d

    return a == b or index(a) == index(b)


_ANALYZER_INIT = Analyzer.__init__
"""(The class's own, read by :func:`_analyzer_options` even where ``Analyzer`` is replaced.)"""


def _analyzer_options() -> tuple[str, ...]:
    """The keyword options of :class:`Analyzer` that the module-level functions pass on."""
    import inspect

    params = inspect.signature(_ANALYZER_INIT).parameters
    return tuple(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY
                 and n not in ("x0", "device"))


def check_analyzer_options(kw: dict[str, Any], also: str = "") -> None:
    """Refuse keyword options that :class:`Analyzer` does not take (``also``: the caller's
    own options, named in the message)."""
    unknown = sorted(set(kw) - set(_analyzer_options()))
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)}; the options are "
                         f"{', '.join(_analyzer_options())} (passed to Analyzer){also}: check "
                         "the spelling")


def check_reused_analyzer(an: Analyzer, device: Any, kw: dict[str, Any]) -> None:
    """Options for a new analyzer (``device`` and ``kw``) given with an existing one: each must
    be its own (:func:`check_analyzer_settings`, values compared as given: no default); a
    different one would be ignored, so it is refused (session 25: one rule for local_bound,
    global_bound and the radius functions, as sweep and bound_many)."""
    unset = object()
    check_analyzer_settings(an, device=(device, None), **{k: (v, unset) for k, v in kw.items()})


def _residual(model: nn.Module, x0_or_shape, device, kw: dict[str, Any],
              exc: UnsupportedModelError):
    """The :class:`lipbound.residual.ResidualAnalyzer` of a model the chain analyzer refused
    as a residual network (``exc`` names it so); re-raises ``exc`` for any other model."""
    from .residual import residual_analyzer

    ra = residual_analyzer(model, x0_or_shape, exc, device, **kw)
    if ra is None:
        raise exc
    return ra


def _analyzer(model: nn.Module | Analyzer, x0_or_shape, device, **kw) -> Analyzer:
    check_analyzer_options(kw, ", and output_map for local_bound and global_bound")
    from .residual import ResidualAnalyzer

    if isinstance(model, ResidualAnalyzer):
        check_reused_analyzer(model, device, kw)  # type: ignore[arg-type]
        return model  # type: ignore[return-value]
    if isinstance(model, Analyzer):
        check_reused_analyzer(model, device, kw)
        return model
    if not isinstance(x0_or_shape, Tensor):
        return Analyzer(model, check_input_shape(x0_or_shape, "x0_or_input_shape"),
                        device=device, **kw)
    x0 = check_example_input(x0_or_shape)
    shape = tuple(x0.shape[1:]) if x0.dim() > 1 and x0.shape[0] == 1 else tuple(x0.shape)
    try:
        return Analyzer(model, shape, device=device, **kw)
    except (InputError, UnsupportedModelError) as exc:  # is x0 batched the wrong way?
        hint = x0_shape_hint(model, tuple(x0.shape))
        if hint is None:
            raise
        raise InputError(hint) from exc


LABEL_WIDTH = 32
"""Longest layer name a progress bar shows (a longer block name, ``a+b+c+d``, shows as
``a+…+d``)."""


def _lanczos_flops(b: Block) -> float:
    """A product's cost for a block whose factor may take a Lanczos run, ``inf`` for one
    whose factor has a closed form (cheap: never worth a thread of its own)."""
    if isinstance(b, AffineBlock) and b.mixing is not None:
        return float(b.apply_flops())
    return math.inf


def _layer_label(i: int, b: Block) -> str:
    """``"index name"`` of a block for a progress bar."""
    name = b.name
    if len(name) > LABEL_WIDTH:
        parts = name.split("+")
        name = f"{parts[0]}+…+{parts[-1]}" if len(parts) > 2 else name[:LABEL_WIDTH - 1] + "…"
    return f"{i} {name}"


@contextmanager
def _naming(layer: str) -> Iterator[None]:
    """Name the layer in an :class:`ExactRouteTooLarge` raised inside."""
    try:
        yield
    except ExactRouteTooLarge as exc:
        if exc.layer is not None:
            raise
        raise exc.for_layer(layer) from None


def global_bound(model: nn.Module | Analyzer, x0_or_input_shape: Tensor | Sequence[int], *,
                 output_map: Tensor | None = None, device: str | torch.device | None = None,
                 progress: bool = False, **kwargs) -> BoundResult:
    """Global L2 Lipschitz upper bound: the product of per-layer constants.

    Args:
        model: the network (eval mode) or an :class:`Analyzer`.
        x0_or_input_shape: an input ``(1, *shape)`` or the per-sample input shape.
        output_map: optional matrix C: bound ``C f`` instead of ``f``.
        device: ``None``/``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: show a bar over the layers on stderr (only on a terminal, after a few
            seconds); the result is the same either way.
        **kwargs: passed to :class:`Analyzer` (``spectral``, ``failure_prob``, ...); not
            with an Analyzer, which has its own.
    """
    check_bool(progress, "progress")  # (before tracing the model)
    try:
        an = _analyzer(model, x0_or_input_shape, device, **kwargs)
    except UnsupportedModelError as exc:  # a residual network: stage by stage
        an = _residual(model, x0_or_input_shape, device, kwargs, exc)
    return an.global_bound(output_map=output_map, progress=progress)


def local_bound(model: nn.Module | Analyzer, x0: Tensor, eps: float, *,
                output_map: Tensor | None = None, device: str | torch.device | None = None,
                progress: bool = False, tight: bool = False, tight_rows: int | None = None,
                **kwargs) -> BoundResult:
    """Local L2 Lipschitz upper bound relative to ``x0`` over the ball of radius ``eps``
    (Avant & Morgansen 2023).

    Args:
        model: the network (eval mode) or an :class:`Analyzer`.
        x0: the nominal input, shape ``(1, *input_shape)``.
        eps: the ball radius (> 0, finite).
        output_map: optional matrix C: bound ``C f`` instead of ``f``.
        device: ``None``/``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: show a bar over the layers on stderr (only on a terminal, after a few
            seconds); the result is the same either way.
        tight: also compute the centre-plus-deviation bound and report the smaller one
            (see :meth:`Analyzer.local_bound`).
        tight_rows: the budget of its vector-Jacobian rows (an integer >= 1; ``None``: the
            default :data:`TIGHT_ROWS`); only with ``tight=True``.
        **kwargs: passed to :class:`Analyzer` (not with an Analyzer, which has its own).
    """
    if not isinstance(x0, Tensor):
        raise InputError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    check_bool(progress, "progress")  # (before tracing the model)
    check_tight(tight, tight_rows)
    try:
        an = _analyzer(model, x0, device, **kwargs)
    except UnsupportedModelError as exc:  # a residual network: stage by stage
        an = _residual(model, x0, device, kwargs, exc)
    return an.local_bound(x0, eps, output_map=output_map, progress=progress, tight=tight,
                          tight_rows=tight_rows)
