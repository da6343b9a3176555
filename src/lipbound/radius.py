"""Certified L2 robustness radii from Lipschitz bounds (Avant & Morgansen, *Analytical Bounds on
the Local Lipschitz Constants of ReLU Networks*, IEEE TNNLS 2023, section "adversarial
radius"; method.md "Adversarial (certified) radius").

A certified radius ``r`` at an input ``x0`` is a number such that the predicted class of the
network is the same at every ``x`` with ``||x - x0||_2 <= r``. Three certificates:

* ``"local"`` (the paper): the largest ``eps`` (to a relative tolerance) with
  ``eps * L(x0, eps) < delta / sqrt(2)``, where ``L`` is the local bound of
  :meth:`lipbound.Analyzer.local_bound` and ``delta`` the margin between the top two scores.
* ``"margin"`` (beyond the paper): for every rival class ``j`` the local constant of the
  scalar function ``y_c - y_j`` is bounded separately (``L_j``, from
  :meth:`lipbound.Analyzer.local_bound_rows`) and ``eps * L_j(eps) < delta_j = y_c(x0) -
  y_j(x0)`` is required for all ``j``. Never smaller than ``"local"`` (see
  :func:`certified_radius`).
* ``"global"``: ``delta / (sqrt(2) L_global)``.

Every radius is measured in the model's own input space (for the zoo networks: the
normalised space, as in the paper) and certifies the network as computed in exact
arithmetic from its weights (the analysis runs in float64); a float32 forward pass can in
principle disagree within float32 rounding of a tie.

Example:
    >>> from lipbound import zoo, inputs
    >>> lm = zoo.load_model("mnist")
    >>> x0 = inputs.load_sample("mnist:8", entry=lm.entry).x
    >>> certified_radius(lm.model, x0).radius                             # doctest: +ELLIPSIS
    0.0518...
    >>> [r.radius for r in certified_radii(lm.model, x0)]                 # doctest: +ELLIPSIS
    [0.0517..., 0.0997..., 0.000346...]
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._modelinfo import model_dtype_device, unwrap_model
from ._precision import exact_float32
from ._progress import NULL_BAR, NullBar, progress_bar
from .analyzer import TIGHT_ROWS, Analyzer, check_analyzer_options, check_reused_analyzer
from .errors import InputError
from .results import Guarantee, _jsonable, format_prob_up, lower_bound_from
from .spectral import SAFETY
from .validation import (
    check_bool,
    check_count,
    check_eps,
    check_input,
    check_reuse_tol,
    check_tight,
)

__all__ = ["METHODS", "RadiusMethod", "RadiusResult", "best", "certified_radii",
           "certified_radius", "exact_class_change"]

log = logging.getLogger(__name__)

RadiusMethod = Literal["local", "margin", "global"]
METHODS: tuple[str, ...] = ("local", "margin", "global")

RADIUS_QUANTITY = ("lower bound on the smallest L2 input change that changes the predicted "
                   "class")
SQRT2 = math.sqrt(2.0)
#: relative amount by which a threshold is lowered so that a float comparison ``eps*L < T``
#: implies the exact one (float64 products round by ~1e-16).
_ROUND = 1e-12
#: the search gives up above this radius by default (a network whose bound stays 0).
DEFAULT_MAX_EPS = 1e12
#: independent re-checks tried before a probabilistic radius is given up.
_RECHECKS = 3
#: after the j-th failed re-check the next one tests the failed radius' fixed-point step
#: ``eps / ratio`` times ``_RECHECK_BACKOFF[j]``: the step alone aims at ratio 1 exactly, and
#: a twin whose draws give a bound larger by a fraction of a percent (the run-to-run spread of
#: a probabilistic bound) fails it again, as all three did on one CIFAR-10 test image.
_RECHECK_BACKOFF = (0.99, 0.95)
#: default ``reuse_tol`` of the search (see :func:`certified_radius`).
DEFAULT_REUSE_TOL = 0.02


@dataclass(frozen=True)
class RadiusResult:
    """A certified L2 radius: no class change within ``radius`` of ``x0``.

    Attributes:
        method: ``"local"``, ``"margin"`` or ``"global"``.
        radius: the certified radius (0.0 when nothing could be certified, see
            ``details["reason"]``); ``inf`` when the bound is 0 (a constant network).
        guarantee: ``CERTIFIED_LOWER`` (deterministic: the radius is a lower bound on the
            smallest adversarial perturbation) or ``PROBABILISTIC_LOWER`` (the Lipschitz
            bound used holds with probability >= 1 - ``failure_prob`` over lipbound's own
            random draws, never over the data).
        predicted_class: the class at ``x0`` (argmax of the float64 forward pass).
        margin: ``delta = y_c(x0) - max_{j != c} y_j(x0)``.
        tol: requested relative tolerance of the search (``radius`` is within a factor
            ``1 + tol`` of the largest radius the test can certify, see ``upper``).
        n_bound_evaluations: number of Lipschitz-bound computations used.
        seconds: wall-clock time.
        failure_prob: failure probability of a probabilistic radius (0 if certified).
        runner_up: the second class at ``x0`` (``None`` for a tie-free single class).
        bound: the Lipschitz bound that certified ``radius`` (for ``"margin"``: the largest
            ``L_j / delta_j`` ratio times ``delta``, i.e. the binding rival's scaled bound).
        upper: the smallest radius at which the test was seen to fail (``None`` if none
            was evaluated): the test cannot certify beyond it (an upper end of what this
            test certifies, not an upper bound on the smallest adversarial perturbation:
            attacks give those). With ``reuse_tol > 0`` that
            test may have used reused (slightly looser) layer factors, so a test with fresh
            factors can pass a little beyond it (measured on the 100 MNIST test images with
            the default: radii median 0.5 %, at most 3 % below those of ``reuse_tol=0``).
        norm: ``"l2"``.
        model: a name for the model.
        notes: caveats: the analyzer's (e.g. "seeded random weights", a float32 model's
            rounding), then those of the bound that certified ``radius`` (since session 26:
            with ``tight=True``, whether the tight bound or the paper's product was used; the
            global bound used because it was smaller).
        details: method-specific facts: ``threshold``, ``binding_class``, ``evaluations``
            (``[eps, ratio, passed]``), ``achieved_tol``, ``reason`` when the radius is 0 or
            capped, ``rechecks``.
    """

    method: str
    radius: float
    guarantee: Guarantee
    predicted_class: int
    margin: float
    tol: float
    n_bound_evaluations: int
    seconds: float
    failure_prob: float = 0.0
    runner_up: int | None = None
    bound: float | None = None
    upper: float | None = None
    norm: str = "l2"
    model: str | None = None
    notes: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def guarantee_label(self) -> str:
        """What the radius is: a certified (deterministic) or probabilistic *lower* bound on
        the smallest adversarial perturbation (attacks give upper bounds on it)."""
        return self.guarantee.value

    @property
    def guarantee_text(self) -> str:
        """The guarantee in words, for tables: deterministic or with its probability."""
        if self.guarantee == Guarantee.PROBABILISTIC_LOWER:
            return f"probabilistic (failure prob <= {format_prob_up(self.failure_prob)})"
        return "deterministic"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (enums as their strings, inf/nan as strings/None)."""
        return _jsonable({
            "method": self.method, "radius": self.radius, "quantity": RADIUS_QUANTITY,
            "guarantee": self.guarantee_label,
            "guarantee_text": self.guarantee_text, "failure_prob": self.failure_prob,
            "predicted_class": self.predicted_class,
            "runner_up": self.runner_up, "margin": self.margin, "tol": self.tol,
            "bound": self.bound, "upper": self.upper,
            "n_bound_evaluations": self.n_bound_evaluations, "seconds": self.seconds,
            "norm": self.norm, "model": self.model, "notes": list(self.notes),
            "details": self.details,
        })


