"""Where, and in which floating-point type, a module computes; and whether its tensors changed.

One rule for the whole package (the tracer, the analyzer, the attacks, the lower bounds, the
baselines, the benchmarks and the IEEE-float32 guard): a model computes in the type and on
the device of its first floating-point parameter, else of its first floating-point buffer.
A leaf module (it imports nothing from lipbound at import time), so that every other module
can use it.
"""

from __future__ import annotations

import enum
import itertools
import logging
import numbers
import operator
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module


def floating_tensor(model: object) -> Tensor | None:
    """The first floating-point parameter of ``model``, else its first floating-point buffer,
    or ``None`` (not a module, or a module without floating-point tensors)."""
    if not isinstance(model, nn.Module):
        return None
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t
    return None


def model_device(model: object, default: torch.device | None = None) -> torch.device | None:
    """The device ``model`` computes on (:func:`floating_tensor`'s; without one, the device of
    any parameter or buffer), else ``default``."""
    ref = floating_tensor(model)
    if ref is None and isinstance(model, nn.Module):
        ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    return default if ref is None else ref.device


def model_dtype_device(model: nn.Module, default: Tensor | None = None
                       ) -> tuple[torch.dtype, torch.device]:
    """The floating-point type and the device ``model`` computes in: those of
    :func:`floating_tensor`; without one, the device of any parameter or buffer with the type
    of ``default`` (else float32); without any tensor, those of ``default`` (else float32 on
    the CPU). A non-floating ``default`` gives float32."""
    ref = floating_tensor(model)
    if ref is not None:
        return ref.dtype, ref.device
    dtype = default.dtype if default is not None and default.is_floating_point() \
        else torch.float32
    device = model_device(model)
    if device is None:
        device = default.device if default is not None else torch.device("cpu")
    return dtype, device


def unwrap_model(model: object) -> object:
    """The module that computes ``model``'s forward, when ``model`` is a wrapper that computes
    the same function by calling it: ``nn.DataParallel`` / ``DistributedDataParallel``
    (``.module``) and ``torch.compile(module)``'s ``OptimizedModule`` (``._orig_mod``), at
    any depth (those classes exactly, not subclasses); anything else is returned as it is.
    A wrapper with forward hooks of its own (or a replaced call method) is kept, so that the
    hook check names it. The wrapper's own
    ``training`` flag is not read (its forward does not depend on it; the wrapped modules'
    flags are checked)."""
    for _ in range(64):  # (a wrapper cycle is impossible in practice; never loop forever)
        if not isinstance(model, nn.Module):
            return model
        d = model.__dict__
        own = ()  # methods the wrapper itself sets on the instance
        # the exact classes: a subclass may compute something else in its forward
        if type(model) in (nn.DataParallel, nn.parallel.DistributedDataParallel):
            inner = d["_modules"].get("module")
        else:
            dynamo = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile
            optimized = getattr(dynamo, "OptimizedModule", None)
            if optimized is None or type(model) is not optimized:
                return model
            inner, own = d["_modules"].get("_orig_mod"), ("forward",)
            if not _compiled_runs(model, inner):  # a forward set on it by the user
                return model
        if not isinstance(inner, nn.Module) or d["_forward_hooks"] \
                or d["_forward_pre_hooks"] or d.get("_compiled_call_impl") is not None \
                or any(n in d for n in _PATCHABLE if n not in own):
            return model
        model = inner
    return model


def _compiled_runs(wrapper: nn.Module, inner: object) -> bool:
    """Whether the ``forward`` that ``torch.compile`` set on its wrapper is still there and
    calls ``inner`` (not one set later on the instance: ``compiled.forward = f``, which
    computes something else). Follows the ``functools.wraps`` chain of dynamo's wrappers."""
    d = wrapper.__dict__
    f = d.get("forward")
    if getattr(f, "__self__", None) is wrapper and getattr(f, "__name__", "") \
            == "_call_lazy_check":  # (a lazy module: the compiled forward is kept aside)
        f = d.get("_forward")
    for _ in range(8):
        if f is None:
            return False
        if f is inner or (getattr(f, "__self__", None) is inner and getattr(
                f, "__name__", "") in ("__call__", "_wrapped_call_impl")):
            return True
        f = getattr(f, "__wrapped__", None)
    return False


