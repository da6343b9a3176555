"""Rules for pooling layers: max pooling (a nonlinearity with a known Lipschitz constant)
and average pooling (a linear map: a depthwise convolution with a constant kernel)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MixingOp, Op
from .conv import ConvOp, _pair


def _stride(stride, kernel) -> tuple[int, int]:
    """A pooling layer's stride: torch takes ``None`` and an empty list or tuple (the
    functional forms' ``stride=[]``) as the kernel size."""
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = kernel
    return _pair(stride)


class MaxPoolOp(Op):
    """2-D max pooling.

    Lipschitz constant (method.md rule 6): for any x, x0,
    ||P(x) - P(x0)||^2 = Σ_w (max_{i∈w} x_i - max_{i∈w} x0_i)^2 <= Σ_w max_{i∈w} δ_i^2
    <= Σ_w Σ_{i∈w} δ_i^2 = Σ_i c_i δ_i^2 <= (max_{i: δ_i≠0} c_i) ||δ||^2,
    where c_i is the number of windows containing input element i and δ = x - x0.
    Locally δ_i = 0 for inputs that cannot move (mask D), so the maximum runs over the
    movable inputs only (a sound refinement of the paper's rule). Padding elements belong to
    no input and are dropped; dilation and ceil_mode are handled by counting windows
    explicitly rather than by the closed form sqrt(ceil(k_h/s_h) ceil(k_w/s_w)).
    """

    kind = "maxpool"

    def __init__(self, name: str, in_shape, out_shape, kernel, stride, padding, dilation,
                 ceil_mode: bool):
        super().__init__(name, in_shape, out_shape)
        self.kernel = _pair(kernel)
        self.stride = _stride(stride, kernel)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.ceil_mode = bool(ceil_mode)
        self.counts = self._window_counts()

    def forward_error(self, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
        # a maximum is exact and 1-Lipschitz in the max norm
        return e.max()

    def _window_counts(self) -> Tensor:
        """Number of pooling windows that contain each input element, shape (H, W)."""
        h, w = self.in_shape[-2:]
        ho, wo = self.out_shape[-2:]
        counts = torch.zeros(h, w, dtype=torch.float64)
        self.empty_windows = 0  # windows entirely in the padding (torch outputs -inf there)
        for oi in range(ho):
            r0 = oi * self.stride[0] - self.padding[0]
            rows = [r0 + a * self.dilation[0] for a in range(self.kernel[0])]
            rows = [r for r in rows if 0 <= r < h]
            for oj in range(wo):
                c0 = oj * self.stride[1] - self.padding[1]
                cols = [c0 + b * self.dilation[1] for b in range(self.kernel[1])]
                cols = [c for c in cols if 0 <= c < w]
                if rows and cols:
                    counts[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] += 1
                else:
                    self.empty_windows += 1
        return counts

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def global_constant(self) -> float:
        # sqrt rounds to nearest: the margin keeps the constant >= the exact square root
        return math.sqrt(float(self.counts.max())) * (1 + 1e-12)

    def local_constant(self, mask: Tensor) -> float:
        """Constant over perturbations supported on ``mask`` (shape = in_shape, 0/1)."""
        m = mask.reshape(-1, *self.in_shape[-2:]).amax(dim=0) > 0
        # the largest count where m holds: counts are non-negative, so filling the rest with
        # 0 gives the same maximum as selecting (no boolean indexing: 16 -> 10 us at 24 x 24)
        top = float(torch.where(m, self.counts.to(mask.device), 0.0).amax())
        if top == 0.0 and not bool(m.any()):
            return 0.0
        return math.sqrt(top) * (1 + 1e-12)

    def propagate_mask(self, mask: Tensor) -> Tensor:
        """An output can move if any input in its window can move (a 0/1 mask, as
        :func:`lipbound.analyzer._masked_maps` needs)."""
        return (self.forward(mask.unsqueeze(0)).squeeze(0) > 0).to(mask.dtype)


def maxpool2d_rule(module: nn.Module, name: str, in_shape, out_shape) -> MaxPoolOp:
    if not isinstance(module, nn.MaxPool2d):
        raise TypeError(f"rule called with {type(module).__name__}")
    if module.return_indices:
        raise NotImplementedError("return_indices=True")
    op = MaxPoolOp(name, in_shape, out_shape, module.kernel_size, module.stride,
                   module.padding, module.dilation, module.ceil_mode)
    if op.empty_windows:
        # such an output is -inf whatever the input: the network's output is not finite
        raise NotImplementedError(
            f"{op.empty_windows} pooling window(s) lie entirely in the padding for input "
            f"size {tuple(in_shape[-2:])} (torch outputs -inf there); reduce padding or "
            "dilation, or use a larger input")
    return op


def adaptive_maxpool2d_rule(module: nn.Module, name: str, in_shape, out_shape) -> MaxPoolOp:
    """``nn.AdaptiveMaxPool2d`` / ``F.adaptive_max_pool2d`` where the input's height and width
    are multiples of the output's: its windows ``[floor(i H / h), ceil((i + 1) H / h))`` are
    then exactly those of ``MaxPool2d(kernel_size=H / h, stride=H / h)`` (and alike in width),
    analysed by that rule. Windows of varying size are refused."""
    if not isinstance(module, nn.AdaptiveMaxPool2d):
        raise TypeError(f"rule called with {type(module).__name__}")
    if module.return_indices:
        raise NotImplementedError("return_indices=True")
    if len(in_shape) != 3:
        raise NotImplementedError(_NO_CHANNELS.format(shape=tuple(in_shape)))
    h, w = in_shape[-2:]
    ho, wo = out_shape[-2:]
    if ho < 1 or wo < 1 or h % ho or w % wo:
        raise NotImplementedError(
            f"adaptive max pooling of {h}x{w} to {ho}x{wo}: windows of varying size; it is "
            "supported where the input's height and width are multiples of the output's "
            "(it is then MaxPool2d with kernel_size = stride = input size / output size)")
    k = (h // ho, w // wo)
    return MaxPoolOp(name, in_shape, out_shape, k, k, 0, 1, False)


_NO_CHANNELS = ("average pooling of a per-sample tensor of shape {shape} without a channel "
                "dimension; give the input a channel dimension: input_shape (1, H, W), or "
                "x.view(x.size(0), 1, H, W) in forward (x.unsqueeze has no rule)")


def _avgpool_op(name: str, in_shape, out_shape, kernel, stride, padding, ceil_mode: bool,
                count_include_pad: bool, divisor_override) -> ConvOp:
    if len(in_shape) != 3:
        raise NotImplementedError(_NO_CHANNELS.format(shape=tuple(in_shape)))
    c, h, w = in_shape
    kh, kw = _pair(kernel)
    ph, pw = _pair(padding)
    ones = torch.ones(c, 1, kh, kw, dtype=torch.float64)
    ho, wo = out_shape[-2:]
    # divisor of every output: the window size, or the number of non-padding elements
    if divisor_override:
        scale = torch.full((ho, wo), 1.0 / divisor_override, dtype=torch.float64)
    elif count_include_pad and not ceil_mode:
        scale = torch.full((ho, wo), 1.0 / (kh * kw), dtype=torch.float64)
    else:
        # count elements of each window inside the (padded, if count_include_pad) input
        sh, sw = _stride(stride, kernel)
        lo_h, hi_h = (-ph, h + ph) if count_include_pad else (0, h)
        lo_w, hi_w = (-pw, w + pw) if count_include_pad else (0, w)
        scale = torch.empty(ho, wo, dtype=torch.float64)
        for i in range(ho):
            r0 = i * sh - ph
            nr = max(0, min(r0 + kh, hi_h) - max(r0, lo_h))
            for j in range(wo):
                c0 = j * sw - pw
                nc = max(0, min(c0 + kw, hi_w) - max(c0, lo_w))
                scale[i, j] = 1.0 / max(nr * nc, 1)
    stride = _stride(stride, kernel)
    if ceil_mode:
        # ceil_mode may add a last window hanging over the border: emulate by extra padding
        # on the right/bottom is not expressible with a symmetric conv padding; refuse unless
        # it changes nothing.
        plain = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip((h, w), (ph, pw), (kh, kw),
                                                                stride, strict=True)]
        if tuple(plain) != (ho, wo):
            raise NotImplementedError("ceil_mode=True adding partial windows")
    return ConvOp(name, (c, h, w), (c, ho, wo), ones, None, stride, (ph, pw), 1, c,
                  out_scale=scale)


def avgpool2d_rule(module: nn.Module, name: str, in_shape, out_shape) -> ConvOp:
    if not isinstance(module, nn.AvgPool2d):
        raise TypeError(f"rule called with {type(module).__name__}")
    return _avgpool_op(name, in_shape, out_shape, module.kernel_size, module.stride,
                       module.padding, module.ceil_mode, module.count_include_pad,
                       module.divisor_override)


class SpatialMatrixOp(MixingOp):
    """Per-channel linear map on the spatial grid: y[c] = P x[c] with P (HoWo, HW).

    Used for adaptive average pooling with windows of varying size."""

    def __init__(self, name: str, in_shape, out_shape, pmat: Tensor):
        super().__init__(name, in_shape, out_shape)
        self.pmat = pmat.to(torch.float64)
        self.pmat_sq = self.pmat ** 2

    def _apply(self, x: Tensor, m: Tensor, shape) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        return (x.reshape(n, c, -1) @ m.T).reshape(n, c, *shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)

    def lin(self, x: Tensor) -> Tensor:
        return self._apply(x, self.pmat, self.out_shape[-2:])

    def lin_t(self, y: Tensor) -> Tensor:
        return self._apply(y, self.pmat.T, self.in_shape[-2:])

    def sq_rows(self, w: Tensor) -> Tensor:
        return self._apply(w, self.pmat_sq, self.out_shape[-2:])

    def abs_lin(self, x: Tensor) -> Tensor:
        return self._apply(x, self.pmat.abs(), self.out_shape[-2:])

    def abs_lin_t(self, y: Tensor) -> Tensor:
        return self._apply(y, self.pmat.abs().T, self.in_shape[-2:])

    def inner_length(self) -> int:
        return int(self.pmat.shape[1])

    def inner_length_t(self) -> int:
        return int(self.pmat.shape[0])

    def flops(self) -> float:
        return float(self.in_shape[0] * self.pmat.numel())


def adaptive_avgpool2d_rule(module: nn.Module, name: str, in_shape, out_shape):
    if not isinstance(module, nn.AdaptiveAvgPool2d):
        raise TypeError(f"rule called with {type(module).__name__}")
    from .base import DiagOp

    if len(in_shape) != 3:
        raise NotImplementedError(_NO_CHANNELS.format(shape=tuple(in_shape)))
    c, h, w = in_shape
    ho, wo = out_shape[-2:]
    if (ho, wo) == (h, w):
        one = torch.ones((), dtype=torch.float64)
        return DiagOp(name, tuple(in_shape), one, torch.zeros((), dtype=torch.float64))
    if h % ho == 0 and w % wo == 0:
        k = (h // ho, w // wo)
        return _avgpool_op(name, in_shape, out_shape, k, k, 0, False, True, None)
    pmat = torch.zeros(ho * wo, h * w, dtype=torch.float64)
    for i in range(ho):
        r0, r1 = (i * h) // ho, -((-(i + 1) * h) // ho)
        for j in range(wo):
            c0, c1 = (j * w) // wo, -((-(j + 1) * w) // wo)
            cnt = (r1 - r0) * (c1 - c0)
            for r in range(r0, r1):
                pmat[i * wo + j, r * w + c0:r * w + c1] = 1.0 / cnt
    return SpatialMatrixOp(name, in_shape, out_shape, pmat)


class SpatialMean(nn.Module):
    """The settings of a call ``x.mean(dim, keepdim)`` / ``torch.mean(x, dim, keepdim)`` (for
    :func:`spatial_mean_rule`; never run)."""

    def __init__(self, dim=None, keepdim: bool = False, dtype=None):
        super().__init__()
        self.dim = dim
        self.keepdim = keepdim
        self.dtype = dtype

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict) -> SpatialMean | None:
        """The settings of ``x.mean(*args, **kwargs)`` / ``torch.mean(x, *args,
        **kwargs)``, or None for arguments a mean does not take (the rule refuses it)."""
        try:
            return cls(*args, **kwargs)
        except TypeError:
            return None


def spatial_mean_rule(module: nn.Module | None, name: str, in_shape, out_shape):
    """``x.mean(dim=(2, 3))`` (or ``(-2, -1)``, with or without ``keepdim``) of a per-sample
    ``(C, H, W)`` tensor: a global average pooling, ``AdaptiveAvgPool2d(1)`` (followed by the
    reshape to ``(C,)`` without ``keepdim``), analysed by that rule. A mean over other
    dimensions is refused."""
    from .base import ReshapeOp

    dims = None if module is None else module.dim
    if isinstance(dims, int):
        dims = (dims,)
    ok = (isinstance(module, SpatialMean) and len(in_shape) == 3 and module.dtype is None
          and isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims)
          and sorted(d % 4 for d in dims) == [2, 3] and isinstance(module.keepdim, bool))
    if not ok:
        raise NotImplementedError(
            "a mean is supported over the two spatial dimensions of a (N, C, H, W) tensor "
            "only (x.mean(dim=(2, 3)), global average pooling); for other means write the "
            "layer with supported ones (F.adaptive_avg_pool2d(x, 1).flatten(1) is the global "
            "average pooling)")
    c = in_shape[0]
    pool = adaptive_avgpool2d_rule(nn.AdaptiveAvgPool2d(1), name, in_shape, (c, 1, 1))
    if module.keepdim:
        return pool
    return [pool, ReshapeOp(name, (c, 1, 1), (c,))]
