"""The affine/ReLU chain of a fully connected ReLU network, for the rival methods.

Every baseline in :mod:`lipbound.baselines` works on networks of the form

    f(x) = W_K relu(W_{K-1} relu(... relu(W_1 x + b_1) ...) + b_{K-1}) + b_K,

given as a list ``[(W_1, b_1), ..., (W_K, b_K)]`` of float64 numpy arrays (``K >= 1``;
``K - 1`` hidden ReLU layers). :func:`fc_layers` reads that list from a
:class:`torch.nn.Module`; :func:`as_fc` accepts either a module or such a list.

Also here: the float64 forward pass and Jacobian of the chain and :func:`safe_spectral_norm`,
the rounding-safe spectral norm every certified baseline uses.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse import csgraph
from torch import fx, nn

from lipbound._modelinfo import model_dtype_device, unwrap_model, wrapper_problem
from lipbound._precision import exact_float32
from lipbound.baselines.fold import fold_axpy, fold_matmul
from lipbound.errors import InputError, LipboundError, UnsupportedModelError
from lipbound.graph import (
    check_finite_parameters,
    check_hooks,
    float32_rounding_ratio,
    float64_copy_matches,
)
from lipbound.ops.registry import _COMPUTING_METHODS, _class_own
from lipbound.spectral import exact_norm
from lipbound.validation import check_eps, check_input_shape, check_plain_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "FCLayers",
    "ConvertedLayers",
    "NotFullyConnectedError",
    "chain_note",
    "converted",
    "is_converted",
    "fc_layers",
    "as_fc",
    "apply_output_map",
    "check_runs_on",
    "check_x0",
    "real_array",
    "check_eps",
    "check_range",
    "product_error",
    "fc_forward",
    "fc_preactivations",
    "pattern_jacobian",
    "safe_spectral_norm",
    "operand",
    "round_up",
    "describe",
    "hidden_widths",
]

#: A fully connected ReLU network: ``[(W_1, b_1), ..., (W_K, b_K)]`` in float64.
FCLayers = list[tuple[np.ndarray, np.ndarray]]

_MACH_EPS = float(np.finfo(np.float64).eps)

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_}


class NotFullyConnectedError(UnsupportedModelError):
    """The model is neither a chain of Linear and ReLU layers nor convertible into one.

    ``nodes`` lists every offending node as ``(where, type, detail)``. ``converting`` is set
    when the exact conversion (:func:`lipbound.baselines.conv_to_fc.relu_chain`) was tried.
    """

    def __init__(self, nodes: list[tuple[str, str, str]], *, converting: bool = False,
                 hint: str = ""):
        self.nodes = list(nodes)
        self.converting = converting
        lines = [f"  - {where}: {kind}" + (f" ({detail})" if detail else "")
                 for where, kind, detail in self.nodes]
        head = ("the rival methods (lipbound.baselines) support fully connected ReLU networks "
                "and conv nets convertible exactly into one; " if converting else
                "the rival methods (lipbound.baselines) support fully connected ReLU networks "
                "only; ")
        LipboundError.__init__(
            self,
            head + f"the model has {len(self.nodes)} unsupported part(s):\n" + "\n".join(lines)
            + "\nsupported: nn.Linear, nn.ReLU / F.relu / torch.relu, nn.Flatten / flatten(1) /"
            " view / reshape, nn.Identity, Dropout (eval mode) and lipbound.Normalize; conv "
            "nets (Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d/2d in eval "
            "mode, and the layers above) are converted into an exact fully connected ReLU "
            "chain when input_shape is known" + (f"; {hint}" if hint else "")
            + "; use lipbound.local_bound / lipbound.global_bound for other networks.",
        )

    def summary(self) -> str:
        """One line: the unsupported parts, for a table row."""
        parts = ", ".join(f"{kind} at {where}" for where, kind, _ in self.nodes[:3])
        more = f" and {len(self.nodes) - 3} more" if len(self.nodes) > 3 else ""
        return parts + more


class ConvertedLayers(list):  # type: ignore[type-arg]
    """:data:`FCLayers` produced by the exact conversion of a conv net (see
    :func:`lipbound.baselines.conv_to_fc.relu_chain`); :func:`chain_note` says so.
    ``from_conv`` is false for a network without convolutions or pooling (a fully connected
    one whose batch norm the conversion folded)."""

    from_conv: bool = True


def converted(layers: Sequence[tuple[np.ndarray, np.ndarray]], *,
              from_conv: bool = True) -> FCLayers:
    """``layers`` marked as the exact FC conversion of a conv net (``from_conv``) or of a
    fully connected net with batch norm."""
    out = ConvertedLayers(layers)
    out.from_conv = from_conv
    return out


class _NotedLayers(list):  # type: ignore[type-arg]
    """:data:`FCLayers` extracted with caveats (:func:`chain_caveats`)."""

    caveats: tuple[str, ...] = ()


def with_caveats(layers: FCLayers, caveats: Sequence[str]) -> FCLayers:
    """``layers`` carrying ``caveats`` (the extraction's: :data:`F32_CHAIN_NOTE`), which
    every rival's result then carries (:func:`chain_caveats`); ``layers`` unchanged when
    there are none."""
    if not caveats:
        return layers
    out = layers if isinstance(layers, (ConvertedLayers, _NotedLayers)) else _NotedLayers(layers)
    out.caveats = tuple(dict.fromkeys((*chain_caveats(layers), *caveats)))
    return out


def chain_caveats(layers: Any) -> tuple[str, ...]:
    """The caveats of the extraction of ``layers`` from a model (session 26: a rival called
    on a float32 model accepted within its own rounding said nothing of it; only
    :func:`lipbound.baselines.compare`'s rows did)."""
    return tuple(getattr(layers, "caveats", ()))


def is_converted(layers: Any) -> bool:
    """Whether ``layers`` came from the exact conversion of a conv net."""
    return isinstance(layers, ConvertedLayers)


def chain_note(layers: FCLayers) -> str:
    """``"fully connected 7-20-30-10"``, or for a converted conv net
    ``"conv net as an exact FC ReLU chain of widths 784-3456-...-10"`` (``"FC net with
    diagonal layers folded, as an exact FC ReLU chain ..."`` when it had no convolution:
    batch norm, normalisation, scaling by constants)."""
    if is_converted(layers):
        what = ("conv net as" if getattr(layers, "from_conv", True)
                else "FC net with diagonal layers folded, as")
        return f"{what} an exact FC ReLU chain of widths {describe(layers)}"
    return f"fully connected {describe(layers)}"


# --------------------------------------------------------------------------- extraction


def _is_normalize(m: nn.Module) -> bool:
    try:
        from lipbound.layers import Normalize
    except ImportError:  # pragma: no cover - lipbound.layers is part of the package
        Normalize = None  # noqa: N806
    if Normalize is not None and isinstance(m, Normalize):
        return True
    return type(m).__name__ == "Normalize" and hasattr(m, "mean") and hasattr(m, "std")


class _ChainTracer(fx.Tracer):
    """fx tracer that keeps Normalize-like modules as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_normalize(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _arg(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _flatten_ok(start: Any, end: Any) -> bool:
    return start == 1 and end == -1


#: the module classes the extraction reads (their parameters, as the class computes)
_READ_CLASSES = (nn.Linear, nn.ReLU, nn.Flatten, nn.Identity, *_DROPOUT)


def _subclass_computing(cls: type) -> type | None:
    """The supported class (:data:`_READ_CLASSES`) that ``cls`` derives from when ``cls``
    changes how the output is computed (``forward``, ...), else ``None``.

    Added in review s22: the extraction read any ``nn.Linear`` subclass that torch.fx keeps as
    a leaf (torch's own, e.g. ``torch.ao.nn.qat.Linear``) as a plain Linear, although its
    forward uses fake-quantized weights: AutoLip then certified 0.0754586 for a model of
    constant 0.0755661 (the chain check at 1e-3 missed it). The analyzer's
    :func:`lipbound.ops.registry.module_rule` already refused such subclasses.
    """
    base = next((c for c in cls.__mro__ if c in _READ_CLASSES), None)
    if base is None or base is cls:
        return None
    if all(getattr(cls, n, None) is getattr(base, n, None) for n in _COMPUTING_METHODS):
        return None
    return base


def _trace_ops(model: nn.Module) -> list[tuple[Any, ...]]:
    """Walk the fx graph of ``model``; return the op chain or raise listing every bad node.

    Ops: ``("linear", W, b)``, ``("normalize", module, where)``, ``("relu",)``,
    ``("reshape",)``.

    torch.fx stores the tensors a forward makes or views (``self.mean.view(1, -1)``) on the
    traced module as ``_tensor_constant<i>``; they are taken back, as in
    :func:`lipbound.graph.trace_model`, so that the model stays the user's (before session
    24 they stayed: an Analyzer of the model then refused it as changed, and a new one as
    computing with a plain tensor attribute, after any rival method had run on it).
    """
    own = set(model.__dict__)
    try:
        return _walk_ops(model)
    finally:
        for k in [k for k in model.__dict__ if k not in own and k.startswith("_tensor_constant")]:
            del model.__dict__[k]


def _walk_ops(model: nn.Module) -> list[tuple[Any, ...]]:
    """The body of :func:`_trace_ops`."""
    tracer = _ChainTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types on untraceable code
        raise NotFullyConnectedError(
            [("forward", "untraceable", f"torch.fx could not trace it: {exc}")]) from exc
    root = tracer.root
    ops: list[tuple[Any, ...]] = []
    bad: list[tuple[str, str, str]] = []
    prev: fx.Node | None = None
    aux: set[fx.Node] = set()  # x.size(...) nodes feeding view/reshape
    for node in graph.nodes:
        where = node.name
        if node.op == "placeholder":
            if prev is not None:
                bad.append((where, "extra input", "the network must take one tensor"))
            prev = node
            continue
        if node.op == "output":
            out = node.args[0]
            if out is not prev:
                bad.append((where, "output", "the output is not the end of a single chain"))
            continue
        if node.op == "call_method" and node.target == "size":
            if node.all_input_nodes == [prev]:
                aux.add(node)
                continue
        inputs = [n for n in node.all_input_nodes if n not in aux]
        if inputs != [prev]:
            bad.append((where, str(node.target), "not part of a single chain of layers"))
            prev = node
            continue
        prev = node
        if node.op == "call_module":
            m = root.get_submodule(str(node.target))
            where = str(node.target)
            replaced = [n for n in _COMPUTING_METHODS if n in vars(m)]
            base = _subclass_computing(type(m))
            if replaced or not _class_own(type(m)):
                bad.append((where, type(m).__name__,
                            f"{', '.join(replaced) or 'forward'} replaced on the "
                            f"{'instance' if replaced else 'class'}: the chain would be the "
                            "original layer's, not this computation"))
            elif base is not None:
                bad.append((where, type(m).__name__,
                            f"a subclass of {base.__name__} with its own forward (e.g. "
                            "fake-quantized weights): the chain would be the plain "
                            f"{base.__name__}'s, not this computation"))
            elif isinstance(m, nn.Linear):
                w = m.weight.detach().cpu().to(torch.float64).numpy().copy()
                b = (m.bias.detach().cpu().to(torch.float64).numpy().copy()
                     if m.bias is not None else np.zeros(w.shape[0]))
                ops.append(("linear", w, b))
            elif isinstance(m, nn.ReLU):
                ops.append(("relu",))
            elif isinstance(m, nn.Flatten):
                if _flatten_ok(m.start_dim, m.end_dim):
                    ops.append(("reshape",))
                else:
                    bad.append((where, "Flatten", f"start_dim={m.start_dim}, end_dim="
                                f"{m.end_dim}; only Flatten(1, -1) keeps the batch"))
            elif isinstance(m, nn.Identity):
                pass
            elif isinstance(m, _DROPOUT):
                if m.training:
                    bad.append((where, type(m).__name__,
                                "in training mode; call model.eval() first"))
            elif _is_normalize(m):
                ops.append(("normalize", m, where))
            else:
                bad.append((where, type(m).__name__, "not a fully connected ReLU layer"))
        elif node.op == "call_function":
            fn = node.target
            if fn in _RELU_FUNCTIONS:
                ops.append(("relu",))
            elif fn is torch.flatten:
                if _flatten_ok(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)):
                    ops.append(("reshape",))
                else:
                    bad.append((where, "torch.flatten", "only flatten(x, 1) keeps the batch"))
            elif fn is F.dropout:
                if _arg(node, 2, "training", True):
                    bad.append((where, "F.dropout", "training=True; pass training=False"))
            elif fn is operator.getitem:
                bad.append((where, "getitem", "indexing is not supported"))
            else:
                bad.append((where, getattr(fn, "__name__", str(fn)),
                            "not a fully connected ReLU operation"))
        elif node.op == "call_method":
            name = str(node.target)
            if name in ("relu", "relu_"):
                ops.append(("relu",))
            elif name == "flatten":
                if _flatten_ok(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)):
                    ops.append(("reshape",))
                else:
                    bad.append((where, ".flatten", "only x.flatten(1) keeps the batch"))
            elif name in ("view", "reshape"):
                ops.append(("reshape",))  # checked numerically after extraction
            elif name == "contiguous":
                pass
            else:
                bad.append((where, f".{name}()", "not a fully connected ReLU operation"))
        else:
            bad.append((where, node.op, str(node.target)))
    if bad:
        raise NotFullyConnectedError(bad)
    return ops


def _normalize_affine(m: nn.Module, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise affine map ``x -> s * x + t`` of a Normalize module on flat ``shape`` inputs."""
    mean = torch.as_tensor(m.mean).detach().cpu().to(torch.float64)
    std = torch.as_tensor(m.std).detach().cpu().to(torch.float64)
    if bool((std <= 0).any()):
        raise InputError(f"Normalize: every std must be > 0, got {std.reshape(-1).tolist()}")
    probe_shape = (1, *shape)
    s = torch.broadcast_to(1.0 / std, torch.broadcast_shapes(probe_shape, std.shape))
    t = torch.broadcast_to(-mean / std, torch.broadcast_shapes(probe_shape, mean.shape))
    if tuple(s.shape) != probe_shape or tuple(t.shape) != probe_shape:
        raise ValueError("shape")
    # the module must really be (x - mean) / std: checked on a float64 copy, so that the
    # tolerance is float64 rounding (a float32 run needed 1e-4, and a module computing
    # (x - mean) / std * 1.00005 passed: every rival then reported a "certified" constant
    # below the true one)
    gen = torch.Generator().manual_seed(1234)
    probe = torch.randn((3, *shape), generator=gen, dtype=torch.float64)
    try:
        m64 = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
        with torch.no_grad():
            got = m64(probe)
        ok = (isinstance(got, torch.Tensor) and got.dtype == torch.float64
              and tuple(got.shape) == tuple(probe.shape))
    except Exception:  # noqa: BLE001 - any failure means: not checkable in float64
        ok = False
    if not ok:
        raise NotFullyConnectedError([(type(m).__name__, "Normalize",
                                       "its forward could not be checked in float64 on the "
                                       "CPU (use lipbound.Normalize)")])
    want = probe * s + t
    tol = 1e-12 * (probe.abs() * s.abs() + t.abs()) + 1e-300
    if not bool(((got - want).abs() <= tol).all()):
        raise NotFullyConnectedError([(type(m).__name__, "Normalize",
                                       "its forward is not (x - mean) / std")])
    return s.reshape(-1).numpy().copy(), t.reshape(-1).numpy().copy()


class _Affine:
    """``x -> W x + b`` with ``W`` dense, or diagonal when ``diag`` is set."""

    def __init__(self, w: np.ndarray, b: np.ndarray, diag: bool = False):
        self.w, self.b, self.diag = w, b, diag

    @property
    def n_in(self) -> int:
        return self.w.shape[0] if self.diag else self.w.shape[1]

    def then(self, nxt: _Affine) -> _Affine:
        """``nxt`` applied after ``self``."""
        if nxt.n_in != (self.w.shape[0]):
            raise NotFullyConnectedError([("chain", "shape mismatch",
                                           f"a layer expects {nxt.n_in} inputs but gets "
                                           f"{self.w.shape[0]}")])
        # products of single entries are correctly rounded; sums are folded with
        # fold_matmul / fold_axpy, which recompute an entry exactly when it cancels
        if nxt.diag and self.diag:
            return _Affine(nxt.w * self.w, fold_axpy(nxt.w, self.b, nxt.b), diag=True)
        if nxt.diag:
            return _Affine(nxt.w[:, None] * self.w, fold_axpy(nxt.w, self.b, nxt.b))
        if self.diag:
            return _Affine(nxt.w * self.w[None, :], fold_matmul(nxt.w, self.b, nxt.b))
        return _Affine(fold_matmul(nxt.w, self.w), fold_matmul(nxt.w, self.b, nxt.b))

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        w = np.diag(self.w) if self.diag else self.w
        return np.ascontiguousarray(w, dtype=np.float64), np.asarray(self.b, dtype=np.float64)


def fc_layers(model: nn.Module, *, input_shape: Sequence[int] | None = None,
              check: bool = True, convert: bool = True) -> FCLayers:
    """Extract ``[(W_1, b_1), ..., (W_K, b_K)]`` (float64) from a fully connected ReLU network.

    The model's forward must be a single chain of ``nn.Linear``, ``nn.ReLU`` /
    ``F.relu`` / ``torch.relu`` / ``x.relu()``, ``nn.Flatten`` / ``torch.flatten(x, 1)`` /
    ``x.view(x.size(0), -1)``, ``nn.Identity``, dropout in eval mode and
    :class:`lipbound.Normalize` (folded into the next affine map). Consecutive affine maps
    are multiplied together, so the result alternates affine and ReLU; a leading ReLU gets an
    identity first layer and a trailing ReLU an identity last layer.

    Any other network (convolutions, pooling, batch norm, ...) is converted into an exact
    fully connected ReLU chain by :func:`lipbound.baselines.conv_to_fc.relu_chain` when
    ``convert`` is set and ``input_shape`` is given; the result is then marked
    (:func:`is_converted`) and the baselines' notes say so.

    Args:
        model: an ``nn.Module`` (``nn.Sequential`` or anything ``torch.fx`` can trace).
        input_shape: shape of one input without the batch dimension (e.g. ``(1, 28, 28)``).
            Needed only when a per-channel Normalize precedes a flatten and the shape cannot
            be inferred; also used for the numerical check.
        check: compare the extracted chain with ``model`` on three random inputs (float64
            chain vs. the model's own forward) and raise if they disagree.
        convert: fall back to the exact conversion of a conv net (needs ``input_shape``).

    Returns:
        The list of layers; ``W_k`` has shape ``(n_k, n_{k-1})``, ``b_k`` shape ``(n_k,)``.

    Raises:
        NotFullyConnectedError: (an :class:`~lipbound.errors.UnsupportedModelError`) listing
            every node that is not part of a fully connected ReLU chain and cannot be
            converted (a :class:`~lipbound.baselines.conv_to_fc.ConversionTooLargeError`
            when the conversion's dense matrices would be too large).
        InputError: ``input_shape`` does not match the model.
        WeightsError: NaN/inf parameters.
    """
    problem = wrapper_problem(model)
    if problem is not None:
        raise InputError(problem)
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # DataParallel / torch.compile: the module they run
    check_finite_parameters(model)
    check_hooks(model)  # hooks and a replaced root forward are not in the fx graph
    try:
        ops = _trace_ops(model)
    except NotFullyConnectedError as exc:
        if not convert:
            raise
        if input_shape is None:
            raise NotFullyConnectedError(
                exc.nodes, hint="pass input_shape=(C, H, W) to convert a conv net") from exc
        from lipbound.baselines.conv_to_fc import relu_chain

        return relu_chain(model, input_shape, check=check)
    linear_in = next((op[1].shape[1] for op in ops if op[0] == "linear"), None)
    if linear_in is None:
        raise NotFullyConnectedError([("model", "no nn.Linear", "nothing to analyse")])
    # checked (review s22): input_shape="abc" raised int()'s ValueError
    shape_in = check_input_shape(input_shape) if input_shape is not None else None
    if shape_in is not None and math.prod(shape_in) != linear_in:
        raise InputError(f"input_shape {shape_in} has {math.prod(shape_in)} elements but the "
                         f"first Linear layer expects {linear_in}")
    d = linear_in
    check_shape = shape_in if shape_in is not None else (d,)
    flat_seen = False
    layers: FCLayers = []
    pending: _Affine | None = None
    width = d
    for op in ops:
        kind = op[0]
        if kind == "reshape":
            flat_seen = True
        elif kind == "linear":
            aff = _Affine(op[1], op[2])
            pending = aff if pending is None else pending.then(aff)
            if pending is aff and aff.n_in != width:
                raise NotFullyConnectedError([("chain", "shape mismatch",
                                               f"Linear expects {aff.n_in} inputs, gets "
                                               f"{width}")])
        elif kind == "normalize":
            m, where = op[1], op[2]
            candidates: list[tuple[int, ...]] = []
            if flat_seen or layers or pending is not None:
                candidates.append((width,))
            else:
                if shape_in is not None:
                    candidates.append(shape_in)
                candidates.append((width,))
                c = int(torch.as_tensor(m.mean).numel())
                if c > 0 and width % c == 0:
                    candidates.append((c, width // c, 1))
            for cand in candidates:
                try:
                    s, t = _normalize_affine(m, cand)
                    if not (flat_seen or layers or pending is not None) and shape_in is None:
                        check_shape = cand
                    break
                except (ValueError, RuntimeError) as exc:
                    if isinstance(exc, LipboundError):
                        raise
                    continue
            else:
                raise InputError(f"cannot fold Normalize '{where}' into the first layer: pass "
                                 "input_shape=(C, H, W) so its broadcasting is known")
            aff = _Affine(s, t, diag=True)
            pending = aff if pending is None else pending.then(aff)
        elif kind == "relu":
            if pending is None:
                if layers:
                    continue  # relu(relu(x)) = relu(x)
                pending = _Affine(np.ones(width), np.zeros(width), diag=True)
            w, b = pending.dense()
            layers.append((w, b))
            width = w.shape[0]
            pending = None
        if pending is not None:
            width = pending.w.shape[0]
    if pending is None:
        pending = _Affine(np.ones(width), np.zeros(width), diag=True)
    layers.append(pending.dense())
    for k in range(1, len(layers)):
        if layers[k][0].shape[1] != layers[k - 1][0].shape[0]:
            raise NotFullyConnectedError([("chain", "shape mismatch",
                                           f"layer {k + 1} expects {layers[k][0].shape[1]} "
                                           f"inputs, layer {k} gives {layers[k - 1][0].shape[0]}")])
    if check:
        _check_chain(model, layers, check_shape)
    logger.debug("extracted fully connected chain %s", describe(layers))
    return layers


def _check_chain(model: nn.Module, layers: FCLayers, shape: tuple[int, ...], *,
                 converting: bool = False) -> None:
    """Raise if the extracted (or, with ``converting``, the converted) chain does not
    reproduce ``model`` on random inputs (the model's float32 run in IEEE float32 on CUDA)."""
    dtype, device = model_dtype_device(model)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((3, *shape), generator=gen, dtype=torch.float64)
    try:
        with torch.no_grad(), exact_float32(device):
            out = model(probe.to(device=device, dtype=dtype, copy=True))
    except Exception as exc:
        raise InputError(f"the model does not accept inputs of shape (N, {shape}): {exc}; "
                         "pass input_shape") from exc
    out = out.detach().cpu().to(torch.float64)
    if converting:  # a conv net's output may keep its trailing dimensions
        out = out.reshape(3, -1)
    ref = out
    out = out.numpy()
    want = fc_forward(layers, probe.reshape(3, -1).numpy())
    if out.shape != want.shape:
        raise NotFullyConnectedError([("output", f"shape {tuple(out.shape)}",
                                       f"expected (N, {want.shape[1]}) from the chain; a "
                                       "view/reshape does not flatten as assumed")],
                                     converting=converting)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    scale = 1.0 + float(np.max(np.abs(want)))
    err = float(np.max(np.abs(out - want)))
    if not err <= tol * scale and dtype == torch.float32 \
            and _float32_rounding_explains(model, probe.to(device), ref, layers, tol * scale):
        return
    if not err <= tol * scale:
        what = "converted FC" if converting else "extracted Linear/ReLU"
        raise NotFullyConnectedError([("model", "conversion mismatch" if converting
                                       else "mismatch",
                                       f"the {what} chain differs from the model's output by "
                                       f"{err:.3g}")], converting=converting)


#: the note on the rivals' results for a float32 model whose extracted chain is accepted
#: within its own float32 rounding (:func:`_float32_rounding_explains`), as lipbound's own
#: results carry the analyzer's (session 25 review: the rivals' rows had none)
F32_CHAIN_NOTE = ("float32 rounding: this float32 model's own forward pass differs from the "
                  "extracted chain by more than the chain check's float32 tolerance, within a "
                  "bound on its float32 rounding (a float64 copy of the model matches the "
                  "chain), so the values are of its float32 weights in exact arithmetic (the "
                  "function model.double() computes), not of its float32 forward pass")

_CHAIN_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "lipbound_fc_chain_notes", default=None)


@contextlib.contextmanager
def chain_notes() -> Iterator[list[str]]:
    """Collect the caveats of the chain extractions made inside the block (the
    :data:`F32_CHAIN_NOTE` of a float32 model accepted within its rounding)."""
    notes: list[str] = []
    token = _CHAIN_NOTES.set(notes)
    try:
        yield notes
    finally:
        _CHAIN_NOTES.reset(token)


def _float32_rounding_explains(model: nn.Module, probe: torch.Tensor, ref: torch.Tensor,
                               layers: FCLayers, limit: float) -> bool:
    """Whether a float32 model's gap to the chain is its own float32 rounding (large weights
    summed with cancellation), as the analyzer's chain check accepts it
    (:func:`lipbound.graph.float64_copy_matches`, :func:`lipbound.graph.float32_rounding_ratio`):
    the chain is then the model's weights in exact arithmetic, which the methods bound."""

    def chain(v: torch.Tensor) -> torch.Tensor:
        flat = v.detach().cpu().to(torch.float64).reshape(v.shape[0], -1).numpy()
        return torch.from_numpy(fc_forward(layers, flat))

    from lipbound.lower._common import one_float64_copy

    with one_float64_copy(model):
        if not float64_copy_matches(model, probe, chain(probe)):
            return False
        gap, ratio = float32_rounding_ratio(model, probe, ref, chain, limit)
    if ratio <= 1.0:
        logger.info("float32 model accepted: its gap to the chain (%.3g) is within its float32 "
                    "rounding (%.2g of the bound)", gap, ratio)
        notes = _CHAIN_NOTES.get()
        if notes is not None and F32_CHAIN_NOTE not in notes:
            notes.append(F32_CHAIN_NOTE)
        return True
    return False


def as_fc(net: nn.Module | Sequence[tuple[Any, Any]], *,
          input_shape: Sequence[int] | None = None) -> FCLayers:
    """Return ``net`` as float64 layers: extract from a module (with the extraction's
    caveats, :func:`chain_caveats`) or validate a layer list."""
    if isinstance(net, nn.Module):
        with chain_notes() as found:
            layers = fc_layers(net, input_shape=input_shape)
        return with_caveats(layers, found)
    try:
        pairs = [(w, b) for w, b in net]
    except (TypeError, ValueError) as exc:
        raise InputError(f"expected an nn.Module or a list of (W, b) pairs: {exc}") from exc
    # real_array (review s22): parameters that require grad raised torch's RuntimeError, and a
    # complex W lost its imaginary part silently
    layers = [(np.array(real_array(w, f"layer {k + 1}: W"), ndmin=2),
               real_array(b, f"layer {k + 1}: b").ravel()) for k, (w, b) in enumerate(pairs)]
    if not layers:
        raise InputError("the layer list is empty; give at least one (W, b) pair")
    if is_converted(net):
        layers = converted(layers, from_conv=getattr(net, "from_conv", True))
    layers = with_caveats(layers, chain_caveats(net))  # (layers extracted by as_fc before)
    for k, (w, b) in enumerate(layers):
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise InputError(f"layer {k + 1}: W has shape {w.shape} and b {b.shape}; "
                             "need W (n_out, n_in) and b (n_out,)")
        if 0 in w.shape:  # (review s22) exact-l2 failed with numpy's broadcasting error
            raise InputError(f"layer {k + 1}: W has shape {w.shape}; every layer needs at "
                             "least one input and one output")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise InputError(f"layer {k + 1} has NaN/inf weights; load valid weights (a "
                             "diverged training run or a corrupt file?)")
        if k and w.shape[1] != layers[k - 1][0].shape[0]:
            raise InputError(f"layer {k + 1} expects {w.shape[1]} inputs but layer {k} has "
                             f"{layers[k - 1][0].shape[0]} outputs")
    return layers


def apply_output_map(layers: FCLayers, output_map: Any | None) -> FCLayers:
    """Fold an output map ``C`` (shape ``(m, n_out)``) into the last layer."""
    if output_map is None:
        return layers
    # real_array (review s22): a complex C was cast to float64, dropping its imaginary part,
    # and every rival certified the real part's map (0 for C f = i relu(x), constant 1); a
    # ragged or text C raised numpy's ValueError
    c = np.array(real_array(output_map, "output_map"), ndmin=2)
    w, b = layers[-1]
    if c.ndim != 2 or c.shape[1] != w.shape[0]:
        raise InputError(f"output_map has shape {c.shape}; need (m, {w.shape[0]})")
    if c.shape[0] == 0:  # (review s22) exact-l2 failed with an IndexError
        raise InputError(f"output_map has shape {c.shape}: no rows; give at least one row "
                         "(or no output_map for the identity)")
    if not np.isfinite(c).all():
        raise InputError(f"output_map contains {int((~np.isfinite(c)).sum())} NaN/inf "
                         "value(s); pass a finite matrix")
    # folded so that a cancelling entry of C W keeps its digits (fold_matmul): a plain
    # float64 C @ W rounded fl(1/3) * 3 - 1 to 0, and every rival reported 0 for a
    # network whose constant is 7e13 (tests/test_rivals_review.py)
    out = [*layers[:-1], (fold_matmul(c, w), fold_matmul(c, b))]
    if is_converted(layers):
        out = converted(out, from_conv=getattr(layers, "from_conv", True))
    return with_caveats(out, chain_caveats(layers))


def real_array(value: Any, what: str) -> np.ndarray:
    """``value`` (tensor, array, number or nested sequence) as a float64 numpy array.

    Added in review s22: the baselines cast their array inputs with ``np.array(...,
    dtype=float64)``, which drops the imaginary part of complex values with only a warning (a
    complex output map then got a CERTIFIED bound on its real part's map: 0 for
    ``C f = i relu(x)``, whose constant is 1), fails with torch's ``RuntimeError`` on
    tensors that require grad (parameters) and with numpy's ``ValueError`` on ragged or text
    input. Tensors are detached and copied to the CPU.

    Raises:
        InputError: complex, sparse or meta tensors, or values numpy cannot read as a real
            array (naming ``what``).
    """
    if isinstance(value, torch.Tensor):
        check_plain_tensor(value, what)
        return value.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not an array of real numbers ({exc}); pass a tensor or "
                         "a numpy array of the right shape") from exc
    if np.iscomplexobj(arr):
        raise InputError(f"{what} is complex ({arr.dtype}); lipbound works with real numbers "
                         f"only: pass its real part explicitly if that is what you mean")
    try:
        return arr.astype(np.float64)  # (an object array of numbers converts too)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not an array of real numbers (dtype {arr.dtype}: {exc}); "
                         "pass a tensor or a numpy array") from exc


def check_x0(x0: Any, n_in: int, net: Any = None,
             input_shape: Sequence[int] | None = None) -> np.ndarray:
    """``x0`` (tensor/array with batch dimension 1, or flat) as a float64 vector of ``n_in``.

    A tensor of more than two dimensions is the model's own input layout, so it must be one
    (``(1, *input_shape)`` when ``input_shape`` is given, else an input the module ``net``
    maps to ``(1, m)``): a ``(1, 1, 4)`` tensor for a network of ``nn.Linear(4, .)`` layers,
    whose output would be ``(1, 1, m)``, was flattened into another input than the caller's
    (session 25).
    """
    if x0 is None:
        raise InputError(f"x0 is None; pass the centre of the ball, a tensor of shape (1, "
                         f"{n_in}) or (1, *input_shape)")
    if isinstance(x0, torch.Tensor) and x0.dim() >= 2 and x0.shape[0] != 1:
        raise InputError(f"x0 holds a batch of {x0.shape[0]} inputs; pass one input "
                         "with a batch dimension of 1")
    # real_array (review s22): a complex x0 lost its imaginary part silently (the ball was
    # centred elsewhere); ragged or text input raised numpy's ValueError
    x = real_array(x0, "x0").reshape(-1)
    if x.size != n_in:
        raise InputError(f"x0 has {x.size} elements but the network takes {n_in}; pass an "
                         f"input of shape (1, {n_in}) (or (1, *input_shape))")
    if not np.isfinite(x).all():
        raise InputError(f"x0 contains {int((~np.isfinite(x)).sum())} NaN/inf value(s); "
                         "clean the input first")
    if isinstance(x0, torch.Tensor) and x0.dim() > 2:
        _check_layout(x0, net, input_shape)
    return x


def _check_layout(x0: torch.Tensor, net: Any, input_shape: Sequence[int] | None) -> None:
    """Refuse an ``x0`` of more than two dimensions that is not the model's input layout."""
    shape = tuple(x0.shape)
    if input_shape is not None:
        want = (1, *(int(s) for s in input_shape))
        if shape not in (want, want[1:]):
            raise InputError(f"x0 has shape {shape} but input_shape gives {want}; pass x0 of "
                             "that shape (or flat, (1, n))")
        return
    if isinstance(net, nn.Module):
        check_runs_on(net, x0)


def check_runs_on(net: nn.Module, x0: torch.Tensor) -> None:
    """Refuse an ``x0`` that the module ``net`` fails on or does not map to one output row
    ``(1, m)`` (one forward pass without gradients, on a copy of ``x0``).

    Raises:
        InputError: naming the shape and the fix.
    """
    shape = tuple(x0.shape)
    dtype, device = model_dtype_device(net, default=x0)
    try:
        with torch.no_grad():
            out = net(x0.detach().to(device=device, dtype=dtype).clone())
    except Exception as exc:  # noqa: BLE001 - any failure: x0 is not the model's input
        raise InputError(f"the model failed on x0 of shape {shape} ({type(exc).__name__}: "
                         f"{exc}); pass x0 of the shape the model takes, (1, *input_shape), "
                         "or flat, (1, n)") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"x0 has shape {shape}, which the model maps to {got}, not to one "
                         f"output row (1, m): it is not the model's input layout; pass x0 "
                         f"of the shape the model takes, (1, *input_shape), or flat, (1, n)")