# ---------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class _Problem:
    """What every test at one input shares: the class, margins and thresholds."""

    x0: Tensor
    scores: Tensor          # (n,) float64 on the CPU
    cls: int
    runner_up: int
    delta: float            # y_c - y_r
    rivals: Tensor          # (n-1,) long: classes j != c
    deltas: Tensor          # (n-1,) float64: y_c - y_j
    t_local: float          # threshold of the sqrt(2) test
    t_rows: Tensor          # (n-1,) thresholds of the per-rival tests
    c_rows: Tensor          # (n-1, n) rows e_c - e_j
    model_cls: int | None = None  # the class of the model's own forward pass (its dtype)
    model_dtype: str = "float64"
    cache: dict = field(default_factory=dict, compare=False)  # nominal error from globals
    tight: bool = False  # the local test with the tight bound (lipbound.tight)
    tight_rows: int | None = None  # its row budget (None: the analyzer's default)


def _resolve(model: nn.Module | Analyzer | None, analyzer: Analyzer | None, x0: Tensor,
             device: Any, analyzer_kwargs: dict[str, Any]) -> Analyzer:
    if isinstance(model, Analyzer):
        if analyzer is not None and analyzer is not model:
            raise InputError("pass the Analyzer either as model or as analyzer=, not two "
                             "different ones")
        if analyzer_kwargs or device is not None:  # (they were ignored: session 25)
            check_analyzer_options(analyzer_kwargs)
            check_reused_analyzer(model, device, analyzer_kwargs)
        return model
    if analyzer is not None:
        if not isinstance(analyzer, Analyzer):
            raise InputError(f"analyzer must be a lipbound.Analyzer, got "
                             f"{type(analyzer).__name__}")
        if model is not None and analyzer.model is not unwrap_model(model):
            raise InputError("analyzer= was built for a different model than the one passed; "
                             "pass the same model or build Analyzer(model, ...) for it")
        if analyzer_kwargs or device is not None:
            check_analyzer_options(analyzer_kwargs)
            check_reused_analyzer(analyzer, device, analyzer_kwargs)
        return analyzer
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module or a lipbound.Analyzer, got "
                         f"{type(model).__name__}")
    if not isinstance(x0, Tensor):
        raise InputError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() == 1:
        # one input of a model of vectors, without its batch dimension: read as
        # lipbound.local_bound reads it (since session 23; was refused here only)
        return Analyzer(model, tuple(x0.shape), device=device, **analyzer_kwargs)
    if x0.dim() < 2 or x0.shape[0] != 1:
        raise InputError(f"x0 must have a batch dimension of 1, shape (1, *input_shape), got "
                         f"{tuple(x0.shape)}; use x0.unsqueeze(0) for one sample")
    return Analyzer(model, tuple(x0.shape[1:]), device=device, **analyzer_kwargs)


def _problem(an: Analyzer, x0: Tensor) -> _Problem:
    x0 = check_input(x0, an.input_shape)
    out_shape = tuple(an.output_shape)
    if out_shape in ((1,), (1, 1)):
        raise InputError(
            f"a certified radius needs class scores, shape (1, n) with n >= 2; this model "
            f"gives one output per sample (per-sample shape {out_shape}), as a binary "
            "classifier with one logit z (class z > 0) does. Give it two scores (0, z), with "
            "the same class and the same Lipschitz constant: head = nn.Linear(1, 2); "
            "head.weight.data = torch.tensor([[0.0], [1.0]]); head.bias.data.zero_(); "
            "model2 = nn.Sequential(model, nn.Flatten(), head).eval()")
    if len(out_shape) != 1 or out_shape[0] < 2:
        raise InputError(
            f"a certified radius needs a model whose output is a vector of class scores of "
            f"shape (1, n) with n >= 2; this model gives per-sample output shape "
            f"{out_shape}. Flatten the output or return the logits of the classes")
    with torch.no_grad():
        y = an.forward(x0).reshape(-1).to("cpu", torch.float64)
    if not bool(torch.isfinite(y).all()):
        raise InputError("the model's output at x0 contains NaN/inf; check the weights and "
                         "the input (its scale and normalisation)")
    n = y.numel()
    cls = int(y.argmax())
    rivals = torch.tensor([j for j in range(n) if j != cls], dtype=torch.long)
    deltas = y[cls] - y[rivals]
    k = int(deltas.argmin())
    runner_up = int(rivals[k])
    delta = float(deltas[k])
    # a relative margin for the arithmetic here; the forward pass's own rounding is bounded
    # by each test (BoundResult.nominal_error, RowBounds.nominal_error) and subtracted there
    slack = SAFETY * (y[cls].abs() + y[rivals].abs())
    t_rows = (deltas - slack) * (1 - _ROUND)
    # a class change needs (y_j - y_c) to grow by delta_j >= min_j delta_j for some j
    t_local = float(t_rows.min()) / SQRT2 * (1 - _ROUND)
    c_rows = torch.zeros(n - 1, n, dtype=torch.float64)
    c_rows[:, cls] = 1.0
    c_rows[torch.arange(n - 1), rivals] = -1.0
    model_cls, model_dtype = _model_class(an, x0)
    return _Problem(x0, y, cls, runner_up, delta, rivals, deltas, t_local, t_rows, c_rows,
                    model_cls, model_dtype)


