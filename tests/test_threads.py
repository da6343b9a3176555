"""``--threads``: torch's threads and numpy/scipy's BLAS pools; ``auto``: one thread for small
models, the idle cores for bigger ones."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.linalg  # noqa: F401  (scipy's BLAS loaded: threadpoolctl sees loaded libraries)
import threadpoolctl
import torch
from torch import nn

from lipbound import _threads
from lipbound import bench as bench_mod
from lipbound.cli import common, main
from lipbound.errors import InputError


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _model(params: int) -> nn.Module:
    return nn.Sequential(nn.Linear(params, 1, bias=False))


@pytest.mark.parametrize("params, expected", [
    (common.BIG_MODEL_PARAMETERS, 1),        # at the threshold: small
    (common.BIG_MODEL_PARAMETERS + 1, 2),    # above it: the idle cores
    (44_426, 1),                             # MNIST LeNet's size
    (890_410, 2),                            # the CIFAR-10 net's size
])
def test_auto_threads_by_model_size(monkeypatch, restore_threads, params, expected):
    monkeypatch.setattr(common, "idle_cores", lambda window=0.25: 2)
    common.apply_threads(argparse.Namespace(threads="auto"), _model(params))
    assert torch.get_num_threads() == expected


def test_auto_threads_never_more_than_idle(monkeypatch, restore_threads):
    monkeypatch.setattr(common, "idle_cores", lambda window=0.25: 1)
    common.apply_threads(argparse.Namespace(threads="auto"), _model(10 ** 6))
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("spec", ["0", "-2", "many"])
def test_bad_thread_counts_are_refused(restore_threads, spec):
    with pytest.raises(InputError, match="--threads"):
        common.apply_threads(argparse.Namespace(threads=spec), None)


class _FakeClock:
    """monotonic / process_time / sleep for idle_cores, advanced by hand."""

    def __init__(self):
        self.now = 100.0
        self.cpu = 5.0
        self.slept: list[float] = []

    def monotonic(self):
        return self.now

    def process_time(self):
        return self.cpu

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


@pytest.mark.parametrize("other_busy, expected", [(0, 2), (20, 1), (40, 1)])
def test_idle_cores_counts_this_process_own_work_as_idle(monkeypatch, other_busy, expected):
    """Two cores over 0.2 s (40 ticks): this process kept one busy (loading the model, 20
    ticks); another process keeps ``other_busy`` ticks. Only the other's work counts."""
    clock = _FakeClock()
    readings = iter([(0, 0), (40 - 20 - other_busy, 40)])
    monkeypatch.setattr(common, "time", clock)
    monkeypatch.setattr(common, "_cpu_set", lambda: {0, 1})
    monkeypatch.setattr(common, "_cpu_times", lambda cores: next(readings))
    common.start_idle_sampling()
    clock.now += 0.2
    clock.cpu += 0.2
    assert common.idle_cores() == expected
    assert clock.slept == []  # the loading took longer than the window: no wait


def test_a_long_loading_window_is_replaced_by_a_fresh_one(monkeypatch):
    """A 10 s model loading (this process on core 0), another process on core 1 for its
    last second only: averaged over 10 s that core would look idle; the window is replaced by
    a fresh 0.1 s one, in which core 1 is busy."""
    clock = _FakeClock()
    readings = iter([(0, 0), (10, 20)])  # the fresh window: core 1 busy, core 0 idle
    monkeypatch.setattr(common, "time", clock)
    monkeypatch.setattr(common, "_cpu_set", lambda: {0, 1})
    monkeypatch.setattr(common, "_cpu_times", lambda cores: next(readings))
    monkeypatch.setattr(common, "_started", (clock.now, (0, 0), clock.cpu))
    clock.now += 10.0
    clock.cpu += 10.0
    assert common.idle_cores() == 1
    assert clock.slept == [pytest.approx(common.MIN_IDLE_WINDOW)]


