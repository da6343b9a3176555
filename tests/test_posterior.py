"""Tests of the a posteriori (Christoffel) Lanczos bound, lipbound.posterior, and its use in
lipbound.spectral: the overlap floor against the exact Beta distribution and a Monte Carlo
draw, the closed form of the Christoffel function against the three-term recurrence, the
deterministic implication (overlap >= floor => bound >= λ_max) on spectra built to be hard,
the polynomial norms of a float64 run against an eigendecomposition, and the route's
soundness and no-regression against exact SVDs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from core_helpers import n_examples, spectral_norm
from lipbound import posterior
from lipbound.posterior import christoffel_bound, christoffel_exceeds, overlap_floor
from lipbound.spectral import SAFETY, kw_factor, lanczos_top, spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --------------------------------------------------------------------------- helpers
def lanczos_from(a: np.ndarray, q1: np.ndarray, k: int):
    """k steps of Lanczos with full re-orthogonalisation (two passes) on the symmetric a
    from the unit vector q1: (diag, offdiag, beta_last, basis)."""
    n = a.shape[0]
    q = np.zeros((k + 1, n))
    q[0] = q1 / np.linalg.norm(q1)
    alpha, beta = [], []
    for j in range(k):
        w = a @ q[j]
        alpha.append(float(q[j] @ w))
        for _ in range(2):
            w -= q[:j + 1].T @ (q[:j + 1] @ w)
        b = float(np.linalg.norm(w))
        beta.append(b)
        q[j + 1] = w / b
    return np.array(alpha), np.array(beta[:-1]), beta[-1], q


def spectrum(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Eigenvalues in [0, 1] with the top one equal to 1."""
    if kind == "continuous":  # no gap: the hardest case for Lanczos
        lam = np.linspace(0.0, 1.0, n)
    elif kind == "edge":  # density vanishing like a square root at the top (random matrices)
        lam = 1.0 - np.linspace(0.0, 1.0, n) ** 2
    elif kind == "gap":
        lam = rng.uniform(0.0, 0.6, n)
    elif kind == "cluster":
        lam = rng.uniform(0.0, 1.0, n)
        lam[: min(n, 6)] = 1.0 - 1e-6 * np.arange(min(n, 6))
    else:
        raise ValueError(kind)
    lam[0] = 1.0
    return np.sort(lam)[::-1]


def recurrence_log_k(diag, offdiag, beta_last, x: float) -> float:
    """log of sum_i pi_i(x)^2 from the three-term recurrence (reference)."""
    betas = list(offdiag) + [beta_last]
    p_prev, p = 0.0, 1.0
    vals = [1.0]
    for i, (a, b) in enumerate(zip(diag, betas, strict=True)):
        p_next = ((x - a) * p - (betas[i - 1] if i else 0.0) * p_prev) / b
        p_prev, p = p, p_next
        vals.append(p)
    return math.log(sum(v * v for v in vals))


# --------------------------------------------------------------------------- overlap floor
@pytest.mark.parametrize("n", [3, 4, 10, 100, 10_000, 1_000_000, 3_211_264])
@pytest.mark.parametrize("delta", [0.5, 0.1, 1e-3, 1e-7, 1e-12])
def test_overlap_floor_against_the_exact_beta_distribution(n, delta):
    """<q, x>^2 ~ Beta(1/2, (n-1)/2) for q uniform on the sphere: the floor's failure
    probability is at most δ, and not needlessly small (within a factor 2 for n >= 10)."""
    c = overlap_floor(n, delta)
    p = float(stats.beta.cdf(c, 0.5, (n - 1) / 2))
    assert p <= delta
    if n >= 10:
        assert p >= 0.5 * delta


def test_overlap_floor_monte_carlo_and_arguments():
    rng = np.random.default_rng(0)
    for n, delta in ((3, 0.3), (7, 0.2), (50, 0.1)):
        g = rng.standard_normal((40_000, n))
        g2 = g[:, 0] ** 2 / (g * g).sum(axis=1)
        freq = float(np.mean(g2 < overlap_floor(n, delta)))
        assert freq <= delta + 4 * math.sqrt(delta * (1 - delta) / g.shape[0])
    assert overlap_floor(2, 0.1) is None and overlap_floor(1, 0.1) is None
    for bad in (0.0, 1.0, -1e-3, 2.0, math.nan):
        with pytest.raises(ValueError):
            overlap_floor(10, bad)