def _model_class(an: Analyzer, x0: Tensor) -> tuple[int | None, str]:
    """The class that the model itself predicts at ``x0`` in its own floating-point type
    (float32 for most models), or None when its output is not finite there."""
    model = an.model
    dt, dev = model_dtype_device(model, default=x0)
    with torch.no_grad(), exact_float32(dev):  # IEEE float32 on CUDA too (no TF32)
        # a copy: a model whose first layer is ReLU(inplace=True) overwrote the caller's x0
        # with relu(x0), and the search then bounded the network around that point
        y = model(x0.to(device=dev, dtype=dt, copy=True)).reshape(-1)
    name = str(dt).removeprefix("torch.")
    if not bool(torch.isfinite(y).all()):
        return None, name
    return int(y.argmax()), name


ClassChange = Literal["changes", "keeps", "undecided"]


def exact_class_change(an: Analyzer, x: Tensor, cls: int) -> ClassChange:
    """Whether the network in exact arithmetic changes class ``cls`` at ``x``: ``"changes"``
    (some other logit is larger), ``"keeps"`` (``cls`` is larger than every other) or
    ``"undecided"`` (within the rounding of the float64 forward pass, bounded by
    :meth:`lipbound.analyzer.Analyzer.nominal_error`: the exact logits lie within ``Δ`` in
    L2 of the computed ones, so a logit difference moves by at most ``sqrt(2) Δ``).

    This is how ``lipbound radius`` tells a real violation (an attack closer than the
    certified radius at which the exact network changes class) from float32 rounding of the
    model (a class change that only the float32 model makes, which the certificate does
    not cover).

    Raises:
        InputError: ``cls`` is not the index of one of the network's outputs."""
    y, delta, _, _ = an.nominal_error(x)
    y = y.to(torch.float64).cpu()
    # (a class index -1 counted from the end, and one past the outputs raised an IndexError)
    cls = check_count(cls, "cls", 0)
    if cls >= y.numel():
        raise InputError(f"cls must be a class index in [0, {y.numel() - 1}] for this "
                         f"network's {y.numel()} outputs, got {cls}")
    others = torch.cat([y[:cls], y[cls + 1:]])
    if others.numel() == 0:
        return "keeps"
    gap = others - y[cls]  # each difference rounded once: 2^-53 (|y_j| + |y_c|) covers it
    slack = math.sqrt(2.0) * delta * (1 + 1e-9) + 2.0 ** -52 * (others.abs() + abs(float(y[cls])))
    if bool((gap > slack).any()):
        return "changes"
    if bool((gap < -slack).all()):
        return "keeps"
    return "undecided"



# ---------------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class _Eval:
    """One test: ``ratio = eps * L / T`` (max over rivals for ``margin``); passed iff the
    exact float comparison ``eps * L < T`` held (for every rival)."""

    eps: float
    ok: bool
    ratio: float
    bound: float
    guarantee: Guarantee
    failure_prob: float
    binding: int
    from_global: bool = False
    reused: bool = False  # some layer factor was reused from a larger radius
    tie: bool = False  # the margin is within the nominal forward pass's rounding
    notes: tuple[str, ...] = ()  # the bound's own, beyond the analyzer's (tight, global)


def _own_notes(an: Analyzer, notes: Sequence[str]) -> tuple[str, ...]:
    """The notes of one bound beyond the analyzer's (which every result carries): which of
    the tight bound and the paper's product was reported, the global bound reported because
    it was smaller."""
    return tuple(n for n in notes if n not in an.notes)


def _global_nominal(an: Analyzer, pb: _Problem) -> float:
    """A bound on ``||f̂(x0) - f(x0)||`` from the global factors (cached per analyzer)."""
    key = (id(an), an.seed)
    if key not in pb.cache:
        pb.cache[key] = an.nominal_error(pb.x0)[1]
    return pb.cache[key]


def _test_local(an: Analyzer, pb: _Problem, eps: float) -> _Eval:
    r = an.local_bound(pb.x0, eps, tight=pb.tight, tight_rows=pb.tight_rows)
    lval = float(r.value)
    prod = eps * lval
    # the exact margins are within sqrt(2) ||f̂(x0) - f(x0)|| of the computed ones
    nominal = r.nominal_error if math.isfinite(r.nominal_error) else _global_nominal(an, pb)
    t = pb.t_local - nominal * (1 + 1e-9)
    if not t > 0:
        return _Eval(eps, False, math.inf, lval, r.guarantee, float(r.failure_prob),
                     pb.runner_up, False, _any_reused(r.layers), tie=True,
                     notes=_own_notes(an, r.notes))
    ok = bool(prod < t) if math.isfinite(prod) else False
    ratio = prod / t if math.isfinite(prod) else math.inf
    if ok and ratio >= 1.0:
        ratio = math.nextafter(1.0, 0.0)
    # the analyzer reports its (non-adaptive, cached) global bound when that is smaller; the
    # tight bound, when reported, is below the layer product too, but it depends on the local
    # factors (and their draws): only the global bound's report counts
    from_global = r.source == "global"
    return _Eval(eps, ok, ratio, lval, r.guarantee, float(r.failure_prob), pb.runner_up,
                 from_global, _any_reused(r.layers), notes=_own_notes(an, r.notes))


