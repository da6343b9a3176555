"""Iterative FGSM (basic iterative method), L2 version, with a search over the budget.

Reference: A. Kurakin, I. Goodfellow and S. Bengio, *Adversarial Examples in the Physical
World*, ICLR workshop 2017 (arXiv 1607.02533).

For a budget ``eps`` the attack starts at ``x0`` and takes ``steps`` fast-gradient steps
of L2 length ``step_factor * eps / steps`` along the normalised gradient of the
cross-entropy w.r.t. the original class (``direction="sign"``: the sign of the gradient,
rescaled to unit L2 length), projecting back onto the L2 ball of radius ``eps`` around
``x0`` (and the box, if any) after every step -- the L2 analogue of Kurakin et al.'s
``Clip_{x,eps}``. Their schedule (step 1, ``min(eps + 4, 1.25 eps)`` steps, i.e. a total
path of about ``1.25 eps``) becomes a scale-free one: a fixed number of steps whose lengths
are proportional to the budget, so no per-network constant is needed. The smallest budget
at which the attack succeeds is then found by exponential bracketing from the first-order
estimate ``margin / ||grad margin||`` followed by multisection over ``eps`` (several budgets
run as one batch); every adversarial iterate is kept and the smallest one is finally pulled
back towards ``x0`` along the straight segment (``refine``).

Distance: L2 in the model's input space. Shapes: ``x0`` is ``(1, *input_shape)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lipbound.attacks import IterativeFGSM
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> res = IterativeFGSM(steps=10)(model, torch.ones(1, 4), seed=0)
    >>> res.method
    'ifgsm'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lipbound.attacks.base import Attack, AttackContext, LossName, Proposal
from lipbound.errors import InputError
from lipbound.validation import check_bool, check_float, check_int


class IterativeFGSM(Attack):
    """L2 iterative FGSM with a bracketing + multisection search for the smallest budget.

    Args:
        steps: gradient steps per budget (Kurakin et al.'s fixed iteration count).
        step_factor: each step has L2 length ``step_factor * eps / steps``.
        loss: ``"ce"`` (cross-entropy, default) or ``"margin"``.
        direction: ``"l2"`` (normalised gradient, default) or ``"sign"``.
        points: budgets tried per refinement round (run as one batch).
        rounds: refinement rounds of the budget search.
        rel_tol: stop refining once the budget bracket is this tight (relative).
        refine: pull the final point back towards ``x0`` along the straight segment.
    """

    name = "ifgsm"

    def __init__(self, *, steps: int = 10, step_factor: float = 1.25, loss: LossName = "ce",
                 direction: Literal["l2", "sign"] = "l2", points: int = 7, rounds: int = 4,
                 rel_tol: float = 1e-3, refine: bool = True):
        _check_options(loss, direction)
        self.steps = check_int(steps, "steps", 1)
        self.step_factor = check_float(step_factor, "step_factor", minimum=0)
        self.loss = loss
        self.direction = direction
        self.points = check_int(points, "points", 1)
        self.rounds = check_int(rounds, "rounds", 0)
        self.rel_tol = check_float(rel_tol, "rel_tol", minimum=0, maximum=1)
        self.refine = check_bool(refine, "refine")

    def run(self, ctx: AttackContext) -> Proposal:
        def attempt(eps: Tensor) -> tuple[Tensor, Tensor]:
            starts = ctx.x0.expand(len(eps), *ctx.shape)
            return _projected_ascent(ctx, starts, eps, self.steps,
                                     self.step_factor * eps / self.steps, loss=self.loss,
                                     direction=self.direction)

        eps0 = ctx.linear_estimate()
        pts, info = _search_eps(ctx, attempt, eps0, points=self.points, rounds=self.rounds,
                                rel_tol=self.rel_tol)
        details = {"steps": self.steps, "step_factor": self.step_factor, "loss": self.loss,
                   "direction": self.direction, "eps0": eps0, **info}
        if pts is None:
            return None, details
        if self.refine:
            pts = torch.cat([ctx.shrink(pts[:1]), pts])
        return pts, details


def _check_options(loss: str, direction: str) -> None:
    if loss not in ("ce", "margin"):
        raise InputError(f"expected loss 'ce' or 'margin', got {loss!r}")
    if direction not in ("l2", "sign"):
        raise InputError(f"expected direction 'l2' or 'sign', got {direction!r}")


Attempt = Callable[[Tensor], tuple[Tensor, Tensor]]


def _projected_ascent(ctx: AttackContext, starts: Tensor, eps: Tensor, steps: int,
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


def _search_eps(ctx: AttackContext, attempt: Attempt, eps0: float, *, points: int,
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
