"""Float32 arithmetic that the library reasons about must be IEEE float32 on CUDA too.

On CUDA, torch computes float32 convolutions with TF32 (10 explicit mantissa bits) by
default (``torch.backends.cudnn.allow_tf32``; new API ``torch.backends.cudnn.conv.
fp32_precision``), and float32 matrix products too once a program opts in
(``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision("high")``).
The bounds are float64 (unaffected), but a few float32 computations carry error models
or checks written for float32's unit roundoff 2^-24: the model's own forward pass that
decides the class a radius certifies (:func:`lipbound.radius.certified_radius`), the
chain check of :func:`lipbound.graph.trace_model`, the attacks' verification of a class
change and the lower bounds' recomputed ratios. :func:`exact_float32` runs them in IEEE
float32 on CUDA; on every other device it does nothing (CPU results are unchanged).

The settings are process-wide in torch: they are changed while any such call runs and
restored when the last one ends (safe between the library's own calls in several threads;
another thread that changes them meanwhile changes them for the library too).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from ._modelinfo import model_device

_F = TypeVar("_F", bound=Callable[..., Any])

# torch >= 2.9: per-backend ``fp32_precision`` settings ("ieee" / "tf32" / "none")
_NEW_API = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def float32_products_exact() -> bool:
    """Whether torch's float32 matrix products are plain float32 (precision "highest").

    ``False`` when the setting cannot be read: after a program mixes torch's legacy and new
    precision settings (e.g. ``torch.backends.cuda.matmul.fp32_precision = "tf32"``),
    ``torch.get_float32_matmul_precision()`` raises ``RuntimeError``."""
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:
        return False


def _read_flags() -> tuple[Any, Any]:
    if _NEW_API:
        return (torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision)
    return (torch.backends.cuda.matmul.allow_tf32,  # pragma: no cover - torch < 2.9
            torch.backends.cudnn.allow_tf32)


def _write_flags(flags: tuple[Any, Any]) -> None:
    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = \
            flags
    else:  # pragma: no cover - torch < 2.9
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


_IEEE = ("ieee", "ieee") if _NEW_API else (False, False)

# the flags are process-wide: the first of lipbound's threads to enter sets them, the last
# to leave restores them, so one thread leaving cannot switch TF32 back on under another
_lock = threading.Lock()
_inside = 0
_saved: tuple[Any, Any] | None = None


@contextmanager
def _ieee_float32_cuda() -> Iterator[None]:
    """CUDA float32 matrix products and cuDNN convolutions in IEEE float32 (no TF32) while
    inside (nested or in several threads: until the last one leaves); the previous settings
    are restored on exit."""
    global _inside, _saved
    with _lock:
        if _inside == 0:
            _saved = _read_flags()
            _write_flags(_IEEE)
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0 and _saved is not None:
                _write_flags(_saved)
                _saved = None


@contextmanager
def exact_float32(device: torch.device | str | None) -> Iterator[None]:
    """IEEE float32 products (no TF32) while inside when ``device`` is a CUDA device; a
    no-op for any other device or ``None``."""
    if device is None or torch.device(device).type != "cuda":
        yield
        return
    with _ieee_float32_cuda():
        yield


def exact_float32_on_model(fn: _F) -> _F:
    """Decorator: run ``fn(model, ...)`` under :func:`exact_float32` for the model's
    device (the first argument)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with exact_float32(model_device(model)):
            return fn(model, *args, **kwargs)
    return wrapper  # type: ignore[return-value]
