"""Audit of the attacks: the reported radius and the box, checked in exact arithmetic.

Each test failed on the code before its fix.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from core_helpers import exact_distance_sq
from lipbound.attacks import ATTACKS, run_attacks

METHODS = sorted(ATTACKS)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_radius_never_below_the_exact_distance() -> None:
    # old code: the float64 norm was reported as is, below the exact distance of x_adv from
    # x0 in 11 of these 20 cases (by ~1e-16 relative); a certified radius compared with it
    # must see an upper bound on the distance
    n_checked = 0
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        x0 = torch.randn(1, 20, dtype=torch.float64)
        (r,) = run_attacks(model, x0, ("fgsm",))
        if r.success:
            n_checked += 1
            assert Fraction(r.radius) ** 2 >= exact_distance_sq(r.x_adv, x0)
            assert r.radius <= float(torch.linalg.vector_norm(r.x_adv.double() - x0)) * (1 + 1e-12)
    assert n_checked >= 15


def threshold_model() -> nn.Module:
    """Two scores ``[b - x, 0]`` with ``b`` the float32 number just below float32(0.1): the
    class changes only for ``x > b``, i.e. (in float32) only at ``x >= float32(0.1)``, which
    is above 0.1."""
    b = torch.nextafter(torch.tensor(0.1), torch.tensor(0.0))
    m = nn.Linear(1, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[-1.0], [0.0]]))
        m.bias.copy_(torch.stack([b, torch.tensor(0.0)]))
    return m.eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_box_is_respected_exactly(method: str, as_tensor: bool) -> None:
    # old code rounded the box to the nearest float32 value, float32(0.1) = 0.10000000149 >
    # 0.1, and every attack returned x_adv = 0.10000000149 as a verified example "in" the
    # box [0, 0.1]; no float32 point of the box changes the class
    model = threshold_model()
    x0 = torch.full((1, 1), 0.05)
    bounds = ((torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 0.1, dtype=torch.float64))
              if as_tensor else (0.0, 0.1))
    (r,) = run_attacks(model, x0, (method,), bounds=bounds)
    if r.success:  # pragma: no cover - the fix makes this impossible here
        assert Fraction(float(r.x_adv)) <= Fraction(0.1)
    assert not r.success
    # the same attack still succeeds once the box allows float32(0.1)
    (r,) = run_attacks(model, x0, (method,), bounds=(0.0, 0.2))
    assert r.success and float(r.x_adv) >= 0.1


def test_box_edge_at_x0_is_kept() -> None:
    # x0 given in float64 on the box's edge rounds (to nearest) just outside it in float32:
    # it is still accepted, and the attack stays on the box's side of x0
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [0.0]]))
        model.bias.copy_(torch.tensor([0.0, 0.05]))
    model.eval()
    x0 = torch.full((1, 1), 0.1, dtype=torch.float64)  # float32(0.1) > 0.1
    (r,) = run_attacks(model, x0, ("fgsm",), bounds=(0.0, 0.1))
    assert r.success
    assert Fraction(float(r.x_adv)) <= Fraction(0.1)
    assert Fraction(r.radius) ** 2 >= exact_distance_sq(r.x_adv, x0)


def test_candidates_on_the_boundary_fall_back_to_a_ladder() -> None:
    # old code: when every candidate failed its single-sample verification the attack
    # reported no class change, although the points sat within rounding of the boundary
    # (PGD on CIFAR-10 test image 12: all eight runs, class changes in the batched forward
    # pass but not alone); a point a relative 1e-6 farther along the ray is verified
    from lipbound.attacks.base import Attack

    class OnTheBoundary(Attack):
        name = "boundary"

        def run(self, ctx):
            return torch.tensor([[0.5, 0.5]]), {}  # a tie: no class change

    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    model.eval()
    x0 = torch.tensor([[1.0, 0.0]])
    r = OnTheBoundary()(model, x0)
    assert r.success and r.adversarial_class == 1
    exact = Fraction(0.5) ** 2 * 2
    assert Fraction(r.radius) ** 2 >= exact_distance_sq(r.x_adv, x0) > exact
    assert r.radius <= math.sqrt(0.5) * (1 + 2e-6)
    # the ladder is clipped to the box: in [0.5, 1] x [0, 0.5] it ends on the tie again
    r = OnTheBoundary()(model, x0, bounds=(torch.tensor([[0.5, 0.0]]),
                                           torch.tensor([[1.0, 0.5]])))
    assert not r.success


@pytest.mark.slow
def test_pgd_on_cifar10_test_image_12() -> None:
    # the real case (this 2-core CPU, torch's CPU kernels): before the ladder, PGD reported no
    # class change here while the other four attacks found one at 0.0066
    from lipbound.attacks import PGD
    from lipbound.inputs import load_sample
    from lipbound.zoo import load_model

    lm = load_model("cifar10")
    x0 = load_sample("cifar10:test/12", entry=lm.entry).x
    r = PGD()(lm.model, x0, seed=0)
    assert r.success and 0.0065 < r.radius < 0.0067
