"""Adversarial review (session 21) of the lower bounds, the attacks and the sweep.

Each test failed on the code before its fix.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipbound.attacks import ATTACKS, run_attacks
from lipbound.errors import InputError
from lipbound.lower import (
    best_lower_bound,
    gradient_lower_bound,
    jacobian_spectrum,
    pgd_lower_bound,
    random_lower_bound,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _mlp(n_in: int = 3, n_out: int = 3, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # (zero-element layers warn on initialisation)
        warnings.simplefilter("ignore")
        net = nn.Sequential(nn.Linear(n_in, 5), nn.ReLU(), nn.Linear(5, n_out))
    return net.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(ATTACKS))
def test_attacks_on_half_precision_models(method: str, dtype: torch.dtype) -> None:
    # old code: PGD's radius update multiplied by a float32 tensor (torch.where of two Python
    # numbers), its iterates became float32 and the half-precision model raised a raw
    # "mat1 and mat2 must have the same dtype" from inside torch
    model = _mlp(dtype=dtype)
    (r,) = run_attacks(model, torch.ones(1, 3), (method,))
    assert r.success
    assert r.x_adv.dtype == dtype
    with torch.no_grad():
        z = model(r.x_adv)[0]
    assert bool((z > z[r.original_class]).any())
    assert r.radius >= float((r.x_adv.double() - 1.0).norm())


_LOWER = {
    "random": lambda m, x, **k: random_lower_bound(m, x, 0.1, n_samples=16, progress=False, **k),
    "gradient": lambda m, x, **k: gradient_lower_bound(m, x, 0.1, n_steps=3, **k),
    "pgd": lambda m, x, **k: pgd_lower_bound(m, x, 0.1, n_restarts=2, n_steps=2, **k),
    "best": lambda m, x, **k: best_lower_bound(m, x, 0.1, n_random=16, gradient_steps=3,
                                               pgd_restarts=2, pgd_steps=2, **k),
    "jacobian": lambda m, x, **k: jacobian_spectrum(m, x, **k),
}


@pytest.mark.parametrize("method", sorted(_LOWER))
def test_lower_bounds_refuse_zero_sized_problems(method: str) -> None:
    # old code: an input with no coordinates, a model with no outputs or an output map
    # with no rows ended in raw IndexError / RuntimeError from torch.amax or torch.stack
    fn = _LOWER[method]
    with pytest.raises(InputError, match="input .*no coordinates"):
        fn(_mlp(n_in=0), torch.ones(1, 0))
    with pytest.raises(InputError, match="no outputs"):
        fn(_mlp(n_out=0), torch.ones(1, 3))
    with pytest.raises(InputError, match="no rows"):
        fn(_mlp(), torch.ones(1, 3), output_map=torch.zeros(0, 3))


def test_attacks_refuse_an_input_without_coordinates() -> None:
    # old code: IndexError from torch.amax inside AttackContext.normalize
    with pytest.raises(InputError, match="no coordinates"):
        run_attacks(_mlp(n_in=0), torch.ones(1, 0), ("fgsm",))


def test_sweep_plot_of_a_network_whose_bounds_are_all_zero(tmp_path) -> None:
    # old code: every curve 0 (a network whose last layer is zero) left the log axes empty
    # and SweepResult.plot raised matplotlib's raw "Data cannot be log-scaled" ValueError
    # (so `lipbound sweep` crashed after the computation, with no figure)
    from lipbound.sweep import sweep

    model = _mlp(dtype=torch.float64)
    with torch.no_grad():
        model[2].weight.zero_()
    x0 = torch.ones(1, 3, dtype=torch.float64)
    res = sweep(model, x0, [0.1, 1.0], "local,global,pgd", steps=2, restarts=1)
    assert all(v == 0.0 for m in res.methods for v in res.values(m))
    paths = res.plot(tmp_path / "s.png", tmp_path / "s.pdf")
    assert [p.name for p in paths] == ["s.png", "s.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)


def _exact_dist_sq(a: torch.Tensor, b: torch.Tensor) -> Fraction:
    return sum((Fraction(u) - Fraction(v)) ** 2 for u, v in
               zip(a.double().flatten().tolist(), b.double().flatten().tolist(), strict=True))


def test_sample_ball_never_returns_points_that_are_not_finite() -> None:
    # old code: x0 + r u overflowed the dtype (an eps beyond its range, or a centre near
    # its top), the points were NaN / inf, and place_in_ball kept them as "inside" (a NaN
    # distance compares False with the radius): sample_ball returned NaN rows
    from lipbound.lower import sample_ball
    from lipbound.lower._common import place_in_ball

    g = torch.Generator().manual_seed(0)
    with pytest.raises(InputError, match="beyond the range"):
        sample_ball(torch.zeros(1, 3), 1e300, 4, generator=g)
    with pytest.raises(InputError, match="beyond the range"):
        sample_ball(torch.zeros(1, 3, dtype=torch.float16), 1e6, 4, generator=g)
    x0 = torch.full((1, 3), 6e4, dtype=torch.float16)  # (float16's largest is 65504)
    pts = sample_ball(x0, 2e4, 64, generator=g)
    assert bool(torch.isfinite(pts).all())
    assert all(_exact_dist_sq(p, x0) <= Fraction(2e4) ** 2 for p in pts)
    rows = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [0.5, 0.5]])
    out = place_in_ball(torch.zeros(1, 2), rows, 1.0)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[2], rows[2])


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_value_below_ratio_at_for_a_float64_centre_of_a_float32_model(eps: float) -> None:
    # the lower bounds search the ball around a float64 x0 that float32 cannot represent
    # (on a float64 copy of the model); old ratio_at rounded x0 and the witness to float32
    # and re-evaluated a different pair of points: its ratio was below the reported value
    # (0.305836 < 0.305957 at eps=1e-6), against LowerBoundResult's ``value <= ratio_at``
    from lipbound.lower import ratio_at

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    net64 = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    x0 = torch.tensor([[1.0 + 1e-9, 0.3 + 1e-10, -0.7]], dtype=torch.float64)
    for fn in (pgd_lower_bound, random_lower_bound):
        r = fn(net, x0, eps, **({"n_samples": 256} if fn is random_lower_bound else {}))
        assert r.witness.dtype == torch.float64
        assert _exact_dist_sq(r.witness, x0) <= Fraction(eps) ** 2
        ra = ratio_at(net, x0, r.witness)
        assert r.value <= ra
        assert ra == ratio_at(net64, x0, r.witness)


@pytest.mark.parametrize("lo", [torch.full((2, 3), -5.0), torch.full((3, 1, 3), -5.0)])
def test_attack_bounds_that_would_enlarge_x0_are_refused(lo: torch.Tensor) -> None:
    # old code: a box of shape (2, 3) or (3, 1, 3) passed the broadcast check against x0's
    # (1, 3) (the shapes broadcast to each other) and the attacks failed inside with a raw
    # RuntimeError (a size mismatch, or "Boolean value of Tensor ... is ambiguous")
    with pytest.raises(InputError, match="must broadcast to x0's shape"):
        run_attacks(_mlp(), torch.ones(1, 3), ("fgsm",), bounds=(lo, 5.0))


def test_sweep_plot_draws_radii_given_out_of_order_in_increasing_eps(tmp_path,
                                                                      monkeypatch) -> None:
    # old code: the curves joined the points in the order the radii were given, so
    # eps_values=[1, 0.01, 0.1] drew every curve back and forth (1 -> 0.01 -> 0.1)
    from lipbound import plotting

    figs = []
    real = plotting.save_figure
    monkeypatch.setattr(plotting, "save_figure",
                        lambda fig, *a, **k: figs.append(fig) or real(fig, *a, **k))
    plotting.plot_sweep([1.0, 0.01, 0.1], {"local": [3.0, 1.0, 2.0], "pgd": [2.0, 0.5, 1.0]},
                        path_png=tmp_path / "s.png", upper=["local"])
    (ax,) = figs[0].axes
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert len(lines) == 2
    for ln in lines:
        xs, ys = list(ln.get_xdata()), list(ln.get_ydata())
        assert xs == [0.01, 0.1, 1.0]
        assert ys == sorted(ys)


def test_lower_bound_below_the_exact_constant_at_a_tiny_radius() -> None:
    # old code: the rounding allowance 4u (||C|| ||f(x0)|| + lip ||x0||) missed the
    # cancellation inside the last layer (terms of size 2.8 summing to f(x0) = -0.148): the
    # value exceeded the exact constant by 2e-8 relative, and a sweep flagged it above the
    # tight certified upper bound (SOUNDNESS CHECK FAILED).
    # Linear(1, 3) -> ReLU -> Linear(3, 1) in float64; the pre-activations at x0 are 0.945,
    # -1.67 and 0.163, so f is linear in the ball and its local constant is exactly the
    # slope |W2_0 W1_0 + W2_2 W1_2| (computed with fractions)
    w1 = [-0.5712031424816622, 0.5585060040726593, 0.1697697106458229]
    b1 = [0.7222825899511321, -1.4560043879560798, 0.2292768220081661]
    w2 = [-1.4776595811528261, -1.1464786804725755, -0.5730662629451587]
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w1, dtype=torch.float64).reshape(3, 1))
        net[0].bias.copy_(torch.tensor(b1, dtype=torch.float64))
        net[2].weight.copy_(torch.tensor([w2], dtype=torch.float64))
        net[2].bias.fill_(1.3416633518130154)
    x0 = torch.tensor([[-0.39001517325568946]], dtype=torch.float64)
    exact = abs(Fraction(w2[0]) * Fraction(w1[0]) + Fraction(w2[2]) * Fraction(w1[2]))
    r = random_lower_bound(net, x0, 1e-8, n_samples=300, progress=False)
    assert Fraction(r.value) <= exact
    assert Fraction(pgd_lower_bound(net, x0, 1e-7).value) <= exact
    from lipbound.sweep import sweep

    res = sweep(net, x0, [1e-8, 1e-7], "tight,random,pgd", samples=300)
    assert res.violations() == []
    assert all(Fraction(v) <= exact for m in ("random", "pgd") for v in res.values(m))
