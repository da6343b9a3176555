"""Rules for layers whose linear part is diagonal or the identity: BatchNorm (eval mode),
input normalisation, Dropout (eval mode), Identity; ReLU; and shape-only layers."""

from __future__ import annotations

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
    if not module.track_running_stats or module.running_mean is None \
            or module.running_var is None:
        # (since session 22 the message names the fix)
        raise NotImplementedError(
            "BatchNorm without running statistics (track_running_stats=False, or no "
            "running_mean / running_var): without them it normalises with the statistics of "
            "the batch it is given even in eval mode, which mixes the samples; train it with "
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


def identity_rule(module: nn.Module | None, name: str, in_shape, out_shape) -> DiagOp:
    """Identity, and Dropout in eval mode (which is the identity)."""
    if module is not None and isinstance(module, nn.modules.dropout._DropoutNd) \
            and module.training:
        raise NotImplementedError("Dropout in training mode (call model.eval())")
    one = torch.ones((), dtype=torch.float64)
    return DiagOp(name, tuple(in_shape), one, torch.zeros((), dtype=torch.float64))


def relu_rule(module: nn.Module | None, name: str, in_shape, out_shape) -> ReLUOp:
    return ReLUOp(name, in_shape, out_shape)


def reshape_rule(module: nn.Module | None, name: str, in_shape, out_shape) -> ReshapeOp:
    """Flatten / view / reshape: constant 1; the mask is reshaped the same way."""
    return ReshapeOp(name, in_shape, out_shape)
