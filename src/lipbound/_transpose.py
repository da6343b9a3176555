"""Transposed copies of big float64 matrices, by MKL's out-of-place transposition when torch
carries it.

The block products of a fully connected layer read its matrix in both layouts
(:class:`lipbound.ops.dense.DenseProducts`), and the second one is a copy made on the first
transposed product of every analyzer, inside the bound. torch copies a transposed 2-D tensor
on one core at about 4 GB/s (AlexNet's 4096 x 9216 float64 layer: 140 ms on this project's
CPU); MKL's ``mkl_domatcopy``, which torch's x86 builds link and export, takes 63 ms. A copy
with ``alpha = 1`` moves every bit pattern unchanged (signed zeros, subnormals, infinities
and NaN payloads included; ``tests/test_same_bits_layer_ops.py`` checks random bit patterns).
Where the symbol is not found (builds without MKL, other platforms) torch's copy is used.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MKL_MIN_ENTRIES = 1 << 20
"""Smaller matrices are copied by torch (the call's fixed costs; AlexNet's 4096 x 1000 layer,
4M entries, 10.3 -> 5.4 ms)."""

_omatcopy: Any = None  # MKL_Domatcopy through ctypes, once looked up (False: not available)


def _mkl_omatcopy() -> Any:
    """MKL's ``MKL_Domatcopy`` from torch's CPU library, or ``False``."""
    global _omatcopy
    if _omatcopy is None:
        _omatcopy = False
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        if os.path.exists(path):
            try:  # (the library is loaded already: this only looks the symbol up)
                fn = ctypes.CDLL(path).MKL_Domatcopy
            except (OSError, AttributeError):
                log.debug("MKL_Domatcopy not found in %s", path)
            else:
                fn.restype = None
                fn.argtypes = [ctypes.c_char, ctypes.c_char, ctypes.c_size_t, ctypes.c_size_t,
                               ctypes.c_double, ctypes.c_void_p, ctypes.c_size_t,
                               ctypes.c_void_p, ctypes.c_size_t]
                _omatcopy = fn
    return _omatcopy


def transposed_copy(m: Tensor) -> Tensor:
    """``m.T.contiguous()`` for a 2-D tensor ``m`` (a new tensor, the same bits): by MKL for
    contiguous float64 CPU matrices of at least :data:`MKL_MIN_ENTRIES` entries where torch
    exports it, else by torch."""
    if (m.dim() == 2 and m.dtype == torch.float64 and m.device.type == "cpu"
            and m.layout == torch.strided and m.is_contiguous() and not m.is_neg()
            and m.numel() >= max(1, MKL_MIN_ENTRIES)):
        fn = _mkl_omatcopy()
        if fn:
            rows, cols = m.shape
            out = torch.empty(cols, rows, dtype=m.dtype)
            # row-major A (rows x cols, leading dimension cols) -> B = A^T (leading dim rows)
            fn(b"R", b"T", rows, cols, 1.0, m.data_ptr(), cols, out.data_ptr(), rows)
            return out
    return m.T.contiguous()
