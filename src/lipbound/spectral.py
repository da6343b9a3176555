"""Spectral norms that are upper bounds.

Two routes, chosen per layer by cost (``mode="auto"``) or forced (``"exact"``/``"lanczos"``):

* **exact** -- the (masked) matrix is formed in float64, from its weights or by applying the
  layer to basis vectors of its smaller side, and its largest singular value is obtained from
  the Gram matrix of the smaller side with explicit rounding terms (:func:`exact_norm`).
  Guarantee: **certified** (deterministic).
* **lanczos** -- the Lanczos method with full re-orthogonalisation on the operator
  ``v -> M^T M v`` applied through the layer's own forward / transposed ops, from a start
  vector uniform on the unit sphere of the active coordinates. Its Ritz value ``θ`` never
  exceeds ``||M||^2`` (it approaches from below, like power iteration), so it is inflated
  with the bound of Kuczyński & Woźniakowski (SIAM J. Matrix Anal. Appl. 13(4), 1992,
  Thm 4.2(a)): ``P[θ_k < (1 - t) λ_max] <= 1.648 sqrt(n) exp(-sqrt(t) (2k - 1))``. Solving
  for ``t`` at the requested failure probability δ gives ``||M|| <= sqrt(θ / (1 - t))`` with
  probability ``>= 1 - δ`` over the random start. (We use ``k - 1`` for ``k`` to leave a margin.)
  The same run also gives the *a posteriori* Christoffel bound of :mod:`lipbound.posterior`
  (Hochstenbach, J. Sci. Comput. 2013), much tighter once the top of the spectrum has
  converged; δ is split in halves between the two and the smaller bound is reported. The run
  stops as soon as the a posteriori bound is no larger than the inflated value a full
  ``steps``-step run gives with the whole δ (the bound reported before the a posteriori one
  existed), so a run that stops early is never looser than that, and it often stops after a
  third of the steps; a completed run reports ``min(KW(δ/2), a posteriori)``, at most the
  ratio of the KW factors at ``δ/2`` and ``δ`` (~0.1 %) above the old value.
  Guarantee: **probabilistic upper bound** with failure probability δ. Extra vectors (a warm
  start from a neighbouring ε) only enlarge the subspace, so they never weaken the bound.
  Lanczos runs on the smaller side (``M M^T`` when there are fewer active outputs than
  inputs: same norm, smaller basis), and the KW dimension ``n`` is that of the side used.
  Only the basis is stored (``(k + 3) n`` floats at the peak), not the images ``M q_j``.

In both routes a cheap deterministic bound (Frobenius norm from the one-pass row norms, or a
certified global factor) is compared, and when it is smaller it is reported instead, with its
own (certified) guarantee. The Lanczos run stops early as soon as its KW-inflated Ritz value
is already above the smallest such bound: Ritz values only grow with the steps, so the full
run's KW bound could not have beaten it (its a posteriori bound could have, by at most the
KW factor, 1-2 %: the certified value is preferred at that price; see :func:`lanczos_top`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .ops import winograd
from .posterior import NONTRIDIAGONAL_TOL, christoffel_bound, christoffel_exceeds, overlap_floor
from .results import Guarantee

SAFETY = 1e-9
"""Relative margin added to every floating-point spectral value (covers float64 rounding)."""

FAST_REL_ERROR = 1e-8
"""Largest worst-case error of fast (Winograd) products, relative to the operator's norm
estimate, with which a Lanczos run is kept; above it the run is repeated with ``conv2d``. The
worst-case bound (VGG-16: 2e-10 to 2e-9 of the norm) is about 1e5 times the error observed
(3e-15 to 9e-15); the relative error ``η`` of a kept run is added to its value as a factor
``1 + 4 η`` (the Ritz value moves by at most about ``2 η θ``)."""


@dataclass(frozen=True)
class SpectralBound:
    """An upper bound on a spectral norm.

    Attributes:
        value: the bound.
        guarantee: CERTIFIED or PROBABILISTIC.
        failure_prob: probability the bound fails (0 if certified).
        method: ``"svd"``, ``"lanczos"``, ``"frobenius"``, ``"zero"`` or ``"given"``.
        estimate: the raw (lower) estimate before inflation, for information.
        vector: the top right singular vector estimate (flat, on the operator's device), used
            to warm-start a later computation; ``None`` if not available.
    """

    value: float
    guarantee: Guarantee
    failure_prob: float
    method: str
    estimate: float
    vector: Tensor | None = None


def kw_factor(n: int, k: int, failure_prob: float) -> float | None:
    """Factor ``1 / (1 - t)`` by which a k-step Lanczos Ritz value of an n-dimensional PSD
    operator must be multiplied to exceed its top eigenvalue with probability >= 1 - δ.

    Returns ``None`` when ``k`` is too small for the requested δ (``t >= 1``).
    """
    if not 0 < failure_prob < 1:
        raise ValueError(f"failure_prob must be in (0, 1), got {failure_prob}")
    keff = k - 1
    if keff < 2:
        return None
    sqrt_t = math.log(1.648 * math.sqrt(max(n, 1)) / failure_prob) / (2 * keff - 1)
    t = sqrt_t * sqrt_t
    if t >= 1:
        return None
    return 1.0 / (1.0 - t)


def _materialize(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], n_in: int,
                 n_out: int, cols: Tensor, rows: Tensor, device, chunk_elems: int = 2 ** 24
                 ) -> Tensor:
    """Form M[rows][:, cols] by applying the operator to basis vectors of the smaller side."""
    if cols.numel() <= rows.numel():
        size, idx, apply, other = n_in, cols, mv, rows
        transpose = True
    else:
        size, idx, apply, other = n_out, rows, rmv, cols
        transpose = False
    step = max(1, chunk_elems // max(size, 1))
    parts = []
    for s in range(0, idx.numel(), step):
        sel = idx[s:s + step]
        e = torch.zeros(sel.numel(), size, dtype=torch.float64, device=device)
        e[torch.arange(sel.numel(), device=device), sel] = 1.0
        parts.append(apply(e)[:, other])
    m = torch.cat(parts, 0)  # (len(idx), len(other))
    return m.T if transpose else m


def exact_norm(m: Tensor) -> float:
    """Largest singular value of a dense float64 matrix, as a certified upper bound.

    Computed from the Gram matrix of the smaller side (``eigvalsh``), 2.5-8x cheaper than an
    SVD of a rectangular matrix. Rounding is covered explicitly: the float64 Gram matrix
    differs from the exact one by at most ``γ_k |M|^T |M|`` entrywise (k the inner dimension,
    γ_k = k u / (1 - k u), u = 2^-53), whose spectral norm is at most ``γ_k ||M||_F^2``; the
    symmetric eigensolver is backward stable (error ``<= c n u ||G||``, taken with c = 64).
    Both terms are added before the square root, and the SAFETY margin on top.
    """
    if m.numel() == 0:
        return 0.0
    m = m.to(torch.float64)
    if m.shape[0] < m.shape[1]:
        m = m.T
    k, n = m.shape  # inner dimension k >= n
    peak = float(m.abs().max())
    if peak == 0.0 or not math.isfinite(peak):
        return 0.0 if peak == 0.0 else math.inf
    ms = m / peak  # scaled to avoid under/overflow of the squares
    gram = ms.T @ ms
    lam = float(torch.linalg.eigvalsh(gram)[-1])
    u = 2.0 ** -53
    gamma = k * u / (1 - k * u)
    frob2 = float((ms * ms).sum())
    lam_up = max(lam, 0.0) * (1 + 64 * n * u) + gamma * frob2 * (1 + 64 * n * u)
    # one ulp up: the relative margins vanish on the subnormal grid
    return math.nextafter(math.sqrt(lam_up) * peak * (1 + SAFETY), math.inf)


_DGKS = 0.7071
"""Daniel-Gragg-Kaufman-Stewart criterion: a second Gram-Schmidt pass is made only when the
first one removed more than half of ``||w||^2`` (the norm dropped below ``1/sqrt(2)``)."""

_CHECK_EVERY = 4
"""Steps between two early-exit checks of :func:`lanczos_top` (an eigvalsh of a j x j matrix)."""

_STOP_MARGIN = 1e-12
"""Relative margin of the early-exit test (covers the rounding of the small eigensolvers)."""


@dataclass(frozen=True)
class LanczosResult:
    """Outcome of :func:`lanczos_top`.

    It unpacks (and indexes) like the 4-tuple ``(theta, vector, k, dim)`` returned by earlier
    versions, so ``theta, vec, k, dim = lanczos_top(...)`` keeps working.

    Attributes:
        theta: the top Ritz value of ``M^T M`` in the operator's own units (a lower estimate of
            ``||M||^2`` up to rounding), plus the invariant-subspace slack when one was met.
        vector: the Ritz vector (flat ``n_in``, unit norm); ``None`` only for an empty run.
        k: the Krylov dimension the Kuczynski-Wozniakowski bound may use (``min(steps, n)``
            after a completed run; the number of steps made after an early exit, where the
            warm vectors are not added).
        dim: the number of Lanczos basis vectors actually spanned (warm vectors excluded).
        dominated: the run stopped early because ``θ_j * kw_full >= stop_theta``: the full run
            could not have reported less than the certified alternative behind ``stop_theta``.
        sqrt_theta: ``sqrt(theta)``, computed without squaring the internal scale (no under- or
            overflow for operators of norm below 1e-154 or above 1e154).
        image: ``M vector / ||M vector||`` (flat ``n_out``), the matching left singular vector
            estimate; ``None`` when ``M vector = 0``.
        matvecs: applications of ``mv`` plus ``rmv`` to single vectors.
        post_sqrt: the a posteriori bound on ``||M||`` (:mod:`lipbound.posterior`; valid
            unless the start vector's overlap with a top singular vector is below the
            ``post_c`` floor), computed where the run stopped on it or after its last full step;
            ``inf`` when not computed.
        post_stopped: the run stopped because the a posteriori bound reached ``post_stop``.
    """

    theta: float
    vector: Tensor | None
    k: int
    dim: int
    dominated: bool = False
    sqrt_theta: float = 0.0
    image: Tensor | None = None
    matvecs: int = 0
    post_sqrt: float = math.inf
    post_stopped: bool = False

    def _legacy(self) -> tuple[float, Tensor | None, int, int]:
        return (self.theta, self.vector, self.k, self.dim)

    def __iter__(self):
        return iter(self._legacy())

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return self._legacy()[i]


def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def lanczos_top(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], cols: Tensor,
                n_in: int, steps: int, generator: torch.Generator, device,
                warm: list[Tensor] | None = None, *, stop_theta: float | None = None,
                kw_full: float | None = None, post_c: float | None = None,
                post_stop: float | None = None) -> LanczosResult:
    """Lanczos with full re-orthogonalisation on ``A = M^T M`` restricted to coordinates ``cols``.

    ``M`` is given by batched flat maps ``mv: (B, n_in) -> (B, n_out)`` and its transpose
    ``rmv``; it must vanish outside the input coordinates ``cols``. The start vector is uniform
    on the unit sphere of ``span(e_i, i in cols)`` (the assumption of Kuczyński & Woźniakowski,
    SIAM J. Matrix Anal. Appl. 13(4), 1992). The operator is rescaled by its first image so that
    no norm under- or overflows.

    Memory: only the basis (rows of a preallocated ``(min(steps, n) + len(warm), n_in)``
    float64 tensor) and a few work vectors are kept; the images ``M q_j`` are not. The projected
    matrix ``H = Q^T A Q`` is read off the Gram-Schmidt coefficients: for ``w = A q_j`` the
    projections ``Q_{<=j} w`` are column ``j`` of ``H`` and the norm of the remainder is
    ``H[j+1, j]``. A second projection pass is made only when the first removed more than half
    of ``||w||^2`` (Daniel, Gragg, Kaufman & Stewart, Math. Comp. 30, 1976). After the last
    step only ``||M q_{k-1}||^2`` (one ``mv``, no ``rmv``) is needed: the other entries of the
    last column are known by symmetry of the (tridiagonal in exact arithmetic) ``H``.
    Rayleigh-Ritz uses ``eigh`` of the symmetrised ``(H + H^T) / 2``; the Ritz vector ``z`` is
    then applied once more and ``θ = max(λ_max(H), ||M z||^2 / ||z||^2)``: both are lower
    estimates of ``||M||^2`` up to rounding, and a larger θ only makes the reported bound larger.

    Invariant Krylov space (residual ``<= 1e-9`` of the largest ``||A q_j||``): in exact
    arithmetic every later Ritz value from the start vector equals the current one, so the KW
    bound for ``min(steps, n)`` steps applies; the residual bounds the perturbation and is added
    to θ (``slack``). The run goes on with a fresh random direction orthogonal to the basis (a
    larger subspace only raises the Ritz value); once the basis spans every active coordinate,
    Rayleigh-Ritz is exact (``dim == n``).

    Warm vectors (e.g. the Ritz vector at a neighbouring radius) are masked to ``cols``,
    orthogonalised against the basis and appended as extra basis rows, with their columns of
    ``H`` computed explicitly: they only enlarge the subspace, so they never lower θ.

    Early exit: with ``stop_theta`` (in the operator's own units, ``θ ~ ||M||^2``) and
    ``kw_full`` (the factor the completed run would multiply θ with), every few steps the top
    eigenvalue ``θ_j`` of the leading ``j x j`` block of the symmetrised ``H`` is computed and
    the run stops (``dominated=True``) once ``θ_j * kw_full >= stop_theta``. Ritz values of
    nested subspaces never decrease (Cauchy interlacing: the ``j x j`` block is a principal
    submatrix of the final one, and the final θ is at least its top eigenvalue), so the full
    run would report ``sqrt(θ_k f) >= sqrt(θ_j f) >= sqrt(stop_theta)``: when ``stop_theta``
    comes from a certified bound, reporting that bound is never looser than finishing the run,
    and it is certified. ``kw_full = inf`` means the full run cannot give a finite bound.

    A posteriori bound (``post_c``, the overlap floor of :func:`lipbound.posterior.overlap_floor`):
    the Christoffel bound ``U_j`` of the tridiagonal part of ``H`` and the residual after step
    ``j`` (:func:`lipbound.posterior.christoffel_bound`), used while the run is a pure Krylov
    run (before any invariant-subspace restart) and ``H`` is tridiagonal up to rounding. The
    bound holds for every ``j`` on the same event, so with ``post_stop`` every check makes a
    one-pass test (:func:`lipbound.posterior.christoffel_exceeds`) of ``U_j <= θ_j *
    post_stop`` and the run stops there (``post_stopped=True``); the bound is computed at that
    step, or after the last full step of a completed run.

    Args:
        mv, rmv: the operator and its transpose (batched, flat).
        cols: long tensor of the active input coordinates (``n = cols.numel() >= 1``).
        n_in: input dimension of ``mv``.
        steps: Lanczos steps (the basis has ``min(steps, n)`` vectors).
        generator: source of the random start (and of restart directions).
        device: where the basis lives.
        warm: extra vectors (flat ``n_in``) added to the subspace.
        stop_theta: early-exit threshold, see above; ``None`` disables the early exit.
        kw_full: factor of the full run, required with ``stop_theta``.
        post_c: overlap floor of the a posteriori bound; ``None`` disables it.
        post_stop: stop once the a posteriori bound is within this factor of ``θ_j``.

    Returns:
        A :class:`LanczosResult` (unpacks as ``(theta, vector, k, dim)``).
    """
    n = cols.numel()
    if n < 1 or steps < 1:
        raise ValueError(f"lanczos_top needs active coordinates and steps, got n={n}, "
                         f"steps={steps}")
    if stop_theta is not None and kw_full is None:
        raise ValueError("lanczos_top: stop_theta needs kw_full (the full run's KW factor)")
    f64 = torch.float64
    k_max = min(steps, n)
    warm_list = list(warm) if warm else []
    size = k_max + len(warm_list)
    # basis as rows; a row is written before it is read, so only row 0 needs zeros
    q = torch.empty(size, n_in, dtype=f64, device=device)
    q[0].zero_()
    # H = Q^T A Q is held as  sym(h) + tridiag(alphas, betas):  h[:j+1, j] are the
    # coefficients of the full Gram-Schmidt passes (and the explicit warm columns),
    # alphas / betas those of the local three-term step and the subdiagonal (Python floats,
    # no per-step tensor writes).
    h = torch.zeros(size, size, dtype=f64, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    g = torch.randn(n, generator=generator, dtype=f64).to(device)
    g = g / g.abs().max().clamp_min(1e-300)
    q[0, cols] = g / g.norm()
    del g
    u = mv(q[0:1])  # (1, n_out): the first image, also the first step's
    nmv = 1
    c0 = float(u.abs().max())
    sc = 1.0 / c0 if c0 > 0.0 and math.isfinite(c0) else 1.0
    # A_s = sc^2 A. When sc^2 is far from under/overflow, one scaling of rmv's output suffices.
    fused = 1e-100 < sc < 1e100
    ssq = sc * sc

    def apply_a(img: Tensor) -> Tensor:
        """sc^2 M^T img as a fresh tensor (img an unscaled image)."""
        if fused:
            return rmv(img) * ssq
        return rmv(img * sc) * sc

    def h_sym(m: int) -> Tensor:
        """The symmetrised leading m x m block of H."""
        c = h[:m, :m]
        hs = (c + c.T) * 0.5
        hs.diagonal().add_(torch.tensor(alphas[:m], dtype=f64, device=device))
        if m > 1:
            b = torch.tensor(betas[:m - 1], dtype=f64, device=device)
            hs.diagonal(1).add_(b)
            hs.diagonal(-1).add_(b)
        return hs

    post_ok = post_c is not None and post_c > 0
    post_best = math.inf  # the a posteriori bound on the scaled A (where the run stops/ends)
    post_stopped = False

    def post_tridiagonal(m: int, beta_m: float) -> list[float] | None:
        """Diagonal of T_m, or None when H is not tridiagonal to NONTRIDIAGONAL_TOL."""
        hm = h[:m, :m]
        diag = (torch.tensor(alphas[:m], dtype=f64) + hm.diagonal().cpu()).tolist()
        off = torch.linalg.matrix_norm(torch.triu(hm, 1)).item()
        sz = max(max(abs(a) for a in diag), max(betas[:m - 1], default=0.0), beta_m)
        return diag if off <= NONTRIDIAGONAL_TOL * sz else None

    def post_bound(m: int, beta_m: float) -> float:
        """Christoffel bound (scaled units) from the first m steps and residual beta_m."""
        diag = post_tridiagonal(m, beta_m)
        if diag is None:
            return math.inf
        return christoffel_bound(diag, betas[:m - 1], beta_m, post_c)[0]

    stop_norm = None
    if stop_theta is not None:
        stop_norm = math.sqrt(max(stop_theta, 0.0)) * (1 + _STOP_MARGIN)
    scale = 0.0
    slack = 0.0
    invariant_seen = False
    dominated = False
    next_check = _CHECK_EVERY
    beta_prev = 0.0
    k = 0
    j = 0
    while True:
        if j > 0:
            u = mv(q[j:j + 1])
            nmv += 1
        if j == k_max - 1:
            # last step: only the diagonal entry is new (one mv, no rmv)
            a = _norm(u * sc)  # scaled first: no over/underflow of the squares
            alphas.append(a * a)
            k = j + 1
            break
        w = apply_a(u)[0]
        u = None  # keep only the basis and one work vector alive
        nmv += 1
        nrm0 = _norm(w)
        scale = max(scale, nrm0)
        # local three-term step, then a full classical Gram-Schmidt pass (and a second one
        # only on cancellation, DGKS); every coefficient removed is accumulated into H[:, j]
        if j > 0:
            w.add_(q[j - 1], alpha=-beta_prev)
        alpha = float(torch.dot(q[j], w))
        w.add_(q[j], alpha=-alpha)
        nrm1 = _norm(w)
        qj = q[:j + 1]
        coef = torch.mv(qj, w)
        w.addmv_(qj.T, coef, alpha=-1.0)
        beta = _norm(w)
        if beta < _DGKS * nrm1:
            c2 = torch.mv(qj, w)
            w.addmv_(qj.T, c2, alpha=-1.0)
            coef += c2
            beta = _norm(w)
        h[:j + 1, j] = coef
        alphas.append(alpha)  # (beta_prev is already in betas)
        k = j + 1
        post_checks = post_ok and post_stop is not None
        if k >= next_check and (stop_norm is not None or post_checks):
            next_check = k + _CHECK_EVERY
            lam = None
            if stop_norm is not None:
                if kw_full == math.inf:
                    dominated = True
                    break
                lam = float(torch.linalg.eigvalsh(h_sym(k))[-1])
                bound = math.sqrt(max(lam, 0.0) * kw_full) / sc
                if bound >= stop_norm:
                    dominated = True
                    break
                # far from the threshold after the first steps: check less often (a skipped
                # check only costs speed, never soundness or the reported value)
                far = k >= 2 * _CHECK_EVERY and bound < 0.8 * stop_norm
                if far and not post_checks:
                    next_check = k + 4 * _CHECK_EVERY
            if post_checks and beta > 1e-9 * scale and scale > 0.0:
                # cheap test first (one O(k) pass); the bound itself only when it passes
                if lam is None:
                    lam = float(torch.linalg.eigvalsh(h_sym(k))[-1])
                diag = post_tridiagonal(k, beta)
                x_stop = max(lam, 0.0) * post_stop
                if diag is not None and christoffel_exceeds(diag, betas[:k - 1], beta, post_c,
                                                            x_stop):
                    # x_stop is a bound itself (K(x_stop) >= the threshold); the bracketed
                    # root is at most a bracket width above the crossing
                    u_j = christoffel_bound(diag, betas[:k - 1], beta, post_c)[0]
                    post_best = min(u_j, x_stop)
                    post_stopped = True
                    break
        if beta <= 1e-9 * scale or scale == 0.0:
            invariant_seen = True
            post_ok = False  # the Krylov recurrence ends here (earlier bounds stay valid)
            slack += beta
            found = 0.0
            v = w
            for _ in range(4):  # a random vector inside the span has probability 0
                gn = torch.randn(n, generator=generator, dtype=f64).to(device)
                v = torch.zeros(n_in, dtype=f64, device=device)
                v[cols] = gn / gn.norm()
                for _ in range(2):
                    v.addmv_(qj.T, torch.mv(qj, v), alpha=-1.0)
                nb = _norm(v)
                if nb > 1e-8:
                    found = nb
                    break
            if not found:
                break  # the basis (numerically) spans the active coordinates
            torch.div(v, found, out=q[j + 1])
            beta_prev = float(torch.dot(q[j + 1], w))  # q_{j+1}^T A q_j, |.| <= beta
        else:
            torch.div(w, beta, out=q[j + 1])
            beta_prev = beta
        betas.append(beta_prev)
        w = v = None  # peak memory: the basis plus u, rmv(u) and w of the next step
        j += 1

    if post_ok and not dominated and not post_stopped and k >= 3:
        # the last full step's residual is betas[k - 2]: the bound of the first k - 1 steps
        post_best = post_bound(k - 1, betas[k - 2])
    base = k
    e = 0
    for wv in warm_list if not dominated else []:
        v = torch.zeros(n_in, dtype=f64, device=device)
        v[cols] = wv.to(device=device, dtype=f64).reshape(-1)[cols]
        nv0 = _norm(v)
        if not (nv0 > 0.0 and math.isfinite(nv0)):
            continue
        v /= nv0
        qa = q[:base + e]
        for _ in range(2):
            v.addmv_(qa.T, torch.mv(qa, v), alpha=-1.0)
        nv = _norm(v)
        if nv <= 1e-8:
            continue  # (numerically) inside the subspace already
        torch.div(v, nv, out=q[base + e])
        e += 1
    if e:
        wm = apply_a(mv(q[base:base + e]))  # (e, n_in)
        nmv += 2 * e
        cross = q[:base + e] @ wm.T  # (base + e, e): the new columns of H
        h[:base + e, base:base + e] = cross
        h[base:base + e, :base] = cross[:base].T
        alphas.extend([0.0] * e)
        betas.extend([0.0] * e)
    u = w = v = None
    kk = base + e
    evals, evecs = torch.linalg.eigh(h_sym(kk))
    lam = float(evals[-1])
    vec = torch.mv(q[:kk].T, evecs[:, -1])  # the Ritz vector z = Q^T y
    zn = _norm(vec)
    if zn > 0.0:
        vec.div_(zn)
    mz = mv(vec.unsqueeze(0))[0] * sc  # scaled before any norm (no over/underflow)
    nmv += 1
    mzn = _norm(mz)
    rq = mzn * mzn if zn > 0.0 else 0.0  # its Rayleigh quotient ||M z||^2 / ||z||^2 (scaled)
    theta_s = max(lam, rq, 0.0)
    if invariant_seen:
        theta_s += slack
    image = mz / mzn if mzn > 0.0 and math.isfinite(mzn) else None
    k_kw = base if dominated or post_stopped or not invariant_seen else k_max
    post_sqrt = math.sqrt(post_best) / sc if math.isfinite(post_best) else math.inf
    return LanczosResult(theta_s / sc / sc, vec, k_kw, base, dominated=dominated,
                         sqrt_theta=math.sqrt(theta_s) / sc, image=image, matvecs=nmv,
                         post_sqrt=post_sqrt, post_stopped=post_stopped)


def spectral_upper(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], *,
                   n_in: int, n_out: int, cols: Tensor, rows: Tensor, device,
                   dense: Callable[[], Tensor] | None = None, apply_flops: float,
                   mode: str = "auto", steps: int = 64, failure_prob: float = 1e-7,
                   generator: torch.Generator | None = None, exact_budget: float = 1e9,
                   certified_alternatives: tuple[tuple[float, str], ...] = (),
                   warm: list[Tensor] | None = None,
                   fast_error: float | None = None) -> SpectralBound:
    """Upper bound on ||M||_2 for the operator M given by ``mv`` (and transpose ``rmv``), which
    is zero outside input coordinates ``cols`` and output coordinates ``rows``.

    Args:
        mv, rmv: batched flat maps ``(B, n_in) -> (B, n_out)`` and back.
        cols, rows: long tensors of the active input / output coordinates.
        dense: returns the full (n_out, n_in) matrix cheaply (fully connected layers).
        apply_flops: multiply-adds of one application of ``mv`` to one vector.
        mode: ``"auto"`` (exact when its cost is below ``exact_budget`` flops),
            ``"exact"`` or ``"lanczos"``.
        certified_alternatives: other certified upper bounds as ``(value, label)`` pairs (e.g.
            a Frobenius norm); the smallest candidate is reported with its own guarantee. The
            Lanczos run stops as soon as it can no longer beat the smallest one (same value,
            method and guarantee as the full run; only ``estimate`` and ``vector`` differ).
        warm: vectors (flat ``n_in``) added to the Lanczos subspace.
        fast_error: when given, the Lanczos products may use fast (Winograd) convolutions
            whose absolute error is at most ``fast_error ||x||`` for ``mv`` and ``rmv`` (masks
            included). The run is kept only if that is below ``FAST_REL_ERROR`` times its norm
            estimate (products as accurate, relative to this operator, as float64 ones);
            otherwise it is repeated with the same start vector and ``conv2d`` products. A
            kept run's value is multiplied by ``1 + 4 fast_error / estimate``.

    Returns:
        A :class:`SpectralBound`. Its ``vector`` is a right singular vector estimate (flat
        ``n_in``); when Lanczos ran on ``M M^T`` it is ``M^T u / ||M^T u||`` for the Ritz
        vector ``u`` (the image computed anyway for the Rayleigh-quotient check).
    """
    if mode not in ("auto", "exact", "lanczos"):
        raise ValueError(f"spectral mode must be auto, exact or lanczos, got {mode!r}")
    na, ma = cols.numel(), rows.numel()
    alts = sorted((a for a in certified_alternatives if math.isfinite(a[0])),
                  key=lambda a: a[0])
    if na == 0 or ma == 0:
        return SpectralBound(0.0, Guarantee.CERTIFIED, 0.0, "zero", 0.0)
    lo, hi = min(na, ma), max(na, ma)
    if dense is not None:
        exact_cost = 4.0 * hi * lo * lo
    else:
        exact_cost = 2.0 * lo * apply_flops + 4.0 * hi * lo * lo
    use_exact = mode == "exact" or (mode == "auto" and (exact_cost <= exact_budget or lo <= 64))
    if use_exact:
        if dense is not None:
            m = dense()[rows][:, cols]
        else:
            m = _materialize(mv, rmv, n_in, n_out, cols, rows, device)
        val = exact_norm(m)
        best = SpectralBound(val, Guarantee.CERTIFIED, 0.0, "svd", val / (1 + SAFETY))
        if alts and alts[0][0] < val:
            return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], val)
        return best
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # Lanczos on the smaller side: ||M|| = ||M^T||, and the basis, the re-orthogonalisation
    # and the KW dimension are those of the side actually used.
    swap = ma < na
    if swap:
        l_mv, l_rmv, l_cols, l_n, n_used = rmv, mv, rows, n_out, ma
        l_warm = None
        if warm:  # M v is the matching left vector: a warm start for M M^T
            l_warm = [mv(w_.to(device=device, dtype=torch.float64).reshape(1, -1))[0]
                      for w_ in warm]
    else:
        l_mv, l_rmv, l_cols, l_n, n_used, l_warm = mv, rmv, cols, n_in, na, warm
    # The failure probability is split between the two probabilistic bounds reported as their
    # minimum: Kuczynski-Wozniakowski (a priori) and the Christoffel bound (a posteriori).
    delta_post = failure_prob / 2
    post_c = overlap_floor(n_used, delta_post)
    delta_kw = failure_prob / 2 if post_c is not None else failure_prob  # n < 3: KW only
    k_full = min(steps, n_used)
    stop_theta = kw_full = None
    if alts:
        if k_full >= n_used:  # the full run may end "lanczos-full" (no KW inflation)
            kw_full = 1.0
        else:
            f_full = kw_factor(n_used, k_full, delta_kw)
            kw_full = math.inf if f_full is None else f_full
        a = alts[0][0] / (1 + SAFETY)
        stop_theta = a * a  # inf (never reached) rather than OverflowError for huge norms
    post_stop = None
    if k_full < n_used:
        # stop once the a posteriori bound is no larger than the a priori bound of a full
        # k_full-step run at the whole failure probability (what lipbound reported before
        # the a posteriori bound existed): θ_j f <= θ_full f, so a stopped run is never
        # looser than that
        f_old = kw_factor(n_used, k_full, failure_prob)
        post_stop = f_old if f_old is not None else 1.02

    def run() -> LanczosResult:
        return lanczos_top(l_mv, l_rmv, l_cols, l_n, steps, gen, device, l_warm,
                           stop_theta=stop_theta, kw_full=kw_full, post_c=post_c,
                           post_stop=post_stop)

    fast_infl = 1.0
    if fast_error is not None and alts and fast_error > FAST_REL_ERROR * alts[0][0]:
        fast_error = None  # the norm is below a certified bound too small for fast products
    if fast_error is not None and math.isfinite(fast_error):
        state = gen.get_state()
        with winograd.enabled():
            res = run()
        if fast_error == 0.0:
            pass  # an all-zero kernel: exact products
        elif fast_error <= FAST_REL_ERROR * res.sqrt_theta:
            fast_infl = 1.0 + 4.0 * fast_error / res.sqrt_theta
        else:
            gen.set_state(state)  # same start vector, float64 conv2d products
            res = run()
    else:
        res = run()
    # the returned vector is always a right singular vector estimate of M (input side)
    vec = res.image if swap else res.vector
    est = res.sqrt_theta
    if not math.isfinite(est):
        # over/underflow beyond what the rescaling covers: only the trivial bound is safe
        if alts:
            return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], math.nan)
        return SpectralBound(math.inf, Guarantee.CERTIFIED, 0.0, "overflow", math.nan)
    if res.dominated:  # the full run would have reported the alternative too
        return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], est, vec)
    if res.dim >= n_used:  # the Krylov basis spans every active coordinate: Rayleigh-Ritz is exact
        val = est * (1 + SAFETY) * fast_infl
        cand = SpectralBound(val, Guarantee.CERTIFIED, 0.0, "lanczos-full", est, vec)
    else:
        f = kw_factor(n_used, res.k, delta_kw)
        kw_val = est * math.sqrt(f) if f is not None else math.inf
        # the a posteriori bound is >= the Ritz values of its own Krylov prefix; the reported
        # estimate may be a little larger (final Rayleigh quotient, warm vectors)
        post_val = max(res.post_sqrt, est)
        val = min(kw_val, post_val)
        if math.isfinite(val):
            val *= (1 + SAFETY) * fast_infl
        cand = SpectralBound(val, Guarantee.PROBABILISTIC, failure_prob, "lanczos", est, vec)
    if alts and alts[0][0] <= cand.value:
        return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], est, vec)
    return cand
