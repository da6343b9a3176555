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

from typing import Literal

import torch
from torch import Tensor

from lipbound.attacks._iterative import projected_ascent, search_eps
from lipbound.attacks.base import Attack, AttackContext, LossName, Proposal
from lipbound.errors import InputError


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
        _check_common(steps, step_factor, loss, direction, points, rounds, rel_tol)
        self.steps = int(steps)
        self.step_factor = float(step_factor)
        self.loss = loss
        self.direction = direction
        self.points = int(points)
        self.rounds = int(rounds)
        self.rel_tol = float(rel_tol)
        self.refine = bool(refine)

    def run(self, ctx: AttackContext) -> Proposal:
        def attempt(eps: Tensor) -> tuple[Tensor, Tensor]:
            starts = ctx.x0.expand(len(eps), *ctx.shape)
            return projected_ascent(ctx, starts, eps, self.steps,
                                    self.step_factor * eps / self.steps, loss=self.loss,
                                    direction=self.direction)

        eps0 = ctx.linear_estimate()
        pts, info = search_eps(ctx, attempt, eps0, points=self.points, rounds=self.rounds,
                               rel_tol=self.rel_tol)
        details = {"steps": self.steps, "step_factor": self.step_factor, "loss": self.loss,
                   "direction": self.direction, "eps0": eps0, **info}
        if pts is None:
            return None, details
        if self.refine:
            pts = torch.cat([ctx.shrink(pts[:1]), pts])
        return pts, details


def _check_common(steps: int, step_factor: float, loss: str, direction: str, points: int,
                  rounds: int, rel_tol: float) -> None:
    if steps < 1 or points < 1 or rounds < 0:
        raise InputError(f"expected steps >= 1, points >= 1, rounds >= 0; got steps={steps}, "
                         f"points={points}, rounds={rounds}")
    if not step_factor > 0:
        raise InputError(f"expected step_factor > 0, got {step_factor}")
    if loss not in ("ce", "margin"):
        raise InputError(f"expected loss 'ce' or 'margin', got {loss!r}")
    if direction not in ("l2", "sign"):
        raise InputError(f"expected direction 'l2' or 'sign', got {direction!r}")
    if not 0 < rel_tol < 1:
        raise InputError(f"expected 0 < rel_tol < 1, got {rel_tol}")
