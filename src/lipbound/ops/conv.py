"""Rule for 2-D convolutions (``nn.Conv2d``), any stride, zero padding, dilation, groups.

A x is the convolution without bias and A^T y the transposed convolution with the same
stride, padding, dilation and groups; the matrix is never formed for large layers. Squared
row norms of A D for all rows at once are the convolution of the mask with the element-wise
squared kernel (method.md, "Computation at scale"). For small layers
:meth:`ConvOp.dense_matrix` forms the exact matrix by index arithmetic, and
:func:`circulant_norm_bound` gives a certified bound on ||A||_2 from the kernel alone
(polyphase circulant embedding, explicit rounding terms).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import winograd
from .base import MixingOp, gamma


def _pair(v) -> tuple[int, int]:
    """``(h, w)`` from an int or a sequence of one or two (torch broadcasts one entry, as the
    functional pooling calls ``F.max_pool2d(x, [2])`` do)."""
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def _flip_pays(weight: Tensor, stride, padding, dilation, groups: int,
               output_padding) -> bool:
    """Whether :meth:`ConvOp.lin_t` computes the transposed convolution as a convolution
    with the flipped, channel-swapped kernel: 3x3, stride 1, no dilation, one group, at
    least 8 input channels and at least 3/4 as many input as output channels. Measured
    (float64, one thread, one image, ``conv_transpose2d`` time / flipped time) on a grid of
    8-64 channels at 30x30 and 14x14 inputs: 1.0-6.1x where the rule holds (e.g. 32 -> 32
    1.45x / 1.15x, 32 -> 24 1.68x / 1.43x, 8 -> 8 2.3x / 1.6x; earlier: AlexNet's 384 -> 256
    and 256 -> 256 at 13x13, VGG-16's 512 -> 512 at 14x14, 1.16-1.58x), 0.4-1.0x with fewer
    input than 3/4 of the output channels (32 -> 64: 1.0x / 0.75x; 3 -> 32 slower still) or
    a 5x5 kernel."""
    c_out, c_in, kh, kw = weight.shape
    return ((kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and max(padding) <= 2 and not any(output_padding)
            and c_in >= 8 and 4 * c_in >= 3 * c_out)


class ConvOp(MixingOp):
    """y = conv2d(x, W) + b, optionally followed by a fixed per-output scale
    (``out_scale``, used by average pooling with ``count_include_pad=False``).

    Inside :func:`lipbound.ops.winograd.enabled` (the Lanczos runs of
    :func:`lipbound.spectral.spectral_upper`, only when ``lipbound.spectral.FAST_REL_ERROR``
    is positive, the default, and when their product error is below it),
    :meth:`lin` and :meth:`lin_t` of large 3x3 stride-1 layers on the CPU use Winograd's
    F(4x4, 3x3) (:mod:`lipbound.ops.winograd`); set the class attribute
    ``use_winograd = False`` to use ``conv2d`` everywhere."""

    use_winograd: bool = True

    def __init__(self, name: str, in_shape, out_shape, weight: Tensor, bias: Tensor | None,
                 stride, padding, dilation, groups: int, out_scale: Tensor | None = None):
        super().__init__(name, in_shape, out_shape)
        self.weight = weight.detach().to(torch.float64, copy=True)
        self.weight_sq = self.weight * self.weight
        self.bias = None if bias is None else bias.detach().to(torch.float64, copy=True)
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
        self._wg: tuple[torch.device, winograd.WinogradConv | None] | None = None
        self._flipped: Tensor | None = None
        self._use_flip = _flip_pays(self.weight, self.stride, self.padding, self.dilation,
                                    self.groups, self.output_padding)

    def _winograd(self) -> winograd.WinogradConv | None:
        """The Winograd products for this layer, or None where conv2d is used."""
        if not self.use_winograd or self.weight.dtype != torch.float64:
            return None
        dev = self.weight.device
        if self._wg is None or self._wg[0] != dev:  # built once per device
            # (stride 1: the transposed convolution has no output padding)
            ok = winograd.eligible(self.weight, self.stride, self.padding, self.dilation,
                                   self.groups, self.out_shape[-2:], dev)
            self._wg = (dev, winograd.WinogradConv(self.weight, self.padding) if ok else None)
        return self._wg[1]

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv(x, self.weight)
        if self.out_scale is not None:
            y = y * self.out_scale
        if self.bias is not None:
            y = y + self.bias.view(-1, 1, 1)
        return y

    def winograd_error(self) -> float | None:
        """Absolute error bound per unit input norm of :meth:`lin` / :meth:`lin_t` with
        Winograd products (``out_scale`` included), or None when this layer never uses them."""
        wg = self._winograd()
        if wg is None:
            return None
        s = 1.0 if self.out_scale is None else float(self.out_scale.abs().max())
        return wg.error_bound() * s

    def lin(self, x: Tensor) -> Tensor:
        wg = self._winograd() if x.dtype == torch.float64 and winograd.is_enabled() else None
        y = wg.conv(x) if wg is not None else self._conv(x, self.weight)
        return y if self.out_scale is None else y * self.out_scale

    def lin_t(self, y: Tensor) -> Tensor:
        if self.out_scale is not None:
            y = y * self.out_scale
        wg = self._winograd() if y.dtype == torch.float64 and winograd.is_enabled() else None
        if wg is not None:
            return wg.conv_t(y)
        if self._use_flip and y.dtype == self.weight.dtype:
            # stride 1: the transpose is the correlation with the spatially flipped,
            # channel-swapped kernel and padding k - 1 - p (the same linear map)
            if self._flipped is None or self._flipped.device != self.weight.device:
                with torch.inference_mode(False):  # a cache that may serve autograd later
                    self._flipped = self.weight.flip(2, 3).transpose(0, 1).contiguous()
            kh, kw = self.weight.shape[-2:]
            return F.conv2d(y, self._flipped, None, 1,
                            (kh - 1 - self.padding[0], kw - 1 - self.padding[1]))
        return F.conv_transpose2d(y, self.weight, None, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)

    def channel_subset(self, in_ch: Tensor, out_ch: Tensor) -> ConvOp:
        """The convolution between input channels ``in_ch`` and output channels ``out_ch``
        (sorted long tensors) alone: the kernel's sub-block, the same geometry, no bias. Its
        linear map is ``S_out A S_in^T`` for the channel selections ``S``: with every other
        input channel zero, the selected outputs of ``A`` are exactly its outputs."""
        if self.groups != 1:
            raise ValueError("channel_subset needs an ungrouped convolution")
        w = self.weight.index_select(0, out_ch).index_select(1, in_ch)
        sc = self.out_scale
        if sc is not None and sc.dim() == 3 and sc.shape[0] == self.out_shape[0] > 1:
            sc = sc.index_select(0, out_ch)
        return ConvOp(f"{self.name}[channels]", (int(in_ch.numel()), *self.in_shape[1:]),
                      (int(out_ch.numel()), *self.out_shape[1:]), w, None, self.stride,
                      self.padding, self.dilation, 1, out_scale=sc)

    def sq_rows(self, w: Tensor) -> Tensor:
        y = self._conv(w, self.weight_sq)
        return y if self.out_scale is None else y * self.out_scale ** 2

    def abs_lin(self, x: Tensor) -> Tensor:
        y = self._conv(x, self.weight.abs())
        return y if self.out_scale is None else y * self.out_scale.abs()

    def abs_lin_t(self, y: Tensor) -> Tensor:
        if self.out_scale is not None:
            y = y * self.out_scale.abs()
        return F.conv_transpose2d(y, self.weight.abs(), None, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)

    def inner_length(self) -> int:
        return int(self.weight[0].numel())

    def inner_length_t(self) -> int:
        """An input entry meets ``c_out / groups`` kernels, each at most ``kh kw`` times (a
        two-stage sum, ``c_out / groups`` then ``kh kw`` terms, rounds each term fewer times)."""
        kh, kw = self.weight.shape[-2:]
        return int(self.weight.shape[0] // self.groups * kh * kw)

    def row_abs(self) -> Tensor:
        """Per output channel ``Σ |W[c]|`` (times ``|out_scale|``) at every position: an
        upper bound on each row's absolute sum (border rows have fewer taps)."""
        if self._row_abs is None:
            s = self.weight.abs().sum(dim=(1, 2, 3)) * (1.0 + 2.0 * gamma(self.inner_length()))
            v = s.reshape(-1, 1, 1).expand(self.out_shape)
            if self.out_scale is not None:
                v = v * self.out_scale.abs()
            self._row_abs = v.reshape(-1).contiguous()
        return self._row_abs

    def flops(self) -> float:
        return float(self.out_dim * self.weight[0].numel())

    def dense_submatrix(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``dense_matrix()[rows][:, cols]`` without forming the whole matrix: for each
        requested row, its taps' input indices are computed and those among ``cols`` are
        scattered. Bit-identical to indexing :meth:`dense_matrix` (every entry is a single
        weight times the output scale). Memory ``len(rows) * c_in_g * kh * kw`` indices."""
        c_out, c_in_g, kh, kw = self.weight.shape
        h, w = self.in_shape[-2:]
        ho, wo = self.out_shape[-2:]
        (s1, s2), (p1, p2), (d1, d2) = self.stride, self.padding, self.dilation
        dev = self.weight.device
        rows = rows.to(dev)
        cols = cols.to(dev)
        n_rows, n_cols = rows.numel(), cols.numel()
        if n_rows == 0 or n_cols == 0:
            return torch.zeros(n_rows, n_cols, dtype=torch.float64, device=dev)
        o, rem = rows // (ho * wo), rows % (ho * wo)
        i, j = rem // wo, rem % wo
        grp = o // (c_out // self.groups)
        ar = torch.arange
        hin = (i * s1)[:, None, None, None] + (ar(kh, device=dev) * d1 - p1)[None, None, :, None]
        win = (j * s2)[:, None, None, None] + (ar(kw, device=dev) * d2 - p2)[None, None, None, :]
        cin = (grp * c_in_g)[:, None, None, None] + ar(c_in_g, device=dev)[None, :, None, None]
        # integer index arithmetic on the factors' own shapes, broadcast to
        # (rows, c_in_g, kh, kw) only by the last operations (the same exact integers as on
        # the expanded tensors, with fewer of them computed)
        valid = ((hin >= 0) & (hin < h)) & ((win >= 0) & (win < w))
        flat = (cin * h + hin.clamp(0, h - 1)) * w + win.clamp(0, w - 1)
        # column of each tap in the submatrix; taps outside the image or the requested
        # columns go to one extra, discarded column (no boolean gathers)
        pos = torch.full((self.in_dim,), n_cols, dtype=torch.int64, device=dev)
        pos[cols] = ar(n_cols, device=dev)
        p = pos.take(flat).masked_fill_(~valid, n_cols)  # (take: pos[flat], cheaper)
        vals = self.weight.index_select(0, o)  # (R, c_in_g, kh, kw)
        if self.out_scale is not None:
            sc = torch.broadcast_to(self.out_scale, tuple(self.out_shape)).reshape(-1)[rows]
            vals = vals * sc[:, None, None, None]
        sub = torch.zeros(n_rows, n_cols + 1, dtype=torch.float64, device=dev)
        sub.scatter_(1, p.reshape(n_rows, -1), vals.reshape(n_rows, -1))
        return sub[:, :n_cols]

    def dense_matrix(self) -> Tensor:
        """The exact ``(out_dim, in_dim)`` float64 matrix of :meth:`lin` (``out_scale``
        included), formed by scattering the kernel taps (no convolution is evaluated).

        Entry ``((o, i, j), (c, h, w))`` is ``W[o, c - g c_in_g, a, b] * out_scale[o, i, j]``
        when ``h = i s1 + a d1 - p1`` and ``w = j s2 + b d2 - p2`` for a tap ``(a, b)`` and
        ``c`` in the group ``g`` of ``o``, and 0 otherwise. Distinct taps of one output hit
        distinct inputs, so every entry is a single weight (times the scale): the result is
        bit-identical to applying :meth:`lin` to basis vectors. For each tap, the entries
        of all groups, output channels, positions and input channels form one strided view
        of the matrix, filled with a single copy. Memory: ``8 * out_dim * in_dim`` bytes.

        Returns:
            Tensor of shape ``(out_dim, in_dim)``, float64, on the weight's device.
        """
        c_out, c_in_g, kh, kw = self.weight.shape
        h, w = self.in_shape[-2:]
        ho, wo = self.out_shape[-2:]
        (s1, s2), (p1, p2), (d1, d2) = self.stride, self.padding, self.dilation
        g = self.groups
        c_out_g = c_out // g
        n_in = self.in_dim
        mat = torch.zeros(self.out_dim, n_in, dtype=torch.float64, device=self.weight.device)
        if mat.numel() == 0:
            return mat
        wt = self.weight.reshape(g, c_out_g, c_in_g, kh, kw)
        scale = None
        if self.out_scale is not None:
            scale = torch.broadcast_to(self.out_scale, tuple(self.out_shape)).reshape(
                g, c_out_g, ho, wo)
        # strides of the index (group, o, i, j, c) -> row (g c_out_g + o, i, j),
        # column (g c_in_g + c, i s1 + const, j s2 + const) in the flat row-major matrix
        strides = (c_out_g * ho * wo * n_in + c_in_g * h * w, ho * wo * n_in,
                   wo * n_in + s1 * w, n_in + s2, h * w)

        def valid(k_off: int, pad: int, s: int, n: int, n_out: int) -> tuple[int, int]:
            # output indices i with 0 <= i*s + k_off - pad < n
            lo = max(0, -((k_off - pad) // s))
            hi = min(n_out, (n - 1 + pad - k_off) // s + 1)
            return lo, hi

        for a in range(kh):
            i0, i1 = valid(a * d1, p1, s1, h, ho)
            if i1 <= i0:
                continue
            for b in range(kw):
                j0, j1 = valid(b * d2, p2, s2, w, wo)
                if j1 <= j0:
                    continue
                h0 = i0 * s1 + a * d1 - p1
                w0 = j0 * s2 + b * d2 - p2
                offset = i0 * wo * n_in + j0 * n_in + h0 * w + w0
                view = mat.as_strided((g, c_out_g, i1 - i0, j1 - j0, c_in_g), strides, offset)
                vals = wt[:, :, None, None, :, a, b]
                if scale is not None:
                    vals = vals * scale[:, :, i0:i1, j0:j1, None]
                view.copy_(vals.expand(view.shape))
        return mat


def conv2d_rule(module: nn.Module, name: str, in_shape, out_shape) -> ConvOp:
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"rule called with {type(module).__name__}")
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={module.padding_mode!r} (only 'zeros')")
    return conv2d_op(name, in_shape, out_shape, module.weight, module.bias, module.stride,
                     module.padding, module.dilation, module.groups)


def conv2d_op(name: str, in_shape, out_shape, weight: Tensor, bias: Tensor | None, stride,
              padding, dilation, groups: int) -> ConvOp:
    """The op of a zero-padded 2-D convolution with these tensors and settings (those of
    ``nn.Conv2d`` or of a call ``F.conv2d(x, weight, bias, stride, padding, dilation,
    groups)``; ``padding`` may be ``'same'`` or ``'valid'``).

    Raises:
        NotImplementedError: a per-sample input without a channel dimension (since session
            22: torch then convolves the batch as the channels of one unbatched image, which
            mixes the samples; the rule crashed where the channel counts equal the batch)."""
    if len(in_shape) != 3 or len(out_shape) != 3:
        raise NotImplementedError(
            f"a 2-D convolution of a per-sample tensor of shape {tuple(in_shape)} without a "
            "channel dimension (torch convolves the batch as the channels of one image, "
            "mixing the samples); give the input a channel dimension: input_shape (1, H, W), "
            "or x.view(x.size(0), 1, H, W) in forward")
    dilation = _pair(dilation)
    if isinstance(padding, str):
        # 'same'/'valid': torch resolves it to explicit numbers only for odd kernels; use
        # the private helper's result through the recorded output shape.
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[-2:], strict=True)]
            if any(t % 2 for t in total):
                raise NotImplementedError("padding='same' with an even effective kernel")
            pad = tuple(t // 2 for t in total)
        else:
            raise NotImplementedError(f"padding={padding!r}")
    else:
        pad = padding
    return ConvOp(name, in_shape, out_shape, weight, bias, stride, pad, dilation, groups)


_U = 2.0 ** -53
"""Unit roundoff of float64."""

_EIG_C = 64
"""Constant c of the formula ``(λ̂ + c n u γf) / (1 - c n u) + γf`` that gives the value of a
frequency whose top eigenvalue λ̂ comes from ``eigvalsh`` (:func:`_eig_upper`, as in
:func:`lipbound.spectral.exact_norm`). It was the assumed backward error ``c n u ||G||`` of the
Hermitian eigensolver; the value is now proven by a Cholesky factorisation
(:func:`_eig_certified`), and ``c n u`` only sets the room the certificate has."""

_EIG_CERT_MARGIN = 16 * 2.0 ** -53
"""Relative room left below the formula's value when :func:`_eig_certified` chooses its
first level: covers the roundings of the level and of the certificate's evaluation (each a few
``u``); the comparison itself is rigorous, this only makes it succeed."""

_EIG_CERT_TRIES = 5
"""Higher levels tried by :func:`_eig_certified` where the first factorisation fails."""

_EIG_CERT_STEP = 16.0
"""Factor by which the relative gap of those levels above the top eigenvalue grows."""

_MARGIN = 1e-12
"""Relative margin on the final scalar (covers the dozen roundings of the scalar arithmetic
after the per-frequency bounds, each at most u = 1.1e-16)."""

_LEVEL_MARGIN = 1e-12
"""Relative margin of the Cholesky level above the largest eigenvalue found so far (in
:func:`_max_freq_norm`). It only steers the work: any level gives a certified bound, a level
below a frequency's top eigenvalue only sends that frequency to ``eigvalsh``."""

_LEVEL_RETRIES = 2
"""Rounds (per chunk) in which only the most promising failed frequency of each group goes to
``eigvalsh`` (raising the level) before the remaining failures are factorised again; after
them every remaining failure gets its exact eigenvalue."""

_SYM_BLOCK_N = 128
"""Gram size from which the real part is formed block-triangularly (:func:`_gram_real`)."""

_WHOLE_CHUNK = 0.75
"""Share of a chunk's frequencies to be factorised from which :func:`_certify_chunk`
factorises the whole chunk in place rather than gathering those frequencies (a gather costs
about half a factorisation per matrix at n = 32)."""

_POWER_STEPS = 8
"""Power iterations behind the estimates that order the failed frequencies."""

_CHOL_MIN_N = 16
"""Smallest Gram size certified by Cholesky; below it every frequency goes to ``eigvalsh``.
Measured on one core (random 3x3 kernels, grids 8-32): at n <= 8 ``eigvalsh`` is mostly
faster (up to 2x on small grids: the level bookkeeping costs more than the small
eigensolvers), at n = 16-32 the two are within about 15 % on random kernels (Cholesky
1.7-1.9x faster on the trained CIFAR-10 layers, n = 32 and 64), and from n = 48 Cholesky
wins (AlexNet, n = 192-256: 2-2.4x)."""


def _cholesky_upper(gram: Tensor, level: Tensor) -> Tensor:
    """Certified upper bounds on the largest eigenvalues of a batch of Hermitian matrices Ĝ,
    from one batched Cholesky factorisation of fl(μ I - Ĝ) per matrix.

    Rounding (u = 2^-53, γ_m = m u / (1 - m u)). Let B̂ = fl(μ I - Ĝ): the negation is exact
    and only the diagonal is rounded, B̂_ii = (μ - Ĝ_ii)(1 + δ_i), |δ_i| <= u, so
    B̂ = μ I - Ĝ + D with D diagonal, |D_ii| <= u (μ + |Ĝ_ii|). If the factorisation runs to
    completion, the computed factor R satisfies R^H R = B̂ + ΔB with
    |ΔB| <= γ_c |R^H| |R| entrywise, for any ordering of the inner products, blocked LAPACK
    codes included (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    Thm 10.3, stated there with γ_{n+1} for real arithmetic; we take γ_c = γ_{4(n+1)} to
    cover complex multiplications and divisions, Higham Lemma 3.5). With r_j the columns of
    R, (|R^H| |R|)_ij <= ||r_i|| ||r_j|| (Cauchy-Schwarz), so
    ||ΔB||_2 <= || |ΔB| ||_2 <= γ_c Σ_j ||r_j||^2. On the diagonal,
    ||r_j||^2 = B̂_jj + ΔB_jj <= B̂_jj + γ_c ||r_j||^2, hence B̂_jj >= 0 and
    Σ_j ||r_j||^2 <= trace(B̂) / (1 - γ_c); we use the weaker 1 / (1 - n γ_c). The computed
    trace t̂ of these non-negative terms satisfies trace(B̂) <= t̂ / (1 - γ_n). Since
    R^H R ⪰ 0, Ĝ = μ I + D - R^H R + ΔB ⪯ (μ + max_i |D_ii| + ||ΔB||_2) I, i.e.

        λmax(Ĝ) <= μ + γ_c t̂ / ((1 - γ_n)(1 - n γ_c)) + u (μ + max_i |Ĝ_ii|).

    Underflow (gradual or flushed to zero) adds at most 2^-1022 max(1, |r_jj|) per operation
    to an entry of ΔB (at most 8 (n + 1) operations), with |r_jj|^2 <= B̂_jj / (1 - γ_c) <=
    2 (μ + |Ĝ_jj|); in norm (at most n times the largest entry) the term
    n^2 2^-1000 (1 + μ + max_i |Ĝ_ii|) covers it. The evaluation of this sum of non-negative
    terms takes at most a dozen roundings (relative error <= γ_12, the computed γ's included),
    covered by the factor (1 + 32 u). Which triangle LAPACK reads does not matter: every
    entry it reads is an entry of B̂ (or its conjugate), so the statement holds for the
    Hermitian matrix that triangle defines (the imaginary part of the diagonal is zero).

    The factorisation "completes" when ``info == 0`` and the diagonal of R is finite and
    positive. An infinite or NaN off-diagonal entry r_kj would make the pivot r_jj, computed
    from B̂_jj - Σ_k |r_kj|^2, NaN or -inf, so the diagonal check covers the whole factor.

    Args:
        gram: the matrices, (batch, n, n), complex128 (real diagonal).
        level: the level μ of each matrix, (batch,), float64, finite and positive for a
            certificate.

    Returns:
        (batch,) float64: a certified upper bound on λmax(Ĝ) of each matrix, or ``inf`` where
        the factorisation fails (then λmax(Ĝ) may exceed μ; nothing is certified).
    """
    return _cholesky_upper_neg(gram.neg(), level)


def _cholesky_upper_neg(neg: Tensor, level: Tensor) -> Tensor:
    """:func:`_cholesky_upper` of ``Ĝ = -neg`` from ``neg = -Ĝ`` itself (exactly negated: the
    same ``B̂``, the same factorisation and bound, without a negated copy). The diagonal of
    ``neg`` (writable: not an expanded view) serves as scratch for ``μ - Ĝ_ii`` and is
    restored bit for bit before returning, so a chunk's matrix can be factorised in place."""
    n = neg.shape[-1]
    g_c = gamma(4 * (n + 1))
    if not n * g_c < 0.5 or neg.shape[0] == 0:
        return torch.full(neg.shape[:1], math.inf, dtype=torch.float64, device=neg.device)
    b_diag = neg.diagonal(dim1=-2, dim2=-1)
    saved = b_diag.clone()
    g_max = saved.real.abs().amax(-1)  # max_i |Ĝ_ii|
    try:
        b_diag.add_(level[:, None])  # real part fl(μ - Ĝ_ii); the imaginary part stays
        trace = b_diag.real.sum(-1)
        # the upper factor R (R^H R = B̂ + ΔB) directly: 12-15 % faster than the lower one
        # on CIFAR-10's 32- and 64-channel frequency batches
        fac, info = torch.linalg.cholesky_ex(neg, upper=True)
    finally:
        b_diag.copy_(saved)
    # the diagonal of R (real and imaginary parts, copied out of the factor: reductions on
    # the strided diagonal of a complex batch are slow) positive and finite: min of the real
    # parts > 0 and max of all magnitudes < inf, NaN failing both, as the elementwise tests
    # (CIFAR-10's 480 x 32 x 32 batch: 0.31 -> 0.13 ms)
    r_diag = torch.view_as_real(fac.diagonal(dim1=-2, dim2=-1).clone())
    ok = info == 0  # (an empty diagonal, n = 0, has nothing else to check)
    if n:
        ok &= (r_diag[..., 0].amin(-1) > 0) & (r_diag.abs().amax((-2, -1)) < math.inf)
    up = (level + g_c * trace / ((1.0 - gamma(n)) * (1.0 - n * g_c))
          + _U * (level + g_max) + n * n * 2.0 ** -1000 * (1.0 + level + g_max))
    up = up * (1.0 + 32.0 * _U)
    ok &= torch.isfinite(up) & torch.isfinite(level) & (level > 0)
    return torch.where(ok, up, math.inf)


def _eig_upper(gram: Tensor, gf: Tensor, cnu: float) -> tuple[Tensor, Tensor]:
    """Top eigenvalue λ̂ of each Hermitian Ĝ (batched ``eigvalsh``) and the formula's value
    ``t = (λ̂ + c n u gf) / (1 - c n u)`` for λmax(Ĝ); ``t + gf`` was the value of λmax(G),
    which assumed an eigensolver backward error ``c n u ||Ĝ||`` (comments in
    :func:`_max_freq_norm`). It is an upper bound only once :func:`_eig_certified` has
    proven it."""
    lam = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0)
    return lam, (lam + cnu * gf) / (1.0 - cnu)


