"""Memory of the process: keeping freed memory (for the command line), and how much there
is (to refuse the exact spectral route on matrices that cannot fit).

A bound allocates many short-lived tensors of tens of megabytes (convolution images, tile
transforms, Lanczos work vectors). glibc's ``malloc`` serves blocks above its mmap threshold
(at most 32 MB by default) with fresh ``mmap`` calls and returns them on ``free``, so every
such tensor costs a page fault per 4 KB when it is first written: measured on this project's
CPU, a float64 product into a fresh 25 MB tensor took 10 ms against 2.8 ms into a reused one,
and AlexNet's local bound 8 % longer. :func:`keep_freed_memory` raises the thresholds so that
freed blocks stay in the heap and are reused. It changes process-wide allocator settings, so
the library never calls it on import; the ``lipbound`` command calls it at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = (1 << 31) - 1
"""Blocks below this size come from the heap (1 GB: VGG-16's biggest Lanczos bases above it
still get their own mapping)."""

TRIM_THRESHOLD = (1 << 31) - 1
"""Free memory at the top of the heap kept for reuse instead of being returned (2 GB)."""

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed blocks for reuse (see the module docstring).

    Returns whether the settings were applied (``False`` off glibc, e.g. on macOS or with
    another allocator; then nothing is changed). Calling it again does nothing more.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
            return False
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    except (OSError, AttributeError, TypeError) as exc:  # pragma: no cover - exotic libc
        log.debug("mallopt not available: %s", exc)
        return False
    _done = ok
    return ok


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
    import torch

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


def gb(n: float) -> str:
    """Bytes as a short "x.xx GB" string."""
    return f"{n / 1e9:.3g} GB"
