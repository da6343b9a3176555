"""ECLipsE-Fast: a closed-form, layer-by-layer solution of the LipSDP-Layer matrix inequality.

Reference: Y. Xu and S. Sivaranjani, *ECLipsE: Efficient Compositional Lipschitz Constant
Estimation for Deep Neural Networks*, NeurIPS 2024 (the "ECLipsE-Fast" algorithm).

Quantity: the **global** L2 Lipschitz constant of ``f`` (all pairs of inputs).

Recursion (our derivation, for ReLU: slopes in ``[0, 1]``). Start from ``X_0 = I`` and for
each hidden layer ``k = 1, ..., K-1``

    mu_k = lambda_max(W_k X_{k-1}^{-1} W_k^T),   lambda_k = 1 / mu_k,
    X_k  = 2 lambda_k I - lambda_k^2 W_k X_{k-1}^{-1} W_k^T,

then ``rho = lambda_max(W_K X_{K-1}^{-1} W_K^T)`` and the bound is ``sqrt(rho)``.

Soundness (proof). LipSDP (see :mod:`lipbound.baselines.lipsdp`) certifies
``L(f) <= sqrt(rho)`` when ``M(rho, T') <= 0`` for some diagonal ``T' >= 0``. Take
``T'_k = rho lambda_k I``. Then ``-M / rho`` is block tridiagonal with diagonal blocks
``I, 2 lambda_1 I, ..., 2 lambda_{K-1} I - W_K^T W_K / rho`` and off-diagonal blocks
``-lambda_k W_k``. Its block LDL^T factorisation (successive Schur complements) has pivots
``S_0 = I``, ``S_k = 2 lambda_k I - lambda_k^2 W_k S_{k-1}^{-1} W_k^T = X_k`` and last pivot
``X_{K-1} - W_K^T W_K / rho``; a symmetric block tridiagonal matrix is PSD when its
pivots are (the earlier ones positive definite). With ``lambda_k = 1/mu_k`` the eigenvalues
of ``X_k`` are ``2/mu_k - s/mu_k^2`` for ``s`` in ``[0, mu_k]``, all ``>= 1/mu_k > 0``; and the
last pivot is PSD iff ``rho >= lambda_max(W_K X_{K-1}^{-1} W_K^T)``. So the chosen
``(rho, T')`` is feasible for LipSDP-Layer, which proves

    L(f) <= LipSDP-Neuron <= LipSDP-Layer <= ECLipsE-Fast.

Also ``X_k >= I / mu_k`` gives ``mu_{k+1} <= ||W_{k+1}||^2 mu_k`` and so
``ECLipsE-Fast <= prod_k ||W_k||`` (AutoLip). Both orderings are tested.

Guarantee: CERTIFIED. The closed form is computed in float64 and then checked exactly as
LipSDP's solution is (:func:`~lipbound.baselines.lipsdp.certify_lmi`: the largest
eigenvalue of ``M(rho, T')`` must clear a rounding margin; rho is raised if it does not).
At the closed form the last pivot is singular by construction, and so can be the hidden
block of ``M`` (a hidden unit without incoming weights, for example), which no rho can
repair: the check is then repeated with ``rho' = rho (1 + 2^-20)`` and ``T' = rho' lambda_k``
(feasible by the proof above, as ``rho' >= rho``, and strictly so on that block).
That check needs a dense eigen-decomposition of size ``n_0 + sum(n_k)``; above
``max_check_dim`` the value is returned as an ESTIMATE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack
from torch import nn

from lipbound.baselines.deadline import NO_LIMIT, Deadline
from lipbound.baselines.fc import (
    apply_output_map,
    as_fc,
    chain_caveats,
    chain_note,
    check_range,
    operand,
    round_up,
    safe_spectral_norm,
)
from lipbound.baselines.lipsdp import certify_lmi
from lipbound.results import BoundResult, Guarantee

__all__ = ["eclipse_fast", "eclipse_fast_multipliers"]

_QUANTITY = "global L2 Lipschitz constant (all pairs of inputs)"


def eclipse_fast_multipliers(layers: list[tuple[np.ndarray, np.ndarray]], *,
                             deadline: Deadline = NO_LIMIT) -> tuple[float, list[float]]:
    """The closed form: ``(rho, [lambda_1, ..., lambda_{K-1}])`` (float64, unchecked).

    Computed as the recursion in the module docstring says, with the cheaper of equal
    quantities: ``X_k^{-1}`` from a Cholesky factorisation (``X_k`` is symmetric with
    eigenvalues in ``[lambda_k, 2 lambda_k]``, so positive definite and well conditioned),
    products with a sparse ``W_k`` (converted conv nets) in CSR form, and for the first
    layer (``X_0 = I``) ``mu_1`` as the top eigenvalue of the smaller of ``W_1 W_1^T`` and
    ``W_1^T W_1`` (the same nonzero eigenvalues). ``deadline`` is checked before each of the
    three costly parts of a layer (the product, the eigenvalue, the inverse).
    """
    x_inv: np.ndarray | None = None  # None: X_0^{-1} = I
    lams = []
    n_hidden = len(layers) - 1

    def check(k: int, part: str) -> None:
        deadline.check(f"{k} of {n_hidden} hidden layers (then {part})")

    for k, (w, _) in enumerate(layers[:-1]):
        check(k, "a product")
        w_op = operand(w)
        g = _congruence(w_op, x_inv)
        check(k, "an eigenvalue")
        if x_inv is None and w.shape[0] > w.shape[1]:
            mu = _top_eigenvalue(_gram(w_op.T))  # W^T W: same top eigenvalue, smaller
        else:
            mu = _top_eigenvalue(g)
        if mu <= 0.0:
            return 0.0, lams  # zero layer: the network is constant
        lam = 1.0 / mu
        lams.append(lam)
        x = -(lam * lam) * g
        x[np.diag_indices_from(x)] += 2.0 * lam
        check(k, "an inverse")
        x_inv = _spd_inverse(x)
    check(n_hidden, "the last layer")
    g = _congruence(operand(layers[-1][0]), x_inv)
    return max(_top_eigenvalue(g), 0.0), lams


def _gram(w_op: np.ndarray | sp.csr_array) -> np.ndarray:
    """``W W^T`` as a dense array."""
    if sp.issparse(w_op):
        return (w_op @ w_op.T).toarray()
    return w_op @ w_op.T


def _congruence(w_op: np.ndarray | sp.csr_array, x_inv: np.ndarray | None) -> np.ndarray:
    """``W X^{-1} W^T`` (``X^{-1} = I`` when ``x_inv`` is None), exactly symmetric."""
    if x_inv is None:
        g = _gram(w_op)
    elif sp.issparse(w_op):
        g = w_op @ (w_op @ x_inv).T  # W (W X^{-1})^T, X^{-1} symmetric
    else:
        g = (w_op @ x_inv) @ w_op.T
    return 0.5 * (g + g.T)


def _top_eigenvalue(g: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(g)[-1]) if g.size else 0.0


def _spd_inverse(x: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite ``x`` (Cholesky: ``potrf`` + ``potri``),
    exactly symmetric; a general inverse if the factorisation fails."""
    c, info = lapack.dpotrf(x, lower=1, clean=1)
    if info == 0:
        inv, info = lapack.dpotri(c, lower=1)
        if info == 0:  # the lower triangle, zeros above (clean=1): mirror it
            full = inv + inv.T
            full[np.diag_indices_from(full)] *= 0.5  # the doubled diagonal, exactly halved
            return full
    inv = np.linalg.inv(x)
    return 0.5 * (inv + inv.T)


