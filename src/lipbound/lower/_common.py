"""Shared machinery of the lower-bound methods: input checks, ratio evaluation, ball projection.

Every lower bound is a ratio ``||C (f(x) - f(x0))|| / ||x - x0||`` attained by a concrete
``x`` with ``0 < ||x - x0|| <= eps``. Distances are always measured in float64 on the tensors
actually stored (so rounding of ``x0 + delta`` is accounted for), with a relative allowance for
the rounding of that float64 norm (:func:`distance_slack`), so that a witness lies in the ball
exactly, not only as float64 computes its distance. The final value of every method is
recomputed from the witness with fresh forward passes of a float64 copy of the model (the
network's own weights, evaluated with float64 rounding: a float32 forward pass rounds
``f(x) - f(x0)`` so coarsely near ``x0`` that its ratio can exceed the network's constant),
less an allowance for that rounding (:func:`finalize`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lipbound._modelinfo import (
    floating_tensor,
    guard_input_writes,
    unwrap_model,
    wrapper_problem,
)
from lipbound._precision import exact_float32_on_model
from lipbound.errors import InputError
from lipbound.graph import (
    check_finite_parameters,
    check_inference_tensors,
    modules_in_training,
)
from lipbound.ops.base import safe_norm
from lipbound.validation import check_eps, check_finite, check_int, check_plain_tensor

logger = logging.getLogger(__name__)

#: number of shrink attempts when a point lands just outside the ball through rounding
_MAX_SHRINK = 8

#: unit roundoff of float64
_U64 = 2.0**-53


def distance_slack(d: int) -> float:
    """Relative bound on the rounding of a float64 distance between two stored points.

    Each of the ``d`` differences and squares is rounded once (relative ``u``), the sum of
    ``d`` non-negative terms in any order by at most ``(d - 1) u`` relative, and the square
    root once: the computed distance is within ``(d/2 + 3) u`` of the exact one. This returns
    ``2 (d + 4) u``, twice that.
    """
    return 2.0 * (d + 4) * _U64


@dataclass(frozen=True)
class Problem:
    """Checked and normalised inputs of a lower-bound computation.

    Attributes:
        model: the network (eval mode).
        x0: nominal input, shape ``(1, *shape)``, on the working device and dtype.
        eps: ball radius.
        output_map: ``C`` as a ``(k, m)`` tensor in the working dtype, or ``None``.
        f0: ``f(x0)`` (no output map applied), shape ``(1, m)``.
        shape: the input shape without the batch dimension.
        dim: number of input coordinates ``d``.
    """

    model: nn.Module
    x0: torch.Tensor
    eps: float
    output_map: torch.Tensor | None
    f0: torch.Tensor
    shape: tuple[int, ...]
    dim: int
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    """Values computed once per problem (:func:`running_error`)."""

    @property
    def device(self) -> torch.device:
        return self.x0.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x0.dtype

    def batch(self, flat: torch.Tensor) -> torch.Tensor:
        """Reshape ``(n, d)`` rows into model inputs ``(n, *shape)``."""
        return flat.reshape(flat.shape[0], *self.shape)

    def mapped_difference(self, out: torch.Tensor) -> torch.Tensor:
        """``C (f(x) - f(x0))`` for a batch of outputs, in the working dtype (differentiable)."""
        diff = out - self.f0
        if self.output_map is not None:
            diff = diff @ self.output_map.T
        return diff

    def ratios(
        self, flat_x: torch.Tensor, out: torch.Tensor, dist: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float64 ratios of a batch of points ``flat_x`` (n, d) with outputs ``out`` (n, m).

        ``dist`` optionally gives the float64 distances to ``x0`` if already known.
        Points at distance 0 from ``x0`` get ``-inf`` (no ratio exists there), and so do
        points whose ratio is not a finite number (an output difference, or the ratio,
        beyond the floating-point range, or NaN): no valid witness.
        """
        diff = out.detach().to(torch.float64) - self.f0.to(torch.float64)
        if self.output_map is not None:
            diff = diff @ self.output_map.to(torch.float64).T
        num = safe_norm(diff, dim=1)
        den = distances(self.x0.reshape(1, -1), flat_x.detach()) if dist is None else dist
        r = num / den
        return torch.where((den > 0) & torch.isfinite(r), r, torch.full_like(r, -math.inf))


def _param_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """The model's device and floating-point type, or ``(None, None)`` without a floating
    parameter or buffer (the input's are then used)."""
    ref = floating_tensor(model)
    return (None, None) if ref is None else (ref.device, ref.dtype)


def _check_eval(model: nn.Module) -> None:
    """Refuse a model with any module in training mode (not only the root's flag)."""
    training = modules_in_training(model)
    if training:
        raise InputError(
            f"the model is in training mode ({len(training)} module(s), e.g. "
            f"{training[0]!r}; dropout / batch-norm would make f random); call model.eval() "
            "first"
        )


