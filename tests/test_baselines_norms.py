"""The rival methods' certified spectral norm (fc.safe_spectral_norm) and sparse operands.

safe_spectral_norm uses the analyzer's exact route (lipbound.spectral.exact_norm: Gram
matrix of the smaller side, symmetric eigensolver, explicit rounding terms, relative margin
1e-9) and splits sparse matrices into diagonal blocks. References: matrices whose singular
values are known exactly (Hadamard factors, computed without rounding), and mpmath's SVD at
60 digits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from lipbound.baselines import fc
from lipbound.baselines.fc import _diagonal_blocks, operand, safe_spectral_norm
from lipbound.spectral import SAFETY, exact_norm

#: safe_spectral_norm is at most this far above the true norm (margin 1e-9, Gram and
#: eigensolver terms ~1e-13 on these sizes)
GAP = 2e-9


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix (n a power of two): entries +-1, H^T H = n I exactly."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def known(m: int, k: int, d: np.ndarray) -> tuple[np.ndarray, float]:
    """``A = H_m[:, :r] diag(d) H_k[:, :r]^T`` (integer entries, formed exactly) and its
    largest singular value ``sqrt(m k) max |d|`` (exact: the factors' columns are orthogonal
    with norms sqrt(m) and sqrt(k)); ``m k`` a perfect square."""
    r = d.size
    a = (hadamard(m)[:, :r] * d[None, :]) @ hadamard(k)[:, :r].T
    top = math.isqrt(m * k)
    assert top * top == m * k
    return a, float(top * np.max(np.abs(d)))


def mp_norm(a: np.ndarray) -> float:
    """||A||_2 from mpmath's SVD at 60 digits, rounded to the nearest float64."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        s = mpmath.svd_r(mpmath.matrix(a.tolist()), compute_uv=False)
        return float(max(s))


@pytest.mark.parametrize("m, k, d", [
    (16, 4, [3.0, -7.0, 1.0, 2.0]),
    (4, 16, [5.0, 5.0, -5.0]),
    (64, 64, [1.0] * 64),              # all singular values equal (a multiple of an
    (8, 32, [2.0 ** -30, 2.0 ** 20]),  # orthogonal matrix); a huge spread
])
def test_bound_on_matrices_with_known_norm(m, k, d):
    a, top = known(m, k, np.array(d))
    assert np.array_equal(a, np.round(a * 2.0 ** 30) / 2.0 ** 30)  # formed exactly
    v = safe_spectral_norm(a)
    assert top <= v <= top * (1 + GAP)
    # the torch route of the same rule gives the same kind of bound
    torch = pytest.importorskip("torch")
    assert top <= exact_norm(torch.from_numpy(a)) <= top * (1 + GAP)


def test_abs_err_is_added_and_zero_and_empty_matrices():
    a, top = known(16, 4, np.array([1.0, 2.0, 3.0, 4.0]))
    base = safe_spectral_norm(a)
    for e in (1e-300, 1e-9, 0.5, 3.0):
        v = safe_spectral_norm(a, e)
        assert v >= top + e and v >= base
        assert v <= (base + e) * (1 + 1e-15)
    assert safe_spectral_norm(np.zeros((3, 5))) == 0.0
    assert safe_spectral_norm(np.zeros((3, 5)), 1e-3) >= 1e-3
    assert safe_spectral_norm(np.zeros((0, 5))) == 0.0
    assert safe_spectral_norm(np.zeros((4, 0))) == 0.0
    assert safe_spectral_norm(np.zeros((300, 300))) == 0.0  # sparse path, no block


def test_subnormal_entries_stay_above_the_norm():
    a = np.zeros((3, 2))
    a[1, 0] = 5e-324  # the smallest subnormal: the norm is exactly that
    assert safe_spectral_norm(a) >= 5e-324
    a[2, 1] = -3e-320
    assert safe_spectral_norm(a) >= 3e-320


