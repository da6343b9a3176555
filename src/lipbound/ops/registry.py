"""Registry of layer rules: which :class:`~lipbound.ops.base.Op` a module or function
becomes. Users can add their own with :func:`register_rule`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..layers import Normalize
from .base import Op
from .conv import conv2d_rule
from .elementwise import (
    ClampBounds,
    FunctionalDropout,
    batchnorm_rule,
    clamp_rule,
    identity_rule,
    normalize_rule,
    relu_rule,
    reshape_rule,
)
from .linear import linear_rule
from .padding import FunctionalPad, zeropad_rule
from .pooling import (
    SpatialMean,
    adaptive_avgpool2d_rule,
    adaptive_maxpool2d_rule,
    avgpool2d_rule,
    maxpool2d_rule,
    spatial_mean_rule,
)
from .scalar import arith_kind

Rule = Callable[..., Op]
"""rule(module_or_None, name, in_shape, out_shape) -> Op. Raise NotImplementedError with a
short reason when the module's configuration is not supported. (A built-in rule may return a
list of ops, a chain that computes the layer: :func:`~lipbound.ops.elementwise.clamp_rule`.)"""

MODULE_RULES: dict[type, Rule] = {
    nn.Linear: linear_rule,
    nn.Conv2d: conv2d_rule,
    nn.ReLU: relu_rule,
    nn.Hardtanh: clamp_rule,
    nn.ReLU6: clamp_rule,
    nn.MaxPool2d: maxpool2d_rule,
    nn.AvgPool2d: avgpool2d_rule,
    nn.AdaptiveAvgPool2d: adaptive_avgpool2d_rule,
    nn.AdaptiveMaxPool2d: adaptive_maxpool2d_rule,
    nn.BatchNorm1d: batchnorm_rule,
    nn.BatchNorm2d: batchnorm_rule,
    nn.Dropout: identity_rule,
    nn.Dropout1d: identity_rule,
    nn.Dropout2d: identity_rule,
    nn.Dropout3d: identity_rule,
    nn.AlphaDropout: identity_rule,
    nn.FeatureAlphaDropout: identity_rule,
    nn.Identity: identity_rule,
    nn.Flatten: reshape_rule,
    nn.Unflatten: reshape_rule,
    Normalize: normalize_rule,
    # zero padding: folded into the convolution after it (lipbound.ops.padding)
    nn.ZeroPad2d: zeropad_rule,
    nn.ConstantPad2d: zeropad_rule,
    nn.ConstantPad1d: zeropad_rule,
}


def _module_from_call(fn, args: tuple, kwargs: dict) -> nn.Module | None:
    """Turn a functional pooling call into the equivalent module (so one rule serves both).
    ``kwargs`` may name the chain's tensor ``input`` (``F.avg_pool2d(input=x, ...)``): it is
    no setting of the layer (since session 22; was passed on to the module: TypeError)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "input"}
    if fn is F.max_pool2d:
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        kw = dict(zip(names, args, strict=False)) | kwargs
        return nn.MaxPool2d(**kw)
    if fn is F.avg_pool2d:
        names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override"]
        kw = dict(zip(names, args, strict=False)) | kwargs
        return nn.AvgPool2d(**kw)
    if fn is F.adaptive_avg_pool2d:
        kw = dict(zip(["output_size"], args, strict=False)) | kwargs
        return nn.AdaptiveAvgPool2d(**kw)
    if fn is F.adaptive_max_pool2d:
        kw = dict(zip(["output_size", "return_indices"], args, strict=False)) | kwargs
        return nn.AdaptiveMaxPool2d(**kw)
    if fn is torch.mean:
        return SpatialMean.from_call(args, kwargs)  # (None: the rule refuses the mean)
    if fn is F.pad:
        kw = dict(zip(["pad", "mode", "value"], args, strict=False)) | kwargs
        return FunctionalPad(kw.get("pad", ()), kw.get("mode", "constant"), kw.get("value"))
    clamp = _clamp_from_call(fn, args, kwargs)
    if clamp is not None:
        return clamp
    dropout = _DROPOUT_FUNCTIONS.get(fn)
    if dropout is not None:
        names = ["p", "train"] if fn is torch.dropout else ["p", "training", "inplace"]
        kw = dict(zip(names, args, strict=False)) | kwargs
        training = kw.get("training", kw.get("train", dropout))
        # (a flag computed in forward, or anything but a literal False, counts as training)
        return FunctionalDropout(fn.__name__, training is not False)
    return None