def _any_reused(layers) -> bool:
    return any(lf.spectral_method.startswith("reused") for lf in layers)


def _test_margin(an: Analyzer, pb: _Problem, eps: float) -> _Eval:
    rb = an.local_bound_rows(pb.x0, eps, pb.c_rows, tight=pb.tight, tight_rows=pb.tight_rows)
    vals = rb.values.to("cpu", torch.float64)
    prods = eps * vals
    # the exact margins are within nominal_error of the computed rows, which agree with the
    # computed margins up to their difference
    dev = (rb.nominal_values - pb.deltas).abs() + rb.nominal_error * (1 + 1e-9)
    t_rows = pb.t_rows - dev
    if not bool((t_rows > 0).all()):
        return _Eval(eps, False, math.inf, float(vals.max()), rb.guarantee,
                     float(rb.failure_prob), int(pb.rivals[int(t_rows.argmin())]),
                     reused=_any_reused(rb.prefix), tie=True, notes=_own_notes(an, rb.notes))
    finite = bool(torch.isfinite(prods).all())
    ok = finite and bool((prods < t_rows).all())
    ratios = prods / t_rows
    k = int(ratios.argmax()) if finite else 0
    ratio = float(ratios[k]) if finite else math.inf
    if ok and ratio >= 1.0:
        ratio = math.nextafter(1.0, 0.0)
    bound = float(vals[k] / pb.deltas[k] * pb.delta) if pb.delta > 0 else float(vals[k])
    return _Eval(eps, ok, ratio, bound, rb.guarantee, float(rb.failure_prob),
                 int(pb.rivals[k]), reused=_any_reused(rb.prefix), notes=_own_notes(an, rb.notes))


_TESTS: dict[str, Callable[[Analyzer, _Problem, float], _Eval]] = {
    "local": _test_local, "margin": _test_margin}


# ---------------------------------------------------------------------------------- search


@dataclass
class _SearchOut:
    lo: _Eval | None
    hi: _Eval | None
    trace: list[_Eval]
    status: str  # "converged", "capped", "budget", "none", "tie"
    non_monotone: bool = False


def _search(evaluate: Callable[[float], _Eval], start: float, tol: float, max_eps: float,
            max_evals: int) -> _SearchOut:
    """Largest ``eps`` that passes, to relative ``tol``, for a test whose ratio
    ``phi(eps) = eps * L(eps) / T`` has ``phi(eps) / eps`` nondecreasing (L grows with eps).

    Bracketing by fixed-point steps: from a passing ``e``, the root is at most
    ``e / phi(e)``; from a failing ``e``, at least ``e / phi(e)`` (both because ``L`` is
    nondecreasing). Then regula falsi on ``log phi`` against ``log eps`` (Illinois variant,
    clamped to those implied bounds, with a minimum step of half the tolerance so that the
    bracket always closes). Monotonicity is only used for speed: the reported point is
    always one that passed its own test.
    """
    w = math.log1p(tol)
    lo: _Eval | None = None
    hi: _Eval | None = None
    trace: list[_Eval] = []
    stuck_lo = stuck_hi = 0
    non_monotone = False
    widths: list[float] = []  # log-width of the bracket after each evaluation
    e = min(start, max_eps)
    while True:
        ev = evaluate(e)
        trace.append(ev)
        if ev.tie and lo is None:
            return _SearchOut(None, ev, trace, "tie", non_monotone)
        if ev.ok:
            if hi is not None and ev.eps >= hi.eps:
                non_monotone = True
                hi = None
            if lo is None or ev.eps > lo.eps:
                lo = ev
                stuck_lo, stuck_hi = 0, stuck_hi + 1
        else:
            if lo is not None and ev.eps <= lo.eps:
                non_monotone = True
            elif hi is None or ev.eps < hi.eps:
                hi = ev
                stuck_hi, stuck_lo = 0, stuck_lo + 1
        if lo is not None and hi is not None:
            if hi.eps <= lo.eps * (1 + tol):
                return _SearchOut(lo, hi, trace, "converged", non_monotone)
            widths.append(math.log(hi.eps / lo.eps))
        if lo is not None and lo.eps >= max_eps:
            return _SearchOut(lo, hi, trace, "capped", non_monotone)
        if len(trace) >= max_evals:
            return _SearchOut(lo, hi, trace, "budget", non_monotone)
        if lo is None:
            if hi is None:  # unreachable: every evaluation sets lo or hi
                return _SearchOut(None, None, trace, "none", non_monotone)
            if math.isfinite(hi.ratio) and hi.ratio > 0:
                e = hi.eps / hi.ratio * (1 - 1e-9)
            else:
                e = hi.eps * 1e-3
            e = min(e, hi.eps / (1 + tol))
            if e < 1e-300:
                return _SearchOut(None, hi, trace, "none", non_monotone)
        elif hi is None:
            # a zero bound (the outputs cannot move in this ball): try the cap directly
            e = lo.eps / lo.ratio * (1 + 1e-9) if lo.ratio > 0 else max_eps
            e = min(max(e, lo.eps * (1 + tol)), max_eps)
        else:
            ul, uh = math.log(lo.eps), math.log(hi.eps)
            a, b = ul, uh
            if math.isfinite(hi.ratio) and hi.ratio > 0:
                a = max(a, uh - math.log(hi.ratio))
            if lo.ratio > 0:
                b = min(b, ul - math.log(lo.ratio))
            if a >= b:  # bounds inconsistent (the bound was not monotone here)
                a, b = ul, uh
            # safeguard: bisect when interpolation did not halve the bracket in two steps
            # (the bound jumps where a ReLU becomes reachable, often right at the root)
            slow = len(widths) >= 3 and widths[-1] > 0.5 * widths[-3]
            if slow:
                u = 0.5 * (a + b)
            elif lo.ratio > 0 and math.isfinite(hi.ratio) and hi.ratio > 0:
                pl = math.log(lo.ratio) * 0.5 ** max(0, stuck_lo - 1)
                ph = math.log(hi.ratio) * 0.5 ** max(0, stuck_hi - 1)
                u = ul - pl * (uh - ul) / (ph - pl) if ph > pl else 0.5 * (a + b)
            else:
                u = 0.5 * (a + b)
            u = min(max(u, a), b)
            u = min(max(u, ul + w / 2), uh - w / 2)
            e = math.exp(u)


