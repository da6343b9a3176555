"""Options and helpers shared by the sub-commands: model and input loading, devices, tables."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._modelinfo import model_device
from .._progress import NullBar, progress_bar, stderr_is_terminal
from .._threads import set_threads
from ..errors import InputError, WeightsError
from ..validation import default_device
from ..validation import resolve_device as _resolve_device

logger = logging.getLogger(__name__)


def add_common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """--device and --json, present on every command."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute (auto: CUDA when present)")
    if not any("--threads" in a.option_strings for a in p._actions):
        p.add_argument("--threads", default="auto",
                       help="CPU threads for torch and for numpy/scipy's BLAS (auto: 1 for "
                            "small models, the idle cores for big ones; give a number to "
                            "override)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object")


def show_progress(args: argparse.Namespace) -> bool:
    """Whether a command asks the library for progress bars: yes, unless ``--json``. The bars
    go to stderr, only when it is a terminal, and only for work that runs longer than a few
    seconds (:mod:`lipbound._progress`); stdout is the same either way."""
    return not getattr(args, "json", False)


def tracing(args: argparse.Namespace, name: str) -> NullBar:
    """A bar with the elapsed time while an :class:`~lipbound.analyzer.Analyzer` of the
    network ``name`` is built (VGG-16: several seconds of tracing and checks); use as
    ``with tracing(args, name): an = Analyzer(...)``."""
    return progress_bar(show_progress(args), None, f"tracing {name}", "")


def build_analyzer(args: argparse.Namespace, loaded: Any) -> Any:
    """The analyzer of a loaded model with the command's settings (``--spectral``,
    ``--failure-prob``, ``--seed``), built under :func:`tracing`: an
    :class:`~lipbound.analyzer.Analyzer`, or for a residual network the
    :class:`~lipbound.residual.ResidualAnalyzer` that analyses it stage by stage."""
    from ..analyzer import Analyzer
    from ..errors import UnsupportedModelError

    settings = dict(spectral=args.spectral, failure_prob=args.failure_prob, seed=args.seed,
                    name=loaded.name, notes=loaded.notes)
    with tracing(args, loaded.name):
        try:
            return Analyzer(loaded.model, loaded.input_shape, **settings)
        except UnsupportedModelError as exc:  # a residual network: stage by stage
            from ..residual import residual_analyzer

            ra = residual_analyzer(loaded.model, loaded.input_shape, exc, None, **settings)
            if ra is None:
                raise
            return ra


def note_lines(items: Any, shared: Any = ()) -> list[str]:
    """``note (WHERE): TEXT`` for each note of each result that is not in ``shared`` (the notes
    printed once, e.g. the analyzer's): ``items`` are ``(label, eps, notes)``, WHERE the label
    and, for a radius that is not ``None``, ``eps E`` (exactly, as the tables show it)."""
    from .rounding import fmt_eps  # (rounding imports this module)

    return [f"note ({label}" + (f", eps {fmt_eps(eps)}" if eps is not None else "") + f"): {n}"
            for label, eps, notes in items for n in notes if n not in shared]