#: magnitudes the baselines accept (powers of two): every nonzero row of a weight matrix
#: must have its largest entry in [2^-RANGE_EXP, 2^RANGE_EXP], and so must eps (|x0|: upper end)
RANGE_EXP = 160
#: bound on the exponent of a product of consecutive layers' scales (squares stay normal)
CHAIN_EXP = 500


def check_range(layers: FCLayers, x0: np.ndarray | None = None, eps: float | None = None,
                what: str = "the baselines") -> None:
    """Refuse magnitudes at which float64 would underflow or overflow inside the baselines.

    The rounding margins of every baseline are *relative* (``1e-12 * n`` times a magnitude).
    They stop covering the error when squares of row norms or products of layer scales leave
    the normal float64 range: a row whose entries are ``2^-1000`` has a computed norm of 0
    (``np.linalg.norm`` squares without scaling), and a product of three ``2^-400`` layers
    rounds to 0, so a network whose true constant is positive would get 0. Rather than a
    silent wrong answer, such inputs are refused (the Lipschitz constant is positively
    homogeneous: scale the weights by powers of two and scale the result back).

    Checked: every nonzero row of every ``W_k`` has its largest ``|entry|`` in
    ``[2^-160, 2^160]``; ``|x0|`` at most ``2^160`` and (local methods, which use the
    biases) ``|b_k|`` at most ``2^500``; ``eps`` in
    ``[2^-160, 2^160]``; and for every run of consecutive layers the product of their scales
    (largest row maximum times width, and smallest nonzero row maximum) lies in
    ``[2^-500, 2^500]``.

    Raises:
        InputError: naming the offending layer or input and the fix.
    """
    lo_lim, hi_lim = 2.0 ** -RANGE_EXP, 2.0 ** RANGE_EXP
    fix = ("; rescale the network (the Lipschitz constant scales by c when a layer's weights "
           "are multiplied by c > 0 and the later biases accordingly) or the inputs, so that "
           f"magnitudes lie in [2^-{RANGE_EXP}, 2^{RANGE_EXP}]")
    big_logs, small_logs = [], []
    for k, (w, b) in enumerate(layers):
        rmax = np.max(np.abs(w), axis=1) if w.size else np.zeros(w.shape[0])
        nz = rmax[rmax > 0]
        if nz.size and (float(nz.min()) < lo_lim or float(nz.max()) > hi_lim):
            raise InputError(
                f"{what}: layer {k + 1} has a row whose largest weight is "
                f"{float(nz.min()) if float(nz.min()) < lo_lim else float(nz.max()):.3g}, "
                "outside the range where float64 rounding margins are valid" + fix)
        if x0 is not None and b.size and float(np.max(np.abs(b))) > 2.0 ** CHAIN_EXP:
            raise InputError(f"{what}: layer {k + 1} has a bias of magnitude "
                             f"{float(np.max(np.abs(b))):.3g}" + fix)
        if nz.size:
            big_logs.append(math.log2(float(nz.max())) + math.log2(max(w.shape)))
            small_logs.append(math.log2(float(nz.min())))
        else:  # a zero layer: the network is constant beyond it; nothing to chain
            big_logs.append(-math.inf)
            small_logs.append(math.inf)
    for logs, sign in ((big_logs, 1.0), (small_logs, -1.0)):
        run = 0.0
        for v in logs:  # largest (sign * sum) over runs of consecutive layers (Kadane)
            run = max(sign * v, run + sign * v) if math.isfinite(v) else 0.0
            if run > CHAIN_EXP:
                raise InputError(
                    f"{what}: products of consecutive layers' weights reach about "
                    f"2^{sign * run:.0f}, outside float64's safe range [2^-{CHAIN_EXP}, "
                    f"2^{CHAIN_EXP}]" + fix)
    if x0 is not None and x0.size and float(np.max(np.abs(x0))) > hi_lim:
        raise InputError(f"{what}: x0 has an entry of magnitude {float(np.max(np.abs(x0))):.3g}"
                         + fix)
    if eps is not None and not lo_lim <= eps <= hi_lim:
        raise InputError(f"{what}: eps={eps:.3g} is outside [2^-{RANGE_EXP}, 2^{RANGE_EXP}], "
                         "where float64 rounding margins are valid; rescale the inputs (and "
                         "the first layer's weights) so that eps is in that range")