def _eig_certified(gram: Tensor, gf: Tensor, fro_up: Tensor, cnu: float
                   ) -> tuple[Tensor, Tensor]:
    """Top eigenvalue λ̂ of each Hermitian Ĝ (:func:`_eig_upper`) and a *proven* upper bound on
    λmax(G): the formula value ``V = t + gf``, ``t = (λ̂ + c n u gf) / (1 - c n u)``, wherever a
    Cholesky factorisation proves ``λmax(Ĝ) <= t`` (the same bits as before), else a
    certificate's own value, else the Frobenius bound. λ̂ only chooses the levels: an
    inaccurate (or wrong) eigenvalue cannot make the result unsound.

    Proof. For a level μ, the batched float64 Cholesky factorisation of ``B̂ = fl(μ I - Ĝ)``
    (:func:`_cholesky_upper_neg`), where it completes, gives ``U(μ) >= λmax(Ĝ)`` by the
    rounding error analysis of Cholesky (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., Thm 10.3; the idea of Demmel, "On floating point errors in
    Cholesky", LAPACK Working Note 14, 1989, and Rump, "Verification of positive
    definiteness", BIT 46, 2006; constants in :func:`_cholesky_upper`). With
    ``||Ĝ - G||_2 <= gf`` (:func:`_max_freq_norm`) Weyl's inequality gives
    ``λmax(G) <= U(μ) + gf``. Since U(μ) is affine in μ and in the computed trace of B̂
    (about ``n μ - trace(Ĝ)``), the level is chosen in closed form so that U(μ) lands just
    under t (``_EIG_CERT_MARGIN`` relative below it); where the computed ``U(μ) <= t``
    (a rigorous comparison: μ only has to be well chosen for it to pass),
    ``λmax(G) <= t + gf`` and V is returned. The room ``t - λ̂ >= c n u λ̂`` (c = 64) must
    hold the certificate's overhead ``≈ 4 (n + 1) u Σ_i (μ - λ_i(Ĝ)) + 34 u μ`` and the
    gap μ - λ̂ the factorisation needs: at any spectrum for Gram sizes ``n <= 15``
    (``4 (n + 1)(n - 1) + 50 <= 64 n``, a rank-one Ĝ being the worst case), for larger n
    when the spectrum is flat enough (mean eigenvalue above about ``1 - 16 / (n + 1)`` of
    the top one). Measured (eigvalsh for every frequency): all of n = 8-15, random and
    rank-one or -two kernels, prove V; at n = 16-19 random kernels do (all but 1 of 720
    frequencies), rank-one ones do not, nor CIFAR-10's n = 32 and 64 (in the default path
    those eigvalsh frequencies are not the maximum: the bound keeps its bits). Where the
    room does not suffice, the certificate that completed is
    kept (``min(U(μ) + gf, fro_up)``, about ``4 n^2 u`` relative above λ̂: the only case whose
    bits differ; a higher level would only give a larger one). Where the factorisation
    fails (or μ would not exceed ``max(λ̂, max_i Ĝ_ii)``), the levels
    ``max(λ̂, max_i Ĝ_ii) (1 + f)``, f from ``2 n u`` up by ``_EIG_CERT_STEP`` per round,
    ``_EIG_CERT_TRIES`` rounds, are tried (one batched factorisation per round over the
    matrices still open; the first that completes counts, capped by ``fro_up``). The last
    resort is ``fro_up >= ||K̂||_F^2 >= λmax(G)`` (G = K̂^H K̂ is positive semidefinite).

    Args:
        gram: the matrices Ĝ, (batch, n, n), complex128; overwritten (it is negated in place:
            the factorisations start from ``-Ĝ``).
        gf: (batch,) bounds on ``||Ĝ - G||_2``.
        fro_up: (batch,) rigorous upper bounds on ``||K̂||_F^2``.
        cnu: ``c n u``.

    Returns:
        ``(λ̂, bound)``, both (batch,) float64.
    """
    batch, n = gram.shape[0], gram.shape[-1]
    if n == 1 and batch:
        # a 1 x 1 Hermitian Ĝ has the one eigenvalue Ĝ_11 (real: a computed sum of squares,
        # >= 0), which eigvalsh returns exactly; t = fl(fl(λ̂ + c n u gf) / (1 - c n u)) >= λ̂
        # (rounding is monotone, the addend is >= 0 and the divisor < 1), so t + gf is proven
        # without a factorisation (same bits; ~25 torch calls fewer, 0.25 ms on MNIST's conv1)
        lam = gram[:, 0, 0].real.clamp_min(0.0)
        return lam, (lam + cnu * gf) / (1.0 - cnu) + gf
    lam, t = _eig_upper(gram, gf, cnu)
    value = t + gf  # the former value, bit for bit
    g_c = gamma(4 * (n + 1))
    if batch == 0 or not n * g_c < 0.5:
        return lam, fro_up.clone()
    neg = gram.neg_()  # -Ĝ, exactly
    d = neg.diagonal(dim1=-2, dim2=-1).real  # -Ĝ_ii (Ĝ_ii, a computed sum of squares, >= 0)
    g_top = d.amin(-1).neg_()  # max_i Ĝ_ii <= λmax(Ĝ)
    base = torch.maximum(lam, g_top)
    # 1. the level whose certificate lands just under t: with c = γ_c / ((1 - γ_n)(1 - n γ_c))
    # and τ = n^2 2^-1000, U(μ) ≈ (μ (1 + u + c n + τ) - c trace(Ĝ) + (u + τ) g + τ)(1 + 32 u),
    # g = max_i Ĝ_ii (the rounding of this evaluation only moves μ)
    c = g_c / ((1.0 - gamma(n)) * (1.0 - n * g_c))
    tau = n * n * 2.0 ** -1000
    den = 1.0 + _U + c * n + tau
    mu = torch.mul(t, 1.0 / ((1.0 + 32.0 * _U) * (1.0 + _EIG_CERT_MARGIN) * den))
    mu.sub_(d.sum(-1), alpha=c / den).sub_(g_top, alpha=(_U + tau) / den).sub_(tau / den)
    first = (mu > base) & (mu < math.inf)  # (False for NaN)

    def settle(cert: Tensor, t: Tensor, value: Tensor, gf: Tensor, fro: Tensor) -> Tensor:
        # V where U(μ) <= t; a certificate that completed but does not prove t is kept (a
        # higher level would only give a larger one); inf where the factorisation failed
        kept = torch.where(cert < math.inf, torch.minimum(cert + gf, fro), math.inf)
        return torch.where(cert <= t, value, kept)

    if bool(first.all()):
        cert = _cholesky_upper_neg(neg, mu)
        if bool((cert <= t).all()):  # (False for inf)
            return lam, value
        out = settle(cert, t, value, gf, fro_up)
    else:
        out = torch.full_like(value, math.inf)
        idx = first.nonzero().squeeze(1)
        if idx.numel():
            cert = _cholesky_upper_neg(neg[idx], mu[idx])
            out[idx] = settle(cert, t[idx], value[idx], gf[idx], fro_up[idx])
    # 2. higher levels where the factorisation failed or was not tried
    pending = (out == math.inf).nonzero().squeeze(1)
    f = 2.0 * n * _U
    for _ in range(_EIG_CERT_TRIES):
        if not pending.numel():
            break
        level = (base[pending] * (1.0 + f)).clamp_min(2.0 ** -1000)
        cert = _cholesky_upper_neg(neg[pending], level)
        done = torch.isfinite(cert)
        at = pending[done]
        out[at] = torch.minimum(cert[done] + gf[at], fro_up[at])
        pending = pending[~done]
        f *= _EIG_CERT_STEP
    # 3. the Frobenius bound
    out[pending] = fro_up[pending]
    return lam, out


