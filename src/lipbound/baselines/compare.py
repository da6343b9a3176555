"""Side-by-side comparison of lipbound's bounds with the rival methods.

:func:`compare` runs every method on one network, input and radius and returns one
:class:`CompareRow` per method. A method that cannot run (not a fully connected network,
a missing optional dependency, a network too large for an exact method, a solver failure)
gives a row saying why; the table never fails because of one method.

The rows measure different quantities, and each row says which:

* ``local L2, rel. x0`` -- ``sup_{0<||x-x0||<=eps} ||f(x)-f(x0)||/||x-x0||`` (lipbound's local
  bound, ``docs/method.md``; the lower bound is for this quantity too);
* ``local L2, all pairs`` -- ``sup_{x!=y in B(x0,eps)} ||f(x)-f(y)||/||x-y||`` (exact-l2,
  Fast-Lip, RecurJac); at least the previous one;
* ``global L2`` -- over all pairs of inputs (lipbound's global bound, AutoLip, SeqLip,
  LipSDP, ECLipsE-Fast); at least both local ones;
* ``local l_inf->l1 (c^T f)`` -- lipMIP's quantity, for the logit margin ``c^T f`` with
  ``c = e_top - e_runner-up`` on the l_inf box of radius eps; not comparable with the L2 rows.

So ``lower <= local L2 rel. x0`` and ``lower <= any L2 upper bound`` must always hold;
``compare`` checks the second and marks any violation in the row's note.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lipbound._modelinfo import model_dtype_device
from lipbound._progress import progress_bar
from lipbound._rounding import g_down, g_up
from lipbound.baselines.deadline import check_time_limit
from lipbound.baselines.fc import (
    FCLayers,
    NotFullyConnectedError,
    chain_note,
    chain_notes,
    check_eps,
    check_runs_on,
    fc_layers,
    is_converted,
)
from lipbound.errors import InputError, LipboundError, UnsupportedModelError
from lipbound.graph import check_eval_mode
from lipbound.results import BoundResult, Guarantee, format_prob_up
from lipbound.validation import check_bool, check_finite, check_int, check_plain_tensor

logger = logging.getLogger(__name__)

__all__ = ["CompareRow", "compare", "format_table", "METHODS"]

#: start of the note of a rival's row when the network is neither fully connected nor
#: convertible into an exact fully connected ReLU chain
NOT_FC = "not supported: fully connected networks (or conv nets convertible to one) only"

Q_REL = "local L2, rel. x0"
Q_PAIRS = "local L2, all pairs in ball"
Q_GLOBAL = "global L2"
Q_MIP = "local l_inf->l1 (c^T f), box"


@dataclass(frozen=True)
class CompareRow:
    """One method's result in a comparison.

    Attributes:
        method: the method's name (see :data:`METHODS`).
        quantity: which constant the value refers to (short label, see module docstring).
        guarantee: what the value is, or ``None`` when the method did not produce one.
        value: the number (NaN when the method did not run or gave no bound).
        seconds: wall-clock time of the method.
        note: caveats, or why the method did not run.
        failure_prob: for a PROBABILISTIC value, the probability (over the method's own
            random draws) that it is not an upper bound; 0 otherwise. (Review s22: the rows
            dropped it, so a probabilistic row of the table and of the CLI's JSON stated no
            failure probability at all.)
    """

    method: str
    quantity: str
    guarantee: Guarantee | None
    value: float
    seconds: float
    note: str = ""
    failure_prob: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        v = self.value
        return {
            "method": self.method,
            "quantity": self.quantity,
            "guarantee": self.guarantee.value if self.guarantee is not None else None,
            "value": v if math.isfinite(v) else None,
            "failure_prob": self.failure_prob,
            "seconds": self.seconds,
            "note": self.note,
        }

    def guarantee_label(self) -> str:
        """The guarantee as the table shows it: ``"-"`` when there is none, and a
        probabilistic one with its failure probability (``p_fail<=1e-06``, rounded up)."""
        if self.guarantee is None:
            return "-"
        if self.failure_prob > 0:
            return f"{self.guarantee.value} (p_fail<={format_prob_up(self.failure_prob)})"
        return self.guarantee.value


@dataclass
class _Ctx:
    model: nn.Module
    x0: torch.Tensor
    eps: float
    name: str | None
    layers: FCLayers | None
    fc_error: Exception | None
    exact_time_limit: float
    seed: int = 0
    time_limit: float | None = None
    progress: bool = False
    chain_notes: tuple[str, ...] = ()  # (caveats of the extraction: F32_CHAIN_NOTE)


def _fc(ctx: _Ctx) -> FCLayers:
    if ctx.layers is None:
        raise ctx.fc_error if ctx.fc_error is not None else NotFullyConnectedError([])
    return ctx.layers


def _margin_vector(ctx: _Ctx) -> tuple[torch.Tensor | None, str]:
    dtype, device = model_dtype_device(ctx.model)  # x0 may be a CPU input of a CUDA model
    with torch.no_grad():
        y = ctx.model(ctx.x0.to(device=device, dtype=dtype, copy=True)).detach().cpu().to(
            torch.float64).reshape(-1)
    if y.numel() < 2:
        return None, "c = 1 (single output)"
    top = torch.argsort(y, descending=True)
    c = torch.zeros_like(y)
    c[top[0]], c[top[1]] = 1.0, -1.0
    return c, f"c = e_{int(top[0])} - e_{int(top[1])} (top class minus runner-up)"


def _run_local(ctx: _Ctx) -> BoundResult:
    from lipbound import local_bound

    return local_bound(ctx.model, ctx.x0, ctx.eps, seed=ctx.seed, progress=ctx.progress)


def _run_local_tight(ctx: _Ctx) -> BoundResult:
    from lipbound import local_bound

    return local_bound(ctx.model, ctx.x0, ctx.eps, seed=ctx.seed, progress=ctx.progress,
                       tight=True)


def _run_global(ctx: _Ctx) -> BoundResult:
    from lipbound import global_bound

    return global_bound(ctx.model, ctx.x0, seed=ctx.seed, progress=ctx.progress)


@dataclass(frozen=True)
class _Lower:
    value: float
    guarantee: Guarantee
    seconds: float
    notes: tuple[str, ...]


def _run_lower(ctx: _Ctx) -> Any:
    t0 = time.perf_counter()
    from lipbound.lower import best_lower_bound

    res = best_lower_bound(ctx.model, ctx.x0, ctx.eps, seed=ctx.seed)
    details = res.details
    notes = [f"best of random/gradient/PGD (winner: {details['winner']})"]
    used = details.get("winner_details", {}).get("evaluated_in", "float64")
    if used != "float64":
        notes.append(f"witness evaluated in {used} (no float64 copy of the model)")
    if "note" in details:  # (no finite ratio found: the value is 0; session 26)
        notes.append(details["note"])
    return _Lower(float(res.value), Guarantee.LOWER, time.perf_counter() - t0, tuple(notes))


def _baseline(fn_name: str, module: str, local: bool, **kw: Any
              ) -> Callable[[_Ctx], BoundResult]:
    def run(ctx: _Ctx) -> BoundResult:
        import importlib

        fn = getattr(importlib.import_module(f"lipbound.baselines.{module}"), fn_name)
        layers = _fc(ctx)
        if local:
            return fn(layers, ctx.x0, ctx.eps, model_name=ctx.name, time_limit=ctx.time_limit,
                      **kw)
        return fn(layers, model_name=ctx.name, time_limit=ctx.time_limit, **kw)
    return run


def _run_exact(ctx: _Ctx) -> BoundResult:
    from lipbound.baselines.exact import exact_local_l2

    return exact_local_l2(_fc(ctx), ctx.x0, ctx.eps, time_limit=ctx.exact_time_limit,
                          model_name=ctx.name)


def _run_lipmip(ctx: _Ctx) -> BoundResult:
    from lipbound.baselines.exact import lipmip

    layers = _fc(ctx)
    c, _ = _margin_vector(ctx)
    return lipmip(layers, ctx.x0, ctx.eps, c=c, time_limit=ctx.exact_time_limit,
                  model_name=ctx.name)


#: method name -> (quantity label, runner)
METHODS: dict[str, tuple[str, Callable[[_Ctx], Any]]] = {
    "lower": (Q_REL, _run_lower),
    "local": (Q_REL, _run_local),
    "local-tight": (Q_REL, _run_local_tight),
    "exact-l2": (Q_PAIRS, _run_exact),
    "recurjac": (Q_PAIRS, _baseline("recurjac", "recurjac", True)),
    "fastlip": (Q_PAIRS, _baseline("fastlip", "recurjac", True)),
    "global": (Q_GLOBAL, _run_global),
    "autolip": (Q_GLOBAL, _baseline("autolip", "autolip", False)),
    "seqlip": (Q_GLOBAL, _baseline("seqlip", "seqlip", False)),
    "lipsdp-neuron": (Q_GLOBAL, _baseline("lipsdp", "lipsdp", False, variant="neuron")),
    "lipsdp-layer": (Q_GLOBAL, _baseline("lipsdp", "lipsdp", False, variant="layer")),
    "eclipse-fast": (Q_GLOBAL, _baseline("eclipse_fast", "eclipse", False)),
    "lipmip": (Q_MIP, _run_lipmip),
}

#: lipbound's own methods (the intake's refusal of a model is theirs too); the rivals' rows
#: say why each cannot run (not fully connected, too large, time limit)
_OWN = {"lower", "local", "local-tight", "global"}

_FC_ONLY = {"exact-l2", "recurjac", "fastlip", "autolip", "seqlip", "lipsdp-neuron",
            "lipsdp-layer", "eclipse-fast", "lipmip"}


def _short_note(exc: BaseException) -> str:
    if type(exc) is UnsupportedModelError and exc.nodes:
        # (its first line alone, "the model has 1 unsupported operation(s):", named none)
        return f"the model has {len(exc.nodes)} unsupported operation(s): " + "; ".join(
            f"{where}: {kind}" + (f" ({detail})" if detail else "")
            for where, kind, detail in exc.nodes)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _not_fc_note(exc: UnsupportedModelError) -> str:
    """The row note of a rival that cannot take the network."""
    from lipbound.baselines.conv_to_fc import ConversionTooLargeError

    if isinstance(exc, ConversionTooLargeError):
        return f"not supported: {_short_note(exc)}"
    if isinstance(exc, NotFullyConnectedError) and exc.nodes:
        return f"{NOT_FC}; unsupported: {exc.summary()}"
    return NOT_FC


def _note_of(method: str, res: Any, ctx: _Ctx) -> str:
    notes = list(getattr(res, "notes", ()) or ())
    parts: list[str] = []
    if method == "lipmip":
        parts.append(_margin_vector(ctx)[1])
    if method == "lower":
        parts.extend(notes)
    elif method in ("exact-l2", "lipmip") and notes:
        parts.extend(n for n in notes[1:] if "witness" not in n and "quantity" not in n)
    elif method.startswith("lipsdp") and notes:
        parts.extend(n for n in notes if "status" in n)
    elif method == "seqlip":
        parts.extend(n for n in notes if "greedy" in n or "exact" in n)
    elif method in ("local", "global") and notes:
        parts.extend(notes)
    elif method == "local-tight":
        # which bound was reported (the other notes are the plain local bound's)
        parts.extend(n for n in notes if "tight bound" in n or "paper's bound" in n
                     or n.startswith("float32 rounding"))
    if method in _FC_ONLY and ctx.layers is not None and is_converted(ctx.layers):
        parts.append(chain_note(ctx.layers))
    if method in _FC_ONLY and ctx.layers is not None:
        parts.extend(ctx.chain_notes)
    return "; ".join(parts)


def compare(model: nn.Module, x0: torch.Tensor, eps: float,
            methods: Sequence[str] | str | None = None, *, model_name: str | None = None,
            exact_time_limit: float | None = None, seed: int = 0,
            time_limit: float | None = None, progress: bool = False) -> list[CompareRow]:
    """Run lipbound's bounds and the rival methods on one network, input and radius.

    Args:
        model: network in eval mode, ``(N, *shape) -> (N, n_out)``.
        x0: nominal input, shape ``(1, *shape)``.
        eps: L2 radius (> 0); lipMIP uses the l_inf box of the same radius.
        methods: names from :data:`METHODS` (default: all, in that order); a string is
            read as a comma-separated list.
        model_name: a name stored in the results.
        exact_time_limit: time limit in seconds of each exact method (exact-l2, lipMIP);
            default ``time_limit``, or 60 s when that is ``None`` too.
        seed: seed of lipbound's own random draws (the Lanczos start vectors of its local
            and global bounds, the lower bound's samples and restarts).
        time_limit: time limit in seconds of each other rival method (AutoLip, SeqLip,
            LipSDP, ECLipsE-Fast, Fast-Lip, RecurJac), each on its own; ``None``: no limit.
            Checked between a method's steps (:mod:`lipbound.baselines.deadline`), so a
            method may overrun it by one step; one that reaches it gives a row with NaN and
            a note ``"not run: ... time limit of ... s reached after ..."``. lipbound's own
            bounds, the lower bound and the conversion of a conv net into a chain are not
            limited.
        progress: show a bar over the methods on stderr, naming the one running (only on a
            terminal, after a few seconds: see :mod:`lipbound._progress`); lipbound's own
            bounds add a bar over their layers. The rows are the same either way.

    Returns:
        One :class:`CompareRow` per method, in the order of :data:`METHODS`. Methods that
        do not support the network give a row with NaN and the reason (for a network that is
        neither fully connected nor convertible: a note starting with :data:`NOT_FC`). A conv
        net is given to the rival methods as its exact fully connected ReLU chain
        (:func:`lipbound.baselines.conv_to_fc.relu_chain`); their rows then say
        ``"conv net as an exact FC ReLU chain of widths ..."``, and methods that cannot scale
        to those widths refuse with the size (``"not run: ..."``).

    Raises:
        InputError: unknown method names, bad ``x0`` or ``eps``, a model in training mode.
        LipboundError: when no method gave a value, one of lipbound's own (``lower``,
            ``local``, ``local-tight``, ``global``) was asked for, and lipbound's intake
            refuses the model or ``x0`` (an unsupported layer, NaN weights, a forward pass
            that fails on ``x0``'s shape or is not finite): the error
            :func:`lipbound.local_bound` raises (same class and message), instead of a table
            whose rows all say the same (since session 25). The rival methods' rows say why
            each cannot run (not fully connected, too large, a time limit) and stay rows
            when only rivals are asked for, or when some method ran.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    progress = check_bool(progress, "progress")
    # up front (session 22): a model in training mode gave a table of "not run" rows and exit
    # status 0, each method refusing it on its own
    check_eval_mode(model)
    eps = check_eps(eps)
    seed = check_int(seed, "seed", 0)
    time_limit = check_time_limit(time_limit, "time_limit")
    if exact_time_limit is None:
        exact_limit = time_limit if time_limit is not None else 60.0
    else:
        exact_limit = check_time_limit(exact_time_limit, "exact_time_limit")
        exact_limit = math.inf if exact_limit is None else exact_limit
    if not isinstance(x0, torch.Tensor):
        try:
            x0 = torch.as_tensor(x0, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:  # (review s22: a ragged list)
            raise InputError(f"x0 must be a tensor of shape (1, *input_shape), got "
                             f"{type(x0).__name__}: {exc}") from exc
    # (review s22) a complex x0 reached the rivals, whose float64 cast dropped its imaginary
    # part (EXACT / CERTIFIED rows for another input), while lipbound's own rows refused it
    check_plain_tensor(x0, "x0")
    if not x0.is_floating_point():  # (review s22) as lipbound's own intake: the lower bound's
        x0 = x0.to(torch.float32)  # row alone refused an integer x0 ("not run")
    if x0.dim() < 2 or x0.shape[0] != 1:
        raise InputError(f"x0 must have a batch dimension of 1, got shape {tuple(x0.shape)}; "
                         "pass one input as x0.unsqueeze(0) (shape (1, *input_shape))")
    check_finite(x0, "x0")
    # up front (session 25): an x0 the model cannot take gave a table of "not run" rows
    check_runs_on(model, x0)
    if methods is None:
        names = list(METHODS)
    else:
        # (review s22) a string is a comma-separated list of names (it was read letter by
        # letter), and an empty list is refused (it gave an empty table, exit status 0)
        items = methods.split(",") if isinstance(methods, str) else list(methods)
        names = [n for n in (str(m).strip().lower() for m in items) if n]
        if not names:
            raise InputError(f"no method to run (methods={methods!r}); choose from "
                             f"{list(METHODS)}, or pass None for all")
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        names = [m for m in METHODS if m in names]  # canonical order, no duplicates
    layers: FCLayers | None = None
    fc_error: Exception | None = None
    rows: list[CompareRow] = []
    extra: list[str] = []
    desc = f"compare {model_name}" if model_name else "compare"
    with progress_bar(progress, len(names), desc, "method") as bar:
        if any(m in _FC_ONLY for m in names):
            bar.label("FC chain of the network")
            try:
                with chain_notes() as extra:
                    layers = fc_layers(model, input_shape=tuple(x0.shape[1:]))
            except (UnsupportedModelError, InputError) as exc:  # not convertible, too large
                fc_error = exc
                logger.info("baselines: %s", _short_note(exc))
        ctx = _Ctx(model, x0, eps, model_name, layers, fc_error, exact_limit, seed, time_limit,
                   bool(progress), tuple(extra))
        for name in names:
            bar.label(name)
            rows.append(_run_method(name, ctx))
            bar.update()
    if all(r.guarantee is None for r in rows) and any(r.method in _OWN for r in rows):
        refusal = _intake_refusal(model, x0, eps, seed)
        if refusal is not None:
            raise refusal
    return _check_floor(rows)


def _intake_refusal(model: nn.Module, x0: torch.Tensor, eps: float, seed: int
                    ) -> LipboundError | None:
    """The error with which :func:`lipbound.local_bound` refuses ``(model, x0, eps)`` at its
    intake (before any bound is computed: the model traced and checked, ``x0`` checked), or
    ``None`` when it accepts them. Asked only when no method of a comparison gave a value:
    such a refusal concerns the model or the input, which every method shares (session 25:
    a model with NaN weights or an unsupported layer gave a table of rows that all said the
    same "not run: ...")."""
    from lipbound.analyzer import _analyzer

    try:
        _analyzer(model, x0, None, seed=seed)._check(x0, eps)
    except LipboundError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - not a refusal: the table is returned
        logger.debug("compare: the intake probe failed (%s: %s)", type(exc).__name__, exc)
    return None


def _run_method(name: str, ctx: _Ctx) -> CompareRow:
    """One method's row; a method that cannot run gives a row saying why."""
    quantity, runner = METHODS[name]
    t0 = time.perf_counter()
    try:
        res = runner(ctx)
    except UnsupportedModelError as exc:
        note = (_not_fc_note(exc) if name in _FC_ONLY
                else f"not supported: {_short_note(exc)}")
        return CompareRow(name, quantity, None, math.nan, time.perf_counter() - t0, note)
    except ImportError as exc:
        return CompareRow(name, quantity, None, math.nan, time.perf_counter() - t0,
                          f"not available: {_short_note(exc)}")
    except LipboundError as exc:
        return CompareRow(name, quantity, None, math.nan, time.perf_counter() - t0,
                          f"not run: {_short_note(exc)}")
    except Exception as exc:  # one failing method must not break the table
        logger.exception("compare: method %s failed", name)
        return CompareRow(name, quantity, None, math.nan, time.perf_counter() - t0,
                          f"error: {type(exc).__name__}: {_short_note(exc)}")
    seconds = float(getattr(res, "seconds", time.perf_counter() - t0))
    return CompareRow(name, quantity, res.guarantee, float(res.value), seconds,
                      _note_of(name, res, ctx),
                      float(getattr(res, "failure_prob", 0.0) or 0.0))


def _check_floor(rows: list[CompareRow]) -> list[CompareRow]:
    """Mark L2 upper bounds below the empirical lower bound (a bug, or float32 rounding)."""
    floor = next((r.value for r in rows if r.method == "lower" and math.isfinite(r.value)),
                 None)
    if floor is None:
        return rows
    out = []
    for r in rows:
        is_l2_upper = (r.guarantee is not None and r.guarantee.is_upper_bound
                       and r.quantity in (Q_REL, Q_PAIRS, Q_GLOBAL))
        if is_l2_upper and math.isfinite(r.value) and r.value < floor * (1 - 1e-4):
            logger.error("compare: %s = %.6g is below the lower bound %.6g", r.method,
                         r.value, floor)
            note = f"BELOW THE LOWER BOUND {floor:.6g}: unsound!" + (
                f"; {r.note}" if r.note else "")
            r = CompareRow(r.method, r.quantity, r.guarantee, r.value, r.seconds, note,
                           r.failure_prob)
        out.append(r)
    return out


def violations(rows: Sequence[CompareRow]) -> list[CompareRow]:
    """Rows whose upper bound fell below the lower bound."""
    return [r for r in rows if r.note.startswith("BELOW THE LOWER BOUND")]


def _shown(row: CompareRow) -> str:
    """A row's value with 6 significant digits, rounded in the direction of its guarantee
    (session 22, after the CLI review): upper bounds up, lower bounds down (to nearest, a
    value 1.2345649 of an upper bound would be shown as 1.23456, below it), exact values up
    too (``Guarantee.is_upper_bound``: they carry a margin that keeps them above), estimates
    to nearest."""
    g = row.guarantee
    if g is not None and g.is_upper_bound:
        return g_up(row.value, 6)
    if g in (Guarantee.LOWER, Guarantee.CERTIFIED_LOWER, Guarantee.PROBABILISTIC_LOWER):
        return g_down(row.value, 6)
    return f"{row.value:.6g}"


def format_table(rows: Sequence[CompareRow], *, note_width: int = 70) -> str:
    """Plain-text table of the rows (method, quantity, guarantee, value, seconds, note)."""
    head = ("method", "quantity", "guarantee", "value", "time [s]", "note")
    body = []
    for r in rows:
        g = r.guarantee_label()
        v = _shown(r) if math.isfinite(r.value) else "-"
        note = r.note if len(r.note) <= note_width else r.note[:note_width - 3] + "..."
        body.append((r.method, r.quantity, g, v, f"{r.seconds:.3f}", note))
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i])
              for i in range(len(head))]
    right = {3, 4}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])
