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