def check_problem(
    model: nn.Module,
    x0: torch.Tensor,
    eps: float,
    output_map: torch.Tensor | None,
) -> Problem:
    """Validate the common arguments and evaluate ``f(x0)``; check that the model's output
    has gradients with respect to its input (every method uses them: see
    :func:`check_input_gradients`).

    Raises:
        InputError: on any invalid argument, naming the problem and the fix.
    """
    if torch.is_inference_mode_enabled():
        raise InputError("the lower bounds need input gradients, which torch.inference_mode() "
                         "disables; call them outside inference mode")
    problem = wrapper_problem(model)
    if problem is not None and not isinstance(model, torch.jit.ScriptModule):
        raise InputError(problem)  # (a TorchScript module is only run, which works)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # DataParallel / torch.compile: the module they run
    _check_eval(model)
    check_inference_tensors(model)
    if not isinstance(x0, torch.Tensor):
        raise InputError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    check_plain_tensor(x0)
    if x0.dim() < 2 or x0.shape[0] != 1:
        raise InputError(
            f"x0 must have a batch dimension of size 1, shape (1, *input_shape); got shape "
            f"{tuple(x0.shape)} (use x0.unsqueeze(0) for a single unbatched input)"
        )
    if not x0.is_floating_point():
        raise InputError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}")
    if x0.numel() == 0:
        raise InputError(f"the input x0 of shape {tuple(x0.shape)} has no coordinates: there "
                         "is no ball to search; pass an input with at least one coordinate")
    check_finite(x0, "x0")
    eps_f = check_eps(eps)

    device, dtype = _param_device_dtype(model)
    if dtype is not None and x0.dtype != dtype and not bool(
            torch.equal(x0.to(dtype).to(x0.dtype), x0)):
        # x0 is not a point of the model's dtype (a float64 input of a float32 model): a ball
        # around its rounding would not be the caller's ball, so the search runs on a float64
        # copy of the model around the exact x0 (slower, but about the ball asked for)
        model64 = float64_model(model) if x0.dtype == torch.float64 else None
        if model64 is None:
            raise InputError(
                f"x0 ({x0.dtype}) is not representable in the model's {dtype}, and the model "
                f"cannot be run in {x0.dtype}; pass x0.to({dtype}) (the point the model can "
                "be run at) or a model in the input's dtype")
        model, dtype = model64, torch.float64
    x0 = x0.detach().to(device=device or x0.device, dtype=dtype or x0.dtype)
    shape = tuple(x0.shape[1:])
    dim = int(x0.numel())

    with torch.no_grad():
        try:
            # (on a copy: a model writing into its input is wrapped to get copies from now on)
            model, f0 = guard_input_writes(model, x0)
        except Exception as exc:  # a shape or dtype mismatch: name it as an input error
            raise InputError(
                f"the model failed on x0 of shape {tuple(x0.shape)} ({type(exc).__name__}: "
                f"{exc}); check the input shape the model expects"
            ) from exc
    if not isinstance(f0, torch.Tensor) or f0.dim() != 2 or f0.shape[0] != 1:
        got = tuple(f0.shape) if isinstance(f0, torch.Tensor) else type(f0).__name__
        raise InputError(
            f"the model must map a batch (N, *input_shape) to outputs (N, m); for x0 it "
            f"returned {got} (flatten the output in the model)"
        )
    if not bool(torch.isfinite(f0).all()):
        check_finite_parameters(model)  # (NaN/inf weights: named, as a WeightsError)
        raise InputError("the model's output at x0 is NaN or infinite although x0 and the "
                         "weights are finite (the forward pass overflows there); check that "
                         "x0 is on the scale the model expects (e.g. normalised) and the "
                         "model's forward")
    m = f0.shape[1]
    if m == 0:
        raise InputError(f"the model has no outputs (shape {tuple(f0.shape)} at x0): its "
                         "local constant is 0; pass a model with at least one output")

    cmap = None
    if output_map is not None:
        cmap = check_output_map(output_map, m).to(device=x0.device, dtype=x0.dtype)
    check_input_gradients(model, x0)
    return Problem(model, x0, eps_f, cmap, f0.detach(), shape, dim)


def check_output_map(output_map: object, m: int) -> torch.Tensor:
    """The output map ``C`` of a model with ``m`` outputs, detached: a real ``(k, m)``
    tensor with ``k >= 1`` rows and finite entries.

    Raises:
        InputError: naming the problem and the fix.
    """
    if not isinstance(output_map, torch.Tensor):
        raise InputError(f"output_map must be a torch.Tensor (k, {m}), got "
                         f"{type(output_map).__name__}; pass torch.tensor(...) of it")
    check_plain_tensor(output_map, "output_map")
    if output_map.dim() != 2 or output_map.shape[1] != m:
        raise InputError(
            f"output_map must have shape (k, {m}) to act on the model's {m} outputs; got "
            f"{tuple(output_map.shape)}"
        )
    if output_map.shape[0] == 0:
        raise InputError(f"output_map has no rows (shape {tuple(output_map.shape)}); give "
                         f"a (k, {m}) matrix with k >= 1, or None for the whole output")
    check_finite(output_map, "output_map", "pass a finite matrix")
    return output_map.detach()


