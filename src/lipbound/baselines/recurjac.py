"""Fast-Lip and RecurJac: interval bounds on the Jacobian over a ball.

References:
    T.-W. Weng, H. Zhang, H. Chen, Z. Song, C.-J. Hsieh, D. Boning, I. S. Dhillon and
    L. Daniel, *Towards Fast Computation of Certified Robustness for ReLU Networks*, ICML 2018
    (Fast-Lin bounds on pre-activations and Fast-Lip, a forward interval product).
    H. Zhang, P. Zhang and C.-J. Hsieh, *RecurJac: An Efficient Recursive Algorithm for
    Bounding Jacobian Matrix of Neural Networks and Its Applications*, AAAI 2019
    (bounds on the Jacobian computed recursively from the output layer backwards).

Quantity: the **local** L2 Lipschitz constant of ``f`` (or ``C f``) over **all pairs** in the
ball ``B = {x : ||x - x0||_2 <= eps}``:
``sup_{x != y in B} ||f(x) - f(y)||_2 / ||x - y||_2`` (>= the constant relative to x0).

Method (our implementation):

1. Bounds ``[l, u]`` on every hidden pre-activation over the L2 ball: CROWN-style backward
   linear bounds (Zhang et al., NeurIPS 2018; Fast-Lin is the special case with equal
   slopes) concretised on the ball by ``a^T x0 +- eps ||a||_2``, intersected with interval
   (IBP) bounds, then widened by ``1e-10`` times an absolute-value magnitude of the layer to
   cover float64 rounding.
2. Each ReLU's derivative lies in ``{0}`` (``u < 0``), ``{1}`` (``l > 0``) or ``[0, 1]``. Every
   Jacobian ``J(x) = W_K D_{K-1}(x) ... D_1(x) W_1`` for ``x`` in the ball (and every
   element of the chain-rule generalised Jacobian) lies in the set of products with
   ``D_k`` in these ranges.
3. Interval matrices enclosing that set: **Fast-Lip** multiplies forwards
   ``W_1 -> D_1 W_1 -> W_2 D_1 W_1 -> ...``; **RecurJac** multiplies backwards from the output
   ``C W_K -> C W_K D_{K-1} -> ...``. Interval arithmetic is not associative, so the two
   differ; RecurJac here returns the entrywise intersection of both enclosures (so it is
   never worse than Fast-Lip). Products are widened by ``1e-12 * n`` times the product of
   absolute values (float64 rounding). Sparse weight matrices (a converted conv net's
   layers) are multiplied in CSR form (:func:`~lipbound.baselines.fc.operand`): the same
   sums without their zero terms, so within the same rounding bound.
4. For every ``J`` with ``L <= J <= U`` entrywise, ``||J||_2 <= || |J| ||_2 <=
   || max(|L|, |U|) ||_2`` (the spectral norm is monotone on non-negative matrices), and
   also ``||J||_2 <= ||M||_2 + ||R||_2`` with midpoint ``M = (L + U)/2`` and radius
   ``R = (U - L)/2`` (``J - M`` is bounded entrywise by ``R``). The smaller of the two
   (certified spectral norms, :func:`~lipbound.baselines.fc.safe_spectral_norm`) bounds
   every Jacobian norm in the ball, hence the local constant: a CERTIFIED upper bound. (The
   second is exact when no ReLU can switch.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from torch import nn

from lipbound.baselines.deadline import NO_LIMIT, Deadline
from lipbound.baselines.fc import (
    FCLayers,
    apply_output_map,
    as_fc,
    chain_caveats,
    chain_note,
    check_eps,
    check_range,
    check_x0,
    operand,
    safe_spectral_norm,
)
from lipbound.results import BoundResult, Guarantee

__all__ = ["fastlip", "recurjac", "preactivation_bounds", "jacobian_bounds"]

_QUANTITY = "local L2 Lipschitz constant over all pairs in the L2 ball B(x0, eps)"


def _relax(l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ReLU relaxation slopes: upper ``a_u z + b_u``, lower ``a_l z``."""
    act = l >= 0
    ina = u <= 0
    unst = ~(act | ina)
    den = np.where(unst, u - l, 1.0)
    a_u = np.where(act, 1.0, np.where(unst, u / den, 0.0))
    b_u = np.where(unst, -a_u * l, 0.0)
    a_l = np.where(act, 1.0, np.where(unst, (u > -l).astype(np.float64), 0.0))
    return a_u, b_u, a_l


