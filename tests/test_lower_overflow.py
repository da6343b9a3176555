"""Lower bounds of networks whose outputs are near the top of the float64 range: every
method returns a finite value attained by its witness (re-checked), never NaN, and never
above the network's true local constant (the float64 norms of output differences are
computed without overflowing their squares; a point whose ratio is not finite is no
witness)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipbound
from lipbound.lower import (
    best_lower_bound,
    gradient_lower_bound,
    pgd_lower_bound,
    random_lower_bound,
    ratio_at,
)

X0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
EPS = 1.0
METHODS = {
    "random": lambda m, x0, eps: random_lower_bound(m, x0, eps, n_samples=256),
    "gradient": lambda m, x0, eps: gradient_lower_bound(m, x0, eps, n_steps=30),
    "pgd": lambda m, x0, eps: pgd_lower_bound(m, x0, eps, n_restarts=8, n_steps=15,
                                              n_refine=2, refine_steps=15),
    "best": lambda m, x0, eps: best_lower_bound(m, x0, eps, n_random=256, gradient_steps=30,
                                                pgd_restarts=8, pgd_steps=15, pgd_refine=2,
                                                pgd_refine_steps=15),
}


def _net(scale: float, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        m[2].weight.mul_(scale)
        m[2].bias.mul_(scale)
    return m


def test_safe_norm():
    from lipbound.lower._common import safe_norm

    v = torch.tensor([[1e300, 1e300, 0.0], [3e-320, 4e-320, 0.0], [3.0, 4.0, 0.0],
                      [0.0, 0.0, 0.0]], dtype=torch.float64)
    got = safe_norm(v, dim=1)
    assert got[0] == pytest.approx(math.sqrt(2) * 1e300, rel=1e-15)
    assert got[1] == pytest.approx(5e-320, rel=1e-3)  # (subnormal inputs)
    assert got[2] == 5.0 and got[3] == 0.0
    assert float(safe_norm(torch.tensor([1.7e308, 1.7e308], dtype=torch.float64))) == math.inf
    assert float(safe_norm(v[2])) == 5.0


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("scale", [1e300, 1e307])
def test_lower_bounds_of_a_scaled_network_are_finite_and_valid(method, scale):
    # (was: NaN from every method: ||f(x) - f(x0)|| overflowed in its squares)
    m = _net(scale)
    r = METHODS[method](m, X0, EPS)
    assert math.isfinite(r.value) and r.value > 0
    # attained by the witness, which lies in the ball
    dist = float(torch.linalg.vector_norm(r.witness - X0))
    assert 0 < dist <= EPS
    assert r.value <= ratio_at(m, X0, r.witness)
    # and below the network's constant: scale times the certified bound of the unscaled net
    upper = lipbound.local_bound(_net(1.0), X0, EPS).value
    assert r.value / scale <= upper * (1 + 1e-9)
    # as large as the unscaled network's (the same search up to the scale)
    small = METHODS[method](_net(1.0), X0, EPS).value
    assert r.value / scale >= 0.5 * small


def test_ratio_at_of_a_scaled_network():
    x = X0 + 0.1
    assert ratio_at(_net(1e300), X0, x) == pytest.approx(1e300 * ratio_at(_net(1.0), X0, x),
                                                         rel=1e-12)


class Blowing(nn.Module):
    """Outputs of 1e300 squared (inf) where a ReLU turns on, 0 change elsewhere: the finite
    ratios are the only witnesses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 1).double()
        self.b = nn.Linear(1, 2).double()
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
            self.a.bias.copy_(-X0[0, 0])  # exactly 0 at x0: off below, on above
            self.b.weight.fill_(1e300)
            self.b.bias.fill_(1.0)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * 1e300)


@pytest.mark.parametrize("method", list(METHODS))
def test_overflowing_points_are_no_witness(method):
    m = Blowing().eval()
    r = METHODS[method](m, X0, EPS)
    assert math.isfinite(r.value) and r.value >= 0
    ratio = ratio_at(m, X0, r.witness)
    assert not r.value > ratio  # (ratio may be inf where the ReLU is on: no witness there)
    if r.value > 0:
        assert math.isfinite(ratio)


@pytest.mark.parametrize("method", ["random", "gradient", "pgd"])
def test_float32_network_near_its_range(method):
    m = _net(1e36, torch.float32)
    x0 = X0.float()
    r = METHODS[method](m, x0, EPS)
    assert math.isfinite(r.value) and r.value > 0
    assert r.value <= ratio_at(m, x0, r.witness)


class Everywhere(nn.Module):
    """Finite at x0 only: every other point's output overflows."""

    def forward(self, x):
        return ((x - X0).abs().sum(dim=1, keepdim=True) * 1e300) * 1e300 + 1.0


@pytest.mark.parametrize("method", list(METHODS))
def test_no_finite_ratio_gives_zero_with_a_note(method):
    r = METHODS[method](Everywhere().eval(), X0, EPS)
    assert r.value == 0.0
    assert "no point found with a finite ratio" in r.details["note"]
