"""Winograd F(4x4, 3x3) products for 3x3, stride-1 convolutions in float64.

Lanczos applies each convolution and its transpose ~2 x 64 times per bound, in float64,
where PyTorch's CPU convolution is an im2col + GEMM at 9 multiply-adds per tap and output.
Winograd's minimal filtering (S. Winograd 1980; A. Lavin & S. Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016) computes a 4x4 output tile from a 6x6 input tile
with 36 products per channel pair instead of 144: the channel mixing becomes 36 independent
``(c_out x c_in) @ (c_in x tiles)`` matrix products, 4x fewer multiply-adds, and the tile
transforms are small dense products, done in bands of tile rows on big images so that they
stay in cache. Measured on this CPU (float64, one thread, one image): 1.7-3.1x faster than
``conv2d`` (and its transpose) on VGG-16's 3x3 layers from 224x224 to 28x28, 2.5x over
all of them; not faster at 14x14 (see :func:`eligible`).

Accuracy: observed relative errors are ~3e-15 (checked against ``conv2d`` in the tests), but
the error is not confined to the active entries of a masked operator: the tile transforms
mix all taps, so a tiny masked operator next to large taps can be computed with a large
relative error. :meth:`Winograd3x3.error_bound` gives a rigorous worst-case bound ``Δ``
(``||ŷ - y|| <= Δ ||x||``); the products are used only inside :func:`enabled` blocks, which
:func:`lipbound.spectral.spectral_upper` opens around a Lanczos run and keeps only when
``Δ`` is negligible against the operator's norm estimate (else it repeats the run with
``conv2d``). Dense matrices, the exact route, row norms and forward passes never use them.

The transposed convolution (stride 1) is the correlation of the output with the spatially
flipped, channel-swapped kernel and padding ``2 - p``, so it uses the same machinery.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))

_STATE = threading.local()


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Within this block (and this thread), eligible convolutions compute their products
    with Winograd's algorithm. :func:`lipbound.spectral.spectral_upper` enables it around the
    Lanczos run only; everything else (dense matrices, row norms, forward passes, the exact
    route) always uses ``conv2d``."""
    old = getattr(_STATE, "on", False)
    _STATE.on = True
    try:
        yield
    finally:
        _STATE.on = old


def is_enabled() -> bool:
    return getattr(_STATE, "on", False)


MIN_OUTPUT_PIXELS = 24 * 24
"""Winograd is used for outputs of at least this many pixels ..."""

MIN_CHANNELS = 16
"""... and at least this many input and output channels (the tile transforms cost per
channel; with 3 input channels the direct product is 7x faster) ..."""

MIN_MIXING = 24.0
"""... and ``c_in c_out / (c_in + c_out)`` at least this (the channel mixing, 4x cheaper,
grows with ``c_in c_out``, the memory-bound tile transforms with ``c_in + c_out``): 32 -> 32
channels (16) run no faster than conv2d."""

SMALL_OUTPUT_PIXELS = 13 * 13
"""Smaller outputs (down to this many pixels) use Winograd only with many channels
(``SMALL_MIXING``): measured (float64, one thread, product and transpose together) 1.3-1.4x
faster than conv2d on AlexNet's 13x13 layers (192-384 channels) and 1.55x on VGG-16's 14x14
ones (512), but 0.6-0.8x on 32-64 channels at 12x12-14x14."""

SMALL_MIXING = 96.0
"""``c_in c_out / (c_in + c_out)`` needed below ``MIN_OUTPUT_PIXELS``."""

MAX_TILES = 128
"""Tiles (per image) transformed at once; bigger images go in bands of tile rows, which keeps
the transforms in cache (VGG-16's 64-channel 224x224 layer: 2.6x faster than in one piece
with 336 tiles a band, 14 % faster again with 128)."""