def progress_logging(run: Callable[[argparse.Namespace], int]
                     ) -> Callable[[argparse.Namespace], int]:
    """Decorator of a command's ``run``: while it may show progress bars on a terminal, log
    records on the console (``-v``, warnings) go through ``tqdm.write``, which lifts the
    bars above each record instead of writing into them. Otherwise ``run`` as it is."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        if not (show_progress(args) and stderr_is_terminal()):
            return run(args)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            return run(args)
    return wrapper


def add_model_options(p: argparse.ArgumentParser, *, input_required: bool = False,
                      many_inputs: bool = False) -> None:
    """--model/--weights/--input and the preprocessing options of a user network
    (``many_inputs``: the command also takes several inputs, and its --input help says so)."""
    p.add_argument("--model", default="mnist",
                   help="zoo name (see `lipbound models`) or path/to/file.py:factory "
                        "(a function returning the nn.Module)")
    p.add_argument("--weights", default=None, help="state-dict file to load into the model")
    many = ("; several inputs: a range (mnist:test/0-99), a folder of images, a test-set CSV "
            "file or an .npy/.pt batch" if many_inputs else "")
    p.add_argument("--input", default=None, required=input_required,
                   help="sample reference (mnist:8, cifar10:dog, mnist:test/17) or an "
                        "image (.png, .jpg, ...) or array (.npy, .pt) file; default: the zoo "
                        "model's default sample" + many)
    p.add_argument("--input-shape", default=None,
                   help="per-sample input shape of a user model, e.g. 1,28,28")
    p.add_argument("--mean", default=None, help="per-channel mean of the preprocessing, "
                   "e.g. 0.1307 or 0.485,0.456,0.406 (user models)")
    p.add_argument("--std", default=None, help="per-channel std of the preprocessing")
    p.add_argument("--scale", type=float, default=None,
                   help="factor applied to raw image pixels before mean/std (default 1/255)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of the Lanczos start vectors and random draws (default 0, "
                        "public); 'fresh' draws one from the operating system and reports it. "
                        "An integer also seeds the zoo's random weights unless --weights-seed "
                        "is given")
    p.add_argument("--weights-seed", type=seed_arg, default=None,
                   help="seed of the zoo's random weights (compnet, alexnet, vgg16); default: "
                        "--seed when it is an integer, else 0")


FRESH_SEED = "fresh"


def seed_arg(text: str) -> int | str:
    """argparse type of --seed/--weights-seed: an integer >= 0, or 'fresh'."""
    t = text.strip().lower()
    if t == FRESH_SEED:
        return FRESH_SEED
    try:
        v = int(t)
    except ValueError:
        v = -1
    if not 0 <= v < 2**64:  # (torch's generators take seeds below 2**64)
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 or 'fresh', got {text!r}"
            + (" (a seed must be below 2**64)" if v >= 2**64 else ""))
    return v


def resolve_seeds(args: argparse.Namespace) -> tuple[str, ...]:
    """Settle --seed and --weights-seed in ``args`` (idempotent) and return the notes to
    report: a fresh seed is drawn from the operating system (``secrets``), so no one who
    built the network can have known it, and it is reported so that the run can be
    repeated. The zoo's random weights follow an integer --seed (as before --weights-seed
    existed) and stay at seed 0 with a fresh one."""
    import secrets

    if getattr(args, "_seed_notes", None) is not None:  # settled by an earlier call
        return args._seed_notes
    notes: tuple[str, ...] = ()
    seed = getattr(args, "seed", 0)
    weights_seed = getattr(args, "weights_seed", None)
    # whether the user gave --weights-seed, remembered: the settled value is always set
    args._weights_seed_given = weights_seed is not None
    if weights_seed == FRESH_SEED:
        weights_seed = secrets.randbits(62)
        notes += (f"zoo random weights from a fresh seed: --weights-seed {weights_seed}",)
    if seed == FRESH_SEED:
        seed = secrets.randbits(62)
        notes += (f"start vectors and random draws from a fresh seed (drawn from the "
                  f"operating system): repeat with --seed {seed}",)
        if weights_seed is None:
            weights_seed = 0
    if weights_seed is None:
        weights_seed = seed
    args.seed, args.weights_seed = seed, weights_seed
    args._seed_notes = notes
    return notes


def resolve_device(name: str) -> torch.device:
    """``--device``: the library's rules (:func:`lipbound.validation.resolve_device`), with
    ``auto`` meaning CUDA when present."""
    return _resolve_device(name, default_device())


BIG_MODEL_PARAMETERS = 300_000
"""``--threads auto`` gives models with more parameters the idle cores (see apply_threads).
Measured on an idle 2-core machine (session 5): the CIFAR-10 net (0.89M parameters) is
1.3x faster on two threads (local bound 92 -> 69 ms, global 99 -> 75 ms), the MNIST LeNet
(44K) 10 % slower (7.6 -> 8.3 ms: its products are too small to split)."""


def _cpu_times(cores: set[int]) -> tuple[int, int] | None:
    """(idle, total) jiffies summed over the given cores (``/proc/stat``)."""
    idle = total = 0
    seen = 0
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                name, _, rest = line.partition(" ")
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if not name[3:].isdigit():
                    break
                if int(name[3:]) not in cores:
                    continue
                vals = [int(v) for v in rest.split()]
                idle += vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
                # user .. steal; guest and guest_nice (fields 9-10) are already counted in
                # user and nice
                total += sum(vals[:8])
                seen += 1
    except (OSError, ValueError, IndexError):
        return None
    return (idle, total) if seen else None


MIN_IDLE_WINDOW = 0.1
"""Shortest window (seconds) over which ``--threads auto`` counts idle cores (``/proc/stat``
counts in 10 ms ticks: at least 10 per core)."""

MAX_IDLE_WINDOW = 0.5
"""Longest: a window started longer ago is replaced by a fresh one of ``MIN_IDLE_WINDOW``
(averaged over a long model loading, a process that took a core in its last moments would
count as mostly idle; with 0.5 s, one busy for the last eighth of the window already costs
the core)."""

_started: tuple[float, tuple[int, int], float] | None = None


def _cpu_set() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def start_idle_sampling() -> None:
    """Take the first ``/proc/stat`` reading of :func:`idle_cores` now (the command does this
    at start-up): its window then spans the loading of the model, and it waits only for what
    is missing of ``MIN_IDLE_WINDOW`` (before: a 0.25 s pause on every command)."""
    global _started
    a = _cpu_times(_cpu_set())
    _started = None if a is None else (time.monotonic(), a, time.process_time())


def idle_cores(window: float = MIN_IDLE_WINDOW) -> int:
    """Cores of this process' CPU set that were idle, apart from this process' own work,
    over the last ``window`` seconds or more (``/proc/stat``, per core; elsewhere the
    1-minute load average), at least 1.

    The window starts at :func:`start_idle_sampling` when that was called (and not yet used)
    at most ``MAX_IDLE_WINDOW`` ago, else now. This process' CPU time over the window (model
    loading, possibly on several threads) is counted as idle: it is the work the threads are
    for."""
    global _started
    cores = _cpu_set()
    start, _started = _started, None
    if start is not None and time.monotonic() - start[0] > MAX_IDLE_WINDOW:
        start = None  # too long ago: recent load would be averaged away
    if start is None:
        a = _cpu_times(cores)
        if a is None:
            try:
                busy = os.getloadavg()[0]
            except OSError:
                return 1
            return max(1, min(len(cores), int(len(cores) - busy + 0.5)))
        start = (time.monotonic(), a, time.process_time())
    t0, a, cpu0 = start
    left = window - (time.monotonic() - t0)
    if left > 0:
        time.sleep(left)
    b = _cpu_times(cores)
    if b is None or b[1] <= a[1]:
        return 1
    total = b[1] - a[1]
    try:
        tick = float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        tick = 100.0
    own = (time.process_time() - cpu0) * tick
    busy_others = min(total, max(0.0, total - (b[0] - a[0]) - own))
    idle_frac = 1.0 - busy_others / total
    return max(1, min(len(cores), int(idle_frac * len(cores) + 0.25)))


def apply_threads(args: argparse.Namespace, model: nn.Module | None) -> None:
    """Set the CPU thread count from ``--threads`` (a CLI-only setting, for the rest of the
    command): torch's intra-op threads and the BLAS/OpenMP pools of numpy and scipy, which
    the rival methods' linear algebra runs on (:mod:`lipbound._threads`).

    ``auto``: one thread for small models (MNIST LeNet: a second intra-op thread is 10 %
    slower), and for bigger ones (from the CIFAR-10 net, 1.3x faster on two idle cores, to
    AlexNet and VGG-16, 1.4-1.8x) the number of cores idle right now. Measured
    (benchmarks/README.md): threads on a core that is busy with another process slow torch
    down by 10-100x, so busy cores are never counted."""
    spec = str(getattr(args, "threads", "auto"))
    if spec == "auto":
        params = list(model.parameters()) if model is not None else []
        dev = params[0].device if params else torch.device("cpu")
        if dev.type == "cpu":
            big = sum(p.numel() for p in params) > BIG_MODEL_PARAMETERS
            set_threads(idle_cores() if big else 1)
        return
    try:
        n = int(spec)
    except ValueError as exc:
        raise InputError(f"--threads must be 'auto' or a positive integer, got {spec!r}") \
            from exc
    if n < 1:
        raise InputError(f"--threads must be >= 1, got {n}")
    cores = usable_cores()
    if n > MAX_THREADS:
        raise InputError(f"--threads {n} is more than {MAX_THREADS} (this process may use "
                         f"{cores} CPU core(s); thousands of threads exhaust the memory); "
                         f"give at most {cores}, or auto")
    if n > cores:  # allowed (e.g. to repeat a run's thread count on a smaller machine)
        logger.warning("--threads %d is more than the %d CPU core(s) this process may use: "
                       "the threads share them, which slows torch down", n, cores)
    set_threads(n)


MAX_THREADS = 1024
"""The most threads ``--threads`` accepts (100000 ran the process out of memory starting
them); above the cores, a warning (a run's thread count can be repeated on a smaller machine:
the same seed and thread count give the same numbers)."""


def usable_cores() -> int:
    """The number of CPU cores this process may run on (its affinity where the system
    tells it, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (not on Linux)
        return max(1, os.cpu_count() or 1)


def _floats(s: str | None, option: str = "--mean/--std") -> tuple[float, ...] | None:
    if s is None:
        return None
    out = []
    for item in s.split(","):
        try:
            v = float(item)
        except ValueError:
            raise InputError(f"{option} {s!r}: item {item.strip()!r} is not a number; give "
                             "comma-separated numbers, e.g. 0.485,0.456,0.406") from None
        if not math.isfinite(v):
            raise InputError(f"{option} {s!r}: item {item.strip()!r} is not finite; give "
                             "finite numbers")
        out.append(v)
    return tuple(out)


def parse_eps_list(text: str, option: str = "--eps-list") -> list[float]:
    """``"0.01,0.1,1"`` -> the radii, each checked (finite, > 0); an empty or non-numeric
    item is an :class:`InputError` naming it."""
    from ..validation import check_eps

    values = []
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        try:
            v = float(item)
        except ValueError:
            what = "is empty" if not item else f"{item!r} is not a number"
            raise InputError(f"{option} {text!r}: item {i + 1} {what}; give comma-separated "
                             "positive radii, e.g. 0.01,0.1,1") from None
        values.append(check_eps(v, f"{option} item {i + 1} ({item})"))
    return values


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``, or an :class:`InputError`."""
    items = [t.strip() for t in text.split(",")]
    try:
        shape = tuple(int(t) for t in items)
    except ValueError:
        shape = ()
    if not shape or any(v <= 0 for v in shape):
        raise InputError(f"--input-shape must be comma-separated positive integers, e.g. "
                         f"1,28,28; got {text!r}")
    return shape


def check_positive_number(value: Any, option: str, example: str) -> float:
    """``value`` as a float, or an :class:`InputError` unless it is finite and > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{option} must be a finite number > 0, got {value!r}; e.g. "
                         f"{option} {example}")
    return v


