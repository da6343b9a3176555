"""AutoLip: the product of the layers' spectral norms.

Reference: K. Scaman and A. Virmaux, *Lipschitz regularity of deep neural networks:
analysis and efficient estimation*, NeurIPS 2018 (Section 4, "AutoLip").

Quantity: the **global** Lipschitz constant of ``f`` (or of ``C f`` with an output map) with
respect to the L2 norm on input and output, ``sup_{x != y} ||f(x) - f(y)|| / ||x - y||``.

Guarantee: CERTIFIED upper bound. ReLU is 1-Lipschitz, so ``L(f) <= prod_k ||W_k||_2``.
Each spectral norm is certified by :func:`~lipbound.baselines.fc.safe_spectral_norm` (the
float64 Gram matrix of the smaller side and a symmetric eigensolver, with explicit rounding
terms and a relative margin of ``1e-9``; sparse layers split exactly into diagonal blocks),
and the product is rounded up (the paper uses power iteration, which approaches the norm
from below and is therefore not a bound; we do not).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from lipbound.baselines.deadline import Deadline
from lipbound.baselines.fc import (
    apply_output_map,
    as_fc,
    chain_caveats,
    chain_note,
    check_range,
    round_up,
    safe_spectral_norm,
)
from lipbound.results import BoundResult, Guarantee

__all__ = ["autolip"]


def autolip(net: nn.Module | Sequence[tuple[Any, Any]], *, output_map: Any | None = None,
            input_shape: Sequence[int] | None = None, model_name: str | None = None,
            time_limit: float | None = None) -> BoundResult:
    """AutoLip bound ``prod_k ||W_k||_2`` on the global L2 Lipschitz constant.

    Args:
        net: a fully connected ReLU network (module) or its layers ``[(W, b), ...]``.
        output_map: optional ``(m, n_out)`` matrix ``C``; the bound is then for ``C f``.
        input_shape: input shape without batch (only needed for some Normalize layers).
        model_name: name stored in the result.
        time_limit: seconds (``None``: no limit), checked after each layer's spectral norm
            (:mod:`lipbound.baselines.deadline`).

    Returns:
        A CERTIFIED :class:`~lipbound.results.BoundResult` with ``eps=None``.

    Raises:
        TimeLimitError: ``time_limit`` passed before every layer's norm was computed.

    Example:
        >>> from torch import nn
        >>> autolip(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))).guarantee
        <Guarantee.CERTIFIED: 'certified upper bound'>
    """
    t0 = time.perf_counter()
    deadline = Deadline(time_limit, "autolip")
    layers = apply_output_map(as_fc(net, input_shape=input_shape), output_map)
    check_range(layers, what="autolip")
    value = 1.0
    for k, (w, _) in enumerate(layers):
        deadline.check(f"{k} of {len(layers)} layers")
        value = value * safe_spectral_norm(w)
    # K multiplications, each with relative error <= u: covered by the extra factor
    value = round_up(value * (1.0 + 4e-16 * len(layers)))
    return BoundResult(
        value=value, guarantee=Guarantee.CERTIFIED, method="autolip",
        quantity="global L2 Lipschitz constant (all pairs of inputs)", eps=None,
        seconds=time.perf_counter() - t0, norm="l2", model=model_name,
        notes=(chain_note(layers) + "; certified float64 spectral norm per layer",
               *chain_caveats(layers)),
    )
