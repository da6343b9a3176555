"""Model intake: turn any ``nn.Module`` whose forward is a chain of supported operations into
a list of :class:`~lipbound.ops.base.Op`, discovered by ``torch.fx`` tracing.

Every node of the traced graph is checked before anything fails, so an unsupported model gets
one :class:`~lipbound.errors.UnsupportedModelError` listing every offending node, its type and
where it sits.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import numbers
import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._hints import unsupported_hint
from ._modelinfo import model_dtype_device, unwrap_model, wrapper_problem
from ._precision import exact_float32
from .errors import InputError, UnsupportedModelError, WeightsError
from .ops.base import Op
from .ops.conv import conv2d_op
from .ops.elementwise import clamp_rule, identity_rule, reshape_rule
from .ops.linear import linear_op
from .ops.padding import ZeroPadOp, fold_zero_padding
from .ops.pooling import SpatialMean, spatial_mean_rule
from .ops.registry import (
    _COMPUTING_METHODS,
    AUXILIARY_METHODS,
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    _clamp_from_call,
    _class_own,
    _module_from_call,
    module_rule,
)
from .ops.scalar import CHAIN, CONST_METHODS, arith_kind, arith_rule, constant, operands
from .validation import check_input_shape

log = logging.getLogger(__name__)


class _Tracer(fx.Tracer):
    """Keeps every module that has a registered rule as a leaf (e.g. Normalize), and traces a
    wrapper that runs its module (``nn.DataParallel``, ``torch.compile``: see
    :func:`~lipbound._modelinfo.unwrap_model`) as that module."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_rule(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        inner = unwrap_model(m)
        if inner is not m:
            return self.call_module(inner, inner.forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)