def eclipse_fast(net: nn.Module | Sequence[tuple[Any, Any]], *, output_map: Any | None = None,
                 max_check_dim: int = 4000, input_shape: Sequence[int] | None = None,
                 model_name: str | None = None, time_limit: float | None = None
                 ) -> BoundResult:
    """ECLipsE-Fast closed-form bound on the global L2 Lipschitz constant.

    Args:
        net: a fully connected ReLU network (module) or its layers ``[(W, b), ...]``.
        output_map: optional ``(m, n_out)`` matrix ``C``; the bound is then for ``C f``.
        max_check_dim: largest ``n_0 + sum(n_k)`` for the float64 certification.
        input_shape: input shape without batch (only needed for some Normalize layers).
        model_name: name stored in the result.
        time_limit: seconds (``None``: no limit), checked before the product, the eigenvalue
            and the inverse of each layer of the recursion and before the float64 check
            (:mod:`lipbound.baselines.deadline`).

    Returns:
        A CERTIFIED :class:`~lipbound.results.BoundResult` (ESTIMATE if too large to check).

    Raises:
        TimeLimitError: ``time_limit`` passed before the value was computed and checked.
    """
    t0 = time.perf_counter()
    deadline = Deadline(time_limit, "ECLipsE-Fast")
    layers = apply_output_map(as_fc(net, input_shape=input_shape), output_map)
    check_range(layers, what="ECLipsE-Fast")
    notes = [chain_note(layers)]
    caveats = chain_caveats(layers)  # (layers is rescaled below)

    def result(value: float, guarantee: Guarantee) -> BoundResult:
        return BoundResult(value=value, guarantee=guarantee, method="eclipse-fast",
                           quantity=_QUANTITY, eps=None, seconds=time.perf_counter() - t0,
                           norm="l2", model=model_name, notes=(*notes, *caveats))

    if len(layers) == 1:
        notes.append("no hidden layer: the bound is ||W||")
        return result(safe_spectral_norm(layers[0][0]), Guarantee.CERTIFIED)
    if any(not np.any(w) for w, _ in layers):
        notes.append("a layer is zero: the network is constant")
        return result(0.0, Guarantee.CERTIFIED)
    # scale every W_k by an exact power of two to largest entry in [0.5, 1): the recursion
    # squares lambda_k = 1/mu_k, which overflows (NaN) for weights of size 2^-150; ReLU is
    # positively homogeneous, so the bound scales back by 2^(sum of exponents), exactly
    exps = [int(np.frexp(float(np.max(np.abs(w))))[1]) for w, _ in layers]
    layers = [(np.ldexp(w, -e), b) for (w, b), e in zip(layers, exps, strict=True)]
    shift = sum(exps)
    rho, lams = eclipse_fast_multipliers(layers, deadline=deadline)
    if len(lams) < len(layers) - 1 or rho == 0.0:
        notes.append("a layer is zero: the network is constant")
        return result(0.0, Guarantee.CERTIFIED)
    dim = layers[0][0].shape[1] + sum(w.shape[0] for w, _ in layers[:-1])
    if dim > max_check_dim:
        notes.append(f"LMI of size {dim} > max_check_dim={max_check_dim}: not checked in "
                     "float64, so reported as an estimate")
        return result(round_up(math.ldexp(math.sqrt(rho), shift)), Guarantee.ESTIMATE)
    deadline.check("the closed form, before its float64 check")
    t_diag = np.concatenate([np.full(w.shape[0], rho * lam)
                             for (w, _), lam in zip(layers[:-1], lams, strict=True)])
    cert = certify_lmi(layers, t_diag, rho)
    if not cert.ok:
        # at the closed form the last pivot X_{K-1} - W_K^T W_K / rho is singular by
        # construction, and so can be the hidden block of M (e.g. a hidden unit with no
        # incoming weights): the check then cannot pass at any rho. The same construction
        # with rho' = rho (1 + 2^-20) (T' = rho' lambda_k) is feasible too (rho' >= rho) and
        # strictly so on that block, so it is checked instead (the bound grows by 2^-21)
        notes.append(f"float64 LMI check failed at the closed form ({cert.reason}); checked "
                     "again with rho and T raised by a factor 1 + 2^-20")
        up = 1.0 + 2.0 ** -20
        cert = certify_lmi(layers, t_diag * up, rho * up)
    if not cert.ok:
        notes.append(f"float64 LMI check failed: {cert.reason}")
        return result(math.nan, Guarantee.ESTIMATE)
    notes.append(f"float64 LMI check passed at rho {cert.rho:.12g} (closed form {rho:.12g}; "
                 f"weights scaled by 2^{-shift} in all)")
    # ldexp by the exponent sum is exact (check_range keeps the result in the normal range)
    value = round_up(math.ldexp(math.sqrt(cert.rho) * (1 + 1e-15), shift))
    return result(value, Guarantee.CERTIFIED)
