"""The best of all lower-bound methods."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from lipbound._modelinfo import unwrap_model
from lipbound._precision import exact_float32_on_model
from lipbound.lower._common import one_float64_copy
from lipbound.lower.gradient import gradient_lower_bound
from lipbound.lower.pgd import pgd_lower_bound
from lipbound.lower.result import LowerBoundResult
from lipbound.lower.sampling import PROGRESS_NONE, random_lower_bound
from lipbound.validation import check_bool, check_int

logger = logging.getLogger(__name__)


@exact_float32_on_model
def best_lower_bound(
    model: nn.Module,
    x0: torch.Tensor,
    eps: float,
    *,
    seed: int = 0,
    output_map: torch.Tensor | None = None,
    n_random: int = 1024,
    gradient_steps: int = 100,
    pgd_restarts: int = 32,
    pgd_steps: int = 40,
    pgd_refine: int = 8,
    pgd_refine_steps: int = 80,
    progress: bool | None = False,
) -> LowerBoundResult:
    """Largest lower bound on ``L(x0, eps)`` over random sampling, gradient ascent and PGD.

    Runs :func:`~lipbound.lower.random_lower_bound` (``n_random`` samples),
    :func:`~lipbound.lower.gradient_lower_bound` (the gradient ascent of Avant &
    Morgansen, IEEE TNNLS 2023) and :func:`~lipbound.lower.pgd_lower_bound`, the latter
    also started from the other two witnesses, and returns the largest value with its
    witness. On a tie the earlier method (random, gradient, pgd) is named the winner.

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x0: nominal input, shape ``(1, *shape)``.
        eps: L2 radius (> 0).
        seed: seed passed to every method.
        output_map: optional ``(k, m)`` matrix ``C``.
        n_random: samples for the random method.
        gradient_steps: steps of the gradient-ascent method.
        pgd_restarts: generated restarts of PGD.
        pgd_steps: exploration steps of PGD.
        pgd_refine: restarts PGD refines.
        pgd_refine_steps: refinement steps of PGD.
        progress: progress bar of the random method (``None``: only for large ``n_random``).

    Returns:
        A :class:`LowerBoundResult` with ``method="best"``; ``details["winner"]`` names the
        method that attained the value, ``details["values"]`` and ``details["seconds"]``
        hold every method's value and time.
    """
    t_start = time.perf_counter()
    n_random = check_int(n_random, "n_random", 1)
    gradient_steps = check_int(gradient_steps, "gradient_steps", 0)
    pgd_restarts = check_int(pgd_restarts, "pgd_restarts", 1)
    pgd_steps = check_int(pgd_steps, "pgd_steps", 0)
    pgd_refine = check_int(pgd_refine, "pgd_refine", 0)
    pgd_refine_steps = check_int(pgd_refine_steps, "pgd_refine_steps", 0)
    progress = check_bool(progress, "progress", none=PROGRESS_NONE)
    model = unwrap_model(model)  # (the module the methods run: one copy shared by all)
    with one_float64_copy(model):  # the three methods' witnesses share one float64 copy
        rnd = random_lower_bound(model, x0, eps, n_samples=n_random, seed=seed,
                                 output_map=output_map, progress=progress)
        grad = gradient_lower_bound(model, x0, eps, n_steps=gradient_steps, seed=seed,
                                    output_map=output_map)
        init = torch.cat([rnd.witness, grad.witness.to(rnd.witness)])
        pgd = pgd_lower_bound(model, x0, eps, n_restarts=pgd_restarts, n_steps=pgd_steps,
                              n_refine=pgd_refine, refine_steps=pgd_refine_steps, seed=seed,
                              output_map=output_map, init=init)
    results = [rnd, grad, pgd]
    winner = results[0]
    for r in results[1:]:  # (every value is a finite number: see lipbound.lower._common)
        if math.isfinite(r.value) and not r.value <= winner.value:
            winner = r
    details = {
        "winner": winner.method,
        "values": {r.method: r.value for r in results},
        "seconds": {r.method: r.seconds for r in results},
        "winner_details": dict(winner.details),
        "witness_distance": winner.details["witness_distance"],
    }
    if "note" in winner.details:
        details["note"] = winner.details["note"]
    seconds = time.perf_counter() - t_start
    logger.info("best lower bound %.6g at eps=%g by %s (%.2fs)",
                winner.value, winner.eps, winner.method, seconds)
    return LowerBoundResult(
        value=winner.value, witness=winner.witness, method="best", eps=winner.eps,
        seconds=seconds, n_evaluations=sum(r.n_evaluations for r in results), details=details,
    )
