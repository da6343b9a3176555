"""Rule for fully connected layers (``nn.Linear``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import UNDERFLOW, MixingOp, gamma
from .dense import DenseProducts


class LinearOp(MixingOp):
    """y = W x + b on a vector input of shape ``(n_in,)``.

    ``err`` (optional, non-negative, shaped like ``W``): an entrywise bound on how far the
    stored ``W`` may be from the exact matrix, for a matrix computed as a product of layers
    (:mod:`lipbound.blocks`). The row norms (:meth:`sq_rows`) are then those of ``|W| + err``
    (upper bounds of the exact ones), and every norm computed from ``W`` is completed by
    :meth:`err_sq_rows` (a Frobenius bound of the masked error, see
    :meth:`lipbound.blocks.AffineBlock.err_norm`)."""

    def __init__(self, name: str, weight: Tensor, bias: Tensor | None,
                 err: Tensor | None = None, bias_err: Tensor | None = None):
        out_dim, in_dim = weight.shape
        super().__init__(name, (in_dim,), (out_dim,))
        self.weight = weight.detach().to(torch.float64, copy=True)
        self.bias = (torch.zeros(out_dim, dtype=torch.float64, device=weight.device)
                     if bias is None else bias.detach().to(torch.float64, copy=True))
        if err is not None and tuple(err.shape) != tuple(weight.shape):
            raise ValueError(f"err must have the weight's shape {tuple(weight.shape)}, "
                             f"got {tuple(err.shape)}")
        self.err = None if err is None else err.detach().to(torch.float64, copy=True)
        self.bias_err = None if bias_err is None else \
            bias_err.detach().to(torch.float64, copy=True).reshape(out_dim)
        self._weight_sq: Tensor | None = None
        self._products = DenseProducts(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias

    def lin(self, x: Tensor) -> Tensor:
        return self._products.mv(x)

    def abs_lin(self, x: Tensor) -> Tensor:
        if self.weight.numel() <= 4_000_000:
            return x @ self.weight.abs().T
        return torch.cat([x @ self.weight[s:s + 512].abs().T  # no full-size |W| (VGG fc1)
                          for s in range(0, self.weight.shape[0], 512)], dim=-1)

    def lin_t(self, y: Tensor) -> Tensor:
        return self._products.rmv(y)

    def abs_lin_t(self, y: Tensor) -> Tensor:
        if self.weight.numel() <= 4_000_000:
            return y @ self.weight.abs()
        out = y[:, :512] @ self.weight[:512].abs()  # no full-size |W| (VGG fc1)
        for s in range(512, self.weight.shape[0], 512):
            out = out + y[:, s:s + 512] @ self.weight[s:s + 512].abs()
        return out

    def _rows_sq(self, s: int, e: int, buf: Tensor | None = None) -> Tensor:
        """Rows s:e of (|W| + err) ⊙ (|W| + err) (W ⊙ W without err); with ``buf`` (at least
        that many rows, the weight's columns) written into its leading rows (the same
        values)."""
        if buf is None:
            a = self.weight[s:e] if self.err is None else \
                self.weight[s:e].abs() + self.err[s:e]
            return a * a
        rows = self.weight[s:e]
        out = buf[:rows.shape[0]]
        if self.err is None:
            return torch.mul(rows, rows, out=out)
        torch.abs(rows, out=out).add_(self.err[s:e])
        return out.mul_(out)

    def sq_rows(self, w: Tensor) -> Tensor:
        if self.weight.numel() <= 4_000_000:
            if self._weight_sq is None:
                self._weight_sq = self._rows_sq(0, self.weight.shape[0])
            return w @ self._weight_sq.T
        # big layers (VGG fc1: 100M weights): square in row chunks instead of keeping W ⊙ W,
        # each chunk written into one buffer (a fresh 512-row product per chunk cost 30 %
        # more: AlexNet's 4096 x 9216 layer 67 -> 52 ms on one thread)
        buf = self.weight.new_empty(min(512, self.weight.shape[0]), self.weight.shape[1])
        out = []
        for s in range(0, self.weight.shape[0], 512):
            out.append(w @ self._rows_sq(s, s + 512, buf).T)
        return torch.cat(out, dim=-1)

    def err_sq_rows(self, w: Tensor) -> Tensor | None:
        """``(err ⊙ err) w`` for non-negative ``w``, or None without ``err``."""
        if self.err is None:
            return None
        return w @ (self.err * self.err).T

    def dense(self) -> Tensor:
        return self.weight

    def row_abs(self) -> Tensor:
        """``Σ_j (|W_ij| + err_ij)`` (computed once, in row chunks)."""
        if self._row_abs is None:
            rows = []
            for s in range(0, self.weight.shape[0], 512):
                a = self.weight[s:s + 512].abs()
                if self.err is not None:
                    a = a + self.err[s:s + 512]
                rows.append(a.sum(dim=1))
            self._row_abs = torch.cat(rows) * (1.0 + 2.0 * gamma(self.in_dim + 1))
        return self._row_abs

    def forward_error(self, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
        """As :meth:`MixingOp.forward_error`, plus, for a product of layers, the stored
        matrix's and bias's distance from the exact ones (``err |x| + bias_err``)."""
        out = super().forward_error(x, y, e)
        if self.err is not None:
            out = out + ((e + x[0].abs()) @ self.err.T) * (1.0 + 2.0 * gamma(self.in_dim)) \
                + (self.in_dim + 2) * UNDERFLOW  # (its products' rounding below the normal range)
        if self.bias_err is not None:
            out = out + self.bias_err
        return out

    def to(self, device: torch.device) -> LinearOp:
        super().to(device)
        self._weight_sq = None
        self._products = DenseProducts(self.weight)
        return self


def linear_rule(module: nn.Module, name: str, in_shape, out_shape) -> LinearOp:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"rule called with {type(module).__name__}")
    return linear_op(name, in_shape, module.weight, module.bias)


def linear_op(name: str, in_shape, weight: Tensor, bias: Tensor | None) -> LinearOp:
    """The op of ``y = W x + b`` with these tensors (those of ``nn.Linear`` or of a call
    ``F.linear(x, weight, bias)``) on a per-sample input of shape ``in_shape``."""
    if len(in_shape) != 1:
        # nn.Linear applied to a multi-dimensional tensor acts on the last axis; not a chain
        # element we model.
        raise NotImplementedError(
            f"Linear applied to a {len(in_shape)}-d per-sample tensor {tuple(in_shape)}; "
            "flatten first")
    if weight.dim() != 2 or weight.shape[1] != in_shape[0]:
        raise NotImplementedError(f"weight of shape {tuple(weight.shape)} for an input of "
                                  f"{in_shape[0]} features (expected (out, {in_shape[0]}))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise NotImplementedError(f"bias of shape {tuple(bias.shape)} for {weight.shape[0]} "
                                  "outputs")
    return LinearOp(name, weight, bias)
