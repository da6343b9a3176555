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

    def __init__(self, nodes: list[tuple[str, str, str]]):
        self.nodes = list(nodes)
        lines = [f"  - {where}: {kind}" + (f" ({detail})" if detail else "")
                 for where, kind, detail in self.nodes]
        super().__init__(
            f"the model has {len(self.nodes)} unsupported operation(s):\n" + "\n".join(lines)
            + "\nlipbound supports chains of Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, "
            "AdaptiveAvgPool2d, BatchNorm1d/2d (eval), Dropout (eval), Flatten/view/reshape, "
            "Identity and lipbound.Normalize; rewrite these parts with supported layers, or "
            "register a rule with lipbound.register_rule."
        )


class InputError(LipboundError):
    """An input tensor, epsilon or option is invalid (shape, NaN/inf, eps <= 0, ...)."""


class WeightsError(LipboundError):
    """A weights file is missing, unreadable or does not match the model."""


class ZooError(LipboundError):
    """Unknown zoo model name or sample reference."""
