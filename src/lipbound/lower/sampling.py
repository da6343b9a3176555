"""Uniform sampling in the L2 ball and the random-sampling lower bound.

The random lower bound is the baseline used by Avant & Morgansen, *Analytical Bounds on
the Local Lipschitz Constants of ReLU Networks* (IEEE TNNLS 2023, arXiv 2104.14672):
the largest ratio ``||f(x) - f(x0)|| / ||x - x0||`` over points drawn uniformly from the
ball. In high dimension it is weak (random directions see roughly the Frobenius norm of
the Jacobian divided by sqrt(d), not its spectral norm); it is kept as a reference.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from lipbound._precision import exact_float32_on_model
from lipbound._progress import progress_bar
from lipbound.errors import InputError
from lipbound.lower._common import (
    auto_batch_size,
    check_positive_int,
    check_problem,
    distances,
    finalize,
    gradient_scale,
    make_generator,
    place_in_ball,
    radius_floor,
    unit_rows,
)
from lipbound.lower.result import LowerBoundResult
from lipbound.validation import check_bool, check_eps, check_finite, check_plain_tensor

logger = logging.getLogger(__name__)

PROGRESS_NONE = "a bar only for large n_samples"
"""What ``progress=None`` means, for the message of a bad ``progress``."""

#: sample count from which the progress bar is shown by default (on a terminal)
_PROGRESS_FROM = 50_000


def _draw(
    x0_flat: torch.Tensor, eps: float, n: int, generator: torch.Generator | None
) -> torch.Tensor:
    d = x0_flat.shape[1]
    u = unit_rows(
        torch.randn(n, d, device=x0_flat.device, dtype=x0_flat.dtype, generator=generator)
    )
    # radius eps * U^(1/d), computed in float64 (U^(1/d) is close to 1 for large d)
    uu = torch.rand(n, device=x0_flat.device, dtype=torch.float64, generator=generator)
    r = eps * torch.exp(torch.log(uu) / d)
    x = x0_flat + (r[:, None] * u.to(torch.float64)).to(x0_flat.dtype)
    return place_in_ball(x0_flat, x, eps)


def _draw_with_distances(
    x0_flat: torch.Tensor, eps: float, n: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _draw(x0_flat, eps, n, generator)
    return x, distances(x0_flat, x)


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """torch draws only with a generator of the tensor's device type (a CPU generator for a
    CUDA ``x0`` raised torch's RuntimeError on a GPU)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator (or None), got "
                         f"{type(generator).__name__}; for a seed pass "
                         "torch.Generator(device=x0.device).manual_seed(seed)")
    if generator.device.type != device.type:
        raise InputError(f"generator is on {generator.device.type} but x0 is on {device.type}; "
                         "make it on x0's device: "
                         "torch.Generator(device=x0.device).manual_seed(seed)")


