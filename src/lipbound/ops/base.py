"""The small contract every layer rule implements.

An analysed network is a chain of :class:`Op` objects, each holding float64 copies of
its parameters. Shapes are per sample (no batch dimension); every method takes and
returns batched tensors of shape ``(N, *shape)``.

Op kinds:

* ``"mixing"`` -- a linear map that mixes coordinates (Linear, Conv2d, pooling by
  averaging). Provides the linear part ``lin``, its transpose ``lin_t``, the one-pass
  squared row norms ``sq_rows`` ((A ⊙ A) w) and optionally a dense matrix.
* ``"diag"`` -- an affine map with a diagonal linear part (BatchNorm in eval mode,
  input normalisation, Dropout in eval mode, Identity): ``scale`` holds the diagonal.
* ``"reshape"`` -- a change of shape that keeps the row-major order of the elements.
* ``"relu"`` and ``"maxpool"`` -- the nonlinearities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gamma(n: int) -> float:
    """``γ_n = n u / (1 - n u)`` with ``u = 2^-53``: a float64 sum of ``n`` products is within
    ``γ_n`` (relative to the sum of absolute terms) of its exact value in any order (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §3.1); ``inf`` for huge ``n``."""
    nu = n * 2.0 ** -53
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


UNDERFLOW = 2.0 ** -1074
"""The smallest positive float64 (subnormal). A product below the normal range is rounded on
the subnormal grid, an absolute error up to half of this that no relative bound (``γ_n``)
covers; the rounding bounds of the nominal forward pass add a multiple of it."""

MIN_NORMAL = 2.0 ** -1022
"""The smallest positive normal float64."""


def product_up(values) -> float:
    """An upper bound on the exact product of non-negative upper bounds (layer factors, radii).
    A plain float64 product is returned while every partial product stays normal (the factors'
    own relative margins cover its few roundings); one that falls below the normal range
    (rounded on the subnormal grid, or to 0: seven factors of ``1e-50`` gave 0) is formed from
    the mantissas and exponents apart and rounded up. 0 when a factor is 0 (the composed map
    is then constant, whatever the others; ``0 * inf`` would be NaN)."""
    vals = [float(v) for v in values]
    if any(v == 0.0 for v in vals):
        return 0.0
    if any(math.isnan(v) for v in vals):
        return math.nan
    if any(math.isinf(v) for v in vals):
        return math.inf  # (not the NaN of a partial product rounded to 0, times inf)
    p, low = 1.0, False
    for v in vals:
        p *= v
        low = low or p < MIN_NORMAL
    if not low:
        return p
    m, e = 1.0, 0
    for v in vals:
        fm, fe = math.frexp(v)
        m, de = math.frexp(m * fm)
        e += fe + de
    m *= 1.0 + 4.0 * (len(vals) + 2) * 2.0 ** -53  # the mantissas' roundings
    if e > 1024:
        return math.inf
    p = math.ldexp(m, e)  # rounded on the subnormal grid (or to 0) when below it
    return math.nextafter(p, math.inf) if p < MIN_NORMAL else p


def norm_up(t: Tensor) -> float:
    """The L2 norm of ``t`` computed without underflow: scaled by its largest magnitude before
    squaring (``torch``'s norm squares directly: entries below ``1e-154`` count as 0, and a
    vector of ``1e-200`` has norm 0). ``inf`` for an infinite or NaN entry. Callers add their
    relative margin for the rounding."""
    if t.numel() == 0:
        return 0.0
    plain = float(t.norm())
    if 2.0 ** -400 <= plain < math.inf:
        # squares lost below the normal range (each < 2^-1022) are a negligible part of it
        return plain
    a = t.abs()
    top = float(a.max())
    if top == 0.0:
        return 0.0
    if not math.isfinite(top):
        return math.inf
    return top * math.sqrt(float(((a / top) ** 2).sum()))


def safe_norm(v: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """L2 norms of ``v`` (of its rows along ``dim``, or of all of it) without the overflow
    or underflow of their squares: each row is divided by a power of two near its largest
    entry (exactly), so a norm is infinite only when it exceeds the floating-point range
    itself (``torch.linalg.vector_norm`` gives ``inf`` for ``[1e300, 1e300]`` and 0 for
    ``[1e-300]``), with the rounding of an unscaled norm. Differentiable (the scale is a
    constant). Callers add their relative margin for the rounding where they need an upper
    bound (:func:`lipbound.tight._row_bound`)."""
    with torch.no_grad():
        a = v.detach().abs()
        m = a.amax(dim=dim, keepdim=True) if dim is not None else a.amax()
        _, e = torch.frexp(m)  # m = f 2^e, f in [0.5, 1): 2^(e-1) <= m < 2^e
        scale = torch.ldexp(torch.ones_like(m), e - 1)
        scale = torch.where((m > 0) & torch.isfinite(m), scale, torch.ones_like(m))
    n = torch.linalg.vector_norm(v / scale, dim=dim)
    return n * (scale.squeeze(dim) if dim is not None else scale)


def tensor_device(obj: object) -> torch.device | None:
    """The device of the first tensor attribute of ``obj`` (an op), or None without one."""
    for v in vars(obj).values():
        if isinstance(v, Tensor):
            return v.device
    return None


class Op:
    """Base class of an analysed layer."""

    kind: str = "op"

    def __init__(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.name = name
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, device: torch.device) -> Op:
        for k, v in list(vars(self).items()):
            if isinstance(v, Tensor):
                setattr(self, k, v.to(device))
        return self

    def forward_error(self, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
        """Elementwise bound on ``|y - f(x*)|``: ``y = forward(x)`` as computed (batch 1),
        ``f`` the exact layer and ``x*`` an exact input with ``|x - x*| <= e`` elementwise
        (``e`` per sample: 0-dim or shaped like the input). Per-sample shape of the output, or
        0-dim. The nominal forward pass's rounding, which decides the ReLU masks near a kink
        (:meth:`lipbound.Analyzer.local_bound`). Unknown layers: ``inf`` (every ReLU after
        them is then treated as possibly active: sound, looser)."""
        return torch.full(self.out_shape, math.inf, dtype=torch.float64, device=y.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.in_shape} -> {self.out_shape})"


class MixingOp(Op):
    """A linear(-plus-bias) layer: y = A x + b."""

    kind = "mixing"

    def lin(self, x: Tensor) -> Tensor:
        """A x (no bias)."""
        raise NotImplementedError

    def lin_t(self, y: Tensor) -> Tensor:
        """A^T y."""
        raise NotImplementedError

    def sq_rows(self, w: Tensor) -> Tensor:
        """(A ⊙ A) w for a non-negative w shaped like the input: all squared row norms of
        A diag(sqrt(w)) in one pass."""
        raise NotImplementedError

    def abs_lin(self, x: Tensor) -> Tensor:
        """|A| x, the entrywise absolute matrix applied to x (no bias): with
        :meth:`inner_length`, the rounding bound of products through this op."""
        raise NotImplementedError

    def abs_lin_t(self, y: Tensor) -> Tensor:
        """|A|^T y (no bias): with :meth:`inner_length_t`, the rounding bound of products
        through this op's transpose."""
        raise NotImplementedError

    def inner_length(self) -> int:
        """Most products summed into one output entry of ``A x`` (a row's nonzeros at most)."""
        return self.in_dim

    def inner_length_t(self) -> int:
        """Most nonzero products summed into one entry of ``A^T y`` (a column's nonzeros at
        most; products with structural zeros are exact zeros and add no rounding)."""
        return self.out_dim

    def dense(self) -> Tensor | None:
        """The matrix A (out_dim, in_dim) when it is cheap to form, else None."""
        return None

    _row_abs: Tensor | None = None

    def row_abs(self) -> Tensor:
        """Flat ``(out_dim,)`` upper bounds on the absolute row sums ``Σ_j |A_ij|`` of the
        exact matrix (computed once). Default: ``|A| 1`` (:meth:`abs_lin`), or from
        :meth:`dense`, or ``inf`` when neither exists."""
        if self._row_abs is None:
            dev = tensor_device(self) or torch.device("cpu")
            try:
                ones = torch.ones(1, *self.in_shape, dtype=torch.float64, device=dev)
                v = self.abs_lin(ones).reshape(-1)
            except NotImplementedError:
                d = self.dense()
                v = d.abs().sum(dim=1) if d is not None else torch.full(
                    (self.out_dim,), math.inf, dtype=torch.float64, device=dev)
            self._row_abs = v * (1.0 + 2.0 * gamma(self.inner_length()))
        return self._row_abs

    def _bias_abs(self) -> Tensor | None:
        b = getattr(self, "bias", None)
        if b is None:
            return None
        b = b.abs()
        if b.numel() == self.out_dim:
            return b.reshape(self.out_shape)
        return b.reshape(-1, *([1] * (len(self.out_shape) - 1)))  # per output channel

    def forward_error(self, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
        """``|ŷ - (A x* + b)| <= |A| (|x - x*| + γ |x|) + γ |b|`` with ``γ = γ_(n+2)`` (``n``
        products per output, a scale and a bias each rounded once), and ``|A| v <= row_abs
        max(v)`` (cheap: no extra pass over the layer)."""
        n = self.inner_length()
        g = gamma(n + 2)
        v = float((e + g * x[0].abs()).max())
        out = (self.row_abs() * v).reshape(self.out_shape)
        b = self._bias_abs()
        out = out if b is None else out + g * b
        # products below the normal range round absolutely (up to UNDERFLOW / 2 each): the
        # n of the output, and the few of this bound (a product of 100 terms of 0.49 of the
        # smallest subnormal each, and a bias of -1 of it, was computed as -1, exactly +48)
        return out + (n + 4) * UNDERFLOW

    def to(self, device: torch.device) -> Op:
        self._row_abs = None
        return super().to(device)

    def flops(self) -> float:
        """Approximate multiply-adds of one application of A to one vector."""
        return float(self.in_dim * self.out_dim)


class DiagOp(Op):
    """y = scale * x + shift with ``scale`` broadcastable to the input shape.

    ``fold_rel`` and ``shift_err`` (optional): for a layer whose exact map is not this
    float64 one but a formula it was folded from (batch norm ``γ (x - μ) / sqrt(σ² + eps) +
    β``, normalisation ``(x - mean) / std``), the exact scale is within ``fold_rel |scale|``
    and the exact shift within ``shift_err`` (broadcastable) of the stored ones. The nominal
    pass's rounding bound adds them (:meth:`forward_error`), every layer factor of a block
    holding such a layer is multiplied by ``1 + fold_rel``
    (:attr:`lipbound.blocks.AffineBlock.fold_factor`), and a product of layers through it
    adds their effect to its rounding bounds (:func:`lipbound.blocks._fold_error`)."""

    kind = "diag"

    def __init__(self, name: str, in_shape: tuple[int, ...], scale: Tensor, shift: Tensor,
                 fold_rel: float = 0.0, shift_err: Tensor | None = None):
        super().__init__(name, in_shape, in_shape)
        self.scale = torch.broadcast_to(scale, in_shape).contiguous()
        self.shift = torch.broadcast_to(shift, in_shape).contiguous()
        self.fold_rel = float(fold_rel)
        self.shift_err = None if shift_err is None else \
            torch.broadcast_to(shift_err, in_shape).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def forward_error(self, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
        s = self.scale.abs()
        # (+ UNDERFLOW: the products' absolute rounding below the normal range)
        out = s * e + gamma(2) * (s * x[0].abs() + self.shift.abs()) + 4 * UNDERFLOW
        if self.fold_rel > 0.0 or self.shift_err is not None:
            # the exact layer's own scale and shift: |s* x* - s x| <= |s*| |x* - x| +
            # |s* - s| |x|, and |t* - t|; (1 + γ_4) covers this bound's arithmetic
            fold = (s * self.fold_rel) * (e + x[0].abs())
            if self.shift_err is not None:
                fold = fold + self.shift_err
            out = out + fold * (1.0 + gamma(4))
        return out


class ReshapeOp(Op):
    """Reshape keeping the row-major order (flatten, view, reshape)."""

    kind = "reshape"

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def forward_error(self, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
        return e if e.dim() == 0 else e.reshape(self.out_shape)


class ReLUOp(Op):
    kind = "relu"

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def forward_error(self, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
        return e  # 1-Lipschitz elementwise, and exact
