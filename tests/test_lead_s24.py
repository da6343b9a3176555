"""Session 24 (lead): a float32 model whose own rounding exceeds the chain check's float32
tolerance is refused with what is happening and the fix (analyse ``model.double()``), not with
the message of a misread layer (the fuzz's seeds 12028, 21377, 320029); a misread layer keeps
the old message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipbound
from lipbound.errors import UnsupportedModelError


def _cancelling_net() -> nn.Sequential:
    """Two hidden units of about 1e6 whose difference (exactly 1) is scaled by 1e6: float32
    rounding of the hidden units (ulp 0.06) moves the output by ~1e4."""
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e6, 3e5, -2e5], [1e6, 3e5, -2e5]]))
        net[0].bias.copy_(torch.tensor([1.0, 0.0]))
        net[2].weight.copy_(torch.tensor([[1e6, -1e6], [1.0, 1.0]]))
        net[2].bias.zero_()
    return net


def test_float32_rounding_is_named_with_the_float64_fix():
    net = _cancelling_net()
    with pytest.raises(UnsupportedModelError, match=r"float32 rounding.*model\.double\(\)"):
        lipbound.Analyzer(net, (3,))
    # the fix works, and its bound is above the float64 model's slopes
    an = lipbound.Analyzer(net.double(), (3,))
    g = an.global_bound().value
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    jac = torch.func.vmap(torch.func.jacrev(lambda v: net(v[None])[0]))(x)
    assert g >= float(torch.linalg.matrix_norm(jac.detach(), 2).max())




def test_a_misread_layer_keeps_the_misread_message(monkeypatch):
    """A chain that differs from the model in float64 too is not explained as rounding."""
    from lipbound import graph

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    real = graph.chain_forward

    def wrong(ops, x):  # the chain misreads the model by a factor 2
        return real(ops, x) * 2.0

    monkeypatch.setattr(graph, "chain_forward", wrong)
    with pytest.raises(UnsupportedModelError) as exc:
        lipbound.Analyzer(net, (3,))
    assert "does not reproduce" in str(exc.value) and "float32 rounding" not in str(exc.value)