def wrapper_problem(model: object) -> str | None:
    """Why ``model`` is a compiled form of a module that lipbound cannot analyse (TorchScript,
    ``torch.export``), with the fix; ``None`` for anything else."""
    from torch import jit  # (already imported by torch)

    if isinstance(model, jit.ScriptModule):
        return ("the model is a TorchScript module (torch.jit.script / torch.jit.trace), whose "
                "layers lipbound cannot read; pass the original nn.Module (before scripting "
                "or tracing), or load the checkpoint into the Python model class")
    unlift = sys.modules.get("torch.export._unlift")
    stateful = getattr(unlift, "_StatefulGraphModule", None)
    exported = sys.modules.get("torch.export")
    program = getattr(exported, "ExportedProgram", None)
    if (stateful is not None and isinstance(model, stateful)) or \
            (program is not None and isinstance(model, program)):
        return ("the model was made by torch.export (an ExportedProgram or its .module()), "
                "whose graph holds ATen operations, not layers, and cannot be put in eval "
                "mode; pass the original nn.Module (before torch.export)")
    return None


def tensor_state(model: nn.Module, counters: Mapping[int, frozenset[str]] | None = None
                 ) -> tuple[tuple, ...]:
    """A record of ``model``'s parameters and buffers that changes when any of them is
    modified in place (autograd's version counter: ``p.mul_``, ``copy_``, optimiser steps,
    ``load_state_dict``), given new storage (``.data = ...``, ``model.to(...)``) or replaced,
    added or removed (a new submodule or ``nn.Parameter``), or when a forward hook is added
    to or removed from a module or globally (or a module's ``forward`` replaced on the
    instance), or a module's class or plain-valued attribute (``bn.eps``, ``conv.padding``;
    for a module of the user's own class, its flags and numbers: ``self.use_extra = True``,
    ``self.max_val = 255``, see :data:`_FLAG_TYPES`) or training flag (``model.train()``:
    lipbound would then run the model with batch norm updating its statistics and dropout
    drawing masks) changes.
    In-place writes through ``p.data`` bypass the version counter: the contents are compared
    by :func:`content_snapshot` / :func:`changed_contents`.

    Args:
        model: the module.
        counters: per module (its index in ``model.modules()``), the names of the integer
            attributes that its forward changes when it runs (call counts, found by
            :func:`find_counters`): left out of the record, since lipbound's own
            runs of the model (attacks, lower bounds) change them.
    """
    out = []
    for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            if t is None:
                continue
            out.append((kind, name, id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype,
                        t.device))
    # Forward hooks and methods replaced on an instance change what a module computes without
    # touching its tensors (the layer rules do not analyse them: refused at tracing, see
    # lipbound.graph.check_hooks and lipbound.ops.registry.module_rule); so do a module's
    # class and the plain-valued attributes (eps, stride, padding) of torch's own layers
    # (those the rules read; a user's module may count its calls). Plain module walk and
    # dict look-ups: this runs before every bound; names only where a hook is recorded.
    settings = []
    modes = []  # training flags: model.train() after the analyzer was built changes them
    for i, m in enumerate(model.modules()):
        d = m.__dict__
        cls = type(m)
        skip = counters.get(i) if counters else None
        # the getter is chosen by the instance's attribute names and types, not by its class
        # alone: another instance of the class may hold an attribute the first lacked (set
        # only for some arguments), or hold it with another type (None in one, a number in
        # another: AvgPool2d's divisor_override); both are part of the record
        key = (cls, skip, tuple(d), tuple(map(type, d.values())))
        get = _SETTING_GETTERS.get(key)
        if get is None:
            get = _SETTING_GETTERS[key] = _setting_getter(cls, d, skip or frozenset())
        try:
            vals = get(d)
        except KeyError:  # an attribute deleted from this instance
            vals = None
        if type(vals) is list or (type(vals) is tuple and list in map(type, vals)):
            # a list is recorded by reference: pool.kernel_size[0] = 3 would go unseen
            vals = _frozen(vals)
        settings.append((key, vals))
        modes.append(m.training)  # (a property in torch.compile's wrapper)
        patched = (tuple((n, id(d[n])) for n in _PATCHABLE if n in d)
                   if not _PATCHABLE_SET.isdisjoint(d) else ())
        if d.get("_compiled_call_impl") is not None:  # run instead of _call_impl
            patched += (("_compiled_call_impl", id(d["_compiled_call_impl"])),)
        if d["_forward_hooks"] or d["_forward_pre_hooks"] or patched:
            name = next(n for n, sub in model.named_modules() if sub is m)
            out.append(("hook on module", name or "<root>", tuple(m._forward_hooks),
                        tuple(m._forward_pre_hooks), patched))
        if Tensor in map(type, d.values()):  # (C-level test: rare, and this runs per bound)
            # a tensor held as a plain attribute, not a parameter or buffer (``del
            # lin.weight; lin.weight = w``, as functional-call / meta-learning code does): the
            # layer computes with it, so it is watched like a parameter
            out += _plain_tensors(model, m)
    out.append(("mode", _MODE, tuple(modes)))
    out.append(("setting", "of a module (its class, an attribute such as eps, stride, "
                "padding or negative_slope, or a flag of a module of your own such as "
                "self.use_extra = True, or a number of one such as self.max_val = 255, "
                "which torch.fx records in the analysed graph)", tuple(settings)))
    # hooks on every module (torch.nn.modules.module.register_module_forward_hook)
    glob = (_torch_module._global_forward_hooks, _torch_module._global_forward_pre_hooks)
    if glob[0] or glob[1]:
        out.append(("global forward (pre-)hook",
                    "(torch.nn.modules.module.register_module_forward_hook)",
                    tuple(glob[0]), tuple(glob[1])))
    return tuple(out)