# --------------------------------------------------------------------------- closed form
@settings(max_examples=n_examples(60), deadline=None)
@given(k=st.integers(1, 25), seed=st.integers(0, 10 ** 6), rel=st.floats(1e-6, 3.0))
def test_christoffel_closed_form_matches_the_recurrence(k, seed, rel):
    rng = np.random.default_rng(seed)
    diag = rng.uniform(0.0, 1.0, k)
    off = rng.uniform(0.05, 0.5, k - 1)
    beta_last = float(rng.uniform(0.05, 0.5))
    if k == 1:
        theta, vecs = diag.copy(), np.ones((1, 1))
    else:
        from scipy.linalg import eigh_tridiagonal
        theta, vecs = eigh_tridiagonal(diag, off)
    tmax = float(theta.max())
    off_x = rel * max(tmax, 1e-3)
    got = posterior._log_christoffel(np.array([off_x]), tmax - theta, vecs[-1] ** 2,
                                     float(np.log(np.concatenate([off, [beta_last]])).sum()),
                                     beta_last)[0]
    ref = recurrence_log_k(diag, off, beta_last, tmax + off_x)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)


@settings(max_examples=n_examples(60), deadline=None)
@given(k=st.integers(1, 30), seed=st.integers(0, 10 ** 6), log_c=st.floats(-40.0, -1.0))
def test_the_one_pass_test_agrees_with_the_bound(k, seed, log_c):
    """christoffel_exceeds(x) (LDL pivots, no eigensolver) says exactly whether x is above
    the bound U (up to U's bracket width) and is False at or below θ_max."""
    rng = np.random.default_rng(seed)
    diag = rng.uniform(0.0, 1.0, k)
    off = rng.uniform(0.01, 0.5, k - 1)
    beta_last = float(rng.uniform(0.01, 0.5))
    c = 10.0 ** log_c
    u, tmax = christoffel_bound(diag, off, beta_last, c)
    assert u >= tmax
    if not math.isfinite(u):  # K too flat (k = 1 and a tiny c): no bound, and no stop
        assert not christoffel_exceeds(diag, off, beta_last, c, tmax + 1e6 * abs(tmax) + 1)
        return
    for x in (tmax - 1e-3 * abs(tmax), tmax, tmax + 0.5 * (u - tmax), u, u * (1 + 1e-6),
              2 * u + 1):
        got = christoffel_exceeds(diag, off, beta_last, c, x)
        if x <= tmax:
            assert not got
        elif x >= u:
            assert got
        elif not got:  # K(x) below the threshold: the bound cannot be below x
            assert u >= x
    assert not christoffel_exceeds(diag, off, beta_last, c, math.inf)
    assert not christoffel_exceeds(diag, off, 0.0, c, 2 * u + 1)


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e-150, 1.0, 1e155, 1e160, 1e300])
def test_bound_is_scale_invariant(scale):
    """K is invariant under scaling T and the residual together: the bound scales exactly,
    with no over- or underflow of the squares at extreme magnitudes."""
    rng = np.random.default_rng(1)
    diag = rng.uniform(0.0, 1.0, 12)
    off = rng.uniform(0.05, 0.5, 11)
    u1, t1 = christoffel_bound(diag, off, 0.2, 1e-12)
    u, t = christoffel_bound(diag * scale, off * scale, 0.2 * scale, 1e-12)
    assert u >= u1 * scale * (1 - 1e-12) and u == pytest.approx(u1 * scale, rel=1e-9)
    assert t == pytest.approx(t1 * scale, rel=1e-12)
    x = 0.5 * (u1 + t1)
    assert christoffel_exceeds(diag * scale, off * scale, 0.2 * scale, 1e-12, u * 1.001)
    assert christoffel_exceeds(diag, off, 0.2, 1e-12, x) == christoffel_exceeds(
        diag * scale, off * scale, 0.2 * scale, 1e-12, x * scale)


def test_christoffel_bound_bad_inputs():
    assert christoffel_bound(np.array([]), np.array([]), 1.0, 1e-3)[0] == math.inf
    assert christoffel_bound(np.array([1.0, 2.0]), np.array([0.0]), 1.0, 1e-3)[0] == math.inf
    assert christoffel_bound(np.array([1.0]), np.array([]), 0.0, 1e-3)[0] == math.inf
    assert christoffel_bound(np.array([1.0]), np.array([]), 1.0, 0.0)[0] == math.inf
    assert christoffel_bound(np.array([math.nan]), np.array([]), 1.0, 1e-3)[0] == math.inf
    u, tmax = christoffel_bound(np.array([1.0]), np.array([]), 0.5, 0.1)
    # K(x) = 1 + ((x - 1) / 0.5)^2 = margin^2 / c = 40  ->  x = 1 + 0.5 sqrt(39)
    exact = 0.5 * math.sqrt(39)
    assert tmax == 1.0 and exact <= u - 1.0 <= exact * (1 + 1e-5)


