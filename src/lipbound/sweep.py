"""Bounds as a function of the radius: the eps sweeps of Avant & Morgansen (IEEE TNNLS 2023).

:func:`sweep` computes, for each radius ``eps`` of a grid, the local upper bound of
Avant & Morgansen (*Analytical Bounds on the Local Lipschitz Constants of ReLU Networks*,
IEEE TNNLS 2023), the global upper bound, and empirical lower bounds (random sampling,
gradient ascent, PGD; :mod:`lipbound.lower`) of the local Lipschitz constant relative to
``x0``. One :class:`~lipbound.analyzer.Analyzer` serves every radius, so the traced graph,
the exact layer matrices and the per-layer global factors (computed once) are shared, and
layer factors of neighbouring radii are reused where they provably bound the current layer
(see :func:`sweep`, option ``reuse_tol``).

Example:
    >>> from lipbound import zoo
    >>> from lipbound.inputs import load_sample
    >>> lm = zoo.load_model("mnist")                                   # doctest: +SKIP
    >>> x0 = load_sample("mnist:8").x                                  # doctest: +SKIP
    >>> res = sweep(lm.model, x0, default_eps_range("mnist", 10))      # doctest: +SKIP
    >>> res.to_csv("sweep.csv"); res.plot("sweep.png", "sweep.pdf")   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._progress import progress_bar
from .analyzer import Analyzer, check_analyzer_settings
from .errors import InputError
from .results import Guarantee, _jsonable
from .validation import check_bool, check_eps, check_input, check_int, check_reuse_tol

__all__ = [
    "ALL_METHODS",
    "DEFAULT_METHODS",
    "DEFAULT_REUSE_TOL",
    "LOWER_METHODS",
    "UPPER_METHODS",
    "SweepPoint",
    "SweepResult",
    "SweepRow",
    "as_radius_list",
    "default_eps_range",
    "eps_grid",
    "parse_methods",
    "sweep",
]

log = logging.getLogger(__name__)

#: methods whose values are upper bounds (solid lines in the plot)
UPPER_METHODS: tuple[str, ...] = ("local", "tight", "global")
#: methods whose values are empirical lower bounds (dashed lines)
LOWER_METHODS: tuple[str, ...] = ("random", "gradient", "pgd", "best")
ALL_METHODS: tuple[str, ...] = UPPER_METHODS + LOWER_METHODS
DEFAULT_METHODS: tuple[str, ...] = ("local", "global", "random", "gradient", "pgd")


@dataclass(frozen=True)
class SweepPoint:
    """One method's value at one radius.

    Attributes:
        method: ``"local"``, ``"tight"``, ``"global"``, ``"random"``, ``"gradient"``,
            ``"pgd"`` or ``"best"``.
        value: the bound.
        guarantee: what the value is (upper bound kinds, or ``LOWER`` for a value attained
            by a witness input).
        seconds: wall-clock time of this computation (the global bound is computed once:
            its first row carries the cost, later rows only the cache lookup).
        failure_prob: failure probability of a probabilistic upper bound (else 0).
        details: extra facts (e.g. ``witness_distance`` of a lower bound; for ``"local"``:
            ``source`` -- ``"computed"``, ``"reused"`` (``reused_layers`` lists the layers
            whose factor came from a larger radius) or ``"global"`` (the global bound, taken
            without computing above ``crossover_eps``); for ``"tight"``: ``source`` --
            ``"tight"``, ``"paper"`` or ``"global"``, the bound reported, and ``not_formed``
            where the tight bound was not formed (why); for a lower bound whose witness was
            found at a smaller radius (see :func:`sweep`): ``from_eps``, that radius, and
            ``own_value``, the value the method found at this radius itself).
        witness: for a lower bound, the input ``x`` attaining ``value`` (``(1,
            *input_shape)``, with ``0 < ||x - x0|| <= eps``); ``None`` for an upper bound.
            Not written to JSON / CSV (``details["witness_distance"]`` is).
    """

    method: str
    value: float
    guarantee: Guarantee
    seconds: float
    failure_prob: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    witness: Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"method": self.method, "value": self.value,
                          "guarantee": self.guarantee, "seconds": self.seconds,
                          "failure_prob": self.failure_prob, "details": self.details})


@dataclass(frozen=True)
class SweepRow:
    """All methods at one radius ``eps``."""

    eps: float
    points: tuple[SweepPoint, ...]

    def __getitem__(self, method: str) -> SweepPoint:
        for p in self.points:
            if p.method == method:
                return p
        raise KeyError(f"method {method!r} not in this sweep "
                       f"(has {', '.join(p.method for p in self.points)})")

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(p.method for p in self.points)


@dataclass(frozen=True)
class SweepResult:
    """Bounds of every method over a grid of radii.

    Attributes:
        model: name of the network.
        input_name: name of the nominal input ``x0``.
        methods: the methods, in column order.
        rows: one :class:`SweepRow` per radius, in the order given.
        seconds: total wall-clock time of the sweep.
        settings: parameters of the computation (lower-bound budgets, seed, spectral mode,
            failure probability, dtype of the lower bounds, ``reuse_tol``, ``order`` of the
            radii) and, with upper bounds, the counts ``local_computed``, ``local_reused``,
            ``local_from_global`` and ``local_evaluations`` (and ``tight_formed`` with the
            ``"tight"`` curve).
        notes: caveats (e.g. "seeded random weights").
    """

    model: str
    input_name: str
    methods: tuple[str, ...]
    rows: tuple[SweepRow, ...]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def eps(self) -> list[float]:
        """The radii, in row order."""
        return [r.eps for r in self.rows]

    def values(self, method: str) -> list[float]:
        """The values of one method, in row order.

        Raises:
            InputError: the sweep did not run ``method``.
        """
        if method not in self.methods:
            raise InputError(f"method {method!r} is not in this sweep; use one of "
                             f"{', '.join(self.methods)}")
        return [r[method].value for r in self.rows]

    def columns(self) -> list[str]:
        """CSV header: ``eps``, then ``<m>_value, <m>_guarantee, <m>_failure_prob,
        <m>_seconds`` per method (``failure_prob``: that of a probabilistic upper bound, 0
        for a certified one or a lower bound), then ``violation`` (empty unless the row
        breaks an ordering, see :meth:`violations`) and ``notes`` (since session 26: the
        sweep's :attr:`notes`, which qualify every row, joined by
        :data:`lipbound.batch.NOTE_SEPARATOR`; before, the CSV carried none of them, a float32
        model's rounding note included)."""
        cols = ["eps"]
        for m in self.methods:
            cols += [f"{m}_value", f"{m}_guarantee", f"{m}_failure_prob", f"{m}_seconds"]
        return cols + ["violation", "notes"]

    @staticmethod
    def _row_violations(r: SweepRow) -> list[tuple[str, SweepPoint]]:
        out = []
        uppers = [p for p in r.points if p.guarantee.is_upper_bound]
        lowers = [p for p in r.points if p.guarantee == Guarantee.LOWER]
        for lo in lowers:
            for up in uppers:
                if lo.value > up.value:
                    out.append((f"eps={r.eps:g}: {lo.method} lower bound {lo.value:.6g} > "
                                f"{up.method} upper bound {up.value:.6g}", lo))
        # a certified local value above a probabilistic global one is no failure: the
        # analyzer never trades a certified value for a probabilistic one (Analyzer.local_bound)
        if "local" in r.methods and "global" in r.methods and \
                r["local"].value > r["global"].value and not (
                    r["global"].guarantee == Guarantee.PROBABILISTIC
                    and r["local"].guarantee in (Guarantee.CERTIFIED, Guarantee.EXACT)):
            out.append((f"eps={r.eps:g}: local {r['local'].value:.6g} > global "
                        f"{r['global'].value:.6g}", r["local"]))
        return out

    def violations(self) -> list[str]:
        """Orderings that soundness requires but the numbers break (should be empty).

        Checks, at every radius, ``lower <= local upper <= global upper`` for the methods
        present (``local <= global`` only where the local value is not certified while the
        global one is probabilistic: a certified local value is kept even when a
        probabilistic global one is smaller). A non-empty list means a bug (or a
        probabilistic bound that failed). The
        CSV (column ``violation``), the JSON (``violations``) and the plot flag them too.
        """
        return [v for r in self.rows for v, _ in self._row_violations(r)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict with every row, the settings and the notes."""
        return _jsonable({
            "model": self.model,
            "input": self.input_name,
            "methods": list(self.methods),
            "seconds": self.seconds,
            "settings": self.settings,
            "notes": list(self.notes),
            "violations": self.violations(),
            "rows": [{"eps": r.eps, **{p.method: p.to_dict() for p in r.points}}
                     for r in self.rows],
        })

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per radius with the columns of :meth:`columns`."""
        from .batch import NOTE_SEPARATOR

        notes = NOTE_SEPARATOR.join(self.notes)
        out = io.StringIO(newline="")
        w = csv.writer(out)
        w.writerow(self.columns())
        for r in self.rows:
            line: list[Any] = [repr(r.eps)]
            for m in self.methods:
                pt = r[m]
                line += [repr(float(pt.value)), pt.guarantee.value,
                         repr(float(pt.failure_prob)), f"{pt.seconds:.6f}"]
            w.writerow(line + ["; ".join(v for v, _ in self._row_violations(r)), notes])
        return _write_text(path, out.getvalue())

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        return _write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def title(self) -> str:
        return f"{self.model}, input {self.input_name}"

    def plot(self, path_png: str | Path | None, path_pdf: str | Path | None = None,
             title: str | None = None) -> list[Path]:
        """Paper-style figure: bounds against eps on log-log axes, upper bounds solid and
        lower bounds dashed, as steps that stay valid between the radii (an upper curve takes
        the next larger radius's value, a lower curve keeps the last smaller radius's: see
        :func:`lipbound.plotting.plot_sweep`); probabilistic upper bounds say their largest failure
        probability in the legend (rounded up); orderings the numbers break
        (:meth:`violations`) are circled and stated in red. Returns the paths written."""
        from .plotting import format_prob_up, plot_sweep

        curves = {m: self.values(m) for m in self.methods}
        suffix = {}
        for m in self.methods:
            pts = [r[m] for r in self.rows]
            if any(p.guarantee == Guarantee.PROBABILISTIC for p in pts):
                fp = max(p.failure_prob for p in pts)
                suffix[m] = f" (prob., p_fail ≤ {format_prob_up(fp)})"
        flagged = [(v, (r.eps, p.value)) for r in self.rows for v, p in self._row_violations(r)]
        return plot_sweep(self.eps, curves, path_png=path_png, path_pdf=path_pdf,
                          title=title if title is not None else self.title(),
                          upper=[m for m in self.methods if m in UPPER_METHODS],
                          label_suffix=suffix, violations=[v for v, _ in flagged],
                          violation_points=[xy for _, xy in flagged])


def _write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (parent folders are created).

    Raises:
        InputError: the file cannot be written (session 25: an OSError from deep inside).
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w", newline="") as fh:
            fh.write(text)
    except OSError as exc:
        raise InputError(f"cannot write {p} ({exc.strerror or exc}); give a path in a writable "
                         "folder") from exc
    return p


def eps_grid(eps_min: float, eps_max: float, points: int) -> list[float]:
    """``points`` radii spaced evenly in log scale from ``eps_min`` to ``eps_max``
    (one radius, ``eps_min``, when ``points == 1`` or the two are equal).

    Raises:
        InputError: unless ``0 < eps_min <= eps_max`` (finite) and ``points >= 1``.
    """
    lo = check_eps(eps_min, "eps_min")
    hi = check_eps(eps_max, "eps_max")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise InputError(f"points must be an integer >= 1, got {points!r}")
    if lo > hi:
        raise InputError(f"eps_min ({lo:g}) must be <= eps_max ({hi:g}); swap them")
    if points == 1 or lo == hi:
        return [lo]
    a, b = math.log10(lo), math.log10(hi)
    out = [10 ** (a + (b - a) * i / (points - 1)) for i in range(points)]
    out[0], out[-1] = lo, hi
    return out


def as_radius_list(values: Any, name: str = "eps_values") -> list[Any] | None:
    """The items of a sequence of radii (a list, tuple, range, 1-D tensor or array, or any
    other ordered iterable such as a generator, read once, in its order), unchecked, or
    ``None`` for a single number (a Python or NumPy number, a 0-d tensor or array). Raises
    :class:`InputError` for anything else: a string (whose characters would otherwise be read
    as radii), a set (unordered: the results would come in the set's arbitrary order; since
    session 24), a dict or other mapping (its keys would be taken; since session 24), a
    tensor or array of more than one dimension, or ``None``."""
    if isinstance(values, (str, bytes)):
        raise InputError(f"{name} must be numbers, got the string {values!r}; pass "
                         "e.g. [0.01, 0.1, 1]")
    if isinstance(values, numbers.Real) or getattr(values, "ndim", None) == 0:
        return None
    if isinstance(values, AbstractSet):
        raise InputError(f"{name} must be an ordered sequence of radii (a list, tuple, 1-D "
                         f"array or tensor), got a {type(values).__name__}, which has no "
                         f"order (the results would come in an arbitrary one); pass "
                         f"sorted({name})")
    if isinstance(values, Mapping):
        raise InputError(f"{name} must be a sequence of radii (a list, tuple, 1-D array or "
                         f"tensor), got a {type(values).__name__} (its keys would be read as "
                         f"the radii); pass list({name}.values()) or list({name}) for the "
                         "one you mean")
    ndim = getattr(values, "ndim", None)
    if isinstance(ndim, int) and ndim > 1:
        raise InputError(f"{name} must be one-dimensional (one radius per item), got shape "
                         f"{tuple(values.shape)}; pass {name}.flatten() or the row you mean")
    try:
        return list(values)
    except TypeError:
        raise InputError(f"{name} must be a number or a sequence of numbers (e.g. "
                         f"[0.01, 0.1, 1]), got {type(values).__name__}") from None


def default_eps_range(model_name: str, points: int = 30) -> list[float]:
    """The paper's radii for a zoo network (``ZooEntry.eps_range``), log-spaced.

    Args:
        model_name: a zoo name (``"tiny"``, ``"compnet"``, ``"mnist"``, ``"cifar10"``,
            ``"alexnet"``, ``"vgg16"``).
        points: number of radii.

    Raises:
        ZooError: for an unknown name.
    """
    from .zoo.registry import get_entry

    lo, hi = get_entry(model_name).eps_range
    return eps_grid(lo, hi, points)


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """Check a method list (``"local,global,pgd"`` or a sequence) and drop duplicates."""
    if not isinstance(methods, str):
        try:
            methods = list(methods)
        except TypeError:
            raise InputError(f"methods must be names out of {', '.join(ALL_METHODS)} (a "
                             f"sequence or a comma-separated string), got {methods!r}") from None
        bad = [m for m in methods if not isinstance(m, str)]
        if bad:
            raise InputError(f"methods must be names (strings) out of {', '.join(ALL_METHODS)}, "
                             f"got {bad[0]!r}")
    items = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str)
                                        else methods)]
    items = [m for m in items if m]
    if not items:
        raise InputError(f"give at least one method out of {', '.join(ALL_METHODS)}")
    bad = [m for m in items if m not in ALL_METHODS]
    if bad:
        raise InputError(f"unknown method(s) {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(ALL_METHODS)}")
    return tuple(dict.fromkeys(items))


