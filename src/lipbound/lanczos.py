"""The Lanczos engine behind :mod:`lipbound.spectral`: lower estimates of ``||M||^2`` and the
data of the probabilistic upper bounds, on compact coordinates.

The operator ``A = M^T M`` (or ``M M^T``) is given by two batched maps on *compact* vectors
(the active coordinates only, so a masked layer's Lanczos basis holds only the coordinates
that can move): ``mv: (b, n) -> (b, n_img)`` and ``rmv: (b, n_img) -> (b, n)`` with
``A V = rmv(mv(V))``. Two variants share the bookkeeping:

* **single-vector** (``block=1``): Lanczos with full re-orthogonalisation from a start vector
  uniform on the unit sphere (the assumption of the Kuczyński–Woźniakowski bound and of the
  a posteriori Christoffel bound of :mod:`lipbound.posterior`);
* **block** (``block=b > 1``): block Lanczos (Golub & Underwood 1977; Cullum & Donath 1974)
  with full re-orthogonalisation from ``b`` orthonormalised Gaussian vectors, whose span is
  uniform among the ``b``-dimensional subspaces. Its a posteriori bound
  (:func:`lipbound.posterior.block_christoffel_bound`) needs a much smaller polynomial growth
  (the start *subspace* has a far larger guaranteed overlap with a top eigenvector than a
  single vector), so a run needs 2-3x fewer (block) steps: a win wherever ``b`` products cost
  little more than one -- memory-bound dense layers (one pass over the matrix serves ``b``
  vectors) and small layers (where a step's fixed cost dominates).

Memory: only the basis (rows of a preallocated ``(dim_max + b, n)`` float64 tensor) and a
few work blocks are kept, not the images ``A q_j``. The projected matrix ``H = Q A Q^T`` is
read off the Gram–Schmidt coefficients: for ``W = A V_j`` the projections of ``W`` on the
basis are column block ``j`` of ``H`` and the remainder's triangular factor is its
sub-diagonal block. A second projection pass is made only when the first removed more than
half of a vector's squared norm (Daniel, Gragg, Kaufman & Stewart, Math. Comp. 30, 1976).
Norms that the classical algorithm computes in separate passes over ``n`` numbers are
obtained from the coefficients instead (Pythagoras over the orthonormal basis), so a step
reads the basis twice and each work vector a few times.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._precision import float32_products_exact
from .posterior import (
    NONTRIDIAGONAL_TOL,
    block_christoffel_bound,
    block_christoffel_exceeds,
    christoffel_bound,
    christoffel_excess,
)

MapFn = Callable[[Tensor], Tensor]

_DGKS = 0.7071
"""Daniel-Gragg-Kaufman-Stewart criterion: a second Gram-Schmidt pass is made only when the
first one removed more than half of ``||w||^2`` (the norm dropped below ``1/sqrt(2)``)."""

_CHECK_EVERY = 4
"""Steps between two early-exit / stopping checks of a single-vector run."""

_STOP_MARGIN = 1e-12
"""Relative margin of the early-exit test (covers the rounding of the small eigensolvers)."""

_SAFE_SCALE = 1e50
"""Operators whose first image has its largest entry within ``[1/_SAFE_SCALE, _SAFE_SCALE]``
are run in their own units (no squares can over- or underflow); others are rescaled."""

F32_UPDATE_MIN_N = 32768
"""From this many coordinates a single-vector run keeps a float32 copy of its basis for the
Gram-Schmidt *update* ``w -= Q^T c`` (the coefficients ``c = Q w`` are always float64). The
update is a memory-bound pass over the basis, half as long in float32 (VGG-16 conv1_2, 40 x
1.7M: 16.4 -> 8.5 ms). ``c`` is scaled by a power of two into float32's range first; the
error is then below ``(j + 3) 2^-23 ||c||_1``, which is checked against ``2^-52 ||w||`` after
the update (a float64 pass follows otherwise): with re-orthogonalisation at every step
``||c||`` is at rounding level, so the result is as orthogonal as the float64 update's. Only
with ``torch.get_float32_matmul_precision() == "highest"`` (the default): other settings
allow reduced-precision float32 products (TF32 on CUDA), and so does a setting torch cannot
report (the legacy and new precision APIs mixed: the getter raises; see
:func:`lipbound._precision.float32_products_exact`)."""

_U32 = 2.0 ** -23
_U64 = 2.0 ** -52

_INVARIANT = 1e-9
"""A residual below this fraction of the largest ``||A q_j||`` means an invariant subspace."""


@dataclass(frozen=True)
class LanczosResult:
    """Outcome of a Lanczos run.

    It unpacks (and indexes) like the 4-tuple ``(theta, vector, k, dim)`` returned by earlier
    versions, so ``theta, vec, k, dim = lanczos_top(...)`` keeps working.

    Attributes:
        theta: the top Ritz value of the operator in its own units (a lower estimate of
            ``||M||^2`` up to rounding), plus the invariant-subspace slack when one was met;
            NaN (with ``sqrt_theta``) when the run could not start: a zero first image (a
            zero operator, or products that underflow) or one too small to rescale.
        vector: the Ritz vector (flat, unit norm); ``None`` only for an empty run.
        k: the Krylov dimension the Kuczynski-Wozniakowski bound may use (single-vector runs:
            ``min(steps, n)`` after a completed run, the steps made after an early exit; block
            runs: the number of block steps).
        dim: the number of Lanczos basis vectors actually spanned (warm vectors excluded).
        dominated: the run stopped early because it could no longer beat ``stop_theta``.
        sqrt_theta: ``sqrt(theta)``, computed without squaring the internal scale.
        image: ``M vector / ||M vector||``, the matching left singular vector estimate;
            ``None`` when ``M vector = 0``.
        matvecs: applications of ``mv`` plus ``rmv`` to single vectors.
        post_sqrt: the a posteriori bound on ``||M||`` (valid unless the start's overlap with a
            top singular vector is below the ``post_c`` floor); ``inf`` when not computed.
        post_stopped: the run stopped because the a posteriori bound reached ``post_stop``.
        block: the block size of the run (1: single-vector).
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
    block: int = 1

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


