"""Exceptions raised by lipbound.

Every error names the problem and, where there is one, the fix. All derive from
:class:`LipboundError` (itself a :class:`ValueError`), so callers can catch one type.
"""

from __future__ import annotations


class LipboundError(ValueError):
    """Base class of every error lipbound raises on bad input."""


class UnsupportedModelError(LipboundError):
    """The model contains operations lipbound has no sound rule for.

    ``nodes`` lists every offending node at once as ``(where, type, detail)``.
    """

    def __init__(self, nodes: list[tuple[str, str, str]], note: str = "",
                 residual: bool = False):
        self.nodes = list(nodes)
        self.note = note
        """More about the model as a whole (a residual network: what analyses it)."""
        self.residual = residual
        """Whether the model is a residual network lipbound splits into stages
        (:mod:`lipbound.residual`)."""
        lines = [f"  - {where}: {kind}" + (f" ({detail})" if detail else "")
                 for where, kind, detail in self.nodes]
        super().__init__(
            f"the model has {len(self.nodes)} unsupported operation(s):\n" + "\n".join(lines)
            + "\nlipbound supports chains of Linear, Conv2d (or F.linear / F.conv2d with "
            "the model's parameters), ReLU, clamp / ReLU6 / Hardtanh, MaxPool2d, AvgPool2d, "
            "AdaptiveAvgPool2d, BatchNorm1d/2d (eval), Dropout (eval), Flatten/view/reshape/"
            "squeeze/unsqueeze, Identity, lipbound.Normalize and arithmetic with a constant "
            "(x / 255, x - self.mean); rewrite these parts with supported layers, or "
            "register a rule with lipbound.register_rule." + (f"\n{note}" if note else "")
        )


class InputError(LipboundError):
    """An input tensor, epsilon or option is invalid (shape, NaN/inf, eps <= 0, ...)."""


class ExactRouteTooLarge(InputError):
    """``spectral="exact"`` would form a layer's matrix that cannot fit in memory.

    Raised before the matrix is formed (the process would otherwise be killed by the OS after
    a long wait). ``rows``/``cols``: the (masked) matrix; ``need``/``avail``: bytes;
    ``layer``: the layer's name where known.
    """

    def __init__(self, rows: int, cols: int, need: int, avail: int | None, where: str,
                 layer: str | None = None):
        self.rows, self.cols, self.need, self.avail = rows, cols, need, avail
        self.where, self.layer = where, layer
        what = f"layer {layer}: its" if layer else "a layer's"
        if avail is None:  # the allocation itself failed (e.g. a GPU shared with others)
            size = f"at least {need / 1e9:.3g} GB, and {where} ran out of memory forming it"
        else:
            ratio = -(-need // max(avail, 1))
            size = (f"at least {need / 1e9:.3g} GB, {ratio}x the {avail / 1e9:.3g} GB of "
                    f"memory of {where}")
        super().__init__(
            f"spectral='exact' (CLI --spectral exact) cannot compute {what} {rows} x {cols} "
            f"matrix (the rows and columns that can move): the exact route forms it densely "
            f"in float64, {size}. Use spectral='auto' (exact where affordable, Lanczos with a "
            f"probabilistic guarantee elsewhere) or 'lanczos', or a smaller eps")

    def for_layer(self, layer: str) -> ExactRouteTooLarge:
        """The same error naming the layer."""
        return ExactRouteTooLarge(self.rows, self.cols, self.need, self.avail, self.where,
                                  layer)


class WeightsError(LipboundError):
    """A weights file is missing, unreadable or does not match the model."""


class ZooError(LipboundError):
    """Unknown zoo model name or sample reference."""
