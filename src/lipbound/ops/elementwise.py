"""Rules for layers whose linear part is diagonal or the identity: BatchNorm (eval mode),
input normalisation, Dropout (eval mode), Identity; ReLU and clamps (as ReLUs between
diagonal maps); and shape-only layers."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .base import DiagOp, ReLUOp, ReshapeOp, gamma


def batchnorm_rule(module: nn.Module, name: str, in_shape, out_shape) -> DiagOp:
    """BatchNorm in eval mode: y = γ (x - μ) / sqrt(σ² + eps) + β, a per-channel scaling."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"rule called with {type(module).__name__}")
    if module.training:
        raise NotImplementedError("BatchNorm in training mode (call model.eval())")
    if module.running_mean is None or module.running_var is None:
        # (since session 22 the message names the fix). In eval mode torch's _BatchNorm
        # normalises with running_mean / running_var whenever both are present, whatever
        # track_running_stats says (since session 23: such a layer, its flag set to False
        # after training, was refused); with both None it uses the batch's statistics
        raise NotImplementedError(
            "BatchNorm without running statistics (running_mean / running_var are None, as "
            "with track_running_stats=False at construction): in eval mode it then "
            "normalises with the statistics of the batch it is given, which mixes the "
            "samples (and is no fixed map of one input); train it with "
            "track_running_stats=True, or replace it by its affine map (e.g. a diagonal "
            "scaling with registered buffers)")
    c = in_shape[0]
    var = module.running_var.detach().to(torch.float64)
    mean = module.running_mean.detach().to(torch.float64)
    inv = 1.0 / torch.sqrt(var + module.eps)
    g_w = (module.weight.detach().to(torch.float64) if module.weight is not None
             else torch.ones(c, dtype=torch.float64, device=var.device))
    beta = (module.bias.detach().to(torch.float64) if module.bias is not None
            else torch.zeros(c, dtype=torch.float64, device=var.device))
    scale = g_w * inv
    # the product g_w * inv below the normal range rounds on the subnormal grid (or to 0),
    # and σ² + eps beyond float64 makes inv 0: no relative bound holds there (a weight
    # 1e-200 over sqrt(1e260) became a scale of 0, and with a mean 1e300 a shift of 0 for an
    # exact -1e-30; a weight 1e200 over sqrt(1.7e308 + 1e308) a scale of 0 for an exact
    # 6e45: the bounds were 0)
    low = (g_w != 0) & (scale.abs() < 2.0 ** -1022)
    if bool(low.any()):
        ch = torch.nonzero(low).reshape(-1).tolist()
        raise InputError(
            f"batch norm {name}: the scale weight / sqrt(running_var + eps) of channel(s) "
            f"{ch[:5]} is below the float64 normal range (e.g. {float(scale[ch[0]]):.3g}): "
            "its rounding cannot be bounded (or running_var + eps overflows float64); "
            "rescale the layer")
    shift = beta - mean * scale
    # the fold's own rounding, against the exact formula on the (float64-exact) parameters:
    # σ² + eps, the square root, the reciprocal and the product with γ each round once, so
    # scale = s* (1 + θ) with |θ| <= γ_4 (the square root halves the sum's error), and
    # |s* - scale| <= γ_5 |scale|; the shift rounds twice more (μ scale, β - that), and
    # carries μ times the scale's error: |t* - shift| <= γ_3 (|β| + |μ scale|) + γ_5 |μ scale|
    # (plus the smallest subnormal, for products below the normal range)
    fold_rel = gamma(5)
    ms = (mean * scale).abs()
    shift_err = (gamma(3) * (beta.abs() + ms) + gamma(5) * ms) * (1.0 + gamma(4)) \
        + 4 * 2.0 ** -1074
    view = (c,) + (1,) * (len(in_shape) - 1)
    return DiagOp(name, tuple(in_shape), scale.view(view), shift.view(view),
                  fold_rel=fold_rel, shift_err=shift_err.view(view))