def preactivation_bounds(layers: FCLayers, x0: np.ndarray, eps: float, *,
                         deadline: Deadline = NO_LIMIT
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sound bounds ``[l_k, u_k]`` on every hidden pre-activation over ``B(x0, eps)`` (L2).

    ``deadline`` is checked before each layer and each step of its backward (CROWN) pass.
    """
    return _preactivation_bounds(layers, [operand(w) for w, _ in layers], x0, eps, deadline)


def _preactivation_bounds(layers: FCLayers, ops: list[Any], x0: np.ndarray, eps: float,
                          deadline: Deadline) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`preactivation_bounds` with the weights also given as product operands
    (:func:`~lipbound.baselines.fc.operand`: CSR when sparse)."""
    bounds: list[tuple[np.ndarray, np.ndarray]] = []
    mag = np.abs(x0) + eps  # magnitude scale of the current layer's inputs
    ibp_lo = ibp_hi = None
    for k, (w, b) in enumerate(layers[:-1]):
        mag = np.abs(w) @ mag + np.abs(b)
        tol = 1e-10 * (mag + float(np.max(mag, initial=0.0)) * 1e-3)
        if k == 0:
            centre = w @ x0 + b
            rad = eps * np.linalg.norm(w, axis=1)
            lo, hi = centre - rad, centre + rad
        else:
            lo = _crown(layers, ops, bounds, k, x0, eps, False, deadline)
            hi = _crown(layers, ops, bounds, k, x0, eps, True, deadline)
            # interval (IBP) bounds from the previous layer, intersected
            pl, pu = np.maximum(ibp_lo, 0.0), np.maximum(ibp_hi, 0.0)
            wp, wn = np.maximum(w, 0.0), np.minimum(w, 0.0)
            lo = np.maximum(lo, wp @ pl + wn @ pu + b)
            hi = np.minimum(hi, wp @ pu + wn @ pl + b)
        lo, hi = lo - tol, hi + tol
        bounds.append((lo, hi))
        ibp_lo, ibp_hi = lo, hi
    return bounds


def _crown(layers: FCLayers, ops: list[Any], bounds: list[tuple[np.ndarray, np.ndarray]],
           k: int, x0: np.ndarray, eps: float, upper: bool, deadline: Deadline
           ) -> np.ndarray:
    """CROWN bound (upper or lower) of the pre-activations of hidden layer ``k``."""
    lam = layers[k][0].copy()
    const = layers[k][1].copy()
    for j in range(k - 1, -1, -1):
        deadline.check(f"pre-activation bounds of {k} of {len(layers) - 1} hidden layers")
        l, u = bounds[j]
        a_u, b_u, a_l = _relax(l, u)
        pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
        if upper:
            new = pos * a_u[None, :] + neg * a_l[None, :]
            const = const + pos @ b_u
        else:
            new = pos * a_l[None, :] + neg * a_u[None, :]
            const = const + neg @ b_u
        const = const + new @ layers[j][1]
        lam = new @ ops[j]
    centre = lam @ x0 + const
    rad = eps * np.linalg.norm(lam, axis=1)
    return centre + rad if upper else centre - rad


def _slopes(bounds: list[tuple[np.ndarray, np.ndarray]]
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Derivative range ``[dl, du]`` of every hidden ReLU."""
    out = []
    for l, u in bounds:
        dl = (l > 0).astype(np.float64)
        du = (u >= 0).astype(np.float64)
        out.append((dl, du))
    return out


def _scale_rows(lo: np.ndarray, hi: np.ndarray, dl: np.ndarray, du: np.ndarray,
                axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Interval of ``d * J`` with ``d`` in ``[dl, du]`` (>= 0) along ``axis`` of ``J``."""
    shape = (-1, 1) if axis == 0 else (1, -1)
    dl, du = dl.reshape(shape), du.reshape(shape)
    return np.minimum(dl * lo, du * lo), np.maximum(dl * hi, du * hi)


def _signed_parts(w: Any) -> tuple[Any, Any, Any]:
    """``(max(W, 0), min(W, 0), |W|)`` of a dense or CSR operand, in the same form."""
    if sp.issparse(w):
        return w.maximum(0.0), w.minimum(0.0), abs(w)
    return np.maximum(w, 0.0), np.minimum(w, 0.0), np.abs(w)


def _left_mul(w: Any, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interval of ``W M`` for ``M`` in ``[lo, hi]``, widened for rounding (``W`` dense or
    CSR: a sparse product sums fewer terms, within the same ``γ_n`` bound)."""
    wp, wn, wa = _signed_parts(w)
    tol = 1e-12 * w.shape[1] * (wa @ np.maximum(np.abs(lo), np.abs(hi)))
    return wp @ lo + wn @ hi - tol, wp @ hi + wn @ lo + tol


def _right_mul(lo: np.ndarray, hi: np.ndarray, w: Any) -> tuple[np.ndarray, np.ndarray]:
    """Interval of ``M W`` for ``M`` in ``[lo, hi]``, widened for rounding."""
    wp, wn, wa = _signed_parts(w)
    tol = 1e-12 * w.shape[0] * (np.maximum(np.abs(lo), np.abs(hi)) @ wa)
    return lo @ wp + hi @ wn - tol, hi @ wp + lo @ wn + tol


def jacobian_bounds(layers: FCLayers, x0: np.ndarray, eps: float, direction: str, *,
                    deadline: Deadline = NO_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """Entrywise bounds ``[L, U]`` on every Jacobian of the chain over ``B(x0, eps)``.

    ``direction`` is ``"forward"`` (Fast-Lip), ``"backward"`` (RecurJac's order) or
    ``"both"`` (intersection). ``deadline`` is checked between layers.
    """
    ops = [operand(w) for w, _ in layers]
    slopes = _slopes(_preactivation_bounds(layers, ops, x0, eps, deadline))
    return _interval_jacobian(layers, ops, slopes, direction, deadline)


def _interval_jacobian(layers: FCLayers, ops: list[Any],
                       slopes: list[tuple[np.ndarray, np.ndarray]], direction: str,
                       deadline: Deadline) -> tuple[np.ndarray, np.ndarray]:
    """:func:`jacobian_bounds` from the ReLUs' derivative ranges."""
    def check(step: int, which: str) -> None:
        deadline.check(f"{step} of {len(layers) - 1} {which} interval products")

    fl = fu = bl = bu = None
    if direction in ("forward", "both"):
        lo = hi = layers[0][0]
        for k, (w_op, (dl, du)) in enumerate(zip(ops[1:], slopes, strict=True)):
            check(k, "forward")
            lo, hi = _scale_rows(lo, hi, dl, du, axis=0)
            lo, hi = _left_mul(w_op, lo, hi)
        fl, fu = lo, hi
    if direction in ("backward", "both"):
        lo = hi = layers[-1][0]
        for k in range(len(layers) - 2, -1, -1):
            check(len(layers) - 2 - k, "backward")
            dl, du = slopes[k]
            lo, hi = _scale_rows(lo, hi, dl, du, axis=1)
            lo, hi = _right_mul(lo, hi, ops[k])
        bl, bu = lo, hi
    if fl is None:
        return bl, bu  # type: ignore[return-value]
    if bl is None:
        return fl, fu  # type: ignore[return-value]
    return np.maximum(fl, bl), np.minimum(fu, bu)


def _run(method: str, direction: str, net: Any, x0: Any, eps: float, output_map: Any,
         input_shape: Sequence[int] | None, model_name: str | None,
         time_limit: float | None) -> BoundResult:
    t0 = time.perf_counter()
    deadline = Deadline(time_limit, "Fast-Lip" if method == "fastlip" else "RecurJac")
    layers = apply_output_map(as_fc(net, input_shape=input_shape), output_map)
    xc = check_x0(x0, layers[0][0].shape[1], net, input_shape)
    eps = check_eps(eps)
    check_range(layers, xc, eps, what=method)
    ops = [operand(w) for w, _ in layers]
    slopes = _slopes(_preactivation_bounds(layers, ops, xc, eps, deadline))
    lo, hi = _interval_jacobian(layers, ops, slopes, direction, deadline)
    deadline.check("the Jacobian interval, before its spectral norms")
    jmax = np.maximum(np.abs(lo), np.abs(hi))
    mid, rad = (lo + hi) / 2.0, np.maximum(hi - lo, 0.0) / 2.0
    # both are upper bounds on ||J|| for every J in [lo, hi]; the second is exact when the
    # interval is a single matrix (mid/rad rounding: rad is widened by 1e-15 |mid|)
    by_abs = safe_spectral_norm(jmax)
    by_mid = safe_spectral_norm(mid) + safe_spectral_norm(rad + 1e-15 * np.abs(mid))
    value = min(by_abs, by_mid)
    n_unst = sum(int(np.sum(du - dl)) for dl, du in slopes)
    n_tot = sum(len(dl) for dl, _ in slopes)
    notes = (chain_note(layers),
             f"{n_unst} of {n_tot} ReLUs can switch in the ball (CROWN + IBP bounds)",
             "min(||max(|L|, |U|)||, ||mid|| + ||rad||) over the Jacobian interval [L, U]",
             *chain_caveats(layers))
    return BoundResult(value=value, guarantee=Guarantee.CERTIFIED, method=method,
                       quantity=_QUANTITY, eps=eps, seconds=time.perf_counter() - t0,
                       norm="l2", model=model_name, notes=notes)


def fastlip(net: nn.Module | Sequence[tuple[Any, Any]], x0: Any, eps: float, *,
            output_map: Any | None = None, input_shape: Sequence[int] | None = None,
            model_name: str | None = None, time_limit: float | None = None) -> BoundResult:
    """Fast-Lip: forward interval Jacobian bound, turned into a certified local L2 bound.

    Args:
        net: a fully connected ReLU network (module) or its layers ``[(W, b), ...]``.
        x0: ball centre, shape ``(1, *input_shape)`` or flat.
        eps: L2 radius (> 0).
        output_map: optional ``(m, n_out)`` matrix ``C``; the bound is then for ``C f``.
        input_shape: input shape without batch (only needed for some Normalize layers).
        model_name: name stored in the result.
        time_limit: seconds (``None``: no limit), checked between the layers of every pass
            (:mod:`lipbound.baselines.deadline`).

    Returns:
        A CERTIFIED :class:`~lipbound.results.BoundResult` on the local constant over all
        pairs in the ball.

    Raises:
        TimeLimitError: ``time_limit`` passed before the value was computed.
    """
    return _run("fastlip", "forward", net, x0, eps, output_map, input_shape, model_name,
                time_limit)


def recurjac(net: nn.Module | Sequence[tuple[Any, Any]], x0: Any, eps: float, *,
             output_map: Any | None = None, input_shape: Sequence[int] | None = None,
             model_name: str | None = None, time_limit: float | None = None) -> BoundResult:
    """RecurJac: backward recursive Jacobian bound (intersected with Fast-Lip's).

    Args, return value and errors as :func:`fastlip`; the value is never above Fast-Lip's.
    """
    return _run("recurjac", "both", net, x0, eps, output_map, input_shape, model_name,
                time_limit)