def _power_estimate(gram: Tensor) -> Tensor:
    """Rough estimates (Rayleigh quotients after ``_POWER_STEPS`` power iterations from a fixed
    start) of the top eigenvalues of a batch of Hermitian PSD matrices. They only decide which
    failed frequency gets ``eigvalsh`` first; no bound depends on them."""
    n = gram.shape[-1]
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, 1, generator=gen, dtype=torch.float64).to(gram)
    v = v.expand(gram.shape[0], n, 1)
    rq = gram.new_zeros(gram.shape[0], dtype=torch.float64)
    for _ in range(_POWER_STEPS):
        w = gram @ v
        vr, wr = torch.view_as_real(v), torch.view_as_real(w)
        # v^H G v / v^H v (real for Hermitian G), then v <- w scaled by its largest part
        rq = (vr * wr).sum((1, 2, 3)) / (vr * vr).sum((1, 2, 3)).clamp_min(1e-300)
        v = w / wr.abs().amax((1, 2, 3)).clamp_min(1e-300)[:, None, None]
    return rq.nan_to_num(0.0)


def _group_tops(est: Tensor, grp: Tensor, groups: int) -> Tensor:
    """Mask of one entry per group present: the first of those with the largest ``est``."""
    top = torch.full((groups,), -math.inf, dtype=est.dtype, device=est.device)
    top = top.scatter_reduce(0, grp, est, "amax")
    pos = torch.arange(est.numel(), device=est.device)
    cand = torch.where(est >= top[grp], pos, est.numel())
    first = torch.full((groups,), est.numel(), dtype=pos.dtype, device=est.device)
    first = first.scatter_reduce(0, grp, cand, "amin")
    return pos == first[grp]