# ---------------------------------------------------------------------------------- checks

_TWINS: weakref.WeakKeyDictionary[Analyzer, dict[int, Analyzer]] = weakref.WeakKeyDictionary()


def _twin(an: Analyzer, k: int) -> Analyzer:
    """An analyzer of the same model whose random draws are independent of ``an``'s (and of
    the other twins'): used to re-check a probabilistic radius chosen by an adaptive search."""
    twins = _TWINS.setdefault(an, {})
    if k not in twins:
        twins[k] = Analyzer(an.model, an.input_shape, device=an.device, spectral=an.spectral,
                            lanczos_steps=an.lanczos_steps, failure_prob=an.failure_prob,
                            seed=an.seed + 1_000_003 * k, name=an.name, notes=an.notes)
    return twins[k]


def _recheck(an: Analyzer, test: Callable[[Analyzer, _Problem, float], _Eval], pb: _Problem,
             ev: _Eval, first: int, bar: NullBar = NULL_BAR, method: str = ""
             ) -> tuple[_Eval | None, list[dict[str, Any]], int]:
    """Make a probabilistic certificate rigorous: the search chose ``ev.eps`` using the same
    random draws that produced the bound there, so the bound's failure probability does not
    apply to it as such. A fresh analyzer whose draws are independent of that choice tests
    ``eps`` again; if it fails, ``eps`` is lowered by its fixed-point step and a backoff
    (``_RECHECK_BACKOFF``) and the next (again independent) twin tests that. Each method has
    its own twins (``first``...), so a search started from another method's re-checked
    radius is still checked independently. Returns (passing eval or None, log, evaluations)."""
    done: list[dict[str, Any]] = []
    eps = ev.eps
    n = 0
    for j, k in enumerate(range(first, first + _RECHECKS)):
        bar.label(f"{method} re-check eps={eps:.4g}")
        ch = test(_twin(an, k), pb, eps)
        bar.update()
        n += 1
        done.append({"seed_offset": k, "eps": eps, "ratio": ch.ratio, "passed": ch.ok,
                     "guarantee": ch.guarantee.value, "failure_prob": ch.failure_prob})
        if ch.ok:
            return ch, done, n
        if not (math.isfinite(ch.ratio) and ch.ratio > 0):
            break
        eps = eps / ch.ratio * (1 - 1e-9) * _RECHECK_BACKOFF[min(j, len(_RECHECK_BACKOFF) - 1)]
    return None, done, n


# ---------------------------------------------------------------------------------- API


def _zero(method: str, pb: _Problem, tol: float, t0: float, an: Analyzer, reason: str,
          n: int = 0, extra: dict[str, Any] | None = None) -> RadiusResult:
    log.info("certified radius (%s): 0 (%s)", method, reason)
    det = {"reason": reason, **(extra or {})}
    return RadiusResult(method, 0.0, Guarantee.CERTIFIED_LOWER, pb.cls, pb.delta, tol, n,
                        time.perf_counter() - t0, runner_up=pb.runner_up, model=an.name,
                        notes=an.notes, details=det)


def _global_radius(an: Analyzer, pb: _Problem, tol: float, t0: float,
                   max_eps: float) -> RadiusResult:
    g = an.global_bound()
    lg = float(g.value)
    t = pb.t_local - _global_nominal(an, pb) * (1 + 1e-9)
    det: dict[str, Any] = {"threshold": t, "global_bound": lg}
    if not t > 0:
        return _zero("global", pb, tol, t0, an, _tie_reason(pb), 1, det)
    if lg <= 0:
        r = math.inf
    else:
        r = t / lg
        steps = 0
        while r > 0 and not r * lg < t:  # strict inequality in floats
            # an ulp at a time, then geometrically: a threshold below the normal range moves
            # only every ~2^50 ulps of r (one ulp at a time never ended)
            r = math.nextafter(r, 0.0) if steps < 8 else r * (1.0 - 2.0 ** min(steps - 60, -1))
            steps += 1
    if r > max_eps:
        r = max_eps
        det["reason"] = f"capped at max_eps={max_eps:g}"
    fp = float(g.failure_prob) if g.guarantee == Guarantee.PROBABILISTIC else 0.0
    return RadiusResult("global", r, lower_bound_from(g.guarantee), pb.cls, pb.delta, tol, 1,
                        time.perf_counter() - t0, failure_prob=fp, runner_up=pb.runner_up,
                        bound=lg, upper=None, model=an.name, notes=an.notes, details=det)


