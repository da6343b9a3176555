"""Adversarial review (session 23) of the attacks and the lower bounds.

Each test names the defect it pins and failed on the code before its fix.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from core_helpers import exact_distance_sq
from lipbound.attacks import ATTACKS, run_attacks

METHODS = sorted(ATTACKS)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _linear(weight, bias, dtype=torch.float64) -> nn.Module:
    net = nn.Linear(len(weight[0]), len(weight)).to(dtype)
    with torch.no_grad():
        net.weight.copy_(torch.tensor(weight, dtype=dtype))
        net.bias.copy_(torch.tensor(bias, dtype=dtype))
    return net.eval()


def _exact_logits(net: nn.Linear, x: torch.Tensor) -> list[Fraction]:
    xs = [Fraction(v) for v in x.double().flatten().tolist()]
    return [sum((Fraction(w) * v for w, v in zip(row, xs, strict=True)), Fraction(b))
            for row, b in zip(net.weight.double().tolist(), net.bias.double().tolist(),
                              strict=True)]


@pytest.mark.parametrize("scale", [1e-160, 1e-200, 1e-300])
def test_attack_radius_of_a_tiny_perturbation_is_not_below_its_distance(scale: float) -> None:
    # old code: the float64 norm of x_adv - x0 squared the differences (3e-160 -> 9e-320, a
    # subnormal with 4 significant digits left): every attack reported 2.99998e-160 for a
    # witness at 3.0000005e-160, below its exact distance and even below the exact minimal
    # adversarial distance 3e-160 (scores [0, x_1 - 3e-160]); at 1e-200 the squares
    # underflowed to 0 and no attack found anything
    b = 3.0 * scale
    net = _linear([[0.0, 0.0], [1.0, 0.0]], [0.0, -b])
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    results = run_attacks(net, x0, ("fgsm", "ifgsm", "gradient", "pgd"))
    assert all(r.success for r in results)
    for r in results:
        z = _exact_logits(net, r.x_adv)
        assert z[1] > z[0]  # a real class change, so the distance is >= 3 scale
        assert Fraction(r.radius) ** 2 >= exact_distance_sq(r.x_adv, x0) >= Fraction(b) ** 2
        assert r.radius <= float(r.x_adv[0, 0]) * (1 + 1e-12)
