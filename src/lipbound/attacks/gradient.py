"""Gradient-ascent attack of Avant & Morgansen: follow the gradient until the class changes.

Reference: T. Avant and K. A. Morgansen, *Analytical Bounds on the Local Lipschitz
Constants of ReLU Networks*, IEEE TNNLS 2023 (arXiv 2104.14672), whose experiments compare
the certified radius with the size of perturbations found by, among others, a plain
gradient-ascent attack.

From ``x0`` the attack walks uphill on the loss in small steps of fixed L2 length ``h``,
re-computing the gradient after every step,
``x_{k+1} = clip(x_k + h * g_k / ||g_k||_2)``, ``g_k`` the input gradient of the negative
margin ``max_{j!=c} z_j - z_c`` (``loss="margin"``, default) or of the cross-entropy
(``loss="ce"``), until the class changes. The step size is chosen automatically: several
walks run as one batch with ``h = f * r0`` for each ``f`` in ``step_fractions``, where
``r0 = margin / ||grad margin||`` is the first-order distance to the boundary (so no
per-network constant), and a walk that has not flipped after ``ceil(4 / f)`` steps doubles
its ``h``. On the last segment ``[x_{k-1}, x_k]`` of each walk the first flipping point is
located by multisection, and that point is pulled back towards ``x0`` along the straight
segment (``refine``): the result is the smallest verified point found on or below the path.

Distance: L2 in the model's input space. Shapes: ``x0`` is ``(1, *input_shape)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lipbound.attacks import GradientAscent
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> res = GradientAscent()(model, torch.ones(1, 4))
    >>> res.method
    'gradient'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lipbound.attacks.base import Attack, AttackContext, LossName, Proposal
from lipbound.errors import InputError
from lipbound.validation import check_bool, check_float, check_int


class GradientAscent(Attack):
    """Small normalised gradient steps from ``x0`` until the class changes, then a line search.

    Args:
        step_fractions: step lengths as fractions of the first-order distance estimate; one
            walk per value, run as a batch.
        max_steps: largest number of steps of a walk.
        loss: ``"margin"`` (default) or ``"ce"``.
        points: points per multisection round of the final line searches.
        rounds: multisection rounds of the final line searches.
        refine: pull each walk's flip point back towards ``x0`` along the straight segment.
    """

    name = "gradient"

    def __init__(self, *, step_fractions: Sequence[float] = (1 / 8, 1 / 32, 1 / 128),
                 max_steps: int = 1000, loss: LossName = "margin", points: int = 15,
                 rounds: int = 4, refine: bool = True):
        try:
            items = list(step_fractions)  # type: ignore[arg-type]
        except TypeError:
            items = []
        if not items or isinstance(step_fractions, str):
            raise InputError(f"expected a non-empty sequence of positive step_fractions, got "
                             f"{step_fractions!r}")
        fr = tuple(check_float(f, f"step_fractions[{i}]", minimum=0)
                   for i, f in enumerate(items))
        if loss not in ("ce", "margin"):
            raise InputError(f"expected loss 'ce' or 'margin', got {loss!r}")
        self.step_fractions = fr
        self.max_steps = check_int(max_steps, "max_steps", 1)
        self.loss = loss
        self.points = check_int(points, "points", 1)
        self.rounds = check_int(rounds, "rounds", 1)
        self.refine = check_bool(refine, "refine")

    def run(self, ctx: AttackContext) -> Proposal:
        r0 = ctx.linear_estimate()
        dev, dt = ctx.x0.device, ctx.x0.dtype
        fr = torch.tensor(self.step_fractions, dtype=dt, device=dev)
        k = len(self.step_fractions)
        h = fr * r0
        patience = torch.ceil(4.0 / fr).long()
        x = ctx.x0.expand(k, *ctx.shape).clone()
        prev = x.clone()
        flipped = torch.zeros(k, dtype=torch.bool, device=dev)
        stuck = torch.zeros(k, dtype=torch.bool, device=dev)
        n_steps = torch.zeros(k, dtype=torch.long, device=dev)
        for it in range(self.max_steps + 1):
            act = torch.nonzero(~flipped & ~stuck).flatten()
            if act.numel() == 0:
                break
            if it == self.max_steps:
                z = ctx.logits(x[act])
                flipped[act] = ctx.is_adv(z)
                break
            z, g = ctx.loss_grad(x[act], self.loss)
            adv = ctx.is_adv(z)
            flipped[act[adv]] = True
            go = act[~adv]
            d = ctx.normalize(g[~adv])
            stuck[go[ctx.norms(d) == 0]] = True
            prev[go] = x[go]
            x[go] = ctx.clip(x[go] + d * ctx.bview(h[go], d))
            n_steps[go] += 1
            grow = go[(n_steps[go] % patience[go]) == 0]
            h[grow] *= 2.0
        details = {"loss": self.loss, "r0": r0, "step_fractions": list(self.step_fractions),
                   "steps": n_steps.tolist(), "final_steps": h.tolist(),
                   "flipped": flipped.tolist()}
        cands = []
        for i in torch.nonzero(flipped).flatten().tolist():
            found = ctx.search_path(ctx.segment(prev[i:i + 1], x[i:i + 1]), 0.0, 1.0,
                                    points=self.points, rounds=self.rounds)
            p = x[i:i + 1] if found is None else found[0]
            cands.append(p)
            if self.refine:
                cands.append(ctx.shrink(p[:1], points=self.points, rounds=self.rounds))
        if not cands:
            details["reason"] = "no walk changed the class"
            return None, details
        return torch.cat(cands), details
