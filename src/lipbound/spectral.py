"""Spectral norms that are upper bounds.

Two routes, chosen per layer by cost (``mode="auto"``) or forced (``"exact"``/``"lanczos"``):

* **exact** -- the (masked) matrix is formed in float64, from its weights or by applying the
  layer to basis vectors of its smaller side, and its largest singular value is obtained from
  the Gram matrix of the smaller side with explicit rounding terms, the eigensolver's answer
  proven by a Cholesky factorisation (:func:`exact_norm`).
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
KW factor, 1-2 % at the default steps and never more than ``EXIT_FACTOR_CAP``: the certified
value is preferred at that price; see :func:`lanczos_top`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ._indexing import gather_cols, scatter_cols
from ._memory import exact_bytes, physical_memory
from .errors import ExactRouteTooLarge
from .lanczos import _STOP_MARGIN, LanczosResult, run_lanczos
from .ops import winograd
from .ops.base import gamma as _gamma
from .posterior import block_overlap_floor, overlap_floor
from .results import Guarantee

log = logging.getLogger(__name__)

__all__ = ["SAFETY", "FAST_REL_ERROR", "fast_inflation", "SpectralBound", "LanczosResult",
           "RunParameters", "kw_factor", "exact_norm", "lanczos_top", "spectral_upper",
           "run_parameters", "bound_from_run"]

MapFn = Callable[[Tensor], Tensor]

SAFETY = 1e-9
"""Relative margin added to every floating-point spectral value (covers float64 rounding)."""

FAST_REL_ERROR = 1e-8
"""Largest worst-case error of fast (Winograd) products, relative to the operator's norm
estimate, with which a Lanczos run is kept (its value then multiplied by
:func:`fast_inflation`, its spectral method labelled ``"lanczos-winograd"``); above it the run
is repeated with ``conv2d`` products. Set it to 0 to make every run with ``conv2d`` products
(the transformed kernels are then not even built; VGG-16's local bound about 1.6x slower).

What a kept run's guarantee assumes (review of session 24, ``docs/guarantees.md``, "Fast
products"): the probabilistic bounds of a run (Kuczyński-Woźniakowski and the a posteriori
Christoffel bound) are statements about the Krylov space of the *exact* operator from a
uniform start. Products that err by up to ``η ||M||`` *in a direction chosen against the
run* can make it exactly the Lanczos run of another operator: with ``e(x) = -(σ₁ - σ') <v₁,
x> u₁`` in ``mv`` (within the bound while ``|<v₁, x>|`` stays below ``η ||M|| / (σ₁ -
σ')``), ``rmv(mv(x)) = Ã x`` for the PSD ``Ã = M^T M - σ₁ (σ₁ - σ') v₁ v₁^T``. A run from a
start with ``|<q₁, v₁>|`` of the order of ``η`` then reports a bound on ``||Ã||`` (a 400 x 400
operator of norm 2 with ``η = 9e-9``: 1.02, where the same start with exact products gives
2.000000002). Such starts have probability about ``η sqrt(2 (n - 1) / π)`` whatever the
inflation: 1e-7 to 1e-6 for AlexNet's and VGG-16's Winograd layers (``η`` 3e-10 to 1.6e-9 of
the unmasked norms), about the failure probability a layer is given. The same construction
applies to ``conv2d``'s own worst-case rounding (``η`` 7e-13 to 1.5e-11 here) at the level of
tight a posteriori bounds, so *every* float64 Lanczos run rests on the assumption that the
products' rounding is not aligned with the operator's unknown top singular vector (the
backward-stability argument of docs/guarantees.md); runs with fast products rest on it with a
worst-case error 100-300x larger. The real Winograd rounding is 1e4-1e5 below its bound
(about that of ``conv2d``) and no violation was found with it. Whether to keep them by default
is recorded as an open decision (session 24's note)."""


def fast_inflation(eta: float, k: int) -> float:
    """Factor on the value of a Lanczos run whose ``k`` Gram products ``M^T M q_j`` (the
    columns of the projected matrix ``H``) were computed with fast products of relative error
    ``η`` (``||ŷ - y|| <= η sqrt(θ) ||x||`` for ``mv`` and ``rmv`` each, ``θ`` the run's top
    Ritz value).

    Each Gram product is then off by some ``f_j`` with ``||f_j|| <= (2 η + η^2) θ`` (taking
    ``||M||`` as ``sqrt(θ)``: first order), and the symmetrised ``H`` is
    ``Q^T (M^T M) Q + sym(Q^T F)`` with ``||sym(Q^T F)||_2 <= ||F||_F <= sqrt(k) max ||f_j||``:
    the top Ritz value of the computed basis can be ``2 sqrt(k) η θ`` low (``sqrt(k) η``
    relative in ``sqrt(θ)``), not only the ``2 η θ`` of one fixed perturbation that the former
    factor ``1 + 4 η`` assumed. The basis itself also drifts from the Krylov space of the
    exact products: the factor doubles the first-order term. Products whose errors follow the
    sign of one fixed direction's component (within the error bound) lowered ``sqrt(θ)`` by
    ``8.8 η`` in 64 steps, so that ``1 + 4 η`` reported less than the same run with exact
    products; here ``2 (1 + 8) η = 18 η``. Real Winograd rounding is about 1e5 below its
    bound.

    This covers only how far the computed Ritz value can sit below that of the computed
    basis. It does not make the run's probabilistic bounds hold at their failure probability
    for products that err by ``η`` in the worst case: no factor does (see
    :data:`FAST_REL_ERROR`: what a kept run's guarantee assumes)."""
    return 1.0 + 2.0 * (1.0 + math.sqrt(max(1, k))) * eta


EXIT_FACTOR_CAP = 1.1
"""Largest factor the early exit of a single-vector run applies to its Ritz value (see
:func:`run_parameters`): the run stops once ``θ_j min(f, EXIT_FACTOR_CAP) >= a^2`` for the
completed run's KW factor ``f`` and the smallest certified alternative ``a``. The completed
run's bound (KW or a posteriori) is never below ``sqrt(θ_j)``, so the reported alternative
is at most ``sqrt(EXIT_FACTOR_CAP)`` (4.9 %) above it. At the default 64 steps ``f`` is
below the cap whenever ``1.648 sqrt(n) / δ_KW < 2.3e16`` (``n`` up to 1e9 at ``δ_KW =
1e-8``; the analyzer's default 1e-6 over a few dozen layers leaves more), so the cap changes
nothing there; with few steps ``f`` is large or infinite (no finite KW bound), where the
a posteriori bound still is finite. The a posteriori stopping level (``post_stop``, the
whole-δ KW factor of the completed run) is capped likewise."""


BLOCK_SHARE = 0.875
"""Share of a bound's failure probability given to a block Lanczos run; the rest goes to the
single-vector run that follows a block run without a bound (:func:`spectral_upper`)."""


@dataclass(frozen=True)
class SpectralBound:
    """An upper bound on a spectral norm.

    Attributes:
        value: the bound.
        guarantee: CERTIFIED or PROBABILISTIC.
        failure_prob: probability the bound fails (0 if certified).
        method: ``"svd"``, ``"lanczos"``, ``"block-lanczos"``, ``"lanczos-winograd"`` (a
            kept run with fast products), ``"lanczos-full"``, ``"frobenius"``,
            ``"fft-circulant"``, ``"zero"`` or a given alternative's label.
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


EXACT_MEMORY_CHECK_BYTES = 1 << 28
"""The exact route's matrices below this size (256 MB) are formed without asking how much
memory there is."""


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: torch's (CUDA) ``OutOfMemoryError``,
    Python's ``MemoryError`` or the CPU allocator's ``RuntimeError``."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "not enough memory" in text


def exact_too_large(rows: int, cols: int, device) -> ExactRouteTooLarge | None:
    """The error to raise when the exact route's ``rows x cols`` matrix cannot fit in the
    memory of ``device`` (:func:`lipbound._memory.exact_bytes`, a lower estimate of its
    peak), else ``None`` (also when the memory cannot be read)."""
    need = exact_bytes(rows, cols)
    if need <= EXACT_MEMORY_CHECK_BYTES:
        return None
    avail = physical_memory(device)
    if avail is None or need <= avail:
        return None
    return ExactRouteTooLarge(rows, cols, need, avail, _memory_owner(device))


def _memory_owner(device) -> str:
    """Whose memory the exact route uses, for its error message."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "the GPU" if dev.type == "cuda" else "this machine"


def exact_norm(m: Tensor | np.ndarray) -> float:
    """Largest singular value of a dense float64 matrix, as a certified upper bound.

    The value is computed from the Gram matrix of the smaller side (``eigvalsh``), 2.5-8x
    cheaper than an SVD of a rectangular matrix, by :func:`_gram_norm_bound`, and then
    *proven* by a Cholesky factorisation (:func:`_certified_gram_norm`): the eigensolver's
    answer is only used to choose where to look, so an inaccurate (or wrong) eigenvalue cannot
    make the result unsound.

    The matrix is scaled, ``M_s = fl(M / peak)`` with ``peak = max |M_ij|``, and
    ``Ĝ = fl(M_s^T M_s)`` (``k x n``, ``k >= n``). Then ``λ = eigvalsh(Ĝ)[-1]`` and the
    reported value is ``V = _gram_norm_bound(λ, ...)``, as before. For a level μ with
    ``λ < μ`` chosen in closed form so that the certificate below lands just under ``V``, the
    float64 Cholesky factorisation of ``B̂ = fl(μ I - Ĝ)`` is attempted. If it completes, the
    rounding error analysis of Cholesky (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., Thm 10.3) shows ``μ I - Ĝ + D + ΔB = R^T R ⪰ 0`` for the computed
    factor ``R``, with ``D`` diagonal (the rounding of ``μ - Ĝ_ii``) and ``ΔB`` bounded by the
    computed trace, so ``λmax(Ĝ) <= cert(μ)`` (:func:`_cholesky_cert`). This is the idea of
    verifying positive definiteness by a floating-point Cholesky factorisation (Demmel, "On
    floating point errors in Cholesky", LAPACK Working Note 14, 1989; Rump, "Verification of
    positive definiteness", BIT 46, 2006). The exact Gram matrix
    ``G = M_s^T M_s`` of the computed scaled matrix differs from ``Ĝ`` by at most
    ``γ_k |M_s|^T |M_s|`` entrywise, of spectral norm ``<= γ_k ||M_s||_F^2``, so by Weyl's
    inequality ``λmax(G) <= cert(μ) + γ_k ||M_s||_F^2`` (the computed ``||M_s||_F^2`` itself
    enlarged by its rounding bound). Last, ``||M / peak - M_s||_2 <= ||M / peak - M_s||_F <=
    u / (1 - u) ||M_s||_F`` (plus underflow), and ``||M||_2 = peak ||M / peak||_2``. When the
    resulting bound, evaluated with a margin for its own roundings, is ``<= V`` (a rigorous
    forward check: μ only has to be well chosen for it to pass), ``V`` is returned (the same
    bits as the former formula, whose eigensolver error term ``64 n u ||G||`` was an
    assumption; the SAFETY margin ``1e-9`` leaves the room the certificate needs up to Gram
    orders ``n`` of about 2000-3000).

    Otherwise (a larger ``n``, where ``γ_{2(n+1)}`` times the trace does not fit in that room,
    or an eigenvalue too low) the level is raised (``max(λ, max_i Ĝ_ii)`` times ``1 + f``,
    ``f`` from ``64 n u`` up by 16x per try, five tries; the first that completes counts) and
    the certificate's own value, or the Frobenius bound ``||M||_F`` (with its rounding) when it
    is smaller, is returned: slightly larger than ``V`` (about ``n^2 u`` relative: ``4e-10``
    for a Gaussian ``8192 x 4096`` matrix), the only case whose bits differ from the former
    formula. If no factorisation completes, the Frobenius bound is returned.

    ``m`` is a torch tensor (computed on its device) or a numpy array (computed by numpy,
    without torch's per-call overhead, which dominates on the small matrices some rival
    methods of :mod:`lipbound.baselines` take by the thousand).
    """
    if isinstance(m, np.ndarray):
        return _exact_norm_numpy(m)
    if m.numel() == 0:
        return 0.0
    m = m.detach().to(torch.float64)
    if m.shape[0] < m.shape[1]:
        m = m.T
    k, n = m.shape  # inner dimension k >= n
    # (amax: the same maximum of the same non-negative entries as max(), NaN propagated
    # alike; torch's full max() is 2-4x slower on the transposed view: 64 -> 17 us, 164 x 293)
    peak = float(m.abs().amax())
    if peak == 0.0 or not math.isfinite(peak):
        return 0.0 if peak == 0.0 else math.inf
    ms = m / peak  # scaled to avoid under/overflow of the squares
    gram = ms.T @ ms
    top = torch.linalg.eigvalsh(gram)[-1]
    if gram.device.type in _NUMPY_DEVICES:  # numpy views of the CPU tensors
        lam, frob2 = float(top), float((ms * ms).sum())
        del ms
        chol = _numpy_cholesky if n <= _NUMPY_CHOLESKY_MAX else _torch_cholesky
        return _certified_gram_norm(lam, frob2, k, n, peak, *_numpy_factor(gram.numpy(), chol))
    diag = gram.diagonal()
    lam, frob2, g_max, g_trace = torch.stack((
        top, (ms * ms).sum(), diag.max(), diag.sum())).tolist()
    del ms, diag
    # B̂ = fl(μ I - Ĝ) in place of Ĝ (no longer needed): the negation is exact; only the
    # diagonal, fl(μ - Ĝ_ii) = fl(-Ĝ_ii + μ), is rounded
    neg = gram.neg_()
    neg_diag = neg.diagonal()
    saved = neg_diag.clone()

    def factor(mu: float) -> tuple[bool, float]:
        neg_diag.copy_(saved)
        neg_diag.add_(mu)
        fac, info = torch.linalg.cholesky_ex(neg)  # reads the lower triangle only
        r = fac.diagonal()
        st = torch.stack((info.to(torch.float64), r.min(), r.sum(), neg_diag.sum())).tolist()
        # min is NaN if any entry is; the sum of positive entries is finite iff all are
        ok = st[0] == 0 and st[1] > 0 and math.isfinite(st[2])
        return ok, st[3]

    return _certified_gram_norm(lam, frob2, k, n, peak, g_max, g_trace, factor)


_NUMPY_DEVICES = ("cpu",)
"""Devices whose tensors :func:`exact_norm` certifies through numpy views (the small
element-wise steps cost about 1 microsecond in numpy, 2-4 in torch); the factorisation itself
is numpy's up to :data:`_NUMPY_CHOLESKY_MAX`, torch's above (faster there, one thread). The
values are the same either way: the reported value is computed by torch, the certificate only
accepts it. (Tests empty it to run the device path on the CPU.)"""

_NUMPY_CHOLESKY_MAX = 96
"""Largest Gram order factorised by numpy in the certificate of a CPU tensor."""


def _numpy_cholesky(b: np.ndarray) -> np.ndarray | None:
    """Diagonal of numpy's lower Cholesky factor of ``b`` (it reads the lower triangle only),
    ``None`` when the factorisation fails."""
    try:
        return np.diagonal(np.linalg.cholesky(b))
    except np.linalg.LinAlgError:
        return None


def _torch_cholesky(b: np.ndarray) -> np.ndarray | None:
    """:func:`_numpy_cholesky` by torch (on the CPU, from a view of ``b``)."""
    fac, info = torch.linalg.cholesky_ex(torch.from_numpy(b))  # lower triangle only
    return np.diagonal(fac.numpy()) if int(info) == 0 else None


def _numpy_factor(gram: np.ndarray,
                  cholesky: Callable[[np.ndarray], np.ndarray | None] = _numpy_cholesky
                  ) -> tuple[float, float, Callable[[float], tuple[bool, float]]]:
    """``(max_i Ĝ_ii, Σ_i Ĝ_ii, factor)`` for :func:`_certified_gram_norm`, by numpy (the
    factorisation by ``cholesky``). ``gram`` (writable, no longer needed) is overwritten by
    ``fl(μ I - Ĝ)``."""
    n = gram.shape[0]
    gram = np.ascontiguousarray(gram)  # (no copy when it is: the diagonal view below)
    # B̂ = fl(μ I - Ĝ) in place of Ĝ: the negation is exact; only the diagonal,
    # fl(μ - Ĝ_ii) = fl(-Ĝ_ii + μ), is rounded
    neg = np.negative(gram, out=gram)
    b_diag = neg.reshape(-1)[:: n + 1]  # a writable view of the diagonal
    saved = b_diag.copy()
    g_diag = (-saved).tolist()  # Ĝ_ii, exactly
    g_max, g_trace = max(g_diag), math.fsum(g_diag)

    def factor(mu: float) -> tuple[bool, float]:
        np.add(saved, mu, out=b_diag)
        r = cholesky(neg)
        if r is None:
            return False, math.nan
        # (Python floats: numpy's reductions cost more on these short vectors; fsum is
        # correctly rounded, within the γ_n of any summation order)
        ok = all(0.0 < x < math.inf for x in r.tolist())
        return ok, math.fsum(b_diag.tolist())

    return g_max, g_trace, factor


def _exact_norm_numpy(m: np.ndarray) -> float:
    """:func:`exact_norm` of a numpy array, computed by numpy (the same steps)."""
    m = np.asarray(m, dtype=np.float64)
    if m.size == 0:
        return 0.0
    if m.shape[0] < m.shape[1]:
        m = m.T
    k, n = m.shape  # inner dimension k >= n
    peak = float(np.max(np.abs(m)))
    if peak == 0.0 or not math.isfinite(peak):
        return 0.0 if peak == 0.0 else math.inf
    ms = m / peak  # scaled to avoid under/overflow of the squares
    gram = ms.T @ ms  # numpy computes a product of this form as a symmetric rank-k update
    lam = float(np.linalg.eigvalsh(gram)[-1])
    frob2 = float(np.einsum("ij,ij->", ms, ms))
    del ms  # the factorisation's memory instead
    return _certified_gram_norm(lam, frob2, k, n, peak, *_numpy_factor(gram))


def _gram_norm_bound(lam: float, frob2: float, k: int, n: int, peak: float) -> float:
    """The value :func:`exact_norm` reports when its certificate proves it.

    Args:
        lam: the largest eigenvalue the symmetric eigensolver returned for the float64 Gram
            matrix ``fl(M_s^T M_s)`` of the scaled matrix ``M_s = M / peak``.
        frob2: the computed ``||M_s||_F^2``.
        k: the inner dimension of the Gram product (the larger side of ``M``).
        n: the order of the Gram matrix (the smaller side).
        peak: the scale, ``max |M_ij|``.

    Returns:
        ``sqrt(lam (1 + 64 n u) + γ_k ||M_s||_F^2 (1 + 64 n u))`` times ``peak`` with the
        relative margin SAFETY, one ulp up: the former certified value, which assumed an
        eigensolver backward error ``<= 64 n u ||G||``; it is now an upper bound only once
        :func:`_certified_gram_norm` has proven it.
    """
    u = 2.0 ** -53
    gamma = k * u / (1 - k * u)
    lam_up = max(lam, 0.0) * (1 + 64 * n * u) + gamma * frob2 * (1 + 64 * n * u)
    # one ulp up: the relative margins vanish on the subnormal grid
    return math.nextafter(math.sqrt(lam_up) * peak * (1 + SAFETY), math.inf)


_U = 2.0 ** -53
"""Unit roundoff of float64."""

_TINY = 2.0 ** -1000
"""Unit of the absolute terms that cover underflow (scaled problems have ``λmax >= 1``)."""

_CERT_TRIES = 5
"""Levels tried after the one that would prove the formula's value (:func:`exact_norm`)."""

_CERT_STEP = 16.0
"""Factor by which the relative gap ``μ / λ - 1`` grows from one try to the next."""

_LAST_MARGIN = 1e-12
"""Relative room left below the formula's value when its level is chosen: covers the
difference between the estimated and the computed trace and the last roundings (each a few
``u``); the check itself is rigorous, this only makes it succeed."""


def _cholesky_cert(mu: float, trace: float, g_max: float, n: int) -> float:
    """Upper bound on λmax(Ĝ) from a completed Cholesky factorisation of ``B̂ = fl(μ I - Ĝ)``
    (real symmetric ``Ĝ`` of order n, μ > 0), given the computed trace of ``B̂``.

    Proof (real counterpart of :func:`lipbound.ops.conv._cholesky_upper`). The negation is
    exact and only the diagonal is rounded: ``B̂_ii = (μ - Ĝ_ii)(1 + δ_i)``, ``|δ_i| <= u``, so
    ``B̂ = μ I - Ĝ + D`` with ``D`` diagonal, ``|D_ii| <= u (μ + |Ĝ_ii|)`` (a difference that
    underflows is exact). If the factorisation completes (``info == 0``, the diagonal of
    ``R`` finite and positive: a non-finite off-diagonal entry would make a later pivot NaN or
    ``-inf``), the computed factor satisfies ``R^T R = B̂ + ΔB`` with
    ``|ΔB| <= γ_{n+1} |R^T| |R|`` entrywise, for any order of the inner products, blocked
    codes included (Higham, Thm 10.3). We take ``γ_c = γ_{2(n+1)}``: it also covers codes that
    multiply by a computed reciprocal or reciprocal square root instead of dividing (a few
    more roundings per entry). With ``r_j`` the columns of ``R``,
    ``(|R^T| |R|)_ij <= ||r_i|| ||r_j||``, so ``||ΔB||_2 <= γ_c Σ_j ||r_j||^2``; on the
    diagonal ``||r_j||^2 = B̂_jj + ΔB_jj <= B̂_jj + γ_c ||r_j||^2``, so ``B̂_jj >= 0`` and
    ``Σ_j ||r_j||^2 <= trace(B̂) / (1 - γ_c)`` (we use the weaker ``1 / (1 - n γ_c)``); the
    computed trace ``t̂`` of these non-negative terms has ``trace(B̂) <= t̂ / (1 - γ_n)``.
    From ``R^T R ⪰ 0``: ``Ĝ = μ I + D + ΔB - R^T R ⪯ (μ + max|D_ii| + ||ΔB||_2) I``, i.e.

        λmax(Ĝ) <= μ + γ_c t̂ / ((1 - γ_n)(1 - n γ_c)) + u (μ + max_i |Ĝ_ii|).

    Underflow adds at most ``2^-1022 max(1, |r_jj|)`` per operation to an entry of ``ΔB``;
    ``n^2 2^-1000 (1 + μ + max_i |Ĝ_ii|)`` covers it in norm. The evaluation of this sum of
    non-negative terms takes about a dozen roundings (the computed γ's included), covered by
    the factor ``1 + 32 u``. Which triangle the factorisation reads does not matter: the
    statement holds for the symmetric matrix that triangle defines, whose entries are entries
    of ``Ĝ`` (each within the Gram rounding bound of the exact one).

    Returns:
        The bound, or ``inf`` when it does not apply (``n γ_c >= 1/2``, μ not positive, or a
        non-finite trace).
    """
    g_c = _gamma(2 * (n + 1))
    if not (n * g_c < 0.5 and mu > 0 and math.isfinite(mu) and math.isfinite(trace)
            and trace >= 0):
        return math.inf
    up = (mu + g_c * trace / ((1.0 - _gamma(n)) * (1.0 - n * g_c)) + _U * (mu + g_max)
          + n * n * _TINY * (1.0 + mu + g_max))
    return up * (1.0 + 32.0 * _U)


def _norm_from_gram_bound(lg: float, f2: float, k: int, n: int, peak: float) -> float:
    """``||M||_2`` bound from ``lg >= λmax(M_s^T M_s)`` (exact Gram matrix of the computed
    scaled matrix ``M_s = fl(M / peak)``) and ``f2 >= ||M_s||_F^2``.

    ``|M_ij / peak - (M_s)_ij| <= u / (1 - u) |(M_s)_ij| + 2^-1075``, so
    ``||M / peak||_2 <= sqrt(lg) + u / (1 - u) sqrt(f2) + sqrt(k n) 2^-1075`` (Frobenius norm
    of the difference; ``(k + n) 2^-1000`` covers the last term). The evaluation of ``x``
    (at most about twenty roundings of non-negative terms, those of ``lg`` and ``f2``
    included, each a relative ``u``) is covered by ``1 + 64 u``; ``fl(peak x)`` is then
    ``>= peak x (1 - u)`` or, on the subnormal grid, ``>= peak x - 2^-1075``: the factor
    ``1 + 4 u`` and one ulp up cover both.
    """
    x = math.sqrt(lg) + _U / (1.0 - _U) * math.sqrt(f2) + (k + n) * _TINY
    x = x * (1.0 + 64.0 * _U)
    return math.nextafter(peak * x * (1.0 + 4.0 * _U), math.inf)


def _certified_gram_norm(lam: float, frob2: float, k: int, n: int, peak: float, g_max: float,
                         g_trace: float, factor: Callable[[float], tuple[bool, float]]
                         ) -> float:
    """The certified value of :func:`exact_norm` from its computed parts.

    Args:
        lam: ``eigvalsh(Ĝ)[-1]`` (only used to choose the levels).
        frob2: the computed ``||M_s||_F^2``.
        k, n: the inner dimension and the order of ``Ĝ``.
        peak: the scale ``max |M_ij|``.
        g_max, g_trace: the computed ``max_i Ĝ_ii`` and ``Σ_i Ĝ_ii`` (only used to choose the
            levels; ``g_max`` also enters the certificate).
        factor: ``factor(μ) -> (completed, computed trace of fl(μ I - Ĝ))``: one Cholesky
            factorisation of ``fl(μ I - Ĝ)`` (:func:`_cholesky_cert`).

    Returns:
        ``_gram_norm_bound(...)`` when a factorisation proves it, else the value of a
        certificate at a higher level or the Frobenius bound, whichever is smaller.
    """
    value = _gram_norm_bound(lam, frob2, k, n, peak)
    # ||M_s||_F^2 <= computed sum of k n rounded squares / (1 - γ_{kn+1}) + underflow
    g_f = _gamma(k * n + 1)
    if not g_f < 0.5:
        return math.inf  # beyond any memory: k n >= 2^51
    f2 = frob2 / (1.0 - g_f) + (k * n) * _TINY
    # ||Ĝ - G||_2 <= γ_k ||M_s||_F^2 (+ underflow, k products per entry, n entries per row)
    gram_err = _gamma(k) * f2 + k * n * _TINY
    g_c = _gamma(2 * (n + 1))
    base = max(lam, g_max) if math.isfinite(lam) else g_max

    def attempt(mu: float) -> float:
        if not (mu > g_max and math.isfinite(mu)):
            return math.inf  # the factorisation would fail: λmax(Ĝ) >= max_i Ĝ_ii
        ok, trace = factor(mu)
        if not ok:
            return math.inf
        cert = _cholesky_cert(mu, trace, g_max, n)
        return _norm_from_gram_bound(cert + gram_err, f2, k, n, peak)

    # 1. the level whose certificate lands just under the formula's value
    if math.isfinite(value) and n * g_c < 0.5:
        x = value / (peak * (1.0 + _LAST_MARGIN)) - _U / (1.0 - _U) * math.sqrt(f2)
        lam_t = (x * x - gram_err) / (1.0 + 32.0 * _U)
        c = g_c / ((1.0 - _gamma(n)) * (1.0 - n * g_c))
        # cert(μ) ≈ μ (1 + u + c n) - c trace(Ĝ) + u g_max + n^2 2^-1000 (1 + μ + g_max)
        mu = (lam_t + c * g_trace - _U * g_max - n * n * _TINY * (1.0 + g_max)) / (
            1.0 + _U + c * n + n * n * _TINY)
        first = attempt(mu) if mu > lam else math.inf
        if first <= value:
            return value
    elif value == math.inf:
        return value  # overflow of the scaled-back value: inf is an upper bound
    else:
        first = math.inf
    # 2. higher levels (the first that completes); the certificate's own value
    best = min(first, _norm_from_gram_bound(f2, f2, k, n, peak))  # λmax(G) <= trace(G)
    f = 64.0 * n * _U
    for _ in range(_CERT_TRIES):
        got = attempt(base * (1.0 + f))
        if got < math.inf:
            log.debug("exact_norm: certified at a level %.3g above the top eigenvalue", f)
            return min(got, best)
        f *= _CERT_STEP
    log.debug("exact_norm: no Cholesky certificate at Gram order %d; Frobenius bound", n)
    return best


def _compact_maps(mv: MapFn, rmv: MapFn, idx: Tensor, n_full: int, swap: bool
                  ) -> tuple[MapFn, MapFn]:
    """Maps on compact vectors (the coordinates ``idx`` of one side) for the Lanczos engine:
    ``A = M^T M`` on the input coordinates (``swap=False``) or ``M M^T`` on the output ones.
    The first map returns full-length images, the second gathers back to ``idx``."""
    everything = idx.numel() == n_full

    def scatter(v: Tensor) -> Tensor:
        if everything:
            return v
        return scatter_cols(v.new_zeros(v.shape[0], n_full), idx, v)

    def gather(x: Tensor) -> Tensor:
        return x if everything else gather_cols(x, idx)

    first, second = (rmv, mv) if swap else (mv, rmv)
    return (lambda v: first(scatter(v))), (lambda y: gather(second(y)))


def lanczos_top(mv: MapFn, rmv: MapFn, cols: Tensor, n_in: int, steps: int,
                generator: torch.Generator, device, warm: list[Tensor] | None = None, *,
                stop_theta: float | None = None, kw_full: float | None = None,
                post_c: float | None = None, post_stop: float | None = None,
                block: int = 1) -> LanczosResult:
    """Lanczos with full re-orthogonalisation on ``A = M^T M`` restricted to coordinates
    ``cols`` (:func:`lipbound.lanczos.run_lanczos` on the compact coordinates).

    ``M`` is given by batched flat maps ``mv: (B, n_in) -> (B, n_out)`` and its transpose
    ``rmv``; it must vanish outside the input coordinates ``cols``. The start vector is uniform
    on the unit sphere of ``span(e_i, i in cols)`` (the assumption of Kuczyński & Woźniakowski,
    SIAM J. Matrix Anal. Appl. 13(4), 1992); with ``block = b > 1`` the start is ``b``
    orthonormalised Gaussian vectors there (block Lanczos). The returned ``vector`` is in the
    full ``n_in`` coordinates (zero outside ``cols``), ``image`` is ``M vector / ||M vector||``.

    Single-vector semantics: after the last step only ``||M q_{k-1}||^2`` (one ``mv``, no
    ``rmv``) is needed; the reported Ritz value is ``max(λ_max(H), ||M z||^2)`` for the Ritz
    vector ``z``. Early exit: with ``stop_theta`` (in the operator's own units, ``θ ~
    ||M||^2``) and ``kw_full`` (the factor the completed run would multiply θ with), every few
    steps the top eigenvalue ``θ_j`` of the leading block of ``H`` is computed and the run stops
    (``dominated=True``) once ``θ_j * kw_full >= stop_theta``: Ritz values of nested subspaces
    never decrease (Cauchy interlacing), so the full run would report at least that, and when
    ``stop_theta`` comes from a certified bound, reporting it is never looser and certified.
    ``kw_full = inf`` means the full run cannot give a finite bound. With ``post_c`` the
    a posteriori Christoffel bound of :mod:`lipbound.posterior` is computed (and with
    ``post_stop`` the run stops once it is within that factor of ``θ_j``). Invariant Krylov
    spaces restart with fresh random directions; warm vectors (masked to ``cols``) only
    enlarge the subspace. See :mod:`lipbound.lanczos` for the details.
    """
    n = cols.numel()
    if n < 1 or steps < 1:
        raise ValueError(f"lanczos_top needs active coordinates and steps, got n={n}, "
                         f"steps={steps}")
    cols = cols.to(device)
    mv_c, rmv_c = _compact_maps(mv, rmv, cols, n_in, swap=False)
    warm_c = None
    if warm:
        warm_c = [w_.to(device=device, dtype=torch.float64).reshape(-1)[cols] for w_ in warm]
    res = run_lanczos(mv_c, rmv_c, n, steps, generator, device, block=block, warm=warm_c,
                      stop_theta=stop_theta, kw_full=kw_full, post_c=post_c,
                      post_stop=post_stop)
    vec = res.vector
    if vec is not None and n != n_in:
        full = torch.zeros(n_in, dtype=vec.dtype, device=vec.device)
        full[cols] = vec
        vec = full
    return replace(res, vector=vec)


def spectral_upper(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], *,
                   n_in: int, n_out: int, cols: Tensor, rows: Tensor, device,
                   dense: Callable[[], Tensor] | None = None, apply_flops: float,
                   mode: str = "auto", steps: int = 64, failure_prob: float = 1e-7,
                   generator: torch.Generator | None = None, exact_budget: float = 1e9,
                   certified_alternatives: tuple[tuple[float, str], ...] = (),
                   warm: list[Tensor] | None = None,
                   fast_error: float | None = None, block: int = 1,
                   compact_maps: Callable[[bool], tuple[MapFn, MapFn]] | None = None,
                   probe: Tensor | None = None,
                   probe_step: tuple[float, Tensor] | None = None) -> SpectralBound:
    """Upper bound on ||M||_2 for the operator M given by ``mv`` (and transpose ``rmv``), which
    is zero outside input coordinates ``cols`` and output coordinates ``rows``.

    Args:
        mv, rmv: batched flat maps ``(B, n_in) -> (B, n_out)`` and back.
        cols, rows: long tensors of the active input / output coordinates, distinct (so
            that as many as the side has select all of it, in order).
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
            included). The run is kept only if the error is below ``FAST_REL_ERROR`` (default
            1e-8; 0: never used, the run is made with ``conv2d`` products) times its norm
            estimate, otherwise it is repeated with the same start vector and ``conv2d``
            products (an all-zero kernel, ``fast_error == 0``, has exact fast products); a
            kept run's value is multiplied by :func:`fast_inflation` of ``fast_error /
            estimate`` and the number of products in its basis, and its method is
            ``"lanczos-winograd"`` (its failure probability assumes rounding not aligned with
            the top singular vectors: see :data:`FAST_REL_ERROR`).
        block: block size of the Lanczos run (1: single vector; ``b > 1``: block Lanczos,
            cheaper where ``b`` products cost little more than one, e.g. memory-bound dense
            layers; its a posteriori bound takes ``BLOCK_SHARE`` of the failure probability).
            A block run that yields no a posteriori bound is repeated with a single vector,
            with the rest of the failure probability (a union bound over the two runs).
        compact_maps: ``compact_maps(swap)`` returns the Lanczos engine's maps on compact
            coordinates (``swap=False``: ``cols``, first map ``M``, second ``M^T`` gathered to
            ``cols``; ``swap=True``: ``rows``, first ``M^T``, second ``M`` gathered to
            ``rows``); by default they are built from ``mv`` / ``rmv`` by scatter and gather.
        probe: a vector of the input space (flat ``n_in``) expected to be close to a top right
            singular vector (:func:`lipbound.ops.conv.circulant_probe`). Before a
            single-vector run, up to ``PROBE_STEPS`` power steps from it give Rayleigh
            quotients ``ℓ <= ||M||``; when ``ℓ^2`` passes the early-exit test of the run
            (``ℓ^2 f >= alternative^2``, ``f`` the completed run's KW factor capped at
            ``EXIT_FACTOR_CAP``) the smallest certified alternative is reported without a
            run. As with the early exit, that value is then at most ``sqrt(f)`` times
            ``||M||``.
        probe_step: ``(ℓ, z)``, the first of those power steps already made by the caller
            from ``probe`` with the same ``M`` (``z = M^T M x`` for a multiple ``x`` of the
            probe, ``ℓ = ||z|| / ||M x||``); probing continues from there. Used only when
            ``cols`` covers every column (a whole layer, as in global bounds); otherwise
            probing starts from ``probe``. Like the probe itself it only chooses the route:
            what is reported is a certified alternative or a run's bound.

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
        too_big = exact_too_large(ma, na, device)
        if too_big is not None:
            if mode == "exact":
                raise too_big
            use_exact = False  # auto: Lanczos rather than a matrix that cannot fit

    def exact() -> SpectralBound:
        if dense is not None:
            m = dense()
            # distinct coordinates (as everywhere here, see _compact_maps): all of them select
            # the whole matrix, which is then used as it is (a contiguous one, as the copy
            # that indexing makes: the same entries in the same layout)
            if rows.numel() != m.shape[0] or not m.is_contiguous():
                m = m[rows]
            if cols.numel() != m.shape[1] or not m.is_contiguous():
                m = m[:, cols]
        else:
            m = _materialize(mv, rmv, n_in, n_out, cols, rows, device)
        val = exact_norm(m)
        best = SpectralBound(val, Guarantee.CERTIFIED, 0.0, "svd", val / (1 + SAFETY))
        if alts and alts[0][0] < val:
            return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], val)
        return best
    if use_exact:
        try:
            return exact()
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            # the memory check above reads the device's total memory: on a GPU shared with
            # other processes (or a machine short of memory) forming the matrix can still fail
            if mode == "exact":
                raise ExactRouteTooLarge(ma, na, exact_bytes(ma, na), None,
                                         _memory_owner(device)) from exc
            log.info("the exact route's %d x %d matrix did not fit (%s); Lanczos instead",
                     ma, na, type(exc).__name__)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # Lanczos on the smaller side: ||M|| = ||M^T||, and the basis, the re-orthogonalisation
    # and the KW dimension are those of the side actually used (compact coordinates).
    swap = ma < na
    idx, n_full, n_used = (rows, n_out, ma) if swap else (cols, n_in, na)
    idx = idx.to(device)
    if compact_maps is not None:
        l_mv, l_rmv = compact_maps(swap)
    else:
        l_mv, l_rmv = _compact_maps(mv, rmv, idx, n_full, swap)
    l_warm = None
    if warm:
        l_warm = []
        for w_ in warm:
            w_ = w_.to(device=device, dtype=torch.float64).reshape(1, -1)
            if swap:  # M v is the matching left vector: a warm start for M M^T
                w_ = mv(w_)
            l_warm.append(w_[0][idx])
    b = max(1, int(block))
    if b > 1 and not (steps >= 2 and n_used >= 3 * b):
        b = 1
    if probe is not None and b == 1 and alts:
        hit = _probe_dominates(mv, rmv, probe, cols, n_in, device,
                               run_parameters(n_used, steps, failure_prob, alts, 1), alts,
                               probe_step if na == n_in else None)
        if hit is not None:
            return hit

    def attempt(bs: int, fp: float) -> tuple[LanczosResult, float, float | None]:
        """One run with block size bs and failure probability fp: (result, fast-product
        inflation, KW failure prob)."""
        prm = run_parameters(n_used, steps, fp, alts, bs)

        def run() -> LanczosResult:
            return run_lanczos(l_mv, l_rmv, n_used, steps, gen, device, block=bs,
                               warm=l_warm if bs == 1 else None,
                               stop_theta=prm.stop_theta, kw_full=prm.kw_full,
                               post_c=prm.post_c, post_stop=prm.post_stop)

        infl = 1.0
        fe = fast_error
        if fe is not None and fe > 0.0 and (
                FAST_REL_ERROR <= 0.0 or (alts and fe > FAST_REL_ERROR * alts[0][0])):
            # fast products off (FAST_REL_ERROR = 0), or the norm is below a
            # certified bound too small for them: conv2d products from the start
            fe = None
        if fe is not None and math.isfinite(fe):
            state = gen.get_state()
            with winograd.enabled():
                res = run()
            if fe == 0.0:
                pass  # an all-zero kernel: exact products
            elif fe <= FAST_REL_ERROR * res.sqrt_theta:
                # every basis vector's product enters H (warm vectors too)
                n_prod = res.dim + (len(l_warm) if bs == 1 and l_warm else 0)
                infl = fast_inflation(fe / res.sqrt_theta, n_prod)
            else:
                gen.set_state(state)  # same start vector, float64 conv2d products
                res = run()
        else:
            res = run()
        return res, infl, prm.delta_kw

    state0 = gen.get_state() if b > 1 else None  # (only a block run is ever repeated)
    # a block run that yields no bound is followed by a single-vector run: the reported
    # bound fails only if one of the two runs' events fails, so they share δ (union bound)
    res, fast_infl, delta_kw = attempt(b, failure_prob * (BLOCK_SHARE if b > 1 else 1.0))
    if b > 1 and not res.dominated and res.dim < n_used and not math.isfinite(res.post_sqrt):
        # no a posteriori bound from the block run (it has no a priori one): single vector
        gen.set_state(state0)
        res, fast_infl, delta_kw = attempt(1, failure_prob * (1.0 - BLOCK_SHARE))
    if math.isnan(res.sqrt_theta) and not alts and exact_cost <= 4.0 * exact_budget:
        # no estimate (a zero first image: a zero operator, or products that underflow) and
        # nothing certified to fall back on: the exact route where affordable, else infinity
        return exact()
    # the returned vector is always a right singular vector estimate of M (input side)
    if swap:
        vec = res.image
    else:
        vec = res.vector
        if vec is not None and na != n_in:
            full = torch.zeros(n_in, dtype=vec.dtype, device=vec.device)
            full[idx] = vec
            vec = full
    return bound_from_run(res, n_used, failure_prob, delta_kw, alts, fast_infl, vec)


PROBE_STEPS = 2
"""Power steps from a probe vector (see :func:`spectral_upper`, ``probe``)."""


def _probe_dominates(mv: MapFn, rmv: MapFn, probe: Tensor, cols: Tensor, n_in: int, device,
                     prm: RunParameters, alts: list[tuple[float, str]],
                     first: tuple[float, Tensor] | None = None) -> SpectralBound | None:
    """The smallest certified alternative when a Rayleigh quotient from ``probe`` passes the
    early-exit test of the run ``prm`` describes (see :func:`spectral_upper`), else None.

    With ``x`` the probe restricted to ``cols`` and ``y = M x``: ``||M^T y|| / ||y||`` is at
    least ``||y|| / ||x||`` (Cauchy-Schwarz) and at most ``||M||``; the next step starts from
    ``M^T y``. Probing stops after the first step when the quotient is more than 2 % short
    of the test (a probe far from the top: Lanczos will do better). ``first``: the first
    step's ``(ℓ, M^T y)``, already computed by the caller on every column (``spectral_upper``
    passes it only when ``cols`` covers them all)."""
    if prm.stop_theta is None or prm.kw_full is None or not math.isfinite(prm.kw_full):
        return None
    x = probe.to(device=device, dtype=torch.float64).reshape(1, -1)
    if x.shape[1] != n_in:
        return None
    if cols.numel() != n_in:
        keep = torch.zeros_like(x)
        keep[:, cols] = x[:, cols]
        x = keep
    need = math.sqrt(prm.stop_theta) * (1 + _STOP_MARGIN)
    root_f = math.sqrt(prm.kw_full)
    for step in range(PROBE_STEPS):
        if step == 0 and first is not None:
            ell, z = first
            z = z.to(device=device, dtype=torch.float64).reshape(1, -1)
            if z.shape[1] != n_in or not (math.isfinite(ell) and ell > 0.0):
                return None
        else:
            top = float(x.abs().max())
            if not 0.0 < top < math.inf:
                return None
            x = x / top
            y = mv(x)
            ny = float(torch.linalg.vector_norm(y))
            if not 0.0 < ny < math.inf:
                return None
            z = rmv(y)
            ell = float(torch.linalg.vector_norm(z)) / ny
            if not math.isfinite(ell):
                return None
        if ell * root_f >= need:
            vec = z.reshape(-1)
            return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], ell,
                                 vec / float(torch.linalg.vector_norm(vec)))
        if ell * root_f < 0.98 * need:
            return None
        x = z
    return None


@dataclass(frozen=True)
class RunParameters:
    """What a Lanczos run of :func:`spectral_upper` is told (see :func:`run_parameters`)."""

    post_c: float | None
    delta_kw: float | None
    stop_theta: float | None
    kw_full: float | None
    post_stop: float | None


def run_parameters(n_used: int, steps: int, failure_prob: float,
                   alts: list[tuple[float, str]], block: int = 1) -> RunParameters:
    """The failure-probability split, the early exit against the smallest certified
    alternative ``alts[0]`` (sorted ascending) and the a posteriori stopping level of a run
    on ``n_used`` coordinates (see :func:`spectral_upper`)."""
    k_full = min(steps, n_used)
    if block > 1:
        # block runs report their a posteriori bound alone, with the whole δ they are given
        post_c = block_overlap_floor(n_used, block, failure_prob)
        delta_kw = None
    else:
        # δ is split between the two probabilistic bounds reported as their minimum:
        # Kuczynski-Wozniakowski (a priori) and the Christoffel bound (a posteriori)
        post_c = overlap_floor(n_used, failure_prob / 2)
        delta_kw = failure_prob / 2 if post_c is not None else failure_prob  # n < 3
    stop_theta = kw_full = None
    if alts:
        if block > 1:
            kw_full = 1.0  # a block run's bound is never below its Ritz value
        elif k_full >= n_used:  # the full run may end "lanczos-full" (no inflation)
            kw_full = 1.0
        else:
            f_full = kw_factor(n_used, k_full, delta_kw)
            if post_c is None:  # no a posteriori bound (n < 3): KW alone, maybe infinite
                kw_full = math.inf if f_full is None else f_full
            else:
                # the full run also has its a posteriori bound, never below its Ritz value:
                # the exit costs at most sqrt(EXIT_FACTOR_CAP) against it (a KW factor of
                # too few steps, large or infinite, made the exit report an alternative up
                # to 46 % above the run's own bound, or fire at the first check)
                kw_full = EXIT_FACTOR_CAP if f_full is None else min(f_full, EXIT_FACTOR_CAP)
        a = alts[0][0] / (1 + SAFETY)
        stop_theta = a * a  # inf (never reached) rather than OverflowError
    # stop once the a posteriori bound is no larger than the a priori bound of a full
    # k_full-step single-vector run at the whole failure probability (what lipbound
    # reported before the a posteriori bound existed): a stopped run is never looser
    # (capped: with few steps that KW factor is huge, and a run stopped at it reported an
    # a posteriori bound 3.5 times the one a few more of its steps gave)
    post_stop = None
    if k_full < n_used:
        f_old = kw_factor(n_used, k_full, failure_prob)
        post_stop = min(f_old, EXIT_FACTOR_CAP) if f_old is not None else 1.02
    return RunParameters(post_c, delta_kw, stop_theta, kw_full, post_stop)


def bound_from_run(res: LanczosResult, n_used: int, failure_prob: float,
                   delta_kw: float | None, alts: list[tuple[float, str]],
                   fast_infl: float = 1.0, vec: Tensor | None = None) -> SpectralBound:
    """The :class:`SpectralBound` a Lanczos run supports: the alternative when the run was
    dominated, the exact Rayleigh-Ritz value when its basis spans every coordinate, else the
    smaller of the Kuczynski-Wozniakowski and the a posteriori bound; a smaller certified
    alternative wins."""
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
        kw_val = math.inf
        if delta_kw is not None:
            f = kw_factor(n_used, res.k, delta_kw)
            kw_val = est * math.sqrt(f) if f is not None else math.inf
        # the a posteriori bound is >= the Ritz values of its own Krylov prefix; the reported
        # estimate may be a little larger (final Rayleigh quotient, warm vectors)
        post_val = max(res.post_sqrt, est)
        val = min(kw_val, post_val)
        if math.isfinite(val):
            val *= (1 + SAFETY) * fast_infl
        method = "lanczos" if res.block == 1 else "block-lanczos"
        if fast_infl > 1.0:  # a kept run with fast products (see FAST_REL_ERROR)
            method += "-winograd"
        cand = SpectralBound(val, Guarantee.PROBABILISTIC, failure_prob, method, est, vec)
    if alts and alts[0][0] <= cand.value:
        return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], est, vec)
    return cand