def _certify_chunk(neg: Tensor, gf: Tensor, fro_up: Tensor, grp: Tensor, levels: Tensor,
                   cnu: float, tops: list[tuple[float, int]] | None = None) -> Tensor:
    """Certified upper values of λmax(G) for a chunk of computed Gram matrices Ĝ, given
    exactly negated (``neg = -Ĝ``, what the Cholesky factorisations start from; Gram rounding
    term ``gf``, group index ``grp``), by Cholesky certification at the per-group ``levels``
    (raised in place from the exact eigenvalues computed here).

    Each matrix is factorised at its group's level μ (:func:`_cholesky_upper_neg`; its bound
    on λmax(Ĝ) plus gf bounds λmax(G)). A matrix whose factorisation fails, or whose largest
    diagonal entry already reaches μ (then it would fail: λmax(Ĝ) >= max_i Ĝ_ii), is
    pending. While no group of the pending matrices has a level yet, the pending matrix of
    each group with the largest diagonal entry goes to ``eigvalsh`` (the value of
    :func:`_eig_certified`, the same as without certification, proven by its own
    factorisation), the level is set to
    λ̂ (1 + margin) and the others are factorised; then, for ``_LEVEL_RETRIES`` rounds, the
    pending matrix of each group with the largest estimated top eigenvalue
    (:func:`_power_estimate`) does the same; after them every remaining pending matrix goes
    to ``eigvalsh``. Each round removes at least one matrix per group. Levels only grow, so a
    value certified at an earlier level stays valid.

    When at least ``_WHOLE_CHUNK`` of the chunk is to be factorised, the whole chunk is
    factorised in place (no gathered copy) and only those results are read: each matrix's
    factorisation is independent of the others, so the values are the same.

    ``fro_up`` (>= ||K̂||_F^2 of each matrix) is the last resort of :func:`_eig_certified`.
    Where ``eigvalsh`` is used, its raw λ̂ sets the levels and ``tops`` (steering only); the
    bound is :func:`_eig_certified`'s proven value.

    ``tops``, when given, receives ``(λ̂, index)`` of the largest eigenvalue of each
    ``eigvalsh`` call: every other matrix was certified below a level set from one of them,
    so the largest recorded λ̂ is the largest top eigenvalue of the chunk (to the level
    margin).
    """
    up = torch.empty_like(gf)
    diag_max = neg.diagonal(dim1=-2, dim2=-1).real.amin(-1).neg()  # max_i Ĝ_ii <= λmax(Ĝ)
    total = neg.shape[0]
    pending = torch.arange(total, device=neg.device)
    retries = _LEVEL_RETRIES
    while pending.numel():
        lev = levels[grp[pending]]
        tryable = (lev > diag_max[pending]) & torch.isfinite(lev)
        idx = pending[tryable]
        if idx.numel() and idx.numel() >= _WHOLE_CHUNK * total:
            cert = _cholesky_upper_neg(neg, levels[grp])[idx]
        elif idx.numel():
            cert = _cholesky_upper_neg(neg[idx], lev[tryable])
        if idx.numel():
            ok = torch.isfinite(cert)
            up[idx[ok]] = cert[ok] + gf[idx[ok]]
            pending = torch.cat((pending[~tryable], idx[~ok]))
        if not pending.numel():
            break
        if pending.numel() > 1 and bool((levels[grp[pending]] == 0).all()):
            # no level yet for any of them: the largest diagonal entry picks (not a retry)
            pick = _group_tops(diag_max[pending], grp[pending], levels.numel())
        elif pending.numel() > 1 and retries > 0:
            retries -= 1
            pick = _group_tops(_power_estimate(neg[pending].neg_()), grp[pending],
                               levels.numel())
        else:
            pick = torch.ones_like(pending, dtype=torch.bool)
        sel = pending[pick]
        lam, lam_up = _eig_certified(neg[sel].neg_(), gf[sel], fro_up[sel], cnu)
        up[sel] = lam_up
        if tops is not None and lam.numel():
            at = int(torch.argmax(lam))
            tops.append((float(lam[at]), int(sel[at])))
        # a positive floor: a zero Gram matrix (an all-zero group) is then certified, not
        # sent to eigvalsh one at a time
        new_lev = (lam * (1.0 + _LEVEL_MARGIN)).clamp_min(2.0 ** -1000)
        levels.scatter_reduce_(0, grp[sel], new_lev, "amax")
        pending = pending[~pick]
    return up


