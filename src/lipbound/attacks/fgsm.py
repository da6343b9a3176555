"""Fast gradient (sign) method, L2 version, with a search for the smallest flipping step.

Reference: I. J. Goodfellow, J. Shlens and C. Szegedy, *Explaining and Harnessing
Adversarial Examples*, ICLR 2015 (arXiv 1412.6572).

FGSM takes one step from ``x0`` along the gradient of the loss. Here the distance is L2,
so the step is measured in L2:

* ``direction="l2"`` (default): ``d = g / ||g||_2``, the L2 analogue of FGSM (the "fast
  gradient method");
* ``direction="sign"``: ``d = sign(g) / ||sign(g)||_2``, the original sign direction
  rescaled to unit L2 length, so a step ``t`` has L2 size ``t``;

with ``g`` the input gradient of the cross-entropy w.r.t. the original class at ``x0``
(``loss="ce"``, as in the paper) or of the negative margin (``loss="margin"``). The attack
then returns the smallest step ``t`` for which ``clip(x0 + t d)`` is classified differently:
the steps ``t0 * 2^(k/4)``, ``k = -32, -31, ...`` (``t0`` the first-order distance estimate
``margin / ||grad margin||``, so there is no per-network constant) are evaluated in batches
until one flips the class (exponential bracketing), then the bracket is narrowed by
multisection (batched
bisection that keeps the first flip on the ray).

Distance: L2 in the model's input space. Shapes: ``x0`` is ``(1, *input_shape)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lipbound.attacks import FGSM
    >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
    >>> res = FGSM()(model, torch.ones(1, 4))
    >>> res.success, res.radius > 0
    (True, True)
"""

from __future__ import annotations

from typing import Literal

import torch

from lipbound.attacks.base import Attack, AttackContext, LossName, Proposal
from lipbound.errors import InputError
from lipbound.validation import check_int


class FGSM(Attack):
    """L2 fast gradient (sign) method with a bracketing + bisection search on the step.

    Args:
        direction: ``"l2"`` (normalised gradient) or ``"sign"`` (sign of the gradient,
            rescaled to unit L2 norm).
        loss: ``"ce"`` (cross-entropy, default) or ``"margin"``.
        max_doublings: how far the bracketing goes: steps up to ``t0 * 2**max_doublings``.
        points: step values evaluated per multisection round (one batch).
        rounds: multisection rounds; the bracket shrinks by ``points + 1`` per round.
    """

    name = "fgsm"

    def __init__(self, *, direction: Literal["l2", "sign"] = "l2", loss: LossName = "ce",
                 max_doublings: int = 40, points: int = 15, rounds: int = 5):
        if direction not in ("l2", "sign"):
            raise InputError(f"expected direction 'l2' or 'sign', got {direction!r}")
        if loss not in ("ce", "margin"):
            raise InputError(f"expected loss 'ce' or 'margin', got {loss!r}")
        self.direction = direction
        self.loss = loss
        self.max_doublings = check_int(max_doublings, "max_doublings", 1)
        self.points = check_int(points, "points", 1)
        self.rounds = check_int(rounds, "rounds", 1)

    def run(self, ctx: AttackContext) -> Proposal:
        _, g = ctx.loss_grad(ctx.x0, self.loss)
        d = ctx.normalize(torch.sign(g) if self.direction == "sign" else g)
        details: dict = {"direction": self.direction, "loss": self.loss}
        if not bool(d.flatten().abs().sum() > 0):
            details["reason"] = "zero gradient at x0"
            return None, details
        t0 = ctx.linear_estimate()
        details["t0"] = t0

        def path(t: torch.Tensor) -> torch.Tensor:
            t = t.to(ctx.x0.dtype).reshape(-1, *([1] * len(ctx.shape)))
            return ctx.clip(ctx.x0 + t * d)

        t_lo, t_hi = _bracket(ctx, path, t0, self.max_doublings)
        if t_hi is None:
            details["reason"] = f"no class change for steps up to {t0 * 2.0**self.max_doublings:g}"
            return None, details
        found = ctx.search_path(path, t_lo, t_hi, points=self.points, rounds=self.rounds)
        if found is None:  # pragma: no cover - t_hi was just seen adversarial
            return None, details
        x_adv, t = found
        details.update(step=t, bracket=[t_lo, t_hi])
        return x_adv, details


def _bracket(ctx: AttackContext, path, t0: float, max_doublings: int, start: int = -8,
             per_doubling: int = 4, batch: int = 32) -> tuple[float, float | None]:
    """First step ``t0 * 2^(k / per_doubling)`` (``k = start * per_doubling, ...``) whose
    point is adversarial, evaluated ``batch`` steps per forward pass; returns the bracket
    ``(previous step or 0, that step)``, or ``(.., None)`` if none up to
    ``t0 * 2^max_doublings``."""
    prev = 0.0
    k = start * per_doubling
    k_max = max_doublings * per_doubling
    while k <= k_max:
        ks = torch.arange(k, min(k + batch, k_max + 1), dtype=torch.float64,
                          device=ctx.x0.device)
        ts = t0 * torch.pow(2.0, ks / per_doubling)
        adv = ctx.is_adv(ctx.logits(path(ts)))
        if bool(adv.any()):
            i = int(torch.nonzero(adv)[0, 0])
            return (float(ts[i - 1]) if i > 0 else prev), float(ts[i])
        prev = float(ts[-1])
        k += batch
    return prev, None
