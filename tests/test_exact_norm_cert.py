"""Tests of the Cholesky certificate of lipbound.spectral.exact_norm.

exact_norm reports the value of the Gram/eigvalsh formula (kept bit for bit, checked against
the previous implementation kept here as the reference) and proves it by a Cholesky
factorisation of fl(μ I - Ĝ) instead of assuming a backward error of the eigensolver. The
soundness checks compare with exact values, in rational arithmetic, without tolerance: closed
forms (scaled Hadamard matrices, integer rank-one matrices u v^T) and exact Rayleigh quotients
||M v||^2 / ||v||^2 (a lower bound on ||M||^2 for any v). An eigensolver that lies (returns a
value 1e-6 too low, or 0) must not make the result unsound; a factorisation that never
succeeds must give the rigorous Frobenius bound.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lipbound import spectral
from lipbound.spectral import exact_norm

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(params=["cpu-views", "device"])
def route(request, monkeypatch):
    """Both certificate routes of a torch tensor: through numpy views (CPU tensors) and the
    torch-only one that GPU tensors take (forced here on the CPU)."""
    if request.param == "device":
        monkeypatch.setattr(spectral, "_NUMPY_DEVICES", ())
    return request.param


# --- the previous implementation (reference for the reported bits) ---------------------------

def _old_gram_norm_bound(lam: float, frob2: float, k: int, n: int, peak: float) -> float:
    u = 2.0 ** -53
    gamma = k * u / (1 - k * u)
    lam_up = max(lam, 0.0) * (1 + 64 * n * u) + gamma * frob2 * (1 + 64 * n * u)
    return math.nextafter(math.sqrt(lam_up) * peak * (1 + 1e-9), math.inf)


def _old_exact_norm(m: torch.Tensor | np.ndarray) -> float:
    if isinstance(m, np.ndarray):
        m = np.asarray(m, dtype=np.float64)
        if m.size == 0:
            return 0.0
        if m.shape[0] < m.shape[1]:
            m = m.T
        k, n = m.shape
        peak = float(np.max(np.abs(m)))
        if peak == 0.0 or not math.isfinite(peak):
            return 0.0 if peak == 0.0 else math.inf
        ms = m / peak
        gram = ms.T @ ms
        lam = float(np.linalg.eigvalsh(gram)[-1])
        frob2 = float(np.einsum("ij,ij->", ms, ms))
        return _old_gram_norm_bound(lam, frob2, k, n, peak)
    if m.numel() == 0:
        return 0.0
    m = m.to(torch.float64)
    if m.shape[0] < m.shape[1]:
        m = m.T
    k, n = m.shape
    peak = float(m.abs().max())
    if peak == 0.0 or not math.isfinite(peak):
        return 0.0 if peak == 0.0 else math.inf
    ms = m / peak
    gram = ms.T @ ms
    lam = float(torch.linalg.eigvalsh(gram)[-1])
    frob2 = float((ms * ms).sum())
    return _old_gram_norm_bound(lam, frob2, k, n, peak)


# --- matrices ---------------------------------------------------------------------------------

def _matrix(kind: str, m: int, n: int, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        a = rng.standard_normal((m, n))
    elif kind == "lowrank":
        r = 1 + seed % 3
        a = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    elif kind == "rank1":
        a = np.outer(rng.standard_normal(m), rng.standard_normal(n))
    elif kind == "near_rank1":
        a = np.outer(rng.standard_normal(m), rng.standard_normal(n))
        a += 1e-9 * rng.standard_normal((m, n))
    elif kind == "zero_rows":
        a = rng.standard_normal((m, n))
        a[rng.random(m) < 0.5] = 0.0
    elif kind == "clustered":
        k = min(m, n)
        qa, _ = np.linalg.qr(rng.standard_normal((m, k)))
        qb, _ = np.linalg.qr(rng.standard_normal((n, k)))
        s = rng.random(k) * 0.5
        top = min(k, 5)
        s[:top] = 1.0 - 1e-13 * np.arange(top)
        a = (qa * s) @ qb.T
    else:
        raise ValueError(kind)
    return a * scale


KINDS = ("gauss", "lowrank", "rank1", "near_rank1", "zero_rows", "clustered")
SHAPES = ((1, 1), (1, 7), (7, 1), (2, 2), (5, 3), (3, 9), (17, 17), (40, 12), (64, 33),
          (300, 40), (40, 300), (130, 100))
SCALES = (1e-150, 3.7e-20, 1.0, 2.0 ** 40, 1e150)


def _cases():
    seed = 0
    for kind in KINDS:
        for shape in SHAPES:
            for scale in SCALES:
                seed += 1
                yield kind, shape, scale, seed


# --- exact references -------------------------------------------------------------------------

def _sq(x: float) -> Fraction:
    f = Fraction(x)
    return f * f


def _rayleigh_lower(a: np.ndarray) -> Fraction:
    """||A v||^2 / ||v||^2 in exact rational arithmetic, v the float top right singular
    vector of A: a lower bound on ||A||^2 (exact up to the accuracy of v, squared)."""
    if a.size == 0 or not np.any(a):
        return Fraction(0)
    v = np.linalg.svd(a)[2][0]
    fa = [[Fraction(x) for x in row] for row in a.tolist()]
    fv = [Fraction(x) for x in v.tolist()]
    num = sum((sum((x * y for x, y in zip(row, fv, strict=True)), Fraction(0)) ** 2
               for row in fa), Fraction(0))
    den = sum((y * y for y in fv), Fraction(0))
    return num / den


def _frob2(a: np.ndarray) -> Fraction:
    return sum((_sq(x) for x in a.ravel().tolist()), Fraction(0))


def _hadamard(p: int) -> np.ndarray:
    h = np.ones((1, 1))
    for _ in range(p):
        h = np.block([[h, h], [h, -h]])
    return h


def _both(a: np.ndarray) -> tuple[float, float]:
    """exact_norm by the numpy path and by the torch path."""
    return exact_norm(a), exact_norm(torch.from_numpy(a.copy()))


# --- (a) same bits as before ------------------------------------------------------------------

def test_same_bits_as_the_previous_formula(route):
    for kind, (m, n), scale, seed in _cases():
        a = _matrix(kind, m, n, scale, seed)
        t = torch.from_numpy(a.copy())
        assert exact_norm(a) == _old_exact_norm(a), (kind, m, n, scale)
        assert exact_norm(t) == _old_exact_norm(t), (kind, m, n, scale)


def test_edge_cases_unchanged(route):
    for a in (np.zeros((3, 4)), np.zeros((0, 5)), np.array([[np.inf, 1.0]]),
              np.array([[5e-324]]), np.array([[1.7e308, 1.7e308], [1.7e308, -1.7e308]])):
        for x in (a, torch.from_numpy(a.copy())):
            assert exact_norm(x) == _old_exact_norm(x)


# --- (b) soundness against exact values -------------------------------------------------------

@pytest.mark.parametrize("p", [0, 1, 3, 5, 6])
@pytest.mark.parametrize("scale", [2.0 ** -1000, 3.0, 2.0 ** 600])
def test_hadamard_closed_form(p, scale):
    h = _hadamard(p) * scale  # exact: ||s H_n|| = s sqrt(n), n = 2^p
    true2 = Fraction(scale) ** 2 * 2 ** p
    for v in _both(h):
        assert _sq(v) >= true2
        assert _sq(v) <= true2 * Fraction(1 + 1e-8) ** 2


@pytest.mark.parametrize("seed", range(6))
def test_integer_rank_one_closed_form(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    x = rng.integers(-1000, 1001, m)
    y = rng.integers(-1000, 1001, n)
    x[0], y[-1] = 999, -777  # nonzero
    a = np.outer(x, y).astype(np.float64)  # exact: |entries| < 2^53
    true2 = Fraction(int(x @ x) * int(y @ y))  # ||x y^T|| = ||x|| ||y||
    for v in _both(a):
        assert _sq(v) >= true2


def test_random_matrices_above_exact_rayleigh_quotient():
    for kind, (m, n), scale, seed in _cases():
        if m * n > 700:
            continue  # the rational arithmetic is slow
        a = _matrix(kind, m, n, scale, seed)
        low = _rayleigh_lower(a)
        for v in _both(a):
            assert _sq(v) >= low, (kind, m, n, scale)


# --- (c) an eigensolver that lies -------------------------------------------------------------

def _liars(monkeypatch, factor: float) -> None:
    real_t, real_n = torch.linalg.eigvalsh, np.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g, *a, **k: real_t(g, *a, **k) * factor)
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda g, *a, **k: real_n(g, *a, **k) * factor)


@pytest.mark.parametrize("factor", [1 - 1e-6, 1 - 1e-12, 0.0])
def test_lying_eigensolver_is_caught(monkeypatch, factor, route):
    mats = [_hadamard(4) * 3.0, np.outer(np.arange(1.0, 8.0), np.arange(-3.0, 9.0))]
    mats += [_matrix(kind, 30, 11, 1e-100, 7 + i) for i, kind in enumerate(KINDS)]
    mats += [_matrix("clustered", 110, 100, 1e100, 5)]  # Gram order > 96: torch's Cholesky
    lows = [_rayleigh_lower(a) for a in mats]
    _liars(monkeypatch, factor)
    for a, low in zip(mats, lows, strict=True):
        for v in _both(a):
            assert _sq(v) >= low


# --- (d) the factorisation never succeeds: the Frobenius bound --------------------------------

def test_fallback_is_a_rigorous_frobenius_bound(monkeypatch, route):
    calls = []

    def fail_t(b, *args, **kwargs):
        calls.append("t")
        return b.clone(), torch.ones((), dtype=torch.int32)

    def fail_n(b, *args, **kwargs):
        calls.append("n")
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fail_t)
    monkeypatch.setattr(np.linalg, "cholesky", fail_n)
    for i, kind in enumerate(KINDS):
        for scale in (1e-300, 1.0, 1e300):
            # Gram orders 6 and 100 (torch's Cholesky above 96, numpy's below)
            a = _matrix(kind, *((9, 6) if i % 2 else (101, 100)), scale, 100 + i)
            f2 = _frob2(a)
            for v in _both(a):
                assert _sq(v) >= f2  # ||A||_2 <= ||A||_F, exactly
                assert _sq(v) <= f2 * Fraction(1 + 1e-12) ** 2  # and not looser than that
    assert "t" in calls and "n" in calls


# --- the margin too small for the formula's value: the certificate's own value ----------------

def test_certificate_value_when_the_margin_is_too_small(monkeypatch, route):
    """Without the SAFETY margin the formula's value cannot be proven at Gram order 120 (the
    certificate needs about 2 n^2 u, more than the formula's 64 n u): a higher level's
    certificate is returned: sound, above that value, below the former value (with SAFETY) and
    below the Frobenius bound (so it is the certificate's, not the fallback's)."""
    kinds = ("gauss", "rank1", "near_rank1", "clustered")
    mats = [_matrix(kind, 130, 120, 1e-30, 40 + i) for i, kind in enumerate(kinds)]
    lows = [_rayleigh_lower(a) for a in mats]
    monkeypatch.setattr(spectral, "SAFETY", 0.0)
    for kind, a, low in zip(kinds, mats, lows, strict=True):
        f2 = _frob2(a)
        for v in _both(a):
            assert _sq(v) >= low
            assert v > spectral_formula(a)  # not provable: the certificate's value, above it
            assert v <= _old_exact_norm(a)  # within the former margin
            assert _sq(v) <= f2 * Fraction(1 + 1e-12) ** 2  # never looser than Frobenius
            if kind in ("gauss", "clustered"):  # (rank 1: ||A||_F = ||A||_2, Frobenius wins)
                assert _sq(v) < f2


def spectral_formula(a: np.ndarray) -> float:
    """The formula's value (numpy steps) with the current ``spectral.SAFETY``."""
    k, n = max(a.shape), min(a.shape)
    peak = float(np.max(np.abs(a)))
    ms = (a if a.shape[0] >= a.shape[1] else a.T) / peak
    lam = float(np.linalg.eigvalsh(ms.T @ ms)[-1])
    return spectral._gram_norm_bound(lam, float(np.einsum("ij,ij->", ms, ms)), k, n, peak)
