"""Batched projected gradient ascent on the ratio (or the output change) over the L2 ball."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from lipbound.lower._common import Problem, place_in_ball, safe_norm, unit_rows

Objective = Literal["ratio", "difference"]


@dataclass
class AscentState:
    """Best point found by each restart along its path.

    Attributes:
        best_x: flat points ``(B, d)`` (actual stored inputs, inside the ball).
        best_ratio: their float64 ratios ``(B,)`` as seen during the search.
        n_evaluations: forward(+backward) evaluations of single inputs.
    """

    best_x: torch.Tensor
    best_ratio: torch.Tensor
    n_evaluations: int


def ascend(
    prob: Problem,
    start: torch.Tensor,
    *,
    n_steps: int,
    step_size: Callable[[int], float],
    relative: bool,
    objective: Objective,
    generator: torch.Generator,
    min_radius: float,
) -> AscentState:
    """Run ``n_steps`` normalised gradient steps from every row of ``start``.

    Each step moves ``delta = x - x0`` by ``s_k * g / ||g||`` where ``g`` is the gradient
    of the objective (the ratio ``||C(f(x)-f(x0))|| / ||delta||`` or the output change
    ``||C(f(x)-f(x0))||``) and ``s_k = step_size(k)``, multiplied by ``||delta||`` when
    ``relative`` (scale-free steps: the direction turns by about ``s_k`` radians and the
    radius changes by at most a factor ``1 + s_k``). ``delta`` is then projected onto
    ``min_radius <= ||delta|| <= eps``. Where the gradient vanishes (e.g. all ReLUs on the
    path are inactive) a random direction is used instead. The ratio of every iterate is
    recorded and the best per restart kept.

    Args:
        prob: the checked problem.
        start: flat start points ``(B, d)`` inside the ball, none equal to ``x0``.
        n_steps: number of gradient steps (``n_steps + 1`` evaluations per restart).
        step_size: step ``k -> s_k``.
        relative: scale steps by the current radius.
        objective: ``"ratio"`` or ``"difference"``.
        generator: random source for the dead-gradient fallback.
        min_radius: smallest allowed ``||delta||`` (> 0).

    Returns:
        The best point of each restart.
    """
    x0_flat = prob.x0.reshape(1, -1)
    eps = prob.eps
    x = place_in_ball(x0_flat, start.detach().to(prob.dtype), eps)
    b = x.shape[0]
    best_x = x.clone()
    best_ratio = torch.full((b,), -math.inf, dtype=torch.float64, device=prob.device)
    n_eval = 0
    for k in range(n_steps + 1):
        delta = (x - x0_flat).detach().requires_grad_(k < n_steps)
        with torch.set_grad_enabled(k < n_steps):
            out = prob.model(prob.batch(x0_flat + delta))
            num = safe_norm(prob.mapped_difference(out), dim=1)
        n_eval += b
        ratios = torch.nan_to_num(prob.ratios(x, out), nan=-math.inf)
        better = ratios > best_ratio
        best_ratio = torch.where(better, ratios, best_ratio)
        best_x[better] = x[better]
        if k == n_steps:
            break
        if objective == "ratio":
            den = torch.linalg.vector_norm(delta, dim=1)
            obj = num / torch.clamp(den, min=torch.finfo(prob.dtype).tiny)
        else:
            obj = num
        (grad,) = torch.autograd.grad(obj.sum(), delta)
        with torch.no_grad():
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            gnorm = torch.linalg.vector_norm(grad, dim=1)
            dead = ~(gnorm > 0)
            if bool(dead.any()):
                grad[dead] = torch.randn(
                    int(dead.sum()), prob.dim, device=prob.device, dtype=prob.dtype,
                    generator=generator,
                )
            direction = unit_rows(grad)
            d = delta.detach()
            s = step_size(k)
            if relative:
                radius = torch.linalg.vector_norm(d, dim=1, keepdim=True)
                d = d + s * radius * direction
            else:
                d = d + s * direction
            r = torch.linalg.vector_norm(d, dim=1, keepdim=True)
            r_safe = torch.where(r > 0, r, torch.ones_like(r))
            d = torch.where(r > eps, d * (eps / r_safe), d)
            d = torch.where((r < min_radius) & (r > 0), d * (min_radius / r_safe), d)
            d = torch.where(r > 0, d, min_radius * unit_rows(grad))
            x = place_in_ball(x0_flat, x0_flat + d, eps)
    return AscentState(best_x, best_ratio, n_eval)
