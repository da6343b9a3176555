"""Gradient-ascent lower bound, as used by Avant & Morgansen (IEEE TNNLS 2023).

T. Avant and K. A. Morgansen, *Analytical Bounds on the Local Lipschitz Constants of
ReLU Networks*, IEEE TNNLS 2023 (arXiv 2104.14672), compare their upper bounds with
lower bounds from random sampling and from gradient ascent started near ``x0``. This
module implements the latter: start at ``x0`` plus a small random perturbation, ascend
the output change ``||C(f(x) - f(x0))||`` (or the ratio) with normalised gradient steps,
project onto the ball, and report the best ratio seen along the path.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from lipbound._precision import exact_float32_on_model
from lipbound.errors import InputError
from lipbound.lower._ascent import Objective, ascend
from lipbound.lower._common import (
    check_positive_int,
    check_problem,
    finalize,
    gradient_scale,
    make_generator,
    radius_floor,
    unit_rows,
)
from lipbound.lower.result import LowerBoundResult
from lipbound.validation import check_float

logger = logging.getLogger(__name__)


@exact_float32_on_model
def gradient_lower_bound(
    model: nn.Module,
    x0: torch.Tensor,
    eps: float,
    *,
    n_steps: int = 100,
    n_restarts: int = 1,
    objective: Objective = "difference",
    start_radius: float = 1e-2,
    step_size: float | None = None,
    seed: int = 0,
    output_map: torch.Tensor | None = None,
) -> LowerBoundResult:
    """Lower bound on ``L(x0, eps)`` by projected gradient ascent from near ``x0``.

    Each restart starts at ``x0 + start_radius * eps * u`` (``u`` a random unit vector) and
    takes ``n_steps`` normalised gradient steps of constant length ``step_size`` (default
    ``2.5 * eps / n_steps``, so a path can cross the ball), each followed by projection
    onto the ball. The best ratio ``||C(f(x)-f(x0))|| / ||x - x0||`` along all paths is
    recomputed from its witness and returned. Method of Avant & Morgansen (IEEE TNNLS
    2023); see :func:`~lipbound.lower.pgd_lower_bound` for a stronger maximiser.

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x0: nominal input, shape ``(1, *shape)``.
        eps: L2 radius (> 0).
        n_steps: gradient steps per restart.
        n_restarts: independent starts, run as one batch.
        objective: ``"difference"`` ascends ``||C(f(x)-f(x0))||``; ``"ratio"`` ascends the
            ratio itself.
        start_radius: radius of the initial perturbation, as a fraction of ``eps``.
        step_size: absolute step length; ``None`` for ``2.5 * eps / n_steps``.
        seed: seed of the method's own generator.
        output_map: optional ``(k, m)`` matrix ``C``.

    Returns:
        A :class:`LowerBoundResult` with ``method="gradient"``.

    Raises:
        InputError: on invalid arguments.
    """
    t_start = time.perf_counter()
    prob = check_problem(model, x0, eps, output_map)
    n_steps = check_positive_int("n_steps", n_steps, minimum=0)
    n_restarts = check_positive_int("n_restarts", n_restarts)
    if objective not in ("difference", "ratio"):
        raise InputError(f"objective must be 'difference' or 'ratio', got {objective!r}")
    start_radius = check_float(start_radius, "start_radius (a fraction of eps)", minimum=0,
                               maximum=1, max_inclusive=True)
    step = 2.5 * prob.eps / max(n_steps, 1) if step_size is None else check_float(
        step_size, "step_size (or None)", minimum=0)

    gen = make_generator(prob.device, seed)
    floor = radius_floor(prob, gradient_scale(prob))
    r0 = max(start_radius * prob.eps, floor)
    u = unit_rows(torch.randn(n_restarts, prob.dim, device=prob.device, dtype=prob.dtype,
                              generator=gen))
    start = prob.x0.reshape(1, -1) + r0 * u
    state = ascend(
        prob, start, n_steps=n_steps, step_size=lambda _k: step, relative=False,
        objective=objective, generator=gen, min_radius=floor,
    )
    fin = finalize(prob, state.best_x, state.best_ratio)
    value, witness, dist = fin.value, fin.witness, fin.distance
    seconds = time.perf_counter() - t_start
    details = {
        "n_steps": n_steps,
        "n_restarts": n_restarts,
        "objective": objective,
        "step_size": step,
        "start_radius": r0,
        "seed": seed,
        "witness_distance": dist,
        "witness_radius_fraction": dist / prob.eps,
        "min_radius": floor,
        "rounding_error_estimate": fin.rounding,
        "evaluated_in": fin.evaluated_in,
    }
    if fin.note is not None:  # (no finite ratio anywhere: the value is 0)
        details["note"] = fin.note
    logger.info("gradient lower bound %.6g at eps=%g (%.2fs)", value, prob.eps, seconds)
    return LowerBoundResult(
        value=value, witness=witness, method="gradient", eps=prob.eps, seconds=seconds,
        n_evaluations=state.n_evaluations + fin.n_forward + 2, details=details,
    )
