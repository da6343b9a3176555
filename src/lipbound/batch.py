"""Bounds for many inputs at once, sharing all input-independent work.

:func:`bound_many` runs the local bound of Avant & Morgansen (*Analytical Bounds on the
Local Lipschitz Constants of ReLU Networks*, IEEE TNNLS 2023) or the global bound for a list
of inputs with one :class:`~lipbound.analyzer.Analyzer`: the model is traced once, the
per-layer global factors are computed once (and let every local bound use them), and the
predicted classes come from batched forward passes.
"""

from __future__ import annotations

import logging
import math
import operator
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._progress import progress_bar
from .analyzer import Analyzer, check_analyzer_settings
from .errors import InputError, LipboundError
from .results import Guarantee, _jsonable
from .validation import check_bool, check_eps, check_input, check_tight

__all__ = ["InputBound", "bound_many", "summarize"]

log = logging.getLogger(__name__)

#: CSV / table columns of one row, in order
COLUMNS: tuple[str, ...] = ("index", "name", "label", "predicted", "eps", "method", "bound",
                            "guarantee", "failure_prob", "seconds", "notes")
"""(``notes``, the last column since session 26: the row's notes joined by
:data:`NOTE_SEPARATOR`, empty when it has none.)"""

NOTE_SEPARATOR = " | "
"""Between a row's notes in its CSV cell (a note may hold ``;`` and ``,``, never ``" | "``)."""


