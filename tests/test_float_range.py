"""The ends of the float64 range and the model's own floating-point type.

* a radius or row norm beyond float64 (``ȳ = inf``) gives the ReLU slope's limit 1, never a
  NaN that drops the row;
* a model whose forward pass overflows, or whose coefficients (weights times folded scales)
  underflow when squared, is refused with the fix;
* a certified radius is for the model's own class at ``x0``: when the float32 model and the
  exact network disagree there (a near tie), the radius is 0 with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import n_examples
from lipbound import Analyzer
from lipbound.errors import InputError
from lipbound.radius import certified_radius

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _scalar_chain(w1: float, w2: float) -> nn.Module:
    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(w1)
        m[0].bias.zero_()
        m[2].weight.fill_(w2)
        m[2].bias.zero_()
    return m


@settings(max_examples=n_examples(20))
@given(w=st.floats(1.0, 1e3), log_eps=st.floats(290.0, 307.0), x=st.floats(-10.0, 10.0))
def test_huge_radius_keeps_the_active_slope(w: float, log_eps: float, x: float) -> None:
    """relu(w x) w on a ball of radius 1e290..1e307: the ball reaches the active side, so the
    local constant is exactly w^2 (the row norm times eps overflows to inf)."""
    m = _scalar_chain(w, w)
    an = Analyzer(m, (1,))
    x0 = torch.tensor([[x]], dtype=DT)
    res = an.local_bound(x0, 10.0 ** log_eps)
    assert math.isfinite(res.value)
    assert res.value >= w * w
    assert an.global_bound().value >= w * w


def test_huge_radius_on_a_wider_network() -> None:
    """Random 2-4-2 network with weights scaled by 1e140 and 1e-140 (the product is O(1)):
    at eps = 1e200 every ReLU can switch, so the bound must reach the largest local gradient
    norm seen over random points of a huge ball."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(4, 2, generator=g, dtype=DT) * 1e140)
        m[0].bias.zero_()
        m[2].weight.copy_(torch.randn(2, 4, generator=g, dtype=DT) * 1e-140)
    an = Analyzer(m, (2,))
    x0 = torch.tensor([[0.3, -0.2]], dtype=DT)
    val = an.local_bound(x0, 1e200).value
    assert math.isfinite(val)
    # exact Jacobians at random directions: the network is positively homogeneous, so the
    # activation patterns at unit directions are those of the huge ball
    worst = 0.0
    for _ in range(200):
        u = torch.randn(1, 2, generator=g, dtype=DT)
        u = u / u.norm()
        jac = torch.autograd.functional.jacobian(lambda z: m(z), u).reshape(2, 2)
        worst = max(worst, float(torch.linalg.matrix_norm(jac, 2)))
    assert val >= worst


def test_overflowing_forward_pass_is_refused() -> None:
    m = _scalar_chain(1e160, 1e160)
    with pytest.raises(InputError, match="not finite.*rescale"):
        Analyzer(m, (1,))


def test_underflow_through_folded_scales_is_refused() -> None:
    """Weights 1e-100 and a batch-norm scale 1e-100 each pass the 1e-150 floor alone, but
    the block's coefficients are their product, whose square underflows to 0: the bound
    would be 0 for a network that does move."""
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 1))
    m = m.to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(1e-100)
        m[0].bias.fill_(1.0)
        m[1].weight.fill_(1e-100)
        m[1].running_var.fill_(1.0)
    with pytest.raises(InputError, match="1e-150.*folded scales.*rescale"):
        Analyzer(m, (2,))


def _near_tie(bias1: float) -> nn.Module:
    """float32 scores 1e8 and 1e8 + bias1: float32 rounds both to 1e8 when bias1 < 4."""
    m = nn.Sequential(nn.Linear(1, 2)).eval()
    with torch.no_grad():
        m[0].weight.fill_(1e8)
        m[0].bias.copy_(torch.tensor([0.0, bias1]))
    return m


@pytest.mark.parametrize("method", ["local", "margin", "global"])
def test_radius_refused_when_float32_and_exact_classes_differ(method: str) -> None:
    m = _near_tie(1.0)
    x0 = torch.ones(1, 1)
    assert int(m(x0).argmax()) == 0  # float32: a tie, argmax takes the first
    res = certified_radius(m, x0, method=method)
    assert res.predicted_class == 1  # exact: class 1 by a margin of 1
    assert res.radius == 0.0
    assert "float32" in res.details["reason"] and "class 0" in res.details["reason"]


def test_radius_when_float32_and_exact_classes_agree() -> None:
    """The same network with a margin float32 resolves (64 against an ulp of 8 near x0 = 1):
    a positive radius (the margin's gradient is 0, so the search reaches its cap)."""
    m = _near_tie(64.0)
    x0 = torch.ones(1, 1)
    assert int(m(x0).argmax()) == 1
    res = certified_radius(m, x0, method="margin", max_eps=0.01)
    assert res.predicted_class == 1 and res.radius > 0