def certified_radius(model: nn.Module | Analyzer | None, x0: Tensor, *,
                     analyzer: Analyzer | None = None, method: RadiusMethod = "local",
                     tol: float = 1e-3, max_eps: float | None = None,
                     start: float | None = None, max_evaluations: int = 60,
                     reuse_tol: float = DEFAULT_REUSE_TOL,
                     device: str | torch.device | None = None, progress: bool = False,
                     tight: bool = False, tight_rows: int | None = None,
                     **analyzer_kwargs: Any) -> RadiusResult:
    """Certified L2 radius around ``x0``: no ``x`` with ``||x - x0|| <= radius`` changes the
    predicted class (Avant & Morgansen 2023, "adversarial radius").

    Let ``y = f(x0)``, ``c`` its top class and ``delta = y_c - max_{j != c} y_j``.

    * ``"local"`` -- changing the top class needs an output change of L2 size at least
      ``delta / sqrt(2)``, so ``eps * L(x0, eps) < delta / sqrt(2)`` certifies the ball of
      radius ``eps`` (``L``: :meth:`Analyzer.local_bound`). ``L`` grows with ``eps``, so the
      largest such ``eps`` is found by bracketing and a safeguarded bisection (regula falsi
      on ``log(eps L / T)`` against ``log eps``); the reported radius is an ``eps`` that
      passed the test and ``upper`` (a failing ``eps``) is within a factor ``1 + tol``.
    * ``"margin"`` -- for each rival ``j``, ``g_j(x) = y_c(x) - y_j(x) = (e_c - e_j)^T f(x)``
      stays positive in the ball if ``eps * L_j(eps) < delta_j = g_j(x0)``, where ``L_j``
      bounds the local constant of ``g_j`` (:meth:`Analyzer.local_bound_rows`: all rivals in
      one pass, the last layer's factor being the exact vector norm
      ``||(e_c - e_j)^T A D||``). The class cannot change if this holds for every ``j``.

      Why it is never smaller than ``"local"``: both share the factors of all layers but the
      last (the prefix ``P``). With the last layer's masked matrix ``A D``,
      ``L_j = P ||(e_c - e_j)^T A D|| <= P ||e_c - e_j|| ||A D|| = sqrt(2) L`` (rows of
      ``A D`` that cannot move are zero, so ``||A D||`` equals the last factor of ``L``), and
      ``delta_j >= delta`` (``delta`` is the smallest ``delta_j``). Hence
      ``eps L_j / delta_j <= sqrt(2) eps L / delta``: every ``eps`` that passes the
      ``sqrt(2)`` test passes the margin test, so its largest passing ``eps`` is at least
      as large (up to ``tol``). Possible exceptions: when the analyzer reported its
      (smaller, cached) global bound as ``L``, when Lanczos estimates in the prefix
      differ slightly between the two computations, and with ``tight=True`` (the tight
      local bound is not a product of the same factors). The tests check margin >= local on
      every input they run (and the inequality ``L_j <= sqrt(2) L`` on random networks).
    * ``"global"`` -- ``delta / (sqrt(2) L_global)``, lowered by rounding so that the strict
      inequality holds in floats.

    Probabilistic bounds: when the bound that certified the radius is probabilistic (Lanczos
    spectral norms), the search has picked ``eps`` using the same random draws, so the
    radius is re-tested by an analyzer with fresh, independent draws (and lowered by a
    fixed-point step if that test fails); the reported ``failure_prob`` is the sum of the
    failure probabilities of the re-checks run (a union bound: the first confirmation is
    reported), plus, when a probabilistic pass that needs no re-check (the analyzer's cached
    global bound) competes with it, that pass's (the larger radius is reported).
    Deterministic (``CERTIFIED``) bounds need no re-check: where the search passed with one
    (e.g. at a small radius where every layer took the exact route) at a radius at least the
    confirmed one, or where no re-check confirmed a radius, that pass is reported instead
    (``details["fallback"]`` says so), rather than a smaller radius or 0.

    Args:
        model: the classifier (eval mode, ``(N, *input_shape) -> (N, n_classes)``) or an
            :class:`Analyzer` of it.
        x0: the input, shape ``(1, *input_shape)``.
        analyzer: an :class:`Analyzer` of ``model`` to reuse (its caches make repeated
            calls fast); built when ``None``.
        method: ``"local"`` (default), ``"margin"`` or ``"global"``.
        tol: relative tolerance of the search, in ``(0, 1)``.
        max_eps: largest radius searched (default ``1e12``); a radius that passes there is
            reported as ``max_eps`` with ``details["reason"]``.
        start: first radius tried (e.g. a known certified radius); default: a tiny radius
            ``1e-6 * max(1, ||x0||)``.
        max_evaluations: budget of bound computations for the search.
        reuse_tol: during the search, a layer factor computed at a larger radius of the same
            input bounds the layer at a smaller one (its masks dominate) and is reused when
            it is within ``1 + reuse_tol`` of a lower estimate of the current layer
            (:meth:`Analyzer._reuse`); late search steps are close together, so this
            skips most of their spectral work. The values stay valid upper bounds (at
            most slightly looser, so the radius may come out slightly smaller); a
            probabilistic radius is still re-tested by an independent analyzer without
            reuse. ``0``: no reuse (only exact repeats). With ``reuse_tol > 0`` the search
            runs on a shallow copy of the analyzer with its own memory of layer factors
            (:meth:`Analyzer.reuse_copy`: the caller's memory of factors is not changed, but
            its cached global factors, exact matrices and draw counts are shared with the
            copy); with ``0`` on the analyzer itself. Either way the caller's analyzer may
            gain global factors (cached when the ``"global"`` certificate, or a nominal
            error that the local bound does not give, computes them).
        device: device of a new analyzer (``None``/``"auto"``: the model's).
        progress: show a counter of the bound evaluations on stderr, naming the radius being
            tested (only on a terminal, after a few seconds: see :mod:`lipbound._progress`);
            the result is the same either way.
        tight: the ``"local"`` test uses ``local_bound(..., tight=True)`` (the smaller of
            the centre-plus-deviation bound and the paper's product, :mod:`lipbound.tight`)
            and the ``"margin"`` test ``local_bound_rows(..., tight=True)`` (the same per
            rival row); no effect on ``"global"``. These bounds need not grow with ``eps``;
            the search reports an ``eps`` that passed, which certifies on its own. (The
            margin certificate is then still never below the paper's local one, but it can
            be below the tight local one.)
        tight_rows: the row budget of those tight bounds (an integer >= 1; ``None``: the
            default :data:`lipbound.analyzer.TIGHT_ROWS`), passed to every one of them (the
            search's and the re-checks'); beyond it the hybrid or the paper's product, as in
            :meth:`Analyzer.local_bound`. Only with ``tight=True`` (refused otherwise).
        **analyzer_kwargs: options of a new :class:`Analyzer` (``spectral``,
            ``lanczos_steps``, ``failure_prob``, ``seed``, ``name``, ``notes``).

    Returns:
        A :class:`RadiusResult`. At a tie between the top two classes (or a margin within
        float64 rounding of one) the radius is 0.0 and ``details["reason"]`` says why.

    Raises:
        InputError: on a non-finite or wrongly shaped ``x0``, a model whose output is not a
            vector of at least two class scores, NaN/inf scores, or invalid options.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    tol = _check_tol(tol)
    cap = DEFAULT_MAX_EPS if max_eps is None else check_eps(max_eps, "max_eps")
    if start is not None:
        start = check_eps(start, "start")
    if not isinstance(max_evaluations, int) or max_evaluations < 2:
        raise InputError(f"max_evaluations must be an integer >= 2, got {max_evaluations!r}")
    reuse_tol = check_reuse_tol(reuse_tol)
    tight_rows = check_tight(tight, tight_rows)
    progress = check_bool(progress, "progress")
    an = _resolve(model, analyzer, x0, device, analyzer_kwargs)
    pb = replace(_problem(an, x0), tight=tight, tight_rows=tight_rows)
    with _bar(progress, an) as bar:
        return _certify(an, pb, method, tol, cap, start, max_evaluations, t0, reuse_tol, bar)


def _bar(progress: bool, an: Analyzer) -> NullBar:
    """A counter of a radius search's bound evaluations (see :mod:`lipbound._progress`)."""
    return progress_bar(progress, None, f"radius {an.name}", "evaluations")