# --------------------------------------------------------------------------- the implication
@settings(max_examples=n_examples(60), deadline=None)
@given(kind=st.sampled_from(["continuous", "edge", "gap", "cluster"]),
       n=st.integers(20, 300), k=st.integers(2, 40), seed=st.integers(0, 10 ** 6),
       log_c=st.floats(-30.0, -2.0))
@example(kind="gap", n=20, k=16, seed=1, log_c=-19.0)
def test_bound_holds_whenever_the_overlap_is_at_the_floor(kind, n, k, seed, log_c):
    """The deterministic core: a start vector whose overlap with the top eigenvector is
    exactly at the floor (γ₁² = c, the worst case allowed) gives U >= λ_max = 1 with the
    library's margin (2), with no tolerance. With no margin on the polynomial norms it holds
    only up to the rounding of the floating-point Lanczos run, whose recurrence is not exactly
    that of the exact Krylov space; the margin exists to absorb it. The rounding matters once
    sqrt(c) nears the unit roundoff: the @example (16 steps on a 20 x 20 matrix, c = 1e-19)
    gives 1 - 1.8e-9 with margin 1 and 1.0015 with margin 2; a scan of 3000 cases over
    c in [1e-30, 1e-2] gave margin 1 down to 1 - 1.1e-3 at c ~ 1e-30 and margin 2 never
    below 1; over c in [1e-14, 1e-2], margin 1 down to 1 - 9e-12."""
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    lam = spectrum(kind, n, rng)
    c = 10.0 ** log_c
    rest = rng.standard_normal(n - 1)
    q1 = np.concatenate([[math.sqrt(c)], math.sqrt(1 - c) * rest / np.linalg.norm(rest)])
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (basis * lam) @ basis.T
    diag, off, beta_last, _ = lanczos_from(a, basis @ q1, k)
    if beta_last <= 1e-9 or np.any(off <= 1e-9):
        return  # an invariant subspace: the route disables the bound there
    u, _ = christoffel_bound(diag, off, beta_last, c, margin=1.0)
    if log_c >= -12.0:
        assert u >= 1.0 * (1 - 1e-9)
    u2, _ = christoffel_bound(diag, off, beta_last, c)
    assert u2 >= u and u2 >= 1.0  # the bound the library reports: no tolerance


@settings(max_examples=n_examples(20), deadline=None)
@given(n=st.integers(20, 120), k=st.integers(2, 30), seed=st.integers(0, 10 ** 6),
       shift=st.floats(1.5, 1e6))
def test_bound_holds_for_a_negative_top_eigenvalue(n, k, seed, shift):
    """A spectrum shifted below zero (λ_max = 1 - shift < 0): the bound is rounded up
    towards +inf, not scaled by (1 + u), which would move a negative U down."""
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    lam = spectrum("edge", n, rng) - shift
    c = 1e-6
    rest = rng.standard_normal(n - 1)
    q1 = np.concatenate([[math.sqrt(c)], math.sqrt(1 - c) * rest / np.linalg.norm(rest)])
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (basis * lam) @ basis.T
    diag, off, beta_last, _ = lanczos_from(a, basis @ q1, k)
    if beta_last <= 1e-9 * shift or np.any(off <= 1e-9 * shift):
        return
    u, theta = christoffel_bound(diag, off, beta_last, c, margin=1.0)
    assert u >= theta
    assert u >= (1.0 - shift) - 1e-9 * shift


def test_the_floor_is_what_makes_it_sound():
    """With an overlap far below the floor the bound can miss λ_max: the test above is not
    vacuous, and the floor (i.e. the failure probability) is what carries the guarantee."""
    n, k = 200, 10
    lam = np.concatenate([[1.0], np.linspace(0.5, 0.0, n - 1)])
    q1 = np.ones(n)
    q1[0] = 1e-12
    diag, off, beta_last, _ = lanczos_from(np.diag(lam), q1 / np.linalg.norm(q1), k)
    u, _ = christoffel_bound(diag, off, beta_last, 1e-4, margin=1.0)
    assert u < 1.0


