"""Rules for plain arithmetic with a constant inside ``forward``: ``x / 255``, ``x * 2 - 1``,
``(x - self.mean) / self.std``, ``0.5 * x``, ``x.mul(c)``, ``torch.add(x, c)``, ``-x``.

Each is the affine map ``y = scale * x + shift`` with a constant diagonal scale, analysed as a
:class:`~lipbound.ops.base.DiagOp` (the diagonal affine layers of Avant & Morgansen, IEEE
TNNLS 2023, like batch norm and input normalisation). Exactly one operand must be the
chain's tensor; the other a Python number or a tensor held by the model as a parameter or
buffer (:func:`lipbound.graph.trace_model` decides which is which). Everything else (``x *
x``, the sum of two chain tensors, a division by the chain's tensor, a constant that is not
finite, that broadcasts to change the shape or divides by 0) raises ``NotImplementedError``
with the reason, which the tracer lists as unsupported.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

from .base import MIN_NORMAL, DiagOp, gamma

CHAIN = object()
"""Marker for the operand that is the chain's tensor."""

ARITH_FUNCTIONS: dict[object, str] = {
    operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", torch.div: "div", torch.divide: "div", torch.true_divide: "div",
    operator.neg: "neg", torch.neg: "neg", torch.negative: "neg",
}
"""Functions (and operators) that are affine maps when one operand is a constant."""

ARITH_METHODS: dict[str, str] = {
    "add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul",
    "div": "div", "divide": "div", "true_divide": "div", "neg": "neg", "negative": "neg",
}
"""Tensor methods (not the in-place ones) that are affine maps with a constant operand."""

#: what a constant may go through before it meets the chain (``self.std.view(1, -1, 1, 1)``):
#: methods that keep its values (or cast them to float32 / float64, read after the cast)
CONST_METHODS = frozenset(("view", "reshape", "unsqueeze", "detach", "float", "double",
                           "contiguous", "clone"))


def arith_kind(op: str, target: object) -> str | None:
    """``"add"``, ``"sub"``, ``"mul"``, ``"div"`` or ``"neg"`` for an fx node's ``op`` and
    ``target`` that is one of these operations, else ``None``."""
    if op == "call_function":
        try:
            return ARITH_FUNCTIONS.get(target)
        except TypeError:  # an unhashable target
            return None
    if op == "call_method":
        return ARITH_METHODS.get(str(target))
    return None


def operands(kind: str, is_method: bool, args: tuple, kwargs: dict) -> list:
    """The operands of the call, in order (``input`` / ``other`` given by keyword included).

    Raises:
        NotImplementedError: for another keyword (``alpha`` other than 1, ``rounding_mode``
            other than None, ``out``) or a wrong number of operands.
    """
    args = list(args)
    kwargs = dict(kwargs)
    if "input" in kwargs and not is_method:
        args.insert(0, kwargs.pop("input"))
    if "other" in kwargs:
        args.append(kwargs.pop("other"))
    alpha = kwargs.pop("alpha", 1)
    if kind in ("add", "sub") and (isinstance(alpha, bool) or alpha != 1):
        raise NotImplementedError(f"{kind} with alpha={alpha!r} (only alpha=1 is supported: "
                                  "write the scaling as its own multiplication)")
    if kind == "div" and kwargs.pop("rounding_mode", None) is not None:
        raise NotImplementedError("division with a rounding_mode (floor / trunc) is not "
                                  "an affine map")
    if kwargs:
        raise NotImplementedError(f"keyword argument(s) {sorted(kwargs)} are not supported")
    want = 1 if kind == "neg" else 2
    if len(args) != want:
        raise NotImplementedError(f"{kind} with {len(args)} operand(s) (expected {want})")
    return args


