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


def _random_linear(seed: int, n_in: int, n_out: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    net = _linear(torch.randn(n_out, n_in, generator=g, dtype=torch.float64).tolist(),
                  torch.randn(n_out, generator=g, dtype=torch.float64).tolist(), dtype)
    x0 = torch.randn(1, n_in, generator=g, dtype=torch.float64).to(dtype)
    return net, x0


def _closed_form_radius(net: nn.Linear, x0: torch.Tensor) -> tuple[int, float]:
    """The class at ``x0`` and the exact minimal adversarial L2 distance of a linear
    classifier, ``min_j (z_c - z_j) / ||w_c - w_j||``."""
    z = _exact_logits(net, x0)
    c = max(range(len(z)), key=z.__getitem__)
    w = net.weight.detach().double()
    return c, min(float(z[c] - z[j]) / float((w[c] - w[j]).norm())
                  for j in range(len(z)) if j != c)


@pytest.mark.parametrize("method", METHODS)
def test_attacks_on_two_class_linear_models_find_the_boundary(method: str) -> None:
    # old code: on a two-class linear model the first-order estimate t0 = m / ||grad m||
    # lies exactly on the decision boundary; FGSM's bracketing saw x0 + t0 d flip in a
    # batched forward pass, its line search re-checked that point alone, where rounding
    # kept the class, and gave up ("no adversarial found" for seeds 26 and 32); I-FGSM's
    # smallest budget t0 did the same and it reported 1.25 t0 (seed 1)
    for seed in (1, 26, 32, 0, 2, 3):
        net, x0 = _random_linear(seed, 1 + seed % 2, 2)
        c, exact = _closed_form_radius(net, x0)
        (r,) = run_attacks(net, x0, (method,))
        assert r.success, seed
        assert r.original_class == c
        with torch.no_grad():  # a class change in the model's (float64) arithmetic
            z = net(r.x_adv)[0]
        assert z[1 - c] > z[c]
        assert Fraction(r.radius) ** 2 >= exact_distance_sq(r.x_adv, x0)
        assert exact * (1 - 1e-12) <= r.radius <= exact * (1 + 1e-3), (seed, r.radius / exact)


def _float32_linear(seed: int) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = [(1, 2), (2, 2), (2, 3), (3, 4)][seed % 4]
    net = _linear(torch.randn(n_out, n_in, generator=g).tolist(),
                  torch.randn(n_out, generator=g).tolist(), torch.float32)
    return net, torch.randn(1, n_in, generator=g)


@pytest.mark.parametrize("seed", [2, 6, 13, 17, 27])
def test_certified_radius_never_above_an_attack_radius_on_float32_models(seed: int) -> None:
    # old code: a class change was confirmed in the model's float32 arithmetic only; line
    # searches end within float32 rounding of the boundary, where the network in exact
    # arithmetic (the one certificates are about) keeps its class: gradient ascent, I-FGSM and
    # FGSM reported radii below the exact minimal adversarial distance (by 4e-11 to 2.5e-7
    # relative), and the margin certificate at tol=1e-12 (exact arithmetic, sound) came out
    # larger than the "upper bound" of an attack on these five models. A float32 linear
    # model with at most 3 inputs is computed exactly by float64 (products of 24-bit
    # significands, three terms), so the float64 confirmation decides exactly here.
    from lipbound.radius import certified_radii

    net, x0 = _float32_linear(seed)
    c, _ = _closed_form_radius(net, x0)
    (cert,) = certified_radii(net, x0, methods=["margin"], tol=1e-12, max_evaluations=200)
    for r in run_attacks(net, x0, ("fgsm", "ifgsm", "gradient")):
        assert r.success
        assert r.details["class_change_in_float64"] is True
        z = _exact_logits(net, r.x_adv)
        assert max(z[j] for j in range(len(z)) if j != c) > z[c], r.method
        assert Fraction(r.radius) ** 2 >= exact_distance_sq(r.x_adv, x0)
        assert cert.radius <= r.radius, (r.method, cert.radius, r.radius)


class _Float32Only(nn.Module):
    """Scores ``[1e-9, x * eps(dtype)]``: class 1 from x = 0.0084 in float32 on, from x = 4.5e6
    in float64 -- a class change of the float32 model that float64 does not confirm."""

    def __init__(self, cast: bool = False):
        super().__init__()
        self.register_buffer("one", torch.ones(1))
        self.cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1] * self.one * torch.finfo(x.dtype).eps
        out = torch.cat([torch.full_like(v, 1e-9), v], dim=1)
        return out.float() if self.cast else out  # (scores in float32, whatever the input)


@pytest.mark.parametrize("cast", [False, True])
def test_a_class_change_of_the_model_dtype_only_is_still_reported_and_marked(cast) -> None:
    # the float64 confirmation prefers points it confirms; where there is none (here float64
    # changes the class only 5e8 times farther), the float32 class change is reported as
    # before, marked False; a model whose scores are float32 whatever it is given cannot be
    # checked: None
    model = _Float32Only(cast).eval()
    (r,) = run_attacks(model, torch.zeros(1, 2), ("fgsm",))
    assert r.success and r.adversarial_class == 1
    assert 0.008 < r.radius < 0.009
    assert r.details["class_change_in_float64"] is (None if cast else False)
    (r,) = run_attacks(model.double(), torch.zeros(1, 2, dtype=torch.float64), ("fgsm",))
    assert r.success and r.details["class_change_in_float64"] is (None if cast else True)


def test_float64_confirmation_is_relative_to_the_class_of_x0_as_given() -> None:
    # scores [x, 0.1f] of a float32 model at the float64 x0 = 0.1000000012, just below
    # float32(0.1): the network's class there is 1, but x0 rounds to float32(0.1), a tie
    # that the float32 model calls class 0. The attacks' "class change 0 -> 1" at
    # x = 0.09999999 is no class change of the network from x0 (class 1 at both); the float64
    # confirmation compared the point with the float32 class 0 and said True (old code)
    net = _linear([[1.0], [0.0]], [0.0, 0.1], torch.float32)
    x0 = torch.tensor([[0.1000000012]], dtype=torch.float64)
    assert Fraction(0.1000000012) < Fraction(float(torch.tensor(0.1)))  # exact class 1
    for r in run_attacks(net, x0, ("fgsm", "gradient")):
        assert r.success and (r.original_class, r.adversarial_class) == (0, 1)
        assert r.details["class_change_in_float64"] is False