class _Scaled:
    """``A_s = sc^2 A`` with ``sc`` from the first image, so that no norm under- or
    overflows. Within ``_SAFE_SCALE`` of 1 no rescaling pass is made (``sc = 1``)."""

    def __init__(self, mv: MapFn, rmv: MapFn, first_image: Tensor):
        self.mv, self.rmv = mv, rmv
        c0 = float(first_image.abs().max()) if first_image.numel() else 0.0
        # a zero first image (an underflowed product, or a zero operator), one too small to
        # rescale (1 / c0 overflows) or a non-finite one (overflowed products) gives nothing
        # to build on: the run reports no estimate (callers fall back on the exact route, a
        # certified alternative, or infinity)
        self.usable = 0.0 < c0 < math.inf and math.isfinite(1.0 / c0)
        if self.usable and not (1 / _SAFE_SCALE <= c0 <= _SAFE_SCALE):
            self.sc = 1.0 / c0
        else:
            self.sc = 1.0
        self.fused = 1e-100 < self.sc < 1e100

    def apply(self, img: Tensor) -> Tensor:
        """``sc^2 M^T img`` as a fresh tensor (``img`` an unscaled image)."""
        if self.sc == 1.0:
            return self.rmv(img)
        if self.fused:
            return self.rmv(img) * (self.sc * self.sc)
        return self.rmv(img * self.sc) * self.sc

    def image_norm2(self, img: Tensor) -> float:
        """``sc^2 ||img||^2`` (scaled before the square)."""
        a = _norm(img * self.sc) if self.sc != 1.0 else _norm(img)
        return a * a


def _start_block(n: int, b: int, generator: torch.Generator, device) -> Tensor:
    """``b`` orthonormal rows spanning a uniformly random subspace of ``R^n`` (for ``b = 1``
    the normalised Gaussian draw of earlier versions, bit for bit)."""
    f64 = torch.float64
    if b == 1:
        g = torch.randn(n, generator=generator, dtype=f64).to(device)
        g = g / g.abs().max().clamp_min(1e-300)
        return (g / g.norm()).unsqueeze(0)
    g = torch.randn(b, n, generator=generator, dtype=f64).to(device)
    return torch.linalg.qr(g.T)[0].T.contiguous()


