"""Review of the benchmark deliverables (session 23): what ``lipbound.bench`` times and
reports, ``lipbound bench``'s option checks and ``benchmarks/run_benchmarks.py``'s summary.

The timed work is mocked (a fake analyzer on a fake clock) where the statistics are checked,
so the expected medians are exact numbers; no timing assertions on real work.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lipbound.analyzer
import lipbound.bench as lb
from lipbound.bench import DEFAULT_EPS, TARGET_MEMORY_MB, bench_model, bench_sweep_model
from lipbound.cli import main
from lipbound.errors import ZooError
from lipbound.results import Guarantee
from lipbound.zoo import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- fake timed work
class _Clock:
    """A clock that only moves when the fake analyzer works (wall and CPU time alike)."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t

    def process_time(self) -> float:
        return self.t / 2  # CPU time: half the wall time, to tell the two apart


def _fake_analyzer(clock: _Clock, builds: list[float], local: list[float], glob: list[float],
                   values: list[float] | None = None):
    """An analyzer class whose construction and bounds take the listed (fake) seconds, in
    order, and whose bound value is ``values[k]`` for the k-th bound (default 7.0)."""
    builds, local, glob = list(builds), list(local), list(glob)
    vals = list(values) if values is not None else None
    seen: list[dict] = []

    def result(cost: list[float]):
        clock.t += cost.pop(0)
        v = vals.pop(0) if vals is not None else 7.0
        return SimpleNamespace(value=v, guarantee=Guarantee.CERTIFIED, failure_prob=0.0,
                               notes=(), layers=(SimpleNamespace(spectral_method="svd"),))

    class FakeAnalyzer:
        def __init__(self, model, input_shape, **kw):
            seen.append(kw)
            clock.t += builds.pop(0)

        def local_bound(self, x0, eps):
            return result(local)

        def global_bound(self):
            return result(glob)

    return FakeAnalyzer, seen


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3, 2)).eval()


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(lb, "time", SimpleNamespace(perf_counter=c.perf_counter,
                                                    process_time=c.process_time))
    return c


def test_statistics_of_the_timed_runs_leave_the_cold_run_out(clock, monkeypatch):
    """Cold run: build 100 s + bound 50 s; timed runs: builds 2, 3, 4, 5 s, bounds 4, 1,
    3, 2 s. The medians (even count: mean of the middle two) and extremes are those of the
    four timed runs only -- trace_seconds included (it took the cold build's 100 s into its
    median before: 4.0 instead of 3.5; with one timed run, (100 + 2) / 2 = 51)."""
    fake, _ = _fake_analyzer(clock, [100, 2, 3, 4, 5], [50, 4, 1, 3, 2], [])
    monkeypatch.setattr(lipbound.analyzer, "Analyzer", fake)
    r = bench_model(_net(), torch.zeros(1, 3), name="fake", what="local", repeat=4)
    assert r.runs == (4.0, 1.0, 3.0, 2.0)
    assert r.median_seconds == 2.5 and r.min_seconds == 1.0 and r.max_seconds == 4.0
    assert r.cpu_runs == (2.0, 0.5, 1.5, 1.0) and r.cpu_median_seconds == 1.25
    assert r.cold_seconds == 150.0
    assert r.trace_seconds == 3.5
    assert r.value == 7.0 and r.eps == DEFAULT_EPS and r.notes == ()

    fake, _ = _fake_analyzer(clock, [100, 2], [50, 4], [])
    monkeypatch.setattr(lipbound.analyzer, "Analyzer", fake)
    r = bench_model(_net(), torch.zeros(1, 3), name="fake", what="local", repeat=1)
    assert r.trace_seconds == 2.0 and r.runs == (4.0,) and r.cold_seconds == 150.0


def test_without_warmup_the_cold_run_is_the_first_timed_run(clock, monkeypatch):
    fake, _ = _fake_analyzer(clock, [100, 2, 3], [], [50, 4, 1])
    monkeypatch.setattr(lipbound.analyzer, "Analyzer", fake)
    r = bench_model(_net(), torch.zeros(1, 3), name="fake", what="global", repeat=3,
                    warmup=False)
    assert r.runs == (50.0, 4.0, 1.0) and r.median_seconds == 4.0
    assert r.cold_seconds == 150.0 and r.trace_seconds == 3.0 and r.eps is None