@pytest.mark.parametrize("kind", ["continuous", "edge", "cluster"])
@pytest.mark.parametrize("k", [8, 24, 48])
def test_float64_polynomial_norms_match_the_eigendecomposition(kind, k):
    """The finite-precision premise: for the Christoffel-optimal polynomial p at x = U of a
    float64 run, ||p(A) q1||^2 computed from the eigendecomposition of A equals the value
    K(U) the bound assumes, far within the margin (a factor 4 on the square)."""
    n = 400
    rng = np.random.default_rng(k)
    lam = spectrum(kind, n, rng)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (basis * lam) @ basis.T
    q1 = rng.standard_normal(n)
    q1 /= np.linalg.norm(q1)
    diag, off, beta_last, _ = lanczos_from(a, q1, k)
    c = overlap_floor(n, 1e-6)
    u, _ = christoffel_bound(diag, off, beta_last, c)
    betas = list(off) + [beta_last]

    def pis(x):  # pi_0(x) ... pi_k(x), x may be an array
        out = [np.ones_like(x)]
        prev = np.zeros_like(x)
        for i in range(k):
            nxt = ((x - diag[i]) * out[-1] - (betas[i - 1] if i else 0.0) * prev) / betas[i]
            prev = out[-1]
            out.append(nxt)
        return np.array(out)

    coef = pis(np.array(u))  # y_i = pi_i(U)
    gam = basis.T @ q1  # overlaps with the eigenvectors
    p_at_lam = coef @ pis(lam)  # p(λ_l)
    lhs = float(np.sum(gam ** 2 * p_at_lam ** 2))  # ||p(A) q1||^2, independently
    rhs = float(coef @ coef)  # K(U) = ||y||^2
    assert lhs == pytest.approx(rhs, rel=1e-6)


# --------------------------------------------------------------------------- in the route
def _upper(mat: torch.Tensor, steps: int, seed: int, delta: float):
    m, n = mat.shape
    return spectral_upper(lambda x: x @ mat.T, lambda y: y @ mat, n_in=n, n_out=m,
                          cols=torch.arange(n), rows=torch.arange(m), device="cpu",
                          apply_flops=float(m * n), mode="lanczos", steps=steps,
                          failure_prob=delta, generator=torch.Generator().manual_seed(seed))


def _matrix(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    if kind == "gap":
        s = torch.rand(k, generator=g, dtype=torch.float64) * 0.5
        s[0] = 2.0
    elif kind == "linear":
        s = torch.linspace(1.0, 0.0, k, dtype=torch.float64)
    else:  # cluster
        s = torch.rand(k, generator=g, dtype=torch.float64) * 0.5
        s[: min(k, 5)] = 1.0
    return (u * s) @ v.T


@settings(max_examples=n_examples(50), deadline=None)
@given(kind=st.sampled_from(["gauss", "gap", "linear", "cluster"]), m=st.integers(3, 90),
       n=st.integers(3, 90), steps=st.integers(4, 40), seed=st.integers(0, 10 ** 6))
def test_route_is_sound_and_never_looser_than_before(kind, m, n, steps, seed):
    """Reported bound >= the exact norm, and at most the a priori bound the full run would
    have given before the a posteriori bound existed (Kuczynski-Wozniakowski at the whole δ)
    times the ratio of the KW factors at δ/2 and δ (a completed run reports KW at δ/2)."""
    mat = _matrix(kind, m, n, seed)
    delta = 1e-9
    res = _upper(mat, steps, seed, delta)
    true = spectral_norm(mat)
    assert res.value >= true
    n_used = min(m, n)
    f_old = kw_factor(n_used, min(steps, n_used), delta)
    if res.method == "lanczos" and f_old is not None:
        mv, rmv = (lambda x: x @ mat.T), (lambda y: y @ mat)
        if m < n:  # the route runs on the smaller side, M M^T
            mv, rmv = rmv, mv
        full = lanczos_top(mv, rmv, torch.arange(n_used), n_used, steps,
                           torch.Generator().manual_seed(seed), "cpu")
        old = full.sqrt_theta * math.sqrt(f_old) * (1 + SAFETY)
        f_half = kw_factor(n_used, min(steps, n_used), delta / 2)
        slack = math.sqrt(f_half / f_old) if f_half is not None else math.inf
        assert res.value <= old * slack * (1 + 1e-9)


def test_separated_top_stops_early_and_tight():
    mat = _matrix("gap", 300, 400, 1)
    true = spectral_norm(mat)
    res = lanczos_top(lambda y: y @ mat, lambda x: x @ mat.T, torch.arange(300), 300, 64,
                      torch.Generator().manual_seed(0), "cpu",
                      post_c=overlap_floor(300, 1e-6), post_stop=kw_factor(300, 64, 1e-6))
    assert res.post_stopped and res.k <= 24 and res.matvecs < 64
    assert true <= res.post_sqrt <= true * (1 + 1e-3)
    out = _upper(mat, 64, 0, 1e-6)
    assert out.method == "lanczos" and true <= out.value <= true * (1 + 1e-3)
    # the a priori bound at the same number of steps would be looser
    f = kw_factor(300, res.k, 5e-7)
    assert f is None or out.value < out.estimate * math.sqrt(f)
