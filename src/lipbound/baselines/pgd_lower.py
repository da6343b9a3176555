"""A simple empirical lower bound: projected gradient ascent on the ratio, with restarts.

Used by :func:`lipbound.baselines.compare.compare` only when
:func:`lipbound.lower.best_lower_bound` is unavailable.

Quantity: the local L2 Lipschitz constant **relative to x0**,
``sup_{0 < ||x - x0|| <= eps} ||C (f(x) - f(x0))|| / ||x - x0||`` (``docs/method.md``), which
is at most the constant over all pairs in the ball and at most any global constant.

Guarantee: LOWER. The value is the ratio at a concrete witness ``x`` in the ball,
recomputed with a fresh forward pass (norms in float64). Method: projected gradient ascent
(Madry et al., ICLR 2018, applied to the ratio instead of a loss) from random starts in
the ball, with a fixed seed and a private random generator.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from lipbound.errors import InputError
from lipbound.results import BoundResult, Guarantee

__all__ = ["pgd_lower_bound"]


def _ratio(model: nn.Module, x: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor,
           cmat: torch.Tensor | None) -> torch.Tensor:
    dy = model(x) - y0
    if cmat is not None:
        dy = dy @ cmat.T
    dx = (x - x0).flatten(1)
    return dy.flatten(1).norm(dim=1) / dx.norm(dim=1).clamp_min(1e-30)


def pgd_lower_bound(model: nn.Module, x0: torch.Tensor, eps: float, *, restarts: int = 8,
                    steps: int = 60, seed: int = 0, output_map: Any | None = None,
                    model_name: str | None = None) -> BoundResult:
    """Lower bound on the local L2 constant relative to ``x0`` by projected gradient ascent.

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x0: nominal input, shape ``(1, *shape)``.
        eps: L2 radius (> 0).
        restarts: number of random starts (run as one batch).
        steps: ascent steps per start.
        seed: seed of the private random generator (global RNG state is not touched).
        output_map: optional ``(k, m)`` matrix ``C``.
        model_name: name stored in the result.

    Returns:
        A :class:`~lipbound.results.BoundResult` with guarantee LOWER; ``notes`` hold the
        witness distance.
    """
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.shape[0] != 1:
        raise InputError("x0 must be a tensor with a batch dimension of 1")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise InputError(f"eps must be finite and > 0, got {eps}")
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x0d = x0.detach()
    cmat = None
    if output_map is not None:
        cmat = torch.as_tensor(output_map).to(device=x0d.device, dtype=x0d.dtype)
    with torch.no_grad():
        y0 = model(x0d)
    shape = (restarts, *x0d.shape[1:])
    d = torch.randn(shape, generator=gen, dtype=torch.float64).to(x0d)
    d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * (d.dim() - 1))
    r = torch.rand(restarts, generator=gen, dtype=torch.float64).to(x0d).clamp_min(0.05)
    delta = d * (eps * r).view(-1, *[1] * (d.dim() - 1))
    step = eps / 10
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        val = _ratio(model, x0d + delta, y0, x0d, cmat).sum()
        (grad,) = torch.autograd.grad(val, delta)
        gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (grad.dim() - 1))
        with torch.no_grad():
            delta = delta + step * grad / gn
            nrm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (grad.dim() - 1))
            delta = delta * torch.clamp(eps / nrm.clamp_min(1e-30), max=1.0)
            delta = torch.where(nrm > 1e-12 * eps, delta, d * eps * 0.5)
        step *= 0.97
    with torch.no_grad():
        x = x0d + delta.detach()
        # re-check: inside the ball, ratio from a fresh forward pass, in float64
        dist = (x - x0d).flatten(1).to(torch.float64).norm(dim=1)
        dy = (model(x) - model(x0d)).to(torch.float64)
        if cmat is not None:
            dy = dy @ cmat.to(torch.float64).T
        ratio = dy.flatten(1).norm(dim=1) / dist.clamp_min(1e-300)
        ok = (dist > 0) & (dist <= eps)
        ratio = torch.where(ok, ratio, torch.zeros_like(ratio))
        i = int(torch.argmax(ratio))
    return BoundResult(
        value=float(ratio[i]), guarantee=Guarantee.LOWER, method="pgd-lower",
        quantity="local L2 Lipschitz constant relative to x0 (empirical lower bound)",
        eps=eps, seconds=time.perf_counter() - t0, norm="l2", model=model_name,
        notes=(f"witness at distance {float(dist[i]):.6g} from x0 ({restarts} restarts, "
               f"{steps} steps)",))
