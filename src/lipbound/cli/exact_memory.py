"""Refuse ``--spectral exact`` global bounds that cannot fit in memory, before computing.

The exact (certified) route forms each affine layer's matrix densely in float64 and takes
the top eigenvalue of the Gram matrix of its smaller side (:func:`lipbound.spectral.
exact_norm`): for a layer with ``m`` outputs and ``n`` inputs that holds at least the
``m x n`` matrix and its rescaled copy at the same time, plus the ``min(m, n)``-square Gram
matrix, i.e. ``8 (2 m n + min(m, n)^2)`` bytes. For a global bound every row and column
takes part, so this is a lower estimate of the peak, not a guess: AlexNet's first
convolution alone (150528 inputs, 193600 outputs) would need about 470 GB. A layer whose
estimate exceeds the memory of the device (RAM, or the GPU's memory) cannot be computed
this way, and the process would only be killed by the OS after a long wait.
"""

from __future__ import annotations

import math
from typing import Any

from .._memory import exact_bytes, gb, physical_memory
from ..errors import InputError

__all__ = ["check_exact_global_fits", "exact_bytes", "largest_exact_layer", "physical_memory"]

def largest_exact_layer(analyzer: Any) -> tuple[str, int, int] | None:
    """``(name, rows, cols)`` of the analyzer's affine layer whose exact route needs the
    most memory for a global bound (every row and column), or ``None`` without one."""
    from ..blocks import AffineBlock

    best: tuple[str, int, int] | None = None
    for i, b in enumerate(analyzer.blocks):
        if not isinstance(b, AffineBlock) or b.mixing is None:
            continue
        rows, cols = int(b.out_dim), int(b.in_dim)
        if best is None or exact_bytes(rows, cols) > exact_bytes(best[1], best[2]):
            best = (str(getattr(b, "name", None) or f"layer {i}"), rows, cols)
    return best


def check_exact_global_fits(analyzer: Any, *, spectral: str,
                            memory: int | None = None) -> None:
    """Raise :class:`InputError` before computing when ``spectral == "exact"`` and the
    global bound's exact route cannot fit in the memory of the analyzer's device.

    ``memory``: the bytes available (default: :func:`physical_memory` of the device).
    """
    if spectral != "exact":
        return
    layer = largest_exact_layer(analyzer)
    if layer is None:
        return
    avail = physical_memory(getattr(analyzer, "device", None)) if memory is None else memory
    if avail is None:
        return
    name, rows, cols = layer
    need = exact_bytes(rows, cols)
    if need > avail:
        where = "GPU" if getattr(getattr(analyzer, "device", None), "type", "") == "cuda" \
            else "this machine"
        raise InputError(
            f"--spectral exact cannot compute the global bound of this model: its layer "
            f"{name} is a {rows} x {cols} matrix, and the exact route forms it densely in "
            f"float64 (at least {gb(need)}, {math.ceil(need / avail)}x the {gb(avail)} of "
            f"memory of {where}). Use --spectral auto (exact where affordable, Lanczos "
            "with a probabilistic guarantee elsewhere) or --spectral lanczos")
