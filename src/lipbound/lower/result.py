"""The result object returned by every lower-bound method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lipbound.results import Guarantee, _jsonable


@dataclass(frozen=True)
class LowerBoundResult:
    """An empirical lower bound on the local Lipschitz constant relative to ``x0``.

    The value is a ratio actually attained by the witness ``x``:
    ``value <= ||C (f(x) - f(x0))||_2 / ||x - x0||_2`` with ``0 < ||x - x0||_2 <= eps``
    (exactly, not only as float64 computes the distance), recomputed from ``x`` with fresh
    forward passes in float64 (with a float64 copy of a float32 model, i.e. its own weights;
    ``details["evaluated_in"]`` says if the model could only run in its own dtype) and
    lowered by an allowance for their rounding (``details["rounding_error_estimate"]``,
    relative), so ``value <= lipbound.lower.ratio_at(model, x0, witness)``. It is therefore
    a lower bound on ``L(x0, eps)`` (up to that rounding estimate), never an upper bound.
    The ball is centred at ``x0`` itself: a float64 ``x0`` that the model's float32 cannot
    represent is searched around on a float64 copy of the model (the witness is float64).

    Attributes:
        value: the attained ratio.
        witness: the input ``x`` attaining it, shape ``(1, *input_shape)``.
        method: ``"random"``, ``"gradient"``, ``"pgd"`` or ``"best"``.
        eps: the L2 radius of the ball around ``x0``.
        seconds: wall-clock time of the computation.
        guarantee: always :attr:`Guarantee.LOWER`.
        n_evaluations: number of network evaluations at single inputs (each row of a
            batched forward pass counts once; a forward+backward pass counts once).
        details: method-specific information (JSON-friendly values).
    """

    value: float
    witness: torch.Tensor
    method: str
    eps: float
    seconds: float
    guarantee: Guarantee = Guarantee.LOWER
    n_evaluations: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def witness_distance(self) -> float:
        """``||x - x0||_2`` of the witness, as recorded when the value was computed."""
        return float(self.details.get("witness_distance", float("nan")))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; the witness is summarised by its distance to ``x0``."""
        d = {
            "value": self.value,
            "guarantee": self.guarantee,
            "method": self.method,
            "quantity": "sup_{0<||x-x0||<=eps} ||C(f(x)-f(x0))|| / ||x-x0|| (lower bound)",
            "eps": self.eps,
            "seconds": self.seconds,
            "n_evaluations": self.n_evaluations,
            "witness_distance": self.witness_distance,
            "witness_shape": list(self.witness.shape),
            "details": {k: v for k, v in self.details.items() if k != "witness_distance"},
        }
        return _jsonable(d)