def normalize_rule(module: nn.Module, name: str, in_shape, out_shape) -> DiagOp:
    """lipbound.layers.Normalize: (x - mean) / std per channel.

    Raises:
        NotImplementedError: ``mean`` / ``std`` broadcast the input to another shape (three
            channels' values in front of a one-channel input; since session 22, was a
            RuntimeError of ``broadcast_to``)."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape != out_shape:
        raise NotImplementedError(
            f"Normalize with mean/std of shape {tuple(module.mean.shape)} turns the "
            f"per-sample input of shape {in_shape} into {out_shape} (torch broadcasts them): "
            "give one mean and one std per channel of the input")
    mean = module.mean.detach().to(torch.float64)
    std = module.std.detach().to(torch.float64)
    scale = torch.broadcast_to(1.0 / std, in_shape)
    shift = torch.broadcast_to(-mean / std, in_shape)
    # the fold's rounding against the exact (x - mean) / std: 1 / std and mean / std round
    # once each, |s* - scale| <= γ_2 |scale| and |t* - shift| <= γ_2 |shift| (plus the
    # smallest subnormal, for quotients below the normal range)
    return DiagOp(name, tuple(in_shape), scale, shift, fold_rel=gamma(2),
                  shift_err=gamma(2) * shift.abs() + 2 * 2.0 ** -1074)


class FunctionalDropout(nn.Module):
    """A functional dropout call (``F.dropout(x, p, training)``) handed to
    :func:`identity_rule`: ``training`` is ``True`` unless the call passes a literal
    ``False`` (``F.dropout``'s own default is ``True``; ``self.training`` of a module in eval
    mode is traced as ``False``). Never run."""

    def __init__(self, fn_name: str, training: bool):
        super().__init__()
        self.fn_name = fn_name
        self.training = training


def identity_rule(module: nn.Module | None, name: str, in_shape, out_shape) -> DiagOp:
    """Identity, and Dropout in eval mode (which is the identity), also called as a function
    with ``training=False``."""
    if module is not None and isinstance(module, nn.modules.dropout._DropoutNd) \
            and module.training:
        raise NotImplementedError("Dropout in training mode (call model.eval())")
    if isinstance(module, FunctionalDropout) and module.training:
        raise NotImplementedError(
            f"F.{module.fn_name} with training=True (F.dropout's default) zeroes random "
            "units and rescales the others at every call; pass training=self.training "
            "(with the model in eval mode) or training=False, or use an nn.Dropout layer")
    one = torch.ones((), dtype=torch.float64)
    return DiagOp(name, tuple(in_shape), one, torch.zeros((), dtype=torch.float64))


def relu_rule(module: nn.Module | None, name: str, in_shape, out_shape) -> ReLUOp:
    return ReLUOp(name, in_shape, out_shape)


def reshape_rule(module: nn.Module | None, name: str, in_shape, out_shape) -> ReshapeOp:
    """Flatten / view / reshape: constant 1; the mask is reshaped the same way."""
    return ReshapeOp(name, in_shape, out_shape)


class ClampBounds(nn.Module):
    """The thresholds of a functional clamp (``torch.clamp(x, min=lo, max=hi)``,
    ``x.clamp_min(lo)``, ``F.hardtanh``, ``F.relu6``), handed to :func:`clamp_rule` the way
    functional pooling calls are handed to the pooling rules as modules. ``None``: no bound
    on that side. Never run."""

    def __init__(self, lo: object = None, hi: object = None):
        super().__init__()
        self.lo = lo
        self.hi = hi


_F32_MAX = float(torch.finfo(torch.float32).max)


def _threshold(v: object, what: str) -> float:
    """A clamp threshold as a float64 number (a Python / numpy real number only)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise NotImplementedError(
            f"a clamp whose {what} is {type(v).__name__} ({v!r}); only a number is supported "
            "(for a per-channel bound tensor, write the clamp with ReLUs and a registered "
            "buffer: lo + relu(x - lo))")
    f = float(v)
    if not math.isfinite(f) or abs(f) > _F32_MAX:
        raise NotImplementedError(f"a clamp whose {what} {v!r} is not a finite float32 "
                                  "number; rescale")
    return f