# --------------------------------------------------------------------------- numerics


def fc_preactivations(layers: FCLayers, x: np.ndarray) -> list[np.ndarray]:
    """Pre-activations ``z_1, ..., z_{K-1}`` of the hidden layers for a batch ``x`` (N, n_0)."""
    h = np.atleast_2d(x)
    zs = []
    for w, b in layers[:-1]:
        z = h @ w.T + b
        zs.append(z)
        h = np.maximum(z, 0.0)
    return zs


def fc_forward(layers: FCLayers, x: np.ndarray) -> np.ndarray:
    """Float64 forward pass of the chain on a batch ``x`` of shape (N, n_0)."""
    h = np.atleast_2d(np.asarray(x, dtype=np.float64))
    for w, b in layers[:-1]:
        h = np.maximum(h @ w.T + b, 0.0)
    w, b = layers[-1]
    return h @ w.T + b


def pattern_jacobian(layers: FCLayers, pattern: Sequence[np.ndarray]) -> np.ndarray:
    """``W_K D_{K-1} ... D_1 W_1`` for a 0/1 activation pattern (one array per hidden layer)."""
    j = layers[0][0]
    for (w, _), d in zip(layers[1:], pattern, strict=True):
        j = w @ (np.asarray(d, dtype=np.float64)[:, None] * j)
    return j