class _Plan:
    """Polyphase layout of a kernel for strides (s1, s2) on a padded input grid (n1, n2)."""

    def __init__(self, weight: Tensor, groups: int, stride: tuple[int, int],
                 dilation: tuple[int, int], grid: tuple[int, int]):
        c_out, c_in_g, kh, kw = weight.shape
        self.c_out, self.groups = c_out, groups
        self.c_out_g = c_out // groups
        s1, s2 = stride
        off1 = [a * dilation[0] for a in range(kh)]
        off2 = [b * dilation[1] for b in range(kw)]
        # polyphase tap (a', b') and phase (p, q) of each original tap: a d1 = a' s1 + p
        ap1 = sorted({o // s1 for o in off1})
        ap2 = sorted({o // s2 for o in off2})
        # phases that occur (a phase no tap uses gives an all-zero column: dropped)
        ph1 = sorted({o % s1 for o in off1})
        ph2 = sorted({o % s2 for o in off2})
        self.a_idx = [ap1.index(o // s1) for o in off1]
        self.b_idx = [ap2.index(o // s2) for o in off2]
        self.p_of = [ph1.index(o % s1) for o in off1]
        self.q_of = [ph2.index(o % s2) for o in off2]
        self.ap1, self.ap2 = ap1, ap2
        self.shape = (c_out, c_in_g, len(ph1), len(ph2), len(ap1), len(ap2))
        self.rows = c_in_g * len(ph1) * len(ph2)  # columns of K_hat(ω) (per group)
        self.taps = len(ap1) * len(ap2)
        # circular grid of the polyphase components: >= ceil(n / s) (no wrap-around for the
        # valid outputs) and >= the polyphase kernel extent
        self.m1 = max(-(-grid[0] // s1), ap1[-1] + 1)
        self.m2 = max(-(-grid[1] // s2), ap2[-1] + 1)
        self.nfreq = self.m1 * (self.m2 // 2 + 1)  # real kernel: conjugate half suffices
        self.small, self.big = sorted((self.c_out_g, self.rows))

    def flops(self) -> float:
        """Real floating-point operations of the whole computation (an honest estimate)."""
        per_freq = (4.0 * self.c_out * self.rows * self.taps  # two real matmuls (re, im)
                    + 60.0 * self.taps  # integer phases, cos and sin
                    + self.groups * (8.0 * self.small ** 2 * self.big  # complex Gram
                                     # Hermitian eigenvalues (the worst case; Cholesky
                                     # certification usually costs about a quarter)
                                     + 11.0 * self.small ** 3
                                     + 4.0 * self.small * self.big))  # Frobenius norms
        return self.nfreq * per_freq

    def poly_weight(self, weight: Tensor) -> Tensor:
        """W_poly as (c_out, c_in_g * n_phases, taps): W[o, c, a, b] at column (c, p, q) and
        tap (a', b')."""
        kh, kw = weight.shape[2], weight.shape[3]
        if self.shape[2:] == (1, 1, kh, kw):
            # one phase, taps in place (stride 1, or offsets all multiples of the strides with
            # every polyphase tap used): W_poly is the kernel itself, entry for entry (MNIST's
            # 5x5 kernels: one copy instead of 25 small ones, 141 -> ~10 us a layer)
            return weight.reshape(self.c_out, self.rows, self.taps).clone(
                memory_format=torch.contiguous_format)
        wp = weight.new_zeros(self.shape)
        for a in range(kh):
            for b in range(kw):
                wp[:, :, self.p_of[a], self.q_of[b], self.a_idx[a], self.b_idx[b]] = \
                    weight[:, :, a, b]
        return wp.reshape(self.c_out, self.rows, self.taps)


def _gram_real(x: Tensor, y: Tensor) -> Tensor:
    """x x^T + y y^T for batches x, y of (n, k) matrices, one inner product of length 2k per
    entry (x x^T, then y y^T accumulated onto it). From n = ``_SYM_BLOCK_N`` only the lower
    2 x 2 block triangle is computed and its transpose copied above (3/4 of the products,
    measured 20 % faster at n = 192-256; slower for small n)."""
    n = x.shape[-2]
    if n < _SYM_BLOCK_N:
        return torch.baddbmm(x @ x.mT, y, y.mT)
    h = n // 2
    re = x.new_empty(x.shape[0], n, n)
    for (i0, i1), (j0, j1) in (((0, h), (0, h)), ((h, n), (0, h)), ((h, n), (h, n))):
        blk = re[:, i0:i1, j0:j1]
        torch.bmm(x[:, i0:i1], x[:, j0:j1].mT, out=blk)
        blk.baddbmm_(y[:, i0:i1], y[:, j0:j1].mT)
    re[:, :h, h:] = re[:, h:, :h].mT
    return re


def _max_freq_norm(plan: _Plan, weight: Tensor, chunk_bytes: int,
                   use_cholesky: bool | None = None,
                   top: list[tuple[float, int, int]] | None = None) -> float:
    """Certified upper bound on max over the frequencies ω of the plan's grid of
    ||K_poly_hat(ω)||_2 (all groups), for a finite, non-zero ``weight``.

    K_hat(ω)[o, r] = Σ_t W_poly[o, r, t] exp(-2πi <t, ω / M>) is formed directly for a chunk
    of frequencies at a time (two real matrix products with the cos / sin tables), then the
    Gram matrix Ĝ(ω) of the smaller side (three real products). Only the maximum over ω of
    λmax(Ĝ(ω)) matters, so most frequencies are merely certified to lie below a common
    level μ by one batched Cholesky factorisation of μ I - Ĝ(ω) (:func:`_certify_chunk`,
    :func:`_cholesky_upper`, about 4-5x cheaper than ``eigvalsh`` at n = 256); the level is
    the largest exact top eigenvalue found so far (times 1 + 1e-12), and the frequencies
    that fail the factorisation get their top eigenvalue from ``eigvalsh``, whose value is in
    turn proven by a factorisation at a level just above it (:func:`_eig_certified`). Rounding
    is accounted for explicitly (comments below and in :func:`_cholesky_upper`).

    Args:
        plan: the polyphase layout.
        weight: the kernel (c_out, c_in / groups, kh, kw), finite and not all zero.
        chunk_bytes: approximate working memory per chunk of frequencies.
        use_cholesky: certify by Cholesky (``True``) or take ``eigvalsh`` for every frequency
            (``False``, the previous method, each value proven by :func:`_eig_certified`; the
            value is then never smaller by more than the Cholesky rounding terms, ~4 n^2 u
            relative). ``None``: Cholesky when the Gram
            size is at least ``_CHOL_MIN_N``.
        top: when given, receives ``(λ̂, frequency index, group)`` of the frequency with the
            largest computed top eigenvalue (an estimate: it only locates the maximum, see
            :func:`circulant_probe`); nothing is certified about it.

    Returns:
        The bound (a float, possibly ``inf``).
    """
    dev = weight.device
    # exact power-of-two scaling: the peak weight lands in [0.5, 1) (no rounding, no overflow)
    _, expo = math.frexp(float(weight.abs().max()))
    ws = weight
    rest = -expo
    while rest:  # in steps of at most 2^±1000 so that the factor itself never overflows
        e = max(-1000, min(1000, rest))
        ws = ws * math.ldexp(1.0, e)
        rest -= e
    wp = plan.poly_weight(ws)  # (c_out, R, T)
    c_out, rows, taps = wp.shape
    g, cg = plan.groups, plan.c_out_g
    m1, m2 = plan.m1, plan.m2
    period = m1 * m2
    if period >= 2 ** 52:
        return math.inf
    # --- entrywise error of the computed K_hat (scaled units) ---------------------------
    # Phase of tap (a', b') at (k1, k2): θ = 2π m / P with the integer m = a' k1 M2 + b' k2 M1
    # reduced exactly to (-P/2, P/2], so |θ| <= π; θ̂ = fl(m * fl(2π / P)) carries three
    # relative errors <= u (π's representation, the division, the product), so
    # |θ̂ - θ| <= 3.01 u π < 9.5 u. cos / sin are within 1 ulp (SLEEF u10 on CPU) or 2 ulp
    # (CUDA) of the true value, i.e. within 8 u absolute (we budget 8 ulp, ulp <= u on
    # [-1, 1]). Hence each computed cos / sin is within η = 18 u of the exact one. A real
    # matrix product of length T in any summation order has error <= γ_T Σ|w_t||ĉ_t|
    # (Higham Thm 3.5), so the real and the imaginary part of an entry are each within
    # (γ_T (1 + η) + η) S of the exact value, S = Σ_t |W_poly[o, r, t]|, and the complex
    # entry within sqrt(2) times that. ||ΔK||_2 <= || |ΔK| ||_2 <= ||E||_2 <= ||E||_F for
    # the entrywise bound E; it does not depend on ω, so one number per group suffices.
    eta = 18.0 * _U
    coef = math.sqrt(2.0) * (gamma(taps) * (1.0 + eta) + eta) * (1.0 + 4.0 * _U)
    s_abs = wp.abs().sum(-1)  # (c_out, R), each a sum of <= T non-negative terms
    e_f2 = (s_abs * s_abs).reshape(g, cg * rows).sum(-1)
    # 2^-1000 per entry dominates any underflow (<= 2^-1074 per operation) in the products
    err_k = (coef * (1.0 + gamma(taps + cg * rows + 2)) * e_f2.sqrt()
             + 2.0 ** -1000 * math.sqrt(cg * rows))  # (g,), >= ||ΔK(ω)||_2 for every ω
    # --- Gram matrix and eigensolver (as exact_norm) -------------------------------------
    # Ĝ = fl(K̂^H K̂) with K̂ = A + iB: the real part A^T A + B^T B is one real inner product
    # of length 2k (k = the larger side; A^T A then B^T B accumulated onto it, any order;
    # with _gram_real's blocks an entry above the diagonal is the computed entry of the
    # mirrored position, whose exact value is the same),
    # error <= γ_{2k} Σ_l (|a_l a'_l| + |b_l b'_l|); the imaginary part C - C^T, C = A^T B, is
    # the difference of two inner products of length k, error
    # <= γ_{k+1} Σ_l (|a_l b'_l| + |b_l a'_l|). Both sums are <= Σ_l |K̂_l| |K̂'_l|, hence
    # |Ĝ - G| <= sqrt(2) γ_{2k} |K̂|^H |K̂| entrywise and ||Ĝ - G||_2 <= sqrt(2) γ_{2k}
    # ||K̂||_F^2 <= γf (we take γ_{2k+2}, and cover the rounding of the Frobenius norm).
    # The eigensolver's λ̂ gives the value t + γf, t = (λ̂ + c n u γf) / (1 - c n u) (it was
    # derived from an assumed backward error |λ̂ - λmax(Ĝ)| <= c n u ||Ĝ||); _eig_certified
    # proves λmax(Ĝ) <= t by a Cholesky factorisation of fl(μ I - Ĝ) at a level μ chosen for
    # it (else returns a certificate's own value or ||K̂||_F^2), so that λmax(G) <= t + γf
    # (Weyl) rests on no assumption about the eigensolver. Underflow in Ĝ adds at most
    # n k 2^-1074 to ||Ĝ - G||, covered by the 2^-1000 term. eigvalsh (and Cholesky) read one
    # triangle (and the real part of the diagonal); every entry of that Hermitian matrix is an
    # entry of Ĝ or its conjugate, so the same entrywise bound holds for it. A frequency
    # certified by Cholesky at level μ instead has λmax(Ĝ) <= U(μ) (_cholesky_upper), and
    # λmax(G) <= U(μ) + γf in the same role.
    n, k = plan.small, plan.big
    gam = math.sqrt(2.0) * gamma(2 * k + 2) * (1.0 + gamma(2 * n * k + 2))
    cnu = _EIG_C * n * _U
    # ||K̂||_F^2 (the last resort of _eig_certified): each diagonal entry of the real part is a
    # computed sum of 2k squares, d_i <= d̂_i / (1 - γ_{2k}) (+ 2k 2^-1022 of underflow), and
    # frob2 a computed sum of n of them, so ||K̂||_F^2 <= frob2 / (1 - γ_{2nk+2}) +
    # n k 2^-999; 1 + 8 u covers the five roundings of its evaluation
    fro_c = (1.0 + 8.0 * _U) / (1.0 - gamma(2 * n * k + 2))
    ap1 = torch.tensor(plan.ap1, dtype=torch.int64, device=dev)
    ap2 = torch.tensor(plan.ap2, dtype=torch.int64, device=dev)
    ta = ap1.repeat_interleave(len(plan.ap2))  # (T,) row index of tap t (a' major)
    tb = ap2.repeat(len(plan.ap1))
    step = 2.0 * math.pi / period
    half_cols = m2 // 2 + 1
    per_freq_bytes = 8 * (6 * c_out * rows + 12 * g * n * n + 6 * taps) + 1
    chunk = max(1, min(plan.nfreq, chunk_bytes // per_freq_bytes))
    wmat_t = wp.reshape(c_out * rows, taps).T  # (T, c_out * R)
    if use_cholesky is None:
        use_cholesky = n >= _CHOL_MIN_N
    best = torch.zeros(g, dtype=torch.float64, device=dev)
    levels = torch.zeros(g, dtype=torch.float64, device=dev)  # Cholesky level μ per group
    for f0 in range(0, plan.nfreq, chunk):
        fidx = torch.arange(f0, min(f0 + chunk, plan.nfreq), dtype=torch.int64, device=dev)
        k1, k2 = fidx // half_cols, fidx % half_cols
        # exact integers, every intermediate below P < 2^52
        m = ((k1[:, None] * ta[None, :]) % m1 * m2 + (k2[:, None] * tb[None, :]) % m2 * m1)
        m = m % period
        m = torch.where(2 * m > period, m - period, m)
        theta = m.to(torch.float64) * step  # (F, T)
        # real and imaginary parts of K_hat, frequency-major: (F * g, c_out_g, R); the sign
        # of the imaginary part (K_hat(ω) or its conjugate K_hat(-ω)) does not matter
        kr = (torch.cos(theta) @ wmat_t).reshape(-1, cg, rows)
        ki = (torch.sin(theta) @ wmat_t).reshape(-1, cg, rows)
        # Gram matrix of the smaller side from three real products: with K = A + iB,
        # K^H K = (A^T A + B^T B) + i (C - C^T), C = A^T B (likewise K K^H with C = A B^T,
        # the conjugate of K K^H: the same eigenvalues)
        x, y = (kr.mT, ki.mT) if rows <= cg else (kr, ki)  # (F g, n, k) views
        re = _gram_real(x, y)
        c = x @ y.mT
        # ||K̂||_F^2 as the trace of the real part: the same 2 n k squares, summed in another
        # order (the factor 1 + γ_{2nk+2} in gam covers any order)
        frob2 = re.diagonal(dim1=-2, dim2=-1).sum(-1)
        gf = gam * frob2 + n * k * 2.0 ** -1000
        fro_up = frob2 * fro_c + n * k * 2.0 ** -999  # >= ||K̂||_F^2 >= λmax(G)
        # -Ĝ (the Cholesky factorisations start from it) written straight into one complex
        # tensor: real part -(A^T A + B^T B), imaginary part C^T - C = -(C - C^T), both exact
        # negations of Ĝ's parts (rounding to nearest is symmetric)
        neg = torch.empty(re.shape, dtype=re.dtype.to_complex(), device=dev)
        parts = torch.view_as_real(neg)
        torch.neg(re, out=parts[..., 0])
        torch.sub(c.mT, c, out=parts[..., 1])
        del re, c, parts
        tops: list[tuple[float, int]] | None = [] if top is not None else None
        if use_cholesky:
            grp = torch.arange(neg.shape[0], device=dev) % g
            lam_up = _certify_chunk(neg, gf, fro_up, grp, levels, cnu, tops)
        else:
            lam, lam_up = _eig_certified(neg.neg_(), gf, fro_up, cnu)
            if tops is not None:
                at = int(torch.argmax(lam))
                tops.append((float(lam[at]), at))
        if top is not None and tops:
            lam_t, at = max(tops)
            if not top or lam_t > top[0][0]:
                top[:] = [(lam_t, f0 + at // g, at % g)]
        best = torch.maximum(best, lam_up.reshape(-1, g).amax(0))
    bound = float((best.sqrt() * (1.0 + 2.0 * _U) + err_k).max())
    # one ulp up: relative margins vanish on the subnormal grid
    return math.nextafter(math.ldexp(bound, expo), math.inf)


def circulant_norm_bound(op: ConvOp, budget_flops: float = 5e10,
                         chunk_bytes: int = 64 * 2 ** 20) -> float | None:
    """Certified upper bound on ``||A||_2`` of a zero-padded 2-D convolution from its kernel
    (see :func:`circulant_probe`, which computes it together with a test vector)."""
    return circulant_probe(op, budget_flops, chunk_bytes, probe=False)[0]


def circulant_probe(op: ConvOp, budget_flops: float = 5e10,
                    chunk_bytes: int = 64 * 2 ** 20, *,
                    probe: bool = True, wave: tuple[int, Tensor] | None = None
                    ) -> tuple[float | None, Tensor | None]:
    """Certified upper bound on ||A||_2 of a zero-padded 2-D convolution from its kernel, by a
    polyphase (space-to-depth) circulant embedding.

    The circulant embedding of a stride-1 convolution is that of Sedghi, Gupta & Long,
    *The Singular Values of Convolutional Layers* (ICLR 2019); the polyphase rewriting of a
    strided convolution as a stride-1 convolution of the input's s1 * s2 phase components is
    the standard multirate identity (Vaidyanathan, *Multirate Systems and Filter Banks*,
    1993, ch. 4; "space-to-depth").

    Proof. Let x_pad be the input zero-padded to the N1 x N2 grid (Nk = input size + 2 pk);
    padding is an isometry. Extend it with zeros to U1 s1 x U2 s2, Uk = ceil(Nk / sk) (an
    isometry), and split it into the s1 s2 phase components
    x^(p,q)[c, u, v] = x_pad[c, u s1 + p, v s2 + q] (a permutation of coordinates, an
    isometry). Write each dilated tap offset as a d1 = a' s1 + p, b d2 = b' s2 + q. Then
    y[o, i, j] = Σ_{c,a,b} W[o,c,a,b] x_pad[c, i s1 + a d1, j s2 + b d2]
               = Σ_{(c,p,q), a', b'} W_poly[o, (c,p,q), a', b'] x^(p,q)[c, i + a', j + b'],
    a stride-1 "valid" convolution of the phase components with the polyphase kernel. For a
    valid output, i s1 + a d1 <= N1 - 1, hence i + a' <= (N1 - 1) / s1 < U1: every index read
    lies in [0, U1). Embed the components (with zeros) in an M1 x M2 grid, Mk >= Uk and
    Mk >= the polyphase kernel extent; the circular stride-1 convolution C on that grid
    agrees with the convolution above on every valid output (no index wraps around), so
    A = P C E with E an isometric embedding and P a selection of rows, and
    ||A|| <= ||C||. C is block-diagonalised by the 2-D DFT: ||C|| = max over the M1 M2
    frequencies ω of ||K̂(ω)||_2, K̂(ω) the (c_out x c_in s1 s2) matrix of DFTs of the
    polyphase taps; for a real kernel K̂(-ω) is the conjugate of K̂(ω), so half the
    frequencies suffice. Grouped convolutions are block diagonal after a permutation: the
    maximum runs over the groups too. ``out_scale`` multiplies rows: ||diag(s) A|| <=
    max|s| ||A||. For stride 1 the construction is the plain circulant embedding on the
    N1 x N2 grid. When a stride does not divide Nk the polyphase grid (s M) differs from the
    stride-1 grid (N), so the plain stride-1 bound is computed too (if the budget allows) and
    the smaller of the two is returned; when the strides divide N the polyphase bound is
    never larger (C is then a row selection of the stride-1 circular convolution).
    If kernel size == stride, no padding and no dilation, the polyphase kernel is a single
    tap, A is block diagonal with copies of W_poly and the bound is exact.

    Rounding is accounted for explicitly: the error of the computed K̂ entries, the rounding
    of the Gram matrices and the backward error of a Cholesky factorisation (Higham
    Thm 10.3) that proves each frequency's bound, at a common level or, for the frequencies
    whose top eigenvalue comes from ``eigvalsh``, at a level just above it (the eigensolver
    only steers: its accuracy is not assumed), are added (see :func:`_max_freq_norm`,
    :func:`_eig_certified` and :func:`_cholesky_upper`), so the result is a certified upper
    bound, not an estimate.

    Args:
        op: the convolution.
        budget_flops: the most real floating-point operations to spend; above it (estimated
            before any work) ``None`` is returned. The default, 5e10, is about 2 s on one
            CPU core (every AlexNet convolution fits; the wide VGG-16 layers do not).
        chunk_bytes: approximate working memory; frequencies are processed in chunks of
            this size (memory does not grow with the input size beyond the chunk).
        probe: also return a test vector (below).
        wave: ``(frequency, vector)`` of a plane wave already built on the same grid (e.g.
            :class:`CirculantHint`'s): returned as the test vector when that frequency is the
            one of the largest top eigenvalue (no second plane wave is built).

    Returns:
        ``(bound, vector)``: the bound, or ``None`` when the computation would exceed
        ``budget_flops``; and, with ``probe`` for an ungrouped stride-1, dilation-1
        convolution, a vector of the input space (flat, float64) that ``A`` nearly maps with
        the gain of the circulant's largest frequency: the real part of the plane wave
        ``v exp(i <ω, p>)`` at the frequency ω of the largest top eigenvalue, ``v`` the top
        right singular vector of the kernel's DFT there, under the first sine mode of the
        input grid (the boundary loses only second-order gain). Its Rayleigh quotient is a
        lower bound of ``||A||`` that :func:`lipbound.spectral.spectral_upper` compares with
        the bound before it runs Lanczos. ``None`` otherwise.
    """
    if op.weight.numel() == 0 or op.out_dim == 0 or op.in_dim == 0:
        return 0.0, None
    h, w = op.in_shape[-2:]
    grid = (h + 2 * op.padding[0], w + 2 * op.padding[1])
    poly = _Plan(op.weight, op.groups, op.stride, op.dilation, grid)
    plans = [poly]
    if grid[0] % op.stride[0] or grid[1] % op.stride[1]:
        plans.append(_Plan(op.weight, op.groups, (1, 1), op.dilation, grid))
    if poly.flops() > budget_flops:
        return None, None
    peak = float(op.weight.abs().max())
    if not math.isfinite(peak):
        return math.inf, None
    if peak == 0.0:
        return 0.0, None
    want = (probe and op.groups == 1 and tuple(op.stride) == (1, 1)
            and tuple(op.dilation) == (1, 1) and len(plans) == 1)
    top: list[tuple[float, int, int]] | None = [] if want else None
    spent = 0.0
    val = math.inf
    for plan in plans:
        spent += plan.flops()
        if spent > budget_flops:
            break
        val = min(val, _max_freq_norm(plan, op.weight, chunk_bytes, top=top))
    if op.out_scale is not None:
        val *= float(op.out_scale.abs().max())
    vec = None
    if top:
        fidx = top[0][1]
        vec = wave[1] if wave is not None and wave[0] == fidx else _plane_wave(op, poly, fidx)
    return math.nextafter(val * (1.0 + _MARGIN), math.inf), vec


class CirculantHint(NamedTuple):
    """What :func:`circulant_hint` found (nothing certified)."""

    c_lo: float
    """A lower estimate of the circulant bound: ``||K(ω)||_2`` at the best candidate."""
    vector: Tensor
    """The windowed plane wave at that frequency (flat input space)."""
    frequency: int
    """Its index on the circulant grid (the order :func:`circulant_probe` uses)."""


def circulant_hint(op: ConvOp, candidates: int = 4, max_side: int = 128
                   ) -> CirculantHint | None:
    """Cheap estimates (nothing certified) that predict whether the circulant bound of an
    ungrouped stride-1, dilation-1 convolution will beat a Lanczos run, before either is
    computed: ``(c_lo, vector, frequency)`` (:class:`CirculantHint`).

    ``c_lo`` is the largest ``||K(ω)||_2`` (exact singular values, ``out_scale`` included)
    over the ``candidates`` frequencies of the circulant grid with the largest
    ``||K(ω)||_F``: at most the circulant bound (which is at least the maximum over all
    frequencies). ``vector`` is the windowed plane wave of the best of them
    (:func:`_plane_wave`), a test vector for a lower estimate of ``||A||``, and ``frequency``
    its index on the circulant grid (:func:`circulant_probe` takes both as ``wave``). ``None`` for
    other convolutions, all-zero or non-finite kernels, or when the smaller side of ``K(ω)``
    exceeds ``max_side`` (the singular values would cost too much)."""
    w = op.weight
    c_out, c_in, kh, kw = w.shape
    if not (op.groups == 1 and tuple(op.stride) == (1, 1) and tuple(op.dilation) == (1, 1)):
        return None
    if min(c_out, c_in) > max_side or w.numel() == 0:
        return None
    peak = float(w.abs().max())
    if not 0.0 < peak < math.inf:
        return None
    h, wd = op.in_shape[-2:]
    plan = _Plan(w, 1, (1, 1), (1, 1), (h + 2 * op.padding[0], wd + 2 * op.padding[1]))
    half = plan.m2 // 2 + 1
    dev = w.device
    f = torch.arange(plan.nfreq, device=dev)
    k1 = (f // half).to(torch.float64)
    k2 = (f % half).to(torch.float64)
    a = torch.arange(kh, dtype=torch.float64, device=dev).repeat_interleave(kw)
    b = torch.arange(kw, dtype=torch.float64, device=dev).repeat(kh)
    theta = 2.0 * math.pi * (torch.outer(k1, a) / plan.m1 + torch.outer(k2, b) / plan.m2)
    wm = (w / peak).reshape(c_out * c_in, kh * kw).T  # (T, c_out c_in), scaled
    # ||K(ω)||_F^2 = c^T G c + s^T G s with the taps' Gram matrix G = Wm Wm^T (T x T) and
    # c, s the cosines and sines of the phases: T^2 per frequency instead of T c_out c_in
    gram = wm @ wm.T
    cos, sin = torch.cos(theta), torch.sin(theta)
    fro = ((cos @ gram) * cos).sum(1) + ((sin @ gram) * sin).sum(1)
    idx = torch.topk(fro, min(candidates, plan.nfreq)).indices
    # K(ω) = Σ_t W[:, :, t] exp(i <ω, t>) at the candidates (the convention of _plane_wave)
    mats = torch.complex(cos[idx] @ wm, sin[idx] @ wm).reshape(-1, c_out, c_in)
    _, sv, vh = torch.linalg.svd(mats)
    best = int(torch.argmax(sv[:, 0]))
    c_lo = float(sv[best, 0]) * peak
    if op.out_scale is not None:
        c_lo *= float(op.out_scale.abs().max())
    fidx = int(idx[best])
    vec = _plane_wave(op, plan, fidx, vh[best, 0].conj())
    if vec is None or not math.isfinite(c_lo):
        return None
    return CirculantHint(c_lo, vec, fidx)


def _plane_wave(op: ConvOp, plan: _Plan, fidx: int, v: Tensor | None = None) -> Tensor | None:
    """The test vector of :func:`circulant_probe` for the frequency of index ``fidx`` on a
    stride-1 plan (``k1 = fidx // (m2 // 2 + 1)``, ``k2 = fidx % (m2 // 2 + 1)``); ``v``, the
    top right singular vector of ``K(ω)`` below, when the caller has it already.

    ``conv2d`` is a cross-correlation: the plane wave ``x[c, p] = v_c exp(i <ω, p>)`` is
    mapped, away from the border, to ``exp(i <ω, p>) K(ω) v`` with
    ``K(ω) = Σ_t W[:, :, t] exp(i <ω, t>)``, so ``v`` is the top right singular vector of
    ``K(ω)``. The real part of ``z e^{-iα}``, ``α = arg(Σ z²) / 2``, keeps at least half of
    ``||z||²`` (all of it when ``z`` is real up to a phase)."""
    w = op.weight
    c_out, c_in, kh, kw = w.shape
    h, wd = op.in_shape[-2:]
    half = plan.m2 // 2 + 1
    k1, k2 = divmod(int(fidx), half)
    dev = w.device
    if v is None:
        a = torch.arange(kh, dtype=torch.float64, device=dev)
        b = torch.arange(kw, dtype=torch.float64, device=dev)
        ph = 2.0 * math.pi * (k1 * a[:, None] / plan.m1 + k2 * b[None, :] / plan.m2)
        kmat = torch.complex((w * torch.cos(ph)).sum((2, 3)), (w * torch.sin(ph)).sum((2, 3)))
        v = torch.linalg.svd(kmat)[2][0].conj()  # (c_in,)
    i = torch.arange(h, dtype=torch.float64, device=dev)
    j = torch.arange(wd, dtype=torch.float64, device=dev)
    phi = 2.0 * math.pi * (k1 * i[:, None] / plan.m1 + k2 * j[None, :] / plan.m2)
    window = (torch.sin(math.pi * (i + 1) / (h + 1))[:, None]
              * torch.sin(math.pi * (j + 1) / (wd + 1))[None, :])
    z = v[:, None, None] * (torch.polar(window, phi))[None]  # (c_in, h, w)
    alpha = float(torch.angle((z * z).sum())) / 2.0
    x = (z * complex(math.cos(alpha), -math.sin(alpha))).real.reshape(-1)
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) == 0.0:
        return None
    return x.contiguous()
