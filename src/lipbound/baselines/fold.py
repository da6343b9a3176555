"""Folding affine maps into one, with every entry accurate to a stated relative error.

The rival methods take the float64 chain ``[(W_1, b_1), ..., (W_K, b_K)]`` as *the*
network, and their rounding margins are relative to the magnitudes of its entries. Building
that chain multiplies consecutive affine maps together (two ``nn.Linear`` without a ReLU in
between, a Normalize or a batch norm folded into the next layer, a conv net's pooling and
convolutions, an output map ``C`` folded into the last layer). A plain float64 product
``A @ B`` is accurate only to ``γ_k |A| |B|``: an entry whose sum cancels loses all its
digits. Example: ``C = [fl(1/3), -1]`` after ``W = [3, 1]^T`` gives ``fl(C W) = 0`` while the
exact product is ``-2^-54``; a network ``C W relu(2^100 x)`` then got the certified (even
"exact") Lipschitz constant 0 from every rival, against a true ``7.0e13``.

:func:`fold_matmul` and :func:`fold_axpy` compute the same products but return every entry
within ``max(REL, 64 (k + 2) 2^-52) |exact| + ABS`` of the exact real value (``REL =
2^-44``, ``ABS = 2^-1000``, ``k`` the inner dimension): an entry whose float64 error bound
``(k + 2) 2^-52 (|A| |B|)_{ij} + k 2^-1074`` could exceed ``REL |p| + ABS`` and that cancels
(``|p| < (|A| |B|)_{ij} / 64``) is recomputed exactly (integer arithmetic on the floats'
exact values) and rounded once, to nearest. So cancellation no longer loses digits: every
entry carries a relative error of the order of the rounding that the baselines' own
margins (``1e-12 n`` relative to absolute-value magnitudes, ``1e-9`` on spectral norms)
already cover for the products they form themselves.

Limitation (documented, not fixed): without cancellation an entry's worst-case error is
``64 (k + 2) 2^-52`` relative, which for an inner dimension ``k`` of several thousand and an
adversarial sign pattern can exceed AutoLip's ``1e-9`` relative margin on a spectral norm
(the realistic error is ``~sqrt(k) 2^-53``); see docs/guarantees.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

__all__ = ["fold_matmul", "fold_axpy", "exact_dot", "REL", "ABS", "CANCEL"]

#: relative accuracy of every entry of a fold
REL = 2.0 ** -44
#: absolute accuracy below which an entry is not recomputed (underflow level)
ABS = 2.0 ** -1000
#: an entry is recomputed only when it cancels: ``|p| < (|A| |B|)_{ij} / CANCEL``
CANCEL = 64.0
_U2 = 2.0 ** -52  # twice the unit roundoff: slack for the rounding of |A| |B| itself
_TINY = 2.0 ** -1074


def exact_dot(xs: Any, ys: Any, add: float = 0.0) -> float:
    """``sum(x * y) + add`` computed exactly and rounded once to the nearest float64."""
    num, exp = 0, 0  # the exact value is num * 2**exp
    first = True
    for x, y in ((float(add), 1.0), *zip(xs, ys, strict=True)):
        if x == 0.0 or y == 0.0:
            continue
        nx, dx = float(x).as_integer_ratio()
        ny, dy = float(y).as_integer_ratio()
        n, e = nx * ny, -((dx * dy).bit_length() - 1)  # denominators are powers of two
        if first:
            num, exp, first = n, e, False
        elif e < exp:
            num, exp = (num << (exp - e)) + n, e
        else:
            num += n << (e - exp)
    if num == 0:
        return 0.0
    try:
        if exp >= 0:
            return float(num << exp)  # int -> float rounds to nearest
        return num / (1 << -exp)  # int / int is correctly rounded
    except OverflowError:  # beyond float64: the callers' range checks refuse it
        return math.copysign(math.inf, num)


def _bad(p: np.ndarray, mag: np.ndarray, k: int) -> np.ndarray:
    """Entries whose float64 error bound ``(k + 2) 2^-52 mag + k 2^-1074`` might exceed
    ``REL |p| + ABS`` and that cancel (``|p| < mag / 64``)."""
    ap = np.abs(p)
    bound = mag * ((k + 2) * _U2) + k * _TINY
    return (bound > REL * ap + ABS) & (CANCEL * ap < mag)


def _row(a: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero (indices, values) of row ``i`` of a dense array or a CSR matrix."""
    if sp.issparse(a):
        lo, hi = a.indptr[i], a.indptr[i + 1]
        return a.indices[lo:hi], a.data[lo:hi]
    idx = np.flatnonzero(a[i])
    return idx, a[i, idx]


