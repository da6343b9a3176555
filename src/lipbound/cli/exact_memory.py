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
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

BYTES_PER_ENTRY = 8  # float64


def exact_bytes(rows: int, cols: int) -> int:
    """Lower estimate of the memory (bytes) of the exact route on an ``rows x cols``
    matrix: the matrix and its rescaled copy, and the Gram matrix of the smaller side."""
    lo = min(rows, cols)
    return BYTES_PER_ENTRY * (2 * rows * cols + lo * lo)


def _cgroup_limit() -> int | None:
    """The memory limit of this process' control group (containers), if any."""
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def physical_memory(device: torch.device | str | None = None) -> int | None:
    """Memory (bytes) available to this process on ``device``: the GPU's total memory for
    CUDA, else the machine's physical memory (capped by a container's limit); ``None``
    when it cannot be read."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(dev).total_memory)
        except (RuntimeError, AssertionError, AttributeError):
            return None
    total = None
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        total = None
    limit = _cgroup_limit()
    if total is None:
        return limit
    return min(total, limit) if limit is not None else total


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


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
            f"float64 (at least {_gb(need)}, {math.ceil(need / avail)}x the {_gb(avail)} of "
            f"memory of {where}). Use --spectral auto (exact where affordable, Lanczos "
            "with a probabilistic guarantee elsewhere) or --spectral lanczos")
