"""Grouping of the op chain into the layers the bounds are computed on.

An *affine block* is a run of affine ops (at most one coordinate-mixing op, plus diagonal
ops such as folded batch norm / normalisation, and reshapes), optionally followed by a ReLU:
the paper's affine-ReLU layer ``g(x) = relu(A x + b)`` (batch norm folded in). A *pool
block* is a max-pooling layer. Consecutive fully connected layers without a ReLU between
them are multiplied into one matrix; other runs with several mixing ops are formed densely
when small, and otherwise split into separate blocks (sound, slightly looser). A product
carries an entrywise bound on its float64 rounding, which every norm computed from it adds
(:meth:`AffineBlock.err_norm`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops.base import DiagOp, MixingOp, Op, ReshapeOp, gamma, tensor_device
from .ops.conv import ConvOp
from .ops.linear import LinearOp
from .ops.pooling import MaxPoolOp, SpatialMatrixOp

DENSE_COMPOSE_LIMIT = 4_000_000
"""Most entries of the matrix of a run of affine layers without ReLU between them that is
composed into one fully connected layer (:func:`_dense_compose`)."""

DENSE_COMPOSE_WORK = 1e9
"""Most multiply-adds spent composing such a run (the run applied to every basis vector of its
input): beyond, its layers stay separate (a product of their factors), instead of a build that
takes minutes (a 64-channel convolution into a fully connected layer, 20736 inputs: 1.7e11)."""

TINY_WEIGHT = 1e-150
"""Nonzero linear coefficients below this magnitude are refused (:func:`lipbound.analyzer.
_check_magnitudes`): their squares (row norms) would underflow in float64 and make a moving row
look constant. The row norms square each folded scale alone and multiply the squares in turn,
so each scale and each partial product is held to it too. A product of layers whose matrix or
entrywise rounding bound has a nonzero below it is not formed (:func:`_fits_squares`): the
layers stay separate."""

DENSE_COMPOSE_BATCH = 1 << 22
"""Most entries of one batch of basis vectors' images while composing (32 MiB in float64): the
basis is sent through the run in chunks (a whole 20736 x 20736 identity alone took 3.4 GB)."""


class AffineBlock:
    """``y = s_out ⊙ M(s_in ⊙ x) + b`` (flattened), optionally followed by ReLU."""

    def __init__(self, ops: list[Op], relu: bool, shape: tuple[int, ...] | None = None,
                 relu_name: str = ""):
        self.ops = list(ops)
        self.relu = relu
        self.relu_name = relu_name
        if ops:
            self.in_shape, self.out_shape = ops[0].in_shape, ops[-1].out_shape
        else:
            if shape is None:
                raise ValueError("an empty affine block needs its shape")
            self.in_shape = self.out_shape = tuple(shape)
        mixing = [op for op in ops if op.kind == "mixing"]
        if len(mixing) > 1:
            raise ValueError("an affine block holds at most one mixing op")
        self.mixing: MixingOp | None = mixing[0] if mixing else None  # type: ignore[assignment]
        self.in_dim = math.prod(self.in_shape)
        self.out_dim = math.prod(self.out_shape)
        s_in = None
        s_out = None
        seen_mixing = False
        for op in ops:
            if op.kind == "mixing":
                seen_mixing = True
            elif isinstance(op, DiagOp):
                s = op.scale.reshape(-1)
                if seen_mixing:
                    s_out = s if s_out is None else s_out * s
                else:
                    s_in = s if s_in is None else s_in * s
        if self.mixing is None and s_out is not None:
            s_in = s_out if s_in is None else s_in * s_out
            s_out = None
        self.s_in: Tensor | None = None if s_in is None or bool((s_in == 1).all()) else s_in
        self.s_out: Tensor | None = None if s_out is None or bool((s_out == 1).all()) else s_out
        # the exact scales of folded layers are within fold_rel of the stored ones: every
        # norm of the block's exact matrix is at most this factor times the stored one's
        fold = 1.0
        for op in ops:
            if isinstance(op, DiagOp) and op.fold_rel > 0.0:
                fold *= 1.0 + op.fold_rel
        self.fold_factor = fold * (1.0 + 4.0 * len(ops) * 2.0 ** -53) if fold > 1.0 else 1.0

    @property
    def name(self) -> str:
        names = [op.name for op in self.ops if op.kind in ("mixing", "diag")]
        if self.relu:
            names.append(self.relu_name or "relu")
        return "+".join(names) if names else "identity"

    @property
    def kind(self) -> str:
        return "affine-relu" if self.relu else "affine"

    def forward(self, x: Tensor) -> Tensor:
        """Pre-activation (affine part only, with biases), batched in the block's in shape."""
        for op in self.ops:
            x = op.forward(x)
        return x

    _row_abs: Tensor | None = None

    def row_abs(self) -> Tensor:
        """Flat ``(out_dim,)`` upper bounds on the absolute row sums of the block's exact
        matrix ``S_out A S_in`` (computed once)."""
        if self._row_abs is None:
            if self.mixing is None:
                v = self.s_in.abs() if self.s_in is not None else torch.ones(
                    self.out_dim, dtype=torch.float64)
            else:
                v = self.mixing.row_abs()
                if self.s_in is not None:
                    v = v * float(self.s_in.abs().max())
                if self.s_out is not None:
                    v = v * self.s_out.abs()
            self._row_abs = v.reshape(-1) * (1.0 + 1e-12)
        return self._row_abs

    def forward_rounding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` of one input ``(1, *in_shape)`` and a flat ``(out_dim,)`` bound on
        the block's own rounding: the distance of the result from the exact pre-activation at
        ``x``, op by op (:meth:`lipbound.ops.base.Op.forward_error`)."""
        e = x.new_zeros(())
        for op in self.ops:
            y = op.forward(x)
            e = op.forward_error(x, y, e)
            x = y
        e = e.expand(self.out_shape) if e.dim() == 0 else e
        # NaN: inf * 0 (an infinite rounding bound of a product of layers times a zero
        # input), an unknown error, not none (a NaN made the ReLU look off: a factor of 0)
        e = torch.where(torch.isnan(e), math.inf, e)
        # the bound's own float64 arithmetic: a few roundings of non-negative terms
        return x, e.reshape(-1) * (1.0 + 1e-6)

    def lin(self, v: Tensor) -> Tensor:
        """Flat (B, in_dim) -> (B, out_dim): the linear part A."""
        if self.s_in is not None:
            v = v * self.s_in
        if self.mixing is None:
            return v
        m = self.mixing
        y = m.lin(v.reshape(v.shape[0], *m.in_shape)).reshape(v.shape[0], -1)
        return y if self.s_out is None else y * self.s_out

    def fast_error(self) -> float | None:
        """Absolute error per unit input norm of :meth:`lin` / :meth:`lin_t` when the mixing
        op computes fast (Winograd) products, scales included; None when it never does."""
        err = getattr(self.mixing, "winograd_error", None)
        e = err() if err is not None else None
        if e is None:
            return None
        for s in (self.s_in, self.s_out):
            if s is not None:
                e *= float(s.abs().max())
        return e

    def lin_t(self, y: Tensor) -> Tensor:
        if self.mixing is None:
            return y if self.s_in is None else y * self.s_in
        if self.s_out is not None:
            y = y * self.s_out
        m = self.mixing
        v = m.lin_t(y.reshape(y.shape[0], *m.out_shape)).reshape(y.shape[0], -1)
        return v if self.s_in is None else v * self.s_in

    def sq_rows(self, w: Tensor) -> Tensor:
        """Flat (B, in_dim) non-negative weights -> (A ⊙ A) w, flat (B, out_dim)."""
        if self.s_in is not None:
            w = w * self.s_in ** 2
        if self.mixing is None:
            return w
        m = self.mixing
        y = m.sq_rows(w.reshape(w.shape[0], *m.in_shape)).reshape(w.shape[0], -1)
        return y if self.s_out is None else y * self.s_out ** 2

    def _err_sq_rows(self, d: Tensor | None) -> Tensor | None:
        """Per output row, ``Σ_j (s_out,i E_ij s_in,j)^2 d_j`` for the entrywise rounding bound
        ``E`` of a matrix computed as a product of layers (:class:`~lipbound.ops.linear.
        LinearOp`, ``err``); None when the block's matrix carries none (``d``: flat mask,
        None: all ones)."""
        m = self.mixing
        if getattr(m, "err", None) is None:
            return None
        w = torch.ones(1, self.in_dim, dtype=torch.float64, device=m.err.device) \
            if d is None else d.reshape(1, -1).to(torch.float64)  # type: ignore[union-attr]
        if self.s_in is not None:
            w = w * self.s_in ** 2
        rows = m.err_sq_rows(w)[0]  # type: ignore[union-attr]
        return rows if self.s_out is None else rows * self.s_out ** 2

    def err_norm(self, r: Tensor | None = None, d: Tensor | None = None) -> float:
        """Upper bound on ``||R S_out ΔA S_in D||_2`` for the rounding ``ΔA`` of a mixing matrix
        computed as a product of layers: the Frobenius norm of the masked entrywise bound
        (``r``, ``d`` flat masks; None: all ones). ``0.0`` for other blocks. Every spectral
        value computed from the stored matrix adds it."""
        rows = self._err_sq_rows(d)
        if rows is None:
            return 0.0
        # NaN: an infinite entry times a zero of a mask, an unknown error, not none
        t = rows.sqrt().nan_to_num(math.inf, math.inf)
        if r is not None:
            # a row with r = 0 adds nothing, even where its bound is infinite (inf * 0 = NaN
            # would make the maximum NaN, and the whole error norm look like none)
            t = torch.where(r > 0, t * r, 0.0)
        # the rows' norms are normal (every nonzero entry of the bound, times the scales, is at
        # least TINY_WEIGHT), but r may be tiny: scaled by the largest before squaring, so a
        # square lost below the normal range is a negligible part of the sum
        top = float(t.max()) if t.numel() else 0.0
        if top == 0.0 or math.isinf(top):
            return top
        # a sum of non-negative terms: (1 + γ_n) covers its rounding, 1e-6 is generous
        return top * math.sqrt(float(((t / top) ** 2).sum())) * (1.0 + 1e-6)

    def err_rows(self, d: Tensor) -> Tensor | None:
        """Per output row ``i``, an upper bound on ``||e_i^T S_out ΔA S_in D||`` (see
        :meth:`err_norm`); None when the block's matrix carries no rounding bound."""
        rows = self._err_sq_rows(d)
        return None if rows is None else \
            (rows.sqrt() * (1.0 + 1e-6)).nan_to_num(math.inf, math.inf)

    def dense_fn(self):
        if self.mixing is None:
            return None
        dm = self.mixing.dense()
        if dm is None:
            return None

        def build() -> Tensor:
            return self.with_scales(dm)
        return build

    def with_scales(self, m: Tensor, rows: Tensor | None = None,
                    cols: Tensor | None = None) -> Tensor:
        """The block's matrix from the mixing op's matrix ``m`` (the diagonal scales applied);
        with ``rows`` / ``cols``, ``m`` is the mixing matrix's submatrix on those indices."""
        if self.s_in is not None:
            m = m * (self.s_in if cols is None else self.s_in[cols])[None, :]
        if self.s_out is not None:
            m = m * (self.s_out if rows is None else self.s_out[rows])[:, None]
        return m

    def apply_flops(self) -> float:
        return self.mixing.flops() if self.mixing is not None else float(self.in_dim)

    def channel_subset(self, in_ch: Tensor, out_ch: Tensor) -> AffineBlock:
        """The linear part of a convolution block restricted to input channels ``in_ch`` and
        output channels ``out_ch`` (sorted): ``lin`` / ``lin_t`` of the result are those of
        this block composed with the channel selections (scales included; no bias, so it is
        not meant for :meth:`forward`). Used where the other channels are masked out."""
        conv = self.mixing.channel_subset(in_ch, out_ch)  # type: ignore[union-attr]
        sub = AffineBlock([conv], self.relu, relu_name=self.relu_name)

        def pick(s: Tensor | None, shape, ch: Tensor) -> Tensor | None:
            return None if s is None else s.reshape(shape).index_select(0, ch).reshape(-1)
        sub.s_in = pick(self.s_in, self.in_shape, in_ch)
        sub.s_out = pick(self.s_out, self.out_shape, out_ch)
        return sub


class PoolBlock:
    kind = "maxpool"

    def __init__(self, op: MaxPoolOp):
        self.op = op
        self.in_shape, self.out_shape = op.in_shape, op.out_shape
        self.in_dim, self.out_dim = op.in_dim, op.out_dim
        self.relu = False

    @property
    def name(self) -> str:
        return self.op.name

    def forward(self, x: Tensor) -> Tensor:
        return self.op.forward(x)

    def forward_rounding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`AffineBlock.forward_rounding`: a maximum is exact, so no rounding."""
        return self.op.forward(x), x.new_zeros(()).expand(self.out_dim)


Block = AffineBlock | PoolBlock


MIN_NORMAL_EXPONENT = -1022
"""Float64 numbers of magnitude at least ``2^-1022`` are normal. The rounding bounds of
products of layers (:func:`_product_error`) are relative (Higham's ``γ_k``, ``fl(a b) =
a b (1 + δ)``); a product below this magnitude is rounded on the subnormal grid instead, an
absolute error up to ``2^-1075`` that can be a large part of it (a conv weight ``2^-600``
times a batch-norm scale ``2^-460``, then a layer ``2^1000``: ``3e-6`` relative error in the
composed matrix against a stated ``3e-15``). Layers whose products could fall there are
not multiplied (:func:`_low_exponent`, :func:`_grid_exponent`). A sum whose result is
subnormal is exact: only products matter."""


def _low_exponent(t: Tensor | None) -> float:
    """``floor(log2 m)`` for ``m`` the smallest nonzero finite magnitude in ``t``: every
    nonzero entry is at least ``2^e`` in magnitude (``+inf`` for None or no such entry)."""
    if t is None or t.numel() == 0:
        return math.inf
    a = t.detach().abs()
    low = float(torch.where((a > 0) & torch.isfinite(a), a, math.inf).min())
    return math.inf if math.isinf(low) else float(math.frexp(low)[1] - 1)


def _grid_exponent(t: Tensor | None) -> float:
    """The exponent of the largest power of two that divides every finite entry of ``t``:
    each entry is an integer multiple of ``2^e`` (``+inf`` for None or no nonzero entry).

    A product of multiples of ``2^a`` and ``2^b`` is a multiple of ``2^(a + b)``, and so is a
    sum of such products, rounded or not (a rounded value is a multiple of its ulp, or exact
    when its ulp is below ``2^(a + b)``): a nonzero sum of products is at least ``2^(a + b)``
    in magnitude, whatever cancels in it."""
    if t is None:
        return math.inf
    flat = t.detach().reshape(-1)
    best = math.inf
    for s in range(0, flat.numel(), 1 << 22):  # in chunks: no full-size int64 temporaries
        a = flat[s:s + (1 << 22)].to(torch.float64)
        a = a[(a != 0) & torch.isfinite(a)].abs()
        if a.numel() == 0:
            continue
        mant, ex = torch.frexp(a)  # a = mant 2^ex, 0.5 <= mant < 1 (subnormals too)
        m = (mant * 2.0 ** 53).to(torch.int64)  # exact: 53 significant bits at most
        tz = torch.frexp((m & -m).to(torch.float64))[1] - 1  # trailing zero bits of m
        best = min(best, int((ex.to(torch.int64) + tz).min()) - 53)
    return best


def _normal_products(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether every nonzero product of an entry of ``a`` and an entry of ``b`` is normal."""
    return _low_exponent(a) + _low_exponent(b) >= MIN_NORMAL_EXPONENT


def _factors(op: Op) -> list[tuple[bool, float, float]]:
    """The factors ``op``'s linear part multiplies by, in the order of its forward pass, each
    as ``(summed, low, grid)``: whether its products are summed (a matrix) or taken one by one
    (a diagonal, a convolution's output scale), and its :func:`_low_exponent` and
    :func:`_grid_exponent`. None for a reshape."""
    def f(t: Tensor, summed: bool) -> tuple[bool, float, float]:
        return summed, _low_exponent(t), _grid_exponent(t)
    if isinstance(op, DiagOp):
        return [f(op.scale, False)]
    if isinstance(op, ConvOp):
        return [f(op.weight, True)] + ([] if op.out_scale is None else [f(op.out_scale, False)])
    if isinstance(op, LinearOp):
        return [f(op.weight, True)]
    if isinstance(op, SpatialMatrixOp):
        return [f(op.pmat, True)]
    if isinstance(op, ReshapeOp):
        return []
    raise TypeError(f"cannot compose {op!r}")


def _folded(op: Op) -> bool:
    """Whether ``op`` is a diagonal layer folded from a formula (batch norm, normalisation)
    whose rounding it carries (:class:`~lipbound.ops.base.DiagOp`, ``fold_rel``)."""
    return isinstance(op, DiagOp) and (op.fold_rel > 0.0 or op.shift_err is not None)


def _up_scale(op: DiagOp) -> Tensor:
    """``|scale| (1 + fold_rel)``: at least the magnitude of the exact layer's scale."""
    s = op.scale.abs()
    return s * (1.0 + op.fold_rel) if op.fold_rel > 0.0 else s


def _up_shift(op: DiagOp) -> Tensor:
    """``|shift| + shift_err``: at least the magnitude of the exact layer's shift."""
    t = op.shift.abs()
    return t if op.shift_err is None else t + op.shift_err


def _fold_error(big: Tensor, p: Tensor, k: int) -> Tensor:
    """Entrywise bound on how far a product of layers with the exact scales and shifts of its
    folded layers (batch norm, normalisation) is from the product with the stored ones, both
    exact: at most ``P - p`` for ``P`` the chain of absolute values with every folded scale
    and shift replaced by its bound (``|s| (1 + fold_rel)``, ``|t| + shift_err``) and ``p`` the
    plain one (by induction over the layers: at a folded layer ``|s* v* - s v| <= |s*| |v* - v|
    + |s* - s| |v|`` and ``|t* - t| <= shift_err``). ``big`` and ``p`` are computed: each
    within ``γ_(3k+4)`` of its exact value (``k`` counts two roundings per diagonal layer; an
    inflated one makes up to three more: the inflated scale, the product, the shift's sum)."""
    g = gamma(3 * k + 4)
    out = ((big - p) + g * (big + p)) * (1.0 + 8.0 * 2.0 ** -53)
    return out.nan_to_num(math.inf, math.inf)


def _fits_squares(*ts: Tensor) -> bool:
    """Whether every nonzero entry of the tensors is at least :data:`TINY_WEIGHT` in magnitude
    (their squares stay normal). A product of layers can have smaller entries (cancellation),
    and its rounding bound has entries about ``1e-16`` of its absolute product's: squared in
    the row norms and in :meth:`AffineBlock.err_norm`, they would vanish (a composed matrix
    computed as zero with a bound of ``5e-163`` gave a bound of 0 for a network of Lipschitz
    constant ``1.2e-166``)."""
    for t in ts:
        flat = t.reshape(-1)
        for s in range(0, flat.numel(), 1 << 22):  # in chunks: no full-size temporaries
            a = flat[s:s + (1 << 22)].abs()
            if bool(((a > 0) & (a < TINY_WEIGHT)).any()):
                return False
    return True


class _Underflow(Exception):
    """A product formed while composing layers could fall below the normal range."""


def _product_error(p: Tensor, k: int) -> Tensor:
    """Entrywise bound on the rounding error of a float64 product of a chain of linear maps:
    ``p`` is the computed product of the maps' entrywise absolute values and ``k`` the sum of
    their inner lengths (one per diagonal scale). Any evaluation order of the chain has error
    ``<= γ_k |A_n| ... |A_1|`` entrywise (Higham, Thm 3.5, applied map by map) when no
    product underflows (callers check, :data:`MIN_NORMAL_EXPONENT`), and the
    computed ``p`` is within a factor ``1 + γ_k`` of that exact product of non-negative
    terms; ``2 γ_(k+4)`` covers both. Cancellation in the product (large biases, large
    entries that nearly cancel) makes this large against the product itself, so it is
    carried along rather than assumed negligible (:class:`~lipbound.ops.linear.LinearOp`,
    ``err``)."""
    # NaN (inf * 0 after an overflow): an unknown rounding, not none
    return (p * (2.0 * gamma(k + 4))).nan_to_num(math.inf, math.inf)


def _compose_linear_run(ops: list[Op]) -> list[Op]:
    """Multiply consecutive fully connected layers (and the 1-D diagonal ops between them),
    each product with its entrywise rounding bound (:func:`_product_error`)."""
    out: list[Op] = []
    # for each merged layer: (|A_n| ... |A_1| as computed, the chain of absolute biases
    # |A_n| (... (|A_2| |b_1| + |b_2|) ...) + |b_n|, sum of inner lengths)
    # (and the same two chains with the folded layers' bounds, P and Q, see _fold_error)
    absprod: dict[int, tuple[Tensor, Tensor, int, Tensor, Tensor]] = {}
    for op in ops:
        if isinstance(op, LinearOp):
            j = len(out) - 1
            while j >= 0 and isinstance(out[j], (DiagOp, ReshapeOp)) \
                    and len(out[j].in_shape) == 1 and len(out[j].out_shape) == 1:
                j -= 1
            if j >= 0 and isinstance(out[j], LinearOp):
                first: LinearOp = out[j]  # type: ignore[assignment]
                w1, b1 = first.weight, first.bias
                p1, q1, k1, big_p1, big_q1 = absprod.get(id(first), (
                    first.weight.abs(), first.bias.abs(), first.in_dim + 1,
                    first.weight.abs(), first.bias.abs()))
                folds = any(_folded(d) for d in out[j + 1:]) or id(first) in absprod \
                    and absprod[id(first)][3] is not absprod[id(first)][0]
                normal = True
                for d in out[j + 1:]:
                    if isinstance(d, DiagOp):
                        s, t = d.scale.reshape(-1), d.shift.reshape(-1)
                        normal = normal and all(_normal_products(s, v) for v in (w1, p1, q1, b1))
                        w1 = w1 * s[:, None]
                        p1 = p1 * s.abs()[:, None]
                        q1 = q1 * s.abs() + t.abs()
                        if folds:
                            su, tu = _up_scale(d).reshape(-1), _up_shift(d).reshape(-1)
                            big_p1 = big_p1 * su[:, None]
                            big_q1 = big_q1 * su + tu
                        k1 += 2
                        b1 = b1 * s + t
                if not (normal and all(_normal_products(op.weight, v) for v in (w1, p1, q1, b1))):
                    out.append(op)  # a product could underflow: the layers stay separate
                    continue
                p = op.weight.abs() @ p1
                q = op.weight.abs() @ q1 + op.bias.abs()
                k = k1 + op.in_dim + 1
                w, err, bias_err = op.weight @ w1, _product_error(p, k), _product_error(q, k)
                big_p, big_q = p, q
                if folds:  # the folded layers' own rounding (batch norm between the layers)
                    big_p = op.weight.abs() @ big_p1
                    big_q = op.weight.abs() @ big_q1 + op.bias.abs()
                    err = err + _fold_error(big_p, p, k)
                    bias_err = bias_err + _fold_error(big_q, q, k)
                if not _fits_squares(w, err):
                    out.append(op)  # squares of its entries could underflow: kept separate
                    continue
                merged = LinearOp(f"{first.name}*{op.name}", w, op.weight @ b1 + op.bias,
                                  err=err, bias_err=bias_err)
                del out[j:]
                out.append(merged)
                absprod[id(merged)] = (p, q, k, big_p, big_q)
                continue
        out.append(op)
    return out


def _dense_compose(ops: list[Op], transposed: bool | None = None) -> list[Op] | None:
    """The run of affine ops as one fully connected layer when it is small, else None. The
    matrix is the chain's linear part applied to basis vectors (no biases: ``f(e_i) - f(0)``
    would lose it to cancellation against large biases), with its entrywise rounding bound
    (:func:`_product_error`); the bias is the chain at zero. ``ops`` are the model's own
    layers (none carries a rounding bound of its own).

    With fewer outputs than inputs (``transposed``, by default), the matrix is formed row by
    row, the chain's transpose applied to the output basis vectors (a global-average-pool head
    into 10 classes: 10 vectors instead of 25088), and its rounding bound counts the
    transposes' inner lengths (:meth:`MixingOp.inner_length_t`). The bound holds when no
    product underflows: before each layer, the values computed so far (bounds on their
    magnitudes, from the layers before when those suffice) and the layer's factors must keep
    every product normal (:data:`MIN_NORMAL_EXPONENT`); where they may not,
    the other way round is tried (by default), and the run stays separate when neither way
    (or the bias chain) passes."""
    folds = any(_folded(op) for op in ops)
    in_shape, out_shape = ops[0].in_shape, ops[-1].out_shape
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if n_in * n_out > DENSE_COMPOSE_LIMIT:
        return None
    if any(isinstance(op, LinearOp) and op.err is not None for op in ops):
        raise ValueError("_dense_compose takes the model's own layers, not products")
    per_vector = sum(op.flops() if isinstance(op, MixingOp) else
                     0.0 if isinstance(op, ReshapeOp) else float(op.in_dim) for op in ops)
    # fewer basis vectors first; the other way multiplies the factors in the other order,
    # which may keep every product normal where the first does not
    ways = [way for way in ([transposed] if transposed is not None else
                            [n_out < n_in, not n_out < n_in])
            if (n_out if way else n_in) * per_vector <= DENSE_COMPOSE_WORK]
    if not ways:
        return None
    dev = next((dv for op in ops if (dv := tensor_device(op)) is not None), None)
    factors = {id(op): _factors(op) for op in ops}
    shifts = {id(op): _grid_exponent(getattr(op, "shift" if isinstance(op, DiagOp) else "bias",
                                             None)) for op in ops}

    def normal(x: Tensor, e: tuple[float, float], op: Op, backward: bool,
               biased: bool) -> tuple[float, float]:
        """Check that every product ``op`` forms from ``x`` is 0 or normal (else raise
        :class:`_Underflow`). ``e``: the low and grid exponents of ``x`` (its nonzero values
        are at least ``2^e[0]`` and multiples of ``2^e[1]``), known from the layers before;
        ``x`` itself is examined only when they do not suffice. Returns those of the values
        after ``op`` (with its bias or shift when ``biased``)."""
        fs = factors[id(op)]

        def after(low: float, grid: float) -> tuple[float, float] | None:
            for summed, f_low, f_grid in (reversed(fs) if backward else fs):
                if low + f_low < MIN_NORMAL_EXPONENT:
                    return None
                grid += f_grid
                # a sum of products may cancel down to its grid; a single product may not
                low = grid if summed else max(low + f_low, grid)
            return low, grid
        out = after(*e)
        if out is None:
            out = after(max(e[0], _low_exponent(x)), max(e[1], _grid_exponent(x)))
            if out is None:
                raise _Underflow
        if biased and shifts[id(op)] < math.inf:
            grid = min(out[1], shifts[id(op)])
            out = (grid, grid)
        return out

    def run(x: Tensor, part: str) -> Tensor:
        """``part``: "forward" (with biases), "lin", "abs" (|A| chain), "absbias" (|A| chain
        with |biases| and |shifts| added); "abs+" and "absbias+" the same with the folded
        layers' scales and shifts replaced by their bounds (:func:`_fold_error`)."""
        up = part.endswith("+")
        part = part.rstrip("+")
        biased = part in ("forward", "absbias")
        # the bias chain starts from 0, the others from basis vectors (1 is 2^0)
        e = (math.inf, math.inf) if biased else (0.0, 0.0)
        for op in ops:
            e = normal(x, e, op, False, biased)
            if part == "forward" or isinstance(op, ReshapeOp):
                x = op.forward(x)
            elif isinstance(op, MixingOp):
                x = op.lin(x) if part == "lin" else op.abs_lin(x)
                if part == "absbias":
                    b = op._bias_abs()
                    if b is not None:
                        x = x + b
            elif isinstance(op, DiagOp):
                x = x * (op.scale if part == "lin" else _up_scale(op) if up
                         else op.scale.abs())
                if part == "absbias":
                    x = x + (_up_shift(op) if up else op.shift.abs())
            else:
                raise TypeError(f"cannot compose {op!r}")
        return x

    def run_t(y: Tensor, part: str) -> Tensor:
        """The transposed chain: "lin" (``A^T``) or "abs" (``|A_1|^T ... |A_n|^T``); "abs+"
        with the folded layers' scales replaced by their bounds."""
        up = part.endswith("+")
        part = part.rstrip("+")
        e = (0.0, 0.0)
        for op in reversed(ops):
            e = normal(y, e, op, True, False)
            if isinstance(op, ReshapeOp):
                y = y.reshape(y.shape[0], *op.in_shape)
            elif isinstance(op, MixingOp):
                y = op.lin_t(y) if part == "lin" else op.abs_lin_t(y)
            elif isinstance(op, DiagOp):
                y = y * (op.scale if part == "lin" else _up_scale(op) if up
                         else op.scale.abs())
            else:
                raise TypeError(f"cannot compose {op!r}")
        return y

    widest = max([n_in, n_out] + [math.prod(op.out_shape) for op in ops])
    chunk = max(1, DENSE_COMPOSE_BATCH // widest)

    def matrix(part: str, transposed: bool) -> Tensor:
        """The ``n_out x n_in`` matrix of the chain (``part``), from basis vectors sent
        through it (or through its transpose) in chunks."""
        n, m, shape = (n_out, n_in, out_shape) if transposed else (n_in, n_out, in_shape)
        out = torch.empty(n, m, dtype=torch.float64, device=dev)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            eye = torch.zeros(e - s, n, dtype=torch.float64, device=dev)
            eye[:, s:e].fill_diagonal_(1.0)
            eye = eye.reshape(e - s, *shape)
            out[s:e] = (run_t(eye, part) if transposed else run(eye, part)).reshape(e - s, m)
        return out if transposed else out.T.contiguous()

    zero = torch.zeros(1, *in_shape, dtype=torch.float64, device=dev)
    # the transposed products make a transposed copy of a fully connected layer's matrix
    # (DenseProducts): the layer is the model's own and stays in the analyser's op list
    # after it is composed, so a copy made here is dropped again
    uncached = [op for op in ops if isinstance(op, LinearOp) and op._products._mt is None]
    try:
        b = run(zero, "forward").reshape(-1)
        q = run(zero, "absbias").reshape(-1)
        found: tuple[bool, Tensor, Tensor] | None = None
        for way in ways:
            try:
                w = matrix("lin", way)
                p = matrix("abs", way)
            except _Underflow:
                continue
            if found is None:
                found = (way, w, p)
            if bool(torch.isfinite(w).all()) and bool(torch.isfinite(p).all()):
                found = (way, w, p)
                break
            # an intermediate overflowed: the other way's may not (its sums group the
            # products differently), else the first result (refused, or an infinite bound)
        if found is None:
            return None
        transposed, w, p = found
        # the folded layers' own rounding (batch norm, normalisation; _fold_error)
        big_p = matrix("abs+", transposed) if folds else None
        big_q = run(zero, "absbias+").reshape(-1) if folds else None
    except _Underflow:
        return None  # a product could underflow: the layers stay separate
    finally:
        for op in uncached:
            op._products.drop_transpose()
    k = sum(op.inner_length() + 2 if isinstance(op, MixingOp) else 2
            for op in ops if not isinstance(op, ReshapeOp))
    # the bias is the forward chain's (its bound counts k); the matrix that of its direction
    k_w = sum(op.inner_length_t() + 2 if isinstance(op, MixingOp) else 2
              for op in ops if not isinstance(op, ReshapeOp)) if transposed else k
    err, bias_err = _product_error(p, k_w), _product_error(q, k)
    if big_p is not None and big_q is not None:
        err = err + _fold_error(big_p, p, k_w)
        bias_err = bias_err + _fold_error(big_q, q, k)
    if not _fits_squares(w, err):
        return None  # squares of its entries could underflow: the layers stay separate
    name = "*".join(op.name for op in ops if op.kind == "mixing")
    seq: list[Op] = []
    if len(in_shape) != 1:
        seq.append(ReshapeOp(name + ".flatten", in_shape, (n_in,)))
    seq.append(LinearOp(name, w, b, err=err, bias_err=bias_err))
    if len(out_shape) != 1:
        seq.append(ReshapeOp(name + ".unflatten", (n_out,), out_shape))
    return seq


def _segment_blocks(seg: list[Op], relu: bool, relu_name: str) -> list[AffineBlock]:
    own = seg
    seg = _compose_linear_run(seg)
    n_mix = sum(op.kind == "mixing" for op in seg)
    if n_mix <= 1:
        return [AffineBlock(seg, relu, relu_name=relu_name)]
    dense = _dense_compose(own)
    if dense is not None:
        return [AffineBlock(dense, relu, relu_name=relu_name)]
    parts: list[list[Op]] = [[]]
    count = 0
    for op in seg:
        if op.kind == "mixing":
            count += 1
            if count > 1:
                parts.append([])
        parts[-1].append(op)
    return [AffineBlock(p, relu and i == len(parts) - 1, relu_name=relu_name)
            for i, p in enumerate(parts)]


def build_blocks(ops: list[Op]) -> list[Block]:
    """Group the op chain into affine(-ReLU) blocks and max-pool blocks."""
    blocks: list[Block] = []
    seg: list[Op] = []
    for op in ops:
        if op.kind == "relu":
            if seg:
                blocks.extend(_segment_blocks(seg, True, op.name))
            else:
                blocks.append(AffineBlock([], True, shape=op.in_shape, relu_name=op.name))
            seg = []
        elif op.kind == "maxpool":
            if seg:
                blocks.extend(_segment_blocks(seg, False, ""))
                seg = []
            blocks.append(PoolBlock(op))  # type: ignore[arg-type]
        else:
            seg.append(op)
    if seg:
        blocks.extend(_segment_blocks(seg, False, ""))
    return blocks