@dataclass(frozen=True)
class InputBound:
    """The bound of one input.

    Attributes:
        index: position of the input in the list given.
        name: where the input came from (``"mnist:test/3"``, a file name, ``"[3]"``).
        label: the true class when known, else ``None``.
        predicted: the class the network predicts (argmax of the float64 forward pass).
        eps: the radius (``None`` for a global bound).
        method: ``"local"``, ``"tight"`` (the local bound with ``tight=True``: the smaller
            of the centre-plus-deviation bound and the paper's product) or ``"global"``.
        bound: the upper bound.
        guarantee: its guarantee (certified or probabilistic upper bound).
        failure_prob: failure probability of a probabilistic bound (0 otherwise).
        seconds: time of this input's own computation (shared work such as tracing and
            the global factors is counted once, in the summary's ``setup_seconds``).
        notes: the caveats of the bound, as on the :class:`~lipbound.results.BoundResult` it
            comes from: the analyzer's (the model's, a float32 model's rounding) and the
            bound's own (the global bound reported because it was smaller, which of the
            tight bound and the paper's product was reported). Since session 26 (before, a
            row carried none of them).
    """

    index: int
    name: str
    label: int | None
    predicted: int
    eps: float | None
    method: str
    bound: float
    guarantee: Guarantee
    failure_prob: float
    seconds: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (the rule of every ``to_dict``: an infinite bound as ``"inf"``,
        not the ``Infinity`` that strict JSON parsers reject)."""
        return _jsonable({"index": self.index, "name": self.name, "label": self.label,
                          "predicted": self.predicted, "eps": self.eps, "method": self.method,
                          "bound": self.bound, "guarantee": self.guarantee.value,
                          "failure_prob": self.failure_prob, "seconds": self.seconds,
                          "notes": list(self.notes)})


def _as_batch(samples: Any, input_shape: Sequence[int] | None
              ) -> tuple[list[Tensor], list[int | None], list[str]]:
    """Split ``samples`` into single inputs ``(1, *shape)``, labels and names."""
    if isinstance(samples, Tensor):
        if input_shape is not None and tuple(samples.shape) == tuple(input_shape):
            samples = samples.unsqueeze(0)
        if samples.dim() < 2:
            raise InputError(f"a batch of inputs must have shape (N, *input_shape), got "
                             f"{tuple(samples.shape)}")
        xs = [samples[i:i + 1] for i in range(samples.shape[0])]
        return xs, [None] * len(xs), [f"[{i}]" for i in range(len(xs))]
    if not isinstance(samples, Sequence) or isinstance(samples, str):
        raise InputError("samples must be a list of lipbound.inputs.Sample, a list of tensors "
                         f"or a tensor (N, *input_shape), got {type(samples).__name__}")
    xs, labels, names = [], [], []
    for i, s in enumerate(samples):
        if isinstance(s, Tensor):
            xs.append(s)  # (1, *shape) or (*shape); check_input normalises it
            labels.append(None)
            names.append(f"[{i}]")
        elif hasattr(s, "x") and isinstance(s.x, Tensor):
            xs.append(s.x)
            labels.append(getattr(s, "label", None))
            names.append(str(getattr(s, "name", f"[{i}]")))
        else:
            raise InputError(f"samples[{i}] is a {type(s).__name__}; expected a Sample or a "
                             "tensor")
    return xs, labels, names


def _eps_per_input(eps: float | Sequence[float] | None, n: int, method: str) -> list[float | None]:
    if method == "global":
        return [None] * n
    if eps is None:
        raise InputError("a local bound needs a radius: pass eps (one float or one per input)")
    from .sweep import as_radius_list

    values = as_radius_list(eps, "eps")
    if values is None:  # one radius for all inputs (a Python or NumPy number, 0-d tensor)
        return [check_eps(float(eps) if not isinstance(eps, bool) else eps)] * n
    if len(values) != n:
        raise InputError(f"got {len(values)} radii for {n} inputs; give one eps for all "
                         "inputs or exactly one per input")
    return [check_eps(e, f"eps[{i}]") for i, e in enumerate(values)]


def bound_many(model_or_analyzer: nn.Module | Analyzer, samples: Any,
               eps: float | Sequence[float] | None = None,
               method: Literal["local", "global"] = "local", *,
               input_shape: Sequence[int] | None = None, share_global: bool = True,
               batch_size: int = 256, progress: bool = False, spectral: str = "auto",
               failure_prob: float = 1e-6, seed: int = 0,
               device: str | torch.device | None = None, name: str | None = None,
               notes: Sequence[str] = (), timings: dict[str, float] | None = None,
               tight: bool = False, tight_rows: int | None = None
               ) -> list[InputBound]:
    """Local or global Lipschitz upper bounds for many inputs (Avant & Morgansen 2023).

    Args:
        model_or_analyzer: the network (eval mode) or an :class:`Analyzer` of it (pass one
            Analyzer to several calls to share its caches).
        samples: a list of :class:`lipbound.inputs.Sample` (labels and names are kept), a
            list of tensors ``(1, *input_shape)``, or one tensor ``(N, *input_shape)``.
        eps: the radius: one number for all inputs (a Python or NumPy number, a 0-d tensor
            or array), or a sequence with one per input (ignored for ``method="global"``).
        method: ``"local"`` (bound over the ball around each input) or ``"global"``.
        input_shape: per-sample shape (default: from the first input).
        share_global: compute the per-layer global factors once before the local bounds, so
            every local bound can use them (often tighter, and then never above the global
            bound); each input gets the same treatment whatever the number of inputs.
        batch_size: inputs per forward pass when predicting classes.
        progress: show a bar over the inputs on stderr (only on a terminal, after a few
            seconds: see :mod:`lipbound._progress`).
        spectral, failure_prob, seed, device, name, notes: passed to a new
            :class:`Analyzer` (ignored when one is given).
        timings: optional dict that receives ``setup_seconds`` (tracing and the global
            factors) and ``total_seconds``.
        tight: local bounds with ``tight=True`` (:meth:`Analyzer.local_bound`; rows
            labelled ``"tight"``); ``tight_rows``: its budget of rows, an integer >= 1
            (None: the default), only with ``tight=True``.

    Returns:
        One :class:`InputBound` per input, in input order.

    Raises:
        InputError: empty or malformed inputs, a bad radius, or a radius count that does
            not match the input count.
    """
    t_start = time.perf_counter()
    if method not in ("local", "global"):
        raise InputError(f"method must be 'local' or 'global', got {method!r}")
    tight_rows = check_tight(tight, tight_rows)
    share_global = check_bool(share_global, "share_global")
    progress = check_bool(progress, "progress")
    if tight and method == "global":
        raise InputError("tight tightens local bounds; the global bound has none: use "
                         "method='local', or tight=False")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if timings is not None and not isinstance(timings, dict):  # (an AttributeError at the end)
        raise InputError(f"timings must be a dict (it receives the times) or None, got "
                         f"{type(timings).__name__}")
    if isinstance(model_or_analyzer, Analyzer):
        an = model_or_analyzer
        check_analyzer_settings(an, spectral=(spectral, "auto"),
                                failure_prob=(failure_prob, 1e-6), seed=(seed, 0),
                                device=(device, None), input_shape=(input_shape, None))
        shape = an.input_shape
    elif isinstance(model_or_analyzer, nn.Module):
        an, shape = None, input_shape
    else:
        raise InputError("model_or_analyzer must be a torch.nn.Module or a lipbound.Analyzer, "
                         f"got {type(model_or_analyzer).__name__}")
    xs, labels, names = _as_batch(samples, shape)
    if not xs:
        raise InputError("no inputs given; pass at least one input")
    if an is None:
        shape = tuple(input_shape) if input_shape is not None else tuple(xs[0].shape[1:])
        try:
            an = Analyzer(model_or_analyzer, shape, device=device, spectral=spectral,
                          failure_prob=failure_prob, seed=seed, name=name, notes=notes)
        except InputError as exc:
            if input_shape is not None or "input of shape" not in str(exc):
                raise
            raise InputError(f"{exc}\nThe per-sample shape {shape} was taken from the first "
                             f"input {names[0]} (shape {tuple(xs[0].shape)}) without its first "
                             "axis, the batch axis; give inputs as (1, *input_shape) or pass "
                             "input_shape=...") from None
    xs = [check_input(x, an.input_shape, f"input {names[i]}") for i, x in enumerate(xs)]
    labels = _check_labels(labels, names, math.prod(an.output_shape))
    eps_list = _eps_per_input(eps, len(xs), method)

    if method == "global" or share_global:
        an.global_bound(progress=progress)  # cached on the Analyzer: later calls are lookups
    preds: list[int] = []
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            out = an.forward(torch.cat(xs[i:i + batch_size]))
            out = out.reshape(out.shape[0], -1)
            finite = torch.isfinite(out).all(dim=1)
            if not bool(finite.all()):
                # (argmax of NaN scores is a class like any other: the row would claim it)
                k = i + int((~finite).nonzero()[0, 0])
                raise InputError(f"input {names[k]} (position {k}): the network's float64 "
                                 "output there is not finite (NaN/inf), so it has no predicted "
                                 "class; check the input (its scale and normalisation) and "
                                 "the weights, or leave that input out")
            preds += out.argmax(dim=1).tolist()
    setup = time.perf_counter() - t_start

    rows = []
    with progress_bar(progress, len(xs), f"{method} bounds", "input") as bar:
        for i in range(len(xs)):
            bar.label(names[i])
            try:
                r = an.global_bound() if method == "global" else \
                    an.local_bound(xs[i], eps_list[i], tight=tight, tight_rows=tight_rows)
            except LipboundError as exc:
                name_failing_input(exc, names[i], i)
                raise
            rows.append(InputBound(index=i, name=names[i], label=labels[i], predicted=preds[i],
                                   eps=eps_list[i], method="tight" if tight else method,
                                   bound=float(r.value),
                                   guarantee=r.guarantee, failure_prob=float(r.failure_prob),
                                   seconds=float(r.seconds), notes=tuple(r.notes)))
            log.info("%s bound of input %s: %.6g (%.3fs)", method, names[i], r.value,
                     r.seconds)
            bar.update()
    if timings is not None:
        timings["setup_seconds"] = timings.get("setup_seconds", 0.0) + setup
        timings["total_seconds"] = timings.get("total_seconds", 0.0) + \
            time.perf_counter() - t_start
    return rows


def _check_labels(labels: list, names: list[str], n_classes: int) -> list[int | None]:
    """The inputs' labels as class indices of the model's ``n_classes`` outputs (or ``None``).

    Raises:
        InputError: a label that is no class index of the model (session 25: a label 12 for a
            10-class network was counted as a wrong prediction in the summary's accuracy).
    """
    out: list[int | None] = []
    for label, name in zip(labels, names, strict=True):
        if label is None:
            out.append(None)
            continue
        try:
            k = operator.index(label) if not isinstance(label, bool) else None
        except TypeError:
            k = None
        if k is None or not 0 <= k < n_classes:
            raise InputError(f"input {name} has the label {label!r}, which is no class of the "
                             f"model's {n_classes} outputs (0-{n_classes - 1}); fix the label "
                             "(e.g. the first column of a CSV row) or give the input without "
                             "one")
        out.append(k)
    return out


def name_failing_input(exc: LipboundError, name: str, index: int) -> None:
    """Prefix the message of ``exc`` (raised for one input of many) with the input's name and
    position, keeping its type and attributes: among a whole test set, an error that does
    not say which input failed cannot be acted on."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"input {name} (position {index}): {exc.args[0]}", *exc.args[1:])


def summarize(rows: Sequence[InputBound]) -> dict[str, Any]:
    """Per method: number of inputs, min/median/max of the seconds and of the bound, and
    the guarantees present."""
    out: dict[str, Any] = {}
    for m in dict.fromkeys(r.method for r in rows):
        sel = [r for r in rows if r.method == m]
        secs = [r.seconds for r in sel]
        vals = [r.bound for r in sel]
        out[m] = {
            "n": len(sel),
            "seconds": {"min": min(secs), "median": statistics.median(secs),
                        "max": max(secs), "total": sum(secs)},
            "bound": {"min": min(vals), "median": statistics.median(vals), "max": max(vals)},
            "guarantees": sorted({r.guarantee.value for r in sel}),
            "max_failure_prob": max(r.failure_prob for r in sel),
        }
        labelled = [r for r in sel if r.label is not None]
        if labelled:
            out[m]["accuracy"] = sum(r.label == r.predicted for r in labelled) / len(labelled)
    return out