def _writable_folder(folder: Path, what: str, option: str) -> None:
    """Create ``folder`` (with parents) and check that it is writable, or raise naming
    ``what`` (the path the user gave) and the fix."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {what}: {folder} is a file, not a folder; give a path in "
                         "an existing or creatable folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {what}: cannot create the folder {folder} "
                         f"({exc.strerror or type(exc).__name__}); give a path in a "
                         "writable location") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{option} {what}: the folder {folder} is not writable; give a path "
                         "in a writable location")


def prepare_out_dir(path: str | Path, option: str = "--out",
                    files: tuple[str, ...] = ()) -> Path:
    """Create the output folder ``path`` (and its parents) and check that it is writable,
    and that none of the ``files`` the command will write there is a folder or an
    unwritable file, before any computation: a bad ``--out`` is reported at once, not after
    the work."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out} is an existing file, but a folder is expected "
                         "(the command writes several files into it); give a folder path")
    _writable_folder(out, str(out), option)
    for name in files:
        f = out / name
        if f.is_dir():
            raise InputError(f"{option} {out}: {f} is a folder, but the command writes a "
                             "file of that name there; remove it or give another folder")
        if f.exists() and not os.access(f, os.W_OK):
            raise InputError(f"{option} {out}: {f} exists and is not writable; remove it or "
                             "give another folder")
        _try_open(f, option, str(out))
    return out