def run_lanczos(mv: MapFn, rmv: MapFn, n: int, steps: int, generator: torch.Generator,
                device, *, block: int = 1, warm: list[Tensor] | None = None,
                stop_theta: float | None = None, kw_full: float | None = None,
                post_c: float | None = None, post_stop: float | None = None) -> LanczosResult:
    """Lanczos on ``A = rmv∘mv`` over ``n`` compact coordinates.

    Args:
        mv, rmv: batched maps ``(b, n) -> (b, n_img)`` and back; ``A V = rmv(mv(V))`` must be
            symmetric positive semidefinite.
        n: the dimension (>= 1).
        steps: the largest number of steps (a single-vector run's basis has at most
            ``min(steps, n)`` vectors, a block run's ``block * min(steps, n // block)``).
        generator: source of the random start (and of restart directions).
        device: where the basis lives.
        block: 1 for the single-vector method, ``b > 1`` for block Lanczos.
        warm: (single-vector runs) extra compact vectors added to the subspace at the end;
            they only enlarge it, so they never lower the Ritz value.
        stop_theta: early exit: stop (``dominated=True``) once the run can no longer report a
            value below ``sqrt(stop_theta)``; single-vector runs need ``kw_full`` (the factor
            the completed run would multiply its Ritz value with), block runs stop once the
            Ritz value itself reaches ``stop_theta`` (their bound is never below it).
        kw_full: see ``stop_theta``.
        post_c: the overlap floor of the a posteriori bound (single vector:
            :func:`lipbound.posterior.overlap_floor`; block:
            :func:`lipbound.posterior.block_overlap_floor`); ``None`` disables it.
        post_stop: stop once the a posteriori bound is at most this factor times the Ritz
            value (the bound holds for every step count on the same event, so the stopping
            rule does not change the failure probability).

    A ``block > 1`` too big for ``n`` or ``steps`` (``n < 3 block`` or ``steps < 2``) runs the
    single-vector method without an a posteriori bound (``post_c`` is then a block floor).

    Returns:
        A :class:`LanczosResult` with compact ``vector``.
    """
    if n < 1 or steps < 1:
        raise ValueError(f"Lanczos needs active coordinates and steps, got n={n}, "
                         f"steps={steps}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if stop_theta is not None and kw_full is None and block == 1:
        raise ValueError("lanczos_top: stop_theta needs kw_full (the full run's KW factor)")
    if block > 1:
        if steps >= 2 and n >= 3 * block:
            return _run_block(mv, rmv, n, block, steps, generator, device,
                              stop_theta=stop_theta, post_c=post_c, post_stop=post_stop)
        # too small for a block run: a single vector, without the a posteriori bound (the
        # given floor is the block method's, far above a single vector's) and, without
        # kw_full, without the early exit
        post_c = post_stop = None
        if kw_full is None:
            stop_theta = None
    return _run_single(mv, rmv, n, steps, generator, device, warm=warm,
                       stop_theta=stop_theta, kw_full=kw_full, post_c=post_c,
                       post_stop=post_stop)


def _run_single(mv: MapFn, rmv: MapFn, n: int, steps: int, generator: torch.Generator,
                device, *, warm: list[Tensor] | None, stop_theta: float | None,
                kw_full: float | None, post_c: float | None,
                post_stop: float | None) -> LanczosResult:
    """Single-vector Lanczos with full re-orthogonalisation (see :func:`run_lanczos`).

    Per step: ``A q_j`` (one ``mv`` and one ``rmv``), the local three-term step (the
    coefficients ``β_{j-1}`` and ``α_j``), one classical Gram-Schmidt pass against the whole
    basis (a second only on cancellation), and the normalisation. ``||A q_j||`` and the norm
    after the three-term step are not computed by extra passes: with an orthonormal basis they
    follow from the coefficients, ``||A q_j||^2 = β_{j-1}^2 + α_j^2 + ||c||^2 + β_j^2``.

    Invariant Krylov space (residual below ``_INVARIANT`` of the largest ``||A q_j||``): in
    exact arithmetic every later Ritz value from the start vector equals the current one, so
    the Kuczynski-Wozniakowski bound for ``min(steps, n)`` steps applies; the residual bounds
    the perturbation and is added to θ (``slack``). The run goes on with a fresh random
    direction orthogonal to the basis; once the basis spans every coordinate, Rayleigh-Ritz
    is exact (``dim == n``). The a posteriori bound is used only before such a restart: at the
    invariant step ``k`` it is the Christoffel bound of ``T_{k-1}`` and ``β_{k-1}`` (that of a
    ``k``-step run; the tiny ``β_k`` is not read, so its rounding does not enter).
    """
    f64 = torch.float64
    k_max = min(steps, n)
    warm_list = list(warm) if warm else []
    size = k_max + len(warm_list)
    q = torch.empty(size, n, dtype=f64, device=device)
    # H = Q A Q^T is held as  sym(h) + tridiag(alphas, betas):  h[:j+1, j] are the
    # coefficients of the full Gram-Schmidt passes (and the explicit warm columns),
    # alphas / betas those of the local three-term step and the subdiagonal. h is the
    # transpose of a row-major ht, so that a step's pass writes its coefficients straight
    # into their row ht[j, :j+1] (no copy into a strided column)
    ht = torch.zeros(size, size, dtype=f64, device=device)
    h = ht.T
    alphas: list[float] = []
    betas: list[float] = []
    q[0] = _start_block(n, 1, generator, device)[0]
    u = mv(q[0:1])
    nmv = 1
    op = _Scaled(mv, rmv, u)
    if not op.usable:
        return _unusable(nmv, 1)
    sc = op.sc
    q32 = None
    # (only where float32 products are float32: "high"/"medium" allow TF32 / bfloat16)
    if n >= F32_UPDATE_MIN_N and float32_products_exact():
        q32 = torch.empty(size, n, dtype=torch.float32, device=device)
        q32[0] = q[0]

    def h_sym(m: int) -> Tensor:
        c = h[:m, :m]
        hs = (c + c.T) * 0.5
        hs.diagonal().add_(torch.tensor(alphas[:m], dtype=f64, device=device))
        if m > 1:
            b_ = torch.tensor(betas[:m - 1], dtype=f64, device=device)
            hs.diagonal(1).add_(b_)
            hs.diagonal(-1).add_(b_)
        return hs

    post_ok = post_c is not None and post_c > 0
    post_best = math.inf
    post_stopped = False
    # per step j: the Gram-Schmidt correction of the diagonal entry (coef_j = h[j, j]) and
    # the squared norm of the coefficients above it (zero in exact arithmetic), as Python
    # floats, so that a check reads the tridiagonal part without touching h; a step only
    # records ||coef||^2, the checks bring these lists up to date (settle)
    dcorr: list[float] = []
    off2: list[float] = []  # cumulative
    c2ns: list[float] = []

    def settle(m: int) -> None:
        i = len(dcorr)
        if i >= m:
            return
        for cj, c2n_ in zip(ht.diagonal()[i:m].tolist(), c2ns[i:m], strict=True):
            dcorr.append(cj)
            off2.append((off2[-1] if off2 else 0.0) + max(c2n_ - cj * cj, 0.0))

    def post_tridiagonal(m: int, beta_m: float) -> list[float] | None:
        """Diagonal of T_m, or None when H is not tridiagonal to NONTRIDIAGONAL_TOL (the
        Frobenius norm of its Gram-Schmidt coefficients above the diagonal)."""
        settle(m)
        diag = [a + c for a, c in zip(alphas[:m], dcorr[:m], strict=True)]
        off = math.sqrt(off2[m - 1]) if m else 0.0
        sz = max(max(abs(a) for a in diag), max(betas[:m - 1], default=0.0), beta_m)
        return diag if off <= NONTRIDIAGONAL_TOL * sz else None

    def top_tridiagonal(m: int) -> float:
        """A lower estimate of the top eigenvalue θ_m of the symmetrised leading m x m block
        of H: that of its tridiagonal part minus the Frobenius norm of the Gram-Schmidt
        coefficients above the diagonal (Weyl; symmetrising does not increase that norm).
        Cheaper than forming H; the checks only decide where to stop. NaN when the run's
        numbers are not finite (overflow)."""
        settle(m)
        diag = [a + c for a, c in zip(alphas[:m], dcorr[:m], strict=True)]
        off = betas[:m - 1]
        if not (all(map(math.isfinite, diag)) and all(map(math.isfinite, off))
                and math.isfinite(off2[m - 1])):
            return math.nan
        return float(torch.linalg.eigvalsh(_tridiagonal(diag, off))[-1]) \
            - math.sqrt(off2[m - 1])

    def post_bound(m: int, beta_m: float) -> float:
        diag = post_tridiagonal(m, beta_m)
        if diag is None:
            return math.inf
        return christoffel_bound(diag, betas[:m - 1], beta_m, post_c)[0]

    stop_norm = None
    if stop_theta is not None:
        stop_norm = math.sqrt(max(stop_theta, 0.0)) * (1 + _STOP_MARGIN)
    last_excess: tuple[int, float] | None = None  # (step, christoffel_excess) of a check
    scale = 0.0
    slack = 0.0
    invariant_seen = False
    dominated = False
    # the early-exit test and the a posteriori test keep their own schedules (both on the
    # grid of multiples of _CHECK_EVERY): a posteriori checks skipped by _skip_checks do not
    # delay the early exit, and an early exit that is far off does not delay them
    next_dom = _CHECK_EVERY if stop_norm is not None else math.inf
    next_post = _CHECK_EVERY
    beta_prev = 0.0
    k = 0
    j = 0
    q_prev = q_cur = q[0]
    while True:
        if j > 0:
            q_prev, q_cur = q_cur, q[j]
            u = mv(q[j:j + 1])
            nmv += 1
        if j == k_max - 1:
            # last step: only the diagonal entry is new (one mv, no rmv)
            alphas.append(op.image_norm2(u))
            k = j + 1
            break
        w = op.apply(u)[0]
        u = None
        nmv += 1
        if j > 0:
            w.add_(q_prev, alpha=-beta_prev)
        alpha = float(torch.dot(q_cur, w))
        w.add_(q_cur, alpha=-alpha)
        qj = q[:j + 1]
        coef = torch.mv(qj, w, out=ht[j, :j + 1])  # column j of h
        if q32 is not None:  # the update from the float32 copy (F32_UPDATE_MIN_N)
            _f32_update(w, q32[:j + 1], coef)
        else:
            w.addmv_(qj.T, coef, alpha=-1.0)
        beta = _norm(w)
        c2n = float(torch.dot(coef, coef))
        nrm1 = math.sqrt(beta * beta + c2n)  # ||w|| after the three-term step
        coarse = q32 is not None and (j + 3) * _U32 * float(coef.abs().sum()) > _U64 * beta
        if beta < _DGKS * nrm1 or coarse:
            c2 = torch.mv(qj, w)
            w.addmv_(qj.T, c2, alpha=-1.0)
            coef += c2
            beta = _norm(w)
            c2n = float(torch.dot(coef, coef))
        c2ns.append(c2n)
        # ||A q_j|| (scaled): the orthogonal parts removed, plus what is left
        nrm0 = math.sqrt(nrm1 * nrm1 + alpha * alpha + beta_prev * beta_prev)
        scale = max(scale, nrm0)
        alphas.append(alpha)
        k = j + 1
        post_checks = post_ok and post_stop is not None
        do_post = post_checks and k >= next_post
        if k >= next_dom or do_post:
            lam = None
            if stop_norm is not None:
                if kw_full == math.inf:
                    dominated = True
                    break
                lam = top_tridiagonal(k)
                if math.isnan(lam):
                    return _unusable(nmv, 1)  # overflow beyond the scaling: no estimate
                bound = math.sqrt(max(lam, 0.0) * kw_full) / sc
                if bound >= stop_norm:
                    dominated = True
                    break
                far = k >= 2 * _CHECK_EVERY and bound < 0.8 * stop_norm
                next_dom = k + (4 if far else 1) * _CHECK_EVERY
            if do_post:
                next_post = k + _CHECK_EVERY
            if do_post and beta > _INVARIANT * scale and scale > 0.0:
                if lam is None:
                    lam = top_tridiagonal(k)
                    if math.isnan(lam):
                        return _unusable(nmv, 1)
                diag = post_tridiagonal(k, beta)
                x_stop = max(lam, 0.0) * post_stop
                excess = -math.inf
                if diag is not None:
                    excess = christoffel_excess(diag, betas[:k - 1], beta, post_c, x_stop)
                if excess >= 0.0:
                    u_j = christoffel_bound(diag, betas[:k - 1], beta, post_c)[0]
                    post_best = min(u_j, x_stop)
                    post_stopped = True
                    break
                next_post = k + _skip_checks(last_excess, excess, k)
                last_excess = (k, excess)
        if beta <= _INVARIANT * scale or scale == 0.0:
            invariant_seen = True
            if post_ok and k >= 3:
                # the a posteriori bound of the steps before this one (T_{k-1} and the
                # residual beta_{k-1}, above the invariance level): the bound a run of k steps
                # reports at its end, valid for every step count on the same event and
                # unaffected by the (numerically) vanishing residual of step k, which it does
                # not read. Without it, a run that became invariant before the check that
                # would have stopped it had no a posteriori bound at all (a 30 x 20 operator
                # with column scales 1e-20..1e20: infinity at 8 steps, 2.2x its norm at 12,
                # where 4 steps gave 1 + 9e-7)
                post_best = post_bound(k - 1, betas[k - 2])
            post_ok = False  # the Krylov recurrence ends here (earlier bounds stay valid)
            slack += beta
            found = 0.0
            v = w
            for _ in range(4):  # a random vector inside the span has probability 0
                gn = torch.randn(n, generator=generator, dtype=f64).to(device)
                v = gn / gn.norm()
                for _ in range(2):
                    v.addmv_(qj.T, torch.mv(qj, v), alpha=-1.0)
                nb = _norm(v)
                if nb > 1e-8:
                    found = nb
                    break
            if not found:
                break  # the basis (numerically) spans every coordinate
            torch.div(v, found, out=q[j + 1])
            beta_prev = float(torch.dot(q[j + 1], w))  # q_{j+1}^T A q_j, |.| <= beta
        else:
            torch.div(w, beta, out=q[j + 1])
            beta_prev = beta
        if q32 is not None:
            q32[j + 1] = q[j + 1]
        betas.append(beta_prev)
        w = v = None
        j += 1

    if post_ok and not dominated and not post_stopped and k >= 3:
        post_best = post_bound(k - 1, betas[k - 2])
    base = k
    e = 0
    for wv in warm_list if not dominated else []:
        v = wv.to(device=device, dtype=f64).reshape(-1).clone()
        nv0 = _norm(v)
        if not (nv0 > 0.0 and math.isfinite(nv0)):
            continue
        v /= nv0
        qa = q[:base + e]
        for _ in range(2):
            v.addmv_(qa.T, torch.mv(qa, v), alpha=-1.0)
        nv = _norm(v)
        if nv <= 1e-8:
            continue
        torch.div(v, nv, out=q[base + e])
        e += 1
    if e:
        wm = op.apply(mv(q[base:base + e]))
        nmv += 2 * e
        cross = q[:base + e] @ wm.T
        h[:base + e, base:base + e] = cross
        h[base:base + e, :base] = cross[:base].T
        alphas.extend([0.0] * e)
        betas.extend([0.0] * e)
    kk = base + e
    hk = h_sym(kk)
    if not bool(torch.isfinite(hk).all()):
        return _unusable(nmv, 1)  # over- or underflow beyond the scaling: no estimate
    evals, evecs = torch.linalg.eigh(hk)
    lam = float(evals[-1])
    vec = torch.mv(q[:kk].T, evecs[:, -1])
    return _finish(mv, op, vec, lam, nmv, slack if invariant_seen else 0.0,
                   k=base if dominated or post_stopped or not invariant_seen else k_max,
                   dim=base, dominated=dominated, post_best=post_best,
                   post_stopped=post_stopped, block=1)


def _tridiagonal(diag: list[float], off: list[float]) -> Tensor:
    """The symmetric tridiagonal matrix with diagonal ``diag`` and off-diagonal ``off`` as a
    dense float64 tensor: the same entries, bit for bit, as
    ``diag(d) + (diag(o, 1) + diag(o, -1))`` (every entry is one of the given numbers or a
    sum with zeros; ``x + 0.0`` turns a ``-0.0`` into ``+0.0`` as those sums do), written
    into one numpy buffer (a few microseconds instead of a handful of tensor operations)."""
    m = len(diag)
    t = np.zeros(m * m, dtype=np.float64)
    if m > 1:
        t[::m + 1] = [a + 0.0 for a in diag]
        o = [b + 0.0 for b in off]
        t[1::m + 1] = o
        t[m::m + 1] = o
    else:
        t[0] = diag[0]
    return torch.from_numpy(t.reshape(m, m))


def _f32_update(w: Tensor, q32: Tensor, coef: Tensor) -> None:
    """``w -= Q^T c`` with the float32 copy ``q32`` of the basis (see ``F32_UPDATE_MIN_N``):
    ``c`` is scaled by a power of two (exact) so that its largest entry lies in [0.5, 1)
    before it is rounded to float32, which keeps the error model ``(j + 3) 2^-23 ||c||_1``
    valid at every scale (no float32 overflow or underflow of the coefficients)."""
    top = float(coef.abs().max())
    if not 0.0 < top < math.inf:
        return  # nothing to remove, or w is not finite already (the checks catch it)
    e = math.frexp(top)[1]
    c32 = (coef * math.ldexp(1.0, -e)).to(torch.float32)
    w.sub_(torch.mv(q32.T, c32).to(w.dtype).mul_(math.ldexp(1.0, e)))


def _unusable(nmv: int, block: int) -> LanczosResult:
    """A run that cannot start (see :class:`_Scaled`) or whose numbers stopped being finite
    (overflow beyond the scaling): no estimate (``sqrt_theta`` NaN)."""
    return LanczosResult(math.nan, None, 0, 0, sqrt_theta=math.nan, matvecs=nmv, block=block)


def _skip_checks(last: tuple[int, float] | None, excess: float, k: int) -> int:
    """Steps to the next a posteriori check: ``_CHECK_EVERY``, or a multiple of it when the
    last two checks' log-excess (:func:`lipbound.posterior.christoffel_excess`, negative:
    not yet passed) grows so slowly that the next few checks cannot pass. The log of the
    Christoffel function grows about linearly with the steps, so checks are skipped over 60 %
    of the predicted distance, in whole multiples of ``_CHECK_EVERY``: the checks that are
    made fall on the same steps as without skipping, so a run stops where it would have
    stopped (or, should the prediction overshoot, a few checks later, with a bound no
    looser), and the bound it reports is the same."""
    if last is None or not math.isfinite(excess) or not math.isfinite(last[1]):
        return _CHECK_EVERY
    rate = (excess - last[1]) / max(1, k - last[0])
    if rate <= 0.0:
        return _CHECK_EVERY
    ahead = int(0.6 * (-excess) / rate) // _CHECK_EVERY * _CHECK_EVERY
    return max(_CHECK_EVERY, min(ahead, 4 * _CHECK_EVERY))


def _finish(mv: MapFn, op: _Scaled, vec: Tensor, lam: float, nmv: int, slack: float, *,
            k: int, dim: int, dominated: bool, post_best: float, post_stopped: bool,
            block: int) -> LanczosResult:
    """Rayleigh quotient of the Ritz vector (one more ``mv``) and the result in the
    operator's own units: ``θ = max(λ_max(H), ||M z||^2 / ||z||^2)`` (both lower estimates of
    ``||M||^2`` up to rounding; a larger θ only makes the reported bound larger)."""
    sc = op.sc
    zn = _norm(vec)
    if zn > 0.0:
        vec.div_(zn)
    mz = mv(vec.unsqueeze(0))[0]
    if sc != 1.0:
        mz = mz * sc
    nmv += 1
    mzn = _norm(mz)
    rq = mzn * mzn if zn > 0.0 else 0.0
    theta_s = max(lam, rq, 0.0) + slack
    image = mz / mzn if mzn > 0.0 and math.isfinite(mzn) else None
    post_sqrt = math.sqrt(post_best) / sc if math.isfinite(post_best) else math.inf
    return LanczosResult(theta_s / sc / sc, vec, k, dim, dominated=dominated,
                         sqrt_theta=math.sqrt(theta_s) / sc, image=image, matvecs=nmv,
                         post_sqrt=post_sqrt, post_stopped=post_stopped, block=block)


def _run_block(mv: MapFn, rmv: MapFn, n: int, b: int, steps: int,
               generator: torch.Generator, device, *, stop_theta: float | None,
               post_c: float | None, post_stop: float | None) -> LanczosResult:
    """Block Lanczos with full re-orthogonalisation (see :func:`run_lanczos`).

    With the ``b`` orthonormal rows ``V_j`` of step ``j`` and ``W = A V_j`` (rows), the block
    three-term step removes ``B_{j-1} V_{j-1}`` and ``A_j V_j`` (``A_j = W V_j^T``), one
    classical Gram-Schmidt pass removes the rest of the basis (a second pass on
    cancellation), and the QR factorisation ``W^T = V_{j+1}^T B_j`` gives the next block.
    ``H`` collects every coefficient; its block-tridiagonal part ``T`` (diagonal blocks
    ``A_j``, sub-diagonal blocks ``B_j``) feeds the a posteriori bound, which is used only
    while the rest of ``H`` is below ``NONTRIDIAGONAL_TOL`` of its scale. A (numerically)
    rank-deficient remainder (a low-rank operator: duplicated or zero rows of a dense layer)
    is orthonormalised with pivoting by :func:`_pivoted_block`, keeping its tiny rows in
    ``B_j`` (session 25: it ended the run, whose Ritz value was then 0.15-0.99 of the norm
    and, before 3 steps, had no a posteriori bound, so that the layer was run again with a
    single vector). When the basis spans all ``n`` coordinates the Rayleigh-Ritz value is
    exact (``dim == n``): only a run that completes its ``n // b`` block steps with ``b``
    dividing ``n`` does (the remainder is factorised only before the last step, when at most
    ``n - b`` vectors are spanned; session 24 removed a flag for that case, which could not
    be set).
    """
    f64 = torch.float64
    kb_max = min(steps, n // b)  # block steps
    size = (kb_max + 1) * b
    q = torch.empty(size, n, dtype=f64, device=device)
    h = torch.zeros(size, size, dtype=f64, device=device)
    v0 = _start_block(n, b, generator, device)
    q[:b] = v0
    img = mv(q[:b])
    nmv = b
    op = _Scaled(mv, rmv, img)
    if not op.usable:
        return _unusable(nmv, b)
    sc = op.sc
    post_ok = post_c is not None and post_c > 0
    post_best = math.inf
    post_stopped = False
    dominated = False
    stop_lam = None
    if stop_theta is not None:
        stop_lam = max(stop_theta, 0.0) * sc * sc * (1 + _STOP_MARGIN)
    scale = 0.0
    off_norm2 = 0.0  # squared Frobenius norm of H outside its block tridiagonal
    check_every = 2 if b >= 4 else 3
    next_check = max(3, check_every)
    k = 0  # completed block steps (A_j known)
    for j in range(kb_max):
        lo, hi = j * b, (j + 1) * b
        if j > 0:
            img = mv(q[lo:hi])
            nmv += b
        w = op.apply(img)
        img = None
        nmv += b
        if j > 0:
            # W = B_{j-1} V_{j-1} + A_j V_j + (the rest): H's block (j, j-1) holds B_{j-1};
            # its mirror (j-1, j) is B_{j-1}^T (column block j of H = Q W^T)
            bprev = h[lo:hi, lo - b:lo]
            w.addmm_(bprev, q[lo - b:lo], alpha=-1.0)
            h[lo - b:lo, lo:hi] += bprev.T
        a_j = w @ q[lo:hi].T
        a_j = (a_j + a_j.T) * 0.5
        w.addmm_(a_j, q[lo:hi], alpha=-1.0)
        qa = q[:hi]
        coef = w @ qa.T  # (b, hi)
        w.addmm_(coef, qa, alpha=-1.0)
        rn = torch.linalg.vector_norm(w, dim=1)
        before = torch.sqrt(rn * rn + (coef * coef).sum(1))
        if bool((rn < _DGKS * before).any()):
            c2 = w @ qa.T
            w.addmm_(c2, qa, alpha=-1.0)
            coef += c2
        scale = max(scale, float(torch.linalg.matrix_norm(a_j)), float(before.max()))
        # column block j of H: projections (coef, transposed into column form) + A_j
        h[:hi, lo:hi] += coef.T
        h[lo:hi, lo:hi] += a_j
        if lo > 0:  # corrections outside the diagonal block (zero in exact arithmetic)
            off_norm2 += float((coef[:, :lo] ** 2).sum())
        k = j + 1
        if j == kb_max - 1:
            break  # T_k is complete; the last remainder is not needed
        # next block: W^T = V_{j+1}^T B_j
        qr_q, qr_r = torch.linalg.qr(w.T)
        if float(torch.diagonal(qr_r).abs().min()) <= _INVARIANT * scale or scale == 0.0:
            # (numerically) rank-deficient remainder (session 25: it ended the run, without an
            # a posteriori bound before 3 steps): pivoted, its tiny rows kept in B_j, the
            # relation stays exact to rounding (hi + b <= kb_max b <= n here)
            nxt = _pivoted_block(w, q[:hi], generator)
            w = None
            if nxt is None:
                break  # (the basis spans, numerically, every coordinate)
            q[hi:hi + b], h[hi:hi + b, lo:hi] = nxt
        else:
            w = None
            q[hi:hi + b] = qr_q.T
            h[hi:hi + b, lo:hi] = qr_r
        if k >= next_check and (stop_lam is not None or (post_ok and post_stop is not None)):
            next_check = k + check_every
            t = _block_tridiagonal(h, k, b)
            if not bool(torch.isfinite(t).all()):
                return _unusable(nmv, b)  # overflow beyond the scaling: no estimate
            lam = float(torch.linalg.eigvalsh(t)[-1])
            if stop_lam is not None and lam >= stop_lam:
                dominated = True
                break
            sz = max(float(t.abs().max()), 1e-300)
            if post_ok and post_stop is not None and \
                    math.sqrt(off_norm2) <= NONTRIDIAGONAL_TOL * sz:
                x_stop = max(lam, 0.0) * post_stop
                if block_christoffel_exceeds(t, b, k, post_c, x_stop):
                    u_j = block_christoffel_bound(t, b, k, post_c)
                    post_best = min(u_j, x_stop)
                    post_stopped = True
                    break
    dim = k * b
    t = _block_tridiagonal(h, k, b)
    if post_ok and not dominated and not post_stopped and k >= 3:
        sz = max(float(t.abs().max()), 1e-300)
        if math.sqrt(off_norm2) <= NONTRIDIAGONAL_TOL * sz:
            post_best = block_christoffel_bound(t, b, k, post_c)
    hs = h[:dim, :dim]
    if not bool(torch.isfinite(hs).all()):
        return _unusable(nmv, b)  # over- or underflow beyond the scaling: no estimate
    evals, evecs = torch.linalg.eigh((hs + hs.T) * 0.5)
    lam = float(evals[-1])
    vec = torch.mv(q[:dim].T, evecs[:, -1])
    return _finish(mv, op, vec, lam, nmv, 0.0, k=k, dim=dim,
                   dominated=dominated, post_best=post_best, post_stopped=post_stopped,
                   block=b)


def _pivoted_block(w: Tensor, qa: Tensor, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor] | None:
    """The next block of a block Lanczos run from a (numerically) rank-deficient remainder.

    Returns rows ``V`` (``b x n``, orthonormal and orthogonal to the basis ``qa``) and
    ``B`` (``b x b``) with ``w = B^T V`` to rounding: column-pivoted Gram-Schmidt on the rows
    of ``w``, each new direction the remaining row's own, normalised and re-orthogonalised
    twice against ``qa`` and the earlier directions. Pivoting makes every entry of a row of
    ``B`` at most its pivot, so a direction that is mostly rounding noise (a dependent row)
    multiplies only coefficients of that size, and the change re-orthogonalisation makes to
    it moves ``B^T V`` by rounding only: the block three-term relation, on which the a
    posteriori bound's identity ``||p(A) V_1^T||_F² = ∫ p² dμ`` rests, holds as for a full-rank
    remainder (dropping the dependent rows instead, deflation, would leave out remainders up
    to ``_INVARIANT`` of the scale, far above rounding). A row that is exactly zero, or lies
    in the basis's span to 1e-8, gets a fresh random direction (its coefficients then are
    those of the rounding). ``None`` when no direction outside the span is found.
    """
    f64 = torch.float64
    b, n = w.shape
    res = w.clone()
    bmat = torch.zeros(b, b, dtype=f64, device=w.device)
    out = torch.empty(b, n, dtype=f64, device=w.device)
    remaining = list(range(b))
    for d in range(b):
        idx = torch.tensor(remaining, device=w.device)
        norms = torch.linalg.vector_norm(res[idx], dim=1)
        p = int(torch.argmax(norms))
        nrm = float(norms[p])
        cand = [res[remaining[p]] / nrm] if nrm > 0.0 and math.isfinite(nrm) else []
        cand += [None] * 4  # (fresh random directions: one outside the span w.p. 1)
        v = None
        for c in cand:
            if c is None:
                c = torch.randn(n, generator=generator, dtype=f64).to(w.device)
                c = c / torch.linalg.vector_norm(c)
            for _ in range(2):
                c = c - qa.T @ (qa @ c)
                if d:
                    c = c - out[:d].T @ (out[:d] @ c)
            nc = float(torch.linalg.vector_norm(c))
            if nc > 1e-8:
                v = c / nc
                break
        if v is None:
            return None
        out[d] = v
        coefs = res[idx] @ v
        bmat[d, idx] = coefs
        res[idx] -= coefs[:, None] * v[None, :]
        remaining.pop(p)
    return out, bmat


def _block_tridiagonal(h: Tensor, k: int, b: int) -> Tensor:
    """The symmetric block-tridiagonal part ``T_k`` of ``H`` (``k`` block steps): diagonal
    blocks (symmetrised) and the sub-diagonal blocks ``B_j`` mirrored above."""
    dim = k * b
    t = torch.zeros(dim, dim, dtype=h.dtype, device=h.device)
    for i in range(k):
        s = slice(i * b, (i + 1) * b)
        d = h[s, s]
        t[s, s] = (d + d.T) * 0.5
        if i + 1 < k:
            s2 = slice((i + 1) * b, (i + 2) * b)
            t[s2, s] = h[s2, s]
            t[s, s2] = h[s2, s].T
    return t