def _check_tol(tol: float) -> float:
    try:
        t = float(tol)
    except (TypeError, ValueError) as exc:
        raise InputError(f"tol must be a number in (0, 1), got {tol!r}") from exc
    if not 0 < t < 1:
        raise InputError(f"tol must be a relative tolerance in (0, 1), got {tol!r}; "
                         "e.g. 1e-3 for 0.1 %")
    return t


def _search_analyzer(an: Analyzer, reuse_tol: float) -> Analyzer:
    """The analyzer the search evaluates: a shallow copy sharing the traced graph, the exact
    dense matrices, the global factors and the seed (so exact repeats give the same value),
    with its own memory of layer factors and ``reuse_tol``."""
    return an if reuse_tol <= 0 else an.reuse_copy(reuse_tol)


def _certify(an: Analyzer, pb: _Problem, method: str, tol: float, cap: float,
             start: float | None, max_evals: int, t0: float,
             reuse_tol: float = DEFAULT_REUSE_TOL, bar: NullBar = NULL_BAR) -> RadiusResult:
    if pb.model_cls != pb.cls:
        return _zero(method, pb, tol, t0, an, _disagree_reason(pb))
    if method == "global":
        if pb.t_local <= 0:
            return _zero(method, pb, tol, t0, an, _tie_reason(pb))
        bar.label("global")
        res = _global_radius(an, pb, tol, t0, cap)
        bar.update()
        return res
    if pb.t_local <= 0 or float(pb.t_rows.min()) <= 0:
        return _zero(method, pb, tol, t0, an, _tie_reason(pb))
    test = _TESTS[method]
    if start is None:
        start = 1e-6 * max(1.0, float(pb.x0.detach().double().norm()))
    sa = _search_analyzer(an, reuse_tol)

    def evaluate(e: float) -> _Eval:
        bar.label(f"{method} eps={e:.4g}")
        ev = test(sa, pb, e)
        bar.update()
        return ev

    out = _search(evaluate, start, tol, cap, max_evals)
    n = len(out.trace)
    det: dict[str, Any] = {
        "threshold": pb.t_local if method == "local" else None,
        "thresholds": None if method == "local" else [float(t) for t in pb.t_rows],
        "rivals": None if method == "local" else [int(j) for j in pb.rivals],
        "start": start,
        "evaluations": [[ev.eps, ev.ratio, ev.ok] for ev in out.trace],
        "search": out.status,
        "reuse_tol": reuse_tol,
        "tight": pb.tight,
        "tight_rows": (TIGHT_ROWS if pb.tight_rows is None else pb.tight_rows) if pb.tight
        else None,
        "reused_evaluations": sum(ev.reused for ev in out.trace),
    }
    if out.non_monotone:
        det["non_monotone"] = True
    if out.lo is None and out.status == "tie":
        return _zero(method, pb, tol, t0, an, _tie_reason(pb), n, det)
    if out.lo is None:
        return _zero(method, pb, tol, t0, an, "no radius passed the test down to 1e-300 "
                     "(the bound is infinite or NaN)", n, det)
    final = out.lo
    if final.guarantee == Guarantee.PROBABILISTIC and not final.from_global:
        chk, rlog, nr = _recheck(an, test, pb, final, 1 + _RECHECKS * METHODS.index(method),
                                 bar, method)
        n += nr
        det["rechecks"] = rlog
        # a pass of the search that needs no re-check (a deterministic bound, or the
        # analyzer's cached global bound, whose draws did not see the search) certifies on
        # its own: reported when no twin confirmed a radius, or when it is the larger one
        safe = _largest_safe_pass(out.trace)
        if chk is None and safe is None:
            return _zero(method, pb, tol, t0, an, "independent re-checks of the probabilistic "
                         "bound did not confirm any radius", n, det)
        # the reported radius is the larger of the two candidates, chosen after the draws:
        # it is wrong only if the twins' (some twin passed wrongly at the radius it tested:
        # the twins' probabilities add up, each twin's its own) or a probabilistic safe
        # pass's event fails, so both probabilities count, also when no twin confirmed
        # (since session 22; before, each branch reported its own)
        twins = math.fsum(c["failure_prob"] for c in rlog)
        safe_fp = safe.failure_prob if safe is not None and \
            safe.guarantee == Guarantee.PROBABILISTIC else 0.0
        if safe is not None and (chk is None or safe.eps >= chk.eps):
            det["fallback"] = (
                f"the re-checks {'confirmed ' + format(chk.eps, '.6g') if chk else 'failed'}"
                f"; a pass of the search with a {'global' if safe.from_global else 'deterministic'}"
                f" bound at {safe.eps:.6g} needs no re-check and is reported")
            final = safe
            if safe_fp > 0:
                final = replace(safe, failure_prob=min(1.0, safe_fp + twins))
        else:
            # (a twin at a larger radius can have more probabilistic layers than the one
            # that confirmed: that one's probability times nr undercounted them)
            final = replace(chk, failure_prob=min(1.0, twins + safe_fp))
    hi = out.hi
    upper = hi.eps if hi is not None else None
    if upper is not None:
        det["achieved_tol"] = upper / final.eps - 1
    if out.status == "capped":
        det["reason"] = f"the test passes at max_eps={cap:g}; the radius is at least this"
    elif out.status == "budget":
        det["reason"] = (f"stopped after {max_evals} evaluations before reaching tol={tol:g}"
                         "; the radius is certified but may not be the largest")
    det["binding_class"] = final.binding
    fp = final.failure_prob if final.guarantee == Guarantee.PROBABILISTIC else 0.0
    res = RadiusResult(method, final.eps, lower_bound_from(final.guarantee), pb.cls, pb.delta,
                       tol, n, time.perf_counter() - t0, failure_prob=fp, runner_up=pb.runner_up,
                       bound=final.bound, upper=upper, model=an.name,
                       notes=(*an.notes, *final.notes), details=det)
    log.info("certified radius (%s): %.6g after %d bound evaluations (%.2f s)", method,
             res.radius, n, res.seconds)
    return res