def prepare_out_file(path: str | Path, option: str = "--out") -> Path:
    """Check, before any computation, that the file ``path`` can be written: not a folder,
    its folder created (with parents) and writable, the file itself writable if it exists."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{option} {out} is a folder, but a file name is expected (e.g. "
                         f"{out / 'bounds.csv'})")
    _writable_folder(out.parent, str(out), option)
    if out.exists() and not os.access(out, os.W_OK):
        raise InputError(f"{option} {out}: not writable; give a path in a writable location")
    _try_open(out, option, str(out))
    return out


def _try_open(path: Path, option: str, what: str) -> None:
    """Open ``path`` for appending (nothing it holds is changed) and remove it again if this
    created it: ``os.access`` says yes to root on read-only or pseudo file systems
    (``/proc``), where only an actual open tells."""
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise InputError(f"{option} {what}: cannot write {path} "
                         f"({exc.strerror or type(exc).__name__}); give a path in a writable "
                         "location") from exc
    if not existed:
        try:
            path.unlink()
        except OSError:
            pass


@dataclass
class Loaded:
    """A model ready for analysis, with where it came from."""

    model: nn.Module
    name: str
    input_shape: tuple[int, ...]
    weights_source: str
    notes: tuple[str, ...]
    entry: Any  # ZooEntry or None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    scale: float | None

    def sample_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``lipbound.inputs.load_sample(s)`` for this model's inputs."""
        if self.entry is not None:
            return {"entry": self.entry}
        kw: dict[str, Any] = {"input_shape": self.input_shape, "mean": self.mean,
                              "std": self.std}
        if self.scale is not None:
            kw["scale"] = self.scale
        return kw


