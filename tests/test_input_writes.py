"""Models that write into their input (a first ``ReLU(inplace=True)``, directly or through
``Flatten``'s view): lower bounds, attacks, ratios and bounds leave the caller's ``x0`` as it
was and give what the same network without in-place operations gives (before, the lower
bounds and attacks failed with autograd's "a leaf Variable that requires grad is being used
in an in-place operation", and the model's first call overwrote ``x0`` with ``relu(x0)``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipbound
from lipbound import lower
from lipbound._modelinfo import InputCopying, guard_input_writes
from lipbound.attacks import run_attacks
from lipbound.radius import certified_radius


def _nets(flatten: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    layers = [nn.Linear(4, 8), nn.Linear(8, 3)]
    out = []
    for inplace in (False, True):
        mods = [nn.Flatten()] if flatten else []
        mods += [nn.ReLU(inplace=inplace), layers[0], nn.ReLU(inplace=inplace), layers[1]]
        out.append(nn.Sequential(*mods).double().eval())
    return out[0], out[1]


@pytest.mark.parametrize("flatten", [False, True])
def test_lower_bounds_attacks_and_bounds_match_the_plain_network(flatten):
    plain, writes = _nets(flatten)
    x0 = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=torch.float64)
    if flatten:
        x0 = x0.reshape(1, 2, 2)
    keep = x0.clone()
    x1 = x0 + 0.05
    calls = [
        lambda m: lower.random_lower_bound(m, x0, 0.5, n_samples=256).value,
        lambda m: lower.gradient_lower_bound(m, x0, 0.5).value,
        lambda m: lower.pgd_lower_bound(m, x0, 0.5).value,
        lambda m: lower.best_lower_bound(m, x0, 0.5).value,
        lambda m: lower.ratio_at(m, x0, x1),
        lambda m: lower.jacobian_norm_at(m, x0),
        lambda m: [(a.method, a.success, a.radius) for a in run_attacks(m, x0)],
        lambda m: lipbound.local_bound(m, x0, 0.5).value,
        lambda m: certified_radius(m, x0).radius,
    ]
    for i, call in enumerate(calls):
        assert call(writes) == call(plain), i
        assert torch.equal(x0, keep) and torch.equal(x1, keep + 0.05), i


def test_guard_wraps_only_models_that_write_into_their_input():
    plain, writes = _nets(True)
    x = torch.randn(2, 2, 2, dtype=torch.float64)
    keep = x.clone()
    same, y = guard_input_writes(plain, x)
    assert same is plain and torch.equal(y, plain(x))
    wrapped, y = guard_input_writes(writes, x)
    assert isinstance(wrapped, InputCopying) and not wrapped.training
    assert torch.equal(x, keep) and torch.equal(y, plain(x))
    assert torch.equal(wrapped(x), y) and torch.equal(x, keep)