def test_idle_cores_waits_only_for_the_rest_of_the_window(monkeypatch):
    clock = _FakeClock()
    readings = iter([(0, 0), (20, 20), (0, 0), (20, 20)])
    monkeypatch.setattr(common, "time", clock)
    monkeypatch.setattr(common, "_cpu_set", lambda: {0, 1})
    monkeypatch.setattr(common, "_cpu_times", lambda cores: next(readings))
    common.start_idle_sampling()
    clock.now += 0.03
    assert common.idle_cores() == 2
    assert clock.slept == [pytest.approx(common.MIN_IDLE_WINDOW - 0.03)]
    # the start reading is used once: a later call samples its own full window
    assert common.idle_cores() == 2
    assert clock.slept[-1] == pytest.approx(common.MIN_IDLE_WINDOW)


# ------------------------------------------------- numpy/scipy's BLAS pools follow --threads
# torch.set_num_threads does not reach the OpenBLAS that numpy and scipy bundle, on which the
# rival methods' linear algebra runs (lipbound._threads): the pools are read through
# threadpoolctl, never timed.

def _blas_threads() -> list[int]:
    """Thread counts of the BLAS pools loaded, apart from single-threaded builds (SCS, once
    loaded, brings an OpenBLAS without threading: always one thread, whatever the limit)."""
    return [d["num_threads"] for d in threadpoolctl.threadpool_info()
            if d["user_api"] == "blas" and d.get("threading_layer") != "disabled"]


def _other(n: int) -> int:
    """A thread count different from ``n``, to start from."""
    return 2 if n == 1 else 1


@pytest.fixture
def restore_pools():
    """The BLAS/OpenMP limits and torch's threads as they were before the test."""
    n = torch.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=None):  # records the limits, restores on exit
        yield
    torch.set_num_threads(n)


def _start_at(n: int) -> None:
    threadpoolctl.threadpool_limits(limits=n)
    torch.set_num_threads(n)
    assert _blas_threads() and set(_blas_threads()) == {n}


@pytest.mark.parametrize("n", [1, 2])
def test_explicit_threads_limit_the_blas_pools(restore_pools, n):
    _start_at(_other(n))
    common.apply_threads(argparse.Namespace(threads=str(n)), None)
    assert torch.get_num_threads() == n
    assert len(_blas_threads()) >= 2  # numpy's and scipy's (both loaded by the helper)
    assert set(_blas_threads()) == {n}


@pytest.mark.parametrize("params, expected", [
    (44_426, 1),        # small: one thread, for the BLAS pools too
    (10 ** 6, 2),       # big: the idle cores
])
def test_auto_threads_limit_the_blas_pools(monkeypatch, restore_pools, params, expected):
    monkeypatch.setattr(common, "idle_cores", lambda window=0.25: 2)
    _start_at(_other(expected))
    common.apply_threads(argparse.Namespace(threads="auto"), _model(params))
    assert set(_blas_threads()) == {expected}


@pytest.mark.parametrize("n", [1, 2])
def test_cli_threads_hold_for_the_command(capsys, restore_pools, n):
    """The command's --threads is in force when it returns (for the rest of the process)."""
    _start_at(_other(n))
    assert main(["bound", "--model", "tiny", "--threads", str(n), "--json"]) == 0
    capsys.readouterr()
    assert torch.get_num_threads() == n and set(_blas_threads()) == {n}


def test_bench_threads_limit_the_pools_and_restore_them(monkeypatch, restore_pools):
    """bench(threads=1) runs with one BLAS thread and hands back the limits it found."""
    _start_at(2)
    seen = []
    measure = bench_mod._measure

    def spy(*a, **kw):
        seen.append((torch.get_num_threads(), _blas_threads()))
        return measure(*a, **kw)

    monkeypatch.setattr(bench_mod, "_measure", spy)
    r = bench_mod.bench("tiny", what="global", repeat=1, threads=1, warmup=False)
    assert r.threads == 1
    assert seen and all(t == 1 and set(b) == {1} for t, b in seen)
    assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}


def test_bench_threads_none_leaves_the_pools(restore_pools):
    _start_at(2)
    with bench_mod._threads(None):
        assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}


def test_limited_threads_restores_after_an_error(restore_pools):
    _start_at(2)
    with pytest.raises(RuntimeError, match="inside"), _threads.limited_threads(1):
        assert torch.get_num_threads() == 1 and set(_blas_threads()) == {1}
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}