def load_user_factory(spec: str) -> tuple[nn.Module, dict]:
    """``path/to/file.py:factory`` -> (module, extra info returned by the factory)."""
    path_s, _, fn_name = spec.rpartition(":")
    path = Path(path_s)
    if not path_s or not fn_name:
        raise InputError(f"--model {spec!r}: expected a zoo name or path/to/file.py:factory")
    if not path.is_file():
        raise InputError(f"--model {spec!r}: file {path} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"lipbound_user_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise InputError(f"--model {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # the user's file: any error is theirs to fix
        sys.modules.pop(mod_spec.name, None)
        raise InputError(f"--model {spec!r}: importing {path} failed with "
                         f"{type(exc).__name__}: {exc}; fix the file (run `python {path}` "
                         "to see the full traceback)") from exc
    factory = getattr(module, fn_name, None)
    if factory is None or not callable(factory):
        raise InputError(f"--model {spec!r}: {path} has no function {fn_name!r}")
    try:
        out = factory()
    except (Exception, SystemExit) as exc:
        raise InputError(f"--model {spec!r}: the factory {fn_name}() in {path} raised "
                         f"{type(exc).__name__}: {exc}; fix the factory (call it in Python to "
                         "see the full traceback)") from exc
    info: dict = {}
    if isinstance(out, dict):
        info = dict(out)
        out = info.pop("model", None)
    if not isinstance(out, nn.Module):
        raise InputError(f"--model {spec!r}: {fn_name}() must return an nn.Module (or a dict "
                         f"with key 'model'), got {type(out).__name__}")
    return out, info


def _owner_prefix(state: Any, expected: Any) -> str | None:
    """The first name component (with its dot) that every key of ``state`` shares when
    removing it leaves exactly the model's ``expected`` keys (``model.`` of a PyTorch Lightning
    checkpoint, whose LightningModule holds the network as ``self.model``); else None."""
    if not isinstance(state, Mapping) or not state or set(state) == set(expected):
        return None
    heads = {str(k).partition(".")[0] for k in state}
    if len(heads) != 1 or not all("." in str(k) for k in state):
        return None
    owner = heads.pop() + "."
    return owner if {str(k)[len(owner):] for k in state} == set(expected) else None


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """Load the ``--weights`` file into a user's model: the checkpoint layouts, wrapper
    prefixes and value checks of the zoo's weight files (:mod:`lipbound.zoo.weights`), in
    the dtypes of the model's own parameters."""
    if not str(path).strip():
        raise WeightsError("--weights is empty; give the path of a weights file, or drop "
                           "--weights to use the model as the factory builds it")
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise WeightsError(f"weights file {str(path)!r} {what}; check the path given to "
                           "--weights")
    from ..zoo.weights import check_values, read_checkpoint, unwrapped_state

    sd, _ = read_checkpoint(p, unwrap=False)  # (unwrapped below, against the model's keys)
    expected = model.state_dict()
    sd = unwrapped_state(sd, expected)  # saved from a DataParallel / compiled model
    owner = _owner_prefix(sd, expected)
    if owner is not None:
        # (not stripped: a wrapper's other layers may compute too; the user says what to load)
        raise WeightsError(
            f"weights file {p} does not match the model: every key starts with {owner!r} and "
            "without it the keys are exactly the model's, so the file holds the network as "
            f"the attribute {owner[:-1]!r} of a wrapper (e.g. a PyTorch Lightning module); "
            f"save that network's own state dict (torch.save(wrapper.{owner[:-1]}.state_dict(), "
            "path), or {k.removeprefix(" + repr(owner) + "): v for k, v in "
            "state_dict.items()}) and pass that file")
    check_values(sd, expected, source=str(p))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {p} does not match the model: {exc}") from exc


def _same(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) == 1 and len(b) > 1:
        a = a * len(b)
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0)
                                    for x, y in zip(a, b, strict=True))


def _check_zoo_preprocessing(args: argparse.Namespace, entry: Any,
                             mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                             shape: tuple[int, ...] | None) -> None:
    """A zoo network comes with its own input shape and normalisation: --input-shape,
    --mean, --std and --scale that differ from them would be ignored, so they are refused."""
    given = []
    if shape is not None and tuple(shape) != tuple(entry.input_shape):
        given.append(f"--input-shape {args.input_shape}")
    if mean is not None and not _same(mean, entry.mean):
        given.append(f"--mean {args.mean}")
    if std is not None and not _same(std, entry.std):
        given.append(f"--std {args.std}")
    scale = getattr(args, "scale", None)
    if scale is not None and not math.isclose(float(scale), 1 / 255, rel_tol=1e-9):
        given.append(f"--scale {scale:g}")
    if given:
        shape_s = "x".join(map(str, entry.input_shape))
        if len(entry.input_shape) == 1:
            prep = "inputs taken as they are"
        else:
            prep = "pixels x 1/255" + (f", mean {entry.mean}, std {entry.std}"
                                       if entry.mean is not None else "")
        raise InputError(
            f"{', '.join(given)} cannot be used with the zoo model {entry.name}: it has its "
            f"own input shape {shape_s} and preprocessing ({prep}), which these options "
            "would not change. --input-shape/--mean/--std/--scale are for user models "
            "(--model path/to/file.py:factory); drop them here")