def _largest_safe_pass(trace: Sequence[_Eval]) -> _Eval | None:
    """The largest radius of the search that passed with a bound needing no re-check: a
    deterministic one, or the analyzer's global bound (drawn before the search); None if
    there is none."""
    safe = [ev for ev in trace if ev.ok and (ev.guarantee != Guarantee.PROBABILISTIC
                                             or ev.from_global)]
    return max(safe, key=lambda ev: ev.eps, default=None)


def _disagree_reason(pb: _Problem) -> str:
    if pb.model_cls is None:
        return (f"the model's own {pb.model_dtype} forward pass gives NaN/inf at x0 although "
                "the float64 analysis is finite: no class to certify")
    return (f"the model's own {pb.model_dtype} forward pass predicts class {pb.model_cls} at "
            f"x0 but the exact (float64) network predicts {pb.cls} (margin {pb.delta:.3g}): "
            f"x0 is within {pb.model_dtype} rounding of a decision boundary, so no radius "
            "can be certified for the model as it runs")


def _tie_reason(pb: _Problem) -> str:
    if pb.delta <= 0:
        return (f"tie: classes {pb.cls} and {pb.runner_up} have the same score at x0, so x0 "
                "lies on a decision boundary and no radius can be certified")
    return (f"the margin {pb.delta:.3g} between classes {pb.cls} and {pb.runner_up} is within "
            "float64 rounding of a tie: x0 is (numerically) on a decision boundary")


def certified_radii(model: nn.Module | Analyzer | None, x0: Tensor, *,
                    methods: Sequence[str] = METHODS, analyzer: Analyzer | None = None,
                    tol: float = 1e-3, max_eps: float | None = None,
                    max_evaluations: int = 60, reuse_tol: float = DEFAULT_REUSE_TOL,
                    device: str | torch.device | None = None, progress: bool = False,
                    tight: bool = False, tight_rows: int | None = None,
                    **analyzer_kwargs: Any) -> list[RadiusResult]:
    """Several certificates at one input, sharing one analyzer and each other's results:
    the global radius (if asked) starts the local search, and the local radius starts the
    margin search (it passes the margin test, see :func:`certified_radius`).

    Args: as :func:`certified_radius`; ``methods`` is any subset of ``METHODS``
    (``progress``: one counter over all their bound evaluations).

    Returns:
        One :class:`RadiusResult` per method, in the order given.
    """
    t0 = time.perf_counter()
    if isinstance(methods, str):
        methods = (methods,)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InputError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got "
                         f"{list(methods)!r}")
    tol = _check_tol(tol)
    cap = DEFAULT_MAX_EPS if max_eps is None else check_eps(max_eps, "max_eps")
    reuse_tol = check_reuse_tol(reuse_tol)
    tight_rows = check_tight(tight, tight_rows)
    progress = check_bool(progress, "progress")
    an = _resolve(model, analyzer, x0, device, analyzer_kwargs)
    pb = replace(_problem(an, x0), tight=tight, tight_rows=tight_rows)
    done: dict[str, RadiusResult] = {}
    order = [m for m in ("global", "local", "margin") if m in methods]
    with _bar(progress, an) as bar:
        for m in order:
            t1 = time.perf_counter()
            start = None
            if m == "local" and "global" in done and 0 < done["global"].radius < math.inf:
                start = done["global"].radius
            if m == "margin" and "local" in done and 0 < done["local"].radius < math.inf:
                start = done["local"].radius
            done[m] = _certify(an, pb, m, tol, cap, start, max_evaluations, t1, reuse_tol,
                               bar)
    del t0
    return [done[m] for m in methods]


def best(results: Sequence[RadiusResult]) -> RadiusResult | None:
    """The result with the largest radius (ties: the first), or ``None`` for no results.

    When that result is probabilistic, its ``failure_prob`` is the sum over every
    probabilistic result given (a union bound): which method wins depends on the random
    draws (a radius that is wrongly large is the likeliest winner), so the winner is wrong
    only if one of them is. Since session 22; before, the winner's own failure probability
    was reported (MNIST with Lanczos forced: 4e-4 for local, margin and global's 4e-4 +
    4e-4 + 8e-4 = 1.6e-3). A certified winner keeps 0; the results given are not changed."""
    out = None
    for r in results:
        if out is None or r.radius > out.radius:
            out = r
    if out is not None and out.guarantee == Guarantee.PROBABILISTIC_LOWER:
        total = math.fsum(r.failure_prob for r in results
                          if r.guarantee == Guarantee.PROBABILISTIC_LOWER)
        out = replace(out, failure_prob=min(1.0, total))
    return out
