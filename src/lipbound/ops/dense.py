"""Products of a dense float64 matrix with blocks of vectors, fast in both directions.

Block Lanczos (:mod:`lipbound.lanczos`) applies a fully connected layer and its transpose to
``b`` vectors at a time. Such products are memory-bound (one pass over the matrix serves all
``b`` vectors), but only in the layout BLAS handles well: measured on this project's CPU
(MKL, float64, one thread, a 4096 x 9216 matrix), ``M @ V^T`` with ``M`` row-major costs 1.5x
a single matrix-vector product for 4-16 vectors, while ``Y @ M`` (the transposed product on the
same storage) costs 2-3x. The transposed product therefore reads a transposed copy of ``M``,
made on first use and kept: memory for speed, only for matrices that run block products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._transpose import transposed_copy

SMALL_BATCH = 2
"""Up to this many vectors the plain forms (``V @ M^T``, ``Y @ M``) are as fast."""


class DenseProducts:
    """``M v`` and ``M^T y`` for blocks of row vectors, ``M`` a fixed dense matrix."""

    def __init__(self, m: Tensor):
        self.m = m
        self._mt: Tensor | None = None

    def mv(self, v: Tensor) -> Tensor:
        """``(B, n) -> (B, m)``: each row times ``M^T``."""
        if v.shape[0] <= SMALL_BATCH:
            return v @ self.m.T
        # a contiguous right operand: ~25 % faster than the transposed view
        return (self.m @ v.T.contiguous()).T.contiguous()

    def rmv(self, y: Tensor) -> Tensor:
        """``(B, m) -> (B, n)``: each row times ``M``."""
        if y.shape[0] <= SMALL_BATCH:
            return y @ self.m
        if self._mt is None:
            # an ordinary tensor even when made inside torch.inference_mode (the analyzer's
            # bounds run there): the cache outlives the bound and may serve autograd later
            with torch.inference_mode(False):
                self._mt = transposed_copy(self.m)  # (MKL's transposition where it exists)
        return (self._mt @ y.T.contiguous()).T.contiguous()

    def drop_transpose(self) -> None:
        """Free the transposed copy (it is rebuilt on the next block product)."""
        self._mt = None
