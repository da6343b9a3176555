"""Input checks shared by every entry point (never ``assert``: they must survive ``-O``)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import InputError


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float, or raise :class:`InputError` unless it is finite and > 0
    (a bool is refused: ``True`` is not a radius)."""
    if isinstance(eps, bool):
        raise InputError(f"{name} must be a positive number, got {eps!r}")
    try:
        e = float(eps)
    except (TypeError, ValueError, RuntimeError) as exc:  # (a tensor on the meta device)
        raise InputError(f"{name} must be a positive number, got {eps!r}") from exc
    if math.isnan(e) or math.isinf(e):
        raise InputError(f"{name} must be finite, got {e}; pass a radius such as 0.1")
    if e <= 0:
        raise InputError(f"{name} must be > 0, got {e}; the ball radius must be positive")
    return e


def check_int(value: object, name: str, minimum: int) -> int:
    """Return ``value`` as an int, or raise :class:`InputError` unless it is a whole number
    (an int, or a float with no fractional part) ``>= minimum``; never a silent truncation."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(value, int):
        v = value
    else:
        try:
            f = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError) as exc:  # (a tensor on the meta device)
            raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}") from exc
        if not math.isfinite(f) or f != int(f):
            raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
        v = int(f)
    if v < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


SEED_LIMIT = 2**64
"""Seeds of torch's generators are below this (``manual_seed`` overflows beyond 64 bits)."""


def check_seed(seed: object, name: str = "seed", *, negative: bool = False) -> int:
    """Return ``seed`` as an int, or raise :class:`InputError` unless it is an integer in
    ``[0, 2**64)`` (``negative``: from ``-2**63``, as ``torch.Generator.manual_seed`` takes)."""
    low = -(2**63) if negative else 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed < SEED_LIMIT:
        raise InputError(f"{name} must be an integer in [{'-2**63' if negative else 0}, 2**64) "
                         f"(a seed of torch's random generators), got {seed!r}")
    return int(seed)


def check_bool(value: object, name: str, *, none: str | None = None) -> bool | None:
    """Return ``value`` as a bool, or raise :class:`InputError` naming the option, the value
    and the fix unless it is a real boolean (``bool`` or ``numpy.bool_``).

    Truthy stand-ins are refused (session 26): ``progress="yes"``, ``share_global="no"`` or
    ``tight=1`` were taken by their truth value, so ``"no"`` and ``"False"`` meant *yes*.

    Args:
        value: the option's value.
        name: the option's name, for the message.
        none: where ``None`` is also accepted (and returned), what it means (e.g. ``"only
            for large n_samples"``), for the message; ``None`` (default): refused.
    """
    if value is None and none is not None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    also = f", or None ({none})" if none is not None else ""
    raise InputError(f"{name} must be True or False{also}, got {value!r} "
                     f"({type(value).__name__}); pass {name}=True or {name}=False (a string "
                     "such as 'no' would count as true)")