def test_each_quantity_has_its_own_runs_and_memory_reset(clock, monkeypatch):
    resets: list[int] = []
    real_reset = lb._Memory.reset

    def counting_reset(self):
        resets.append(1)
        real_reset(self)

    monkeypatch.setattr(lb._Memory, "reset", counting_reset)
    fake, seen = _fake_analyzer(clock, [1] * 6, [9, 4, 6], [8, 1, 3])
    monkeypatch.setattr(lipbound.analyzer, "Analyzer", fake)
    r = bench_model(_net(), torch.zeros(1, 3), name="fake", repeat=2, eps=0.25)
    loc, glo = r.results["local"], r.results["global"]
    assert loc.runs == (4.0, 6.0) and glo.runs == (1.0, 3.0)
    assert loc.median_seconds == 5.0 and glo.median_seconds == 2.0
    assert loc.eps == 0.25 and glo.eps is None
    assert len(resets) == 2  # the peak is reset before each quantity
    assert len(seen) == 6  # a fresh analyzer per run (cold runs included)
    json.dumps(r.to_dict())


def test_values_that_differ_between_runs_are_reported(clock, monkeypatch):
    fake, _ = _fake_analyzer(clock, [1, 1, 1], [1, 1, 1], [], values=[5.0, 5.0, 6.0])
    monkeypatch.setattr(lipbound.analyzer, "Analyzer", fake)
    r = bench_model(_net(), torch.zeros(1, 3), name="fake", what="local", repeat=2)
    assert r.value == 6.0
    assert any("values differed between runs" in n for n in r.notes)


def test_memory_ratio_to_target(clock, monkeypatch):
    """The issue's targets include peak memory (AlexNet <= 3 GB, VGG-16 <= 6 GB): the result
    carries that ratio as it does the time ratio (it was missing)."""
    fake, _ = _fake_analyzer(clock, [1, 1], [1, 1], [])
    monkeypatch.setattr(lipbound.analyzer, "Analyzer", fake)
    r = bench_model(_net(), torch.zeros(1, 3), name="alexnet", what="local", repeat=1)
    assert r.target_memory_mb == TARGET_MEMORY_MB["alexnet"]
    assert r.memory_ratio_to_target == pytest.approx(r.peak_memory_mb / r.target_memory_mb)
    assert r.to_dict()["memory_ratio_to_target"] == r.memory_ratio_to_target
    fake, _ = _fake_analyzer(clock, [1, 1], [1, 1], [])
    monkeypatch.setattr(lipbound.analyzer, "Analyzer", fake)
    r = bench_model(_net(), torch.zeros(1, 3), name="mnist", what="local", repeat=1)
    assert r.target_memory_mb is None and r.memory_ratio_to_target is None


# ---------------------------------------------------------------------------- sweep unit
def test_sweep_unit_is_the_local_bound_at_the_given_eps(monkeypatch):
    """The sweep's "local bounds' worth" unit is one local bound at ``eps`` (it was always
    DEFAULT_EPS, so ``lipbound bench --eps E --sweep N`` timed its unit at 0.1 and ignored
    E without a word)."""
    calls: list[float | None] = []
    real = lb.bench_model

    def spy(*a, **kw):
        calls.append(kw.get("eps"))
        return real(*a, **kw)

    monkeypatch.setattr(lb, "bench_model", spy)
    lm = load_model("compnet")
    x0 = torch.zeros(1, *lm.entry.input_shape)
    s = bench_sweep_model(lm.model, x0, name="compnet", eps_range=(0.01, 1.0), n_points=2,
                          local_repeat=1, raw=False, eps=0.3)
    assert calls == [0.3] and s.local_eps == 0.3
    assert s.cost_in_local_bounds == pytest.approx(s.total_seconds / s.local_median_seconds)
    s = bench_sweep_model(lm.model, x0, name="compnet", eps_range=(0.01, 1.0), n_points=2,
                          local_repeat=1, raw=False)
    assert s.local_eps == DEFAULT_EPS


