"""Audit of the lower bounds: float32 rounding noise, witnesses on the ball's edge, bad input.

Each test failed on the code before its fix. The reference values are exact: an identity map
(constant 1) and a 1-D ReLU whose supremum is known in closed form; distances to the ball's
edge are checked in exact rational arithmetic.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from core_helpers import exact_distance_sq
from lipbound.errors import InputError
from lipbound.lower import (
    best_lower_bound,
    gradient_lower_bound,
    pgd_lower_bound,
    random_lower_bound,
    ratio_at,
)

FAST = {"n_random": 256, "gradient_steps": 20, "pgd_restarts": 4, "pgd_steps": 20,
        "pgd_refine": 2, "pgd_refine_steps": 20}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def identity_with_big_bias() -> nn.Module:
    """``f(x) = x + 1e4`` in float32: every local constant is exactly 1, but float32 rounds
    ``f(x) - f(x0)`` to multiples of ~1e-3, which a small ``||x - x0||`` turns into a large
    ratio error."""
    m = nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.copy_(torch.eye(4))
        m.bias.fill_(1e4)
    return m.eval()


@pytest.mark.parametrize("eps", [1e-2, 1.0])
@pytest.mark.parametrize("method", ["random", "gradient", "pgd", "best"])
def test_float32_rounding_noise_is_not_reported(method: str, eps: float) -> None:
    # old code: 1.146 (random), 1.11 (pgd) at eps=1e-2 and 1.0014 at eps=1: float32 noise
    # reported as a lower bound above the exact constant 1
    model = identity_with_big_bias()
    x0 = torch.full((1, 4), 0.3)
    fns = {
        "random": lambda: random_lower_bound(model, x0, eps, n_samples=2000),
        "gradient": lambda: gradient_lower_bound(model, x0, eps, n_steps=30),
        "pgd": lambda: pgd_lower_bound(model, x0, eps, n_steps=20, n_restarts=8),
        "best": lambda: best_lower_bound(model, x0, eps, **FAST),
    }
    r = fns[method]()
    assert r.value <= 1.0
    assert r.value >= 0.99  # still a useful bound: the witness is evaluated in float64
    assert r.value <= ratio_at(model, x0, r.witness)
    assert r.witness.dtype == torch.float32
    assert 0 < exact_distance_sq(r.witness, x0) <= Fraction(eps) ** 2


def test_ratio_at_uses_the_exact_network() -> None:
    model = identity_with_big_bias()
    x0 = torch.full((1, 4), 0.3)
    x = x0.clone()
    x[0, 0] += 2e-3  # float32 rounding of x + 1e4 gives a ratio far from 1 (old: 0.98)
    assert ratio_at(model, x0, x) == pytest.approx(1.0, rel=1e-12, abs=0)


def relu_ramp() -> nn.Module:
    """``f(x) = relu(x - 1/4)`` in float64."""
    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU()).double()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[0].bias.fill_(-0.25)
    return m.eval()


@pytest.mark.parametrize("method", ["gradient", "pgd"])
def test_witness_inside_the_ball_exactly(method: str) -> None:
    # x0 = -1e-20, eps = 1/2: the point 0.5 has computed distance 0.5 + 1e-20 -> 0.5 == eps
    # in float64, but lies outside the ball; old code returned it as the witness with the
    # value 0.5, above the true supremum (0.25 - 1e-20) / 0.5
    model = relu_ramp()
    x0 = torch.tensor([[-1e-20]], dtype=torch.float64)
    fn = gradient_lower_bound if method == "gradient" else pgd_lower_bound
    r = fn(model, x0, 0.5)
    assert 0 < exact_distance_sq(r.witness, x0) <= Fraction(1, 4)
    assert r.value < 0.5
    assert r.value >= 0.5 * (1 - 1e-6)


def test_training_mode_submodule_is_rejected() -> None:
    # old code checked only the root module: a Dropout left in training mode made f random
    # and the "lower bound" 37 for a map whose constant is below 3
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).eval()
    model[1].train()
    x0 = torch.ones(1, 3)
    for fn in (lambda: random_lower_bound(model, x0, 0.1, n_samples=50),
               lambda: gradient_lower_bound(model, x0, 0.1, n_steps=2),
               lambda: pgd_lower_bound(model, x0, 0.1, n_steps=2),
               lambda: ratio_at(model, x0, x0 + 0.01)):
        with pytest.raises(InputError, match=r"training mode.*model\.eval\(\)"):
            fn()


def test_wrong_input_shape_is_an_input_error() -> None:
    model = nn.Linear(3, 2).eval()
    with pytest.raises(InputError, match=r"shape \(1, 4\)"):
        random_lower_bound(model, torch.ones(1, 4), 0.1, n_samples=10)


@pytest.mark.parametrize("eps", [True, False])
def test_bool_eps_is_refused(eps) -> None:
    from lipbound import local_bound
    from lipbound.lower import random_lower_bound, sample_ball

    net = nn.Sequential(nn.Linear(3, 2)).double().eval()
    x0 = torch.zeros(1, 3, dtype=torch.float64)
    for run in (lambda: sample_ball(x0, eps, 4), lambda: random_lower_bound(net, x0, eps),
                lambda: local_bound(net, x0, eps)):
        with pytest.raises(InputError, match="eps must be a positive number"):
            run()


def test_ball_is_centred_at_a_float64_x0_of_a_float32_model() -> None:
    """A float64 x0 that float32 cannot represent: the witness lies in the ball around the
    exact x0 (not around its float32 rounding, 1.5e-9 away here, farther than eps)."""
    from lipbound.lower import best_lower_bound, random_lower_bound

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()  # float32
    x0 = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    assert not torch.equal(x0.float().double(), x0)
    eps = 1e-10
    for res in (random_lower_bound(net, x0, eps, n_samples=64),
                best_lower_bound(net, x0, eps, n_random=64, gradient_steps=5,
                                 pgd_restarts=2, pgd_steps=5, pgd_refine=1,
                                 pgd_refine_steps=5)):
        d2 = exact_distance_sq(res.witness, x0)
        assert 0 < d2 <= Fraction(eps) ** 2
        # and the value is below the network's global constant (a certified upper bound)
        w1, w2 = net[0].weight.detach().double(), net[2].weight.detach().double()
        bound = torch.linalg.matrix_norm(w2, 2) * torch.linalg.matrix_norm(w1, 2)
        assert res.value <= float(bound)


def count_float64_copies(monkeypatch, net: nn.Module) -> list[int]:
    """A list that gains an item whenever the lower bounds deep-copy ``net`` (for their
    float64 copy)."""
    import copy as copy_module

    from lipbound.lower import _common

    copies: list[int] = []
    real_deepcopy = copy_module.deepcopy

    def counting_deepcopy(obj, *args, **kwargs):
        if obj is net:
            copies.append(1)
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(_common.copy, "deepcopy", counting_deepcopy)
    return copies


@pytest.mark.parametrize("x0_dtype", [torch.float32, torch.float64])
def test_best_lower_bound_makes_one_float64_copy(monkeypatch, x0_dtype) -> None:
    """best_lower_bound runs three methods; their witnesses are re-evaluated on one shared
    float64 copy of a float32 model (not one copy per method), with the same values as the
    methods run on their own, and the copy is not kept after the call."""
    from lipbound.lower import _common

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x0 = torch.tensor([[0.1, -0.2, 0.3]], dtype=x0_dtype)
    kw = {"n_random": 64, "gradient_steps": 5, "pgd_restarts": 2, "pgd_steps": 5,
          "pgd_refine": 1, "pgd_refine_steps": 5}
    copies = count_float64_copies(monkeypatch, net)
    best = best_lower_bound(net, x0, 0.05, **kw)
    assert len(copies) == 1
    assert _common._SHARED_COPY.get() is None
    copies.clear()
    alone = random_lower_bound(net, x0, 0.05, n_samples=64)
    assert len(copies) >= 1  # outside the block every call makes its own
    assert best.details["values"]["random"] == alone.value


def test_sweep_lower_bounds_share_one_float64_copy(monkeypatch) -> None:
    """A sweep of float32 lower bounds (lower_dtype=None) re-evaluates its witnesses at every
    radius on one float64 copy of the model, with the values of the methods run alone."""
    from lipbound.sweep import sweep

    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x0 = torch.tensor([[0.1, -0.2, 0.3]])
    copies = count_float64_copies(monkeypatch, net)
    res = sweep(net, x0, [0.01, 0.1, 1.0], "random,gradient", progress=False, samples=32,
                steps=3, lower_dtype=None)
    # one for the lower bounds, one (dropped after it) for the sweep's chain check, which
    # compares a float32 model's float64 copy with the chain at every input (session 26)
    assert len(copies) == 2
    alone = gradient_lower_bound(net, x0, 0.1, n_steps=3)
    assert res.rows[1].points[1].value == alone.value
