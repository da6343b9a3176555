"""A posteriori probabilistic upper bound on ``λ_max`` from a Lanczos run.

The Kuczyński–Woźniakowski bound used by :mod:`lipbound.spectral` is *a priori*: it inflates
the Ritz value by the factor the worst spectrum could need. This module gives the
*a posteriori* bound in the spirit of M. E. Hochstenbach, "Probabilistic upper bounds for the
matrix two-norm", J. Sci. Comput. 57 (2013) 464–476: it reads the same Lanczos run's
tridiagonal matrix and is much tighter when the run has converged (a trained layer's top
singular value is usually well separated; CIFAR-10's layers reach 0.1 % in 24-32 steps where
Kuczyński–Woźniakowski still adds 6 %).

**Argument.** Let ``A`` be symmetric PSD with top eigenpair ``(λ₁, x₁)``, ``q₁`` uniform on the
unit sphere, and ``γ₁ = <q₁, x₁>``. Exact Lanczos gives orthonormal ``q₁ … q_{k+1}`` and
polynomials ``π_0 = 1, π_1, …, π_k`` (the three-term recurrence of the tridiagonal ``T_k`` and
the residual ``β_k``) with ``π_i(A) q₁ = q_{i+1}``. For any coefficients ``y`` the polynomial
``p = Σ y_i π_i`` has ``||p(A) q₁|| = ||y||`` and ``||p(A) q₁||² = Σ_l <q₁,x_l>² p(λ_l)² >=
γ₁² p(λ₁)²``. Choosing ``y_i = π_i(λ₁)`` gives ``γ₁² K(λ₁) <= 1`` with the Christoffel function
``K(x) = Σ_{i<=k} π_i(x)²``. On the event ``γ₁² >= c`` therefore ``K(λ₁) <= 1/c``; ``K`` is
increasing beyond ``θ_max`` (the largest Ritz value; the roots of every ``π_i`` are Ritz values
of a leading block, all ``<= θ_max``), so ``λ₁ <= U`` where ``U >= θ_max`` solves ``K(U) = 1/c``.
The implication holds for every ``k`` at once, so the number of steps may be chosen from the
run itself (the stopping rule does not change the failure probability). With multiple top
eigenvalues, ``γ₁`` may be taken along any unit vector of the eigenspace.

**Probability.** ``γ₁`` has density ``Γ(n/2) / (√π Γ((n-1)/2)) (1 - t²)^((n-3)/2) <=
sqrt((n-1)/(2π))`` on ``[-1, 1]`` for ``n >= 3`` (Wendel's inequality
``Γ(x + 1/2) <= √x Γ(x)``), so ``P[γ₁² < c] <= sqrt(2 (n-1) c / π) = δ`` for
``c = δ² π / (2 (n - 1))`` (:func:`overlap_floor`; checked against the exact Beta
distribution in the tests).

**Closed form.** With ``T_k = V diag(θ) V^T`` and ``w = V^T e_k``:
``K(x) = (1 + β_k² Σ_i w_i² / (x - θ_i)²) · Π_i (x - θ_i)² / Π_{j<=k} β_j²`` (the second factor
is ``π_k(x)²``; the first adds ``π_0² + … + π_{k-1}²`` through ``(x I - T_k)^{-1} e_k``). All terms
are positive for ``x > θ_max`` and it is evaluated in logarithms, so nothing cancels or
overflows.

**Floating point.** The run is float64 with full re-orthogonalisation, which is backward
stable: the computed ``T_k`` is the exact Lanczos matrix of a nearby operator and start
vector (e.g. the backward error analysis of Lanczos with re-orthogonalisation, Li & Jia,
arXiv:2210.10297). The parts of the computed Hessenberg matrix outside the tridiagonal are
required to be below ``1e-8`` of its scale (else this bound is not used), and the threshold is
``margin² / c`` with ``margin = 2``: the bound stays valid if every computed polynomial norm
``||p(A) q₁||`` is off by up to 100 %, many orders of magnitude more than float64 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MARGIN = 2.0
"""Tolerated factor on the computed ``||p(A) q₁||`` (see the module docstring)."""

NONTRIDIAGONAL_TOL = 1e-8
"""Largest allowed Frobenius norm of the computed Hessenberg matrix outside its tridiagonal,
relative to its largest entry."""


def overlap_floor(n: int, failure_prob: float) -> float | None:
    """``c`` with ``P[<q, x>² < c] <= failure_prob`` for ``q`` uniform on the unit sphere of
    ``R^n`` and any fixed unit ``x``: ``c = δ² π / (2 (n - 1))``. ``None`` for ``n < 3``."""
    if not 0 < failure_prob < 1:
        raise ValueError(f"failure_prob must be in (0, 1), got {failure_prob}")
    if n < 3:
        return None
    return failure_prob * failure_prob * math.pi / (2.0 * (n - 1))


def _log_threshold(c: float, margin: float) -> float:
    """``log(margin² / c)``: K above it at ``x`` puts ``λ_max`` below ``x`` on the event."""
    return 2.0 * math.log(margin) - math.log(c)


def _log_christoffel(offs: np.ndarray, gaps: np.ndarray, w2: np.ndarray,
                     log_beta_prod: float, beta_last: float) -> np.ndarray:
    """``log K(θ_max + offs)`` for offsets ``offs > 0``, with ``gaps = θ_max - θ >= 0``
    (closed form of the module docstring)."""
    d = offs[:, None] + gaps[None, :]  # (m, k) = x - θ_i, all >= offs > 0
    first = np.log1p(beta_last * beta_last * (w2[None, :] / (d * d)).sum(axis=1))
    return first + 2.0 * np.log(d).sum(axis=1) - 2.0 * log_beta_prod


def christoffel_exceeds(diag, offdiag, beta_last: float, c: float, x: float, *,
                        margin: float = MARGIN) -> bool:
    """Whether ``x > θ_max`` and ``K(x) >= margin² / c``, i.e. whether ``λ_max <= x``
    follows on the event ``γ₁² >= c`` (then :func:`christoffel_bound` ``<= x``).

    One O(k) pass, no eigensolver: the pivots ``d_i`` of the ``LDL^T`` factorisation of
    ``x I - T_k`` are all positive exactly when ``x > θ_max``, and
    ``π_i(x) = d_1 ⋯ d_i / (β_1 ⋯ β_i)`` (``det(x I - T_i) = d_1 ⋯ d_i``); the pivots are a
    backward-stable evaluation, and ``π_i(x)`` is the dominant solution of the recurrence
    there (no cancellation). Used for the cheap stopping test inside the Lanczos loop.
    """
    return christoffel_excess(diag, offdiag, beta_last, c, x, margin=margin) >= 0.0


def christoffel_excess(diag, offdiag, beta_last: float, c: float, x: float, *,
                       margin: float = MARGIN) -> float:
    """``log K(x) - log(margin² / c)`` by the pass of :func:`christoffel_exceeds` (``>= 0``
    exactly when that test passes), or ``-inf`` when ``x`` is not above ``θ_max`` (up to
    rounding) or the inputs allow no decision. Its growth between two checks of a Lanczos
    run predicts when the next one can pass."""
    k = len(diag)
    if k < 1 or len(offdiag) != k - 1 or not (c > 0 and beta_last > 0 and math.isfinite(x)):
        return -math.inf
    # K is invariant under scaling T, the residual and x together: work at unit scale
    sc = max(abs(x), max(abs(a) for a in diag), max(offdiag, default=0.0), beta_last)
    if not (sc > 0 and math.isfinite(sc)):
        return -math.inf
    diag = [a / sc for a in diag]
    offdiag = [b / sc for b in offdiag]
    beta_last, x = beta_last / sc, x / sc
    thr = _log_threshold(c, margin)
    logp = 0.0
    log_k = 0.0  # log of sum_{j <= i} pi_j^2, pi_0 = 1
    d = 1.0
    for i in range(k):
        b_prev = offdiag[i - 1] if i else 0.0
        d = (x - diag[i]) - (b_prev * b_prev / d if i else 0.0)
        b = offdiag[i] if i < k - 1 else beta_last
        if not (d > 1e-12 and b > 0.0):  # x at (or within rounding of) θ_max: no decision
            return -math.inf
        logp += math.log(d) - math.log(b)
        t = 2.0 * logp
        log_k = max(log_k, t) + math.log1p(math.exp(-abs(log_k - t)))
    return log_k - thr


def christoffel_bound(diag: np.ndarray, offdiag: np.ndarray, beta_last: float, c: float,
                      *, margin: float = MARGIN) -> tuple[float, float]:
    """Upper bound ``U`` on ``λ_max(A)`` valid whenever the start vector's overlap with a top
    eigenvector satisfies ``γ₁² >= c``.

    Args:
        diag: ``α_1 … α_k`` (diagonal of the Lanczos tridiagonal ``T_k``).
        offdiag: ``β_1 … β_{k-1}`` (its sub-diagonal, all > 0).
        beta_last: the residual norm ``β_k = ||A q_k - T-part||`` after step ``k`` (> 0).
        c: the overlap floor (:func:`overlap_floor`).
        margin: tolerated factor on the computed polynomial norms.

    Returns:
        ``(U, θ_max)``: ``U >= θ_max`` with ``K(U) >= margin² / c`` (the upper end of a bracket
        of relative width ~3e-6 of ``U - θ_max``, rounded up), or ``inf`` when the inputs do
        not allow a bound; ``θ_max`` is the largest eigenvalue of ``T_k`` (``nan`` if unknown).
    """
    diag = np.asarray(diag, dtype=np.float64)
    offdiag = np.asarray(offdiag, dtype=np.float64)
    k = diag.shape[0]
    if k < 1 or offdiag.shape[0] != k - 1 or not c > 0 or not beta_last > 0:
        return math.inf, math.nan
    betas = np.concatenate([offdiag, [beta_last]])
    if not (np.all(np.isfinite(diag)) and np.all(np.isfinite(betas)) and np.all(betas > 0)):
        return math.inf, math.nan
    # K is invariant under scaling T and the residual (and x) together: compute at unit
    # scale so that no square over- or underflows, and scale U back (rounded up)
    unit = float(max(np.abs(diag).max(), betas.max()))
    if not (unit > 0 and math.isfinite(unit)):
        return math.inf, math.nan
    u_s, t_s = _christoffel_unit(diag / unit, betas[:-1] / unit, float(betas[-1]) / unit, c,
                                 margin)
    if not math.isfinite(u_s):
        return math.inf, t_s * unit
    v = u_s * unit  # rounded up by 4 ulps of its magnitude (whatever its sign)
    return math.nextafter(v + abs(v) * (4 * 2.0 ** -53), math.inf), t_s * unit


def _christoffel_unit(diag: np.ndarray, offdiag: np.ndarray, beta_last: float, c: float,
                      margin: float) -> tuple[float, float]:
    """:func:`christoffel_bound` for inputs of largest magnitude 1."""
    k = diag.shape[0]
    betas = np.concatenate([offdiag, [beta_last]])
    # torch's eigensolver, not numpy's: numpy's BLAS threads would spin beside torch's
    t = torch.from_numpy(np.diag(diag))
    if k > 1:
        o = torch.from_numpy(offdiag)
        t = t + torch.diag(o, 1) + torch.diag(o, -1)
    ev, vv = torch.linalg.eigh(t)  # k <= a few hundred: dense is fast enough
    theta, vecs = ev.numpy(), vv.numpy()
    w2 = vecs[-1, :] ** 2
    tmax = float(theta.max())
    gaps = tmax - theta  # >= 0 exactly (tmax is one of the theta)
    scale = max(abs(tmax), 1.0)  # the inputs' largest magnitude is 1
    log_thr = _log_threshold(c, margin)
    log_bp = float(np.log(betas).sum())
    # K is increasing on (θ_max, ∞): bracket its crossing of the threshold on a grid of
    # offsets above θ_max, then refine the bracket three times.
    top = 2.0  # log10 of the largest offset tried, in units of scale
    while _log_christoffel(np.array([scale * 10.0 ** top]), gaps, w2, log_bp,
                           beta_last)[0] < log_thr:
        top += 2.0
        if top > 16.0:
            return math.inf, tmax  # not even at θ_max + 1e16 x scale: no useful bound
    offs = scale * np.logspace(-14, top, 65)
    vals = _log_christoffel(offs, gaps, w2, log_bp, beta_last)
    above = np.nonzero(vals >= log_thr)[0]
    if above.size == 0:  # rounding at the crossing: the largest offset is a valid bracket end
        above = np.array([offs.size - 1])
    i = int(above[0])
    hi_off = float(offs[i])
    lo_off = float(offs[i - 1]) if i > 0 else 0.0
    for _ in range(3):
        grid = np.linspace(lo_off, hi_off, 65)[1:]
        vals = _log_christoffel(grid, gaps, w2, log_bp, beta_last)
        j = int(np.nonzero(vals >= log_thr)[0][0]) if np.any(vals >= log_thr) else grid.size - 1
        hi_off = float(grid[j])
        lo_off = float(grid[j - 1]) if j > 0 else lo_off
    u = tmax + hi_off
    return math.nextafter(u * (1 + 1e-12), math.inf), tmax


# --------------------------------------------------------------------------- block Lanczos
def block_overlap_floor(n: int, b: int, failure_prob: float) -> float | None:
    """``c`` with ``P[||P x||² < c] <= failure_prob`` for ``P`` the orthogonal projection on a
    uniformly random ``b``-dimensional subspace of ``R^n`` (the span of ``b`` Gaussian
    vectors) and any fixed unit ``x``; ``None`` when ``n - b < 2``.

    ``||P x||² ~ Beta(b/2, (n-b)/2)``, whose density is at most
    ``t^(b/2 - 1) / B(b/2, (n-b)/2)`` (the factor ``(1-t)^((n-b)/2 - 1) <= 1``), so
    ``P[||P x||² < c] <= c^(b/2) Γ(n/2) / (Γ(b/2 + 1) Γ((n-b)/2))``; ``c`` makes the right side
    ``δ`` (checked against the exact Beta distribution in the tests). For ``b = 1`` this is
    :func:`overlap_floor` up to Wendel's inequality; for ``b = 4`` it is about ``2 sqrt(2δ)/n``
    instead of ``δ² π / (2n)``, which is what makes block runs converge in fewer steps.
    """
    if not 0 < failure_prob < 1:
        raise ValueError(f"failure_prob must be in (0, 1), got {failure_prob}")
    if b < 1:
        raise ValueError(f"block size must be >= 1, got {b}")
    if b == 1:
        return overlap_floor(n, failure_prob)
    if n - b < 2:
        return None
    log_c = (2.0 / b) * (math.log(failure_prob) + math.lgamma(b / 2 + 1)
                         + math.lgamma((n - b) / 2) - math.lgamma(n / 2))
    return min(math.exp(log_c), 1.0)


def block_measure_jacobi(t: torch.Tensor, b: int, k: int
                         ) -> tuple[list[float], list[float], float] | None:
    """The Jacobi (three-term recurrence) data of degree ``< k`` for the spectral measure of
    a block Lanczos run's start block.

    For the block-tridiagonal ``T_k = S diag(θ) S^T`` (``k`` blocks of size ``b``) the measure
    ``μ = Σ_j ||S[:b, j]||² δ_{θ_j}`` (total mass ``b``) satisfies
    ``∫ p² dμ = ||p(T_k) E_1||_F² = ||p(A) V||_F²`` for every polynomial of degree ``< k``. Its
    orthonormal polynomials (normalised by the mass) come from the Stieltjes procedure: Lanczos
    with full re-orthogonalisation on ``diag(θ)`` from ``sqrt(w / b)``. Returns
    ``(diag, offdiag, beta_last)`` of ``m <= k - 1`` steps (fewer when the measure has fewer
    points), the form :func:`christoffel_bound` takes, or ``None``.
    """
    dim = t.shape[0]
    if k < 2 or dim != k * b:
        return None
    ev, vv = torch.linalg.eigh(t.detach().to("cpu", torch.float64))
    theta = ev.numpy()
    w = (vv[:b, :] ** 2).sum(0).numpy()
    tot = float(w.sum())
    if not (tot > 0 and math.isfinite(tot)) or not np.all(np.isfinite(theta)):
        return None
    unit = float(max(np.abs(theta).max(), 1e-300))
    th = theta / unit
    m_max = k - 1
    qs = np.zeros((m_max + 1, dim))
    qs[0] = np.sqrt(w / tot)
    diag: list[float] = []
    off: list[float] = []
    for i in range(m_max):
        v = th * qs[i]
        a = float(qs[i] @ v)
        v -= a * qs[i]
        if i:
            v -= off[-1] * qs[i - 1]
        for _ in range(2):
            v -= qs[:i + 1].T @ (qs[:i + 1] @ v)
        bb = float(np.linalg.norm(v))
        diag.append(a)
        off.append(bb)
        if not bb > 1e-13:  # the measure has only i + 1 points: degree <= i
            break
        qs[i + 1] = v / bb
    m = len(diag)
    if not off[-1] > 1e-13:
        m -= 1  # the last step ended the recurrence: keep the steps before it
    if m < 1:
        return None
    return ([a * unit for a in diag[:m]], [x * unit for x in off[:m - 1]], off[m - 1] * unit)


def block_christoffel_bound(t: torch.Tensor, b: int, k: int, c: float, *,
                            margin: float = MARGIN) -> float:
    """Upper bound ``U`` on ``λ_max(A)`` from a block Lanczos run, valid whenever the start
    block's span ``V`` satisfies ``||V^T x₁||² >= c`` (:func:`block_overlap_floor`).

    **Argument.** For every polynomial ``p`` of degree ``< k`` and ``s = V^T x₁``:
    ``x₁^T p(A) V^T s = p(λ₁) ||s||²`` and ``||p(A) V^T s|| <= ||p(A) V^T||_2 ||s||``, so
    ``p(λ₁)² ||s||² <= ||p(A) V^T||_F² = ∫ p² dμ`` (:func:`block_measure_jacobi`). Hence
    ``||s||² K_μ(λ₁) <= 1`` for the Christoffel function ``K_μ(x) = sup p(x)² / ∫ p² dμ =
    K_ν(x) / b`` of the normalised measure ``ν = μ / b``; on the event ``||s||² >= c``,
    ``K_ν(λ₁) <= b / c``, and ``K_ν`` increases beyond the largest zero of its orthonormal
    polynomials, so :func:`christoffel_bound` with floor ``c / b`` applies. Returns ``inf``
    when no bound can be formed.
    """
    jac = block_measure_jacobi(t, b, k)
    if jac is None or not c > 0:
        return math.inf
    diag, off, beta_last = jac
    return christoffel_bound(np.array(diag), np.array(off), beta_last, c / b,
                             margin=margin)[0]


def block_christoffel_exceeds(t: torch.Tensor, b: int, k: int, c: float, x: float, *,
                              margin: float = MARGIN) -> bool:
    """Whether :func:`block_christoffel_bound` is at most ``x`` (one O(k) test after the
    small eigendecomposition), as :func:`christoffel_exceeds` for single vectors."""
    jac = block_measure_jacobi(t, b, k)
    if jac is None or not c > 0:
        return False
    diag, off, beta_last = jac
    return christoffel_exceeds(diag, off, beta_last, c / b, x, margin=margin)