def sample_ball(
    x0: torch.Tensor,
    eps: float,
    n: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``n`` points uniformly from the closed L2 ball of radius ``eps`` around ``x0``.

    Directions are normalised standard Gaussians, radii are ``eps * U**(1/d)`` with
    ``U ~ Uniform(0, 1)`` and ``d`` the number of input coordinates, which makes the
    points uniform in volume (for large ``d`` nearly all of them lie close to the sphere;
    that is what uniformity means there). Every returned point satisfies
    ``||x - x0||_2 <= eps`` as measured in float64 on the stored values (points that
    rounding pushed out are pulled back in).

    Args:
        x0: centre, shape ``(1, *shape)``; samples get its dtype and device.
        eps: radius (> 0).
        n: number of points (>= 1).
        generator: optional ``torch.Generator`` on ``x0``'s device, for reproducibility.

    Returns:
        Tensor of shape ``(n, *shape)``.

    Raises:
        InputError: on a bad shape, eps or n (also an eps beyond the range of x0's dtype),
            or a ``generator`` that is not a ``torch.Generator`` on ``x0``'s device type.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_ball(torch.zeros(1, 3), 0.5, 4, generator=g).shape
        torch.Size([4, 3])
    """
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.shape[0] != 1:
        got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise InputError(f"x0 must be a tensor of shape (1, *input_shape), got {got}; use "
                         "x0.unsqueeze(0) for one unbatched input")
    check_plain_tensor(x0, "x0")
    if not x0.is_floating_point():
        raise InputError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}; convert "
                         "it with x0.double()")
    check_finite(x0, "x0")
    eps = check_eps(eps)
    if not math.isfinite(float(torch.tensor(eps, dtype=torch.float64).to(x0.dtype))):
        raise InputError(f"eps={eps:g} is beyond the range of x0's dtype {x0.dtype}: the ball's "
                         "points cannot be represented; use a smaller eps or x0.double()")
    n = check_positive_int("n", n)
    _check_generator(generator, x0.device)
    flat = _draw(x0.detach().reshape(1, -1), eps, n, generator)
    return flat.reshape(n, *x0.shape[1:])


@exact_float32_on_model
def random_lower_bound(
    model: nn.Module,
    x0: torch.Tensor,
    eps: float,
    *,
    n_samples: int = 100_000,
    batch_size: int | None = None,
    seed: int = 0,
    output_map: torch.Tensor | None = None,
    progress: bool | None = None,
) -> LowerBoundResult:
    """Lower bound on ``L(x0, eps)`` by uniform random sampling in the ball.

    Evaluates ``||C (f(x) - f(x0))|| / ||x - x0||`` at ``n_samples`` points drawn by
    :func:`sample_ball` (batched, under ``torch.no_grad``, in the model's dtype) and returns
    the largest, recomputed from its witness by :func:`~lipbound.lower.ratio_at`. Baseline
    of Avant & Morgansen (IEEE TNNLS 2023).

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, m)``.
        x0: nominal input, shape ``(1, *shape)``.
        eps: L2 radius (> 0).
        n_samples: number of points.
        batch_size: points per forward pass; ``None`` picks one from the model's largest
            activation. The sample stream depends on ``seed`` and ``batch_size``.
        seed: seed of the sampler's own generator (global RNG untouched).
        output_map: optional ``(k, m)`` matrix ``C`` applied to output differences.
        progress: show a bar on stderr (only on a terminal, after a few seconds: see
            :mod:`lipbound._progress`); ``None``: only for large ``n_samples``.

    Returns:
        A :class:`LowerBoundResult` with ``method="random"``.

    Raises:
        InputError: on invalid arguments.
    """
    t_start = time.perf_counter()
    prob = check_problem(model, x0, eps, output_map)
    n_samples = check_positive_int("n_samples", n_samples)
    if batch_size is None:
        batch_size = auto_batch_size(prob, n_samples)
    batch_size = check_positive_int("batch_size", batch_size)
    gen = make_generator(prob.device, seed)
    progress = check_bool(progress, "progress", none=PROGRESS_NONE)
    if progress is None:
        progress = n_samples >= _PROGRESS_FROM

    x0_flat = prob.x0.reshape(1, -1)
    # ratios at radii where rounding of the forward pass could dominate are not scored
    floor = min(radius_floor(prob, gradient_scale(prob)), 0.5 * prob.eps)
    keep = 4
    best_pts = x0_flat.new_zeros(0, prob.dim)
    best_scores = torch.zeros(0, dtype=torch.float64, device=prob.device)
    done = 0
    with torch.no_grad(), progress_bar(progress, n_samples, "random lower bound", "pt") as bar:
        while done < n_samples:
            b = min(batch_size, n_samples - done)
            pts, dist = _draw_with_distances(x0_flat, prob.eps, b, gen)
            out = prob.model(prob.batch(pts))
            scores = torch.nan_to_num(prob.ratios(pts, out, dist), nan=-math.inf)
            near = dist < floor
            scores = torch.where(near, torch.full_like(scores, -math.inf), scores)
            k = min(keep, b)
            top = torch.topk(scores, k)
            best_pts = torch.cat([best_pts, pts[top.indices]])
            best_scores = torch.cat([best_scores, top.values])
            top_all = torch.topk(best_scores, min(keep, best_scores.numel()))
            best_pts, best_scores = best_pts[top_all.indices], top_all.values
            done += b
            bar.update(b)

    fin = finalize(prob, best_pts, best_scores, top_k=keep)
    value, witness, dist = fin.value, fin.witness, fin.distance
    details = {
        "n_samples": n_samples,
        "batch_size": batch_size,
        "seed": seed,
        "min_radius_scored": floor,
        "witness_distance": dist,
        "witness_radius_fraction": dist / prob.eps,
        "rounding_error_estimate": fin.rounding,
        "evaluated_in": fin.evaluated_in,
        "search_best_ratio": float(best_scores[0]) if best_scores.numel() else float("nan"),
    }
    if fin.note is not None:  # (no finite ratio anywhere: the value is 0)
        details["note"] = fin.note
    seconds = time.perf_counter() - t_start
    logger.info("random lower bound %.6g at eps=%g (%d samples, %.2fs)",
                value, prob.eps, n_samples, seconds)
    return LowerBoundResult(
        value=value,
        witness=witness,
        method="random",
        eps=prob.eps,
        seconds=seconds,
        n_evaluations=n_samples + fin.n_forward + 2,
        details=details,
    )


__all__ = ["sample_ball", "random_lower_bound"]
