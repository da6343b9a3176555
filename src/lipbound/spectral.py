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
  Guarantee: **probabilistic upper bound** with failure probability δ. Extra vectors (a warm
  start from a neighbouring ε) only enlarge the subspace, so they never weaken the bound.

In both routes a cheap deterministic bound (Frobenius norm from the one-pass row norms, or a
certified global factor) is compared, and when it is smaller it is reported instead, with its
own (certified) guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .results import Guarantee

SAFETY = 1e-9
"""Relative margin added to every floating-point spectral value (covers float64 rounding)."""


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
    return math.sqrt(lam_up) * peak * (1 + SAFETY)


def lanczos_top(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], cols: Tensor,
                n_in: int, steps: int, generator: torch.Generator, device,
                warm: list[Tensor] | None = None) -> tuple[float, Tensor, int, int]:
    """Lanczos on M^T M restricted to coordinates ``cols``.

    Returns (θ = max Ritz value of M^T M, Ritz vector (flat n_in), the Krylov dimension k the
    KW bound may use, the dimension of the subspace actually spanned).

    The operator is rescaled by its first image so that no norm under- or overflows."""
    n = cols.numel()
    mv0, rmv0 = mv, rmv
    probe = torch.zeros(n_in, dtype=torch.float64, device=device)
    k_max = min(steps, n)
    n_extra = len(warm) if warm else 0
    # basis stored as rows (contiguous slices for the re-orthogonalisation)
    q = torch.zeros(k_max + n_extra, n_in, dtype=torch.float64, device=device)
    g = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
    g = g / g.abs().max().clamp_min(1e-300)
    q[0, cols] = g / g.norm()
    probe[:] = q[0]
    first = mv0(probe.unsqueeze(0)).squeeze(0)
    c = float(first.abs().max())
    sc = 1.0 / c if c > 0.0 and math.isfinite(c) else 1.0

    def mv(v: Tensor) -> Tensor:
        return mv0(v) * sc

    def rmv(y: Tensor) -> Tensor:
        return rmv0(y) * sc

    images: list[Tensor] = []
    scale = 0.0
    slack = 0.0
    invariant_seen = False
    k = 0
    while k < k_max:
        mvv = mv(q[k].unsqueeze(0)).squeeze(0)
        images.append(mvv)
        k += 1
        if k == k_max:
            break
        w = rmv(mvv.unsqueeze(0)).squeeze(0)
        scale = max(scale, float(w.norm()))
        qj = q[:k]
        for _ in range(2):  # full re-orthogonalisation, twice
            w = w - (qj @ w) @ qj
        beta = float(w.norm())
        if beta <= 1e-9 * scale or scale == 0.0:
            # The Krylov space of the start vector is (numerically) invariant: in exact
            # arithmetic every later Ritz value from it equals this one, so the
            # Kuczynski-Wozniakowski bound for k_max steps applies; the residual beta bounds
            # the perturbation and is added to theta. We continue with a fresh random
            # direction orthogonal to the basis: a larger subspace can only raise the Ritz
            # value, and once it spans every active coordinate Rayleigh-Ritz is exact.
            invariant_seen = True
            slack += beta
            for _ in range(4):  # a random vector inside the span has probability 0
                gn = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
                w = torch.zeros(n_in, dtype=torch.float64, device=device)
                w[cols] = gn / gn.norm()
                for _ in range(2):
                    w = w - (qj @ w) @ qj
                beta = float(w.norm())
                if beta > 1e-8:
                    break
            if beta <= 1e-8:
                break  # the basis (numerically) spans the active coordinates
        q[k] = w / beta
    basis = q[:k].T
    mq = torch.stack(images, 1)
    if warm:
        extra = torch.stack([w_.to(device=device, dtype=torch.float64) for w_ in warm], 1)
        for _ in range(2):
            extra = extra - basis @ (basis.T @ extra)
        norms = extra.norm(dim=0)
        keep = norms > 1e-8 * norms.max().clamp_min(1e-300)
        if bool(keep.any()):
            extra = extra[:, keep] / norms[keep]
            basis = torch.cat([basis, extra], 1)
            mq = torch.cat([mq, mv(extra.T).T], 1)
    # Rayleigh-Ritz on span(basis): max eigenvalue of the pencil (MQ^T MQ, Q^T Q); solving
    # with the Cholesky factor of the Gram matrix makes it exact for a non-orthonormal Q.
    gram = basis.T @ basis
    h = mq.T @ mq
    try:
        chol = torch.linalg.cholesky(gram)
        t1 = torch.linalg.solve_triangular(chol, h, upper=False)
        c = torch.linalg.solve_triangular(chol, t1.T, upper=False)
        evals, evecs = torch.linalg.eigh((c + c.T) / 2)
        theta = float(evals[-1])
        y = torch.linalg.solve_triangular(chol.T, evecs[:, -1:], upper=True).squeeze(1)
    except RuntimeError:  # numerically dependent basis: fall back to an orthonormal basis
        qq, _ = torch.linalg.qr(basis)
        mqq = mv(qq.T).T
        evals, evecs = torch.linalg.eigh(mqq.T @ mqq)
        theta = float(evals[-1])
        y = evecs[:, -1]
        basis = qq
    ritz = basis @ y
    ritz = ritz / ritz.norm().clamp_min(1e-300)
    theta_unscaled = theta / (sc * sc)
    if invariant_seen:
        return (theta + slack) / (sc * sc), ritz, k_max, k
    return theta_unscaled, ritz, k, k


def spectral_upper(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], *,
                   n_in: int, n_out: int, cols: Tensor, rows: Tensor, device,
                   dense: Callable[[], Tensor] | None = None, apply_flops: float,
                   mode: str = "auto", steps: int = 64, failure_prob: float = 1e-7,
                   generator: torch.Generator | None = None, exact_budget: float = 1e9,
                   certified_alternatives: tuple[tuple[float, str], ...] = (),
                   warm: list[Tensor] | None = None) -> SpectralBound:
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
            a Frobenius norm); the smallest candidate is reported with its own guarantee.
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
    theta, vec, k, k_dim = lanczos_top(mv, rmv, cols, n_in, steps, gen, device, warm)
    est = math.sqrt(max(theta, 0.0))
    if k_dim >= na:  # the Krylov basis spans every active coordinate: Rayleigh-Ritz is exact
        val = est * (1 + SAFETY)
        cand = SpectralBound(val, Guarantee.CERTIFIED, 0.0, "lanczos-full", est, vec)
    else:
        f = kw_factor(na, k, failure_prob)
        if f is None:
            cand = SpectralBound(math.inf, Guarantee.PROBABILISTIC, failure_prob, "lanczos",
                                 est, vec)
        else:
            val = math.sqrt(theta * f) * (1 + SAFETY)
            cand = SpectralBound(val, Guarantee.PROBABILISTIC, failure_prob, "lanczos", est,
                                 vec)
    if alts and alts[0][0] <= cand.value:
        return SpectralBound(alts[0][0], Guarantee.CERTIFIED, 0.0, alts[0][1], est, vec)
    return cand
