"""The small contract every layer rule implements.

An analysed network is a chain of :class:`Op` objects, each holding float64 copies of
its parameters. Shapes are per sample (no batch dimension); every method takes and
returns batched tensors of shape ``(N, *shape)``.

Op kinds:

* ``"mixing"`` -- a linear map that mixes coordinates (Linear, Conv2d, pooling by
  averaging). Provides the linear part ``lin``, its transpose ``lin_t``, the one-pass
  squared row norms ``sq_rows`` ((A ⊙ A) w) and optionally a dense matrix.
* ``"diag"`` -- an affine map with a diagonal linear part (BatchNorm in eval mode,
  input normalisation, Dropout in eval mode, Identity): ``scale`` holds the diagonal.
* ``"reshape"`` -- a change of shape that keeps the row-major order of the elements.
* ``"relu"`` and ``"maxpool"`` -- the nonlinearities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Op:
    """Base class of an analysed layer."""

    kind: str = "op"

    def __init__(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.name = name
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, device: torch.device) -> Op:
        for k, v in list(vars(self).items()):
            if isinstance(v, Tensor):
                setattr(self, k, v.to(device))
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.in_shape} -> {self.out_shape})"


class MixingOp(Op):
    """A linear(-plus-bias) layer: y = A x + b."""

    kind = "mixing"

    def lin(self, x: Tensor) -> Tensor:
        """A x (no bias)."""
        raise NotImplementedError

    def lin_t(self, y: Tensor) -> Tensor:
        """A^T y."""
        raise NotImplementedError

    def sq_rows(self, w: Tensor) -> Tensor:
        """(A ⊙ A) w for a non-negative w shaped like the input: all squared row norms of
        A diag(sqrt(w)) in one pass."""
        raise NotImplementedError

    def abs_lin(self, x: Tensor) -> Tensor:
        """|A| x, the entrywise absolute matrix applied to x (no bias): with
        :meth:`inner_length`, the rounding bound of products through this op."""
        raise NotImplementedError

    def inner_length(self) -> int:
        """Most products summed into one output entry of ``A x`` (a row's nonzeros at most)."""
        return self.in_dim

    def dense(self) -> Tensor | None:
        """The matrix A (out_dim, in_dim) when it is cheap to form, else None."""
        return None

    def flops(self) -> float:
        """Approximate multiply-adds of one application of A to one vector."""
        return float(self.in_dim * self.out_dim)


class DiagOp(Op):
    """y = scale * x + shift with ``scale`` broadcastable to the input shape."""

    kind = "diag"

    def __init__(self, name: str, in_shape: tuple[int, ...], scale: Tensor, shift: Tensor):
        super().__init__(name, in_shape, in_shape)
        self.scale = torch.broadcast_to(scale, in_shape).contiguous()
        self.shift = torch.broadcast_to(shift, in_shape).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class ReshapeOp(Op):
    """Reshape keeping the row-major order (flatten, view, reshape)."""

    kind = "reshape"

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)


class ReLUOp(Op):
    kind = "relu"

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)
