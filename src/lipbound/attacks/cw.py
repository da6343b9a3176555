"""Carlini & Wagner L2 attack.

Reference: N. Carlini and D. Wagner, *Towards Evaluating the Robustness of Neural
Networks*, IEEE Symposium on Security and Privacy 2017 (arXiv 1608.04644).

For a constant ``c`` the attack minimises, with Adam,

    ||x - x0||_2^2 + c * max(z_c(x) - max_{j != c} z_j(x), -kappa)

over ``x``, ``z`` the scores and ``c`` the original class. Without a box the perturbation
``delta = x - x0`` is optimised directly (no change of variables is needed); with
``bounds=(lo, hi)`` the paper's change of variables ``x = lo + (hi - lo)(tanh(w) + 1) / 2``
keeps every iterate in the box. A binary search over ``c`` (``binary_steps`` runs; ``c`` is
multiplied by 10 while no run succeeded, then bisected) balances size and success, and the
smallest adversarial iterate over all runs is kept. Scale-free defaults replace the
paper's constants: the first ``c`` is ``2 m0 / ||grad m0||^2`` (where the optimality
condition ``2 delta = c grad m`` of the linearised problem holds at the first-order
distance ``r0 = m0 / ||grad m0||``), and Adam's learning rate is ``lr_factor * r0 /
sqrt(n)`` (``n`` input coordinates), decayed with a cosine schedule to 1 % in each run.
The best point is finally pulled back towards ``x0`` along the straight segment
(``refine``).

Distance: L2 in the model's input space. Shapes: ``x0`` is ``(1, *input_shape)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lipbound.attacks import CarliniWagnerL2
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> res = CarliniWagnerL2(binary_steps=5, steps=50)(model, torch.ones(1, 4))
    >>> res.method
    'cw'
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lipbound.attacks.base import Attack, AttackContext, Proposal
from lipbound.validation import check_bool, check_float, check_int


class CarliniWagnerL2(Attack):
    """Carlini & Wagner's L2 attack with a binary search over the constant ``c``.

    Args:
        binary_steps: number of values of ``c`` tried (one Adam run each).
        steps: Adam iterations per value of ``c``.
        kappa: confidence margin (0: stop pushing once the class changed).
        lr_factor: Adam's learning rate is ``lr_factor * r0 / sqrt(n)``.
        initial_c: first ``c``; ``None`` (default) for the automatic ``2 m0/||grad m0||^2``.
        refine: pull the best point back towards ``x0`` along the straight segment.
    """

    name = "cw"

    def __init__(self, *, binary_steps: int = 9, steps: int = 100, kappa: float = 0.0,
                 lr_factor: float = 2.0, initial_c: float | None = None, refine: bool = True):
        self.binary_steps = check_int(binary_steps, "binary_steps", 1)
        self.steps = check_int(steps, "steps", 1)
        self.kappa = check_float(kappa, "kappa", minimum=0, min_inclusive=True)
        self.lr_factor = check_float(lr_factor, "lr_factor", minimum=0)
        self.initial_c = None if initial_c is None else check_float(
            initial_c, "initial_c (or None)", minimum=0)
        self.refine = check_bool(refine, "refine")

    def run(self, ctx: AttackContext) -> Proposal:
        z0, g0 = ctx.loss_grad(ctx.x0, "margin")
        m0 = float(ctx.margin(z0)[0])
        gn = float(ctx.norms(g0)[0])
        if gn > 0 and math.isfinite(gn) and m0 > 0:
            r0, c = m0 / gn, 2.0 * m0 / gn**2
        else:
            r0, c = ctx.linear_estimate(), 1.0
        if self.initial_c is not None:
            c = self.initial_c
        lr = self.lr_factor * r0 / math.sqrt(ctx.dim)
        lo_c, hi_c = 0.0, math.inf
        best_x: Tensor | None = None
        best_r = math.inf
        history = []
        for _ in range(self.binary_steps):
            x_c, r_c = self._optimise(ctx, c, lr)
            history.append({"c": c, "success": x_c is not None, "radius": r_c})
            if x_c is not None:
                if r_c < best_r:
                    best_x, best_r = x_c, r_c
                hi_c = min(hi_c, c)
            else:
                lo_c = max(lo_c, c)
            c = (lo_c + hi_c) / 2 if math.isfinite(hi_c) else c * 10.0
        details = {"lr": lr, "r0": r0, "kappa": self.kappa, "steps": self.steps,
                   "search": history}
        if best_x is None:
            return None, details
        cands = [best_x]
        if self.refine:
            cands.insert(0, ctx.shrink(best_x))
        return torch.cat(cands), details

    def _optimise(self, ctx: AttackContext, c: float, lr: float) -> tuple[Tensor | None, float]:
        """One Adam run at constant ``c``; the smallest adversarial iterate and its radius."""
        x0 = ctx.x0
        if ctx.lo is not None and ctx.hi is not None:
            lo, half = ctx.lo, (ctx.hi - ctx.lo) / 2
            u = torch.clamp((x0 - lo) / half - 1.0, -1 + 1e-6, 1 - 1e-6)
            param = torch.atanh(u).detach().requires_grad_(True)
            lr_p = lr / float(half.mean())

            def point(p: Tensor) -> Tensor:
                return lo + half * (torch.tanh(p) + 1.0)
        else:
            param = torch.zeros_like(x0).requires_grad_(True)
            lr_p = lr

            def point(p: Tensor) -> Tensor:
                return x0 + p
        # Adam (Kingma & Ba 2015), written out: torch.optim would import torch._dynamo
        # (over a second on first use) for a few lines of arithmetic.
        beta1, beta2, tiny = 0.9, 0.999, 1e-12
        m1 = torch.zeros_like(param)
        m2 = torch.zeros_like(param)
        best_x: Tensor | None = None
        best_r = math.inf
        for it in range(self.steps):
            with torch.enable_grad():
                x = point(param)
                ctx.calls += 1
                z = ctx.model(x)
                m = ctx.margin(z)
                dist2 = (x - x0).pow(2).sum()
                loss = dist2 + c * torch.clamp(m, min=-self.kappa).sum()
                (grad,) = torch.autograd.grad(loss, [param])
            with torch.no_grad():
                if bool(ctx.is_adv(z.detach())[0]):
                    r = float(dist2.detach().double().sqrt())
                    if r < best_r:
                        best_x, best_r = x.detach().clone(), r
                m1.mul_(beta1).add_(grad, alpha=1 - beta1)
                m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                t = it + 1
                # cosine decay of the learning rate to 1 % over the run
                lr_t = lr_p * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * it / self.steps)))
                step = lr_t / (1 - beta1**t)
                denom = (m2 / (1 - beta2**t)).sqrt_().add_(tiny)
                param.addcdiv_(m1, denom, value=-step)
        return best_x, best_r