def _hook_computed(m: nn.Module) -> frozenset[str]:
    """Names of the attributes of ``m`` that the weight hooks of ``spectral_norm``,
    ``weight_norm`` and ``prune`` recompute from its parameters and buffers before every call
    (plain tensors that change at every call; their sources are watched)."""
    if not m._forward_pre_hooks:
        return frozenset()
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    names = set()
    for h in m._forward_pre_hooks.values():
        if isinstance(h, (SpectralNorm, WeightNorm)):
            names.add(h.name)
        elif isinstance(h, BasePruningMethod):
            names.add(h._tensor_name)
    return frozenset(names)


def _plain_tensor_attrs(m: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` of the tensors that module ``m`` holds as plain attributes and
    computes with: only a layer with a rule reads its attributes (a module traced through uses
    a plain tensor as a constant no rule takes, and may store activations there), and not the
    weights its hooks recompute at every call (:func:`_hook_computed`)."""
    from .ops.registry import module_rule  # (at call time: this module imports no other)

    if module_rule(m) is None:
        return []
    computed = _hook_computed(m)
    return [(k, t) for k, t in m.__dict__.items() if type(t) is Tensor and k not in computed]


def _plain_tensors(model: nn.Module, m: nn.Module) -> list[tuple]:
    """Records, as :func:`tensor_state` makes them for parameters, of the tensors that module
    ``m`` of ``model`` holds as plain attributes (:func:`_plain_tensor_attrs`)."""
    attrs = _plain_tensor_attrs(m)
    if not attrs:
        return []
    name = next(n for n, sub in model.named_modules() if sub is m)
    out = []
    for k, t in attrs:
        version = 0 if t.is_inference() else t._version  # (no counter: refused anyway)
        out.append(("tensor attribute", f"{name}.{k}" if name else k, id(t),
                    t.data_ptr(), version, tuple(t.shape), t.dtype, t.device))
    return out


_MODE = "training flags of the modules (model.train() / model.eval())"

_PATCHABLE = ("forward", "_conv_forward", "_check_input_dim", "_call_impl", "_wrapped_call_impl")
"""Methods through which a module computes its output (as
:data:`lipbound.ops.registry._COMPUTING_METHODS` and :data:`lipbound.graph._CALL_METHODS`)."""
_PATCHABLE_SET = frozenset(_PATCHABLE)
_SETTING_TYPES = frozenset((int, float, bool, str, tuple, list))
_LAYER_SETTING_TYPES = _SETTING_TYPES | {type(None)}
"""Attribute types of torch's layers that are watched: also ``None``, which a setting may be
in one instance and not another (``AvgPool2d(divisor_override=None)``, later set to 1)."""
_NUMBER_TYPES = (numbers.Number, enum.Enum, np.generic)
"""Numbers and flags of other types than Python's (``np.float64``, ``np.bool_``, ``IntEnum``)
that a forward may compute with or branch on: watched by value like an ``int``."""
_SETTING_GETTERS: dict[object, Callable[[dict], Any]] = {}
"""Per module class, counters left out, attribute names and their types (one instance's
``__dict__``: see :func:`tensor_state`): the getter of the watched attributes
(:func:`_setting_getter`)."""


_FLAG_TYPES = frozenset((bool, str, type(None), float, int))
"""Attribute types of a user's module that are watched: flags and modes (``self.use_extra =
True``, ``self.mode = "small"``, ``self.act = None``), which a forward may branch on (torch.fx
traces the branch taken), and numbers, which a forward may compute with (``x * self.scale``,
``x / self.max_val``: torch.fx records the number, :mod:`lipbound.ops.scalar` analyses it).
Integers that the forward itself changes (a count of its calls) are left out per model
(:func:`find_counters`)."""
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
"""``nn.Module``'s own attributes (``_is_full_backward_hook``: set by backward hooks)."""


def _setting_getter(cls: type, d: dict, skip: frozenset[str] = frozenset()
                    ) -> Callable[[dict], Any]:
    """A getter (C-level for torch's layers: this runs before every bound) of the attributes
    of modules of class ``cls`` that can change what they compute, named from one instance's
    ``__dict__`` ``d``: the plain-valued ones of torch's layers, and the flags and numbers
    (:data:`_FLAG_TYPES`) of other classes but those named in ``skip`` (counters)."""
    if cls.__module__.startswith("torch.nn."):
        names = [k for k, v in d.items() if type(v) in _LAYER_SETTING_TYPES and k != "training"]
        return operator.itemgetter(*names) if names else _no_settings
    # a subclass of one of torch's layers (class MyConv(nn.Conv2d)) computes with the layer's
    # settings (stride, padding, dilation: tuples), which the layer's rule reads
    layer = any(c.__module__.startswith("torch.nn.") and c is not nn.Module
                for c in cls.__mro__[1:])
    names = [k for k, v in d.items()
             if k not in _MODULE_INTERNALS and k not in skip
             and (type(v) in _FLAG_TYPES or isinstance(v, _NUMBER_TYPES)
                  or (layer and type(v) in _LAYER_SETTING_TYPES))]
    # containers (self.cfg = {"max_val": 255}, self.scales = [2.0]): torch.fx records the
    # numbers read from them too; their contents are recorded (a container is compared by
    # reference otherwise), those the forward changes left out like counters
    held = [k for k, v in d.items() if type(v) in _CONTAINERS and k not in names
            and k not in _MODULE_INTERNALS and k not in skip]
    if held:
        def flags(d: dict, names: tuple = tuple(names), held: tuple = tuple(held)) -> tuple:
            return (tuple(d[n] for n in names), tuple(_contents(d[n]) for n in held))
        return flags
    if not names:
        return _no_settings
    return operator.itemgetter(*names) if len(names) > 1 else (lambda d, n=names[0]: (d[n],))


_CONTAINERS = frozenset((list, tuple, dict))


def _contents(v: Any, depth: int = 0) -> Any:
    """A record of a container's contents: numbers, strings, flags by value (at any depth up
    to a few levels), other objects by type (not identity: a forward may store activations
    there), long containers by length."""
    t = type(v)
    if t in _FLAG_TYPES or isinstance(v, _NUMBER_TYPES):
        return v
    if t in _CONTAINERS and depth < 6:
        if len(v) > 256:
            return (t, len(v))
        return (t, tuple(_contents(e, depth + 1) for e in (v.items() if t is dict else v)))
    return t


def _no_settings(d: dict) -> tuple:
    return ()


def mutable_attributes(model: nn.Module) -> dict[tuple[int, str], Any]:
    """The integer attributes (not bools) and the contents of the containers (lists, tuples,
    dicts: :func:`_contents`) of the modules of ``model`` of the user's own classes (torch's
    layers' are watched as settings), keyed by the module's index in ``model.modules()`` and
    the attribute's name: a record taken before and after the model runs, for
    :func:`changed_attributes`."""
    out = {}
    for i, m in enumerate(model.modules()):
        if type(m).__module__.startswith("torch.nn."):
            continue
        for k, v in m.__dict__.items():
            if k in _MODULE_INTERNALS:
                continue
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                out[(i, k)] = v
            elif type(v) in _CONTAINERS:  # (a list the forward appends to, a dict it fills)
                out[(i, k)] = _contents(v)
    return out


def changed_attributes(before: dict[tuple[int, str], Any], model: nn.Module
                       ) -> dict[int, frozenset[str]]:
    """Per module index, the names of the integer attributes and containers whose value (or
    presence) changed since :func:`mutable_attributes` recorded ``before``."""
    after = mutable_attributes(model)
    found: dict[int, set[str]] = {}
    for key in before.keys() | after.keys():
        if before.get(key) != after.get(key):
            found.setdefault(key[0], set()).add(key[1])
    return {i: frozenset(names) for i, names in found.items()}


def find_counters(model: nn.Module, input_shape: tuple[int, ...], before: dict
                  ) -> dict[int, frozenset[str]]:
    """The integer attributes (and containers) of ``model``'s modules that its forward changes
    at every call (counts of its calls, lists of activations), which :func:`tensor_state`
    leaves out: those that changed since ``before`` (:func:`mutable_attributes`, taken
    before the model was traced and checked) and change again in one more run. One changed by
    the first call only (``if self.k == 0: self.k = 255``, set lazily) is watched like any
    other: torch.fx recorded its value."""
    changed = changed_attributes(before, model)
    if not changed:
        return changed
    settled = mutable_attributes(model)
    dtype, device = model_dtype_device(model)
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=dtype, device=device))
    except Exception:  # (ran while traced and checked: not expected) those of the build
        logging.getLogger(__name__).debug("the run finding the counters failed",
                                          exc_info=True)
        return changed
    return changed_attributes(settled, model)


def _frozen(v: Any) -> Any:
    """``v`` with its lists (at any depth) turned into tuples marked as lists."""
    if isinstance(v, list | tuple):
        return (type(v) is list, tuple(_frozen(e) for e in v))
    return v


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def content_snapshot(model: nn.Module) -> tuple[tuple[str, Tensor, torch.dtype, Tensor], ...]:
    """Copies of ``model``'s parameters, buffers and the tensors its layers hold as plain
    attributes (:func:`_plain_tensor_attrs`), as bit patterns, with the tensors and names
    they copy.

    :func:`tensor_state` sees writes that go through autograd's version counter; a write
    through ``p.data`` (``p.data.clamp_(-c, c)``, weight clipping; ``p.data.copy_(w)``) does
    not move it (``.data`` is a new tensor with a counter of its own), so only the contents
    show it. Costs one copy of the model's tensors (AlexNet 0.24 GB, VGG-16 0.55 GB) and a
    comparison per bound (MNIST about 45 us, the CIFAR-10 net 1 ms, AlexNet 50 ms on one
    thread of this project's 2-core host).
    """
    watched = [(f"{kind} {name}", t)
               for kind, named in (("parameter", model.named_parameters()),
                                   ("buffer", model.named_buffers()))
               for name, t in named if t is not None]
    watched += [(f"tensor attribute {mname + '.' if mname else ''}{k}", t)
                for mname, m in model.named_modules() for k, t in _plain_tensor_attrs(m)
                if not t.is_meta]
    out = []
    with torch.no_grad():
        for what, t in watched:
            # bit patterns: NaN equals itself, -0.0 differs from 0.0
            bits = _BITS.get(t.element_size(), t.dtype) if t.is_floating_point() else t.dtype
            try:
                copy = t.detach().clone().view(bits)
            except RuntimeError:  # a layout without views (sparse): versions only
                continue
            out.append((what, t, bits, copy))
    return tuple(out)


_memcmp: Any = None  # libc's memcmp through ctypes, once looked up (False: not available)


def _libc_memcmp() -> Any:
    """The C library's ``memcmp`` (ctypes, which releases the GIL during the call), or
    ``False`` where it cannot be loaded."""
    global _memcmp
    if _memcmp is None:
        _memcmp = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.memcmp
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _memcmp = fn
        except (OSError, AttributeError, TypeError):  # pragma: no cover - exotic platforms
            logging.getLogger(__name__).debug("memcmp not available", exc_info=True)
    return _memcmp


def _plain_cpu(t: Tensor) -> bool:
    return (t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
            and not t.is_quantized and not t.is_conj() and not t.is_neg())


_INTEGERS = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))
"""Types whose elements are equal exactly when their bytes are (not bool, whose bytes other
than 0 and 1 compare as true, nor floating or complex types: -0.0 == 0.0, NaN != NaN)."""


MEMCMP_MIN_BYTES = 32768
"""Smaller tensors are compared by ``torch.equal`` (a ``memcmp`` through ctypes costs about
2.4 us a call, ``torch.equal`` 0.5 us at 400 bytes and 2.2 us at 16 KB, one core of this
project's CPU)."""


def same_bits(a: Tensor, b: Tensor) -> bool:
    """``torch.equal(a, b)``: for two contiguous CPU tensors of the same shape and integer
    type (the bit patterns :func:`content_snapshot` keeps), of at least
    :data:`MEMCMP_MIN_BYTES`, a ``memcmp`` of their bytes (the same answer, read at memory
    speed: AlexNet's 4096 x 9216 layer as int32, 44 -> 21 ms on one core of this project's
    CPU), else ``torch.equal``. Raises ``RuntimeError`` where ``torch.equal`` does (another
    device)."""
    n = a.numel() * a.element_size()
    if (n >= MEMCMP_MIN_BYTES and a.dtype in _INTEGERS and a.dtype == b.dtype
            and a.shape == b.shape and _plain_cpu(a) and _plain_cpu(b)):
        fn = _libc_memcmp()
        if fn:
            return fn(a.data_ptr(), b.data_ptr(), n) == 0
    return torch.equal(a, b)


def changed_contents(snapshot: tuple[tuple[str, Tensor, torch.dtype, Tensor], ...]
                     ) -> str | None:
    """``None`` when every tensor of ``snapshot`` still holds the bits it was copied with,
    else which one changed (meant to run after :func:`changed_tensor` found the same tensors
    with the same version counters, shapes, types and devices: what is left is a write
    through ``.data``; a tensor that no longer compares counts as changed)."""
    with torch.no_grad():
        for what, t, bits, copy in snapshot:
            try:
                same = same_bits(t.view(bits), copy)
            except RuntimeError:  # another type or device
                same = False
            if not same:
                return (f"{what} was modified in place through .data, which torch's version "
                        "counter does not record")
    return None


def changed_tensor(before: tuple[tuple, ...], model: nn.Module,
                   counters: Mapping[int, frozenset[str]] | None = None) -> str | None:
    """``None`` when :func:`tensor_state` of ``model`` (with the same ``counters`` left out)
    equals ``before``, else a short description of the first difference (``"parameter
    conv1.weight was modified"``)."""
    now = tensor_state(model, counters)
    try:
        return _difference(before, now)
    except (RuntimeError, TypeError):  # an attribute became a tensor: compared elementwise
        return "a module's attribute changed"


def _difference(before: tuple[tuple, ...], now: tuple[tuple, ...]) -> str | None:
    if now == before:
        return None
    old = {(k, n): rest for k, n, *rest in before}
    new = {(k, n): rest for k, n, *rest in now}
    for key in new:
        if key[0] == "mode" and key in old and old[key] != new[key]:
            if any(n and not o for o, n in zip(old[key][0], new[key][0], strict=False)):
                return ("a module was put in training mode (model.train()): lipbound would "
                        "run it so (batch norm updating its statistics, dropout drawing "
                        "masks); call model.eval() to go on with this Analyzer")
            return "a module's training flag changed (a module left training mode)"
        if key not in old:
            return f"{key[0]} {key[1]} was added"
        if old[key] != new[key]:
            return f"{key[0]} {key[1]} was modified or replaced"
    gone = next(iter(k for k in old if k not in new), None)
    if gone is not None:
        return f"{gone[0]} {gone[1]} was removed"
    return "its parameters or buffers changed"


class InputCopying(nn.Module):
    """``model`` run on a copy of its input: for a model that writes into its input (a first
    ``ReLU(inplace=True)``, directly or through a view such as ``Flatten``), which would
    overwrite the caller's tensor, or fail on an input that requires grad. Same parameters,
    same outputs; made by :func:`guard_input_writes` only for such models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # (train() would set the wrapped modules' flags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.clone())


def guard_input_writes(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Any]:
    """``model(x)`` on a copy of ``x``, and the model to use from then on: ``model`` itself,
    or :class:`InputCopying` around it when that call wrote into its input (autograd's
    version counter of the copy moved)."""
    probe = x.clone()
    out = model(probe)
    return (InputCopying(model) if probe._version != 0 else model), out