def _check_eval(model: nn.Module, spec: str, fn_name: str) -> None:
    """A user's model in training mode is refused, as by the library (never changed)."""
    from ..graph import check_eval_mode

    try:
        check_eval_mode(model)
    except InputError as exc:
        raise InputError(f"--model {spec}: {exc} lipbound does not change your model: "
                         f"return model.eval() from the factory {fn_name}()") from exc


def _check_normalised_once(model: nn.Module, spec: str, mean: tuple[float, ...] | None,
                           std: tuple[float, ...] | None) -> None:
    """A user model that normalises its input with a :class:`lipbound.Normalize` layer
    takes pixels in [0, 1]; a mean/std (--mean/--std or the factory's) would normalise the
    images a second time before they reach it, so the two are refused together."""
    if mean is None and std is None:
        return
    if all(v == 0 for v in mean or (0,)) and all(v == 1 for v in std or (1,)):
        return  # --mean 0 --std 1: pixels x scale as they are
    from ..layers import Normalize

    layers = [name or "(the model)" for name, m in model.named_modules()
              if isinstance(m, Normalize)]
    if layers:
        raise InputError(
            f"--model {spec}: the model normalises its input itself (lipbound.Normalize at "
            f"{', '.join(repr(n) for n in layers)}), and a mean/std is given too (--mean/"
            "--std or the factory's 'mean'/'std'): images would be normalised twice. Drop "
            "the mean/std (the model then gets pixels x --scale, in [0, 1] by default), or "
            "the Normalize layer")


def _factory_floats(info: dict, key: str, spec: str) -> tuple[float, ...] | None:
    """A factory's ``mean``/``std``: one number (every channel) or one per channel, as a
    tuple of finite floats; ``None`` if the factory gives none."""
    if key not in info or info[key] is None:
        return None
    value = info[key]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    items = [value] if isinstance(value, numbers.Real) else value
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        out = ()
    if not out or isinstance(value, (str, bytes, bool)) or not all(map(math.isfinite, out)):
        raise InputError(f"--model {spec}: the factory's {key!r} must be a finite number or a "
                         f"list of finite numbers, one per channel (e.g. [0.485, 0.456, "
                         f"0.406]); got {value!r}")
    return out


