"""Zero padding (``nn.ZeroPad2d``, ``nn.ConstantPad2d(p, 0)``, ``F.pad(x, p)``) right before a
2-D convolution: folded into the convolution's own zero padding.

A convolution with zero padding ``p`` of an input already padded with ``q`` zeros on every side
is, output for output, the convolution with padding ``p + q`` of the unpadded input (the same
kernel meets the same values, the added ones being zeros either way), so the pair is the single
:class:`~lipbound.ops.conv.ConvOp` of the larger padding: the same linear map exactly, analysed
by the convolution's rules. Only symmetric padding (left = right, top = bottom) can be folded
that way; other zero padding, and zero padding that no convolution follows (before a max
pooling, whose own padding is ``-inf``), is refused with the reason.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Op
from .conv import ConvOp


class FunctionalPad(nn.Module):
    """The settings of a call ``F.pad(x, pad, mode, value)`` (for its rule; never run)."""

    def __init__(self, pad, mode: str = "constant", value: float | None = None):
        super().__init__()
        self.padding = pad
        self.mode = mode
        self.value = value


class ZeroPadOp(Op):
    """Zero padding of the last two dimensions by ``(left, right, top, bottom)``: a marker
    that :func:`fold_zero_padding` merges into the convolution that follows it (it carries no
    bound rules of its own). ``where`` / ``what`` name the layer for an error."""

    kind = "pad"

    def __init__(self, name: str, in_shape, out_shape, pads: tuple[int, int, int, int]):
        super().__init__(name, in_shape, out_shape)
        self.pads = tuple(int(p) for p in pads)
        self.where = name
        self.what = "zero padding"

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pads)


_FIX = ("zero padding is analysed only where a Conv2d (or F.conv2d, or AvgPool2d) follows it "
        "directly, folded into that layer's own zero padding")


def zeropad_rule(module: nn.Module, name: str, in_shape, out_shape) -> ZeroPadOp:
    """``nn.ZeroPad2d``, ``nn.ConstantPad1d/2d`` with value 0 and ``F.pad`` with
    ``mode='constant'`` and value 0 (or None), of a per-sample ``(C, H, W)`` tensor."""
    mode = getattr(module, "mode", "constant")
    if mode != "constant":
        raise NotImplementedError(
            f"F.pad with mode={mode!r}: only zero padding (mode='constant', value 0) is "
            "supported (" + _FIX + ")")
    value = getattr(module, "value", 0.0)
    if value is not None and float(value) != 0.0:
        raise NotImplementedError(
            f"constant padding with value {value!r}: only zero padding is supported (" + _FIX
            + ")")
    pads = tuple(int(p) for p in module.padding) if isinstance(module.padding, (tuple, list)) \
        else (int(module.padding),) * (2 if isinstance(module, nn.ConstantPad1d) else 4)
    if len(in_shape) != 3 or len(pads) not in (2, 4):
        raise NotImplementedError(
            f"padding {pads} of a per-sample tensor of shape {tuple(in_shape)}: only the "
            "padding of the height and width of a (C, H, W) tensor is supported")
    if len(pads) == 2:
        pads = pads + (0, 0)
    if min(pads) < 0:
        raise NotImplementedError(f"negative padding {pads} (cropping)")
    return ZeroPadOp(name, in_shape, out_shape, pads)  # type: ignore[arg-type]


def fold_zero_padding(ops: list[Op]) -> tuple[list[Op], list[tuple[str, str, str]]]:
    """Merge each run of :class:`ZeroPadOp` into the convolution right after it.

    Returns the new chain and the problems ``(where, kind, detail)`` of padding that cannot be
    folded (asymmetric, or not followed by a convolution)."""
    out: list[Op] = []
    problems: list[tuple[str, str, str]] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if not isinstance(op, ZeroPadOp):
            out.append(op)
            i += 1
            continue
        run = [op]
        while i + len(run) < len(ops) and isinstance(ops[i + len(run)], ZeroPadOp):
            run.append(ops[i + len(run)])  # type: ignore[arg-type]
        left, right, top, bottom = (sum(p.pads[k] for p in run) for k in range(4))
        nxt = ops[i + len(run)] if i + len(run) < len(ops) else None
        where, what = run[0].where, run[0].what
        if type(nxt) is not ConvOp:
            problems.append((where, what, _FIX + "; here none does"))
        elif left != right or top != bottom:
            problems.append((where, what, f"asymmetric zero padding (left, right, top, "
                             f"bottom) = {(left, right, top, bottom)}: only padding with left "
                             "= right and top = bottom can be folded into the convolution "
                             "after it (" + _FIX + ")"))
        else:
            conv: ConvOp = nxt  # type: ignore[assignment]
            names = "+".join(p.name for p in run)
            out.append(ConvOp(
                f"{names}+{conv.name}", run[0].in_shape, conv.out_shape, conv.weight,
                conv.bias, conv.stride, (conv.padding[0] + top, conv.padding[1] + left),
                conv.dilation, conv.groups, out_scale=conv.out_scale))
            i += len(run) + 1
            continue
        out.extend(run)
        i += len(run)
    return out, problems