def _number(v: object) -> Tensor:
    """A Python / numpy real number as an exact float64 0-dim tensor."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        raise NotImplementedError(f"a boolean constant ({v!r}) in arithmetic with the chain")
    if isinstance(v, numbers.Integral):
        try:
            f = float(v)
        except OverflowError:
            raise NotImplementedError(f"the integer constant {v} overflows float64") from None
        if int(f) != int(v):
            raise NotImplementedError(f"the integer constant {v} is not exactly a float64")
    else:
        f = float(v)  # numbers.Real: a float64 holds a float32 / float64 value exactly
    if not math.isfinite(f):
        raise NotImplementedError(f"the constant {v!r} is not finite")
    return torch.tensor(f, dtype=torch.float64)


def _tensor(t: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """A constant tensor as float64 (exactly), shaped to broadcast over one sample."""
    if t.dtype == torch.bool or t.is_complex():
        raise NotImplementedError(f"a {str(t.dtype).removeprefix('torch.')} constant tensor")
    t = t.detach()
    if not t.is_floating_point():
        if t.numel() and int(t.abs().max()) > 2 ** 53:
            raise NotImplementedError("an integer constant tensor with entries beyond 2^53 "
                                      "(not exactly float64 numbers)")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise NotImplementedError("the constant tensor holds NaN or inf")
    p = len(in_shape)
    if t.dim() > p + 1 or (t.dim() == p + 1 and t.shape[0] != 1):
        raise NotImplementedError(
            f"the constant of shape {tuple(t.shape)} does not broadcast over the batch "
            f"(inputs of shape (N, {', '.join(map(str, in_shape))})): give it a batch "
            "dimension of 1 or none")
    if t.dim() == p + 1:
        t = t[0]
    try:
        ok = torch.broadcast_shapes(tuple(t.shape), in_shape) == tuple(in_shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise NotImplementedError(
            f"the constant of shape {tuple(t.shape)} broadcasts the input of per-sample shape "
            f"{tuple(in_shape)} to another shape")
    return t


def constant(v: object, in_shape: tuple[int, ...]) -> Tensor:
    """The float64 value of a constant operand, broadcastable to ``in_shape``.

    Raises:
        NotImplementedError: a boolean, complex, non-finite or inexact value, a tensor that
            changes the shape, or something that is not a number or a tensor.
    """
    if isinstance(v, Tensor):
        return _tensor(v, in_shape)
    if isinstance(v, numbers.Real) or type(v).__name__ == "bool_":
        return _number(v)
    raise NotImplementedError(f"the operand {v!r} ({type(v).__name__}) is not a number or a "
                              "constant tensor")


def _rounded(c: Tensor, dtype: torch.dtype) -> tuple[float, Tensor]:
    """For a constant ``c`` (float64) in an operation computed in ``dtype``: torch rounds it
    to ``dtype`` (a Python number, or a 0-dim tensor, times a float32 tensor uses the float32
    number). Returns ``(rel, diff)``: an upper bound on ``|c - c'| / |c|`` over the entries
    and ``|c - c'|`` (rounded up), for ``c'`` the rounded constant, so that the analysis
    covers the exact constant and the one the model uses.

    Raises:
        NotImplementedError: the rounded constant is not finite.
    """
    if dtype == torch.float64 or not dtype.is_floating_point:
        return 0.0, torch.zeros((), dtype=torch.float64)
    r = c.to(dtype).to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise NotImplementedError(f"the constant overflows {str(dtype).removeprefix('torch.')}"
                                  ", the type the model computes in")
    # (c and r agree in sign and lie within a factor 2 unless r is 0: c - r is exact)
    diff = (c - r).abs()
    if not bool((diff > 0).any()):
        return 0.0, torch.zeros((), dtype=torch.float64)
    nz = c != 0
    rel = float((diff[nz] / c[nz].abs()).max()) if c.dim() else float(diff / c.abs())
    return rel * (1.0 + 2.0 ** -50), diff * (1.0 + 2.0 ** -50)


def arith_rule(kind: str, ops: list, name: str, in_shape, out_shape,
               dtype: torch.dtype = torch.float64) -> DiagOp:
    """The :class:`DiagOp` of ``kind`` applied to ``ops`` (one of them :data:`CHAIN`, the
    others already converted by :func:`constant`), computed by the model in ``dtype``.

    ``x / c`` is computed by torch as a division: the stored scale ``fl(1/c)`` is within
    ``γ_1 |fl(1/c)|`` of the exact ``1/c`` (``fold_rel``, taken as ``γ_2`` like
    :func:`~lipbound.ops.elementwise.normalize_rule`). Every other scale and shift is the
    constant itself, or its negation, exactly. In a float32 operation torch uses the
    constant rounded to float32: the difference is added to ``fold_rel`` (scales) or
    ``shift_err`` (shifts), so that the bounds hold for the constant as written and as used.

    Raises:
        NotImplementedError: the chain's tensor is not exactly one operand, a division by
            it or by a constant with a zero entry or whose reciprocal leaves the float64
            normal range, or a constant that changes the shape.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape != out_shape:
        raise NotImplementedError(f"the output shape {out_shape} differs from the input's "
                                  f"{in_shape}")
    chain = [i for i, v in enumerate(ops) if v is CHAIN]
    if len(chain) != 1:
        raise NotImplementedError(
            f"{kind} of {len(chain)} operands on the chain (x * x, x + y of two chain "
            "tensors, residual connections): only arithmetic with a constant is supported")
    one = torch.ones((), dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    if kind == "neg":
        return DiagOp(name, in_shape, -one, zero)
    first = chain[0] == 0
    c = ops[1] if first else ops[0]
    if kind == "div" and not first:
        raise NotImplementedError("division by the chain's tensor (c / x) is not an affine map")
    if kind == "div" and bool((c == 0).any()):
        raise NotImplementedError("division by a constant with a zero entry")
    rel, diff = _rounded(c, dtype)
    err = diff if rel > 0.0 else None
    if kind == "add":
        return DiagOp(name, in_shape, one, c, shift_err=err)
    if kind == "sub":
        return DiagOp(name, in_shape, one, -c, shift_err=err) if first else \
            DiagOp(name, in_shape, -one, c, shift_err=err)
    if kind == "mul":
        return DiagOp(name, in_shape, c, zero, fold_rel=rel)
    if kind == "div":
        if rel >= 0.5:
            raise NotImplementedError(f"the divisor rounds to 0 in "
                                      f"{str(dtype).removeprefix('torch.')}")
        scale = 1.0 / c
        a = scale.abs()
        if bool(((a < MIN_NORMAL) | ~torch.isfinite(a)).any()):
            raise NotImplementedError(
                "the reciprocal of the divisor leaves the float64 normal range (a divisor "
                "below 1e-308 or above 4e307 in magnitude): its rounding cannot be bounded; "
                "rescale")
        # |1/c' - 1/c| <= rel / (1 - rel) |1/c| for the divisor c' the model uses
        fold = gamma(2) + 2.0 * rel / (1.0 - rel) if rel > 0.0 else gamma(2)
        return DiagOp(name, in_shape, scale, zero, fold_rel=fold)
    raise NotImplementedError(f"unknown arithmetic {kind!r}")  # pragma: no cover
