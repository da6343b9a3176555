"""Winograd products for 3x3 and 5x5, stride-1 convolutions in float64: F(4x4, 3x3) and
F(2x2, 5x5).

Lanczos applies each convolution and its transpose ~2 x 64 times per bound, in float64,
where PyTorch's CPU convolution is an im2col + GEMM at ``r^2`` multiply-adds per tap and
output. Winograd's minimal filtering (S. Winograd 1980; A. Lavin & S. Gray, "Fast
Algorithms for Convolutional Neural Networks", CVPR 2016) computes an ``m x m`` output tile
from a 6x6 input tile with 36 products per channel pair instead of ``m^2 r^2`` (144 for
F(4x4, 3x3), 100 for F(2x2, 5x5)): the channel mixing becomes 36 independent
``(c_out x c_in) @ (c_in x tiles)`` matrix products, and the tile transforms are small dense
products, done in bands of tile rows on big images so that they stay in cache. Both
algorithms use the interpolation points 0, ±1, ±2 and ∞ (the same input transform); the
matrices come from the Toom-Cook construction (:func:`toom_cook`). Measured on this CPU
(float64, one thread, one image, product and transpose together): 1.9-4.2x faster than
``conv2d`` on VGG-16's 3x3 layers from 224x224 to 28x28, 3.6x on a 64-channel 5x5 layer at
56x56; inside whole local bounds AlexNet's 27x27 5x5 layer and its 13x13 3x3 layers gain
5 % and 3.5 % of the bound's time, VGG-16's 14x14 layers nothing (see :func:`eligible`).

Accuracy: observed relative errors are ~3e-15 (checked against ``conv2d`` in the tests), but
the error is not confined to the active entries of a masked operator: the tile transforms
mix all taps, so a tiny masked operator next to large taps can be computed with a large
relative error. :meth:`WinogradConv.error_bound` gives a rigorous worst-case bound ``Δ``
(``||ŷ - y|| <= Δ ||x||``); the products are used only inside :func:`enabled` blocks, which
:func:`lipbound.spectral.spectral_upper` opens around a Lanczos run only when
``lipbound.spectral.FAST_REL_ERROR`` is positive (the default, 1e-8; products that err by
``Δ`` in a direction chosen against the run could hide the top singular value from it with a
probability ``~ Δ / ||M|| sqrt(2n/π)`` that no inflation repairs, so a kept run's guarantee
assumes rounding not aligned with the top singular vector, as every float64 run does; see
``docs/guarantees.md``) and keeps only when ``Δ`` is
below that fraction of the operator's norm estimate (else it repeats the run with
``conv2d``). Dense matrices, the exact route, row norms and forward passes never use them.

The transposed convolution (stride 1) is the correlation of the output with the spatially
flipped, channel-swapped kernel and padding ``r - 1 - p``, so it uses the same machinery.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0)
"""Finite interpolation points of both algorithms (with ∞): tile size 6 = m + r - 1."""

TILE = 6

OUTPUT_TILE = {3: 4, 5: 2}
"""Output tile size m for each kernel size r: F(4x4, 3x3) and F(2x2, 5x5)."""


def toom_cook(m: int, r: int, points=_POINTS) -> tuple[Tensor, Tensor, Tensor]:
    """``(B^T, G, A^T)`` of the 1-D minimal filtering algorithm F(m, r) on the finite
    ``points`` (``m + r - 2`` of them) and ∞, with ``y = A^T [(G g) ⊙ (B^T d)]`` the
    correlation ``y_i = Σ_k g_k d_(i+k)`` of a tile ``d`` of length ``m + r - 1``.

    Toom-Cook: ``A^T[i, j] = p_j^i`` (evaluation), ``G[j, k] = p_j^k / f_j`` with
    ``f_j = Π_(l≠j) (p_j - p_l)`` (Lagrange weights), row ``j`` of ``B^T`` the coefficients
    of ``Π_(l≠j) (x - p_l)``, and ∞ contributing the leading coefficients (last row / column).
    For F(4, 3) on 0, ±1, ±2, ∞ these are exactly the matrices of Lavin & Gray (2016).
    """
    a = m + r - 1
    pts = list(points)[:a - 1]
    if len(pts) != a - 1:
        raise ValueError(f"F({m}, {r}) needs {a - 1} finite points")
    at = torch.zeros(m, a, dtype=torch.float64)
    g = torch.zeros(a, r, dtype=torch.float64)
    bt = torch.zeros(a, a, dtype=torch.float64)

    def poly(roots):  # coefficients (increasing powers) of Π (x - root)
        c = [1.0]
        for q in roots:
            c = [(c[i - 1] if i else 0.0) - q * (c[i] if i < len(c) else 0.0)
                 for i in range(len(c) + 1)]
        return c

    for j, pj in enumerate(pts):
        for i in range(m):
            at[i, j] = pj ** i
        f = math.prod(pj - q for l_, q in enumerate(pts) if l_ != j)
        for k in range(r):
            g[j, k] = pj ** k / f
        cj = poly([q for l_, q in enumerate(pts) if l_ != j])
        bt[j, :a - 1] = torch.tensor(cj, dtype=torch.float64)
    at[m - 1, a - 1] = 1.0
    g[a - 1, r - 1] = 1.0
    bt[a - 1, :] = torch.tensor(poly(pts), dtype=torch.float64)
    return bt, g, at


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
"""Smaller 3x3 outputs (down to this many pixels) use Winograd only when ..."""

MAX_SMALL_KERNEL = 1 << 17
"""... ``c_in c_out`` is at most this: every product streams the transformed kernel (36 c_in
c_out numbers, 4x the kernel) and with few tiles per image that dominates. Measured inside
whole local bounds (two threads, medians of 3): AlexNet's 13x13 layers (192-384 channels,
c_in c_out <= 98304) 3.5 % faster with Winograd, VGG-16's 14x14 ones (512 x 512) no faster
(31.3 s against 31.3-33.7 s)."""

MAX_TILES = 128
"""Tiles (per image) transformed at once; bigger images go in bands of tile rows, which keeps
the transforms in cache (VGG-16's 64-channel 224x224 layer: 2.6x faster than in one piece
with 336 tiles a band, 14 % faster again with 128)."""


def eligible(weight: Tensor, stride, padding, dilation, groups: int, out_hw,
             device: torch.device | str) -> bool:
    """Whether the Winograd products are used for a convolution: a 3x3 or 5x5 kernel,
    stride 1, dilation 1, one group, padding ``<= r - 1`` (the transpose needs
    ``r - 1 - p >= 0``), on the CPU (cuDNN's own algorithms are used on CUDA), and large
    enough to be faster."""
    k_out, k_in, kh, kw = weight.shape
    return (kh == kw and kh in OUTPUT_TILE and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1
            and max(padding) <= kh - 1 and min(padding) >= 0
            and torch.device(device).type == "cpu"
            and min(k_in, k_out) >= MIN_CHANNELS
            and _large_enough(kh, out_hw[0] * out_hw[1], k_in * k_out / (k_in + k_out),
                              k_in, k_out))


def _large_enough(r: int, pixels: int, mixing: float, c_in: int, c_out: int) -> bool:
    if mixing < MIN_MIXING:
        return False
    if pixels >= MIN_OUTPUT_PIXELS:
        return True
    return r == 3 and pixels >= SMALL_OUTPUT_PIXELS and c_in * c_out <= MAX_SMALL_KERNEL


TRANSPOSE_ROWS = 1024
"""Rows of a kernel's ``(c_out c_in, 36)`` transform copied at a time into the tap-major
layout (:func:`_tap_major`)."""


def _tap_major(flat: Tensor) -> Tensor:
    """``flat.T.contiguous()`` for the ``(n, 36)`` transformed kernel taps (a copy, the same
    entries): on the CPU in blocks of :data:`TRANSPOSE_ROWS` rows, whose 36 output runs of
    8 KB each are written in order, instead of one strided pass (measured on this project's
    CPU, one thread, 73 728 x 36: 5.6 -> 3.6 ms; the ``(K, C, 6, 6) -> (36, K, C)`` permuted
    copy it replaces took 11.8 ms)."""
    n = flat.shape[0]
    if flat.device.type != "cpu" or n <= TRANSPOSE_ROWS:
        return flat.T.contiguous()
    out = flat.new_empty(flat.shape[1], n)
    for s in range(0, n, TRANSPOSE_ROWS):
        out[:, s:s + TRANSPOSE_ROWS] = flat[s:s + TRANSPOSE_ROWS].T
    return out


class WinogradConv:
    """``conv2d(x, W, padding=p)`` and ``conv_transpose2d(y, W, padding=p)`` (stride 1) for a
    fixed float64 kernel ``W`` of shape ``(c_out, c_in, r, r)``, ``r`` = 3 (F(4x4, 3x3)) or
    5 (F(2x2, 5x5))."""

    def __init__(self, weight: Tensor, padding: tuple[int, int]):
        dt, dev = torch.float64, weight.device
        r = int(weight.shape[-1])
        if tuple(weight.shape[-2:]) != (r, r) or r not in OUTPUT_TILE:
            raise ValueError(f"Winograd products need a 3x3 or 5x5 kernel, got "
                             f"{tuple(weight.shape[-2:])}")
        self.r = r
        self.m = OUTPUT_TILE[r]
        bt, g, at = (t.to(dev) for t in toom_cook(self.m, r))
        self._bt, self._g, self._at = bt, g, at
        # vec(B^T d B) = (B^T kron B^T) vec(d) for row-major 6x6 tiles; likewise A^T m A
        self._kb = torch.kron(bt, bt)  # (36, 36)
        self._ka = torch.kron(at, at)  # (m^2, 36)
        w = weight.to(dt)
        self._w_abs = w.abs().cpu()
        self._delta: float | None = None
        self.padding = (int(padding[0]), int(padding[1]))
        self._u = self._transform(g, w)  # (36, c_out, c_in)
        # per thread: every call writes its input into the buffer (two threads sharing one
        # buffer would overwrite each other's input)
        self._local = threading.local()
        flipped = torch.flip(w, dims=(2, 3)).transpose(0, 1)  # (c_in, c_out, r, r)
        self._ut = self._transform(g, flipped)  # (36, c_in, c_out)

    def __getstate__(self) -> dict:
        # the per-thread buffers are caches: copies and pickles start without them
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @staticmethod
    def _transform(g: Tensor, w: Tensor) -> Tensor:
        u = g @ w @ g.T  # (K, C, 6, 6)
        k, c = w.shape[:2]
        return _tap_major(u.reshape(k * c, TILE * TILE)).view(TILE * TILE, k, c)

    def _correlate(self, x: Tensor, u: Tensor, pad: tuple[int, int]) -> Tensor:
        """Correlation of ``x`` (B, C, H, W) with the transformed kernel ``u`` (36, K, C)
        after zero padding ``pad``: (B, K, H + 2 ph - r + 1, W + 2 pw - r + 1).

        The zero-padded input is written into a buffer kept per input shape (its zero border
        is written once), and each band of tile rows writes its rows of the output directly:
        no padded copy, no concatenation, no fresh pages per product."""
        b, c, h, w = x.shape
        ph, pw = pad
        m, r = self.m, self.r
        ho, wo = h + 2 * ph - r + 1, w + 2 * pw - r + 1
        th, tw = -(-ho // m), -(-wo // m)
        # rows needed: m th + r - 1 (the last tile reads TILE rows from its start)
        hp, wp = m * th + r - 1, m * tw + r - 1
        # (h, w) too: inputs of different sizes can share (hp, wp), and a buffer written by a
        # larger one keeps that input's entries where a smaller one's zero padding belongs
        key = (b, c, h, w, hp, wp, ph, pw, x.dtype, x.device)
        buffers = getattr(self._local, "pad", None)
        if buffers is None:
            buffers = self._local.pad = {}
        buf = buffers.get(key)
        if buf is None:
            # an ordinary tensor even when made inside torch.inference_mode (the analyzer's
            # bounds run there): it is written in place by every later call, wherever made
            with torch.inference_mode(False):
                buf = buffers[key] = torch.zeros(b, c, hp, wp, dtype=x.dtype,
                                                 device=x.device)
        buf[:, :, ph:ph + h, pw:pw + w] = x
        k = u.shape[1]
        out = x.new_empty(b, k, ho, wo)
        # bands of tile rows keep the (memory-bound) transforms in cache on big images
        rows = max(1, MAX_TILES // max(1, b * tw))
        for r0 in range(0, th, rows):
            r1 = min(th, r0 + rows)
            y = self._tiles(buf[:, :, m * r0:m * r1 + r - 1], u, r1 - r0, tw)
            hh = min(ho, m * r1) - m * r0
            if hh == m * (r1 - r0) and wo == m * tw:
                # whole tiles: the tile-major result goes straight into the output rows
                out[:, :, m * r0:m * r1].view(b, k, r1 - r0, m, tw, m).copy_(y)
            else:
                out[:, :, m * r0:m * r0 + hh] = y.reshape(b, k, m * (r1 - r0),
                                                          m * tw)[:, :, :hh, :wo]
        return out

    def _tiles(self, xp: Tensor, u: Tensor, th: int, tw: int) -> Tensor:
        """All ``m x m`` output tiles of the padded input ``xp`` (B, C, m th + r - 1,
        m tw + r - 1), as a (B, K, th, m, tw, m) view (reshape it to (B, K, m th, m tw))."""
        b, c = xp.shape[:2]
        m = self.m
        t = th * tw
        d = xp.unfold(2, TILE, m).unfold(3, TILE, m)  # (B, C, th, tw, 6, 6), a view
        d = d.permute(4, 5, 1, 0, 2, 3).reshape(TILE * TILE, c * b * t)
        # input transform B^T d B as one (36 x 36) product (faster than two 6x6 passes)
        v = (self._kb @ d).reshape(TILE * TILE, c, b * t)
        k = u.shape[1]
        mm = torch.bmm(u, v)  # (36, K, B*T): the channel mixing
        y = self._ka @ mm.reshape(TILE * TILE, k * b * t)  # A^T m A: (m^2, K*B*T)
        return y.reshape(m, m, k, b, th, tw).permute(3, 2, 4, 0, 5, 1)

    def error_bound(self) -> float:
        """``Δ`` with ``||ŷ - y|| <= Δ ||x||`` for the computed :meth:`conv` and
        :meth:`conv_t` (the larger of the two), any input ``x``.

        Componentwise, a chain of float64 products is within ``γ_L`` times the same chain in
        absolute values (Higham, *Accuracy and Stability*, §3.5): the computed output is
        within ``γ_L N |x|`` of the exact one, where ``N`` is the non-negative linear map
        ``|x| -> Σ_c |A^T| ((|G| |g_kc| |G|^T) ⊙ (|B^T| |d_c| |B|)) |A|`` per tile, and ``L``
        the total length of the chain (kernel transform ``r``, input transform 36, channel
        sum ``c``, output transform 36; we take ``2 c + 200``; the rounding of the transform
        matrices' own entries, such as 1/6, is one more factor ``1 + u`` in the chain).
        ``||N||_2 <= sqrt(||N||_1 ||N||_inf)``: a row of ``N`` (one output) sums to
        ``Σ_c [|A^T| (Ũ_kc ⊙ β β^T) |A|]`` with ``β = |B^T| 1``; a column (one input element)
        is read by at most ``ceil(6 / m)^2`` tiles (4 for F(4x4, 3x3), 9 for F(2x2, 5x5)),
        each contributing ``[|B|^T (Σ_k Ũ_kc ⊙ α α^T) |B|]`` with ``α = |A| 1``. Both are
        small tensors of the kernel (the transform is linear, so the taps are summed over
        channels before it), so ``Δ`` costs nothing per product. It bounds the error
        independently of any mask: masked operators whose norm is far below ``Δ`` must not
        use these products (see ``spectral_upper``). Like every ``γ`` bound it assumes that
        the products do not underflow (taps and outputs in the normal range: with taps near
        2^-1022 the products' own underflow is not covered); the bound's own evaluation is
        kept in range for taps down to the smallest subnormal.
        """
        if self._delta is not None:
            return self._delta
        peak = float(self._w_abs.max()) if self._w_abs.numel() else 0.0
        if 0.0 < peak < 2.0 ** -400:
            # small taps: the product of the two sums below (~|w|^2) would lose digits on the
            # subnormal grid, or underflow to 0 for |w| below ~1e-154 (which spectral_upper
            # reads as an all-zero kernel: exact products). Scaled up by a power of two
            # (exact), the bound is computed in range and scaled back, rounded up.
            _, expo = math.frexp(peak)
            up = min(-expo, 1000)
            out = math.ldexp(self._delta_of(self._w_abs * math.ldexp(1.0, up)), -up)
            out = math.nextafter(out, math.inf)
        else:
            out = self._delta_of(self._w_abs)
        self._delta = out
        return out

    def _delta_of(self, w_abs: Tensor) -> float:
        """:meth:`error_bound` for the kernel magnitudes ``w_abs`` (no caching)."""
        g = self._g.cpu().abs()
        bt = self._bt.cpu().abs()
        at = self._at.cpu().abs()
        beta = bt.sum(1)  # |B^T| 1
        alpha = at.sum(0)  # |A| 1 (column sums of |A^T|)
        reads = float(-(-TILE // self.m)) ** 2
        out = 0.0
        for w in (w_abs, w_abs.flip(2, 3).transpose(0, 1)):
            # Σ_c Ũ_kc = |G| (Σ_c |g_kc|) |G|^T and Σ_k Ũ_kc likewise (the transform is
            # linear): sum the taps first, then transform K + C small kernels, not K C
            c = w.shape[1]
            u_rows = g @ w.sum(1) @ g.T  # (K, 6, 6)
            u_cols = g @ w.sum(0) @ g.T  # (C, 6, 6)
            rows = (at @ (u_rows * torch.outer(beta, beta)) @ at.T).amax()
            cols = reads * (bt.T @ (u_cols * torch.outer(alpha, alpha)) @ bt).amax()
            nu = (2 * c + 200) * 2.0 ** -53
            gam = nu / (1.0 - nu)
            out = max(out, gam * math.sqrt(float(rows) * float(cols)) * (1 + 1e-12))
        return out

    def conv(self, x: Tensor) -> Tensor:
        """``conv2d(x, W, padding=p)`` for x of shape (B, c_in, H, W)."""
        return self._correlate(x, self._u, self.padding)

    def conv_t(self, y: Tensor) -> Tensor:
        """``conv_transpose2d(y, W, padding=p)`` (stride 1) for y of shape (B, c_out, H', W')."""
        q = self.r - 1
        return self._correlate(y, self._ut, (q - self.padding[0], q - self.padding[1]))


Winograd3x3 = WinogradConv
"""The earlier name (3x3 kernels were the only ones)."""