def modules_in_training(model: nn.Module) -> list[str]:
    """Names of every module of ``model`` in training mode (``"<root>"`` for the model)."""
    return [name or "<root>" for name, m in model.named_modules() if m.training]


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model in training mode (documented choice: we never change the user's model).

    Raises:
        InputError: naming the modules in training mode and the fix (``model.eval()``).
    """
    training = [n or type(model).__name__ for n, m in model.named_modules()
                if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                 nn.modules.dropout._DropoutNd))]
    if model.training or training:
        where = f" (batch norm / dropout in training mode: {', '.join(training)})" \
            if training else ""
        raise InputError(
            "the model is in training mode" + where + "; batch norm and dropout then behave "
            "differently from inference. Call model.eval() before computing bounds.")


def _describe(node: fx.Node, root: nn.Module) -> tuple[str, str]:
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        return f"module '{node.target}'", type(mod).__name__
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))
        mod = getattr(t, "__module__", "") or ""
        return f"node '{node.name}'", f"function {mod + '.' if mod else ''}{name}"
    if node.op == "call_method":
        return f"node '{node.name}'", f"tensor method .{node.target}()"
    return f"node '{node.name}'", node.op


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced model once, recording every node's value. Nodes named in ``unwrap``
    whose value is a tuple pass on its first element (a layer that returns a tuple, e.g.
    ``MaxPool2d(return_indices=True)``, is then reported with the other unsupported layers
    instead of breaking the run at the next layer)."""

    def __init__(self, gm: fx.GraphModule, unwrap: frozenset[str] = frozenset()):
        super().__init__(gm)
        self.extra_traceback = False  # no "While executing ... / Use tlparse" in messages
        self.values: dict[str, object] = {}
        self.unwrap = unwrap
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.current = n
        out = super().run_node(n)
        if n.name in self.unwrap and isinstance(out, tuple) and out \
                and isinstance(out[0], Tensor):
            out = out[0]
        self.values[n.name] = out
        return out


def check_inference_tensors(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers were created in ``torch.inference_mode()``.

    Raises:
        InputError: naming the tensors and the fix.
    """
    inference = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                 if t.is_inference()]
    if inference:
        raise InputError(
            f"the model's tensors were created under torch.inference_mode() ("
            f"{', '.join(inference[:4])}{', ...' if len(inference) > 4 else ''}): such "
            "tensors have no version counter (lipbound could not see them change) and cannot "
            "take part in the gradient computations of lower bounds and attacks. Build or load "
            "the model outside inference mode (torch.no_grad() is fine), or pass "
            "copy.deepcopy(model), which holds ordinary tensors")


def check_tensors(model: nn.Module) -> None:
    """Refuse, before anything runs, a model whose tensors hold no data (the ``meta``
    device, or the uninitialised parameters of a lazy module such as ``nn.LazyLinear``
    before its first forward pass: since session 22, was torch's ValueError), were made in
    ``torch.inference_mode()`` or whose floating-point type is half precision.

    Raises:
        InputError: naming the problem and the fix.
    """
    tensors = list(itertools.chain(model.named_parameters(), model.named_buffers()))
    lazy = [n for n, t in tensors if nn.parameter.is_lazy(t)]
    if lazy:
        raise InputError(
            f"the model has uninitialised parameters of a lazy module ("
            f"{', '.join(lazy[:4])}{', ...' if len(lazy) > 4 else ''}): nn.LazyLinear and "
            "the other lazy layers make their weights at their first forward pass; run one "
            "forward pass on an input of the right shape (model(x)) and load the weights "
            "before computing bounds")
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise InputError(
            f"the model's parameters are on the meta device (not materialised: "
            f"{', '.join(meta[:4])}{', ...' if len(meta) > 4 else ''}); load real weights "
            "first (e.g. model.to_empty(device='cpu') then model.load_state_dict(...))")
    check_inference_tensors(model)
    half = sorted({str(t.dtype).removeprefix("torch.") for _, t in tensors
                   if t.dtype in (torch.float16, torch.bfloat16)})
    if half:
        raise InputError(
            f"{'/'.join(half)} models are not supported: lipbound checks its float64 analysis "
            "against the model's own forward pass, which in half precision differs by its "
            "rounding. Convert with model.float(): the bounds of the float32 model (the "
            "same weights) are what lipbound certifies")


def _weight_hooks() -> tuple[type, ...]:
    """Forward pre-hooks that only recompute a layer's parameter attribute (``weight``) from
    its own parameters and buffers before each call (``torch.nn.utils.spectral_norm``,
    ``weight_norm`` and ``prune``): the layer rules read that attribute after the tracing
    run, so the analysed weight is the one the model uses (in eval mode spectral norm does
    no power step)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return SpectralNorm, WeightNorm, BasePruningMethod


def _weight_hook(hook: object, allowed: tuple[type, ...]) -> bool:
    """Whether ``hook`` is one of the ``allowed`` weight hooks, called as torch's own (a
    subclass, e.g. a custom pruning method, may redefine ``compute_mask``; one that
    redefines ``__call__`` may return a changed input)."""
    return any(isinstance(hook, a) and type(hook).__call__ is a.__call__ for a in allowed)


_CALL_METHODS = ("_call_impl", "_wrapped_call_impl")
"""Methods through which ``Module.__call__`` runs a module (hooks and ``forward``)."""


def _compiled_self(m: nn.Module, compiled: object) -> bool:
    """Whether ``compiled`` is ``torch.compile(m._call_impl)`` (what ``m.compile()`` sets)."""
    inner = getattr(compiled, "__wrapped__", None)
    return (getattr(inner, "__func__", None) is nn.Module._call_impl
            and getattr(inner, "__self__", None) is m)


def check_hooks(model: nn.Module) -> None:
    """Refuse a model with forward hooks (on any module, or registered globally) or a
    replaced ``_call_impl`` (see :data:`_CALL_METHODS`): the layer rules describe a module by
    its parameters, so a hook that changes a module's input or output would be left out of
    the analysis. The check of the analysed chain against the model (at a random input and
    scaled copies of it) misses such a hook where its layer is inactive there (a hook
    scaling the output of a ReLU that is off on that input: a certified bound of 1.41 for a
    network of local constant 14.1). The weight hooks of :func:`_weight_hooks` are allowed
    (spectral norm in eval mode only: in training mode its power step changes the weight at
    every call).

    Raises:
        UnsupportedModelError: naming the hooked modules and the fix.
    """
    from torch.nn.modules import module as _module
    from torch.nn.utils.spectral_norm import SpectralNorm

    allowed = _weight_hooks()
    found: list[tuple[str, str, str]] = []
    for name, m in model.named_modules():
        kinds = []
        if m._forward_hooks:
            kinds.append("forward hook registered")
        if any(not _weight_hook(h, allowed) for h in m._forward_pre_hooks.values()):
            kinds.append("forward pre-hook registered")
        if kinds:
            kinds[-1] += " (hooks are not analysed: remove them with the handle's .remove())"
        if m.training and any(isinstance(h, SpectralNorm) for h in m._forward_pre_hooks.values()):
            # its power step changes the weight at every call
            kinds.append("spectral_norm in training mode (call model.eval())")
        # torch.fx traces through Module.__call__ itself: a replaced _call_impl is never seen
        kinds += [f"{n} replaced (not analysed: use the module's forward)" for n in _CALL_METHODS
                  if n in vars(m) or getattr(type(m), n, None) is not getattr(nn.Module, n)]
        compiled = vars(m).get("_compiled_call_impl")
        if compiled is not None and not _compiled_self(m, compiled):
            # Module._wrapped_call_impl runs it instead of _call_impl (module.compile() sets
            # torch.compile(module._call_impl), which computes the same)
            kinds.append("_compiled_call_impl replaced (not analysed: use the module's "
                         "forward)")
        if m is model and "forward" in vars(m):
            # torch.fx traces the root's class's forward (type(root).forward)
            kinds.append("forward replaced on the instance (torch.fx traces the class's "
                         "forward: define it in a subclass or wrap the model in a module)")
        if kinds:
            found.append((f"module '{name or '<root>'}'", type(m).__name__, "; ".join(kinds)))
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        found.append(("all modules", "global hook", "a global forward (pre-)hook is registered "
                      "(torch.nn.modules.module.register_module_forward_hook): remove it"))
    if found:
        raise UnsupportedModelError(found)


def check_batchnorm(model: nn.Module) -> None:
    """Refuse batch norms whose ``running_var + eps`` is not positive (their scale
    ``1/sqrt(running_var + eps)`` is NaN or infinite).

    Raises:
        WeightsError: naming every such layer, its bad channels and the fix.
    """
    bad = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_var is None:
            continue
        var = m.running_var.detach()
        if not var.is_floating_point() or var.is_meta:
            continue
        low = (var + m.eps) <= 0
        if bool(low.any()):
            ch = torch.nonzero(low).reshape(-1).tolist()
            bad.append(f"module '{name or '<root>'}' ({type(m).__name__}), channel(s) "
                       f"{', '.join(map(str, ch[:5]))}{', ...' if len(ch) > 5 else ''} "
                       f"(running_var {float(var[ch[0]]):.3g}, eps {m.eps:g})")
    if bad:
        raise WeightsError(
            "batch norm with running_var + eps <= 0 in " + "; ".join(bad) + ": its scale "
            "1/sqrt(running_var + eps) is not a finite number. running_var must be > -eps "
            "(a variance is >= 0, and eps > 0): load the trained statistics, or fix them")


def _runs(model: nn.Module, shape: Sequence[int], batch: int, dtype: torch.dtype,
          device: torch.device) -> bool:
    """Whether ``model`` runs on a zero batch of ``batch`` inputs of ``shape`` (with a
    batch of 2, also keeping that batch dimension in its output)."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(batch, *shape, dtype=dtype, device=device))
    except Exception:
        return False
    return batch == 1 or (isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == batch)


def _fmt_shape(shape: Sequence[int | str]) -> str:
    return f"({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"


def _run_failure(model: nn.Module, input_shape: tuple[int, ...], exc: Exception,
                 node: fx.Node | None, dtype: torch.dtype, device: torch.device) -> InputError:
    """The error for a model that fails on a batch of 2 inputs of ``input_shape``, with the
    likely cause when one is found: a batch dimension included in the shape, or a forward
    that only works on a batch of 1."""
    where = ""
    if node is not None and node.op not in ("placeholder", "output"):
        where = f" at {_describe(node, model)[0] if node.op == 'call_module' else node.name}"
    head = (f"running the model on an input of shape {_fmt_shape(('N', *input_shape))} "
            f"(a batch of N=2) failed{where}: {type(exc).__name__}: "
            f"{str(exc).strip() or 'no message'}.")
    per_sample = input_shape[1:]
    if len(input_shape) > 1 and input_shape[0] == 1 and _runs(model, per_sample, 2, dtype,
                                                              device):
        fix = (f" input_shape is per sample, without the batch dimension: "
               f"{_fmt_shape(per_sample)}")
    elif _runs(model, input_shape, 1, dtype, device):
        fix = (" The model runs on a batch of 1 but not on a batch of 2: lipbound runs it on "
               "batches, so its forward must keep the batch dimension (x.flatten(1) or "
               "x.view(x.size(0), -1), not torch.flatten(x) or x.view(1, -1))")
    else:
        fix = (" Check the input shape the model expects (input_shape is per sample, without "
               "the batch dimension)")
    return InputError(head + fix)


def x0_shape_hint(model: nn.Module, x0_shape: tuple[int, ...]) -> str | None:
    """Why an input ``x0`` of this shape failed where the model analyses fine with another
    reading of it, or ``None``: a batch of several inputs (``(2, 4)`` for a model of
    4-vectors) or an input without its batch dimension (``(1, 28, 28)`` for MNIST images).
    Called after tracing with ``x0``'s shape failed; the other reading is traced in full."""
    if len(x0_shape) < 2 or not isinstance(model, nn.Module):
        return None
    if x0_shape[0] > 1:
        alt, hint = x0_shape[1:], (
            f"x0 holds a batch of {x0_shape[0]} inputs (shape {_fmt_shape(x0_shape)}); pass "
            f"one input with a batch dimension of 1, e.g. x[:1] (shape "
            f"{_fmt_shape((1, *x0_shape[1:]))}); for many inputs, call it on each with one "
            "Analyzer (or use lipbound.batch.bound_many)")
    else:
        alt, hint = x0_shape, (
            f"x0 of shape {_fmt_shape(x0_shape)} is one input without its batch dimension "
            f"(the model takes {_fmt_shape(x0_shape)} per sample); pass x0.unsqueeze(0) "
            f"(shape {_fmt_shape((1, *x0_shape))})")
    dtype, device = model_dtype_device(model)
    if not _runs(model, alt, 2, dtype, device):  # one forward pass rules most readings out
        return None
    try:
        trace_model(model, alt)
    except Exception:
        return None
    return hint


def check_finite_parameters(model: nn.Module) -> None:
    """Raise :class:`WeightsError` naming every parameter or buffer with NaN/inf entries."""
    with torch.no_grad():  # (an inference tensor that requires grad fails outside it)
        bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise WeightsError(f"the model's weights contain NaN/inf in {', '.join(bad)}; load "
                           "valid weights (a diverged training run or a corrupt file?)")


_CASTS = (torch.float32, torch.float64)


def _reads_attribute(node: object, attr: str) -> bool:
    """Whether ``node`` is ``getattr(t, attr)`` of a node ``t`` of the graph."""
    return isinstance(node, fx.Node) and node.op == "call_function" \
        and node.target is getattr and len(node.args) == 2 and node.args[1] == attr


def _device_of(node: object) -> bool:
    """Whether ``node`` is ``t.device`` of a tensor ``t`` of the graph (``x.device``,
    ``self.fc.weight.device``): a device, whatever ``t`` is (since session 23; such a
    ``.to(x.device)`` was refused as an operation with no rule)."""
    return _reads_attribute(node, "device")


def _float_dtype_of(node: object, values: dict[str, object]) -> bool:
    """Whether ``node`` is ``t.dtype`` of a tensor ``t`` of the graph (``x.dtype``,
    ``self.fc.weight.dtype``) that was float32 or float64 when traced (since session 23;
    ``.to(x.dtype)`` was refused with 'produces a non-tensor value'). An integer or half
    dtype is not read as one: such a cast is refused as before."""
    return _reads_attribute(node, "dtype") \
        and any(values.get(node.name) is c for c in _CASTS)


def _moves_only(node: fx.Node, values: dict[str, object] | None = None) -> bool:
    """Whether a ``.to(...)`` call only moves its tensor to a device or casts it to float32 /
    float64 (``x.to(self.device)``, ``x.to(torch.float32)``, ``x.to(x.dtype)`` where the
    traced dtype is one of those, read from ``values``): the identity in exact arithmetic (a
    cast's rounding is seen by the check of the chain against the model's own forward pass).
    Not a cast to another type (an integer type truncates)."""
    values = values or {}

    def ok(a: object) -> bool:
        return (isinstance(a, (torch.device, str, bool, torch.memory_format))
                or a in _CASTS or _device_of(a) or _float_dtype_of(a, values))
    return all(ok(a) for a in node.args[1:]) and all(ok(v) for v in node.kwargs.values())


_CAST_METHODS = {"int": torch.int32, "long": torch.int64, "short": torch.int16,
                 "char": torch.int8, "byte": torch.uint8, "bool": torch.bool,
                 "half": torch.float16, "bfloat16": torch.bfloat16}
"""Tensor methods that cast to a type lipbound does not read as the identity."""


def _cast_detail(node: fx.Node, values: dict[str, object]) -> str | None:
    """Why a cast on the chain that has no rule is refused, naming the fix (since session 24;
    ``x.to(torch.int32)`` was reported as a ``.to()`` with no rule): ``x.int()``,
    ``x.to(torch.int64)``, ``x.type(torch.int16)``, ``x.to(dtype=y.dtype)`` of an integer
    ``y``, and likewise casts to bool or to half precision. ``None`` for anything else."""
    if node.op != "call_method":
        return None
    target = str(node.target)
    dtype = _CAST_METHODS.get(target)
    if dtype is None and target in ("to", "type"):
        for a in (*node.args[1:], *node.kwargs.values()):
            v = values.get(a.name) if _reads_attribute(a, "dtype") else a
            if isinstance(v, torch.dtype):
                dtype = v
                break
    if dtype is None or dtype in _CASTS:
        return None
    how = f"x.{target}()" if target in _CAST_METHODS else f"x.{target}({dtype})"
    if dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex):
        what = ("a boolean: every nonzero value becomes True" if dtype == torch.bool else
                "an integer type: it truncates the values to whole numbers")
        return (f"{how} casts to {dtype}, {what}, a step with no finite Lipschitz constant, "
                "which lipbound does not analyse (casts to integer and boolean types are not "
                "supported); remove the cast, or cast to torch.float32 / torch.float64 "
                "(x.float(), x.double()), which lipbound reads as the identity")
    return (f"{how} casts to {dtype}: lipbound reads casts to torch.float32 / torch.float64 "
            "only (its bounds do not cover the rounding of a lower precision); cast to "
            "torch.float32 or torch.float64 instead, or remove the cast")


def _default_arguments(model: nn.Module) -> dict[str, object] | None:
    """The default values of the arguments after the input of the model's ``forward`` (``def
    forward(self, x, return_features=False)``), when every one has a default: the model is
    analysed as lipbound runs it, ``model(x)``; ``None`` for a forward of one argument (or
    with ``*args`` / ``**kwargs`` or an argument without a default, refused as more inputs).
    """
    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[2:]
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not params or any(p.kind not in kinds or p.default is p.empty for p in params):
        return None
    return {p.name: p.default for p in params}


_SPECIALISATION_CHECKS = frozenset((operator.eq, torch._assert, fx._symbolic_trace._assert_is_none))
"""What torch.fx adds after the placeholder of an argument given as ``concrete_args``: a check
that a call passes the value it was traced with."""


def _drop_default_inputs(graph: fx.Graph) -> None:
    """Remove from ``graph`` (traced with :func:`_default_arguments` as ``concrete_args``) the
    placeholders of the defaulted arguments and the checks torch.fx adds on them, so that
    the graph takes the input alone; a placeholder used by anything else is kept (and the
    model refused as one with more inputs)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    for ph in placeholders:
        found, todo = [], list(ph.users)
        while todo:
            n = todo.pop()
            if n in found:
                continue
            if n.op != "call_function" or n.target not in _SPECIALISATION_CHECKS:
                break
            found.append(n)
            todo.extend(n.users)
        else:
            order = {n: i for i, n in enumerate(graph.nodes)}
            for n in sorted(found, key=order.__getitem__, reverse=True):
                graph.erase_node(n)
            graph.erase_node(ph)


def _input_dependence(gm: fx.GraphModule, model: nn.Module,
                      values: dict[str, object] | None = None) -> tuple[set[str], set[str]]:
    """The names of the nodes whose value depends on the input (the placeholder), and of the
    constants arithmetic may take: ``get_attr`` nodes of the model's parameters and buffers
    (which lipbound watches for changes; a plain tensor attribute is not watched), and
    those passed through :data:`~lipbound.ops.scalar.CONST_METHODS` with literal arguments
    (``self.std.view(1, -1, 1, 1)``). ``values``: the traced values (for ``.to(x.dtype)``)."""
    values = values or {}
    named = list(itertools.chain(model.named_parameters(remove_duplicate=False),
                                 model.named_buffers(remove_duplicate=False)))
    held = {n for n, _ in named}
    held_ids = {id(t) for _, t in named}
    # tensors that a module also holds as a plain attribute (self.P = self.w[:, :], self.B =
    # self.std), by the tensor they view: the forward may compute with the attribute, which
    # a later assignment (model.P = other) replaces unwatched, so they are no constants
    aliased = {id(t if t._base is None else t._base) for m in model.modules()
               for t in m.__dict__.values() if isinstance(t, Tensor)
               and not isinstance(t, nn.Parameter)}
    dep: set[str] = set()
    consts: set[str] = set()
    for node in gm.graph.nodes:
        if _device_of(node) or _float_dtype_of(node, values):
            continue  # (a device carries no value: self.mean.to(x.device) is a constant;
            # nor does a float dtype: self.mean.to(x.dtype))
        if node.op == "placeholder" or any(a.name in dep for a in node.all_input_nodes):
            dep.add(node.name)
        elif node.op == "get_attr":
            try:
                value = operator.attrgetter(str(node.target))(gm)  # (a dotted path)
            except AttributeError:
                continue
            # a registered tensor, or a view of one made eagerly in forward (torch.fx runs
            # ``self.std.view(1, -1, 1, 1)`` on a buffer and records the view as a constant;
            # it shares the buffer's storage and version counter)
            base = getattr(value, "_base", None)
            if not isinstance(value, Tensor) \
                    or id(value if base is None else base) in aliased:
                continue
            if str(node.target) in held or (base is not None and id(base) in held_ids):
                consts.add(node.name)
        elif node.op == "call_method" and node.args and isinstance(node.args[0], fx.Node) \
                and node.args[0].name in consts \
                and not any(isinstance(a, fx.Node) and not _device_of(a)
                            and not _float_dtype_of(a, values)
                            for a in (*node.args[1:], *node.kwargs.values())) \
                and (node.target in CONST_METHODS
                     or (node.target == "to" and _moves_only(node, values))):
            consts.add(node.name)
    return dep, consts


_SIZE_ARITHMETIC = frozenset((operator.add, operator.sub, operator.mul, operator.truediv,
                              operator.floordiv, operator.pow, operator.neg, operator.mod))
"""Python arithmetic on sizes (``x.size(1) ** 0.5``) that :func:`_sizes` follows."""


def _sizes(gm: fx.GraphModule, values: dict[str, object], dep: set[str]) -> dict[str, str]:
    """The nodes that compute a number from the input's shape: ``"const"`` for one that does
    not depend on the batch size (``x.size(1)``, ``x.shape[-1]``, ``x.dim()``, arithmetic on
    those), ``"batch"`` for one that may (``x.size(0)``, ``x.numel()``), ``"shape"`` for a
    whole shape (``x.size()``, ``x.shape``). Arithmetic of the chain with a ``"const"`` size
    is arithmetic with a constant (since session 23; ``x / x.size(1)`` was refused as a
    residual connection)."""
    out: dict[str, str] = {}

    def ndim(a: object) -> int | None:  # (of a tensor computed from the input)
        v = values.get(a.name) if isinstance(a, fx.Node) and a.name in dep else None
        return v.dim() if isinstance(v, Tensor) else None

    for node in gm.graph.nodes:
        args, kw = node.args, node.kwargs
        if node.op == "call_method" and node.target == "size" and ndim(args[0]):
            dim = args[1] if len(args) > 1 else kw.get("dim")
            if dim is None:
                out[node.name] = "shape"
            elif isinstance(dim, int) and not isinstance(dim, bool):
                out[node.name] = "batch" if dim % ndim(args[0]) == 0 else "const"
        elif node.op == "call_method" and node.target == "dim" and ndim(args[0]):
            out[node.name] = "const"
        elif node.op == "call_method" and node.target in ("numel", "nelement") \
                and ndim(args[0]):
            out[node.name] = "batch"
        elif node.op == "call_function" and node.target is getattr and len(args) == 2 \
                and args[1] == "shape" and ndim(args[0]):
            out[node.name] = "shape"
        elif node.op == "call_function" and node.target is operator.getitem \
                and isinstance(args[0], fx.Node) and out.get(args[0].name) == "shape":
            n = len(values[args[0].name])  # type: ignore[arg-type]
            i = args[1]
            if isinstance(i, int) and not isinstance(i, bool) and n:
                out[node.name] = "batch" if i % n == 0 else "const"
            else:
                out[node.name] = "batch"  # (a slice: may hold the batch size)
        elif node.op == "call_function" and node.target in _SIZE_ARITHMETIC \
                and node.all_input_nodes \
                and all(a.name in out for a in node.all_input_nodes) \
                and all(isinstance(a, (fx.Node, int, float)) and not isinstance(a, bool)
                        for a in args) and not kw:
            kinds = {out[a.name] for a in node.all_input_nodes}
            out[node.name] = "const" if kinds == {"const"} else "batch"
    return {k: v for k, v in out.items()
            if v == "shape" or (isinstance(values.get(k), numbers.Real)
                                and not isinstance(values.get(k), bool))}


def _squeezes_batch(node: fx.Node, ndim: int) -> str | None:
    """How a ``squeeze`` node also squeezes the batch dimension (``x.squeeze()``,
    ``torch.squeeze(x, 0)``), or ``None``."""
    if node.op == "call_method" and node.target == "squeeze":
        call = "x.squeeze"
    elif node.op == "call_function" and node.target is torch.squeeze:
        call = "torch.squeeze"
    else:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return f"{call}() without a dimension"
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if any(isinstance(d, int) and not isinstance(d, bool) and d % ndim == 0 for d in dims):
        return f"{call}(..., {dim!r})"
    return None


def _arith_op(kind: str, node: fx.Node, values: dict[str, object], dep: set[str],
              consts: set[str], name: str, in_shape: tuple[int, ...],
              out_shape: tuple[int, ...], sizes: dict[str, str] | None = None) -> Op:
    """The op of an arithmetic node (:mod:`lipbound.ops.scalar`): its operands read as the
    chain's tensor (a node depending on the input) or constants (literal numbers, and the
    values of the constant nodes of :func:`_input_dependence`).

    Raises:
        NotImplementedError: with the reason it is not supported.
    """
    args = operands(kind, node.op == "call_method", node.args, node.kwargs)
    ops: list[object] = []
    sizes = sizes or {}
    for a in args:
        if isinstance(a, fx.Node) and a.name in sizes:
            if sizes[a.name] != "const":
                raise NotImplementedError(
                    f"the operand '{a.name}' is a size that includes the batch dimension "
                    "(x.size(0), x.shape[0], x.numel()): the result would depend on how many "
                    "inputs are in the batch; use the per-sample sizes (x.size(1), "
                    "x[0].numel()) or a constant")
            ops.append(constant(values[a.name], in_shape))
            continue
        if isinstance(a, fx.Node):
            if a.name in dep:
                ops.append(CHAIN)
                continue
            if a.name not in consts:
                raise NotImplementedError(
                    f"the operand '{a.name}' is neither the chain's tensor nor a constant "
                    "lipbound reads (a Python number, or a parameter or registered buffer of "
                    "the model, possibly through .view / .reshape / .unsqueeze; a plain "
                    "tensor attribute or a tensor made in forward is not: register it with "
                    "self.register_buffer(name, tensor))")
            a = values[a.name]
        elif isinstance(a, (list, tuple)):
            raise NotImplementedError(f"the operand {a!r} is not a number or a tensor")
        ops.append(constant(a, in_shape))
    out = values[node.name]
    dtype = out.dtype if isinstance(out, Tensor) else torch.float64
    return arith_rule(kind, ops, name, in_shape, out_shape, dtype)


_WEIGHTED = {
    torch.nn.functional.linear: ("linear", ("input", "weight", "bias"), {"bias": None}),
    torch.nn.functional.conv2d: ("conv2d", ("input", "weight", "bias", "stride", "padding",
                                            "dilation", "groups"),
                                 {"bias": None, "stride": 1, "padding": 0, "dilation": 1,
                                  "groups": 1}),
}
"""Functional layers with weights (``F.linear(x, self.w, self.b)``, ``F.conv2d(x,
self.weight, ...)``): analysed as ``nn.Linear`` / ``nn.Conv2d`` when their weights are
parameters or buffers of the model (watched for changes like a layer's): name, argument
names, defaults."""


def _weighted_op(node: fx.Node, values: dict[str, object], dep: set[str], consts: set[str],
                 name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Op:
    """The op of an ``F.linear`` / ``F.conv2d`` call (:data:`_WEIGHTED`) on the chain.

    Raises:
        NotImplementedError: with the reason it is not supported and the fix.
    """
    fname, names, defaults = _WEIGHTED[node.target]
    layer = "nn.Linear" if fname == "linear" else "nn.Conv2d"
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        raise NotImplementedError(f"F.{fname} with arguments lipbound does not read")
    args = defaults | dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    x = args.get("input")
    if not isinstance(x, fx.Node) or x.name not in dep:
        raise NotImplementedError(f"the chain's tensor is not the input of F.{fname}")
    tensors: dict[str, Tensor | None] = {}
    for k in ("weight", "bias"):
        a = args.get(k)
        if a is None and k == "bias":
            tensors[k] = None
            continue
        if not isinstance(a, fx.Node) or a.name not in consts \
                or not isinstance(values.get(a.name), Tensor):
            what = f"'{a.name}'" if isinstance(a, fx.Node) else repr(a)
            raise NotImplementedError(
                f"its {k} {what} is not a parameter or registered buffer of the model "
                "(possibly through .view / .reshape / .unsqueeze); a weight computed in "
                "forward (self.w * 2) or held as a plain tensor attribute (also a view of a "
                "parameter: self.P = self.w[:, :]) is not read, nor "
                f"watched for changes: use an {layer} module, or register the tensor with "
                "nn.Parameter / self.register_buffer")
        tensors[k] = values[a.name]
    others = {k: v for k, v in args.items() if k not in ("input", "weight", "bias")}
    bad = [k for k, v in others.items()
           if isinstance(v, fx.Node) or (isinstance(v, (list, tuple))
                                         and any(isinstance(e, fx.Node) for e in v))]
    if bad:
        raise NotImplementedError(f"F.{fname}'s {', '.join(bad)} computed in forward; use "
                                  f"an {layer} module")
    w, b = tensors["weight"], tensors["bias"]
    if not w.is_floating_point() or (b is not None and not b.is_floating_point()):
        raise NotImplementedError(f"F.{fname} with non-floating-point weights")
    if fname == "linear":
        return linear_op(name, in_shape, w, b)
    if w.dim() != 4 or len(in_shape) != 3:
        raise NotImplementedError(f"F.conv2d with a weight of shape {tuple(w.shape)} on a "
                                  f"per-sample input of shape {tuple(in_shape)}")
    return conv2d_op(name, in_shape, out_shape, w, b, others["stride"], others["padding"],
                     others["dilation"], others["groups"])


class _OneLayer(nn.Module):
    """A model that is itself a layer with a rule (``nn.Dropout``, ``nn.BatchNorm1d`` as the
    whole model), held as the child ``model``: torch.fx traces the root module's own forward
    (``F.dropout``, ``F.batch_norm``, with no rule), never as a leaf (since session 22; such
    models were refused, or untraceable, though the same layer in a ``Sequential`` is
    analysed). The wrapper is in eval mode; the model is left as it is."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.model = layer
        self.training = False  # (its own flag only: the layer's is the user's)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def traced_graph(model: nn.Module, input_shape: Sequence[int]
                 ) -> tuple[fx.GraphModule, nn.Module, _ShapeRecorder, Tensor, tuple[int, ...]]:
    """The checks on ``model`` and its ``torch.fx`` graph, run once on a zero batch of two
    inputs: ``(graph module, traced root, recorder of every node's value, the example
    input, the checked input shape)``. The first part of :func:`trace_model`, shared with the
    intake of residual networks (:mod:`lipbound.residual_graph`).

    Raises:
        InputError: model in training mode, bad tensors, a forward that fails.
        UnsupportedModelError: an untraceable forward, hooks, several inputs.
    """
    input_shape = check_input_shape(input_shape)
    model = unwrap_model(model)  # DataParallel / torch.compile: the module they run
    problem = wrapper_problem(model)  # (before the eval check: such a model has no eval())
    if problem is not None:
        raise InputError(problem)
    check_eval_mode(model)
    check_tensors(model)
    check_finite_parameters(model)
    check_batchnorm(model)
    check_hooks(model)
    # a model that is itself one layer with a rule is traced as the child of a wrapper
    # (which calls it as model(x), with its defaults)
    root = _OneLayer(model) if module_rule(model) is not None else model
    defaults = _default_arguments(model) if root is model else None
    own = set(model.__dict__)
    try:
        try:
            graph = _Tracer().trace(root, concrete_args=defaults)
            if defaults:
                _drop_default_inputs(graph)
        except Exception as exc:  # fx raises many types; all mean the same to the user
            raise UnsupportedModelError([(
                type(model).__name__, "untraceable forward",
                f"torch.fx could not trace it: {type(exc).__name__}: {exc}. Make forward a "
                "straight chain of layers without data-dependent control flow, or pass an "
                "nn.Sequential")]) from exc
        gm = fx.GraphModule(root, graph)  # (copies the constants it needs)
    finally:
        # torch.fx stores the tensors a forward makes or views (``self.std.view(...)``) on
        # the traced module as ``_tensor_constant<i>``: taken back, the model stays the user's
        for k in [k for k in model.__dict__ if k not in own and k.startswith("_tensor_constant")]:
            del model.__dict__[k]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError([(
            type(model).__name__, f"{len(inputs)} inputs",
            "forward takes " + ", ".join(n.name for n in inputs) + "; lipbound analyses "
            "models with one input: wrap the model so that it takes a single tensor")])

    dtype, device = model_dtype_device(model)
    rec = _ShapeRecorder(gm)
    example = torch.zeros(2, *input_shape, dtype=dtype, device=device)
    try:
        with torch.no_grad():
            rec.run(example)
    except Exception as exc:
        # a layer returning a tuple (MaxPool2d(return_indices=True)) breaks the next one:
        # run again passing on the tuples' first elements, to report it with the others
        tuples = frozenset(n for n, v in rec.values.items() if isinstance(v, tuple)
                           and v and isinstance(v[0], Tensor))
        rerun = _ShapeRecorder(gm, tuples) if tuples else None
        if rerun is not None:
            try:
                with torch.no_grad():
                    rerun.run(example)
            except Exception:
                rerun = None
        if rerun is None:
            raise _run_failure(model, input_shape, exc, rec.current, dtype, device) from exc
        rec = rerun

    return gm, root, rec, example, input_shape


def trace_model(model: nn.Module, input_shape: Sequence[int], *,
                notes: list[str] | None = None) -> list[Op]:
    """Trace ``model`` and return its chain of analysed ops (float64 parameter copies).

    Args:
        model: a module in eval mode mapping ``(N, *input_shape)`` to ``(N, ...)``.
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``.
        notes: a list to which caveats about the analysis are appended (a float32 model
            whose own forward pass differs from the chain by its float32 rounding).

    Raises:
        InputError: model in training mode.
        UnsupportedModelError: listing every unsupported node at once.
    """
    gm, root, rec, example, input_shape = traced_graph(model, input_shape)
    model = unwrap_model(model)
    dtype, device = model_dtype_device(model)
    problems: list[tuple[str, str, str]] = []
    ops: list[Op] = []
    current: fx.Node | None = None  # the node that carries the chain's tensor
    consumed: set[str] = set()

    def shape_of(node: fx.Node) -> tuple[int, ...] | None:
        v = rec.values.get(node.name)
        return tuple(v.shape) if isinstance(v, Tensor) else None

    dep, consts = _input_dependence(gm, root, rec.values)
    sizes = _sizes(gm, rec.values, dep)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                problems.append((f"input '{node.name}'", "second input", "one input only"))
            current = node
            continue
        if node.op == "get_attr" or node.name in consts:
            continue  # (a constant's uses are checked where it meets the chain)
        if node.op == "output":
            outs = node.args[0]
            if outs is not current:
                problems.append(("model output", "output", "the output must be the last "
                                 "tensor of the chain (a single tensor, not a tuple/dict; "
                                 "for a model returning (logits, features), analyse a module "
                                 "whose forward returns model(x)[0])"))
            continue
        shape = shape_of(node)
        arith = arith_kind(node.op, node.target)
        weighted = node.op == "call_function" and node.target in _WEIGHTED \
            and node.target not in FUNCTION_RULES  # (unless a rule of the user's takes it)
        if arith is not None or weighted:
            # arithmetic with a constant: the chain is the operand that depends on the input
            # (a size of it, x.size(1), is a number)
            tensor_inputs = [a for a in node.all_input_nodes
                             if a.name in dep and a.name not in sizes]
        else:
            tensor_inputs = [a for a in node.all_input_nodes if shape_of(a) is not None]
        if shape is None:
            # shape queries like x.size(0) are fine; anything else producing a non-tensor
            # is not part of a chain we can analyse
            if node.op == "call_method" and node.target in AUXILIARY_METHODS:
                continue
            if sizes.get(node.name) == "const":
                continue  # (arithmetic on per-sample sizes: x.size(1) ** 0.5)
            if node.op == "call_function" and node.target in (getattr, operator.getitem) \
                    and len(node.args) > 1 and node.args[1] in ("shape",):
                continue
            if (_device_of(node) or _float_dtype_of(node, rec.values)) and all(
                    u.op == "call_method" and u.target == "to" or u.name not in dep
                    for u in node.users):
                # (x.device / a float x.dtype, read by .to(...): no value; or by a tensor
                # made in forward, torch.tensor(..., device=x.device), refused itself)
                continue
            if node.op == "call_function" and node.target is operator.getitem \
                    and all(shape_of(a) is None for a in node.all_input_nodes):
                continue
            where, kind = _describe(node, gm)
            problems.append((where, kind, "produces a non-tensor value"))
            continue
        if len(shape) == 0:
            # a 0-d tensor (e.g. x.sum(), x.mean(), x.norm()): a reduction over the whole
            # batch, not a per-sample layer; the chain's tensor stays the current one
            where, kind = _describe(node, gm)
            problems.append((where, kind, "produces a scalar (0-d tensor), e.g. a reduction "
                             "over the whole batch; a chain maps (N, ...) to (N, ...)"))
            continue
        where, kind = _describe(node, gm)
        if node.name not in dep and node.op in ("call_function", "call_method"):
            # (not the chain: it would be refused where it meets the chain, if ever)
            problems.append((where, kind, "computes a tensor from the model's constants in "
                             "forward (it does not depend on the input): lipbound reads "
                             "constants only as parameters or registered buffers of the "
                             "model, possibly through .view / .reshape / .unsqueeze; store "
                             "the tensor as one (nn.Parameter, self.register_buffer)"))
            continue  # (the chain's tensor stays the current one)
        if len(tensor_inputs) > 1 and current in tensor_inputs \
                and all(a is current or a.name not in dep for a in tensor_inputs):
            # (x @ self.w, torch.matmul(x, self.w), torch.addmm(b, x, w): a product with the
            # model's tensors that no rule reads; not a residual connection)
            if _clamp_from_call(node.target if node.op == "call_function"
                                else str(node.target), (), {}) is not None:
                problems.append((where, kind, "a clamp with tensor bounds: only numbers are "
                                 "supported as min / max (for per-unit bounds, write "
                                 "lo + relu(x - lo) with lo a registered buffer)"))
                current = node
                continue
            problems.append((where, kind, "computes with the chain's tensor and a tensor of "
                             "the model's own (a weight?) through an operation lipbound has "
                             "no rule for: write a product with a weight as F.linear(x, "
                             "self.w, self.b) (x @ self.w.t() + self.b) or use nn.Linear / "
                             "nn.Conv2d"))
            current = node
            continue
        if len(tensor_inputs) == 1 and tensor_inputs[0] is not current:
            problems.append((where, kind, "not a chain: a branch (its input also feeds "
                             "another layer; parallel branches, joined by torch.cat or a "
                             "residual addition, are not supported)"))
            current = node
            continue
        if len(tensor_inputs) != 1:
            problems.append((where, kind, "not a chain: takes "
                             f"{len(tensor_inputs)} tensor input(s) / branches off the chain "
                             "(residual or multi-input connections are not supported)"))
            current = node
            continue
        if current is not None and current.name in consumed:
            problems.append((where, kind, "the chain's tensor is used twice (branching)"))
        consumed.add(current.name)
        in_v = rec.values[current.name] if current.op != "placeholder" else example
        in_shape = tuple(in_v.shape)
        if in_shape[0] != 2 or shape[0] != 2:
            problems.append((where, kind, "mixes the batch dimension"))
            current = node
            continue
        name = str(node.target) if node.op == "call_module" else node.name
        rule = None
        module: nn.Module | None = None
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            rule = module_rule(module)
        elif node.op == "call_function":
            rule = FUNCTION_RULES.get(node.target)
            if rule is not None:
                kwargs = dict(node.kwargs)
                args = tuple(node.args[1:])
                module = _module_from_call(node.target, args, kwargs)
        elif node.op == "call_method":
            rule = METHOD_RULES.get(str(node.target))
            if rule is clamp_rule:
                module = _clamp_from_call(str(node.target), tuple(node.args[1:]),
                                          dict(node.kwargs))
            if rule is spatial_mean_rule:
                module = SpatialMean.from_call(tuple(node.args[1:]), dict(node.kwargs))
            if rule is None and node.target == "to" and _moves_only(node, rec.values):
                rule = identity_rule
            if node.target == "view" and rule is reshape_rule and any(
                    isinstance(a, torch.dtype)
                    for a in (*node.args[1:], *node.kwargs.values())):
                # x.view(torch.int32) reinterprets the bits, not a reshape (since session
                # 22; was analysed as a reshape, caught only by the check of the chain)
                problems.append((where, kind, "x.view(dtype) reinterprets the bits as "
                                 "another dtype (not a reshape); use x.to(dtype) for a cast"))
                current = node
                continue
        squeezed = _squeezes_batch(node, len(in_shape))
        if squeezed and rule is reshape_rule:
            # (at the batch of 2 it traces with, the batch dimension stays; at a batch of
            # one, the analysed inputs', it would go)
            problems.append((where, kind, f"{squeezed} also removes the batch dimension of a "
                             "batch of one input; name the dimension(s) to remove, e.g. "
                             "x.squeeze(1) or x.squeeze(-1)"))
            current = node
            continue
        if weighted or arith is not None:
            try:
                op = _weighted_op(node, rec.values, dep, consts, name, in_shape[1:],
                                  shape[1:]) if weighted else \
                    _arith_op(arith, node, rec.values, dep, consts, name, in_shape[1:],
                              shape[1:], sizes)
            except NotImplementedError as exc:
                what = "call" if weighted else "arithmetic"
                problems.append((where, kind, f"unsupported {what}: {exc}"))
                current = node
                continue
            ops.append(op)
            current = node
            continue
        if rule is None:
            detail = _cast_detail(node, rec.values) or ""
            hint = unsupported_hint(node, module, current is not None
                                    and current.op == "placeholder")
            if module is not None:
                detail = repr(module).split("\n")[0][:80]
                if hint and node.op == "call_module":
                    detail = f"{detail}: {hint}"
                elif hint:
                    detail = hint
                patched = [n for n in _COMPUTING_METHODS if n in vars(module)]
                if patched and node.op == "call_module":
                    detail = (f"{', '.join(patched)} replaced on the instance: lipbound "
                              "would analyse the class's computation, not this one; remove "
                              "the override or rewrite it with supported layers")
                elif node.op == "call_module" and not _class_own(type(module)):
                    detail = ("a method computing its output (forward, ...) was replaced on "
                              f"the class {type(module).__name__} (or a base): lipbound "
                              "analyses the original computation; restore the class's method "
                              "or write a subclass of your own")
            problems.append((where, kind, detail or hint or "no rule for this operation"))
            current = node
            continue
        try:
            op = rule(module, name, in_shape[1:], shape[1:])
        except NotImplementedError as exc:
            problems.append((where, kind, f"unsupported configuration: {exc}"))
            current = node
            continue
        new_ops = list(op) if isinstance(op, (list, tuple)) else [op]  # (a clamp: a chain)
        for o in new_ops:
            if isinstance(o, ZeroPadOp):  # (named in an error if it cannot be folded)
                o.where, o.what = where, kind
        if any(o.kind == "reshape" and math.prod(o.in_shape) != math.prod(o.out_shape)
               for o in new_ops):
            problems.append((where, kind, "reshape changes the number of elements"))
        ops.extend(new_ops)
        current = node
    for node in gm.graph.nodes:  # tuples passed on by the rerun above, if no rule refused them
        if node.name in rec.unwrap:
            where, kind = _describe(node, gm)
            if not any(p[0] == where for p in problems):
                problems.append((where, kind, "returns a tuple, not a tensor"))
    # zero padding right before a convolution: that convolution with the larger padding
    ops, pad_problems = fold_zero_padding(ops)
    problems.extend(pad_problems)
    if problems:
        raise UnsupportedModelError(problems)
    ops = [op.to(device) for op in ops]
    _verify(ops, model, example, notes)
    return ops


def chain_forward(ops: list[Op], x: Tensor) -> Tensor:
    """Run the chain of ops (float64)."""
    for op in ops:
        x = op.forward(x)
    return x


#: chains with at most this many activations per sample (the zoo's MNIST and CIFAR-10 nets,
#: not AlexNet's 1.1M) are checked at four more inputs than the first
_VERIFY_MORE_BELOW = 1_000_000

#: safety factor on the first-order worst-case bound of a float32 forward pass's rounding
#: that may explain a float32 model's gap to the chain (:func:`float32_rounding_ratio`)
_F32_SAFETY = 4.0

#: at most this many output entries beyond the check's tolerance are explained by rounding
#: (one backward pass each); more keep the model refused
_F32_ROWS = 64

_U32 = 2.0 ** -24  # unit roundoff of float32

#: safety factor on the first-order worst-case bound of a float64 forward pass's rounding
#: (:func:`float64_rounding_ratio`: a diagnostic in refusals, not a reason to accept)
_F64_SAFETY = 4.0

_U64 = 2.0 ** -53  # unit roundoff of float64


def _verify(ops: list[Op], model: nn.Module, example: Tensor,
            notes: list[str] | None = None) -> None:
    """Guard against a rule misreading a layer: the float64 chain must reproduce the model.

    Checked at a standard-normal input ``x``; a chain of moderate size
    (:data:`_VERIFY_MORE_BELOW` activations) also at ``-x``, ``1e-3 x`` and ``±1e3 x``
    (other ReLUs on; the biases' pattern; ReLUs whose biases keep them off at ``x``), each a
    batch of two samples: a misread layer behind ReLUs that are all off at ``x`` would pass that
    check alone. At a scaled input where the output of a model that does not compute in
    float64 is not finite (a float32 model overflows there: weights near float32's range, or
    the check's ``1e3`` times its usual activations), its float64 copy is compared with the
    chain instead (:func:`_verify_copy`; before session 26 the point was skipped, and a
    misread layer behind ReLUs off at ``x`` then went unseen). Skipped still: a float64 model
    whose output is not finite there, and a model whose float64 copy's output is not finite
    there (or whose copy cannot be made or run, or computes in another dtype): no finite
    reference of the model's function exists at that point, and refusing would refuse models
    that are finite at every input they are used on for an input the check chose.

    A float32 model within its tolerance (1e-3 of its outputs) at a point is, for a chain of
    moderate size, also checked there at float32's resolution (:func:`_verify_within`: its
    float64 copy matches the chain to 1e-8, or its own gap is within its float32 rounding;
    session 26: a layer misread by 5e-4 passed the float32 tolerance at every point, and a
    certified bound was below the model's constant). Larger chains (VGG-16, AlexNet) are
    not: their float64 copy costs a second model's memory at every intake.

    A float32 model whose gap to the chain is explained by its float32 rounding (see
    :func:`_verify_at`) is accepted, with a note appended to ``notes``. A float64 model whose
    gap is explained only by its float64 rounding is not (:func:`float64_rounding_ratio`
    says why); its refusal says so.
    """
    from .lower._common import one_float64_copy  # (lower imports this module)

    gen = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.randn(example.shape, generator=gen, dtype=torch.float64).to(example.device)
    moderate = sum(math.prod(op.out_shape) for op in ops) <= _VERIFY_MORE_BELOW
    with one_float64_copy(model):  # (a float32 model's explanation: one float64 copy)
        gaps = [_verify_at(ops, model, example, x, "a random standard-normal test input",
                           True, moderate)]
        if moderate:
            for c in (-1.0, 1e-3, 1e3, -1e3):
                gaps.append(_verify_at(ops, model, example, x * c,
                                       f"{c:g} times the random test input", False, True))
    explained = [g for g in gaps if g is not None]
    if explained and notes is not None:
        notes.append(
            "float32 rounding: this float32 model's own forward pass differs from the "
            "analysed function by more than the chain check's float32 tolerance (up to "
            f"{max(explained):.2g} relative to its largest output + 1 at the check's random "
            "inputs, where 1e-3 is tolerated): large weights or activations summed with "
            "cancellation. The gap is within a bound on its float32 rounding and a float64 "
            "copy of the model matches the analysed function, so the bounds are of its "
            "float32 weights in exact arithmetic (the function model.double() computes), not "
            "of its float32 forward pass")


def _verify_at(ops: list[Op], model: nn.Module, example: Tensor, x: Tensor, what: str,
               first: bool, with_copy: bool = False) -> float | None:
    """One check of :func:`_verify`, at ``x`` (float64, the example's shape); only the
    ``first`` refuses a model whose output is not finite (at the others, a model that does
    not compute in float64 is compared through its float64 copy there: :func:`_verify_copy`).
    With ``with_copy``, a float32 model within its tolerance is also checked at float32's
    resolution (:func:`_verify_within`).

    Returns ``None`` when the chain reproduces the model within the check's tolerance; for a
    float32 model that it reproduces only within the model's own float32 rounding (weights of
    1e2-1e6 summed with cancellation: session 24's fuzz), the largest gap relative to the
    output's scale (the model is accepted: the chain is its weights in exact arithmetic).
    That needs both a float64 copy of the model matching the chain to float64 rounding
    (:func:`float64_copy_matches`: the rules read every layer right) and the gap within
    :data:`_F32_SAFETY` times a first-order worst-case bound on the float32 forward pass's
    rounding (:func:`float32_rounding_ratio`: the float32 model computes the same function
    up to its rounding). Otherwise the model is refused."""
    # the tolerance below is float32's: no TF32 convolutions / products on CUDA
    with torch.no_grad(), exact_float32(example.device):
        ref = model(x.to(example.dtype, copy=True)).to(torch.float64)  # (model may write in)
        got = chain_forward(ops, x)
    if ref.shape != got.shape:
        raise UnsupportedModelError([("model", "chain", f"output shape {tuple(got.shape)} "
                                      f"differs from the model's {tuple(ref.shape)}")])
    dtype = str(example.dtype).removeprefix("torch.")
    if not first and not bool(torch.isfinite(ref).all()):
        if example.dtype == torch.float64:  # (no finite reference: see _verify)
            log.info("chain check on %s skipped: the float64 model's output is not finite",
                     what)
        else:
            _verify_copy(ops, model, x, got, what, f"there the {dtype} model's output is not "
                         "finite (it overflows), and")
        return None
    if not bool(torch.isfinite(ref).all()):
        raise InputError(f"the model's output on {what} is not "
                         f"finite ({'nan' if bool(ref.isnan().any()) else 'inf'}) in "
                         f"{str(example.dtype).removeprefix('torch.')}: its weights overflow "
                         "the floating-point range, so no bound would be meaningful; rescale "
                         "the weights (or the input) so that the forward pass stays finite")
    if not bool(torch.isfinite(got).all()):
        raise InputError(f"the float64 chain's output on {what} is "
                         "not finite: the weights overflow float64; rescale them")
    scale = float(ref.abs().max()) + 1.0
    err = float((ref - got).abs().max())
    tol = 1e-3 if example.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
    if math.isfinite(err) and err <= tol * scale:
        if with_copy and example.dtype == torch.float32:
            _verify_within(ops, model, x, ref, got, what, err, tol * scale)
        return None
    if example.dtype == torch.float32 and float64_copy_matches(model, x, got):
        gap, worst = float32_rounding_ratio(model, x, ref, lambda v: chain_forward(ops, v),
                                            tol * scale)
        if worst <= 1.0:
            log.info("float32 model accepted: its gap to the chain (%.3g on %s, scale "
                     "%.3g) is within its float32 rounding (%.2g of the bound)", gap, what,
                     scale, worst)
            return gap / scale
        beyond = ("more than the float32 rounding of its forward pass explains (a first-"
                  f"order bound, times {_F32_SAFETY:g}; {worst:.3g} times that)"
                  if math.isfinite(worst) else "more than this check's float32 tolerance, "
                  "and no bound on its float32 rounding could be formed")
        raise UnsupportedModelError([("model", "chain", f"the float32 model's output "
                                      f"differs from the analysed chain by {err:.3g} on "
                                      f"{what} ({tol:g} of {scale:.3g} is the check's "
                                      f"float32 tolerance), {beyond}, while a float64 copy "
                                      "of the model matches the chain to float64 rounding: "
                                      "its float32 forward pass computes something else "
                                      "than its float64 copy (values below float32's "
                                      "normal range, float32 constants, a unit moved across "
                                      "its kink by the rounding). Analyse the float64 model "
                                      "(model.double(), with float64 inputs): lipbound "
                                      "certifies the same weights in exact arithmetic")])
    detail = (_rounding_detail(model, x, ref, ops, tol * scale)
              if example.dtype == torch.float64 else "")
    if detail:  # (float64 rounding, measured and refused: session 26)
        raise UnsupportedModelError([("model", "chain", f"the analysed chain does not "
                                      f"reproduce the model's output on {what} (max error "
                                      f"{err:.3g}; 1e-8 of {scale:.3g} is tolerated){detail}")])
    raise UnsupportedModelError([("model", "chain", f"the analysed chain does not "
                                  f"reproduce the model's output (max error {err:.3g}); "
                                  "a layer has behaviour lipbound does not model (or a "
                                  "float64 model casts to float32 inside its forward: "
                                  "its rounding exceeds this check's float64 tolerance; "
                                  "remove the cast or run the model in float32)")])


def _gaps_beyond(ref: Tensor, got: Tensor, limit: float
                 ) -> tuple[Tensor, float, Tensor, float | None]:
    """The gaps ``|ref - got|`` (flat, float64, CPU), the largest, the indices of those above
    ``limit``, and the ratio to return at once (``None``: go on): ``inf`` when a gap is not
    finite or more than :data:`_F32_ROWS` exceed ``limit`` (no bound is formed), 0 when
    none does. The common start of :func:`float32_rounding_ratio` and
    :func:`float64_rounding_ratio`."""
    gap = (ref.detach().cpu().to(torch.float64).reshape(-1)
           - got.detach().cpu().to(torch.float64).reshape(-1)).abs()
    largest = float(gap.max()) if gap.numel() else 0.0
    if not bool(torch.isfinite(gap).all()):
        return gap, largest, gap[:0].long(), math.inf
    idx = (gap > limit).nonzero().reshape(-1)
    if idx.numel() == 0:
        return gap, largest, idx, 0.0
    if idx.numel() > _F32_ROWS:
        return gap, largest, idx, math.inf
    return gap, largest, idx, None


def _growth(u: float) -> Callable[[int], float]:
    """``γ_n / u = n / (1 - n u)`` (Higham, §3.1) for the unit roundoff ``u``; ``inf`` from
    ``n u >= 1/2``."""
    def growth(n: int) -> float:
        nu = n * u
        return n / (1.0 - nu) if nu < 0.5 else math.inf
    return growth


def float32_rounding_ratio(model: nn.Module, x: Tensor, ref: Tensor,
                           chain: Callable[[Tensor], Tensor], limit: float) -> tuple[float, float]:
    """How far a float32 model's gap to the analysed chain is from its own float32 rounding.

    ``ref`` is the model's output at ``x`` rounded to float32 (``x``: float64, on the model's
    device), ``chain`` the analysed function (float64 in, float64 out, any device), evaluated
    at that rounded input (the one the model ran on). For every output entry whose gap to
    ``ref`` exceeds ``limit`` (the check's tolerance), ``gap_j`` is compared with
    ``_F32_SAFETY u e_j``: ``u = 2^-24`` and ``e_j`` the first-order running error of the
    float32 forward pass with the worst-case growth ``γ_n / u`` of a sum of ``n`` terms
    (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), computed by
    :func:`lipbound.lower._common.forward_running_errors` (the machinery of the lower
    bounds' rounding allowance) with the gradients along the float32 trajectory and along
    that of a float64 copy of the model, the larger of the two. Returns ``(largest gap,
    largest gap_j / (_F32_SAFETY u e_j))``; the second is 0 when no entry exceeds ``limit``
    (the gap was the input's rounding) and ``inf`` when no bound could be formed (more than
    :data:`_F32_ROWS` such entries, no rounding operation seen, a failure).

    First order: the gradient between the two trajectories is not bounded (a unit that the
    rounding moves across its kink is on in one of them; several such units, or a
    max-pooling window whose maximum changes, are covered only by the safety factor), and
    values below float32's normal range (absolute rounding) are not covered at all; such a
    model stays refused. The rounding operations are those
    :func:`lipbound.lower._common._op_terms` recognises; one it does not makes the bound
    smaller, never larger (the model is then refused too).
    """
    from .lower._common import float64_model, forward_running_errors  # (lower imports graph)

    x32 = x.to(torch.float32)
    with torch.no_grad():
        got32 = chain(x32.to(torch.float64))
    gap, largest, idx, early = _gaps_beyond(ref, got32, limit)
    if early is not None:  # (e.g. an output that overflows float32: no bound)
        return largest, early
    growth = _growth(_U32)

    rows = idx.to(x.device)
    # the gradients along the float32 trajectory and along the float64 copy's (the exact
    # one, to rounding): a unit that the rounding moves across its kink is on in one of them
    best = torch.zeros(idx.numel(), dtype=torch.float64)
    for m, xin in ((model, x32), (float64_model(model), x32.to(torch.float64))):
        if m is None:
            continue
        try:
            with exact_float32(x.device):
                e = forward_running_errors(m, xin, lambda y: y[rows], growth)
        except Exception as exc:  # noqa: BLE001 - no estimate from this trajectory
            log.debug("no float32 rounding bound (%s: %s)", type(exc).__name__, exc)
            continue
        e = torch.tensor(e, dtype=torch.float64)
        if e.shape == best.shape:  # (a gradient that overflows float32: not counted)
            best = torch.maximum(best, torch.where(torch.isfinite(e), e, 0.0))
    allow = _F32_SAFETY * _U32 * best
    if not bool(((allow > 0) & torch.isfinite(allow)).all()):
        return largest, math.inf
    return largest, float((gap[idx] / allow).max())


class _Chain(nn.Module):
    """The chain of ops as a module (its forward pass seen by the running-error machinery,
    :func:`lipbound.lower._common.forward_running_errors`)."""

    def __init__(self, ops: list[Op]):
        super().__init__()
        self.chain_ops = ops

    def forward(self, x: Tensor) -> Tensor:
        return chain_forward(self.chain_ops, x)


def float64_rounding_ratio(model64: nn.Module, x: Tensor, ref: Tensor, ops: list[Op],
                           limit: float) -> tuple[float, float]:
    """How far a float64 model's gap to the analysed chain is from the two forward passes'
    own float64 rounding: a diagnostic for the chain check's refusals (session 26).

    ``model64`` computes in float64 (a float64 model, or a float32 model's float64 copy),
    ``ref`` its output at ``x`` (float64, on its device). For every output entry whose gap to
    the chain exceeds ``limit`` (the check's tolerance), ``gap_j`` is compared with
    ``_F64_SAFETY u (e_j + c_j)``: ``u = 2^-53``, ``e_j`` and ``c_j`` the first-order running
    errors of the model's and of the chain's float64 forward passes with worst-case growth
    ``γ_n / u`` (Higham, §3.1; the machinery of :func:`float32_rounding_ratio`), each along
    its own trajectory. If the chain is the model's function in exact arithmetic,
    ``gap_j <= u (e_j + c_j)`` to first order. Returns ``(largest gap, largest gap_j /
    allowance_j)``: 0 when no entry exceeds ``limit``, ``inf`` when no bound could be formed
    (more than :data:`_F32_ROWS` such entries, no rounding operation seen, a failure).

    Why a ratio <= 1 does not make the check accept a float64 model (as
    :func:`float32_rounding_ratio` does a float32 one, whose float64 copy is the independent,
    more precise reference): here nothing more precise than float64 exists, and a misread
    layer whose effect is below the allowance passes. Measured on session 26's fuzz-style
    models (weights scaled by 1e2-1e6, pairs of equal units whose difference carries the
    output): all 9 of 3000 refused through cancellation had ratios <= 0.04, and in 4 of them a
    whole hidden layer read at half its weights stayed within the allowance at all five
    check points (the allowance, a worst-case bound, was 25 to 4e4 times the gaps measured).
    (The ops' rigorous bounds, :meth:`~lipbound.ops.base.Op.forward_error`, are larger
    still: 1e5 times this one on the fuzz's seed 417.)
    """
    from .lower._common import forward_running_errors  # (lower imports this module)

    with torch.no_grad():
        got = chain_forward(ops, x)
    gap, largest, idx, early = _gaps_beyond(ref, got, limit)
    if early is not None:
        return largest, early
    growth = _growth(_U64)

    rows = idx.to(x.device)
    try:
        e = [torch.tensor(forward_running_errors(m, x, lambda y: y[rows], growth),
                          dtype=torch.float64) for m in (model64, _Chain(ops))]
    except Exception as exc:  # noqa: BLE001 - no bound: the model stays refused
        log.debug("no float64 rounding bound (%s: %s)", type(exc).__name__, exc)
        return largest, math.inf
    allow = _F64_SAFETY * _U64 * (e[0] + e[1])
    if allow.shape != idx.shape or not bool(((allow > 0) & torch.isfinite(allow)).all()):
        return largest, math.inf
    return largest, float((gap[idx] / allow).max())


def _float64_copy_output(model: nn.Module, x: Tensor) -> Tensor | None:
    """The output of a float64 copy of ``model`` at ``x`` (float64, on the model's device),
    flattened per sample, on the CPU; ``None`` where the copy cannot be made or run or does
    not compute in float64 (a cast inside its forward)."""
    from .lower._common import float64_model  # (lower imports this module)

    m64 = float64_model(model)
    if m64 is None:
        return None
    try:
        with torch.no_grad():
            ref = m64(x.clone())
    except Exception:  # noqa: BLE001 - no reference then
        return None
    if not isinstance(ref, Tensor) or ref.dtype != torch.float64:
        return None
    return ref.detach().cpu().reshape(ref.shape[0], -1)


def _flat(got: Tensor) -> Tensor:
    got = got.detach().cpu().to(torch.float64)
    return got.reshape(got.shape[0], -1) if got.dim() else got


def float64_copy_matches(model: nn.Module, x: Tensor, got: Tensor) -> bool:
    """Whether a float64 copy of ``model`` reproduces the chain's output ``got`` at ``x``
    (float64, on the model's device) to float64 rounding (1e-8 of its scale, outputs compared
    flattened per sample): a float32 model that fails a chain check is accepted only then
    (the rules read its layers right: see :func:`_verify_at`). False where the copy cannot
    be made or run."""
    ref = _float64_copy_output(model, x)
    got = _flat(got)
    if ref is None or ref.shape != got.shape or not bool(torch.isfinite(ref).all()):
        return False
    scale = float(ref.abs().max()) + 1.0
    return float((ref - got).abs().max()) <= 1e-8 * scale


def _verify_copy(ops: list[Op], model: nn.Module, x: Tensor, got: Tensor, what: str,
                 why: str) -> None:
    """A scaled check point of :func:`_verify` at which the output of a model that does not
    compute in float64 overflows: its float64 copy (the same weights) is compared with the
    chain ``got`` at float64's tolerance (1e-8 of its largest output + 1), and the model
    refused if they differ (``why`` says why the copy is consulted, for the message).
    Nothing is checked where the copy gives no finite float64 output (it cannot be made or
    run, computes in another dtype, or overflows: see :func:`_verify`)."""
    ref = _float64_copy_output(model, x)
    if ref is None or not bool(torch.isfinite(ref).all()):
        log.info("chain check on %s: no finite float64 copy's output to compare", what)
        return
    if not bool(torch.isfinite(got).all()):
        raise InputError(f"the float64 chain's output on {what} is "
                         "not finite: the weights overflow float64; rescale them")
    got = _flat(got)
    if ref.shape != got.shape:
        raise UnsupportedModelError([("model", "chain", f"output shape {tuple(got.shape)} "
                                      "differs from the model's float64 copy's "
                                      f"{tuple(ref.shape)}")])
    scale = float(ref.abs().max()) + 1.0
    err = float((ref - got).abs().max())
    if err <= 1e-8 * scale:
        return
    raise UnsupportedModelError([("model", "chain", f"the analysed chain does not reproduce "
                                  f"the model's function on {what}: {why} its float64 copy's "
                                  f"output differs from the chain's by {err:.3g} (1e-8 of "
                                  f"{scale:.3g} is tolerated)"
                                  f"{_rounding_detail(model, x, ref, ops, 1e-8 * scale)}; a "
                                  "layer has behaviour lipbound does not model")])


def _verify_within(ops: list[Op], model: nn.Module, x: Tensor, ref: Tensor, got: Tensor,
                   what: str, err: float, limit: float) -> None:
    """A check point of :func:`_verify` at which a float32 model is within its tolerance
    (``err <= limit``, 1e-3 of its outputs): a layer misread by less than that would pass
    (session 26: by 5e-4, with a certified bound below the model's constant). The chain is
    compared with the model's float64 copy at 1e-8; where they differ, the float32 model's
    own gap must be within its float32 rounding (:func:`float32_rounding_ratio`, entries
    beyond 1e-8 of its outputs): a copy differs from the chain without a misread when the
    model computes weights in its forward (``weight_norm``, ``spectral_norm``: the chain
    reads the float32 values, the copy recomputes them in float64). Refused when neither
    holds; nothing is checked where the copy gives no finite float64 output or no rounding
    bound can be formed (more than :data:`_F32_ROWS` entries beyond 1e-8, as for a float32
    model with many outputs: the 1e-3 tolerance alone then, as before session 26)."""
    ref64 = _float64_copy_output(model, x)
    if ref64 is None or not bool(torch.isfinite(ref64).all()):
        return
    flat = _flat(got)
    if ref64.shape != flat.shape:
        return
    scale64 = float(ref64.abs().max()) + 1.0
    err64 = float((ref64 - flat).abs().max())
    if err64 <= 1e-8 * scale64:
        return
    scale = float(ref.abs().max()) + 1.0
    _, worst = float32_rounding_ratio(model, x, ref, lambda v: chain_forward(ops, v),
                                      1e-8 * scale)
    if worst <= 1.0 or not math.isfinite(worst):
        if not math.isfinite(worst):
            log.info("chain check on %s: the float64 copy differs from the chain by %.3g and "
                     "no float32 rounding bound could be formed; the float32 tolerance "
                     "alone applies", what, err64)
        return
    raise UnsupportedModelError([("model", "chain", f"the analysed chain does not reproduce "
                                  f"the model's function on {what}: the float32 model's "
                                  f"output is within this check's float32 tolerance ({err:.3g};"
                                  f" {limit:.3g} is tolerated) but {worst:.3g} times a bound "
                                  "on its float32 rounding away from the chain, and its "
                                  f"float64 copy's output differs from the chain's by "
                                  f"{err64:.3g} (1e-8 of {scale64:.3g} is tolerated): a layer "
                                  "lipbound reads differently from the model, by less than "
                                  "the float32 tolerance")])


def _rounding_detail(model: nn.Module, x: Tensor, ref: Tensor, ops: list[Op],
                     limit: float) -> str:
    """For a refusal: whether the float64 gap is within the float64 rounding of the two
    forward passes (:func:`float64_rounding_ratio`), which the check cannot tell apart from a
    misread layer (session 26's measurements: a whole layer's weights read at half their
    value hid under that bound in 4 of the 9 fuzz models that needed it)."""
    from .lower._common import float64_model  # (lower imports this module)

    m64 = float64_model(model)
    if m64 is None:
        return ""
    _, ratio = float64_rounding_ratio(m64, x, ref.to(x.device), ops, limit)
    if not ratio <= 1.0:
        return ""
    return (", which is within a first-order bound on the float64 rounding of the model's "
            "and the chain's forward passes (values summed with cancellation: weights, "
            "biases or activations far larger than the outputs); without a reference more "
            "precise than float64 lipbound cannot tell that rounding from a misread layer "
            "whose effect is as small, so the model is refused: rewrite it with less "
            "cancellation at the check's inputs (x, -x, 1e-3 x, ±1e3 x for a standard-normal "
            "x; e.g. no output computed as the difference of two large, nearly equal units)")


__all__ = ["trace_model", "chain_forward", "check_eval_mode", "MODULE_RULES"]
