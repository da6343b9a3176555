"""Tests of the benchmark library (lipbound.bench), ``lipbound bench`` and the suite script.

No timing assertions: only that the numbers are consistent, the bound values are the ones the
library computes directly, and the machinery (threads, JSON, subprocess suite) works.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipbound
from lipbound.analyzer import Analyzer
from lipbound.bench import (
    DEFAULT_EPS,
    TARGET_SECONDS,
    BenchResult,
    bench,
    bench_radius,
    bench_sweep,
)
from lipbound.cli import main
from lipbound.errors import InputError, ZooError
from lipbound.inputs import load_sample
from lipbound.zoo import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy machine two threads make small ops ~100x slower (timings
    are not asserted, but the file must stay fast)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _zoo(name: str):
    lm = load_model(name)
    return lm, load_sample(lm.entry.default_sample, entry=lm.entry).x


def _check_stats(r: BenchResult, repeat: int) -> None:
    assert len(r.runs) == repeat == len(r.cpu_runs)
    assert all(t >= 0 for t in r.runs)
    assert r.min_seconds <= r.median_seconds <= r.max_seconds
    assert r.min_seconds == min(r.runs) and r.max_seconds == max(r.runs)
    # two separate measurements (one cold build + bound, the median of several builds): no
    # order between them can be asserted on a loaded machine, only that both were taken
    assert r.cold_seconds > 0 and r.trace_seconds > 0
    assert math.isfinite(r.cold_seconds) and math.isfinite(r.trace_seconds)
    assert math.isfinite(r.peak_memory_mb) and r.peak_memory_mb > 0
    assert r.memory_source


@pytest.mark.parametrize("name", ["tiny", "compnet"])
def test_bench_values_are_the_library_bounds(name):
    lm, x0 = _zoo(name)
    r = bench(name, repeat=2)
    assert set(r.results) == {"local", "global"}
    loc, glo = r.results["local"], r.results["global"]
    assert loc is r and r.what == "local" and glo.others == ()
    direct_local = Analyzer(lm.model, lm.entry.input_shape).local_bound(x0, DEFAULT_EPS)
    direct_global = lipbound.global_bound(lm.model, lm.entry.input_shape)
    assert loc.value == pytest.approx(direct_local.value, rel=1e-12)
    assert loc.guarantee == direct_local.guarantee and loc.eps == DEFAULT_EPS
    assert glo.value == pytest.approx(direct_global.value, rel=1e-12)
    assert glo.guarantee == direct_global.guarantee and glo.eps is None
    assert loc.value <= glo.value * (1 + 1e-9)
    for q in (loc, glo):
        _check_stats(q, 2)
        assert q.target_seconds is None and q.ratio_to_target is None
        assert q.model == name and q.threads == torch.get_num_threads()
    assert len(loc.layer_methods) == len(direct_local.layers)


def test_bench_result_is_frozen_and_json_ready():
    r = bench("tiny", what="global", repeat=1, eps=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = 0.0  # type: ignore[misc]
    d = json.loads(json.dumps(r.to_dict()))
    for k in ("model", "what", "median_seconds", "min_seconds", "max_seconds",
              "peak_memory_mb", "value", "guarantee", "runs", "target_seconds",
              "ratio_to_target", "cold_seconds", "results"):
        assert k in d
    assert d["what"] == "global" and list(d["results"]) == ["global"]
    assert isinstance(d["guarantee"], str)


def test_bench_threads_restored_and_warmup_off():
    torch.set_num_threads(2)
    r = bench("compnet", what="local", repeat=2, threads=1, warmup=False)
    assert torch.get_num_threads() == 2
    assert r.threads == 1
    assert len(r.runs) == 2
    # without warm-up the cold run (analyzer built + first bound) is the first timed run
    assert r.cold_seconds >= r.runs[0]


def test_targets_are_attached_for_zoo_networks():
    r = bench("mnist", what="local", repeat=1)
    assert r.target_seconds == TARGET_SECONDS["mnist"]["local"]
    assert r.ratio_to_target == pytest.approx(r.median_seconds / r.target_seconds)


@pytest.mark.parametrize("kw, err", [
    ({"what": "nope"}, InputError),
    ({"what": ()}, InputError),
    ({"repeat": 0}, InputError),
    ({"repeat": 2.5}, InputError),
    ({"eps": -1.0}, InputError),
    ({"threads": 0}, InputError),
    ({"spectral": "fast"}, InputError),
])
def test_bench_bad_arguments(kw, err):
    with pytest.raises(err):
        bench("tiny", **kw)


def test_bench_unknown_model():
    with pytest.raises(ZooError):
        bench("resnet9000", repeat=1)


def test_sweep_values_match_fresh_bounds():
    """The bench times the user-facing sweep (local and global bounds); its plain-loop
    reference reproduces fresh single bounds, the sweep's values are valid bounds no
    smaller than them (compnet: exact spectral norms, so a reused factor can only be
    larger) and the looseness fields describe the ratio."""
    from lipbound.sweep import sweep

    s = bench_sweep("compnet", n_points=3, eps_range=(0.01, 1.0), local_repeat=1,
                    reuse_tol=0.5)
    assert s.n_points == 3 and len(s.values) == 3 and len(s.runs) == 1
    assert s.cost_in_local_bounds == pytest.approx(s.total_seconds / s.local_median_seconds)
    assert s.raw_cost_in_local_bounds == pytest.approx(s.raw_total_seconds /
                                                       s.local_median_seconds)
    assert s.reuse_tol == 0.5 and sum(s.sources.values()) == 3
    lm, x0 = _zoo("compnet")
    eps = (0.01, 0.1, 1.0)
    ref = sweep(lm.model, x0, list(eps), ("local", "global"), progress=False, reuse_tol=0.5)
    assert list(s.values) == pytest.approx(ref.values("local"), rel=1e-12)
    ratios = []
    for e, v, raw in zip(eps, s.values, s.raw_values, strict=True):
        fresh = lipbound.local_bound(lm.model, x0, e)
        assert fresh.guarantee == lipbound.Guarantee.CERTIFIED
        assert raw == pytest.approx(fresh.value, rel=1e-9)
        assert v >= fresh.value * (1 - 1e-12)
        ratios.append(v / raw)
    assert s.looseness_max == pytest.approx(max(ratios), rel=1e-12)
    assert s.looseness_max >= s.looseness_median >= min(ratios)
    assert s.failure_prob_max == 0.0
    json.dumps(s.to_dict())
    s2 = bench_sweep("compnet", n_points=2, eps_range=(0.01, 1.0), local_repeat=1, raw=False)
    assert math.isnan(s2.raw_total_seconds) and s2.raw_values == ()
    assert math.isnan(s2.looseness_max) and len(s2.values) == 2
    with pytest.raises(InputError):
        bench_sweep("compnet", n_points=1)
    with pytest.raises(InputError):
        bench_sweep("compnet", eps_range=(1.0, 0.1))


def test_radius_bench():
    r = bench_radius("mnist", n_images=1, threads=1)
    assert r is not None and r.n_images == 1 and len(r.radii) == 1
    assert all(math.isfinite(v) and v >= 0 for v in r.radii)
    assert r.total_seconds >= sum(r.per_image_seconds)
    assert r.n_bound_evaluations >= 2 and r.reuse_tol >= 0 and not r.start_from_previous
    json.dumps(r.to_dict())


# ---------------------------------------------------------------------------- CLI
def test_cli_bench_mnist_json(capsys):
    assert main(["bench", "--model", "mnist", "--repeat", "2", "--json", "--threads", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("model", "median_seconds", "min_seconds", "max_seconds", "peak_memory_mb",
              "value", "guarantee", "runs", "target_seconds", "ratio_to_target"):
        assert k in d, k
    assert d["model"] == "mnist" and d["what"] == "local" and len(d["runs"]) == 2
    assert set(d["results"]) == {"local", "global"}
    lm, x0 = _zoo("mnist")
    direct = lipbound.local_bound(lm.model, x0, DEFAULT_EPS)
    assert d["value"] == pytest.approx(direct.value, rel=1e-9)
    assert d["guarantee"] == direct.guarantee.value
    assert d["results"]["global"]["value"] == pytest.approx(
        lipbound.global_bound(lm.model, lm.entry.input_shape).value, rel=1e-9)


def test_cli_bench_table_and_sweep(capsys):
    assert main(["bench", "--model", "compnet", "--repeat", "1", "--what", "global",
                 "--eps", "0.05", "--sweep", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "median s" in out and "global" in out and "sweep of 3 radii" in out


def test_cli_bench_bad_input(capsys):
    assert main(["bench", "--model", "tiny", "--repeat", "0"]) == 2
    assert "repeat" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny", "--what", "loose"]) == 2
    assert "local" in capsys.readouterr().err


# ---------------------------------------------------------------------------- suite
@pytest.mark.slow
def test_run_benchmarks_script(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_benchmarks.py"), "--models", "tiny",
         "--what", "global", "--repeat", "1", "--no-sweep", "--no-radius", "--threads", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert set(doc["results"]["tiny"]) == {"global"}
    for r in doc["results"]["tiny"].values():
        assert "error" not in r, r
        assert r["threads"] == 1 and len(r["runs"]) == 1
    assert "== tiny" in proc.stdout and "summary" in proc.stdout