#: a matrix with at most this share of nonzero entries (and at least
#: :data:`SPARSE_MIN_ENTRIES` entries) is treated as sparse: :func:`safe_spectral_norm` splits
#: it into diagonal blocks, and :func:`operand` stores it in CSR form
SPARSE_MAX_DENSITY = 0.1
#: smaller matrices are always handled dense (the sparse bookkeeping would cost more)
SPARSE_MIN_ENTRIES = 1 << 16


def safe_spectral_norm(a: np.ndarray, abs_err: float = 0.0) -> float:
    """An upper bound on ``||A||_2`` that covers float64 rounding, plus ``abs_err``.

    ``||A||_2`` is bounded by :func:`lipbound.spectral.exact_norm`, the analyzer's certified
    exact route (the top eigenvalue of the float64 Gram matrix of the smaller side, with the
    Gram matrix's rounding ``γ_k ||A||_F^2`` and ``64 n u`` added before the square root, and a
    relative margin of ``1e-9`` on top, proven by a Cholesky certificate; see
    docs/guarantees.md): 2-8x cheaper than an SVD. ``abs_err`` (a bound on
    ``||A_true - A||_2`` from forming ``A``, e.g. :func:`product_error`) is added and the sum
    rounded up, so the returned float is at least the real-number bound.

    A sparse matrix (density at most :data:`SPARSE_MAX_DENSITY`; the converted conv nets'
    max-pool levels have at most four nonzeros per row) is first split into the connected
    components of its bipartite row-column graph: permuting its rows and columns (exactly, no
    arithmetic) makes it block diagonal, and the norm of a block-diagonal matrix is the
    largest of its blocks' norms; each block gets the bound above.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return 0.0  # the empty map: its forming has no error either
    blocks = _diagonal_blocks(a)
    if blocks is None:
        s = exact_norm(a)
    else:
        s = max((exact_norm(a[np.ix_(r, c)]) for r, c in blocks), default=0.0)
    return round_up(s + abs_err)


def _diagonal_blocks(a: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Row and column indices of the diagonal blocks of a sparse ``a`` (the connected
    components of its bipartite row-column graph that hold a nonzero entry; zero rows and
    columns belong to none), or ``None`` when ``a`` is small, dense or one block."""
    m, n = a.shape
    if a.size < SPARSE_MIN_ENTRIES or np.count_nonzero(a) > SPARSE_MAX_DENSITY * a.size:
        return None
    rows, cols = np.nonzero(a)
    graph = sp.coo_array((np.ones(rows.size), (rows, m + cols)), shape=(m + n, m + n))
    count, labels = csgraph.connected_components(graph, directed=False)
    row_lab, col_lab = labels[:m], labels[m:]
    used = np.unique(row_lab[rows])  # components holding an entry (isolated nodes do not)
    if used.size <= 1:
        return None
    r_order = np.argsort(row_lab, kind="stable")
    c_order = np.argsort(col_lab, kind="stable")
    r_cuts = np.searchsorted(row_lab[r_order], used)
    r_ends = np.searchsorted(row_lab[r_order], used, side="right")
    c_cuts = np.searchsorted(col_lab[c_order], used)
    c_ends = np.searchsorted(col_lab[c_order], used, side="right")
    return [(r_order[r0:r1], c_order[c0:c1])
            for r0, r1, c0, c1 in zip(r_cuts, r_ends, c_cuts, c_ends, strict=True)]