def check_input_gradients(model: nn.Module, x0: torch.Tensor) -> None:
    """Refuse a model whose output has no gradient with respect to its input (a forward
    decorated with ``torch.no_grad()`` / ``torch.inference_mode()``, or one that detaches
    its input): the gradient-based methods would fail inside autograd. One forward and
    backward pass at ``x0``.

    Raises:
        InputError: naming the likely causes and the fix.
    """
    with torch.enable_grad():
        x = x0.detach().clone().requires_grad_(True)
        try:
            out = model(x.clone())  # (a copy: the model may write into its input)
            grad = None
            if isinstance(out, torch.Tensor) and out.requires_grad:
                (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        except RuntimeError as exc:  # autograd's own complaints; anything else (out of
            msg = str(exc).lower()  # memory, a wrong shape) is reported as it is
            if "grad" not in msg and "inference" not in msg:
                raise
            grad = None
    if grad is None:
        raise InputError(
            "the model's output has no gradient with respect to its input (a forward "
            "decorated with torch.no_grad() or torch.inference_mode(), or one that detaches "
            "its input?); the lower bounds (their rounding floor too) and the attacks need "
            "input gradients: remove the decorator or the detach (lipbound turns gradients "
            "off itself where it needs none)")


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is a whole number ``>= minimum`` (see
    :func:`lipbound.validation.check_int`: never a silent truncation), else raise
    InputError."""
    return check_int(value, name, minimum)


def distances(x0_flat: torch.Tensor, flat_x: torch.Tensor) -> torch.Tensor:
    """Float64 Euclidean distances between rows of ``flat_x`` (n, d) and ``x0_flat`` (1, d)
    (``NaN`` for a row that is not finite), without the underflow of their squares
    (:func:`safe_norm`: a difference of ``1.5e-162`` per coordinate squared to a subnormal,
    the distance came out 35% short and a ratio 35% above the exact constant)."""
    return safe_norm(flat_x.to(torch.float64) - x0_flat.to(torch.float64), dim=1)


def place_in_ball(x0_flat: torch.Tensor, flat_x: torch.Tensor, eps: float) -> torch.Tensor:
    """Return ``flat_x`` with every row moved so that ``||x - x0|| <= eps`` holds exactly.

    Rows already inside are unchanged. Rows outside (normally only by rounding of
    ``x0 + delta``) are pulled towards ``x0`` along ``x - x0``; after a few attempts a row
    that still lands outside is replaced by ``x0`` itself (distance 0, which callers treat
    as "no ratio"). Distances are measured in float64 on the stored values, and a row counts
    as inside only if its distance is at most ``eps (1 - distance_slack(d))``, so that the
    exact distance, not just its float64 rounding, is at most ``eps``.
    """
    x = flat_x.clone()
    limit = eps * (1.0 - distance_slack(x0_flat.shape[1]))
    for attempt in range(_MAX_SHRINK):
        dist = distances(x0_flat, x)
        # (not ``dist > limit``: a row with a NaN or infinite entry has a NaN distance, which
        # is not inside the ball either)
        bad = ~(dist <= limit)
        if not bool(bad.any()):
            return x
        bad &= torch.isfinite(x).all(dim=1)  # (those cannot be pulled in: replaced below)
        if not bool(bad.any()):
            break
        scale = (limit / dist[bad]) * (1.0 - 1e-7 * 4.0**attempt)
        delta = (x[bad].to(torch.float64) - x0_flat.to(torch.float64)) * scale[:, None]
        x[bad] = (x0_flat.to(torch.float64) + delta).to(x.dtype)
    bad = ~(distances(x0_flat, x) <= limit)
    if bool(bad.any()):
        # (a point that is not finite, e.g. a step beyond the dtype's range at a huge eps, is
        # no candidate: no warning for it)
        finite = bad & torch.isfinite(x).all(dim=1)
        if bool(finite.any()):
            logger.warning(
                "%d point(s) could not be placed inside the ball of radius %g in %s (eps is "
                "below the input's rounding resolution); they were replaced by x0",
                int(finite.sum()), eps, x.dtype,
            )
        x[bad] = x0_flat.to(x.dtype)
    return x


class _SharedCopy:
    """The float64 copy of one model, made on first use inside :func:`one_float64_copy`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.made = False
        self.copy: nn.Module | None = None


_SHARED_COPY: contextvars.ContextVar[_SharedCopy | None] = contextvars.ContextVar(
    "lipbound_lower_float64_copy", default=None)


@contextlib.contextmanager
def one_float64_copy(model: nn.Module) -> Iterator[None]:
    """Within the block, :func:`float64_model` of ``model`` makes its float64 copy once and
    returns that same copy on every later call (several lower-bound methods on one model,
    as in :func:`~lipbound.lower.best_lower_bound`, then share one copy instead of making
    one each: 1.1 GB for VGG-16). The copy is dropped when the block ends; the model must not
    be changed inside the block."""
    token = _SHARED_COPY.set(_SharedCopy(model))
    try:
        yield
    finally:
        _SHARED_COPY.reset(token)


def _make_float64_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    try:
        return copy.deepcopy(model).to(torch.float64)
    except Exception as exc:  # noqa: BLE001 - any model that cannot be copied or converted
        logger.info("no float64 copy of the model (%s: %s); ratios are evaluated in %s",
                    type(exc).__name__, exc, dtype)
        return None


def float64_model(model: nn.Module) -> nn.Module | None:
    """The model itself if it computes in float64 (or has no floating parameters), else a
    float64 copy of it (the same weights, which float64 holds exactly), or ``None`` if it
    cannot be copied or converted. Inside :func:`one_float64_copy` of this model the copy
    is made once and shared."""
    _, dtype = _param_device_dtype(model)
    if dtype is None or dtype == torch.float64:
        return model
    shared = _SHARED_COPY.get()
    if shared is None or shared.model is not model:
        return _make_float64_copy(model, dtype)
    if not shared.made:
        shared.copy, shared.made = _make_float64_copy(model, dtype), True
    return shared.copy


def _output_difference(
    model: nn.Module,
    model64: nn.Module | None,
    x0: torch.Tensor,
    x: torch.Tensor,
    output_map: torch.Tensor | None,
    tiny_nan: bool = False,
) -> tuple[float, torch.dtype]:
    """``||C (f(x) - f(x0))||`` from fresh forward passes (batch of one each) of the float64
    model when there is one (falling back to ``model`` in its own dtype if it fails), and the
    dtype the forward passes ran in; with ``tiny_nan``, NaN when a value of the passes falls
    below the normal range (:class:`_TinyWatch`)."""
    diff = None
    used = x0.dtype
    watch = _TinyWatch()
    with torch.no_grad():
        if model64 is not None:
            try:
                with watch:
                    f0 = model64(x0.to(torch.float64, copy=True))
                    fx = model64(x.to(torch.float64, copy=True))
                if f0.dtype == torch.float64 and fx.dtype == torch.float64:
                    diff, used = (fx - f0).reshape(-1), torch.float64
            except Exception as exc:  # noqa: BLE001 - e.g. a module with float32 constants
                logger.info("the float64 copy of the model failed (%s: %s); ratios are "
                            "evaluated in %s", type(exc).__name__, exc, x0.dtype)
        if diff is None:
            watch = _TinyWatch()
            with watch:
                f0 = model(x0.clone()).to(torch.float64)
                fx = model(x.clone()).to(torch.float64)
            diff = (fx - f0).reshape(-1)
    if tiny_nan and watch.tiny:
        # a value of the forward passes below the normal range (tiny weights, products of
        # small numbers): its rounding is absolute, not relative, and a ratio computed through
        # it exceeded the exact local constant by 8% (weights 1e-320 then 1e300)
        return math.nan, used
    if output_map is not None:
        diff = output_map.detach().to(device=diff.device, dtype=torch.float64) @ diff
    return float(safe_norm(diff)), used


class _TinyWatch(TorchDispatchMode):
    """Sees whether an operation run inside it returns a floating-point value whose nonzero
    magnitude is below the normal range of its type (``2.2e-308`` in float64; a product that
    underflows inside a sum shows there too unless larger terms dominate it): there rounding
    is absolute, not relative, and the outputs' rounding allowance
    (:func:`output_rounding_error`) is relative."""

    def __init__(self) -> None:
        super().__init__()
        self.tiny = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.tiny:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() \
                        and not t.is_meta:
                    fi = torch.finfo(t.dtype)
                    a = t.detach().abs()
                    if bool(((a > 0) & (a < fi.tiny)).any()):
                        self.tiny = True
                        break
        return out


@exact_float32_on_model
def ratio_at(
    model: nn.Module,
    x0: torch.Tensor,
    x: torch.Tensor,
    *,
    output_map: torch.Tensor | None = None,
) -> float:
    """The ratio ``||C (f(x) - f(x0))||_2 / ||x - x0||_2``, from fresh forward passes.

    ``x0`` and ``x`` are first rounded to the model's dtype (the points the model can be run
    at), unless one of them is a float64 point that dtype cannot represent and the model has a
    float64 copy: then both stay float64, as in the lower bounds, which search the ball around
    such an ``x0`` itself (rounding would move the centre, and at a small radius change the
    ratio noticeably). The network is then evaluated at ``x0`` and at ``x`` separately (batch of
    one each) in float64: with the model itself if it computes in float64, otherwise with a
    float64 copy of it (its own weights). A float32 forward pass would round ``f(x) - f(x0)`` to
    multiples of the outputs' float32 spacing, and near ``x0`` that rounding, divided by the
    small distance, can make the ratio larger than the network's constant. (Only if the model
    cannot be copied or run in float64 are its own forward passes used.) The difference, the
    output map and both norms are computed in float64.

    Args:
        model: network in eval mode, mapping ``(N, *shape)`` to ``(N, m)``.
        x0: nominal input, shape ``(1, *shape)``.
        x: the other point, shape ``(1, *shape)``, ``x != x0``.
        output_map: optional ``(k, m)`` matrix ``C``.

    Returns:
        The ratio as a Python float (``inf`` where the output difference overflows).

    Raises:
        InputError: if the model is no module or is in training mode, ``x0`` or ``x`` is no
            real finite tensor, their shapes differ, ``x == x0``, or the output map does not
            fit the model's outputs.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in (("x0", x0), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_plain_tensor(t, name)
        check_finite(t, name)
    if x.shape != x0.shape:
        raise InputError(f"x must have the shape of x0 {tuple(x0.shape)}, got {tuple(x.shape)}")
    model = unwrap_model(model)  # DataParallel / torch.compile: the module they run
    _check_eval(model)
    check_finite_parameters(model)
    device, dtype = _param_device_dtype(model)
    model64 = float64_model(model)
    if dtype is not None and model64 is not None and any(
            t.dtype == torch.float64 and not torch.equal(t.detach().to(dtype).double(), t)
            for t in (x0, x)):
        dtype = torch.float64  # (the points themselves, on the float64 copy)
    x0 = x0.detach().to(device=device or x0.device, dtype=dtype or x0.dtype)
    x = x.detach().to(device=x0.device, dtype=x0.dtype)
    den = float(distances(x0.reshape(1, -1), x.reshape(1, -1))[0])
    if den == 0.0:
        raise InputError("x equals x0; the ratio is undefined at distance 0")
    if output_map is not None:
        run = model64 if model64 is not None and x0.dtype == torch.float64 else model
        with torch.no_grad():
            out = run(x0.clone())
        m = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() else 0
        output_map = check_output_map(output_map, m)
    num, _ = _output_difference(model, model64, x0, x, output_map)
    if math.isnan(num):  # (inf: the difference overflows, an honest answer; NaN: none)
        raise InputError("the model's outputs at x0 and x are NaN, or both overflow (the "
                         "weights are finite), so their difference is undefined; check that "
                         "the points are on the scale the model expects (e.g. normalised)")
    return num / den


@dataclass(frozen=True)
class Final:
    """The chosen witness and its recomputed, rounding-safe ratio.

    Attributes:
        value: the ratio of :func:`ratio_at` at the witness, lowered by an allowance for
            the rounding of the forward passes and of the distance (so ``value <=
            ratio_at(...)``); a finite number (0 when no candidate had a finite ratio:
            see ``note``).
        witness: the point, shape ``(1, *shape)``.
        distance: ``||witness - x0||`` in float64.
        n_forward: forward passes spent on recomputation.
        index: row of the winning candidate (-1 for the fallback point).
        rounding: the allowance subtracted, relative to the ratio (see
            :func:`output_rounding_error`).
        evaluated_in: the dtype of the forward passes that gave ``value`` (``"float64"``
            unless the model could not be run in float64).
    """

    value: float
    witness: torch.Tensor
    distance: float
    n_forward: int
    index: int
    rounding: float
    evaluated_in: str = "float64"
    note: str | None = None


def finalize(
    prob: Problem,
    candidates: torch.Tensor,
    scores: torch.Tensor,
    *,
    top_k: int = 4,
) -> Final:
    """Pick the witness among candidate points by recomputing their ratios from scratch.

    Each of the ``top_k`` best-scoring candidates (after :func:`place_in_ball`) is
    re-evaluated as in :func:`ratio_at` (float64 forward passes), and its value is the
    rounding-safe ratio ``max(num - e, 0) / (den (1 + distance_slack(d)))``: ``num`` the
    output change, ``e`` the estimate :func:`output_rounding_error` of its rounding in the
    dtype the forward passes ran in, ``den`` the float64 distance. The largest finite one
    wins: a candidate whose output difference or ratio is beyond the floating-point range
    (or NaN: a network whose outputs overflow there) is no witness.

    Args:
        prob: the checked problem.
        candidates: candidate points, flat ``(n, d)`` in the working dtype.
        scores: their ratios as seen by the search (used only to pick which to recompute).
        top_k: how many of the best-scoring candidates to recompute.

    Returns:
        The :class:`Final` choice. If no candidate is a valid point in the ball with a
        finite ratio, the witness is ``x0`` moved by the smallest representable step along
        the first coordinate (with the value 0 and a ``note`` if its ratio is not finite
        either: 0 is a lower bound of every local constant).
    """
    x0_flat = prob.x0.reshape(1, -1)
    cand = place_in_ball(x0_flat, candidates.detach(), prob.eps)
    dist = distances(x0_flat, cand)
    scores = torch.where(dist > 0, scores.to(dist.device), torch.full_like(dist, -math.inf))
    order = torch.argsort(scores, descending=True)[: max(1, top_k)]
    model64 = float64_model(prob.model)
    slack = 1.0 + distance_slack(prob.dim)

    def safe_ratio(x: torch.Tensor, den: float) -> tuple[float, float, torch.dtype]:
        num, used = _output_difference(prob.model, model64, prob.x0, x, prob.output_map,
                                       tiny_nan=True)
        if not math.isfinite(num):  # (an output difference beyond the range, or NaN)
            return math.nan, math.inf, used
        err = output_rounding_error(prob, num / den, dtype=used)
        return max(num - err, 0.0) / (den * slack), err / num if num > 0 else math.inf, used

    best_value, best_x, best_dist, n_fwd, best_i = -math.inf, None, 0.0, 0, -1
    best_rounding, best_used = math.inf, prob.dtype
    for i in order.tolist():
        if not float(dist[i]) > 0.0:
            continue  # (x0 itself, or a point that is not finite)
        x = prob.batch(cand[i : i + 1])
        value, rounding, used = safe_ratio(x, float(dist[i]))
        n_fwd += 2
        if math.isfinite(value) and value > best_value:
            best_value, best_x, best_dist, best_i = value, x, float(dist[i]), i
            best_rounding, best_used = rounding, used
    note = None
    if best_x is None:
        x = _smallest_step(prob)
        best_dist = float(distances(x0_flat, x.reshape(1, -1))[0])
        best_value, best_rounding, best_used = safe_ratio(x, best_dist)
        n_fwd += 2
        best_x = x
        if not math.isfinite(best_value):
            best_value, best_rounding = 0.0, math.inf
            note = ("no point found with a finite ratio (the network's outputs, or their "
                    "differences, overflow the floating-point range, or values of its "
                    "forward passes fall below the normal range, where rounding is not "
                    "relative): the value is 0, a lower bound of every local "
                    "constant; rescale the network")
            logger.warning("lower bound: %s", note)
    return Final(best_value, best_x, best_dist, n_fwd, best_i, best_rounding,
                 str(best_used).replace("torch.", ""), note)


def _smallest_step(prob: Problem) -> torch.Tensor:
    """``x0`` with its first coordinate moved to the next representable value (fallback)."""
    flat = prob.x0.reshape(1, -1).clone()
    target = torch.full_like(flat[:, :1], math.inf)
    flat[:, :1] = torch.nextafter(flat[:, :1], target)
    limit = prob.eps * (1.0 - distance_slack(prob.dim))
    if float(distances(prob.x0.reshape(1, -1), flat)[0]) > limit:
        raise InputError(
            f"eps={prob.eps:g} is smaller than the rounding resolution of x0 in {prob.dtype}; "
            "use a larger eps or a float64 model and input"
        )
    return prob.batch(flat)


#: target relative accuracy of a ratio, by dtype: the search avoids radii below which the
#: forward pass's rounding error could change a ratio by more than this
_TARGET_ACCURACY = {torch.float64: 1e-10, torch.float32: 1e-3}


def output_rounding_error(prob: Problem, lip: float, dtype: torch.dtype | None = None, *,
                          running: bool = True) -> float:
    """Rough size of the rounding error of ``||C(f(x) - f(x0))||`` in ``dtype`` (default:
    the model's dtype).

    Model: ``4 u (||C||_F ||f(x0)|| + lip ||x0||) + 2 u R`` with ``u`` the unit roundoff:
    the outputs are computed with errors of a few ``u ||f||`` and ``C`` is applied to their
    difference (so ``||C f(x0)||``, which cancels for a margin row ``e_c - e_j`` of two
    close logits, would understate it: a float64 witness at eps = 1e-6 then exceeded the
    exact local constant by 4e-9 relative); the second term covers the cancellation in the
    first layer (``W x`` for ``x`` near ``x0``); ``R`` is the first-order running error
    of one forward pass at ``x0`` (:func:`running_error`: the sums inside every layer,
    which can cancel to an output far smaller than their terms), counted for ``x`` and
    ``x0``. Without ``R`` a float64 witness at eps = 1e-8 exceeded the exact local constant
    of a 1-3-1 network by 2e-8 relative (its last layer summed terms of size 2.8 to -0.148),
    above the tight certified upper bound. ``running=False`` leaves ``R`` out (the searches'
    radius floor: ``R`` is a pessimistic worst case, 35 times the rest on the MNIST LeNet,
    and would keep them from radii where their own scoring is accurate). Measured on the
    float32 MNIST LeNet the model without ``R`` overestimates the error by a few times.
    """
    u = torch.finfo(dtype or prob.dtype).eps / 2
    # (in this order: no overflow of 4 (||C|| ||f(x0)|| + lip ||x0||) below the range's top)
    e = 4.0 * u * float(safe_norm(prob.f0.to(torch.float64)))
    if prob.output_map is not None:
        e *= float(safe_norm(prob.output_map.to(torch.float64)))  # (>= the spectral norm)
    x0n = float(safe_norm(prob.x0.to(torch.float64)))
    e += (4.0 * u * max(lip, 0.0)) * x0n
    r = running_error(prob) if running else 0.0
    return e + (2.0 * u * r if math.isfinite(r) else 0.0)


#: largest number of rows of ``C f`` for which :func:`running_error` is computed (one
#: backward pass each); beyond it the term is left out
_RUNNING_ROWS = 32


def running_error(prob: Problem) -> float:
    """First-order running error of one forward pass at ``x0``, in units of the roundoff.

    For every operation of the forward pass that rounds (fully connected and convolutional
    layers and batch norm, as modules or as ``F.linear`` / ``F.conv2d`` / ``F.batch_norm``
    calls, matrix products, average pooling, means and sums (since session 25), and
    arithmetic: ``x - mean``, ``x / 255``, ``x + c``, ...), ``T`` is the magnitude of the
    terms it sums (the operation applied to ``|input|`` with ``|weights|``, ``|bias|``; the
    result's magnitude for arithmetic), ``n`` their number per output, and ``g_j`` the
    gradient of row ``j`` of ``C f`` with respect to the operation's output; the value is
    ``sqrt(sum_j (sum_ops 2 sqrt(n) <|g_j|, T>)^2)`` (:func:`forward_running_errors`), the
    classical first-order bound with the statistical ``sqrt(n)`` growth of a sum's rounding
    (an estimate, not a bound). The operations are seen by a torch function mode around one
    forward pass (before session 24, forward hooks on ``nn.Linear`` / ``nn.Conv*`` /
    ``nn.BatchNorm*`` modules only: a model written with ``F.linear``, or one adding a
    constant ``1e8`` and subtracting it again, had no running-error term, and its empirical
    lower bounds exceeded the exact local constant, by 19 % for ``x + 1e8 - 1e8`` at
    ``eps = 1e-7``). Computed once per problem (one forward pass, one backward pass per
    row); 0 where it does not apply (a TorchScript model, more than :data:`_RUNNING_ROWS`
    rows) or fails.
    """
    if "running" not in prob.cache:
        try:
            prob.cache["running"] = _running_error(prob)
        except Exception as exc:  # noqa: BLE001 - an estimate: never fail a lower bound over it
            logger.debug("no running-error estimate (%s: %s)", type(exc).__name__, exc)
            prob.cache["running"] = 0.0
    return prob.cache["running"]


def _a(t: object) -> object:
    """``|t|`` in float64 for a floating tensor (detached); anything else unchanged."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().abs().to(torch.float64)
    return t


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: object = None) -> object:
    return args[pos] if len(args) > pos else kwargs.get(name, default)


def _prod(v: object, dims: int) -> int:
    return math.prod(v) if isinstance(v, (tuple, list)) else int(v) ** dims


#: arithmetic that rounds its result once (relative error at most u): ``T = |result|``
_ARITHMETIC = frozenset({
    "add", "sub", "mul", "div", "true_divide", "subtract", "multiply", "divide", "rsub",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
    "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__",
    "__rdiv__", "add_", "sub_", "mul_", "div_", "addcmul", "addcdiv",
})


def _op_terms(name: str, args: tuple, kwargs: dict, out: torch.Tensor
              ) -> tuple[torch.Tensor | None, int]:
    """``(T, n)`` of :func:`running_error` for one call of a torch function (``None``: the
    function does not round, or is not recognised)."""
    if name == "linear":
        w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        t = nn.functional.linear(_a(args[0]), _a(w), _a(b))
        return t, int(w.shape[-1]) + int(b is not None)
    if name in ("conv1d", "conv2d", "conv3d"):
        w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        fn = getattr(nn.functional, name)
        t = fn(_a(args[0]), _a(w), _a(b), *args[3:], **rest)
        return t, int(w.shape[1]) * math.prod(w.shape[2:]) + int(b is not None)
    if name == "batch_norm":
        mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
        weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
        if mean is None or var is None:
            return None, 0
        x = _a(args[0])
        view = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(_a(var) + eps)
        if weight is not None:
            scale = scale * _a(weight)
        t = (x + _a(mean).reshape(view)) * scale.reshape(view)
        if bias is not None:
            t = t + _a(bias).reshape(view)
        return t, 4
    if name in ("matmul", "mm", "__matmul__", "bmm"):
        a, b = _a(args[0]), _a(args[1])
        return torch.matmul(a, b), int(args[0].shape[-1])
    if name == "__rmatmul__":
        return torch.matmul(_a(args[1]), _a(args[0])), int(args[1].shape[-1])
    if name == "addmm":
        c, a, b = (_a(v) for v in args[:3])
        return c + a @ b, int(args[1].shape[-1]) + 1
    if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        dims = int(name[-2])
        fn = getattr(nn.functional, name)
        k = _arg(args, kwargs, 1, "kernel_size")
        return fn(_a(args[0]), *args[1:], **kwargs), _prod(k, dims) + 1
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
        dims = int(name[-2])
        fn = getattr(nn.functional, name)
        x = args[0]
        # a window holds at most ceil(in / out) + 1 elements per dimension
        size = _arg(args, kwargs, 1, "output_size")
        outs = out.shape[-dims:]
        n = math.prod(-(-int(i) // max(int(o), 1)) + 1
                      for i, o in zip(x.shape[-dims:], outs, strict=True))
        return fn(_a(x), size), n + 1
    if name in ("mean", "sum") and isinstance(args[0], torch.Tensor) and out.numel() > 0:
        # a spatial mean (x.mean((2, 3))): a sum of its window, then a division
        x = args[0]
        t = getattr(torch, name)(_a(x), *args[1:], **{k: v for k, v in kwargs.items()
                                                     if k != "dtype"})
        return t, x.numel() // out.numel() + int(name == "mean")
    if name in _ARITHMETIC:
        return out.detach().abs().to(torch.float64), 1
    return None, 0


class _RoundingWatch(torch.overrides.TorchFunctionMode):
    """Collects, for every operation of a forward pass that rounds (:func:`_op_terms`), its
    ``(T, n)`` and a zero tensor added to its output, through which autograd gives the
    outputs' gradient with respect to it (a later in-place operation, e.g.
    ``ReLU(inplace=True)``, then changes the sum, not the zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.terms: list[tuple[torch.Tensor, int]] = []
        self.zs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
            return out
        name = getattr(func, "__name__", "")
        try:
            with torch.no_grad():
                t, n = _op_terms(name, args, kwargs, out)
        except Exception as exc:  # noqa: BLE001 - an estimate: an unforeseen call is skipped
            logger.debug("running error: %s not counted (%s: %s)", name,
                         type(exc).__name__, exc)
            return out
        if t is None or t.shape != out.shape:
            return out
        z = torch.zeros_like(out, requires_grad=True)
        self.terms.append((t, n))
        self.zs.append(z)
        return out + z


def _running_error(prob: Problem) -> float:
    model = prob.model
    rows = prob.f0.shape[1] if prob.output_map is None else prob.output_map.shape[0]
    if rows > _RUNNING_ROWS or isinstance(model, torch.jit.ScriptModule):
        return 0.0
    cmap = prob.output_map
    per_row = forward_running_errors(
        model, prob.x0, (lambda y: y) if cmap is None else (lambda y: cmap.to(y.dtype) @ y),
        lambda n: 2.0 * math.sqrt(n))
    return math.sqrt(sum(e * e for e in per_row))


def forward_running_errors(model: nn.Module, x: torch.Tensor,
                           rows: Callable[[torch.Tensor], torch.Tensor],
                           growth: Callable[[int], float]) -> list[float]:
    """First-order running error of one forward pass of ``model`` at ``x`` (run in the
    model's own dtype), for each entry of ``rows(model(x).reshape(-1))`` (a selection or a
    linear map of the outputs), in units of the roundoff: ``sum_ops growth(n) <|g_j|, T>``
    over the operations that round (:func:`_op_terms`: ``T`` the magnitude of the terms an
    operation sums, ``n`` their number per output, ``g_j`` the gradient of entry ``j`` with
    respect to the operation's output; the float32 or float64 trajectory's gradient).

    ``growth(n)`` is the error of a sum of ``n`` terms relative to ``T`` in units of the
    roundoff: ``2 sqrt(n)`` is the statistical estimate of :func:`running_error`,
    ``n / (1 - n u)`` (``γ_n / u``, Higham §3.1) the worst case, which bounds the error to
    first order (a unit that the rounding moves across a kink is not counted). 0 for every
    entry when no rounding operation is seen. One forward pass, one backward pass per entry.
    """
    watch = _RoundingWatch()
    with torch.enable_grad():
        with watch:
            y = model(x.detach().clone())
        y = rows(y.reshape(-1))
        if not watch.zs or not y.requires_grad:
            return [0.0] * int(y.shape[0])
        out = []
        for j in range(y.shape[0]):
            grads = torch.autograd.grad(y[j], watch.zs, retain_graph=True, allow_unused=True)
            e = 0.0
            for g, (t, n) in zip(grads, watch.terms, strict=True):
                if g is not None:
                    e += growth(n) * float((g.detach().abs().to(torch.float64) * t).sum())
            out.append(e)
    return out


def radius_floor(prob: Problem, lip: float) -> float:
    """Smallest radius the searches visit (at most ``eps``).

    Two limits: below ``32 sqrt(d) u max(1, |x0|_inf)`` rounding of ``x0 + delta`` dominates
    the direction of ``delta``; below ``output_rounding_error / (lip * target)`` the forward
    pass's rounding could inflate a ratio of size ``lip`` by more than the dtype's target
    accuracy (1e-10 in float64, 1e-3 in float32) -- an optimiser would exploit that noise.

    Args:
        prob: the checked problem.
        lip: a scale of the ratios (e.g. the Jacobian norm at ``x0``, or a lower estimate
            of it; smaller values give a larger, safer floor).
    """
    finfo = torch.finfo(prob.dtype)
    scale = max(1.0, float(prob.x0.abs().max()))
    floor_in = 32.0 * math.sqrt(prob.dim) * finfo.eps * scale
    target = _TARGET_ACCURACY.get(prob.dtype, 1e-2)
    if lip > 0 and math.isfinite(lip):
        # (divided in turn: lip * target underflows to 0 for a network of tiny weights)
        floor_out = output_rounding_error(prob, lip, running=False) / lip / target
    else:
        floor_out = math.inf
    return min(prob.eps, max(floor_in, floor_out))


def gradient_scale(prob: Problem) -> float:
    """A cheap lower estimate of ``||C J(x0)||``: ``||J^T C^T w||`` for one unit ``w``.

    ``w`` is the direction of ``C f(x0)`` (or uniform if that is zero); one backward pass.
    """
    with torch.enable_grad():
        x = prob.x0.detach().clone().requires_grad_(True)
        out = prob.model(x)
        y = out @ prob.output_map.T if prob.output_map is not None else out
        w = y.detach()
        n = torch.linalg.vector_norm(w)
        w = w / n if float(n) > 0 else torch.ones_like(w) / math.sqrt(w.numel())
        (g,) = torch.autograd.grad(y, x, grad_outputs=w)
    return float(safe_norm(g.to(torch.float64)))


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` scaled to unit L2 norm (rows of zeros stay zero)."""
    n = safe_norm(v, dim=1).unsqueeze(1)  # (a row of entries near 1e300 has a norm)
    return v / torch.where(n > 0, n, torch.ones_like(n))


def auto_batch_size(prob: Problem, n: int, target_elements: int | None = None) -> int:
    """A batch size keeping the largest activation of a batch near ``target_elements``.

    Measures the largest per-sample tensor produced by any submodule on ``x0`` (forward
    hooks, one extra forward pass). The default target is 2**21 elements on a CPU (the
    batch stays in cache; larger batches were measured slower on the MNIST LeNet) and
    2**25 on an accelerator.
    """
    if target_elements is None:
        target_elements = 2**21 if prob.device.type == "cpu" else 2**25
    sizes: list[int] = [prob.dim, int(prob.f0.numel())]

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(int(out.numel()))

    if isinstance(prob.model, torch.jit.ScriptModule):  # (no forward hooks there)
        return max(1, min(n, target_elements // max(sizes)))
    handles = [m.register_forward_hook(hook) for m in prob.model.modules()]
    try:
        with torch.no_grad():
            prob.model(prob.x0)
    finally:
        for h in handles:
            h.remove()
    return max(1, min(n, target_elements // max(sizes)))


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed`` (global RNG state untouched)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    if not 0 <= seed < 2 ** 64:  # (torch's manual_seed: a bare ValueError above, and a
        # negative seed wraps around to seed + 2**64, the stream of another seed)
        raise InputError(f"seed must be in [0, 2**64) for torch's generator, got {seed}; "
                         "pass e.g. seed % 2**64")
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g