def _col_values(b: Any, j: int, idx: np.ndarray) -> np.ndarray:
    """``b[idx, j]`` of a dense array or a CSC matrix."""
    if sp.issparse(b):
        lo, hi = b.indptr[j], b.indptr[j + 1]
        col = np.zeros(b.shape[0])
        col[b.indices[lo:hi]] = b.data[lo:hi]
        return col[idx]
    return b[idx, j]


def fold_matmul(a: Any, b: Any, add: np.ndarray | None = None) -> Any:
    """``a @ b + add``, every entry within ``max(REL, 64 (k + 2) 2^-52) |exact| + ABS`` of the
    exact value (module docstring).

    Args:
        a: dense 2-D array or scipy sparse matrix ``(m, k)``.
        b: dense 1-D ``(k,)`` or 2-D ``(k, n)`` array, or a scipy sparse matrix.
        add: optional dense array of the result's shape (a bias).

    Returns:
        A dense array, or a CSR matrix when ``a`` and ``b`` are both sparse (``add`` must
        then be None).
    """
    both_sparse = sp.issparse(a) and sp.issparse(b)
    if both_sparse and add is not None:
        raise ValueError("fold_matmul: add needs a dense product")
    vec = not sp.issparse(b) and np.ndim(b) == 1
    p = a @ b
    mag = abs(a) @ abs(b)
    k = a.shape[1] + (add is not None)
    if both_sparse:
        p = sp.csr_matrix(p)
        mag = sp.coo_matrix(mag)
        rows, cols = mag.row, mag.col
        pv = np.asarray(p[rows, cols]).ravel() if rows.size else np.zeros(0)
        bad = np.flatnonzero(_bad(pv, np.asarray(mag.data), k))
        if bad.size == 0:
            return p
        a_r, b_c = sp.csr_matrix(a), sp.csc_matrix(b)
        p = p.tolil()
        for t in bad:
            i, j = int(rows[t]), int(cols[t])
            idx, xs = _row(a_r, i)
            p[i, j] = exact_dot(xs, _col_values(b_c, j, idx))
        logger.debug("fold_matmul: %d of %d entries recomputed exactly", bad.size, rows.size)
        return sp.csr_matrix(p)
    p = np.asarray(p, dtype=np.float64)
    mag = np.asarray(mag.toarray() if sp.issparse(mag) else mag, dtype=np.float64)
    if add is not None:
        add = np.asarray(add, dtype=np.float64)
        p = p + add
        mag = mag + np.abs(add)
    bad = _bad(p, mag, k)
    if not bad.any():
        return p
    a_r = sp.csr_matrix(a) if sp.issparse(a) else a
    b2 = (sp.csc_matrix(b) if sp.issparse(b) else
          (np.asarray(b)[:, None] if vec else np.asarray(b)))
    p2 = p[:, None] if vec else p
    add2 = None if add is None else (add[:, None] if vec else add)
    for i, j in zip(*np.nonzero(bad[:, None] if vec else bad), strict=True):
        idx, xs = _row(a_r, int(i))
        extra = 0.0 if add2 is None else float(add2[i, j])
        p2[i, j] = exact_dot(xs, _col_values(b2, int(j), idx), extra)
    logger.debug("fold_matmul: %d of %d entries recomputed exactly", int(bad.sum()), bad.size)
    return p


def fold_axpy(s: np.ndarray, x: np.ndarray, t: np.ndarray | None = None) -> np.ndarray:
    """Elementwise ``s * x + t`` (broadcasting), every entry within ``REL |exact| + ABS`` of
    the exact value (a single product is correctly rounded; the sum may cancel)."""
    s, x = np.asarray(s, dtype=np.float64), np.asarray(x, dtype=np.float64)
    if t is None:
        return s * x  # one rounding, relative error <= 2^-53
    t = np.asarray(t, dtype=np.float64)
    p = s * x + t
    bad = _bad(p, np.abs(s) * np.abs(x) + np.abs(t), 2)
    if bad.any():
        sb, xb, tb = np.broadcast_arrays(s, x, t)
        p = np.array(p, dtype=np.float64)
        for ix in zip(*np.nonzero(bad), strict=True):
            p[ix] = exact_dot([sb[ix]], [xb[ix]], float(tb[ix]))
    return p