_CLAMP_ARGS: dict[object, tuple[tuple[str, ...], dict[str, object]]] = {
    torch.clamp: (("min", "max"), {}),
    torch.clip: (("min", "max"), {}),
    torch.clamp_min: (("min",), {}),
    torch.clamp_max: (("max",), {}),
    "clamp": (("min", "max"), {}),
    "clip": (("min", "max"), {}),
    "clamp_min": (("min",), {}),
    "clamp_max": (("max",), {}),
    F.hardtanh: (("min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0}),
    F.relu6: (("inplace",), {"min_val": 0.0, "max_val": 6.0}),
}
"""Functions and tensor methods that clamp their input: the names of their arguments after
the input, and the defaults of the thresholds."""

_DROPOUT_FUNCTIONS: dict[object, bool] = {
    F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
    F.alpha_dropout: False, F.feature_alpha_dropout: False, torch.dropout: True,
}
"""Functional dropouts (the identity with ``training=False``) and their default of
``training``."""


def _clamp_from_call(fn: object, args: tuple, kwargs: dict) -> ClampBounds | None:
    """The thresholds of a clamp call (function or tensor method name, arguments after the
    input) as a :class:`ClampBounds`, or ``None`` for another call."""
    try:
        spec = _CLAMP_ARGS.get(fn)
    except TypeError:  # an unhashable target
        return None
    if spec is None:
        return None
    names, defaults = spec
    kw = defaults | dict(zip(names, args, strict=False)) | \
        {k: v for k, v in kwargs.items() if k != "input"}
    lo = kw.get("min", kw.get("min_val"))
    hi = kw.get("max", kw.get("max_val"))
    return ClampBounds(lo, hi)


FUNCTION_RULES: dict[object, Rule] = {
    F.relu: relu_rule,
    torch.relu: relu_rule,
    torch.flatten: reshape_rule,
    torch.reshape: reshape_rule,
    torch.clone: identity_rule,
    torch.detach: identity_rule,
    torch.squeeze: reshape_rule,
    torch.unsqueeze: reshape_rule,
    torch.unflatten: reshape_rule,
    torch.clamp: clamp_rule,
    torch.clip: clamp_rule,
    torch.clamp_min: clamp_rule,
    torch.clamp_max: clamp_rule,
    F.hardtanh: clamp_rule,
    F.relu6: clamp_rule,
    F.dropout: identity_rule,
    F.dropout1d: identity_rule,
    F.dropout2d: identity_rule,
    F.dropout3d: identity_rule,
    F.alpha_dropout: identity_rule,
    F.feature_alpha_dropout: identity_rule,
    torch.dropout: identity_rule,
    F.max_pool2d: lambda m, *a: maxpool2d_rule(m, *a),
    F.avg_pool2d: lambda m, *a: avgpool2d_rule(m, *a),
    F.adaptive_avg_pool2d: lambda m, *a: adaptive_avgpool2d_rule(m, *a),
    F.adaptive_max_pool2d: lambda m, *a: adaptive_maxpool2d_rule(m, *a),
    F.pad: zeropad_rule,
    torch.mean: spatial_mean_rule,
}

METHOD_RULES: dict[str, Rule] = {
    "view": reshape_rule,
    "reshape": reshape_rule,
    "flatten": reshape_rule,
    "squeeze": reshape_rule,
    "unsqueeze": reshape_rule,
    "unflatten": reshape_rule,
    "relu": relu_rule,
    "clamp": clamp_rule,
    "clip": clamp_rule,
    "clamp_min": clamp_rule,
    "clamp_max": clamp_rule,
    "contiguous": identity_rule,
    # the same values (a wrapper copying its input; a cast to float32 / float64, the identity
    # in exact arithmetic, which the bounds are about; the check of the chain against the
    # model's own forward pass sees the rounding)
    "clone": identity_rule,
    "detach": identity_rule,
    "float": identity_rule,
    "double": identity_rule,
    "mean": spatial_mean_rule,
}

# function/method targets that produce no tensor on the chain (shape queries); allowed.
AUXILIARY_METHODS = {"size", "dim"}


def register_rule(target: type | Callable | str, rule: Rule) -> None:
    """Register a rule for a module class, a function, or a tensor method name.

    Args:
        target: an ``nn.Module`` subclass, a function (e.g. ``torch.tanh``), or a method name.
        rule: ``rule(module_or_None, name, in_shape, out_shape) -> Op``; the returned op's
            soundness is the registrant's responsibility.

    Raises:
        InputError: a rule that is not callable, a target that no lookup would ever find (a
            layer instance instead of its class, a class that is not an ``nn.Module``, an
            empty method name) or that is not hashable (since session 22: such a rule was
            stored and silently never used, or broke every later analysis).
    """
    if not callable(rule):
        raise InputError(f"register_rule: the rule must be callable as rule(module_or_None, "
                         f"name, in_shape, out_shape) -> Op, got {rule!r}")
    if isinstance(target, nn.Module):
        raise InputError(f"register_rule: pass the layer's class ({type(target).__name__}), "
                         "not an instance of it: rules are looked up by the module's type")
    if isinstance(target, type) and not issubclass(target, nn.Module):
        raise InputError(f"register_rule: the class {target.__name__} is not an nn.Module "
                         "subclass; a target is an nn.Module class, a function (e.g. "
                         "torch.tanh) or a tensor method name (e.g. 'tanh')")
    if isinstance(target, str) and not target.isidentifier():
        raise InputError(f"register_rule: {target!r} is not a tensor method name")
    if not isinstance(target, str) and not callable(target):
        raise InputError(f"register_rule: the target {target!r} is not an nn.Module class, a "
                         "function or a tensor method name")
    try:
        hash(target)
    except TypeError:
        raise InputError(f"register_rule: the target {target!r} is not hashable") from None
    if arith_kind("call_method" if isinstance(target, str) else "call_function",
                  target) is not None:
        # (since session 23: such a rule was stored and never used, the tracer reading
        # every one of these calls as arithmetic first)
        what = f"the tensor method {target!r}" if isinstance(target, str) else \
            f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"
        raise InputError(
            f"register_rule: {what} is arithmetic that lipbound analyses itself (with a "
            "constant operand: x + c, x * self.scale, ... as a diagonal affine map; with two "
            "chain operands it is a residual connection, which is not supported); a rule gets "
            "no operands, so it could not describe it. Wrap the computation in an nn.Module "
            "of your own and register a rule for that class")
    if isinstance(target, str):
        METHOD_RULES[target] = rule
    elif isinstance(target, type) and issubclass(target, nn.Module):
        MODULE_RULES[target] = rule
    else:
        FUNCTION_RULES[target] = rule


#: methods through which a module computes its output: a subclass that overrides one of
#: them computes something its parent's rule does not describe
_COMPUTING_METHODS = ("forward", "_conv_forward", "_check_input_dim")


def module_rule(module: nn.Module) -> Rule | None:
    """The rule of the module's type, or of its nearest registered base class when the
    subclass does not override how the output is computed (``forward``, ...); ``None``
    otherwise, so that torch.fx traces into the subclass's own ``forward``. Likewise ``None``
    when the instance itself overrides one of those methods (``relu.forward = ...``): the
    rule would describe the class's computation, not the one the model makes (the check of
    the chain against the model on one random input misses it where the layer is inactive:
    a certified bound of 1.41 for a network of local constant 14.1)."""
    if any(name in vars(module) for name in _COMPUTING_METHODS):
        return None
    own = type(module)
    for cls in own.__mro__:
        if cls in MODULE_RULES:
            if (cls is own or all(getattr(own, name, None) is getattr(cls, name, None)
                                  for name in _COMPUTING_METHODS)) and _class_own(cls):
                return MODULE_RULES[cls]
            return None
    return None


def _class_own(cls: type) -> bool:
    """Whether ``cls``'s computing methods are still the ones written in the bodies of the
    classes that define them: ``False`` after a class-level replacement such as
    ``nn.Dropout.forward = lambda self, x: 10 * x`` (the registered rule would describe the
    original computation). Checked where the defining class is torch's own (a user's class
    may assign a shared function in its body)."""
    for name in _COMPUTING_METHODS:
        for base in cls.__mro__:
            if name in base.__dict__:
                fn = base.__dict__[name]
                if base is not nn.Module and base.__module__.startswith("torch.") and (
                        getattr(fn, "__qualname__", None) != f"{base.__qualname__}.{name}"
                        or getattr(fn, "__module__", None) != base.__module__):
                    return False
                break
    return True