def _factory_shape(value: Any, spec: str) -> tuple[int, ...] | None:
    """A factory's ``input_shape`` as a tuple of positive ints (one int: a 1-d input)."""
    if value is None:
        return None
    items = [value] if isinstance(value, numbers.Integral) else value
    try:
        shape = tuple(int(v) for v in items)
        ok = bool(shape) and all(v > 0 and v == w for v, w in zip(shape, items, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(value, (str, bytes, bool)):
        raise InputError(f"--model {spec}: the factory's 'input_shape' must be positive "
                         f"integers without the batch dimension, e.g. (1, 28, 28); got "
                         f"{value!r}")
    return shape


def _check_not_a_path(spec: str) -> None:
    """A ``--model`` that names a file, not a zoo network, without the ``:factory`` part (or
    a file that is not Python) gets the form of a user model, not the list of the zoo."""
    path, colon, fn_name = spec.rpartition(":")
    if colon and Path(path).is_file():
        raise InputError(f"--model {spec!r}: {path} is not a Python file; a user model is "
                         f"given as path/to/file.py:{fn_name or 'factory_name'}")
    if spec.strip().lower().endswith(".py") or Path(spec).is_file():
        raise InputError(f"--model {spec!r} names a file: a user model is given as "
                         f"path/to/file.py:factory_name, the function of that file that "
                         f"returns the nn.Module, e.g. --model {spec}:make_model")


def load_model(args: argparse.Namespace) -> Loaded:
    """Load the model named by ``--model`` (zoo entry or user factory) on the device of
    ``--device``. A user factory must return its model in eval mode (a model in training
    mode is refused, as by the library); zoo models are built in eval mode by lipbound."""
    device = resolve_device(getattr(args, "device", "auto"))
    spec = args.model
    seed_notes = resolve_seeds(args)
    weights_seed_given = args._weights_seed_given
    mean = _floats(getattr(args, "mean", None), "--mean")
    std = _floats(getattr(args, "std", None), "--std")
    scale = getattr(args, "scale", None)
    if scale is not None:
        scale = check_positive_number(scale, "--scale", "0.00392156862745098")
    cli_shape = None
    if getattr(args, "input_shape", None):
        cli_shape = parse_input_shape(args.input_shape)
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        if weights_seed_given:
            raise InputError("--weights-seed applies to the zoo's random weights; a user "
                             "model is built by its factory: drop --weights-seed (seed "
                             "your factory yourself)")
        model, info = load_user_factory(spec)
        from .._modelinfo import unwrap_model

        model = unwrap_model(model)  # DataParallel / torch.compile: the module they run
        _check_eval(model, spec, spec.rpartition(":")[2])
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:  # (.to(device) below would fail; --weights would copy into no storage)
            raise InputError(f"--model {spec}: the factory returns a model on the meta device "
                             f"(no values: {', '.join(meta[:4])}{', ...' if len(meta) > 4 else ''}"
                             "); build it on the CPU in the factory (its weights may then come "
                             "from --weights)")
        if getattr(args, "weights", None) is not None:
            load_state_dict_file(model, args.weights)
        model = model.to(device)
        apply_threads(args, model)
        shape = _factory_shape(info.get("input_shape"), spec)
        if cli_shape is not None:
            shape = cli_shape
        if shape is None:
            raise InputError("a user model needs its input shape: pass --input-shape C,H,W "
                             "or return {'model': ..., 'input_shape': ...} from the factory")
        mean = mean or _factory_floats(info, "mean", spec)
        std = std or _factory_floats(info, "std", spec)
        _check_normalised_once(model, spec, mean, std)
        if scale is None and "scale" in info:
            scale = check_positive_number(info["scale"], f"the factory's 'scale' ({spec})",
                                          "1/255")
        return Loaded(model, Path(spec.rpartition(":")[0]).stem, tuple(shape),
                      "user weights file " + args.weights
                      if getattr(args, "weights", None) is not None
                      else "as built by the factory", seed_notes, None, mean, std, scale)
    from .. import zoo
    from ..zoo.loading import SEEDED_WEIGHTS

    _check_not_a_path(spec)
    entry = zoo.get_entry(spec)  # an unknown name: a ZooError listing the zoo
    if weights_seed_given and (getattr(args, "weights", None)
                               or entry.name not in SEEDED_WEIGHTS):
        raise InputError(f"--weights-seed applies to the zoo's random weights "
                         f"({', '.join(SEEDED_WEIGHTS)}); {entry.name} "
                         + ("loads --weights" if getattr(args, "weights", None)
                            else "has fixed weights") + ": drop --weights-seed")
    _check_zoo_preprocessing(args, entry, mean, std, cli_shape)
    lm = zoo.load_model(spec, weights=getattr(args, "weights", None), device=device,
                        seed=args.weights_seed)
    apply_threads(args, lm.model)
    notes = () if lm.trained else (f"{lm.entry.name}: {lm.weights_source}",)
    notes += seed_notes
    return Loaded(lm.model, lm.entry.name, tuple(lm.entry.input_shape), lm.weights_source,
                  notes, lm.entry, lm.entry.mean, lm.entry.std, None)


#: zoo samples defined directly in the network's input space (never rescaled)
_VECTOR_SAMPLES = ("tiny:", "compnet:")


def check_preprocessing_applies(args: argparse.Namespace, ref: str | None) -> None:
    """Refuse --mean/--std/--scale where they would be silently ignored: they apply to raw
    image pixels (image files, folders, CSV files, the shipped images and test sets), not
    to .npy/.pt arrays (taken as already normalised) nor to vector samples."""
    flags = [f"--{n}" for n in ("mean", "std", "scale") if getattr(args, n, None) is not None]
    if not flags or ref is None:
        return
    from ..inputs import ARRAY_SUFFIXES

    low = str(ref).strip().lower()
    if Path(low).suffix in ARRAY_SUFFIXES:
        why = (f"the array file {ref} is taken as it is, already in the model's normalised "
               "input space")
    elif low.startswith(_VECTOR_SAMPLES):
        why = f"{ref} is defined directly in the network's input space"
    elif "--scale" in flags and re.search(r":random(/\d+)?$", low):
        flags, why = ["--scale"], f"{ref} draws pixels in [0, 1] directly"
    else:
        return
    raise InputError(f"{'/'.join(flags)} would be ignored: {why}. These options apply to "
                     "raw image pixels (.png/.jpg files, folders of images, CSV files); "
                     "normalise the array yourself, or drop them")


def check_input_ref(args: argparse.Namespace, loaded: Loaded, ref: str | None) -> None:
    """The checks of an ``--input`` reference before it is loaded: the preprocessing
    options apply to it (:func:`check_preprocessing_applies`) and a shipped image's
    normalisation is stated for a user model (:func:`check_user_sample_normalisation`)."""
    check_preprocessing_applies(args, ref)
    check_user_sample_normalisation(loaded, ref)


def check_user_sample_normalisation(loaded: Loaded, ref: str | None) -> None:
    """Refuse a shipped image of a zoo network (``mnist:8``, ``cifar10:test/3``,
    ``vgg16:random``) as the input of a user model that declares no mean/std: image files
    reach such a model as pixels x scale, while the shipped image would be normalised with
    its zoo network's mean/std (the library's default for it), so the same picture would be
    two different inputs. The user says which normalisation the model takes."""
    if loaded.entry is not None or loaded.mean is not None or loaded.std is not None:
        return
    if ref is None or ":" not in str(ref) or Path(str(ref)).exists():
        return
    from ..zoo.registry import get_entry, model_names

    prefix = str(ref).partition(":")[0].strip().lower()
    if prefix not in model_names():
        return
    entry = get_entry(prefix)
    if entry.mean is None or entry.std is None:
        return  # a vector sample, never normalised

    def opt(values: tuple[float, ...]) -> str:
        return ",".join(f"{v:g}" for v in values)

    raise InputError(
        f"--input {ref!r} is a shipped image of the zoo network {entry.name}, normalised with "
        f"its mean {opt(entry.mean)} and std {opt(entry.std)} by default, but the user model "
        f"{loaded.name} declares no mean/std, so image files reach it as pixels x scale "
        "without normalisation: the same picture would be two different inputs. Say which "
        f"the model takes: --mean {opt(entry.mean)} --std {opt(entry.std)} ({entry.name}'s "
        "normalisation) or --mean 0 --std 1 (pixels in [0, 1]; also for a model that "
        "normalises its input itself), or return 'mean'/'std' from the factory")


def cli_input_hint(loaded: Loaded | None = None) -> str:
    """The valid forms of a single ``--input``, in command-line terms."""
    entry = getattr(loaded, "entry", None)
    if entry is not None and entry.samples:
        forms = [f"'{entry.samples[0]}'"]
        from ..zoo.testsets import TESTSETS

        if entry.name in TESTSETS:
            forms.append(f"'{entry.name}:test/3' (one shipped test image, 0-99)")
    else:
        forms = ["'mnist:8'", "'mnist:test/3' (one shipped test image, 0-99)"]
    return ("give one input such as " + ", ".join(forms)
            + ", or an image (.png, .jpg, ...) or array (.npy, .pt) file holding a single "
            "input")


def load_input(args: argparse.Namespace, loaded: Loaded, needed_for: str | None = None):
    """The single input named by ``--input`` (default: the zoo entry's default sample).
    ``needed_for``: what the input is for, said when a user model has none."""
    from ..errors import LipboundError
    from ..inputs import load_sample

    ref = args.input
    if ref is None:
        if loaded.entry is None:
            raise InputError("a user model has no default input: give --input FILE (.png, "
                             ".npy or .pt)" + (f"; it is needed for {needed_for}"
                                               if needed_for else ""))
        ref = loaded.entry.default_sample
    check_input_ref(args, loaded, ref)
    command = getattr(args, "command", None) or "this command"
    if is_many_ref(ref):
        raise InputError(f"--input {ref!r} names several inputs, but `lipbound {command}` "
                         f"takes one; {cli_input_hint(loaded)}")
    try:
        sample = load_sample(ref, **loaded.sample_kwargs())
    except LipboundError as exc:
        if "load_samples" not in str(exc):
            raise
        # the library's hint names its API; say it in command-line terms
        msg = (f"--input {ref!r} holds a batch of several inputs, but `lipbound {command}` "
               f"takes one; {cli_input_hint(loaded)}")
        raise type(exc)(msg) from exc
    # (a model may hold its weights in buffers, or have none: next(parameters()) raised
    # StopIteration)
    dev = model_device(loaded.model, sample.x.device)
    return sample.__class__(x=sample.x.to(dev), label=sample.label, name=sample.name) \
        if sample.x.device != dev else sample


def is_many_ref(ref: str | None) -> bool:
    """Whether ``--input`` names several inputs (a range/list of test images, a CSV, a folder)."""
    if ref is None:
        return False
    if ref.lower().endswith(".csv") or Path(ref).is_dir():
        return True
    if Path(ref).exists():  # a file (test-1.png is one image, not a range)
        return False
    from ..zoo.registry import model_names

    prefix, colon, tail = ref.partition(":")
    tail = tail.strip()
    return (bool(colon) and prefix.strip().lower() in model_names()
            and tail.startswith("test") and ("-" in tail or "," in tail or tail == "test"))


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4e}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.2f}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "value") and isinstance(o.value, str):
        return o.value
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
