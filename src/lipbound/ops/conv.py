"""Rule for 2-D convolutions (``nn.Conv2d``), any stride, zero padding, dilation, groups.

A x is the convolution without bias and A^T y the transposed convolution with the same
stride, padding, dilation and groups; the matrix is never formed. Squared row norms of
A D for all rows at once are the convolution of the mask with the element-wise squared
kernel (method.md, "Computation at scale").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MixingOp


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvOp(MixingOp):
    """y = conv2d(x, W) + b, optionally followed by a fixed per-output scale
    (``out_scale``, used by average pooling with ``count_include_pad=False``)."""

    def __init__(self, name: str, in_shape, out_shape, weight: Tensor, bias: Tensor | None,
                 stride, padding, dilation, groups: int, out_scale: Tensor | None = None):
        super().__init__(name, in_shape, out_shape)
        self.weight = weight.detach().to(torch.float64).clone()
        self.weight_sq = self.weight * self.weight
        self.bias = None if bias is None else bias.detach().to(torch.float64).clone()
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        self.out_scale = None if out_scale is None else out_scale.to(torch.float64)
        kh, kw = self.weight.shape[-2:]
        h, w = in_shape[-2:]
        ho, wo = out_shape[-2:]
        self.output_padding = tuple(
            int(n - ((o - 1) * s - 2 * p + d * (k - 1) + 1))
            for n, o, s, p, d, k in zip((h, w), (ho, wo), self.stride, self.padding,
                                         self.dilation, (kh, kw), strict=True))

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv(x, self.weight)
        if self.out_scale is not None:
            y = y * self.out_scale
        if self.bias is not None:
            y = y + self.bias.view(-1, 1, 1)
        return y

    def lin(self, x: Tensor) -> Tensor:
        y = self._conv(x, self.weight)
        return y if self.out_scale is None else y * self.out_scale

    def lin_t(self, y: Tensor) -> Tensor:
        if self.out_scale is not None:
            y = y * self.out_scale
        return F.conv_transpose2d(y, self.weight, None, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)

    def sq_rows(self, w: Tensor) -> Tensor:
        y = self._conv(w, self.weight_sq)
        return y if self.out_scale is None else y * self.out_scale ** 2

    def flops(self) -> float:
        return float(self.out_dim * self.weight[0].numel())


def conv2d_rule(module: nn.Module, name: str, in_shape, out_shape) -> ConvOp:
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"rule called with {type(module).__name__}")
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={module.padding_mode!r} (only 'zeros')")
    if isinstance(module.padding, str):
        # 'same'/'valid': torch resolves it to explicit numbers only for odd kernels; use
        # the private helper's result through the recorded output shape.
        if module.padding == "valid":
            pad = (0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size,
                                                  strict=True)]
            if any(t % 2 for t in total):
                raise NotImplementedError("padding='same' with an even effective kernel")
            pad = tuple(t // 2 for t in total)
    else:
        pad = module.padding
    return ConvOp(name, in_shape, out_shape, module.weight, module.bias, module.stride, pad,
                  module.dilation, module.groups)


def circulant_norm_bound(op: ConvOp, budget_flops: float = 2e9) -> float | None:
    """Certified upper bound on ||A||_2 of a zero-padded 2-D convolution via its circulant
    embedding (Sedghi, Gupta & Long, *The Singular Values of Convolutional Layers*, ICLR 2019).

    Zero padding the input into an N1 x N2 grid (N = input size + 2 * padding) is an
    isometry; on that grid the stride-1 convolution without wrap-around is a set of rows of
    the circular convolution, and striding keeps a subset of those rows. Removing rows and
    composing with an isometry cannot increase the spectral norm, so
    ||A|| <= ||circular conv|| = max over frequencies ω of ||K̂(ω)||_2, where K̂(ω) is the
    (c_out x c_in) matrix of 2-D DFTs of the kernel taps (placed at their dilated offsets).
    Grouped convolutions are block diagonal: the maximum runs over the groups too.
    Returns ``None`` when the per-frequency computation would exceed ``budget_flops``.
    """
    c_out, c_in_g, kh, kw = op.weight.shape
    h, w = op.in_shape[-2:]
    n1 = h + 2 * op.padding[0]
    n2 = w + 2 * op.padding[1]
    n1 = max(n1, op.dilation[0] * (kh - 1) + 1)
    n2 = max(n2, op.dilation[1] * (kw - 1) + 1)
    g = op.groups
    c_out_g = c_out // g
    small, big = sorted((c_out_g, c_in_g))
    nfreq = n1 * (n2 // 2 + 1)
    if nfreq * g * (small * small * big + small ** 3) > budget_flops:
        return None
    grid = torch.zeros(c_out, c_in_g, n1, n2, dtype=torch.float64, device=op.weight.device)
    for a in range(kh):
        for b in range(kw):
            grid[:, :, a * op.dilation[0], b * op.dilation[1]] += op.weight[:, :, a, b]
    spec = torch.fft.rfft2(grid)  # (c_out, c_in_g, n1, n2//2+1), real kernel: half suffices
    spec = spec.reshape(g, c_out_g, c_in_g, -1).permute(0, 3, 1, 2)  # (g, F, o, i)
    best = 0.0
    for gi in range(g):
        m = spec[gi]
        gram = m.mH @ m if c_in_g <= c_out_g else m @ m.mH
        best = max(best, float(torch.linalg.eigvalsh(gram)[..., -1].max()))
    val = best ** 0.5
    if op.out_scale is not None:
        val *= float(op.out_scale.abs().max())
    return val