def test_limited_threads_nest(restore_pools):
    _start_at(2)
    with _threads.limited_threads(1):
        with _threads.limited_threads(2):
            assert set(_blas_threads()) == {2}
        assert torch.get_num_threads() == 1 and set(_blas_threads()) == {1}
    assert set(_blas_threads()) == {2}


class _Broken:
    """A threadpoolctl whose limiting fails (an unreadable library)."""

    @staticmethod
    def threadpool_limits(limits=None, user_api=None):
        raise OSError("cannot read the library")


@pytest.mark.parametrize("module", [None, _Broken()], ids=["missing", "failing"])
def test_without_threadpoolctl_torch_threads_are_still_set(monkeypatch, caplog, restore_pools,
                                                           module):
    """No threadpoolctl (None in sys.modules: the import fails) or one that raises: the
    pools are left alone with a warning, torch's threads are set, nothing fails."""
    _start_at(2)
    monkeypatch.setitem(sys.modules, "threadpoolctl", module)
    common.apply_threads(argparse.Namespace(threads="1"), None)
    assert torch.get_num_threads() == 1
    with _threads.limited_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 1
    assert "BLAS threads not limited" in caplog.text
    monkeypatch.delitem(sys.modules, "threadpoolctl")
    assert set(_blas_threads()) == {2}


def test_no_pool_found_is_not_an_error(monkeypatch, restore_pools):
    """threadpoolctl finding no library it knows (no BLAS info): nothing to limit."""
    empty = threadpoolctl.ThreadpoolController.__new__(threadpoolctl.ThreadpoolController)
    empty.lib_controllers = []
    monkeypatch.setattr(threadpoolctl, "threadpool_limits",
                        lambda limits=None, user_api=None:
                        threadpoolctl._ThreadpoolLimiter(empty, limits=limits))
    with _threads.limited_threads(1):
        assert torch.get_num_threads() == 1
    common.apply_threads(argparse.Namespace(threads="1"), None)
    assert torch.get_num_threads() == 1


_IMPORT_CHECK = """
import json, sys
import numpy, scipy.linalg, torch
import threadpoolctl
def state():
    return (torch.get_num_threads(),
            sorted((d["filepath"], d["num_threads"]) for d in threadpoolctl.threadpool_info()))
before = state()
for name in [m for m in sys.modules if m == "threadpoolctl" or m.startswith("threadpoolctl.")]:
    del sys.modules[name]
import lipbound, lipbound.bench, lipbound.baselines, lipbound.cli, lipbound._threads
lipbound.cli.build_parser()
lazy = "threadpoolctl" not in sys.modules
import threadpoolctl
print(json.dumps({"same": state() == before, "lazy": lazy}))
"""


def test_importing_lipbound_changes_no_thread_setting():
    """Importing the library (and building the CLI's parser) sets no thread count and does
    not import threadpoolctl (only applying a limit does)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(common.__file__).parents[2])] + os.environ.get("PYTHONPATH", "").split(
            os.pathsep))}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"same": True, "lazy": True}


@pytest.mark.parametrize("n", [1, 2])
def test_benchmark_records_name_the_cpu_and_the_blas_threads(restore_pools, n):
    """A benchmark record says which CPU it ran on and how many BLAS threads were in force
    (the same code's timings differ by up to 2x between hosts)."""
    _start_at(_other(n))
    with _threads.limited_threads(n):
        env = bench_mod.environment()
        assert env["blas_threads"] == n == _threads.blas_threads()
        assert env["torch_threads"] == n
    assert isinstance(env["cpu_model"], str) and env["cpu_model"]


def test_cpu_model_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU @ 2.60GHz\n"
                    "processor\t: 1\nmodel name\t: Some CPU @ 2.60GHz\n")
    assert bench_mod.cpu_model(str(info)) == "Some CPU @ 2.60GHz"
    missing = bench_mod.cpu_model(str(tmp_path / "none"))
    assert isinstance(missing, str) and missing  # the platform's name, else "unknown"
    assert missing != "Some CPU @ 2.60GHz"


def test_blas_threads_is_none_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    assert _threads.blas_threads() is None
