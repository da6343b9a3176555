"""Exact conversion of a small conv net into a fully connected ReLU chain, for the rivals.

The rival methods of :mod:`lipbound.baselines` take a chain
``f(x) = W_K relu(... relu(W_1 x + b_1) ...) + b_K`` (:data:`~lipbound.baselines.fc.FCLayers`).
:func:`relu_chain` rewrites a feed-forward network with convolutions, pooling, batch norm and
the other layers lipbound's analyzer accepts into such a chain computing the **same
function** (up to float64 rounding of the composed matrices, ~1e-15 relative):

* **Affine layers** (``Conv2d`` with any stride / padding / dilation / groups, ``Linear``,
  ``AvgPool2d``, ``AdaptiveAvgPool2d``, ``BatchNorm1d/2d`` in eval mode,
  :class:`lipbound.Normalize`, Dropout in eval mode, ``Identity``) become dense float64
  matrices: a convolution's matrix is scattered from its kernel taps (every entry is one
  weight, so it is exact), other linear maps are applied to basis vectors in float64.
  Consecutive affine maps are multiplied into one (as :func:`~lipbound.baselines.fc.fc_layers`
  does), so the chain alternates affine maps and ReLU.
* **Max pooling** becomes ReLU layers with the standard encoding of a maximum used by the
  MIP / verification literature (e.g. Tjeng, Xiao & Tedrake, *Evaluating Robustness of
  Neural Networks with Mixed Integer Programming*, ICLR 2019; the piecewise-linear rewriting
  of Bunel et al., *A Unified View of Piecewise Linear Neural Network Verification*,
  NeurIPS 2018):

      max(a, b) = b + relu(a - b),       v = relu(v) - relu(-v),

  and ``v = relu(v)`` where ``v`` is provably ``>= 0`` (right after a ReLU, or an affine map
  with non-negative weights and bias of such values, or a maximum involving one). A window
  of ``m`` elements is a balanced tree of pairwise maxima, ``ceil(log2 m)`` ReLU levels;
  every level is one hidden layer of the chain. Padded positions of the pool are ``-inf``
  in PyTorch, so they are simply not in the window; stride, dilation and ``ceil_mode`` only
  change which inputs a window holds (taken from the layer's own output shape). Identical
  neurons of overlapping windows are shared.

Only feed-forward chains are converted (what :func:`lipbound.graph.trace_model` accepts, the
analyzer's own intake, so the layer set is the analyzer's); a model with anything else gets a
:class:`~lipbound.baselines.fc.NotFullyConnectedError` listing every unsupported part, and a
conversion whose dense matrices would exceed ``max_entries`` (default 50M float64 entries,
400 MB) a :class:`ConversionTooLargeError` naming the layer and the size. Every result is
checked against the model's own forward pass on random inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from lipbound.baselines.fc import (
    FCLayers,
    NotFullyConnectedError,
    _check_chain,
    converted,
    describe,
)
from lipbound.baselines.fold import fold_axpy, fold_matmul
from lipbound.errors import InputError, LipboundError, UnsupportedModelError
from lipbound.validation import check_input_shape

logger = logging.getLogger(__name__)

__all__ = ["relu_chain", "ConversionTooLargeError", "MAX_ENTRIES"]

#: default limit on the entries of any dense matrix formed by the conversion (400 MB)
MAX_ENTRIES = 50_000_000

_Mat = np.ndarray | sp.csr_matrix | None  # None: the identity


class ConversionTooLargeError(NotFullyConnectedError):
    """A dense matrix of the conversion would exceed the entry limit (names layer and size)."""

    def __init__(self, where: str, kind: str, rows: int, cols: int, limit: int):
        self.nodes = [(where, kind, f"dense {rows} x {cols} matrix")]
        self.rows, self.cols, self.limit = rows, cols, limit
        LipboundError.__init__(
            self,
            f"conv net too large for the exact FC conversion: {kind} '{where}' would need a "
            f"dense {rows} x {cols} float64 matrix ({_human(rows * cols)} entries, "
            f"{_human(8 * rows * cols)}B) > the limit of {_human(limit)} entries "
            f"({_human(8 * limit)}B); the rival methods need a fully connected chain, use "
            "lipbound.local_bound / lipbound.global_bound for this network (or raise "
            "max_entries).")


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


class _Chain:
    """Builder: finished layers plus the pending affine map ``h -> A h + c``.

    ``h`` is the output of the last hidden ReLU layer (or the network input), ``A`` is
    ``None`` for the identity, a dense array or a CSR matrix. ``nonneg[i]`` says that
    coordinate ``i`` of the current tensor is provably ``>= 0`` for every input.
    """

    def __init__(self, n_in: int, max_entries: int):
        self.layers: FCLayers = []
        self.n_h = n_in
        self.a: _Mat = None
        self.c = np.zeros(n_in)
        self.nonneg = np.zeros(n_in, dtype=bool)  # nothing is known about the input
        self.max_entries = max_entries

    @property
    def width(self) -> int:
        return self.c.size

    def check(self, where: str, kind: str, rows: int, cols: int) -> None:
        if rows * cols > self.max_entries:
            raise ConversionTooLargeError(where, kind, rows, cols, self.max_entries)

    def compose(self, m: np.ndarray | sp.csr_matrix, bias: np.ndarray) -> None:
        """The current tensor becomes ``m @ current + bias`` (entries that cancel are
        recomputed exactly: :func:`~lipbound.baselines.fold.fold_matmul`)."""
        self.a = _matmul(m, self.a)
        self.c = np.asarray(fold_matmul(m, self.c, np.asarray(bias, dtype=np.float64))
                            ).reshape(-1)

    def emit(self, where: str, kind: str) -> None:
        """Close the pending map as a hidden layer: its output (after ReLU) is the new ``h``."""
        n = self.width
        self.check(where, kind, n, self.n_h)
        self.layers.append((_dense(self.a, n, self.n_h), self.c.copy()))
        self.n_h, self.a, self.c = n, None, np.zeros(n)
        self.nonneg = np.ones(n, dtype=bool)

    def finish(self) -> FCLayers:
        # a network ending in a ReLU gets an identity last layer (as fc_layers does)
        w = _dense(self.a, self.width, self.n_h)
        self.check("output", "last affine map", w.shape[0], w.shape[1])
        return [*self.layers, (w, self.c.copy())]


def _dense(a: _Mat, rows: int, cols: int) -> np.ndarray:
    if a is None:
        return np.eye(rows, cols)
    if sp.issparse(a):
        return np.ascontiguousarray(a.toarray(), dtype=np.float64)
    return np.ascontiguousarray(a, dtype=np.float64)


def _matmul(left: np.ndarray | sp.csr_matrix, right: _Mat) -> np.ndarray | sp.csr_matrix:
    """``left @ right`` (``right`` None = identity); dense unless both are sparse."""
    if right is None:
        return left
    if sp.issparse(left) and sp.issparse(right):
        return sp.csr_matrix(fold_matmul(left, right))
    return np.asarray(fold_matmul(left, right))


def _mixing_matrix(op: Any, chain: _Chain, kind: str) -> np.ndarray:
    """The exact float64 matrix of a mixing op's linear part (``out_dim x in_dim``)."""
    chain.check(op.name, kind, op.out_dim, op.in_dim)
    m = op.dense() if hasattr(op, "dense") else None
    if m is None and hasattr(op, "dense_matrix"):
        m = op.dense_matrix()  # convolutions: scattered kernel taps, exact
    if m is None:  # any other linear map: applied to basis vectors in float64
        cols = []
        step = max(1, min(op.in_dim, 4_000_000 // max(op.in_dim, 1)))
        for s in range(0, op.in_dim, step):
            e = min(op.in_dim, s + step)
            basis = torch.zeros(e - s, op.in_dim, dtype=torch.float64)
            basis[torch.arange(e - s), torch.arange(s, e)] = 1.0
            with torch.no_grad():
                cols.append(op.lin(basis.reshape(e - s, *op.in_shape)).reshape(e - s, -1))
        m = torch.cat(cols).T
    m = m.detach().cpu().to(torch.float64).numpy()
    if m.shape != (op.out_dim, op.in_dim):
        raise NotFullyConnectedError([(op.name, kind, f"matrix of shape {m.shape}, expected "
                                       f"{(op.out_dim, op.in_dim)}")])
    return np.ascontiguousarray(m)


def _mixing(op: Any, chain: _Chain, kind: str) -> None:
    m = _mixing_matrix(op, chain, kind)
    with torch.no_grad():
        bias = op.forward(torch.zeros(1, *op.in_shape, dtype=torch.float64))
    bias = bias.detach().cpu().to(torch.float64).numpy().reshape(-1)  # A 0 + b = b exactly
    chain.check(op.name, kind, op.out_dim, chain.n_h)
    nonneg = ~(((m < 0).any(axis=1)) | (m[:, ~chain.nonneg] != 0).any(axis=1) | (bias < 0))
    chain.compose(m, bias)
    chain.nonneg = nonneg


def _diag(op: Any, chain: _Chain) -> None:
    s = op.scale.detach().cpu().to(torch.float64).numpy().reshape(-1)
    t = op.shift.detach().cpu().to(torch.float64).numpy().reshape(-1)
    if np.all(s == 1.0) and np.all(t == 0.0):
        return  # identity, dropout in eval mode
    d = sp.csr_matrix(sp.diags(s)) if chain.a is None or sp.issparse(chain.a) else None
    if d is not None:
        chain.compose(d, t)
    else:
        chain.a = s[:, None] * chain.a
        chain.c = fold_axpy(s, chain.c, t)
    chain.nonneg = chain.nonneg & (s >= 0) & (t >= 0)


def _windows(op: Any) -> list[list[int]]:
    """Flat input indices of every pooling window, in flat output order (padding left out)."""
    shape = tuple(op.in_shape)
    h, w = shape[-2:]
    ho, wo = op.out_shape[-2:]
    n_ch = math.prod(shape[:-2])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.kernel, op.stride, op.padding, op.dilation
    rows = [[r for r in (i * sh - ph + a * dh for a in range(kh)) if 0 <= r < h]
            for i in range(ho)]
    cols = [[c for c in (j * sw - pw + b * dw for b in range(kw)) if 0 <= c < w]
            for j in range(wo)]
    out = []
    for ch in range(n_ch):
        base = ch * h * w
        for i in range(ho):
            for j in range(wo):
                win = [base + r * w + c for r in rows[i] for c in cols[j]]
                if not win:
                    raise NotFullyConnectedError([(op.name, "MaxPool2d",
                                                   "a pooling window holds no input")])
                out.append(win)
    return out


class _Level:
    """One ReLU level of pairwise maxima: its neurons (sparse rows over the current elements)
    and the elements they define (sums of neurons)."""

    def __init__(self, elem_row: dict[Any, int], elem_nonneg: np.ndarray):
        self.elem_row, self.elem_nonneg = elem_row, elem_nonneg
        self.neurons: dict[Any, int] = {}
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        #: new element key -> (terms [(neuron, coefficient)], provably >= 0)
        self.elems: dict[Any, tuple[list[tuple[int, float]], bool]] = {}

    def neuron(self, key: Any, terms: list[tuple[int, float]]) -> int:
        idx = self.neurons.get(key)
        if idx is None:
            idx = self.neurons[key] = len(self.neurons)
            for col, val in terms:
                self.rows.append(idx)
                self.cols.append(col)
                self.vals.append(val)
        return idx

    def nonneg(self, k: Any) -> bool:
        return bool(self.elem_nonneg[self.elem_row[k]])

    def passthrough(self, k: Any) -> tuple[list[tuple[int, float]], bool]:
        """``v = relu(v)`` when ``v >= 0`` is proved, else ``v = relu(v) - relu(-v)``."""
        r = self.elem_row[k]
        pos = (self.neuron(("p", k), [(r, 1.0)]), 1.0)
        if self.nonneg(k):
            return [pos], True
        return [pos, (self.neuron(("n", k), [(r, -1.0)]), -1.0)], False

    def pair(self, ka: Any, kb: Any) -> Any:
        """``max(a, b) = b + relu(a - b)``, passing a provably non-negative one as ``b``."""
        if self.nonneg(ka) and not self.nonneg(kb):
            ka, kb = kb, ka
        key = ("max", ka, kb)
        if key not in self.elems:
            d = self.neuron(("d", ka, kb), [(self.elem_row[ka], 1.0), (self.elem_row[kb], -1.0)])
            terms, nonneg = self.passthrough(kb)
            self.elems[key] = ([(d, 1.0), *terms], nonneg)
        return key

    def single(self, k: Any) -> Any:
        key = ("id", k)
        if key not in self.elems:
            self.elems[key] = self.passthrough(k)
        return key


def _maxpool(op: Any, chain: _Chain) -> None:
    """Max pooling as ``ceil(log2 m)`` ReLU layers of pairwise maxima (see module docstring)."""
    # window elements are hashable keys: an input index at first, then ("max", ka, kb) or
    # ("id", k); elem_row maps a key to its row in the current tensor
    keys: list[list[Any]] = _windows(op)
    elem_row: dict[Any, int] = {i: i for i in range(chain.width)}
    elem_nonneg = chain.nonneg
    level = 0
    while any(len(k) > 1 for k in keys):
        level += 1
        where = f"{op.name} (level {level})"
        lv = _Level(elem_row, elem_nonneg)
        new_keys = []
        for ks in keys:
            nxt = [lv.pair(ks[p], ks[p + 1]) for p in range(0, len(ks) - 1, 2)]
            if len(ks) % 2:
                nxt.append(lv.single(ks[-1]))
            new_keys.append(nxt)
        # the hidden layer: relu(R (A h + c))
        n_new = len(lv.neurons)
        r_mat = sp.csr_matrix((lv.vals, (lv.rows, lv.cols)), shape=(n_new, chain.width))
        chain.check(where, "MaxPool2d", n_new, chain.n_h)
        chain.compose(r_mat, np.zeros(n_new))
        chain.emit(where, "MaxPool2d")
        # the new elements as sums of the new hidden units
        order = list(lv.elems)
        s_rows, s_cols, s_vals = [], [], []
        elem_nonneg = np.zeros(len(order), dtype=bool)
        for i, key in enumerate(order):
            terms, elem_nonneg[i] = lv.elems[key]
            for col, val in terms:
                s_rows.append(i)
                s_cols.append(col)
                s_vals.append(val)
        chain.a = sp.csr_matrix((s_vals, (s_rows, s_cols)), shape=(len(order), n_new))
        chain.c = np.zeros(len(order))
        elem_row = {key: i for i, key in enumerate(order)}
        keys = new_keys
    # select each window's maximum
    sel = [elem_row[k[0]] for k in keys]
    s = sp.csr_matrix((np.ones(len(sel)), (np.arange(len(sel)), sel)),
                      shape=(len(sel), chain.width))
    chain.compose(s, np.zeros(len(sel)))
    chain.nonneg = np.asarray(elem_nonneg)[sel]


def relu_chain(model: nn.Module, input_shape: Sequence[int], *,
               max_entries: int = MAX_ENTRIES, check: bool = True) -> FCLayers:
    """Convert a feed-forward (conv) ReLU network into an equivalent fully connected chain.

    The result ``[(W_1, b_1), ..., (W_K, b_K)]`` (float64, ReLU between consecutive layers)
    computes the same function as ``model`` on flattened (row-major) inputs: affine layers
    become dense matrices (consecutive ones multiplied together) and every max pooling
    becomes ``ceil(log2(window size))`` ReLU layers through ``max(a, b) = b + relu(a - b)``
    (the standard encoding of MIP verification, Tjeng et al., ICLR 2019); see the module
    docstring. The list is marked as converted, so the baselines' notes say
    ``"conv net as an exact FC ReLU chain of widths ..."``.

    Args:
        model: a network in eval mode whose forward is a single chain of the layers
            :func:`lipbound.graph.trace_model` accepts (Linear, Conv2d, ReLU, MaxPool2d,
            AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d/2d, Dropout, Flatten / view /
            reshape, Identity, lipbound.Normalize, and their functional forms).
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
        max_entries: refuse when a dense matrix would have more entries than this.
        check: compare the chain's float64 forward with the model's on random inputs and
            raise if they differ by more than the model's precision allows.

    Returns:
        The chain, a list of ``(W, b)`` pairs (a marked ``list`` subclass).

    Raises:
        NotFullyConnectedError: a layer that cannot be converted (all of them listed).
        ConversionTooLargeError: a dense matrix would exceed ``max_entries`` (the layer and
            the size are named).
        InputError: model in training mode, or ``input_shape`` does not fit the model.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Flatten(), nn.Linear(8, 3)).eval()
        >>> describe(relu_chain(net, (1, 6, 6)))
        '36-32-32-16-3'
    """
    from lipbound.graph import trace_model

    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(max_entries, int) or max_entries < 1:
        raise InputError(f"max_entries must be a positive integer, got {max_entries!r}")
    shape = check_input_shape(input_shape)  # (review s22: "abc" raised int()'s ValueError)
    try:
        ops = trace_model(model, shape)
    except UnsupportedModelError as exc:
        if isinstance(exc, NotFullyConnectedError):
            raise
        raise NotFullyConnectedError(exc.nodes, converting=True) from exc
    ops = [op.to(torch.device("cpu")) for op in ops]
    chain = _Chain(math.prod(shape), max_entries)
    bad: list[tuple[str, str, str]] = []
    for op in ops:
        kind = type(op).__name__
        if op.kind == "mixing":
            _mixing(op, chain, kind.removesuffix("Op"))
        elif op.kind == "diag":
            _diag(op, chain)
        elif op.kind == "reshape":
            pass  # row-major order is kept
        elif op.kind == "relu":
            if chain.a is None and chain.layers and np.all(chain.c == 0.0):
                continue  # relu(relu(x)) = relu(x)
            chain.emit(op.name, "ReLU")
        elif op.kind == "maxpool" and kind == "MaxPoolOp":
            _maxpool(op, chain)
        else:
            bad.append((op.name, kind, f"layer kind '{op.kind}' has no exact FC conversion"))
    if bad:
        raise NotFullyConnectedError(bad, converting=True)
    layers = converted(chain.finish(), from_conv=any(
        op.kind == "maxpool" or (op.kind == "mixing" and type(op).__name__ != "LinearOp")
        for op in ops))
    if check:
        _check_chain(model, layers, shape, converting=True)
    logger.debug("converted %s to the FC ReLU chain %s", type(model).__name__,
                 describe(layers))
    return layers