def test_cli_sweep_unit_uses_eps(capsys):
    assert main(["bench", "--model", "compnet", "--what", "global", "--eps", "0.05",
                 "--sweep", "2", "--repeat", "1", "--threads", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["sweep"]["local_eps"] == 0.05 and d["what"] == "global" and d["eps"] is None


# ---------------------------------------------------------------------------- CLI checks
@pytest.mark.parametrize("eps", ["-1", "0", "nan", "inf"])
def test_cli_bad_eps_refused_before_loading_the_network(eps, capsys, monkeypatch):
    """A bad --eps is refused naming the option, before the network is loaded (VGG-16:
    seconds of work first, then "eps must be > 0" without the option's name)."""
    import lipbound.cli.bench as cb

    def no_load(args):
        raise ZooError("network loaded")

    monkeypatch.setattr(cb, "load_model", no_load)
    assert main(["bench", "--model", "vgg16", "--eps", eps]) == 2
    err = capsys.readouterr().err
    assert "--eps" in err and "network loaded" not in err


@pytest.mark.parametrize("argv, words", [
    (["--repeat", "0"], ["--repeat", ">= 1"]),
    (["--repeat", "-2"], ["--repeat"]),
    (["--what", "glob"], ["--what", "local"]),
    (["--sweep", "1"], ["--sweep", "2"]),
    (["--sweep-range", "0.1,1"], ["--sweep N"]),
    (["--radius-images", "-1"], ["--radius-images"]),
    (["--radius-images", "2"], ["test set"]),
])
def test_cli_bad_options(argv, words, capsys):
    assert main(["bench", "--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_cli_unknown_model(capsys):
    assert main(["bench", "--model", "resnet9000", "--repeat", "1"]) == 2
    assert "unknown zoo model" in capsys.readouterr().err


# ---------------------------------------------------------------------------- suite script
def _script():
    spec = importlib.util.spec_from_file_location("_run_benchmarks_s23",
                                                  ROOT / "benchmarks" / "run_benchmarks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_row(model: str, what: str) -> dict:
    return {"model": model, "what": what, "weights": "fake", "median_seconds": 1.0,
            "min_seconds": 0.5, "max_seconds": 2.0, "cpu_median_seconds": 1.0,
            "cold_seconds": 3.0, "peak_memory_mb": 100.0, "target_memory_mb": 200.0,
            "memory_ratio_to_target": 0.5, "target_seconds": 2.0, "ratio_to_target": 0.5,
            "value": 1.0, "guarantee": "certified upper bound", "load_average": [1.0, 1.0],
            "runs": [0.5, 1.0, 2.0], "threads": 1, "layer_methods": ["svd"]}


def _fake_cli(calls: list[list[str]]):
    def run_cli(args, timeout):
        calls.append(list(args))
        model, what = args[args.index("--model") + 1], args[args.index("--what") + 1]
        out = _fake_row(model, what)
        if "--sweep" in args:
            n = int(args[args.index("--sweep") + 1])
            if n:  # lipbound bench writes "sweep" only for --sweep N >= 2
                out["sweep"] = {"total_seconds": 3.0, "local_median_seconds": 1.0,
                                "cost_in_local_bounds": 3.0, "cpu_cost_in_local_bounds": 3.0,
                                "target_units": 10.0, "load_average": [1.0, 1.0]}
        if "--radius-images" in args:
            out["radius"] = {"total_seconds": 10.0, "cpu_total_seconds": 10.0,
                             "trace_seconds": 0.1, "per_image_seconds": [1.0, 2.0, 3.0, 4.0]}
        return out, ""
    return run_cli


def test_script_refuses_sweep_points_below_two_before_the_work(tmp_path, monkeypatch):
    """--sweep-points 0 ran every network, then crashed with KeyError 'sweep' (lipbound bench
    writes no sweep for --sweep 0); 1 recorded an error row after the work."""
    mod = _script()
    calls: list[list[str]] = []
    monkeypatch.setattr(mod, "_run_cli", _fake_cli(calls))
    for n in ("0", "1", "-3"):
        with pytest.raises(SystemExit) as exc:
            mod.main(["--models", "mnist", "--what", "local", "--sweep-points", n,
                      "--no-radius", "--out", str(tmp_path / "r.json")])
        assert exc.value.code == 2
    assert calls == []
    # --no-sweep makes the number irrelevant
    assert mod.main(["--models", "mnist", "--what", "local", "--sweep-points", "0",
                     "--no-sweep", "--no-radius", "--out", str(tmp_path / "r.json")]) == 0


def test_script_tables_median_and_json(tmp_path, monkeypatch, capsys):
    """The radius line's per-image median of an even count is the mean of the middle two
    (it printed the upper one: 3.0 for 1, 2, 3, 4); the summary shows the memory ratio."""
    mod = _script()
    calls: list[list[str]] = []
    monkeypatch.setattr(mod, "_run_cli", _fake_cli(calls))
    out = tmp_path / "r.json"
    assert mod.main(["--models", "mnist,alexnet", "--repeat", "4", "--sweep-points", "5",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per image median 2.5000 s" in text
    assert f"per image median {statistics.median([1.0, 2.0, 3.0, 4.0]):.4f}" in text
    assert "memory ratio" in text and "== mnist (fake) ==" in text
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"mnist", "alexnet"}
    assert set(doc["results"]["mnist"]) == {"local", "global"}
    assert doc["sweep"]["mnist"]["cost_in_local_bounds"] == 3.0 and "alexnet" not in doc["sweep"]
    assert doc["radius"]["per_image_seconds"] == [1.0, 2.0, 3.0, 4.0]
    # AlexNet gets at most --repeat-big (3) timed runs, the small networks --repeat
    reps = {(c[c.index("--model") + 1], c[c.index("--what") + 1], "--sweep" in c,
             "--radius-images" in c): c[c.index("--repeat") + 1] for c in calls}
    assert reps[("alexnet", "local", False, False)] == "3"
    assert reps[("mnist", "global", False, False)] == "4"
    assert reps[("mnist", "local", True, False)] == "4"


# ---------------------------------------------------------------------------- radius bench
def test_cli_radius_bench_uses_the_analyzer_settings(monkeypatch, capsys):
    """The radius measurement's analyzer took the library defaults whatever the command's
    --seed / --spectral / --lanczos-steps (the tables above it used them)."""
    seen: list[dict] = []
    real = lipbound.analyzer.Analyzer

    class Spy(real):
        def __init__(self, *a, **kw):
            seen.append(dict(kw))
            super().__init__(*a, **kw)

    monkeypatch.setattr(lipbound.analyzer, "Analyzer", Spy)
    assert main(["bench", "--model", "mnist", "--what", "global", "--repeat", "1",
                 "--radius-images", "1", "--seed", "5", "--spectral", "lanczos",
                 "--lanczos-steps", "16", "--threads", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["radius"]["n_images"] == 1 and len(d["radius"]["radii"]) == 1
    radius_an = [kw for kw in seen if kw.get("name") == "mnist" and "notes" not in kw]
    assert radius_an, seen
    for kw in radius_an:
        assert kw.get("seed") == 5 and kw.get("spectral") == "lanczos"
        assert kw.get("lanczos_steps") == 16


# ---------------------------------------------------------------------------- memory peak
@pytest.mark.parametrize("hwm, rss, resettable", [(500.0, 100.0, False), (100.0, 100.0, True),
                                                  (None, 100.0, False)])
def test_peak_reset_is_trusted_only_when_it_took_effect(hwm, rss, resettable, monkeypatch):
    """A clear_refs write that is accepted but ignored left the process peak (500 MiB here)
    labelled "VmHWM (peak RSS, reset per quantity)"; the reset is now trusted only when the
    peak came down to the resident set."""
    import io

    real_open = open

    def fake_open(path, *a, **kw):
        if str(path) == "/proc/self/clear_refs":
            return io.StringIO()
        return real_open(path, *a, **kw)

    monkeypatch.setattr(lb, "open", fake_open, raising=False)
    vals = {"VmHWM": hwm, "VmRSS": rss}
    monkeypatch.setattr(lb._Memory, "_vm", staticmethod(lambda name: vals[name]))
    mem = lb._Memory(torch.device("cpu"))
    mem.reset()
    assert mem.resettable is resettable
    assert ("reset per quantity" in mem.source) is resettable
    if resettable:
        assert mem.host_peak_mb() == hwm
    else:
        assert mem.source.startswith("ru_maxrss") and mem.host_peak_mb() > 0


@pytest.mark.parametrize("fn", ["bench", "bench_sweep"])
def test_library_bad_eps_refused_before_loading(fn, monkeypatch):
    from lipbound.errors import InputError

    def no_load(*a, **kw):
        raise ZooError("network loaded")

    monkeypatch.setattr(lb, "_load_zoo", no_load)
    with pytest.raises(InputError, match="eps"):
        getattr(lb, fn)("vgg16", eps=-1.0)


# ---------------------------------------------------------------------------- targets
def test_sweep_and_radius_targets_only_where_they_are_stated(capsys):
    """The sweep target (10 local bounds) is for 30 radii and the radius target (10 s) for
    the 100 MNIST test images: a 2-radius sweep or a 1-image radius run was shown against
    them ('target <= 10'), now without a target."""
    lm = load_model("compnet")
    x0 = torch.zeros(1, *lm.entry.input_shape)
    s = bench_sweep_model(lm.model, x0, name="compnet", eps_range=(0.01, 1.0), n_points=2,
                          local_repeat=1, raw=False)
    assert s.target_units is None
    s = bench_sweep_model(lm.model, x0, name="compnet", eps_range=(0.01, 1.0), n_points=30,
                          local_repeat=1, raw=False)
    assert s.target_units == lb.SWEEP_TARGET_UNITS
    r = lb.bench_radius("mnist", n_images=1, threads=1)
    assert r.target_seconds is None and r.to_dict()["target_seconds"] is None
    assert main(["bench", "--model", "compnet", "--what", "global", "--repeat", "1",
                 "--sweep", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "target <=" not in out and "the target is for 30 radii" in out
