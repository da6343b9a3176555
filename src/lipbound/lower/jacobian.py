"""Spectral norm and top singular directions of the network's Jacobian at a point.

For a piecewise-linear network and a point ``x`` inside one linear region, the directional
ratio ``||C (f(x + t v) - f(x))|| / t`` equals ``||C J(x) v||`` for all small enough ``t``,
so ``||C J(x0)||_2`` is a limit of ratios and a lower bound on ``L(x0, eps)`` for every
``eps``. The top right singular vector is the direction the PGD lower bound starts from.

Caveat at kinks: autograd differentiates ReLU at 0 as 0 and max pooling through one
selected input, i.e. at a point where several linear pieces meet (a pre-activation exactly
0, or a tie inside a pooling window, which is common on the constant background of MNIST
digits) it returns the Jacobian of *one* piece. That piece may occupy only a narrow cone of
directions at ``x``, and its norm can then exceed every directional derivative and even
``L(x0, eps)`` for small ``eps``. On the MNIST LeNet at digit 8 (float64) ``||J(x0)||`` is
45.52 while the ratios along ``+-v1`` converge to 44.34 and 40.87.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from lipbound._precision import exact_float32_on_model
from lipbound.errors import InputError
from lipbound.lower._common import Problem, check_problem, make_generator, unit_rows
from lipbound.results import Guarantee
from lipbound.validation import check_float, check_int

logger = logging.getLogger(__name__)

#: default largest Jacobian (rows * columns) formed explicitly for an exact SVD
EXACT_THRESHOLD = 2_000_000
_NOT_FINITE = ("the Jacobian at x is not finite (the network's outputs or their derivatives "
               "overflow the floating-point range there); rescale the network")

#: up to this many output rows the dense Jacobian is built by one backward pass per row
_LOOP_ROWS = 64


@dataclass(frozen=True)
class JacobianNorm:
    """Spectral norm of ``C J(x)`` with its top right singular vector(s).

    Attributes:
        value: ``||C J(x)||_2`` (exact SVD) or a power-iteration value ``||C J(x) v||`` with
            unit ``v`` (then it is <= the true norm, up to rounding).
        vectors: unit right singular vectors, shape ``(r, *input_shape)``, largest first
            (``r`` = 1 for power iteration, up to 2 for the SVD).
        guarantee: always :attr:`Guarantee.ESTIMATE`: the norm of the Jacobian autograd
            computes in the model's dtype (at a ReLU kink, that of one adjacent linear piece),
            neither a bound on the Lipschitz constant nor exact with a stated margin. The
            lower bounds use it only to choose directions; their values are ratios at
            witnesses.
        method: ``"svd"`` or ``"power-iteration"``.
        n_iterations: power iterations used (0 for the SVD).
    """

    value: float
    vectors: torch.Tensor
    guarantee: Guarantee
    method: str
    n_iterations: int = 0


def _mapped_fn(prob: Problem):  # noqa: ANN202 - a closure over the problem
    shape, model, cmap = prob.shape, prob.model, prob.output_map

    def g(v: torch.Tensor) -> torch.Tensor:
        out = model(v.reshape(1, *shape)).reshape(-1)
        return cmap @ out if cmap is not None else out

    return g


@exact_float32_on_model
def jacobian_matrix(
    model: nn.Module, x: torch.Tensor, *, output_map: torch.Tensor | None = None
) -> torch.Tensor:
    """The Jacobian ``C J(x)`` as a dense ``(k, d)`` matrix in the model's dtype.

    Uses one backward pass per output row for ``k <= 64`` outputs, otherwise
    ``torch.func.jacrev`` (``jacfwd`` when ``d < k``), falling back to the row loop if the
    model does not support ``torch.func`` transforms.

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x: the point, shape ``(1, *shape)``.
        output_map: optional ``(k, m)`` matrix ``C``.

    Returns:
        Tensor of shape ``(k, d)`` (``k = m`` without an output map).
    """
    prob = check_problem(model, x, 1.0, output_map)
    return _jacobian(prob)


def _jacobian(prob: Problem) -> torch.Tensor:
    k = prob.f0.shape[1] if prob.output_map is None else prob.output_map.shape[0]
    if k > _LOOP_ROWS:
        g = _mapped_fn(prob)
        x = prob.x0.reshape(-1)
        try:
            if prob.dim < k:
                return torch.func.jacfwd(g)(x).detach()
            return torch.func.jacrev(g)(x).detach()
        except Exception as exc:  # noqa: BLE001 - any functorch limitation: plain autograd
            logger.debug("torch.func Jacobian failed (%s); using one backward pass per row", exc)
    return _jacobian_rows(prob, k)


def _jacobian_rows(prob: Problem, k: int) -> torch.Tensor:
    """One backward pass per output row (no torch.func start-up cost; fine for small k)."""
    g = _mapped_fn(prob)
    with torch.enable_grad():
        xg = prob.x0.reshape(-1).detach().clone().requires_grad_(True)
        out = g(xg)
        rows = [
            torch.autograd.grad(out[i], xg, retain_graph=i + 1 < k)[0] for i in range(k)
        ]
    return torch.stack(rows).detach()


def _power_iteration(
    prob: Problem, n_iter: int, tol: float, seed: int
) -> tuple[float, torch.Tensor, int]:
    """Power iteration on ``v -> J^T J v`` with autograd graphs built once.

    ``J^T u`` is a backward pass through the forward graph; ``J v`` is the backward pass of
    the (linear in ``w``) graph of ``w -> J^T w`` ("double backward"), which avoids
    forward-mode AD and its start-up cost.
    """
    g = _mapped_fn(prob)
    gen = make_generator(prob.device, seed)
    v = unit_rows(torch.randn(1, prob.dim, device=prob.device, dtype=prob.dtype,
                              generator=gen))[0]
    with torch.enable_grad():
        xg = prob.x0.reshape(-1).detach().clone().requires_grad_(True)
        out = g(xg)
        w = torch.zeros_like(out, requires_grad=True)
        if not out.requires_grad:  # the output does not depend on x: J = 0
            return 0.0, v.reshape(1, *prob.shape), 0
        (jt_w,) = torch.autograd.grad(out, xg, grad_outputs=w, create_graph=True,
                                      materialize_grads=True)

        def jv(vec: torch.Tensor) -> torch.Tensor:
            if not jt_w.requires_grad:  # J^T w does not depend on w: J = 0
                return torch.zeros_like(out)
            return torch.autograd.grad(jt_w, w, grad_outputs=vec, retain_graph=True)[0]

        def jtu(vec: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(out, xg, grad_outputs=vec, retain_graph=True,
                                       materialize_grads=True)[0]

        prev = -1.0
        its = 0
        for its in range(1, n_iter + 1):  # noqa: B007 - its is reported after the loop
            u = jv(v).detach()
            sigma = float(torch.linalg.vector_norm(u.to(torch.float64)))
            if sigma == 0.0:
                break
            t = jtu(u).detach()
            nt = torch.linalg.vector_norm(t)
            if float(nt) == 0.0:
                break
            v_new = t / nt
            if abs(sigma - prev) <= tol * sigma:
                v = v_new
                break
            v, prev = v_new, sigma
        value = float(torch.linalg.vector_norm(jv(v).detach().to(torch.float64)))
    return value, v.reshape(1, *prob.shape), its


@exact_float32_on_model
def jacobian_spectrum(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_map: torch.Tensor | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    n_iter: int = 200,
    tol: float = 1e-7,
    seed: int = 0,
) -> JacobianNorm:
    """Spectral norm of the Jacobian ``C J(x)`` and its top right singular vector(s).

    When the Jacobian has at most ``exact_threshold`` entries, the dense Jacobian (in the
    model's dtype) is decomposed by a float64 SVD. Otherwise power iteration on
    ``v -> J^T J v`` through autograd (``J^T u`` by backward, ``J v`` by double backward),
    which approaches the norm from below. Both are labelled :attr:`Guarantee.ESTIMATE` (see
    :class:`JacobianNorm`).

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x: the point, shape ``(1, *shape)``.
        output_map: optional ``(k, m)`` matrix ``C``.
        exact_threshold: largest ``k * d`` handled by the exact SVD.
        n_iter: maximum power iterations.
        tol: relative change of the estimate at which power iteration stops.
        seed: seed of the power iteration's start vector.

    Returns:
        A :class:`JacobianNorm`.

    Raises:
        InputError: on invalid arguments, or a dense Jacobian that is not finite.
    """
    prob = check_problem(model, x, 1.0, output_map)
    k = prob.f0.shape[1] if prob.output_map is None else prob.output_map.shape[0]
    exact_threshold = check_int(exact_threshold, "exact_threshold", 0)
    n_iter = check_int(n_iter, "n_iter", 1)
    tol = check_float(tol, "tol", minimum=0, min_inclusive=True)
    if k * prob.dim <= exact_threshold:
        jac = _jacobian(prob).to(torch.float64)
        if not bool(torch.isfinite(jac).all()):
            raise InputError(_NOT_FINITE)
        _, s, vh = torch.linalg.svd(jac, full_matrices=False)
        r = min(2, vh.shape[0])
        vectors = vh[:r].to(prob.dtype).reshape(r, *prob.shape)
        return JacobianNorm(float(s[0]) if s.numel() else 0.0, vectors, Guarantee.ESTIMATE,
                            "svd")
    value, v, its = _power_iteration(prob, n_iter, tol, seed)
    if not (math.isfinite(value) and bool(torch.isfinite(v).all())):
        # (as on the SVD route: a NaN estimate and NaN directions were returned)
        raise InputError(_NOT_FINITE)
    logger.info("Jacobian norm %.6g by power iteration (%d iterations): an estimate from below",
                value, its)
    return JacobianNorm(value, v, Guarantee.ESTIMATE, "power-iteration", its)


@exact_float32_on_model
def jacobian_norm_at(
    model: nn.Module,
    x: torch.Tensor,
    output_map: torch.Tensor | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
) -> float:
    """Spectral norm ``||C J(x)||_2`` of the network's Jacobian at ``x``.

    A float64 SVD of the dense Jacobian (from ``torch.func.jacrev``, computed in the
    model's dtype: for a float32 model it carries float32 rounding, up to 7e-8 relative
    above the float64 Jacobian's norm on small random MLPs) when ``k * d <=
    exact_threshold``; otherwise a power-iteration ESTIMATE, which approaches the norm from
    below (a message is logged; use :func:`jacobian_spectrum` to get the label in the
    result). For a piecewise-linear network that is differentiable at ``x0`` (``x0`` inside
    one linear region) every local constant ``L(x0, eps)`` is >= the exact norm at
    ``x = x0``, since directional ratios at small ``t`` converge to ``||J v||``; this value
    is that norm only up to the rounding above, hence an ESTIMATE, not a lower bound. At a
    kink even the exact norm can exceed ``L(x0, eps)`` (see the module docstring):
    autograd's Jacobian is that of one adjacent piece only.

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x: the point, shape ``(1, *shape)``.
        output_map: optional ``(k, m)`` matrix ``C``.
        exact_threshold: largest ``k * d`` handled exactly.

    Returns:
        The norm as a float.
    """
    return jacobian_spectrum(
        model, x, output_map=output_map, exact_threshold=exact_threshold
    ).value
