"""``--threads auto``: one thread for small models, the idle cores for bigger ones."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from lipbound.cli import common
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
