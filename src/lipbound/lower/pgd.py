"""A strong maximiser of the x0-relative ratio: Jacobian directions plus multi-start PGD.

Two ingredients, both returning genuine ratios attained inside the ball:

1. **Directional ratios along the top singular vectors of the Jacobian at x0.** For a
   piecewise-linear network, ``||C(f(x0 + t v) - f(x0))|| / t -> ||C J(x0) v||`` as
   ``t -> 0`` (when ``f`` is differentiable at ``x0``), so with ``v`` the top right
   singular vector this reaches the Jacobian norm at ``x0``. (The Jacobian norm at another
   point of the ball bounds the constant over all pairs, not the x0-relative one, and at a
   kink of ``f`` even the norm at ``x0`` need not be attained; only the ratios are used.)
   Ratios at ``t = eps * {1, 0.5, 0.2, 0.1, 1e-2, ...}``
   are evaluated, down to the radius where rounding of ``x0 + t v`` takes over.
2. **Projected gradient ascent on the ratio** ``||C(f(x)-f(x0))|| / ||x - x0||`` from a
   batch of restarts: along ``+-v`` at several radii, random directions at radii
   ``eps * {1, 0.5, 0.1, 0.01, 0.001}``, perturbed copies of ``v``, and any user-supplied
   points (e.g. witnesses of other methods). Steps are normalised gradients scaled by the
   current radius, with a cosine-decaying factor, so the search moves freely in both
   direction and log-radius: the ratio can peak at small radii.
3. **Refinement** (successive halving): the most promising restarts continue with
   smaller steps. On the MNIST LeNet this beat twice as many plain restarts at the same
   cost.

The random-sampling and gradient-ascent baselines follow Avant & Morgansen, *Analytical
Bounds on the Local Lipschitz Constants of ReLU Networks* (IEEE TNNLS 2023); this method
is a stronger attack on the same quantity.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from lipbound._precision import exact_float32_on_model
from lipbound.errors import InputError
from lipbound.lower._ascent import ascend
from lipbound.lower._common import (
    Problem,
    check_positive_int,
    check_problem,
    finalize,
    gradient_scale,
    make_generator,
    place_in_ball,
    radius_floor,
    unit_rows,
)
from lipbound.lower.jacobian import EXACT_THRESHOLD, JacobianNorm, jacobian_spectrum
from lipbound.lower.result import LowerBoundResult
from lipbound.results import Guarantee
from lipbound.validation import check_float

logger = logging.getLogger(__name__)

#: radii (fractions of eps) of the directional ratios along the top singular vectors
_LADDER = (1.0, 0.5, 0.2, 0.1, 1e-2, 1e-3, 1e-4)
#: radii (fractions of eps) of the random restarts, used cyclically
_RANDOM_RADII = (1.0, 0.5, 0.1, 0.01, 0.001)
#: radii (fractions of eps) of the restarts along +-v1
_SINGULAR_RADII = (1.0, 0.1, 0.01)


def _starts(
    prob: Problem, v: torch.Tensor, n: int, floor: float, gen: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """``n`` flat start points and their labels."""
    eps, d = prob.eps, prob.dim
    x0 = prob.x0.reshape(1, -1)
    deltas: list[torch.Tensor] = []
    labels: list[str] = []
    for frac in _SINGULAR_RADII:
        for sign in (1.0, -1.0):
            deltas.append(sign * v)
            labels.append(f"{'+' if sign > 0 else '-'}v1 at {frac:g}*eps")
    radii = [max(frac * eps, floor) for frac in _SINGULAR_RADII for _ in (0, 1)]
    i = 0
    while len(deltas) < n:
        if i % 5 == 4:
            # a perturbed copy of the top singular direction (about 30 degrees off)
            noise = unit_rows(torch.randn(1, d, device=prob.device, dtype=prob.dtype,
                                          generator=gen))[0]
            deltas.append(unit_rows((v + 0.58 * noise)[None])[0])
            labels.append("v1+noise at 1*eps")
            radii.append(eps)
        else:
            frac = _RANDOM_RADII[(i - i // 5) % len(_RANDOM_RADII)]
            deltas.append(unit_rows(torch.randn(1, d, device=prob.device, dtype=prob.dtype,
                                                generator=gen))[0])
            labels.append(f"random at {frac:g}*eps")
            radii.append(max(frac * eps, floor))
        i += 1
    dirs = torch.stack(deltas[:n])
    r = torch.tensor(radii[:n], dtype=prob.dtype, device=prob.device)
    return x0 + r[:, None] * dirs, labels[:n]


def _cosine(first: float, last: float, n: int):  # noqa: ANN202 - a step schedule
    def step(k: int) -> float:
        return last + 0.5 * (first - last) * (1.0 + math.cos(math.pi * k / max(n, 1)))

    return step


@exact_float32_on_model
def pgd_lower_bound(
    model: nn.Module,
    x0: torch.Tensor,
    eps: float,
    *,
    n_restarts: int = 32,
    n_steps: int = 40,
    n_refine: int = 8,
    refine_steps: int = 80,
    lr: tuple[float, float, float] = (0.3, 0.1, 0.002),
    seed: int = 0,
    output_map: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    power_iterations: int = 50,
) -> LowerBoundResult:
    """Lower bound on ``L(x0, eps)``: Jacobian-direction ratios plus multi-start PGD.

    See the module docstring for the algorithm. The returned value is recomputed from the
    witness by :func:`~lipbound.lower.ratio_at`.

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x0: nominal input, shape ``(1, *shape)``.
        eps: L2 radius (> 0).
        n_restarts: generated restarts, run as one batch (user ``init`` points come on top).
        n_steps: gradient steps per restart in the exploration stage (0 evaluates the
            starts only).
        n_refine: restarts (the best by their best ratio) continued in the refinement
            stage; 0 skips it.
        refine_steps: gradient steps of the refinement stage.
        lr: step factors relative to the current radius: exploration decays (cosine) from
            ``lr[0]`` to ``lr[1]``, refinement from ``lr[1]`` to ``lr[2]``.
        seed: seed of the method's own generator.
        output_map: optional ``(k, m)`` matrix ``C``.
        init: optional extra start points, shape ``(n, *shape)``; points outside the ball
            are pulled onto it, points equal to ``x0`` are ignored.
        exact_threshold: largest Jacobian (``k * d`` entries) decomposed exactly; beyond it
            the top singular vector comes from power iteration.
        power_iterations: maximum power iterations in that case.

    Returns:
        A :class:`LowerBoundResult` with ``method="pgd"``; ``details`` holds the Jacobian
        norm at ``x0``, the best directional ratio and which start won.

    Raises:
        InputError: on invalid arguments.
    """
    t_start = time.perf_counter()
    prob = check_problem(model, x0, eps, output_map)
    n_restarts = check_positive_int("n_restarts", n_restarts)
    n_steps = check_positive_int("n_steps", n_steps, minimum=0)
    n_refine = check_positive_int("n_refine", n_refine, minimum=0)
    refine_steps = check_positive_int("refine_steps", refine_steps, minimum=0)
    exact_threshold = check_positive_int("exact_threshold", exact_threshold, minimum=0)
    power_iterations = check_positive_int("power_iterations", power_iterations)
    try:
        items = list(lr)
    except TypeError as exc:
        raise InputError(f"lr must be three step factors, got {lr!r}") from exc
    if len(items) != 3 or isinstance(lr, str):
        raise InputError(f"lr must be three step factors, got {lr!r}")
    lr0, lr1, lr2 = (check_float(v, f"lr[{i}]", minimum=0) for i, v in enumerate(items))
    x0_flat = prob.x0.reshape(1, -1)
    init_flat = None
    if init is not None:
        if not isinstance(init, torch.Tensor) or tuple(init.shape[1:]) != prob.shape:
            raise InputError(
                f"init must be a tensor of shape (n, *{prob.shape}), got "
                f"{getattr(init, 'shape', type(init))}"
            )
        init_flat = init.detach().to(device=prob.device, dtype=prob.dtype).reshape(
            init.shape[0], -1)
        if not bool(torch.isfinite(init_flat).all()):
            raise InputError("init contains NaN or infinite values")

    gen = make_generator(prob.device, seed)
    try:
        spec = jacobian_spectrum(prob.model, prob.x0, output_map=prob.output_map,
                                 exact_threshold=exact_threshold, n_iter=power_iterations,
                                 seed=seed)
    except InputError as exc:  # (the arguments were checked: a Jacobian that overflows)
        logger.info("pgd: no Jacobian direction (%s); random start directions", exc)
        spec = JacobianNorm(math.nan, torch.zeros(1, *prob.shape, dtype=prob.dtype,
                                                  device=prob.device),
                            Guarantee.ESTIMATE, "none (not finite)")
    floor = radius_floor(prob, spec.value if spec.value > 0 else gradient_scale(prob))
    vecs = spec.vectors.reshape(spec.vectors.shape[0], -1)
    if not bool((torch.linalg.vector_norm(vecs, dim=1) > 0).all()):
        vecs = unit_rows(torch.randn(1, prob.dim, device=prob.device, dtype=prob.dtype,
                                     generator=gen))
    n_eval = 0

    # 1. directional ratios along +-v_j at a ladder of radii (evaluation only)
    ts = sorted({max(f * prob.eps, floor) for f in _LADDER}, reverse=True)
    dir_pts, dir_labels = [], []
    for j in range(vecs.shape[0]):
        for sign in (1.0, -1.0):
            for t in ts:
                dir_pts.append(x0_flat[0] + sign * t * vecs[j])
                dir_labels.append(f"{'+' if sign > 0 else '-'}v{j + 1}, t={t:.3g}")
    dir_x = place_in_ball(x0_flat, torch.stack(dir_pts), prob.eps)
    with torch.no_grad():
        dir_ratio = torch.nan_to_num(prob.ratios(dir_x, prob.model(prob.batch(dir_x))),
                                     nan=-math.inf)
    n_eval += dir_x.shape[0]

    # 2. multi-start projected gradient ascent on the ratio
    start, labels = _starts(prob, vecs[0], n_restarts, floor, gen)
    if init_flat is not None and init_flat.shape[0] > 0:
        init_in = place_in_ball(x0_flat, init_flat, prob.eps)
        valid = (init_in != x0_flat).any(dim=1)
        start = torch.cat([start, init_in[valid]])
        labels += [f"init[{i}]" for i in torch.nonzero(valid).flatten().tolist()]

    state = ascend(prob, start, n_steps=n_steps, step_size=_cosine(lr0, lr1, n_steps),
                   relative=True, objective="ratio", generator=gen, min_radius=floor)
    n_eval += state.n_evaluations
    cands, scores = [state.best_x, dir_x], [state.best_ratio, dir_ratio]
    all_labels = labels + [f"directional {s}" for s in dir_labels]

    # 3. refinement: the most promising restarts continue with smaller steps
    keep = min(n_refine, start.shape[0])
    if keep > 0 and refine_steps > 0:
        top = torch.topk(state.best_ratio, keep).indices
        refined = ascend(prob, state.best_x[top], n_steps=refine_steps,
                         step_size=_cosine(lr1, lr2, refine_steps), relative=True,
                         objective="ratio", generator=gen, min_radius=floor)
        n_eval += refined.n_evaluations
        cands.append(refined.best_x)
        scores.append(refined.best_ratio)
        all_labels += [f"{labels[i]}, refined" for i in top.tolist()]
    ascent_best = max(float(t.max()) for i, t in enumerate(scores) if i != 1)
    cands = torch.cat(cands)
    scores = torch.cat(scores)
    fin = finalize(prob, cands, scores)
    value, witness, dist, idx = fin.value, fin.witness, fin.distance, fin.index
    n_eval += fin.n_forward + 1
    seconds = time.perf_counter() - t_start
    best_dir = int(torch.argmax(dir_ratio))
    details = {
        "n_restarts": int(start.shape[0]),
        "n_steps": n_steps,
        "n_refine": keep,
        "refine_steps": refine_steps,
        "lr": [lr0, lr1, lr2],
        "seed": seed,
        "jacobian_norm_x0": spec.value,
        "jacobian_method": spec.method,
        "jacobian_guarantee": spec.guarantee.value,
        "directional_best": float(dir_ratio[best_dir]),
        "directional_best_at": dir_labels[best_dir],
        "ascent_best": ascent_best,
        "best_start": all_labels[idx] if idx >= 0 else "fallback",
        "min_radius": floor,
        "witness_distance": dist,
        "witness_radius_fraction": dist / prob.eps,
        "rounding_error_estimate": fin.rounding,
        "evaluated_in": fin.evaluated_in,
    }
    if fin.note is not None:  # (no finite ratio anywhere: the value is 0)
        details["note"] = fin.note
    logger.info("pgd lower bound %.6g at eps=%g (%.2fs, best start %s)",
                value, prob.eps, seconds, details["best_start"])
    return LowerBoundResult(
        value=value, witness=witness, method="pgd", eps=prob.eps, seconds=seconds,
        n_evaluations=n_eval, details=details,
    )