def check_tight(tight: object, tight_rows: object = None) -> int | None:
    """Check the ``tight`` option (a bool) of the tight local bound and its row budget
    ``tight_rows`` (``None``: the default budget; else an integer >= 1, and only with
    ``tight=True``); returns the budget as an int (``None`` when none was given).

    A budget given with ``tight=False`` is refused, whatever its value (since session 24;
    before, ``tight_rows=-3`` and the like went unread when ``tight`` was off): it budgets a
    bound that is not computed, so either ``tight=True`` was forgotten (and the caller would
    take the paper's product for the tight bound) or the argument is dead. The CLI refuses
    ``--tight-rows`` without ``--tight`` in the same way."""
    tight = check_bool(tight, "tight")
    if tight_rows is None:
        return None
    if not tight:
        raise InputError(f"tight_rows={tight_rows!r} is the row budget of the tight bound, "
                         "which is off (tight=False): pass tight=True to compute it (with "
                         "tight_rows an integer >= 1), or drop tight_rows")
    return check_count(tight_rows, "tight_rows")


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise :class:`InputError` unless it is an integer (a
    Python or NumPy integer, or a one-element integer tensor; not a bool, a float such as
    ``2.0`` or a string such as ``"7"``) ``>= minimum``: a count, such as a budget of rows."""
    bad = InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(value, bool):
        raise bad
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise bad from None
    if v < minimum:
        raise bad
    return v


def check_reuse_tol(reuse_tol: float) -> float:
    """Return ``reuse_tol`` (the looseness a reused layer factor may have) as a float, or raise
    :class:`InputError` unless it is a finite number >= 0."""
    try:
        t = float(reuse_tol)
    except (TypeError, ValueError) as exc:
        raise InputError(f"reuse_tol must be a number >= 0, got {reuse_tol!r}") from exc
    if isinstance(reuse_tol, bool) or not math.isfinite(t) or t < 0:
        raise InputError(f"reuse_tol must be a finite number >= 0 (0: no reuse), got "
                         f"{reuse_tol!r}")
    return t


def check_plain_tensor(x: Tensor, name: str = "x0") -> None:
    """Refuse a tensor that holds no real values in the usual layout: complex (a conversion
    would drop the imaginary part), on the ``meta`` device (no data) or sparse.

    Raises:
        InputError: naming the problem and the fix.
    """
    if x.is_complex():
        raise InputError(f"{name} is complex ({x.dtype}); lipbound works with real numbers "
                         f"only: pass {name}.real (or the real tensor it came from)")
    if x.is_meta:
        raise InputError(f"{name} is on the meta device (shapes only, no values); pass a tensor "
                         "holding its values")
    if x.layout != torch.strided:
        raise InputError(f"{name} has the {x.layout} layout; pass {name}.to_dense()")


def check_input(x0: Tensor, input_shape: Sequence[int] | None, name: str = "x0") -> Tensor:
    """Return ``x0`` with a batch dimension of 1, checked against ``input_shape``.

    Accepts ``(1, *input_shape)`` or ``input_shape``. Raises :class:`InputError` on a wrong
    shape, a non-tensor, or NaN/inf values.
    """
    if not isinstance(x0, Tensor):
        try:
            x0 = torch.as_tensor(x0)
        except Exception as exc:
            raise InputError(f"{name} must be a tensor, got {type(x0).__name__}") from exc
    check_plain_tensor(x0, name)
    if not x0.is_floating_point():
        x0 = x0.to(torch.float32)  # (integer pixel values, a binary image)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if tuple(x0.shape) == shape:
            x0 = x0.unsqueeze(0)
        elif tuple(x0.shape) != (1, *shape):
            if x0.dim() == len(shape) + 1 and tuple(x0.shape[1:]) == shape:
                raise InputError(
                    f"{name} holds a batch of {x0.shape[0]} inputs; pass one input of shape "
                    f"(1, {', '.join(map(str, shape))}) (use the batch APIs for many inputs)")
            raise InputError(
                f"{name} has shape {tuple(x0.shape)} but the model expects "
                f"(1, {', '.join(map(str, shape))}); reshape or resize the input")
    elif x0.dim() < 2 or x0.shape[0] != 1:
        raise InputError(f"{name} must have a batch dimension of 1, got shape "
                         f"{tuple(x0.shape)}")
    check_finite(x0, name)
    return x0


def check_finite(x: Tensor, name: str = "x0", fix: str = "clean the input first") -> None:
    """Raise :class:`InputError` naming how many NaN/inf entries ``x`` holds, and ``fix``."""
    if not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name} contains {n} NaN/inf value(s); {fix}")


def check_example_input(x0: object, name: str = "x0") -> Tensor:
    """An example input that only gives the input shape (``global_bound(model, x0)``,
    ``Analyzer(model, x0=x0)``) as a tensor, refused like any other input when it holds no
    real, finite values: a NaN, complex or meta tensor there is a mistake upstream, and the
    result would be reported for an input that does not exist."""
    if not isinstance(x0, Tensor):
        try:
            x0 = torch.as_tensor(x0)
        except Exception as exc:
            raise InputError(f"{name} must be a tensor of shape (1, *input_shape), got "
                             f"{type(x0).__name__}") from exc
    check_plain_tensor(x0, name)
    check_finite(x0, name)
    return x0


DEVICES = "None or 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device"
"""The devices an analysis runs on, as error messages list them."""


def default_device() -> torch.device:
    """CUDA when it is available, else the CPU (what ``"auto"`` means for a new model)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None, fallback: torch.device) -> torch.device:
    """``None``/``"auto"`` -> the fallback (the model's device, else CUDA when present);
    otherwise a CPU or CUDA device.

    Raises:
        InputError: an unknown device (e.g. ``"tpu"``), another kind than CPU/CUDA (the
            ``"meta"`` device holds no data), or CUDA requested where it is not available.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return fallback
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"unknown device {device!r}; use {DEVICES}") from exc
    if dev.type == "meta":
        raise InputError("device 'meta' holds no data (shapes only), so nothing can be "
                         f"computed there; use {DEVICES}")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported (lipbound computes in float64 "
                         f"on the CPU or CUDA); use {DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} was requested but CUDA is not "
                             "available; use device='cpu' or 'auto' (command line: --device "
                             "cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r}: there are only "
                             f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1})")
    return dev


MIN_FAILURE_PROB = 1e-300
"""Smallest failure probability accepted. The analyzer splits it over the layers that may use
Lanczos, then a block run takes ``1 - BLOCK_SHARE = 1/8`` and a single-vector run halves its
share between its two bounds (:func:`lipbound.spectral.run_parameters`): every share stays a
normal float64 (>= 2.2e-308) for networks of up to ``1e-300 / (16 * 2.3e-308)``, about 2.8
million layers. (Below about 1e-307 a share underflows to 0 and the bounds fail; the
a posteriori bound's overlap floor ``(δ/2)² π / (2 (n-1))`` may underflow earlier, which only
turns that bound off: see ``post_ok`` in :mod:`lipbound.lanczos`.)"""


def check_failure_prob(value: object, name: str = "failure_prob") -> float:
    """Return ``value`` as a float, or raise :class:`InputError` unless it is a number in
    ``[MIN_FAILURE_PROB, 1)``."""
    what = (f"{name} must be a number in [{MIN_FAILURE_PROB:g}, 1), e.g. 1e-6 (the probability "
            "that a probabilistic bound fails)")
    try:
        v = check_float(value, name, minimum=0.0, maximum=1.0)
    except InputError as exc:
        raise InputError(f"{what}, got {value!r}") from exc
    if v < MIN_FAILURE_PROB:
        raise InputError(f"{what}, got {value!r}; smaller values underflow in the splits of "
                         "the budget over layers (and 1e-300 already makes a bound as good "
                         "as certain)")
    return v


def check_input_shape(shape: object, name: str = "input_shape") -> tuple[int, ...]:
    """The per-sample input shape as a tuple of positive ints (one int: a one-dimensional
    input, ``4`` -> ``(4,)``).

    Raises:
        InputError: ``None``, not a sequence of whole numbers, or a dimension <= 0.
    """
    how = ("the per-sample input shape without the batch dimension, e.g. (1, 28, 28) for "
           "MNIST images or 4 (or (4,)) for vectors of length 4")
    if shape is None:
        raise InputError(f"{name} is None; give {how}, or an example input x0")
    if isinstance(shape, Tensor):
        raise InputError(f"{name} must be a shape, got a tensor; give {how} (or pass the "
                         "tensor as the example input x0)")
    items = [shape] if isinstance(shape, int) and not isinstance(shape, bool) else shape
    if isinstance(items, (str, bytes)):
        raise InputError(f"{name} must be {how}; got {shape!r}")
    try:
        items = list(items)  # type: ignore[call-overload]
    except TypeError as exc:
        raise InputError(f"{name} must be {how}; got {shape!r}") from exc
    dims = []
    for v in items:
        if isinstance(v, bool):
            raise InputError(f"{name} must be {how}; got {shape!r}")
        try:
            dims.append(operator.index(v))  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            f = v if isinstance(v, float) else math.nan  # a whole float (28.0) is fine
            if not (math.isfinite(f) and f == int(f)):
                raise InputError(f"{name} must be {how}; got {shape!r}") from None
            dims.append(int(f))
    if any(d <= 0 for d in dims):
        raise InputError(f"{name} {tuple(dims)} has a dimension <= 0; give {how}")
    return tuple(dims)


def check_float(value: object, name: str, *, minimum: float | None = None,
                maximum: float | None = None, min_inclusive: bool = False,
                max_inclusive: bool = False) -> float:
    """Return ``value`` as a float, or raise :class:`InputError` unless it is a finite real
    number within the given bounds (exclusive unless ``min_inclusive``/``max_inclusive``)."""
    parts = []
    if minimum is not None:
        parts.append(f"{'>=' if min_inclusive else '>'} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<=' if max_inclusive else '<'} {maximum:g}")
    what = f"{name} must be a finite number" + (f" {' and '.join(parts)}" if parts else "")
    if isinstance(value, (bool, str, bytes)):
        raise InputError(f"{what}, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what}, got {value!r}") from exc
    ok = math.isfinite(v)
    if ok and minimum is not None:
        ok = v >= minimum if min_inclusive else v > minimum
    if ok and maximum is not None:
        ok = v <= maximum if max_inclusive else v < maximum
    if not ok:
        raise InputError(f"{what}, got {value!r}")
    return v