def eligible(weight: Tensor, stride, padding, dilation, groups: int, out_hw,
             device: torch.device | str) -> bool:
    """Whether the Winograd products are used for a convolution: 3x3 kernel, stride 1,
    dilation 1, one group, padding <= 2 (the transpose needs ``2 - p >= 0``), on the CPU
    (cuDNN's own algorithms are used on CUDA), and large enough to be faster."""
    k_out, k_in, kh, kw = weight.shape
    return ((kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and max(padding) <= 2 and min(padding) >= 0
            and torch.device(device).type == "cpu"
            and min(k_in, k_out) >= MIN_CHANNELS
            and _large_enough(out_hw[0] * out_hw[1], k_in * k_out / (k_in + k_out)))


def _large_enough(pixels: int, mixing: float) -> bool:
    if pixels >= MIN_OUTPUT_PIXELS:
        return mixing >= MIN_MIXING
    return pixels >= SMALL_OUTPUT_PIXELS and mixing >= max(MIN_MIXING, SMALL_MIXING)


class Winograd3x3:
    """``conv2d(x, W, padding=p)`` and ``conv_transpose2d(y, W, padding=p)`` (stride 1) for a
    fixed float64 3x3 kernel ``W`` of shape ``(c_out, c_in, 3, 3)``."""

    def __init__(self, weight: Tensor, padding: tuple[int, int]):
        dt, dev = torch.float64, weight.device
        bt = torch.tensor(_BT, dtype=dt, device=dev)
        at = torch.tensor(_AT, dtype=dt, device=dev)
        # vec(B^T d B) = (B^T kron B^T) vec(d) for row-major 6x6 tiles; likewise A^T m A
        self._kb = torch.kron(bt, bt)  # (36, 36)
        self._ka = torch.kron(at, at)  # (16, 36)
        g = torch.tensor(_G, dtype=dt, device=dev)
        w = weight.to(dt)
        self._w_abs = w.abs().cpu()
        self._delta: float | None = None
        self.padding = (int(padding[0]), int(padding[1]))
        self._u = self._transform(g, w)  # (36, c_out, c_in)
        self._pad_buffers: dict[tuple, Tensor] = {}
        flipped = torch.flip(w, dims=(2, 3)).transpose(0, 1)  # (c_in, c_out, 3, 3)
        self._ut = self._transform(g, flipped)  # (36, c_in, c_out)

    @staticmethod
    def _transform(g: Tensor, w: Tensor) -> Tensor:
        u = g @ w @ g.T  # (K, C, 6, 6)
        k, c = w.shape[:2]
        return u.permute(2, 3, 0, 1).reshape(36, k, c).contiguous()

    def _correlate(self, x: Tensor, u: Tensor, pad: tuple[int, int]) -> Tensor:
        """Correlation of ``x`` (B, C, H, W) with the transformed kernel ``u`` (36, K, C)
        after zero padding ``pad``: (B, K, H + 2 ph - 2, W + 2 pw - 2).

        The zero-padded input is written into a buffer kept per input shape (its zero border
        is written once), and each band of tile rows writes its rows of the output directly:
        no padded copy, no concatenation, no fresh pages per product."""
        b, c, h, w = x.shape
        ph, pw = pad
        ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
        th, tw = -(-ho // 4), -(-wo // 4)
        # rows needed: 4 th + 2 (the last tile reads up to 5 rows past its start)
        hp, wp = 4 * th + 2, 4 * tw + 2
        key = (b, c, hp, wp, ph, pw, x.device)
        buf = self._pad_buffers.get(key)
        if buf is None:
            buf = self._pad_buffers[key] = x.new_zeros(b, c, hp, wp)
        buf[:, :, ph:ph + h, pw:pw + w] = x
        k = u.shape[1]
        out = x.new_empty(b, k, ho, wo)
        # bands of tile rows keep the (memory-bound) transforms in cache on big images
        rows = max(1, MAX_TILES // max(1, b * tw))
        for r in range(0, th, rows):
            r2 = min(th, r + rows)
            y = self._tiles(buf[:, :, 4 * r:4 * r2 + 2], u, r2 - r, tw)
            hh = min(ho, 4 * r2) - 4 * r
            out[:, :, 4 * r:4 * r + hh] = y[:, :, :hh, :wo]
        return out

    def _tiles(self, xp: Tensor, u: Tensor, th: int, tw: int) -> Tensor:
        """All 4x4 output tiles of the padded input ``xp`` (B, C, 4 th + 2, 4 tw + 2):
        (B, K, 4 th, 4 tw)."""
        b, c = xp.shape[:2]
        t = th * tw
        d = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # (B, C, th, tw, 6, 6), a view
        d = d.permute(4, 5, 1, 0, 2, 3).reshape(36, c * b * t)
        # input transform B^T d B as one (36 x 36) product (faster than two 6x6 passes)
        v = (self._kb @ d).reshape(36, c, b * t)
        k = u.shape[1]
        m = torch.bmm(u, v)  # (36, K, B*T): the channel mixing
        y = self._ka @ m.reshape(36, k * b * t)  # output transform A^T m A: (16, K*B*T)
        y = y.reshape(4, 4, k, b, th, tw).permute(3, 2, 4, 0, 5, 1)
        return y.reshape(b, k, 4 * th, 4 * tw)

    def error_bound(self) -> float:
        """``Δ`` with ``||ŷ - y|| <= Δ ||x||`` for the computed :meth:`conv` and
        :meth:`conv_t` (the larger of the two), any input ``x``.

        Componentwise, a chain of float64 products is within ``γ_L`` times the same chain in
        absolute values (Higham, *Accuracy and Stability*, §3.5): the computed output is
        within ``γ_L N |x|`` of the exact one, where ``N`` is the non-negative linear map
        ``|x| -> Σ_c |A^T| ((|G| |g_kc| |G|^T) ⊙ (|B^T| |d_c| |B|)) |A|`` per tile, and ``L``
        the total length of the chain (kernel transform 6, input transform 36, channel sum
        ``c``, output transform 36; we take ``2 c + 200``). ``||N||_2 <= sqrt(||N||_1
        ||N||_inf)``: a row of ``N`` (one output) sums to
        ``Σ_c [|A^T| (Ũ_kc ⊙ β β^T) |A|]`` with ``β = |B^T| 1``; a column (one input element)
        is read by at most 4 tiles, each contributing ``[|B|^T (Σ_k Ũ_kc ⊙ α α^T) |B|]`` with
        ``α = |A| 1``. Both are small tensors of the kernel, so ``Δ`` costs nothing per
        product. It bounds the error independently of any mask: masked operators whose norm
        is far below ``Δ`` must not use these products (see ``spectral_upper``).
        """
        if self._delta is not None:
            return self._delta
        dt = torch.float64
        g = torch.tensor(_G, dtype=dt).abs()
        bt = torch.tensor(_BT, dtype=dt).abs()
        at = torch.tensor(_AT, dtype=dt).abs()
        beta = bt.sum(1)  # |B^T| 1
        alpha = at.sum(0)  # |A| 1 (column sums of |A^T|)
        out = 0.0
        for w in (self._w_abs, self._w_abs.flip(2, 3).transpose(0, 1)):
            ut = g @ w @ g.T  # (K, C, 6, 6), non-negative
            c = w.shape[1]
            rows = (at @ (ut.sum(1) * torch.outer(beta, beta)) @ at.T).amax()
            cols = 4.0 * (bt.T @ (ut.sum(0) * torch.outer(alpha, alpha)) @ bt).amax()
            nu = (2 * c + 200) * 2.0 ** -53
            gam = nu / (1.0 - nu)
            out = max(out, gam * math.sqrt(float(rows) * float(cols)) * (1 + 1e-12))
        self._delta = out
        return out

    def conv(self, x: Tensor) -> Tensor:
        """``conv2d(x, W, padding=p)`` for x of shape (B, c_in, H, W)."""
        return self._correlate(x, self._u, self.padding)

    def conv_t(self, y: Tensor) -> Tensor:
        """``conv_transpose2d(y, W, padding=p)`` (stride 1) for y of shape (B, c_out, H', W')."""
        return self._correlate(y, self._ut, (2 - self.padding[0], 2 - self.padding[1]))
