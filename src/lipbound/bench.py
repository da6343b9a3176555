"""Timing and memory benchmarks of the bound computations (``lipbound bench``).

What is measured, per network and per quantity (``"local"`` or ``"global"``):

* **runs** -- the wall-clock seconds of the bound computation alone, on an :class:`Analyzer`
  built *outside* the timer for every repeat. A fresh analyzer per repeat matters: an
  analyzer caches the global layer factors, small layers' dense matrices and the layer
  factors it computed, so a second global bound, or a second local bound at the same radius,
  on the same analyzer costs next to nothing; neither is "one bound". Sharing across radii is
  measured separately by :func:`bench_sweep`.
* **cold_seconds** -- the quantity's first computation *including* building the analyzer
  (tracing the model, converting the weights to float64); for the first quantity measured
  in the process it also holds torch's one-off start-up work (thread pools, kernel
  selection), so run one quantity per process for a truly cold number (as
  ``benchmarks/run_benchmarks.py`` does). It is not part of ``runs``.
* **trace_seconds** -- the median time to build an analyzer, over the timed runs (the cold
  run's construction is part of ``cold_seconds`` only).
* **peak_memory_mb** -- the peak resident set size of the process while the quantity was
  measured (on Linux the high-water mark is reset before each quantity through
  ``/proc/self/clear_refs``; elsewhere it is the process peak since start, so run one
  network per process -- ``benchmarks/run_benchmarks.py`` does). On CUDA it is
  ``torch.cuda.max_memory_allocated`` and the host peak is in ``host_peak_memory_mb``.

The targets (``TARGET_SECONDS``, ``TARGET_MEMORY_MB``) are the project's goals for one bound
on a 2-core CPU with the zoo's default inputs (224x224 for AlexNet and VGG-16).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._modelinfo import model_device
from ._progress import NULL_BAR, NullBar, progress_bar
from ._threads import blas_threads, limited_threads
from .errors import InputError
from .results import BoundResult, Guarantee, _jsonable

log = logging.getLogger(__name__)

__all__ = [
    "BenchResult",
    "SweepBench",
    "RadiusBench",
    "TARGET_SECONDS",
    "TARGET_MEMORY_MB",
    "DEFAULT_EPS",
    "bench",
    "bench_model",
    "bench_sweep",
    "bench_sweep_model",
    "radius_available",
    "bench_radius",
    "environment",
]

DEFAULT_EPS = 0.1
"""Radius of the timed local bound when none is given (the default of ``lipbound bound``)."""

TARGET_SECONDS: dict[str, dict[str, float]] = {
    "mnist": {"local": 0.010, "global": 0.010},
    "cifar10": {"local": 0.050, "global": 0.050},
    "alexnet": {"local": 3.0, "global": 3.0},
    "vgg16": {"local": 30.0, "global": 30.0},
}
"""Target median seconds of one bound, per zoo network and quantity."""

TARGET_MEMORY_MB: dict[str, float] = {"alexnet": 3 * 1024.0, "vgg16": 6 * 1024.0}
"""Target peak memory (MiB) of one bound, per zoo network."""

SWEEP_TARGET_UNITS = 10.0
"""A sweep of 30 radii should cost at most this many single local bounds."""

SWEEP_TARGET_POINTS = 30
"""The number of radii that ``SWEEP_TARGET_UNITS`` is stated for."""

RADIUS_TARGET_SECONDS = 10.0
"""Certifying the 100 shipped MNIST test images should take at most this long in total."""

RADIUS_TARGET_IMAGES = 100
"""The number of MNIST test images that ``RADIUS_TARGET_SECONDS`` is stated for."""

WHATS = ("local", "global")


# ---------------------------------------------------------------------------- memory
class _Memory:
    """Peak memory of a stretch of work: host resident set, or CUDA allocations."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = False
        self.source = "ru_maxrss (process peak since start)"

    @staticmethod
    def _vm(field_name: str) -> float | None:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                m = re.search(rf"^{field_name}:\s+(\d+)\s*kB", fh.read(), re.MULTILINE)
        except OSError:
            return None
        return int(m.group(1)) / 1024.0 if m else None

    def current_host_mb(self) -> float | None:
        """Resident set size now (MiB), when the platform tells."""
        return self._vm("VmRSS")

    def reset(self) -> None:
        """Start a new peak (when the platform allows it)."""
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # resets VmHWM (Linux >= 4.0)
            # trusted only if the peak came down to the resident set: a kernel or sandbox
            # that accepts the write and ignores it would leave the process peak, labelled
            # "reset per quantity" (slack: the set may grow between the two reads)
            hwm, rss = self._vm("VmHWM"), self._vm("VmRSS")
            self.resettable = hwm is not None and rss is not None and hwm <= rss + 64.0
        except OSError:
            self.resettable = False
        self.source = ("VmHWM (peak RSS, reset per quantity)" if self.resettable
                       else "ru_maxrss (process peak since start)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def host_peak_mb(self) -> float:
        if self.resettable:
            v = self._vm("VmHWM")
            if v is not None:
                return v
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # kilobytes on Linux, bytes on macOS
        return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0

    def cuda_peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 20


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BenchResult:
    """Timing and memory of one bound computation on one network.

    Attributes:
        model: the network's name.
        what: ``"local"`` or ``"global"``.
        median_seconds, min_seconds, max_seconds: statistics of ``runs``.
        peak_memory_mb: peak memory while measuring (host RSS on the CPU, CUDA allocations
            on a GPU; see ``memory_source``), MiB.
        value: the bound computed (the same in every run: each run uses a fresh analyzer
            with the same seed).
        guarantee: the bound's guarantee.
        runs: seconds of each timed run (the bound computation only).
        target_seconds: the project's target for the median, or ``None``.
        ratio_to_target: ``median_seconds / target_seconds`` (<= 1 meets the target).
        cold_seconds: the quantity's first computation, building the analyzer included (and
            torch's start-up work when it is the first quantity of the process).
        trace_seconds: median seconds to build an analyzer (tracing, float64 weights) over
            the timed runs (the cold run's construction is in ``cold_seconds`` only).
        cpu_median_seconds: median process CPU time of the runs (all threads). With one
            thread it estimates the wall time on an idle machine, so it is the steadier
            number on a busy one.
        cpu_runs: CPU seconds of each run.
        failure_prob: failure probability of a probabilistic bound (0 if certified).
        eps: radius of a local bound, ``None`` for a global one.
        device: where it ran.
        threads: ``torch.get_num_threads()`` during the runs.
        spectral: the analyzer's spectral mode.
        memory_source: how the peak was measured.
        host_peak_memory_mb: peak host RSS (MiB), also on CUDA.
        baseline_memory_mb: host RSS before the measurement (model loaded), MiB.
        target_memory_mb: the project's memory target, or ``None``.
        memory_ratio_to_target: ``peak_memory_mb / target_memory_mb`` (<= 1 meets the
            target), or ``None`` without a target.
        load_average: the 1-minute load average before and after the runs (a busy machine
            makes timings noisy).
        layer_methods: the spectral route of each layer in the last run.
        notes: caveats (e.g. "seeded random weights", values that differed between runs).
        others: results of the other quantities measured in the same call.
    """

    model: str
    what: str
    median_seconds: float
    min_seconds: float
    max_seconds: float
    peak_memory_mb: float
    value: float
    guarantee: Guarantee
    runs: tuple[float, ...]
    target_seconds: float | None
    ratio_to_target: float | None
    cold_seconds: float = math.nan
    trace_seconds: float = math.nan
    cpu_median_seconds: float = math.nan
    cpu_runs: tuple[float, ...] = ()
    failure_prob: float = 0.0
    eps: float | None = None
    device: str = "cpu"
    threads: int = 1
    spectral: str = "auto"
    memory_source: str = ""
    host_peak_memory_mb: float = math.nan
    baseline_memory_mb: float = math.nan
    target_memory_mb: float | None = None
    memory_ratio_to_target: float | None = None
    load_average: tuple[float, float] = (math.nan, math.nan)
    layer_methods: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    others: tuple[BenchResult, ...] = field(default_factory=tuple)

    @property
    def results(self) -> dict[str, BenchResult]:
        """All quantities measured in the call, by name (this one first)."""
        out = {self.what: self}
        for o in self.others:
            out[o.what] = o
        return out

    def _flat(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "what": self.what,
            "median_seconds": self.median_seconds,
            "min_seconds": self.min_seconds,
            "max_seconds": self.max_seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "value": self.value,
            "guarantee": self.guarantee,
            "failure_prob": self.failure_prob,
            "runs": list(self.runs),
            "target_seconds": self.target_seconds,
            "ratio_to_target": self.ratio_to_target,
            "cold_seconds": self.cold_seconds,
            "trace_seconds": self.trace_seconds,
            "cpu_median_seconds": self.cpu_median_seconds,
            "cpu_runs": list(self.cpu_runs),
            "eps": self.eps,
            "device": self.device,
            "threads": self.threads,
            "spectral": self.spectral,
            "memory_source": self.memory_source,
            "host_peak_memory_mb": self.host_peak_memory_mb,
            "baseline_memory_mb": self.baseline_memory_mb,
            "target_memory_mb": self.target_memory_mb,
            "memory_ratio_to_target": self.memory_ratio_to_target,
            "load_average": list(self.load_average),
            "layer_methods": list(self.layer_methods),
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: this quantity's fields at the top level, and ``results`` with
        every quantity measured (``{"local": {...}, "global": {...}}``)."""
        d = self._flat()
        d["results"] = {k: v._flat() for k, v in self.results.items()}
        return _jsonable(d)


@dataclass(frozen=True)
class SweepBench:
    """Cost of a sweep of upper bounds over many radii: :func:`lipbound.sweep.sweep` with the
    methods ``("local", "global")`` on a fresh analyzer (built outside the timer), in units
    of one local bound on a fresh analyzer.

    Attributes:
        model: the network's name.
        n_points: number of radii.
        eps_range: smallest and largest radius (log-spaced between).
        total_seconds: median over repeats of the whole sweep (analyzer built outside).
        runs: seconds of each repeat of the sweep.
        local_median_seconds: median of one local bound on a fresh analyzer, measured in the
            same call (the unit).
        local_eps: the radius of that unit local bound.
        cost_in_local_bounds: ``total_seconds / local_median_seconds``.
        target_units: the target for ``cost_in_local_bounds`` (``SWEEP_TARGET_UNITS`` for
            the target's 30 radii; ``None`` for another number of radii).
        cpu_total_seconds: median process CPU time of the sweep.
        cpu_cost_in_local_bounds: the same ratio in CPU time (steadier on a busy machine).
        values: the sweep's local bound at each radius (last repeat).
        load_average: 1-minute load average before and after.
        reuse_tol: the sweep's ``reuse_tol``.
        sources: how the sweep's local values were obtained (``computed``, ``reused``,
            ``global``; see :func:`lipbound.sweep.sweep`).
        raw_total_seconds: the plain loop of ``n_points`` ``Analyzer.local_bound`` calls on
            one fresh analyzer (no reuse between radii except exact repeats; no global
            bound), measured once; ``nan`` when skipped.
        raw_cost_in_local_bounds: ``raw_total_seconds / local_median_seconds``.
        raw_values: the plain loop's bounds (each radius computed afresh, with the layers'
            own start vectors for that computation, see :meth:`Analyzer._gen`).
        looseness_max, looseness_median: of ``values[i] / raw_values[i]``, how much looser
            the sweep's values are than fresh single bounds (``1.0``: as tight).
        failure_prob_max: largest failure probability of a sweep value (0 if certified).
        guarantees: the guarantees of the sweep's values (``"certified upper bound"``,
            ``"probabilistic upper bound"``), sorted; since session 26.
        notes: the caveats of the sweep's values (the model's, the analyzer's: a float32
            model's rounding; the sweep's own); since session 26.
    """

    model: str
    n_points: int
    eps_range: tuple[float, float]
    total_seconds: float
    runs: tuple[float, ...]
    local_median_seconds: float
    cost_in_local_bounds: float
    local_eps: float = DEFAULT_EPS
    target_units: float | None = SWEEP_TARGET_UNITS
    cpu_total_seconds: float = math.nan
    cpu_cost_in_local_bounds: float = math.nan
    values: tuple[float, ...] = ()
    load_average: tuple[float, float] = (math.nan, math.nan)
    reuse_tol: float = math.nan
    sources: dict[str, int] = field(default_factory=dict)
    raw_total_seconds: float = math.nan
    raw_cost_in_local_bounds: float = math.nan
    raw_values: tuple[float, ...] = ()
    looseness_max: float = math.nan
    looseness_median: float = math.nan
    failure_prob_max: float = 0.0
    guarantees: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})


@dataclass(frozen=True)
class RadiusBench:
    """Time to certify a batch of test images by bisection on the radius.

    Attributes:
        model: the network's name.
        n_images: number of images.
        total_seconds: all images, one analyzer (its construction included).
        trace_seconds: the analyzer's construction.
        per_image_seconds: seconds of each image.
        target_seconds: the target for ``total_seconds`` (``RADIUS_TARGET_SECONDS`` for
            the target's 100 MNIST images; ``None`` for another network or count).
        cpu_total_seconds: process CPU time of the whole (steadier on a busy machine).
        radii: the certified radius of each image.
        load_average: 1-minute load average before and after.
        n_bound_evaluations: Lipschitz-bound computations of all images (search and
            re-checks).
        reuse_tol: the searches' ``reuse_tol``.
        start_from_previous: whether each search started from the previous image's radius.
        guarantees: the guarantee of each radius (``"certified lower bound"`` or
            ``"probabilistic lower bound"``); since session 26.
        failure_probs: the failure probability of each radius (0 when certified); since
            session 26.
        notes: the caveats of the radii (the model's: e.g. seeded random weights; the
            analyzer's: a float32 model's rounding; each certifying bound's own, once);
            since session 26.
    """

    model: str
    n_images: int
    total_seconds: float
    trace_seconds: float
    per_image_seconds: tuple[float, ...]
    target_seconds: float | None = RADIUS_TARGET_SECONDS
    cpu_total_seconds: float = math.nan
    radii: tuple[float, ...] = ()
    load_average: tuple[float, float] = (math.nan, math.nan)
    n_bound_evaluations: int = 0
    reuse_tol: float = math.nan
    start_from_previous: bool = False
    guarantees: tuple[str, ...] = ()
    failure_probs: tuple[float, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})


# ---------------------------------------------------------------------------- helpers
def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's name (``/proc/cpuinfo``'s first ``model name``, else what the platform
    module says; ``"unknown"`` without either): the same code's timings differ by up to 2x
    between hosts (benchmarks/README.md), so every result names its CPU."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Versions and machine facts worth keeping next to timings."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "blas_threads": blas_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _threads(n: int | None) -> contextlib.AbstractContextManager[None]:
    """A block with ``n`` CPU threads for torch and for numpy/scipy's BLAS/OpenMP pools,
    restored on exit (:func:`lipbound._threads.limited_threads`); ``None``: left as they are."""
    if n is not None and n < 1:
        raise InputError(f"threads must be >= 1, got {n}")
    return contextlib.nullcontext() if n is None else limited_threads(n)


def _check_what(what: str | Sequence[str]) -> tuple[str, ...]:
    items = (what,) if isinstance(what, str) else tuple(what)
    items = tuple(w.strip().lower() for w in items if w.strip())
    bad = [w for w in items if w not in WHATS]
    if not items or bad:
        raise InputError(f"what must name 'local' and/or 'global', got {what!r}")
    return tuple(dict.fromkeys(items))


def _check_repeat(repeat: int) -> int:
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise InputError(f"repeat must be an integer >= 1, got {repeat!r}")
    return repeat


def _check_analyzer_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``analyzer_options`` as a dict of :class:`~lipbound.analyzer.Analyzer` keyword options
    (``name`` and ``notes`` are the bench's own arguments)."""
    from .analyzer import _analyzer_options

    if options is None:
        return {}
    allowed = [n for n in _analyzer_options() if n not in ("name", "notes")]
    if not isinstance(options, Mapping):
        raise InputError(f"analyzer_options must be a dict of Analyzer options "
                         f"({', '.join(allowed)}), got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        raise InputError(f"unknown analyzer_options {', '.join(unknown)}; pass only "
                         f"{', '.join(allowed)}")
    return dict(options)


def _check_eps_range(eps_range: Any) -> tuple[float, float]:
    """``eps_range`` as an increasing pair of radii."""
    from .validation import check_eps

    if isinstance(eps_range, (str, bytes)) or not hasattr(eps_range, "__len__") \
            or len(eps_range) != 2:
        raise InputError(f"eps_range must be a pair (smallest, largest radius), e.g. (0.01, 1), "
                         f"got {eps_range!r}")
    lo, hi = check_eps(eps_range[0], "eps_range[0]"), check_eps(eps_range[1], "eps_range[1]")
    if hi <= lo:
        raise InputError(f"eps_range must be increasing, got {(lo, hi)}; swap them")
    return lo, hi


def _model_device(model: nn.Module) -> torch.device:
    return model_device(model, torch.device("cpu"))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- core
def _measure(what: str, make: Callable[[], Any], x0: Tensor, eps: float, repeat: int,
             device: torch.device, mem: _Memory, warmup: bool = True, bar: NullBar = NULL_BAR
             ) -> tuple[list[float], list[float], float, list[float], BoundResult, list[float]]:
    """A cold run then ``repeat`` timed runs, each on a fresh analyzer built off the clock
    (without ``warmup`` the cold run's computation is the first timed run); ``bar`` is
    labelled and advanced between runs, off the clock.
    Returns (wall seconds, CPU seconds, cold seconds, trace seconds, last result, values of
    every run)."""

    def op(an) -> BoundResult:
        return an.local_bound(x0, eps) if what == "local" else an.global_bound()

    mem.reset()
    runs: list[float] = []
    cpu: list[float] = []
    traces: list[float] = []
    values: list[float] = []
    cold = math.nan
    an = None
    for i in range(repeat + (1 if warmup else 0)):
        k = i if warmup else i + 1  # the timed run's number (0: the untimed cold run)
        bar.label(f"{what} " + ("cold run" if k == 0 else f"run {k}/{repeat}"))
        an = None
        gc.collect()
        _sync(device)
        ta = time.perf_counter()
        an = make()
        _sync(device)
        tb = time.perf_counter()
        cb = time.process_time()
        res = op(an)
        _sync(device)
        tc = time.perf_counter()
        values.append(res.value)
        if i == 0:
            cold = tc - ta
        if i > 0 or not warmup:  # the cold run stays out of every median (trace included)
            traces.append(tb - ta)
            runs.append(tc - tb)
            cpu.append(time.process_time() - cb)
        bar.update()
    del an
    return runs, cpu, cold, traces, res, values


def bench_model(model: nn.Module, x0: Tensor, *, name: str,
                what: str | Sequence[str] = WHATS, eps: float | None = None,
                repeat: int = 5, spectral: str = "auto", device: str | torch.device | None = None,
                threads: int | None = None, analyzer_options: Mapping[str, Any] | None = None,
                notes: Sequence[str] = (), warmup: bool = True,
                progress: bool = False) -> BenchResult:
    """Benchmark local and/or global bounds of any supported model (see :func:`bench`).

    Args:
        model: the network (eval mode).
        x0: the nominal input of the local bound, shape ``(1, *input_shape)``.
        name: the network's name; zoo names pick up the targets.
        what, eps, repeat, spectral, device, threads: as for :func:`bench`.
        analyzer_options: extra keyword arguments of :class:`~lipbound.analyzer.Analyzer`
            (e.g. ``{"lanczos_steps": 32}``).
        notes: caveats copied into the result.
        warmup: run once untimed first (the cold run); without it the cold run is also the
            first timed run (for networks where one run takes minutes).
        progress: show a bar over the runs on stderr, naming the one running (only on a
            terminal, after a few seconds: see :mod:`lipbound._progress`); it is advanced
            between runs, off the clock (once shown, it is redrawn once a second: tens of
            microseconds).

    Returns:
        The result of the first quantity in ``what``; the others are in ``.others``.
    """
    from .analyzer import Analyzer
    from .validation import check_bool, check_eps, check_input, resolve_device

    whats = _check_what(what)
    warmup = check_bool(warmup, "warmup")
    progress = check_bool(progress, "progress")
    repeat = _check_repeat(repeat)
    eps = check_eps(DEFAULT_EPS if eps is None else eps)
    if spectral not in ("auto", "exact", "lanczos"):
        raise InputError(f"spectral must be 'auto', 'exact' or 'lanczos', got {spectral!r}")
    # None/"auto": the model's device; the caller's model stays where it is: the analyzer
    # makes its own float64 copies on ``dev`` (nn.Module.to would move it in place)
    dev = resolve_device(device, _model_device(model))
    x0 = check_input(x0, None).to(dev)
    input_shape = tuple(x0.shape[1:])
    opts = _check_analyzer_options(analyzer_options)
    opts.setdefault("spectral", spectral)
    key = name.lower()
    mem = _Memory(dev)

    def make():
        return Analyzer(model, input_shape, device=dev, name=name, notes=tuple(notes), **opts)

    out: list[BenchResult] = []
    n_runs = len(whats) * (repeat + (1 if warmup else 0))
    with _threads(threads), progress_bar(progress, n_runs, f"bench {name}", "run") as bar:
        n_threads = torch.get_num_threads()
        for w in whats:
            gc.collect()
            base = mem.current_host_mb()
            la0 = _loadavg()
            runs, cpu, cold, traces, res, values = _measure(w, make, x0, eps, repeat, dev,
                                                            mem, warmup, bar)
            host_peak = mem.host_peak_mb()
            cuda_peak = mem.cuda_peak_mb()
            la1 = _loadavg()
            med = statistics.median(runs)
            target = TARGET_SECONDS.get(key, {}).get(w)
            extra = list(res.notes)
            finite = [v for v in values if math.isfinite(v)]
            if finite and max(finite) - min(finite) > 1e-9 * max(abs(v) for v in finite):
                extra.append(f"values differed between runs: {min(finite)!r} .. "
                             f"{max(finite)!r}")
            peak = cuda_peak if cuda_peak is not None else host_peak
            mem_target = TARGET_MEMORY_MB.get(key)
            out.append(BenchResult(
                model=name, what=w, median_seconds=med, min_seconds=min(runs),
                max_seconds=max(runs),
                peak_memory_mb=peak,
                value=res.value, guarantee=res.guarantee, runs=tuple(runs),
                target_seconds=target,
                ratio_to_target=(med / target) if target else None,
                cold_seconds=cold, trace_seconds=statistics.median(traces),
                cpu_median_seconds=statistics.median(cpu), cpu_runs=tuple(cpu),
                failure_prob=res.failure_prob, eps=eps if w == "local" else None,
                device=str(dev), threads=n_threads, spectral=opts["spectral"],
                memory_source=("torch.cuda.max_memory_allocated" if cuda_peak is not None
                               else mem.source),
                host_peak_memory_mb=host_peak,
                baseline_memory_mb=base if base is not None else math.nan,
                target_memory_mb=mem_target,
                memory_ratio_to_target=(peak / mem_target) if mem_target else None,
                load_average=(la0, la1),
                layer_methods=tuple(lf.spectral_method for lf in res.layers),
                notes=tuple(dict.fromkeys(extra))))
            log.info("bench %s %s: median %.4fs over %d runs", name, w, med, repeat)
    first, rest = out[0], tuple(out[1:])
    return BenchResult(**{**{k: getattr(first, k) for k in first.__dataclass_fields__},
                          "others": rest})


def _load_zoo(model_name: str, device, seed: int = 0):
    from . import zoo
    from .inputs import load_sample

    lm = zoo.load_model(model_name, device=device, seed=seed)
    sample = load_sample(lm.entry.default_sample, entry=lm.entry)
    notes = () if lm.trained else (f"{lm.entry.name}: {lm.weights_source}",)
    x0 = sample.x.to(_model_device(lm.model))
    return lm, x0, notes


def bench(model_name: str, *, what: str | Sequence[str] = WHATS, eps: float | None = None,
          repeat: int = 5, spectral: str = "auto", device: str | torch.device | None = None,
          threads: int | None = None, analyzer_options: Mapping[str, Any] | None = None,
          warmup: bool = True) -> BenchResult:
    """Time one local and/or one global bound of a zoo network at its default input.

    Each timed run builds a fresh :class:`~lipbound.analyzer.Analyzer` outside the timer
    (an analyzer caches the global factors and the layer factors it computed, so re-using one would
    time a cache look-up); the first computation of the process, analyzer construction
    included, is reported as ``cold_seconds``.

    Args:
        model_name: a zoo name (``"mnist"``, ``"cifar10"``, ``"alexnet"``, ``"vgg16"``, ...).
        what: ``"local"``, ``"global"`` or both.
        eps: radius of the local bound (default ``DEFAULT_EPS`` = 0.1, normalised input).
        repeat: number of timed runs (the cold run comes on top).
        spectral: the analyzer's spectral mode (``"auto"``, ``"exact"``, ``"lanczos"``).
        device: ``None``/``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        threads: CPU threads during the runs, torch's intra-op threads and the BLAS/OpenMP
            pools of numpy and scipy (``None``: leave as is); restored afterwards.
        analyzer_options: extra keyword arguments of the analyzer.
        warmup: time ``repeat`` runs after an untimed cold run (default); ``False`` makes
            the cold run the first timed run.

    Returns:
        A :class:`BenchResult` for the first quantity of ``what``, the others in ``.others``
        (``.results`` maps every quantity to its result).

    Raises:
        ZooError: unknown network. InputError: bad ``what``/``repeat``/``eps``/``device``.

    Example:
        >>> r = bench("mnist", what="local", repeat=3)        # doctest: +SKIP
        >>> r.median_seconds, r.value, r.guarantee              # doctest: +SKIP
    """
    from .validation import check_bool, check_eps

    _check_what(what)
    _check_repeat(repeat)
    check_bool(warmup, "warmup")  # (before loading the network)
    if eps is not None:  # before loading the network (VGG-16: seconds)
        check_eps(eps)
    lm, x0, notes = _load_zoo(model_name, device)
    return bench_model(lm.model, x0, name=lm.entry.name, what=what, eps=eps, repeat=repeat,
                       spectral=spectral, device=None, threads=threads,
                       analyzer_options=analyzer_options, notes=notes, warmup=warmup)


def bench_sweep(model_name: str, *, n_points: int = 30,
                eps_range: tuple[float, float] | None = None, repeat: int = 1,
                local_repeat: int = 3, spectral: str = "auto",
                device: str | torch.device | None = None, threads: int | None = None,
                analyzer_options: Mapping[str, Any] | None = None,
                reuse_tol: float | None = None, raw: bool = True,
                eps: float | None = None) -> SweepBench:
    """Cost of :func:`lipbound.sweep.sweep` (local and global upper bounds) at ``n_points``
    log-spaced radii, in units of one local bound on a fresh analyzer (both measured here,
    in the same process), and how much looser its values are than fresh single bounds.

    Args:
        model_name: a zoo name.
        n_points: number of radii (>= 2).
        eps_range: smallest and largest radius (default: the zoo entry's ``eps_range``).
        repeat: repeats of the whole sweep (median reported).
        local_repeat: runs of the single local bound that serves as the unit.
        spectral, device, threads, analyzer_options: as for :func:`bench`.
        reuse_tol: the sweep's ``reuse_tol`` (default ``lipbound.sweep.DEFAULT_REUSE_TOL``).
        raw: also time the plain loop of local bounds (``raw_*`` fields; they give the
            looseness reference).
        eps: radius of the unit local bound (default ``DEFAULT_EPS``, as for :func:`bench`).
    """
    if not isinstance(n_points, int) or n_points < 2:
        raise InputError(f"n_points must be an integer >= 2, got {n_points!r}")
    from .validation import check_bool, check_eps

    _check_repeat(repeat)
    check_bool(raw, "raw")  # (before loading the network)
    if eps is not None:
        check_eps(eps)
    lm, x0, notes = _load_zoo(model_name, device)
    return bench_sweep_model(lm.model, x0, name=lm.entry.name,
                             eps_range=eps_range or lm.entry.eps_range, n_points=n_points,
                             repeat=repeat, local_repeat=local_repeat, spectral=spectral,
                             threads=threads, analyzer_options=analyzer_options, notes=notes,
                             reuse_tol=reuse_tol, raw=raw, eps=eps)


def bench_sweep_model(model: nn.Module, x0: Tensor, *, name: str,
                      eps_range: tuple[float, float], n_points: int = 30, repeat: int = 1,
                      local_repeat: int = 3, spectral: str = "auto", threads: int | None = None,
                      analyzer_options: Mapping[str, Any] | None = None,
                      notes: Sequence[str] = (), reuse_tol: float | None = None,
                      raw: bool = True, progress: bool = False,
                      eps: float | None = None) -> SweepBench:
    """:func:`bench_sweep` for any supported model and input ``x0`` (``(1, *shape)``).

    ``eps``: radius of the unit local bound (default ``DEFAULT_EPS``); ``lipbound bench``
    passes its ``--eps``, so the unit is the local bound of its table.

    ``progress``: bars on stderr (only on a terminal, after a few seconds) over the runs of
    the unit bound, then over the plain loop's radii and the sweeps.
    """
    from .analyzer import Analyzer
    from .sweep import DEFAULT_REUSE_TOL, sweep
    from .validation import check_bool, check_input

    if not isinstance(n_points, int) or n_points < 2:
        raise InputError(f"n_points must be an integer >= 2, got {n_points!r}")
    repeat = _check_repeat(repeat)
    raw = check_bool(raw, "raw")
    progress = check_bool(progress, "progress")
    lo, hi = _check_eps_range(eps_range)
    tol = DEFAULT_REUSE_TOL if reuse_tol is None else reuse_tol
    eps_values = [lo * (hi / lo) ** (i / (n_points - 1)) for i in range(n_points)]
    dev = _model_device(model)
    x0 = check_input(x0, None).to(dev)
    unit = bench_model(model, x0, name=name, what="local", eps=eps, repeat=local_repeat,
                       spectral=spectral, threads=threads, analyzer_options=analyzer_options,
                       notes=notes, progress=progress)
    opts = dict(analyzer_options or {})
    opts.setdefault("spectral", spectral)
    runs: list[float] = []
    cpu: list[float] = []
    values: list[float] = []
    sources: dict[str, int] = {}
    fp_max = 0.0
    raw_total = math.nan
    raw_values: list[float] = []
    la0 = _loadavg()
    n_steps = (n_points if raw else 0) + repeat
    with _threads(threads), progress_bar(progress, n_steps, f"bench sweep {name}",
                                         "step") as bar:
        if raw:  # the plain loop: fresh single bounds at every radius (the reference)
            an = Analyzer(model, tuple(x0.shape[1:]), device=dev, name=name, **opts)
            _sync(dev)
            t = time.perf_counter()
            for e in eps_values:  # (the bar's two calls cost microseconds a bound)
                bar.label(f"plain loop eps={e:.3g}")
                raw_values.append(float(an.local_bound(x0, e).value))
                bar.update()
            _sync(dev)
            raw_total = time.perf_counter() - t
            del an
            gc.collect()
        for k in range(repeat):
            bar.label(f"sweep {k + 1}/{repeat}")
            an = Analyzer(model, tuple(x0.shape[1:]), device=dev, name=name, **opts)
            _sync(dev)
            t = time.perf_counter()
            c = time.process_time()
            res = sweep(an, x0, eps_values, ("local", "global"), progress=False,
                        reuse_tol=tol)
            _sync(dev)
            runs.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            values = res.values("local")
            sources = {"computed": res.settings["local_computed"],
                       "reused": res.settings["local_reused"],
                       "global": res.settings["local_from_global"]}
            fp_max = max(r["local"].failure_prob for r in res.rows)
            guarantees = sorted({r["local"].guarantee.value for r in res.rows})
            sweep_notes = tuple(dict.fromkeys((*notes, *res.notes)))
            del an, res
            gc.collect()
            bar.update()
    total = statistics.median(runs)
    cpu_total = statistics.median(cpu)
    ratios = [v / r for v, r in zip(values, raw_values, strict=True) if r > 0] \
        if raw_values else []
    return SweepBench(model=name, n_points=n_points, eps_range=(lo, hi),
                      total_seconds=total, runs=tuple(runs),
                      local_median_seconds=unit.median_seconds,
                      cost_in_local_bounds=total / unit.median_seconds,
                      local_eps=unit.eps,
                      target_units=SWEEP_TARGET_UNITS if n_points == SWEEP_TARGET_POINTS
                      else None,
                      cpu_total_seconds=cpu_total,
                      cpu_cost_in_local_bounds=cpu_total / unit.cpu_median_seconds,
                      values=tuple(values), load_average=(la0, _loadavg()),
                      reuse_tol=tol, sources=sources, raw_total_seconds=raw_total,
                      raw_cost_in_local_bounds=raw_total / unit.median_seconds,
                      raw_values=tuple(raw_values),
                      looseness_max=max(ratios) if ratios else math.nan,
                      looseness_median=statistics.median(ratios) if ratios else math.nan,
                      failure_prob_max=fp_max, guarantees=tuple(guarantees),
                      notes=sweep_notes)


def radius_available() -> bool:
    """Always ``True``: :mod:`lipbound.radius` is part of the package (this asked whether it
    had been written yet, when the modules were written in parallel).

    .. deprecated:: session 24
        Kept for callers written before; it warns (``DeprecationWarning``) and will be
        removed. :func:`bench_radius` no longer returns ``None``.
    """
    warnings.warn("lipbound.bench.radius_available() is always True (lipbound.radius is part "
                  "of the package) and will be removed; drop the check",
                  DeprecationWarning, stacklevel=2)
    return True


def bench_radius(model_name: str = "mnist", *, n_images: int = 100, method: str = "local",
                 device: str | torch.device | None = None,
                 threads: int | None = None, reuse_tol: float | None = None,
                 start_from_previous: bool = False,
                 progress: bool = False,
                 analyzer_options: Mapping[str, Any] | None = None) -> RadiusBench:
    """Time certifying the first ``n_images`` shipped test images of a zoo network with
    ``lipbound.radius.certified_radius`` on one shared analyzer.

    Args:
        model_name: a zoo network with a shipped test set.
        n_images: how many test images (the first ones).
        method: the radius method.
        device, threads: as for :func:`bench`.
        reuse_tol: ``certified_radius``'s ``reuse_tol`` (default: its default).
        start_from_previous: start each search at the previous image's radius (the
            ``start`` option). Off by default: that radius was confirmed by the same seeded
            twin analyzers that re-check the next image, so the re-check would no longer be
            independent of the search that chose the radius.
        progress: show a bar over the images on stderr (only on a terminal, after a few
            seconds: see :mod:`lipbound._progress`).
        analyzer_options: keyword arguments of the shared analyzer (e.g. ``spectral``,
            ``seed``, ``lanczos_steps``; the re-checking twins copy them); ``lipbound bench``
            passes its own, so the radius is timed with the settings of its table.
    """
    from .analyzer import Analyzer
    from .inputs import load_samples
    from .radius import DEFAULT_REUSE_TOL, certified_radius
    from .validation import check_bool

    if not isinstance(n_images, int) or n_images < 1:
        raise InputError(f"n_images must be an integer >= 1, got {n_images!r}")
    start_from_previous = check_bool(start_from_previous, "start_from_previous")
    progress = check_bool(progress, "progress")
    lm, _, zoo_notes = _load_zoo(model_name, device)
    if lm.entry.testset is None:
        raise InputError(f"{lm.entry.name} has no shipped test set; use mnist or cifar10")
    samples = load_samples(f"{lm.entry.name}:test/0-{n_images - 1}", entry=lm.entry)
    dev = _model_device(lm.model)
    per: list[float] = []
    radii: list[float] = []
    guarantees: list[str] = []
    fps: list[float] = []
    rnotes: list[str] = []
    tol = DEFAULT_REUSE_TOL if reuse_tol is None else reuse_tol
    n_evals = 0
    start: float | None = None
    la0 = _loadavg()
    with _threads(threads), progress_bar(progress, len(samples), f"bench radius {lm.entry.name}",
                                         "image") as bar:
        c0 = time.process_time()
        t0 = time.perf_counter()
        an = Analyzer(lm.model, lm.entry.input_shape, device=dev, name=lm.entry.name,
                      **_check_analyzer_options(analyzer_options))
        trace = time.perf_counter() - t0
        for s in samples:
            bar.label(s.name)
            t = time.perf_counter()
            r = certified_radius(lm.model, s.x.to(dev), analyzer=an, method=method,
                                 reuse_tol=tol, start=start)
            _sync(dev)
            per.append(time.perf_counter() - t)
            radii.append(float(r.radius))
            guarantees.append(r.guarantee.value)
            fps.append(float(r.failure_prob))
            rnotes.extend(r.notes)
            n_evals += int(r.n_bound_evaluations)
            if start_from_previous and 0 < r.radius < math.inf:
                start = float(r.radius)
            bar.update()
        total = time.perf_counter() - t0
        cpu_total = time.process_time() - c0
    on_target = lm.entry.name == "mnist" and n_images == RADIUS_TARGET_IMAGES
    return RadiusBench(model=lm.entry.name, n_images=n_images, total_seconds=total,
                       target_seconds=RADIUS_TARGET_SECONDS if on_target else None,
                       cpu_total_seconds=cpu_total,
                       trace_seconds=trace, per_image_seconds=tuple(per), radii=tuple(radii),
                       load_average=(la0, _loadavg()), n_bound_evaluations=n_evals,
                       reuse_tol=tol, start_from_previous=bool(start_from_previous),
                       guarantees=tuple(guarantees), failure_probs=tuple(fps),
                       notes=tuple(dict.fromkeys((*zoo_notes, *an.notes, *rnotes))))
