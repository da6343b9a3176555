"""Transposed 2-D convolutions of many rows at once, in chunks that stay in cache.

torch's float64 CPU ``conv_transpose2d`` (``slow_conv_transpose2d``) unfolds its input for
the whole batch (``C_in kh kw`` columns per input pixel: ``kh kw`` times its output) and
multiplies one batch element at a time. The tight bound (:mod:`lipbound.tight`) pulls
hundreds of rows back through a convolution at once; there :func:`conv_transpose2d_rows`
forms the columns of a few rows at a time, ``W^T Y`` for the chunk (one matrix product),
and adds them into the output with :func:`torch.nn.functional.fold` (column to image). Each
output entry is then a sum of the same ``C_out / groups`` times ``kh kw`` (at most) products
as torch's, summed in two stages (the matrix product over the channels, then the fold over the
taps), within ``γ_n`` of the exact value (``n`` =
:meth:`lipbound.ops.conv.ConvOp.inner_length_t`, any order; Higham, *Accuracy and
Stability of Numerical Algorithms*, §3.1); on the sizes measured it gave torch's bits.

:func:`chunk_rows` decides (from shapes, the device and the thread count alone, so that
:mod:`lipbound.tight_memory` can follow it before anything is formed) where the chunks run:
float64 on the CPU at one thread, where measured faster or where the whole batch's columns
would be large (they are then never formed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 1 << 20
"""Bytes of one chunk's columns at one thread. Measured on session 21's Intel Xeon (2 MB L2
per core; float64, one thread, ms for torch / chunks of 0.25, 0.5, 1, 2 MiB): 500 rows of
32 x 10 x 10 through 32 -> 32 3x3 86.5 / 56.1, 47.1, 43.4, 42.3; 330 x 32 x 12 x 12 78.7 /
60.4, 53.1, 46.5, 49.0; 1077 x 32 x 8 x 8 112 / 81, 70, 74, 68; 330 x 64 x 4 x 4 -> 32 7.4 /
6.9, 6.2, 5.8, 5.8; 200 x 16 x 9 x 9 -> 6 5x5 7.1 / 6.3, 6.2, 5.7, 5.3."""

WHOLE_BYTES = 32 << 20
"""Whole-batch columns above which the chunks run (one thread) whatever the channels and
kernel (the columns are then never formed whole)."""

MIN_ROWS = 16
"""Fewest rows for the chunks at one thread below :data:`WHOLE_BYTES` (4 x 64 x 12 x 12 ->
32: 0.58 ms against torch's 0.53; 2 x 32 x 28 x 28: 1.13 against 1.02)."""

MIN_CHANNELS = 4
"""Fewest output channels per group (``C_in / groups`` of the forward convolution) for the
chunks at one thread below :data:`WHOLE_BYTES` (330 x 32 x 14 x 14 -> 3: 7.2 ms against
torch's 6.5)."""


def chunk_rows(rows: int, in_hw: tuple[int, int], weight_shape: tuple[int, ...], groups: int,
               device: torch.device, dtype: torch.dtype, threads: int | None = None) -> int:
    """How many rows :func:`conv_transpose2d_rows` multiplies at once; 0 where torch's
    ``conv_transpose2d`` runs: other devices or dtypes, more than one thread (torch's loop
    over the rows runs in parallel: with two threads it was as fast as the chunks or faster,
    1500 x 32 x 12 x 12 through 32 -> 32: 213 ms against 230 ms, 160 x 32 x 10 x 10 7.7
    against 12.8, and the chunks' many small parallel regions made the whole tight bound
    10-40x slower beside another busy process), and below :data:`WHOLE_BYTES` of columns
    few rows, a 1x1 kernel, few output channels or rows of over :data:`CHUNK_BYTES`.

    Args:
        rows: the batch size.
        in_hw: ``(h, w)`` of the rows (the transposed convolution's input).
        weight_shape: ``(C_out, C_in / groups, kh, kw)`` of the forward convolution's kernel.
        groups: the convolution's groups.
        device: the rows' device.
        dtype: the rows' dtype.
        threads: torch's intra-op threads (None: ``torch.get_num_threads()``).

    Returns:
        The chunk's rows (``1 <= chunk < rows``) or 0.
    """
    if torch.device(device).type != "cpu" or dtype != torch.float64 or rows < 2:
        return 0
    _, c_in_g, kh, kw = (int(s) for s in weight_shape)
    per = groups * c_in_g * kh * kw * int(in_hw[0]) * int(in_hw[1]) * 8  # one row's columns
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads != 1:
        return 0
    if rows * per > WHOLE_BYTES:
        chunk = max(1, CHUNK_BYTES // max(per, 1))
    elif rows >= MIN_ROWS and kh * kw > 1 and c_in_g >= MIN_CHANNELS and per <= CHUNK_BYTES:
        chunk = CHUNK_BYTES // per
    else:
        return 0
    return chunk if chunk < rows else 0


def conv_transpose2d_rows(y: Tensor, weight: Tensor, stride: tuple[int, int],
                          padding: tuple[int, int] = (0, 0),
                          output_padding: tuple[int, int] = (0, 0), groups: int = 1,
                          dilation: tuple[int, int] = (1, 1), chunk: int | None = None
                          ) -> Tensor:
    """``F.conv_transpose2d(y, weight, None, stride, padding, output_padding, groups,
    dilation)``, in chunks of rows where :func:`chunk_rows` says so.

    Each chunk's columns ``W_g^T Y`` (per group ``g``: ``(C_in/groups kh kw) x (C_out/groups)``
    times the chunk's ``(C_out/groups) x (h w)`` per row; with groups, one product per group
    over the chunk's rows side by side, ``(C_out/groups) x (n h w)``) go through
    :func:`torch.nn.functional.fold` with the same kernel, stride, dilation and padding; an
    output padding at most the stride's (torch allows it below the stride or the dilation)
    is the fold's larger output. Each entry sums the same products as torch's.

    Args:
        y: rows ``(R, C_out, h, w)``.
        weight: the forward convolution's kernel ``(C_out, C_in / groups, kh, kw)``.
        stride: the convolution's stride.
        padding: the convolution's padding (cut from the full transposed image).
        output_padding: extra rows / columns at the bottom and right of the output.
        groups: the convolution's groups.
        dilation: the convolution's dilation.
        chunk: rows per chunk (None: :func:`chunk_rows`; 0: torch's ``conv_transpose2d``).

    Returns:
        ``(R, C_in, H, W)`` with ``H = (h - 1) s - 2 p + d (kh - 1) + 1 + output_padding``.
    """
    r, c_out, h, w = y.shape
    _, c_in_g, kh, kw = weight.shape
    (s1, s2), (p1, p2), (o1, o2), (d1, d2) = stride, padding, output_padding, dilation
    if chunk is None:
        chunk = chunk_rows(r, (h, w), tuple(weight.shape), groups, y.device, y.dtype)
    if not chunk or chunk >= r or o1 >= s1 or o2 >= s2 or weight.dtype != y.dtype:
        return F.conv_transpose2d(y, weight, None, stride, padding, output_padding, groups,
                                  dilation)
    out_h = (h - 1) * s1 - 2 * p1 + d1 * (kh - 1) + 1 + o1
    out_w = (w - 1) * s2 - 2 * p2 + d2 * (kw - 1) + 1 + o2
    co_g = c_out // groups
    k = c_in_g * kh * kw
    # (groups, C_in/groups kh kw, C_out/groups): each group's kernel as a matrix, transposed
    wt = weight.reshape(groups, co_g, k).transpose(1, 2)
    out = y.new_empty(r, groups * c_in_g, out_h, out_w)
    for i in range(0, r, chunk):
        yc = y[i:i + chunk]
        n = yc.shape[0]
        if groups == 1:  # (one product for the chunk: (k, C_out) times (n, C_out, h w))
            cols = torch.matmul(wt[0], yc.reshape(n, c_out, h * w))
        else:  # one product per group over the chunk's rows side by side (a batched product
            # against (n, groups, C_out/groups, h w) would copy the kernel for every row)
            yg = yc.reshape(n, groups, co_g, h * w).permute(1, 2, 0, 3).reshape(
                groups, co_g, n * h * w)
            cols = torch.bmm(wt, yg).reshape(groups, k, n, h * w).permute(2, 0, 1, 3)
        out[i:i + n] = F.fold(cols.reshape(n, groups * k, h * w), (out_h, out_w), (kh, kw),
                              dilation=(d1, d2), padding=(p1, p2), stride=(s1, s2))
    return out