def operand(w: np.ndarray) -> np.ndarray | sp.csr_array:
    """``w`` as the cheaper operand of matrix products: a CSR array when it is sparse
    (:data:`SPARSE_MAX_DENSITY`), else ``w`` itself.

    ``x @ operand(w)`` and ``operand(w) @ x`` give the same numpy arrays as with ``w`` up to
    the order of summation (sparse products skip the zero terms), which the baselines'
    rounding margins cover: they bound the error of a sum of ``k`` terms by ``γ_k`` times the
    sum of absolute values, in any order, and fewer terms only lower it.
    """
    if w.size < SPARSE_MIN_ENTRIES or np.count_nonzero(w) > SPARSE_MAX_DENSITY * w.size:
        return w
    return sp.csr_array(w)


def product_error(abs_chain: np.ndarray, n_terms: int) -> float:
    """Bound on ``||fl(P) - P||_2`` for a matrix product ``P`` of ``n_terms`` inner terms.

    ``abs_chain`` is the same product of the entrywise absolute values; the classical bound
    ``|fl(P) - P| <= gamma_n |A_1| ... |A_m|`` with ``gamma_n ~ n u`` gives
    ``||fl(P) - P||_2 <= ||.||_F``; we use ``1e-12 * n`` in place of ``gamma_n``.
    """
    return 1e-12 * max(n_terms, 1) * float(np.linalg.norm(abs_chain))


def round_up(v: float) -> float:
    """The next float64 above ``v`` (covers the rounding of the last operation)."""
    if not math.isfinite(v) or v == 0.0:
        return v  # an exact zero (e.g. the norm of a zero matrix) stays zero
    return float(np.nextafter(v, np.inf))


def hidden_widths(layers: FCLayers) -> list[int]:
    return [w.shape[0] for w, _ in layers[:-1]]


def describe(layers: FCLayers) -> str:
    """``"7-20-30-10"``: the layer widths."""
    return "-".join(str(n) for n in [layers[0][0].shape[1]] + [w.shape[0] for w, _ in layers])
