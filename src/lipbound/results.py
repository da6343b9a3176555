"""Typed, frozen result objects. Each says what its number is and what guarantee it carries."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch


class Guarantee(str, Enum):
    """What a reported number is.

    * ``EXACT`` -- the true value (up to float64 rounding, covered by a stated margin).
    * ``CERTIFIED`` -- a deterministic upper bound: always >= the true value.
    * ``PROBABILISTIC`` -- an upper bound that holds with probability >= 1 - failure_prob
      over the algorithm's own random draws (never over the data).
    * ``LOWER`` -- an empirical lower bound, attained by a concrete witness input.
    * ``ESTIMATE`` -- neither a bound nor exact (e.g. raw power iteration, greedy SeqLip).
    * ``ATTACK`` -- the size of a verified class-changing perturbation (an upper bound on
      the minimal adversarial perturbation, found by an attack).
    * ``CERTIFIED_LOWER`` / ``PROBABILISTIC_LOWER`` -- a lower bound proved from certified
      (probabilistic, with its failure_prob) upper bounds: a certified radius, a lower bound
      on the minimal adversarial perturbation.
    """

    EXACT = "exact"
    CERTIFIED = "certified upper bound"
    PROBABILISTIC = "probabilistic upper bound"
    LOWER = "empirical lower bound"
    ESTIMATE = "estimate"
    ATTACK = "attack (verified adversarial example)"
    CERTIFIED_LOWER = "certified lower bound"
    PROBABILISTIC_LOWER = "probabilistic lower bound"

    @property
    def is_upper_bound(self) -> bool:
        return self in (Guarantee.EXACT, Guarantee.CERTIFIED, Guarantee.PROBABILISTIC)


def lower_bound_from(g: Guarantee) -> Guarantee:
    """The guarantee of a lower bound derived from an upper bound of guarantee ``g`` (a
    certified radius from a Lipschitz bound): probabilistic stays probabilistic."""
    if g == Guarantee.PROBABILISTIC:
        return Guarantee.PROBABILISTIC_LOWER
    if g in (Guarantee.EXACT, Guarantee.CERTIFIED):
        return Guarantee.CERTIFIED_LOWER
    raise ValueError(f"no lower bound follows from a value that is {g.value!r}")


def combine_guarantees(gs: list[Guarantee]) -> Guarantee:
    """Guarantee of a product/composition of upper bounds: the weakest of its parts."""
    order = [Guarantee.EXACT, Guarantee.CERTIFIED, Guarantee.PROBABILISTIC, Guarantee.ESTIMATE]
    worst = Guarantee.EXACT
    for g in gs:
        if g not in order:
            raise ValueError(f"cannot compose guarantee {g!r} into an upper bound")
        if order.index(g) > order.index(worst):
            worst = g
    return worst


def _jsonable(v: Any) -> Any:
    """``v`` with everything JSON cannot hold replaced, the one rule of every ``to_dict``:
    enums by their value, tensors by a number (one element) or nested lists, non-finite
    floats by ``None`` (NaN) or ``"inf"``/``"-inf"``, dictionary keys by strings, tuples by
    lists."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@dataclass(frozen=True)
class LayerFactor:
    """One layer's contribution to a bound.

    Attributes:
        index: position in the chain of analysed layers (0-based).
        name: where the layer sits in the model (module path(s)).
        kind: e.g. ``"affine-relu"``, ``"affine"``, ``"maxpool"``, ``"relu"``.
        local: the layer's local factor (upper bound on its local constant at this radius),
            or ``nan`` for a global-only computation.
        global_factor: the layer's global factor (upper bound on its global constant).
        radius_in: the radius of the ball this layer sees (eps_k), ``nan`` for global.
        guarantee: guarantee of the factor that entered the product.
        failure_prob: probability that ``local``/``global_factor`` is not an upper bound
            (0 for deterministic methods).
        spectral_method: how the spectral norm was obtained (``"svd"``, ``"lanczos"``,
            ``"closed-form"``, ``"fft"``, ...).
        active_in: number of input coordinates that can move (mask D).
        active_out: number of outputs that can move.
    """

    index: int
    name: str
    kind: str
    local: float
    global_factor: float
    radius_in: float
    guarantee: Guarantee
    failure_prob: float = 0.0
    spectral_method: str = ""
    active_in: int = -1
    active_out: int = -1

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class BoundResult:
    """A Lipschitz upper bound (or exact value / estimate, as ``guarantee`` says).

    Attributes:
        value: the number.
        guarantee: see :class:`Guarantee`.
        method: ``"local"``, ``"global"`` or a baseline's name.
        quantity: what is bounded, in words.
        eps: the radius of the L2 ball (``None`` for a global bound).
        seconds: wall-clock time of the computation.
        layers: per-layer factors (empty when the method has none).
        failure_prob: probability (over the algorithm's random draws) that a probabilistic
            bound fails; 0 for deterministic guarantees.
        norm: the norm on input and output (``"l2"`` unless said).
        model: a name for the model, when known.
        notes: free-text caveats (e.g. "seeded random weights").
    """

    value: float
    guarantee: Guarantee
    method: str
    quantity: str
    eps: float | None
    seconds: float
    layers: tuple[LayerFactor, ...] = ()
    failure_prob: float = 0.0
    norm: str = "l2"
    model: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    nominal_error: float = math.nan
    """Local bounds: a bound on ``||f̂(x0) - f(x0)||``, the float64 output at ``x0`` against
    the exact network's (the rounding of the nominal forward pass), valid under the same
    event as ``value``; NaN where not computed."""
    source: str = ""
    """Which bound ``value`` is. The analyzer's local bounds: ``"product"`` (the paper's
    layer-wise product), ``"global"`` (the global bound, reported because it was smaller) or
    ``"tight"`` (the centre-plus-deviation bound of :mod:`lipbound.tight`, over the whole
    network or a tail of it); its global bounds: ``"global"``; ``""`` where not said (the
    rival methods)."""

    def to_dict(self) -> dict[str, Any]:
        d = {
            "value": self.value,
            "guarantee": self.guarantee,
            "method": self.method,
            "quantity": self.quantity,
            "eps": self.eps,
            "seconds": self.seconds,
            "failure_prob": self.failure_prob,
            "norm": self.norm,
            "model": self.model,
            "notes": list(self.notes),
            "nominal_error": self.nominal_error,
            "source": self.source,
            "layers": [lf.to_dict() for lf in self.layers],
        }
        return _jsonable(d)


def format_prob_up(p: float, digits: int = 1) -> str:
    """``p`` in scientific notation with ``digits`` significant digits, rounded **up** (toward
    +inf), for labels that say ``p_fail <= ...``: plain ``f"{p:.0e}"`` rounds to nearest and
    would state ``1e-06`` for a failure probability of ``1.4e-06``.

    >>> format_prob_up(1.4e-6), format_prob_up(3.75e-6, 2), format_prob_up(1e-6)
    ('2e-06', '3.8e-06', '1e-06')
    """
    from ._rounding import _directed

    if not (math.isfinite(p) and p > 0):
        return f"{p:g}"
    # the exact binary value, formatted rounding toward +inf (the same directed formatting as
    # the tables' bounds); its own quantize-then-float stated 4.9e-324 for 5e-324
    return _directed(p, f".{digits - 1}e", True)