def test_sparse_matrix_is_split_into_its_blocks():
    # four blocks with known norms, scattered by random row / column permutations into a
    # 300 x 260 matrix (density ~1 %), with a zero row and column left over
    rng = np.random.default_rng(3)
    parts = [known(16, 4, np.array([3.0, 1.0])), known(4, 16, np.array([-9.0])),
             known(8, 8, np.array([2.0, 2.0, 1.0])), (np.array([[-17.5]]), 17.5)]
    rows = sum(p.shape[0] for p, _ in parts) + 268
    cols = sum(p.shape[1] for p, _ in parts) + 228
    big = np.zeros((rows, cols))
    r0 = c0 = 0
    for p, _ in parts:
        big[r0:r0 + p.shape[0], c0:c0 + p.shape[1]] = p
        r0 += p.shape[0]
        c0 += p.shape[1]
    big = big[rng.permutation(rows)][:, rng.permutation(cols)]
    assert big.size >= fc.SPARSE_MIN_ENTRIES
    blocks = _diagonal_blocks(big)
    assert blocks is not None and len(blocks) == 4
    assert sorted(len(r) * len(c) for r, c in blocks) == sorted(p.size for p, _ in parts)
    # every nonzero lies in one block
    covered = np.zeros_like(big, dtype=bool)
    for r, c in blocks:
        covered[np.ix_(r, c)] = True
    assert not np.any(big[~covered])
    top = max(t for _, t in parts)  # 9 * 8 = 72
    v = safe_spectral_norm(big)
    assert top <= v <= top * (1 + GAP)
    assert top <= exact_norm(big) <= top * (1 + GAP)  # the dense route agrees


def test_dense_or_single_block_matrices_are_not_split():
    rng = np.random.default_rng(0)
    assert _diagonal_blocks(rng.standard_normal((300, 300))) is None  # dense
    assert _diagonal_blocks(np.eye(8)) is None  # too small to be worth it
    band = np.eye(400) + np.eye(400, k=1)  # sparse but one connected block
    assert _diagonal_blocks(band) is None
    assert safe_spectral_norm(band) >= 2.0 * math.cos(math.pi / 401)  # ||I + N|| -> 2


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), scale=st.integers(-60, 60),
       seed=st.integers(0, 2 ** 32 - 1), zeros=st.floats(0.0, 0.7))
def test_bound_against_mpmath_on_random_matrices(m, n, scale, seed, zeros):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)) * 2.0 ** scale
    a[rng.random((m, n)) < zeros] = 0.0
    true = mp_norm(a)
    v = safe_spectral_norm(a)
    # float(true) is within half an ulp of the real norm: compare with one ulp of room
    assert v >= math.nextafter(true, math.inf) or v >= true * (1 + 1e-15)
    if true > 0:
        assert v <= true * (1 + GAP)
    else:
        assert v == 0.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), blocks=st.integers(2, 12))
def test_split_and_dense_routes_agree_on_random_block_matrices(seed, blocks):
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal((int(rng.integers(1, 6)), int(rng.integers(1, 6))))
            for _ in range(blocks)]
    big = sp.block_diag(mats).toarray()
    pad = np.zeros((big.shape[0] + 300, big.shape[1] + 250))
    pad[:big.shape[0], :big.shape[1]] = big
    pad = pad[rng.permutation(pad.shape[0])][:, rng.permutation(pad.shape[1])]
    true = max(mp_norm(x) for x in mats)
    split = safe_spectral_norm(pad)
    assert _diagonal_blocks(pad) is not None
    assert true * (1 - 1e-15) <= split <= true * (1 + GAP)
    assert true * (1 - 1e-15) <= exact_norm(pad) <= true * (1 + GAP)


def test_operand_products_match_dense_ones():
    rng = np.random.default_rng(1)
    w = np.zeros((400, 300))
    idx = rng.random(w.shape) < 0.02
    w[idx] = rng.standard_normal(int(idx.sum()))
    op = operand(w)
    assert sp.issparse(op)
    x = rng.standard_normal((7, 400))
    y = rng.standard_normal((300, 5))
    for got, want in ((x @ op, x @ w), (op @ y, w @ y), (op @ y[:, 0], w @ y[:, 0])):
        assert isinstance(got, np.ndarray) and got.shape == want.shape
        # both are within gamma_n sum|terms| of the exact product
        assert np.allclose(got, want, rtol=0, atol=1e-13 * np.max(np.abs(want)))
    dense = rng.standard_normal((300, 300))
    assert operand(dense) is dense
    assert operand(w[:10, :10]) is not None and not sp.issparse(operand(w[:10, :10]))


def test_safety_margin_is_the_documented_one():
    # docs/guarantees.md and the baselines' docstrings state a relative margin of 1e-9
    assert SAFETY == 1e-9


def test_exact_l2_single_layer_encloses_the_known_norm():
    # the attained lower end of an affine network was the upper value less 1e-12 n, above
    # the true norm once the upper value carries a 1e-9 margin; it must stay below it
    from lipbound.baselines.exact import exact_local_l2_detailed

    a, top = known(16, 4, np.array([3.0, -7.0]))
    res = exact_local_l2_detailed([(a, np.zeros(16))], np.zeros(4), 0.5)
    assert res.lower <= top <= res.bound.value <= top * (1 + GAP)
    assert res.bound.guarantee.name == "EXACT"
