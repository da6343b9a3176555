"""Shared machinery of the iterative attacks: a projected-gradient inner loop run for many
L2 budgets at once, and the search over the budget ``eps`` that turns a fixed-budget attack
into a minimal-perturbation attack."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lipbound.attacks.base import AttackContext, LossName

logger = logging.getLogger(__name__)

Attempt = Callable[[Tensor], tuple[Tensor, Tensor]]


def projected_ascent(ctx: AttackContext, starts: Tensor, eps: Tensor, steps: int,
                     step_size: Tensor, *, loss: LossName = "margin",
                     direction: Literal["l2", "sign"] = "l2") -> tuple[Tensor, Tensor]:
    """Run ``steps`` projected L2 gradient steps from ``starts`` for per-sample budgets.

    ``x <- Proj_{B(x0, eps_i) ∩ box}(x + a_i d(x))`` with ``d`` the unit-L2 ascent direction
    of ``loss`` (or its sign, rescaled to unit L2 norm). Every iterate is checked (the scores
    come with its gradient); the smallest adversarial iterate of each sample is kept.

    Args:
        starts: ``(B, *shape)`` starting points (inside the balls).
        eps: ``(B,)`` budgets; ``step_size``: ``(B,)`` step lengths.

    Returns:
        ``(best_x, best_r)``: per-sample smallest adversarial iterate and its L2 radius
        (``inf`` and ``x0`` where none was found).
    """
    eps = eps.to(ctx.x0.dtype)
    step_size = step_size.to(ctx.x0.dtype)
    x = ctx.project_ball(starts, eps)
    b = x.shape[0]
    best_r = torch.full((b,), math.inf, dtype=torch.float64, device=x.device)
    best_x = ctx.x0.expand_as(x).clone()
    for s in range(steps + 1):
        if s < steps:
            z, g = ctx.loss_grad(x, loss)
        else:
            z = ctx.logits(x)
        adv = ctx.is_adv(z)
        r = ctx.norms((x - ctx.x0).to(torch.float64))
        upd = adv & (r < best_r)
        if bool(upd.any()):
            best_x[upd] = x[upd]
            best_r[upd] = r[upd]
        if s == steps:
            break
        d = ctx.normalize(torch.sign(g) if direction == "sign" else g)
        x = ctx.project_ball(x + d * ctx.bview(step_size, x), eps)
    return best_x, best_r


def search_eps(ctx: AttackContext, attempt: Attempt, eps0: float, *, points: int,
               rounds: int, rel_tol: float = 1e-3, max_doublings: int = 40,
               bracket_points: int = 8) -> tuple[Tensor | None, dict[str, Any]]:
    """Smallest budget at which a fixed-budget attack succeeds, by bracketing + multisection.

    ``attempt(eps)`` runs the fixed-budget attack for each value of ``eps`` (one batch) and
    returns the smallest adversarial point per budget and its radius (``inf`` on failure).
    Budgets ``eps0 * 2^k`` are tried ``bracket_points`` at a time until one succeeds; then
    each round tries ``points`` budgets spread over ``(lo, hi)``, where ``hi`` is the
    smallest radius found so far and ``lo`` the largest failed budget below it. Success is
    not assumed monotone in ``eps``: every success is kept and the smallest one wins.

    Returns:
        ``(points, info)``: all successful points found (``(K, *shape)``, smallest first), or
        ``None``, and a dict with the final bracket and the number of budgets tried.
    """
    dev = ctx.x0.device
    found_x: list[Tensor] = []
    found_r: list[float] = []
    failed: list[float] = []
    tried = 0

    def record(eps: Tensor) -> None:
        nonlocal tried
        xs, rs = attempt(eps)
        tried += len(eps)
        for i in range(len(eps)):
            r = float(rs[i])
            if math.isfinite(r):
                found_x.append(xs[i:i + 1])
                found_r.append(r)
            else:
                failed.append(float(eps[i]))

    k = -(bracket_points // 2)
    while not found_r and k <= max_doublings:
        ks = torch.arange(k, k + bracket_points, dtype=torch.float64, device=dev)
        record(eps0 * torch.pow(2.0, ks))
        k += bracket_points
    if not found_r:
        return None, {"budgets_tried": tried, "max_budget": eps0 * 2.0**k}
    lo = hi = 0.0
    for _ in range(rounds):
        hi = min(found_r)
        lo = max([e for e in failed if e < hi], default=0.0)
        if hi - lo <= rel_tol * hi:
            break
        if lo == 0.0:  # nothing failed below: look geometrically lower
            eps = hi * torch.pow(2.0, -torch.arange(points, 0, -1, dtype=torch.float64,
                                                    device=dev))
        else:
            eps = torch.linspace(lo, hi, points + 2, dtype=torch.float64, device=dev)[1:-1]
        record(eps)
    hi = min(found_r)
    lo = max([e for e in failed if e < hi], default=0.0)
    order = sorted(range(len(found_r)), key=found_r.__getitem__)
    pts = torch.cat([found_x[i] for i in order])
    return pts, {"budgets_tried": tried, "eps_bracket": [lo, hi]}