def _lower_model(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    if dtype is None:
        return model
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            return copy.deepcopy(model).to(dtype).eval()
    return model


def _lower_dtype_used(model: nn.Module | None, dtype: torch.dtype | None, x0: Tensor) -> str:
    """The dtype the lower bounds really evaluate the network in, for the settings: the
    requested one, or float64 where ``x0`` is not a point of it (the lower bounds then run a
    float64 copy around the exact ``x0``, :func:`lipbound.lower._common.check_problem`)."""
    def short(d: torch.dtype) -> str:
        return str(d).replace("torch.", "")

    if dtype is None:
        p = next(iter(model.parameters()), None) if model is not None else None
        dtype = p.dtype if p is not None and p.is_floating_point() else x0.dtype
        name = f"model ({short(dtype)})"
    else:
        name = short(dtype)
    if x0.dtype != dtype and not bool(torch.equal(x0.to(dtype).to(x0.dtype), x0)):
        return (f"{short(x0.dtype)} (x0 is not a point of {name}: the lower bounds ran a "
                "float64 copy of the model around the exact x0)")
    return name


def _lower(method: str, model: nn.Module, x0: Tensor, eps: float, *, samples: int,
           steps: int, restarts: int, seed: int, output_map: Tensor | None):
    from . import lower

    if method == "random":
        return lower.random_lower_bound(model, x0, eps, n_samples=samples, seed=seed,
                                        output_map=output_map, progress=False)
    if method == "gradient":
        return lower.gradient_lower_bound(model, x0, eps, n_steps=steps, seed=seed,
                                          output_map=output_map)
    if method == "pgd":
        return lower.pgd_lower_bound(model, x0, eps, n_restarts=restarts, n_steps=steps,
                                     seed=seed, output_map=output_map)
    return lower.best_lower_bound(model, x0, eps, seed=seed, output_map=output_map,
                                  n_random=samples, gradient_steps=steps,
                                  pgd_restarts=restarts, pgd_steps=steps, progress=False)


DEFAULT_REUSE_TOL = 0.02
"""Default ``reuse_tol`` of :func:`sweep` (see there): on the MNIST and CIFAR-10 zoo networks
over their 30-point paper ranges it makes the local values at most ~2.4 % (median 0.2-0.4 %)
larger than fresh single bounds (benchmarks: ``lipbound bench --sweep 30``)."""

_ORDER_TEXT = ("distinct radii in bisection order: the largest, the smallest, then midpoints "
               "depth-first (every radius between two computed ones)")


def _bisection_order(n: int) -> list[int]:
    """Indices ``0..n-1`` of sorted radii: the last, the first, then the midpoint of every
    interval depth-first (left half first). Each radius is computed after radii on both sides
    of it, and close ones were computed recently (the analyzer keeps a few factors per layer),
    so a layer factor of a larger radius can bound it (:meth:`Analyzer._reuse`)."""
    if n <= 1:
        return list(range(n))
    out = [n - 1, 0]
    stack = [(0, n - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        m = (a + b) // 2
        out.append(m)
        stack.append((m, b))
        stack.append((a, m))
    return out


def _spectral(r) -> list[str]:
    return sorted({lf.spectral_method for lf in r.layers})


def _upper_points(an: Analyzer, x0: Tensor, eps_list: list[float], uppers: list[str],
                  output_map: Tensor | None, reuse_tol: float,
                  rows_pts: list[dict[str, SweepPoint]], all_notes: list[str],
                  bar) -> dict[str, Any]:
    """The local and global upper bounds of every radius (fills ``rows_pts``).

    Soundness of what is shared:

    * A reused layer factor is the bound of a dominating masked operator (masks grow with
      the radius; :meth:`Analyzer._reuse`), so it bounds the current one. Which earlier
      factor is reused depends on the random draws, so its failure probability is taken
      over every query of that layer in the sweep (a union bound, applied by the analyzer).
      A fresh memory (``Analyzer.reuse_copy``) makes the sweep's own computations the only
      candidates; the copy shares the traced graph, the exact dense matrices, the global
      factors and the draw counts with the caller's analyzer, whose memory of layer factors
      it leaves untouched.
    * Crossover: once the local bound at some radius reached the (cached, non-adaptive)
      global bound (the analyzer reports the smaller of the two), every larger radius
      reports the global bound without computing. It is a valid bound at every radius, with
      its own guarantee, and a fresh local bound there is ``min(local, global)`` with
      ``local`` at least as large (up to Lanczos randomness).
    """
    sa = an.reuse_copy(reuse_tol)
    gp: SweepPoint | None = None
    if "global" in uppers:
        bar.label("global")
        g = sa.global_bound(output_map=output_map)
        gp = SweepPoint("global", float(g.value), g.guarantee, float(g.seconds),
                        float(g.failure_prob), {"spectral": _spectral(g)})
        for n in g.notes:
            if n not in all_notes:
                all_notes.append(n)
        for i, pts in enumerate(rows_pts):
            pts["global"] = gp if i == 0 else SweepPoint(
                gp.method, gp.value, gp.guarantee, 0.0, gp.failure_prob, gp.details)
        bar.update(len(rows_pts))
    counts = {"computed": 0, "reused": 0, "global": 0}
    n_eval = 0
    distinct = sorted(set(eps_list))
    where: dict[float, list[int]] = {}
    for i, e in enumerate(eps_list):
        where.setdefault(e, []).append(i)
    if "local" in uppers:
        cross = math.inf  # smallest radius whose local bound was the global bound
        for k in _bisection_order(len(distinct)):
            e = distinct[k]
            bar.label(f"eps={e:.3g} local")
            if gp is not None and e >= cross:
                sa.count_skipped_query()  # the skip depends on the draws: keep the union bound
                pt = SweepPoint("local", gp.value, gp.guarantee, 0.0, gp.failure_prob,
                                {"spectral": gp.details["spectral"], "source": "global",
                                 "crossover_eps": cross, "reused_layers": []})
            else:
                r = sa.local_bound(x0, e, output_map=output_map)
                n_eval += 1
                reused = [lf for lf in r.layers if lf.spectral_method.startswith("reused")]
                # a reused probabilistic factor carries a union bound over the layer's
                # computations in this sweep (Analyzer._reuse)
                fp = float(r.failure_prob) if r.guarantee == Guarantee.PROBABILISTIC else 0.0
                local_prod = math.prod(lf.local for lf in r.layers) if r.layers else r.value
                from_global = gp is not None and bool(r.layers) and r.value < local_prod
                # reached the global bound (never trade a certified value for a probabilistic)
                if gp is not None and r.value >= gp.value and not (
                        gp.guarantee == Guarantee.PROBABILISTIC
                        and r.guarantee != Guarantee.PROBABILISTIC):
                    cross = min(cross, e)
                pt = SweepPoint("local", float(r.value), r.guarantee, float(r.seconds), fp,
                                {"spectral": _spectral(r),
                                 "source": "reused" if reused else "computed",
                                 "reused_layers": [lf.index for lf in reused],
                                 "from_global": from_global})
                for n in r.notes:
                    if n not in all_notes:
                        all_notes.append(n)
            counts[pt.details["source"]] += 1
            for i in where[e]:
                rows_pts[i]["local"] = pt
            bar.update(len(where[e]))
        if counts["reused"]:
            all_notes.append(
                f"{counts['reused']} local value(s) reuse layer factors of larger radii "
                f"(reuse_tol={reuse_tol:g}): valid upper bounds, slightly looser than fresh "
                "ones; their failure probabilities include a union bound over the sweep's "
                "earlier computations")
    stats = {"local_computed": counts["computed"], "local_reused": counts["reused"],
             "local_from_global": counts["global"], "local_evaluations": n_eval}
    if "tight" in uppers:
        stats["tight_formed"] = _tight_points(sa, x0, distinct, where, output_map, rows_pts,
                                              all_notes, bar)
    return stats


def _tight_points(sa: Analyzer, x0: Tensor, distinct: list[float],
                  where: dict[float, list[int]], output_map: Tensor | None,
                  rows_pts: list[dict[str, SweepPoint]], all_notes: list[str], bar) -> int:
    """The ``"tight"`` curve: ``local_bound(..., tight=True)`` at every radius (the smaller
    of the centre-plus-deviation bound of :mod:`lipbound.tight` and the paper's product, or
    the global bound where that is smaller), on the sweep's analyzer ``sa`` (its layer
    factors are remembered from the ``"local"`` curve: an exact repeat gives the same value;
    a reused probabilistic factor carries the analyzer's union bound, as there). Each point
    says in ``details["source"]`` which bound it is (``"tight"``, ``"paper"`` or
    ``"global"``). Returns how many points are the tight bound."""
    formed = 0
    for e in distinct:
        bar.label(f"eps={e:.3g} tight")
        r = sa.local_bound(x0, e, output_map=output_map, tight=True)
        fp = float(r.failure_prob) if r.guarantee == Guarantee.PROBABILISTIC else 0.0
        notes = list(r.notes)
        source = {"tight": "tight", "global": "global"}.get(r.source, "paper")
        formed += source == "tight"
        why = next((n for n in notes if n.startswith("tight bound not formed")), None)
        details: dict[str, Any] = {"spectral": _spectral(r), "source": source}
        if why is not None:
            details["not_formed"] = why
        pt = SweepPoint("tight", float(r.value), r.guarantee, float(r.seconds), fp, details)
        for i in where[e]:
            rows_pts[i]["tight"] = pt
        bar.update(len(where[e]))
    why = " (details['not_formed'] says why it was not formed)" if formed < len(distinct) \
        else ""
    all_notes.append(
        f"tight: the centre-plus-deviation bound (lipbound.tight) at {formed} of "
        f"{len(distinct)} radii; elsewhere the paper's product or the global bound, whichever "
        f"is smaller{why}")
    return formed


def _carry_lower_witnesses(eps_list: list[float], rows_pts: list[dict[str, SweepPoint]],
                           lowers: list[str]) -> int:
    """Replace, for each lower-bound method, a row's point by the best one of the rows at
    radii ``<=`` its own (a running maximum in increasing ``eps``), when that is larger: the
    quantity ``L(x0, eps)`` is non-decreasing in ``eps``, and a witness ``x`` with ``||x -
    x0|| <= eps'`` lies in every ball of radius ``eps >= eps'``, attaining the same ratio.
    The carried point keeps its witness, value and ``witness_distance``, with this row's
    time and evaluations, ``details["from_eps"]`` (the radius it was found at) and
    ``details["own_value"]`` (the value found at this row's radius). Returns how many
    points were replaced."""
    order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
    # rows of one radius together (a radius may be given twice)
    groups: list[list[int]] = []
    for i in order:
        if groups and eps_list[groups[-1][0]] == eps_list[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    carried = 0
    for m in lowers:
        top: SweepPoint | None = None
        top_eps = 0.0
        for group in groups:
            own = [rows_pts[i][m] for i in group]  # (as computed: replaced only below)
            for i, pt in zip(group, own, strict=True):
                if top is None or pt.value > top.value:
                    top, top_eps = pt, eps_list[i]
            for i, pt in zip(group, own, strict=True):
                if top is not None and top.value > pt.value:
                    details = {**top.details, "n_evaluations": pt.details.get("n_evaluations"),
                               "from_eps": top_eps, "own_value": pt.value}
                    rows_pts[i][m] = SweepPoint(m, top.value, top.guarantee, pt.seconds,
                                                top.failure_prob, details, top.witness)
                    carried += 1
    return carried


def sweep(model_or_analyzer: nn.Module | Analyzer, x0: Tensor, eps_values: Sequence[float],
          methods: Sequence[str] | str = DEFAULT_METHODS, *, progress: bool = False,
          input_shape: Sequence[int] | None = None, name: str | None = None,
          input_name: str = "x0", samples: int = 10_000, steps: int = 100,
          restarts: int = 16, seed: int = 0, lower_dtype: torch.dtype | None = torch.float64,
          output_map: Tensor | None = None, spectral: str = "auto",
          failure_prob: float = 1e-6, device: str | torch.device | None = None,
          notes: Sequence[str] = (), reuse_tol: float = DEFAULT_REUSE_TOL) -> SweepResult:
    """Upper and lower bounds on the local Lipschitz constant for many radii.

    For each ``eps`` the chosen methods are run on the quantity
    ``L(x0, eps) = sup_{0<||x-x0||<=eps} ||C(f(x)-f(x0))|| / ||x-x0||`` (L2):
    ``"local"`` (upper bound of Avant & Morgansen, IEEE TNNLS 2023), ``"tight"`` (the
    smaller of that and the centre-plus-deviation bound of :mod:`lipbound.tight`:
    ``local_bound(..., tight=True)``), ``"global"`` (product of per-layer spectral norms, an
    upper bound for every radius), and the lower bounds
    ``"random"``, ``"gradient"``, ``"pgd"``, ``"best"`` of :mod:`lipbound.lower`, each a
    ratio attained by a concrete input in the ball.

    Work is shared across radii, never at the price of an unproved number: one
    :class:`Analyzer` (traced once; exact layer matrices formed once; with ``"global"`` among
    the methods, as by default, the global factors are computed once, before the first local
    bound, so each local bound can use them and never exceeds the global one). The distinct
    radii are evaluated in bisection order (largest, smallest, then midpoints depth-first) so
    that each radius has computed neighbours on both sides: a layer factor of a larger
    radius bounds the same layer at a smaller one (its masks dominate), and it is reused
    when it is within ``reuse_tol`` of a lower estimate of the current layer
    (:meth:`Analyzer._reuse`). Once the local bound at some radius is the global bound,
    larger radii report the global bound without computing.
    Each local point says in ``details["source"]`` whether it was ``"computed"``,
    ``"reused"`` (some layer factors reused; ``details["reused_layers"]``) or taken from
    the ``"global"`` bound; the counts are in ``settings``. The failure probability of a
    point with reused probabilistic factors includes a union bound over the earlier
    computations it could have come from.

    Lower bounds are reported as running maxima over the radii: ``L(x0, eps)`` is
    non-decreasing in ``eps``, so a witness found at a smaller radius is a valid witness at
    every larger one. Where an earlier (smaller) radius gave a method a larger value, the
    point carries that value and witness (``SweepPoint.witness``), with
    ``details["from_eps"]`` and ``details["own_value"]`` (the value the method found at
    the radius itself); the notes say how many.

    Args:
        model_or_analyzer: the network (eval mode) or an :class:`Analyzer` of it.
        x0: the nominal input, shape ``(1, *input_shape)``.
        eps_values: the radii (a list, tuple, 1-D tensor or array, or another ordered
            iterable; each finite and > 0), e.g. from :func:`default_eps_range`; a single
            number, a string, a set (unordered), a dict (keys) or a tensor or array of more
            than one dimension is refused.
        methods: names out of :data:`ALL_METHODS` (or a comma-separated string).
        progress: show a bar over the radius x method work on stderr (default off; only on a
            terminal, after a few seconds: see :mod:`lipbound._progress`).
        input_shape: per-sample input shape (default: from ``x0``).
        name: model name for results and plot titles.
        input_name: name of ``x0`` for the plot title.
        samples: points drawn by the random-sampling lower bound per radius.
        steps: ascent steps of the gradient and PGD lower bounds.
        restarts: restarts of PGD.
        seed: seed of the lower bounds' draws (and of a new Analyzer's Lanczos vectors).
        lower_dtype: dtype the lower bounds evaluate the network in (default float64, the
            precision of the upper-bound analysis, so that both describe the same
            function; a copy of the model is made); ``None``: the model as it is.
        output_map: optional ``(m, n_out)`` matrix ``C``: bound ``C f`` instead of ``f``.
        spectral, failure_prob, device: passed to a new :class:`Analyzer` (ignored when an
            Analyzer is given).
        notes: extra caveats to record.
        reuse_tol: relative looseness allowed for a reused layer factor (``0``: every
            local bound is computed fresh, except exact repeats of a masked operator, which
            give the same value). The reused factor is at most ``1 + reuse_tol`` times a
            Lanczos/SVD *estimate* (a lower value) of the current layer. A fresh Lanczos
            factor is that estimate inflated by the smaller of the Kuczynski-Wozniakowski
            factor (~1.5 % at 64 steps) and the a posteriori bound (often ~0.1 % on trained
            layers), so a reused value can be up to ``reuse_tol`` above a fresh one.
            Default :data:`DEFAULT_REUSE_TOL`. The local bounds run on a copy of the
            analyzer with its own memory of layer factors (:meth:`Analyzer.reuse_copy`), so
            the caller's memory of factors is not changed; the caller's analyzer does keep
            what the copy shares with it: the global factors (its later local bounds can
            then report the global bound where smaller), the exact layer matrices, and the
            draw counts (its later Lanczos factors draw fresh start vectors, so their values
            can differ in the last digits from those of an analyzer that ran no sweep; each
            is a valid bound).

    Returns:
        A :class:`SweepResult` (one row per radius, in the order of ``eps_values``).

    Raises:
        InputError: bad radius, method or input.
    """
    t_start = time.perf_counter()
    meths = parse_methods(methods)
    items = as_radius_list(eps_values)
    if items is None:
        raise InputError(f"eps_values must be a sequence of radii, got the single number "
                         f"{eps_values!r}; pass [{eps_values!r}] (or use local_bound)")
    eps_list = [check_eps(e, f"eps_values[{i}]") for i, e in enumerate(items)]
    if not eps_list:
        raise InputError("eps_values is empty; give at least one radius")
    for label, v in (("samples", samples), ("steps", steps), ("restarts", restarts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{label} must be an integer >= 1, got {v!r}")
    reuse_tol = check_reuse_tol(reuse_tol)
    progress = check_bool(progress, "progress")
    seed = check_int(seed, "seed", 0)
    if seed >= 2 ** 64 and any(m in LOWER_METHODS for m in meths):
        raise InputError(f"seed must be below 2**64 (the range of the lower bounds' random "
                         f"generators), got {seed}")
    if lower_dtype is not None and not (isinstance(lower_dtype, torch.dtype)
                                        and lower_dtype.is_floating_point):
        raise InputError(f"lower_dtype must be a floating-point torch.dtype (e.g. "
                         f"torch.float64) or None (the model as it is), got {lower_dtype!r}")
    if isinstance(notes, (str, bytes)):
        raise InputError(f"notes must be a sequence of strings, got the string {notes!r}; "
                         f"pass [{notes!r}]")
    if isinstance(model_or_analyzer, Analyzer):
        an = model_or_analyzer
        check_analyzer_settings(an, spectral=(spectral, "auto"),
                                failure_prob=(failure_prob, 1e-6), device=(device, None),
                                input_shape=(input_shape, None))
    elif isinstance(model_or_analyzer, nn.Module):
        if not isinstance(x0, Tensor):
            raise InputError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if input_shape is None and x0.dim() < 2:
            # (the input shape is read after the batch dimension: there is none)
            raise InputError(f"x0 must have a batch dimension of 1, shape (1, *input_shape), "
                             f"got {tuple(x0.shape)}; pass x0.unsqueeze(0) for one unbatched "
                             "input, or give input_shape")
        shape = input_shape if input_shape is not None else tuple(x0.shape[1:])
        an = Analyzer(model_or_analyzer, shape, device=device, spectral=spectral,
                      failure_prob=failure_prob, seed=seed, name=name, notes=notes)
    else:
        raise InputError("model_or_analyzer must be a torch.nn.Module or a lipbound.Analyzer, "
                         f"got {type(model_or_analyzer).__name__}")
    x0 = check_input(x0, an.input_shape)
    model_name = name or an.name
    lower_model = None
    if any(m in LOWER_METHODS for m in meths):
        if an.model.training:
            raise InputError("the model is in training mode; call model.eval() first")
        lower_model = _lower_model(an.model, lower_dtype)
    x0_model = x0.to(next(iter(an.model.parameters()), x0).device)

    rows_pts: list[dict[str, SweepPoint]] = [{} for _ in eps_list]
    all_notes = list(notes) + [n for n in an.notes if n not in notes]
    uppers = [m for m in meths if m in UPPER_METHODS]
    lowers = [m for m in meths if m in LOWER_METHODS]
    from .lower._common import one_float64_copy

    with progress_bar(progress, len(eps_list) * len(meths), f"sweep {model_name}",
                      "bound") as bar:
        if uppers:
            stats = _upper_points(an, x0, eps_list, uppers, output_map, reuse_tol, rows_pts,
                                  all_notes, bar)
        # the lower bounds' witnesses at every radius share one float64 copy of the model
        with one_float64_copy(lower_model):
            for i, eps in enumerate(eps_list):
                for m in lowers:
                    bar.label(f"eps={eps:.3g} {m}")
                    lr = _lower(m, lower_model, x0_model, eps, samples=samples, steps=steps,
                                restarts=restarts, seed=seed, output_map=output_map)
                    rows_pts[i][m] = SweepPoint(m, float(lr.value), lr.guarantee, float(lr.seconds),
                                                0.0, {"witness_distance": lr.witness_distance,
                                                      "n_evaluations": lr.n_evaluations},
                                                lr.witness)
                    bar.update(1)
        carried = _carry_lower_witnesses(eps_list, rows_pts, lowers)
        if carried:
            all_notes.append(
                f"{carried} lower-bound value(s) come from a witness found at a smaller radius "
                "(the local constant is non-decreasing in eps, so a witness in a smaller ball "
                "is one in every larger ball): details['from_eps'] gives that radius, "
                "details['own_value'] the value found at the radius itself")
    rows: list[SweepRow] = []
    for eps, pts in zip(eps_list, rows_pts, strict=True):
        row = SweepRow(eps, tuple(pts[m] for m in meths))
        log.info("sweep %s eps=%g: %s", model_name, eps,
                 ", ".join(f"{p.method}={p.value:.5g}" for p in row.points))
        rows.append(row)
    settings = {"samples": samples, "steps": steps, "restarts": restarts, "seed": seed,
                "lower_dtype": _lower_dtype_used(lower_model, lower_dtype, x0_model),
                "spectral": an.spectral, "failure_prob_budget": an.failure_prob,
                "device": str(an.device), "output_map": output_map is not None,
                "reuse_tol": reuse_tol, "order": _ORDER_TEXT if uppers else None}
    if uppers:
        settings.update(stats)
    res = SweepResult(model=model_name, input_name=input_name, methods=meths,
                      rows=tuple(rows), seconds=time.perf_counter() - t_start,
                      settings=settings, notes=tuple(all_notes))
    for v in res.violations():
        log.warning("soundness check failed: %s", v)
    return res