def _f32_err(t: float) -> float:
    """An upper bound on ``|t - t'|`` for ``t'`` the threshold torch uses: the number itself
    (a float64 model) or rounded to float32 (a float32 model: clamp converts its Python
    scalars to the tensor's type). Rules do not see the model's type, so both are covered."""
    d = abs(t - float(np.float32(t)))
    return d * (1.0 + 2.0 ** -50) if d > 0.0 else 0.0


def clamp_ops(name: str, in_shape, lo: float | None, hi: float | None) -> list:
    """``clamp(x, lo, hi)`` as a chain of diagonal affine maps and ReLUs (exact in real
    arithmetic, so the local-bound machinery of Avant & Morgansen, IEEE TNNLS 2023, applies
    to its kinks like to any ReLU's):

    * ``max(x, lo) = lo + relu(x - lo)``;
    * ``min(y, hi) = hi - relu(hi - y)``;
    * both (``lo <= hi``): ``hi - relu((hi - lo) - relu(x - lo))``.

    ``clamp(min=0)`` is a bare :class:`ReLUOp` (the same analysis as ``nn.ReLU``). Every
    shift carries ``shift_err`` covering the float32 rounding torch may apply to the
    thresholds (:func:`_f32_err`) and the float64 rounding of ``hi - lo``, so the masks
    decided at the kinks hold for the thresholds as written and as used.

    Raises:
        NotImplementedError: no bound at all, a non-numeric or non-finite bound, or
            ``lo > hi`` (torch then returns ``hi`` everywhere).
    """
    in_shape = tuple(in_shape)
    if lo is None and hi is None:
        raise NotImplementedError("a clamp without min or max")
    lo = None if lo is None else _threshold(lo, "min")
    hi = None if hi is None else _threshold(hi, "max")
    if lo is not None and hi is not None and lo > hi:
        raise NotImplementedError(f"a clamp with min {lo!r} > max {hi!r}: torch then returns "
                                  "max everywhere (a constant); check the bounds")

    def diag(tag: str, scale: float, shift: float, err: float) -> DiagOp:
        s = torch.tensor(scale, dtype=torch.float64)
        t = torch.tensor(shift, dtype=torch.float64)
        e = torch.tensor(err, dtype=torch.float64) if err > 0.0 else None
        return DiagOp(f"{name}.{tag}", in_shape, s, t, shift_err=e)

    ops: list = []
    if lo is not None:
        if lo != 0.0:
            ops.append(diag("sub_min", 1.0, -lo, _f32_err(lo)))
        ops.append(ReLUOp(name if hi is None and lo == 0.0 else f"{name}.relu_min",
                          in_shape, in_shape))
    if hi is not None:
        if lo is None:
            ops.append(diag("neg_max", -1.0, hi, _f32_err(hi)))
        else:
            width = hi - lo  # (rounded in float64: its error joins the shift's)
            err = _f32_err(lo) + _f32_err(hi) + abs(width) * 2.0 ** -52
            ops.append(diag("neg_width", -1.0, width, err * (1.0 + 2.0 ** -50)))
        ops.append(ReLUOp(f"{name}.relu_max", in_shape, in_shape))
        ops.append(diag("neg_max", -1.0, hi, _f32_err(hi)))
    elif lo is not None and lo != 0.0:
        ops.append(diag("add_min", 1.0, lo, _f32_err(lo)))
    return ops


def clamp_rule(module: nn.Module | None, name: str, in_shape, out_shape) -> list:
    """``nn.Hardtanh`` / ``nn.ReLU6`` modules and functional clamps (:class:`ClampBounds`):
    see :func:`clamp_ops`."""
    if isinstance(module, nn.Hardtanh):
        return clamp_ops(name, in_shape, module.min_val, module.max_val)
    if isinstance(module, ClampBounds):
        return clamp_ops(name, in_shape, module.lo, module.hi)
    raise TypeError(f"rule called with {type(module).__name__}")
