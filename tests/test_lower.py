"""Tests of lipbound.lower: ball sampler, lower bounds and Jacobian norms.

References used: closed forms (linear maps), exact suprema of 1-D piecewise-linear
networks, dense grids and a sound activation-pattern upper bound in 2-D, the product of
spectral norms (hypothesis, random float64 networks) and the real MNIST LeNet.
Tolerances are one-sided: a lower bound may only ever fall short of a reference.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from lipbound.errors import InputError
from lipbound.lower import (
    LowerBoundResult,
    best_lower_bound,
    gradient_lower_bound,
    jacobian_matrix,
    jacobian_norm_at,
    jacobian_spectrum,
    pgd_lower_bound,
    random_lower_bound,
    ratio_at,
    sample_ball,
)
from lipbound.results import Guarantee

SAFE = 1 + 1e-9  # rounding allowance for "lower bound <= exact/upper value"

# small budgets keep the file fast; the defaults are exercised on LeNet
FAST = {"n_random": 256, "gradient_steps": 30, "pgd_restarts": 8, "pgd_steps": 30,
        "pgd_refine": 2, "pgd_refine_steps": 30}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: intra-op threads only add synchronisation cost (badly so on a shared,
    oversubscribed CPU). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()))


def mlp(sizes: list[int], seed: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Linear-ReLU chain with seeded weights (no ReLU after the last layer)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=dtype))
            lin.bias.copy_(torch.randn(b, generator=g, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def check_result(r: LowerBoundResult, model: nn.Module, x0: torch.Tensor, eps: float,
                 output_map: torch.Tensor | None = None) -> None:
    """Witness strictly inside the ball and the value recomputes from it (never above the
    recomputed ratio: the value is lowered by its rounding allowance)."""
    assert r.guarantee is Guarantee.LOWER
    assert r.witness.shape == x0.shape
    d = dist(r.witness, x0)
    assert 0 < d <= eps
    assert math.isclose(r.details["witness_distance"], d, rel_tol=1e-12)
    again = ratio_at(model, x0, r.witness, output_map=output_map)
    assert r.value <= again
    assert r.value >= again * (1 - 1e-9)
    json.dumps(r.to_dict())


# ---------------------------------------------------------------- ball sampler


@pytest.mark.parametrize("d", [2, 5, 50])
def test_sample_ball_radius_distribution(d: int) -> None:
    x0 = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    eps, n = 0.7, 5000
    pts = sample_ball(x0, eps, n, generator=torch.Generator().manual_seed(1))
    assert pts.shape == (n, d) and pts.dtype == torch.float64
    r = torch.linalg.vector_norm(pts - x0, dim=1)
    assert bool((r <= eps).all())
    # P(r <= eps q) = q^d  <=>  (r / eps)^d ~ Uniform(0, 1)
    u = ((r / eps) ** d).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # a wrong radius law is caught: r ~ eps * U (uniform radius) fails the same test
    wrong = np.random.default_rng(0).uniform(size=n) ** d
    assert stats.kstest(wrong, "uniform").pvalue < 1e-6


@pytest.mark.parametrize("d", [2, 5, 50])
def test_sample_ball_directions_isotropic(d: int) -> None:
    n = 20000
    x0 = torch.full((1, d), 3.0, dtype=torch.float64)
    pts = sample_ball(x0, 2.0, n, generator=torch.Generator().manual_seed(2))
    u = pts - x0
    u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
    # each coordinate of a uniform unit vector has mean 0 and variance 1/d
    se = 1.0 / math.sqrt(n * d)
    assert float(u.mean(0).abs().max()) < 5 * se
    cov = (u.T @ u) / n
    # entries of u u^T have standard deviation <= 1/d; allow 6 standard errors
    err = float((cov - torch.eye(d, dtype=torch.float64) / d).abs().max())
    assert err < 6.0 / (d * math.sqrt(n)) * math.sqrt(2.0)


def test_sample_ball_inside_for_float32_images() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = 2.8 * torch.rand(1, 1, 28, 28, generator=g)
    for eps in (1e-3, 0.1, 7.0):
        pts = sample_ball(x0, eps, 3000, generator=g)
        assert pts.shape == (3000, 1, 28, 28) and pts.dtype == torch.float32
        r = torch.linalg.vector_norm((pts.double() - x0.double()).reshape(3000, -1), dim=1)
        assert bool((r <= eps).all())
        assert float(r.min()) > 0.5 * eps  # d = 784: the mass sits at the surface


def test_sample_ball_bad_input() -> None:
    with pytest.raises(InputError):
        sample_ball(torch.zeros(3), 1.0, 5)
    with pytest.raises(InputError):
        sample_ball(torch.zeros(1, 3), 0.0, 5)
    with pytest.raises(InputError):
        sample_ball(torch.zeros(1, 3), 1.0, 0)


# ---------------------------------------------------------------- closed forms


def linear_model(seed: int, m: int = 7, d: int = 20, top: float = 3.7) -> tuple[nn.Module, float]:
    """A float64 affine map whose matrix has spectral norm exactly ``top`` (by construction)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    s = torch.linspace(top, 0.3, m, dtype=torch.float64)
    lin = nn.Linear(d, m).double().eval()
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(s) @ v.T)
        lin.bias.copy_(torch.randn(m, generator=g, dtype=torch.float64))
    return lin, top


@pytest.mark.parametrize("eps", [1e-3, 1.0, 50.0])
def test_linear_map_reaches_spectral_norm(eps: float) -> None:
    model, norm = linear_model(0)
    x0 = torch.randn(1, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert math.isclose(jacobian_norm_at(model, x0), norm, rel_tol=1e-12)
    for r in (pgd_lower_bound(model, x0, eps), best_lower_bound(model, x0, eps, **FAST)):
        check_result(r, model, x0, eps)
        assert r.value <= norm * SAFE
        assert r.value >= norm * (1 - 1e-3)
    for r in (random_lower_bound(model, x0, eps, n_samples=2000),
              gradient_lower_bound(model, x0, eps)):
        check_result(r, model, x0, eps)
        assert r.value <= norm * SAFE


def test_linear_map_with_output_map() -> None:
    model, _ = linear_model(1)
    c = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    norm = float(torch.linalg.matrix_norm(c @ model.weight.detach(), ord=2))
    x0 = torch.zeros(1, 20, dtype=torch.float64)
    assert math.isclose(jacobian_norm_at(model, x0, output_map=c), norm, rel_tol=1e-12)
    r = best_lower_bound(model, x0, 0.5, output_map=c, **FAST)
    check_result(r, model, x0, 0.5, output_map=c)
    assert norm * (1 - 1e-3) <= r.value <= norm * SAFE


# ---------------------------------------------------------------- brute force, tiny inputs


def one_hidden(d: int, seed: int, hidden: int = 8, m: int = 3) -> nn.Sequential:
    return mlp([d, hidden, m], seed)


def exact_sup_1d(model: nn.Sequential, x0: float, eps: float) -> float:
    """Exact sup of |f(x0+t)-f(x0)| / |t| over 0 < |t| <= eps for a one-hidden-layer net.

    On each linear piece f(x0+t)-f(x0) = a + s t, and ||a/t + s|| is convex in 1/t, so the
    sup over a piece is at its ends; on the pieces touching t = 0, a = 0 and the ratio is
    constant. Candidates: t = +-eps, every kink inside the ball, and the midpoint of the
    first piece on each side.
    """
    w = model[0].weight.detach()[:, 0]
    b = model[0].bias.detach()
    kinks = [float(t) for t in (-(w * x0 + b) / w).tolist() if 0 < abs(t) <= eps]
    ts = [eps, -eps] + kinks
    for sign in (1.0, -1.0):
        near = [abs(t) for t in kinks if t * sign > 0]
        ts.append(sign * min(near + [eps]) / 2)
    xs = torch.tensor([[x0]], dtype=torch.float64)
    return max(ratio_at(model, xs, xs + t) for t in ts)


@pytest.mark.parametrize("seed", range(4))
def test_one_hidden_relu_1d_against_exact_sup(seed: int) -> None:
    model = one_hidden(1, seed)
    x0v, eps = 0.3 * seed - 0.4, 1.5
    x0 = torch.tensor([[x0v]], dtype=torch.float64)
    exact = exact_sup_1d(model, x0v, eps)
    k = torch.arange(-20000, 20001, dtype=torch.float64)
    pts = x0 + (eps * k[k != 0] / 20000)[:, None]
    with torch.no_grad():
        grid = float((torch.linalg.vector_norm(model(pts) - model(x0), dim=1)
                      / (pts - x0).abs()[:, 0]).max())
    assert grid <= exact * SAFE  # the reference itself is consistent
    r = best_lower_bound(model, x0, eps, **FAST)
    check_result(r, model, x0, eps)
    assert r.value >= 0.98 * grid
    assert r.value <= exact * SAFE


def pattern_upper_bound(model: nn.Sequential, x0: torch.Tensor, eps: float) -> float:
    """Sound upper bound on L(x0, eps) for one hidden layer: max over every activation
    pattern that may occur in the ball of ||W2 diag(p) W1|| (the ratio is an average of
    Jacobians along the segment from x0)."""
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    w2 = model[2].weight.detach()
    pre = (w1 @ x0[0] + b1)
    reach = eps * torch.linalg.vector_norm(w1, dim=1)
    fixed_on = pre - reach > 0
    free = ((pre - reach <= 0) & (pre + reach >= 0)).nonzero().flatten().tolist()
    best = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=len(free)):
        p = fixed_on.to(torch.float64)
        p[free] = torch.tensor(bits, dtype=torch.float64)
        best = max(best, float(torch.linalg.matrix_norm(w2 @ torch.diag(p) @ w1, ord=2)))
    return best


@pytest.mark.parametrize("seed", range(3))
def test_one_hidden_relu_2d_against_grid(seed: int) -> None:
    model = one_hidden(2, seed, hidden=6)
    x0 = torch.tensor([[0.2, -0.1]], dtype=torch.float64)
    eps = 1.0
    # dense polar grid (radii denser near x0, where the ratio may peak)
    theta = torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64)[:-1]
    rad = eps * torch.logspace(-4, 0, 300, dtype=torch.float64)
    pts = x0 + (rad[:, None, None] * torch.stack([theta.cos(), theta.sin()], 1)).reshape(-1, 2)
    with torch.no_grad():
        diff = torch.linalg.vector_norm(model(pts) - model(x0), dim=1)
    grid = float((diff / torch.linalg.vector_norm(pts - x0, dim=1)).max())
    upper = pattern_upper_bound(model, x0, eps)
    assert grid <= upper * SAFE
    r = best_lower_bound(model, x0, eps, **FAST)
    check_result(r, model, x0, eps)
    assert r.value >= 0.98 * grid
    assert r.value <= upper * SAFE


# ---------------------------------------------------------------- properties, random nets


def spectral_product(model: nn.Sequential) -> float:
    out = 1.0
    for layer in model:
        if isinstance(layer, nn.Linear):
            out *= float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
    eps=st.floats(1e-3, 10.0),
)
def test_random_nets_below_trivial_upper_bound(sizes: list[int], seed: int, eps: float) -> None:
    model = mlp(sizes, seed)
    x0 = torch.randn(1, sizes[0], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(seed + 1))
    upper = spectral_product(model)
    r = best_lower_bound(model, x0, eps, seed=seed, **FAST)
    check_result(r, model, x0, eps)
    assert r.value <= upper * SAFE
    assert r.value >= max(r.details["values"].values())
    # x0 is (almost surely) inside a linear region, where the ratios along the top
    # singular vector converge to the Jacobian norm
    assert r.value >= jacobian_norm_at(model, x0) * (1 - 1e-6)


@pytest.mark.parametrize("method", ["random", "gradient", "pgd", "best"])
def test_float32_conv_net_witness_and_recompute(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 5),
    ).eval()
    x0 = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    c = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
    fns = {
        "random": lambda e: random_lower_bound(model, x0, e, n_samples=500, output_map=c),
        "gradient": lambda e: gradient_lower_bound(model, x0, e, n_steps=20, output_map=c),
        "pgd": lambda e: pgd_lower_bound(model, x0, e, n_steps=20, output_map=c),
        "best": lambda e: best_lower_bound(model, x0, e, output_map=c, **FAST),
    }
    for eps in (1e-3, 0.5, 10.0):
        r = fns[method](eps)
        assert r.method == method
        check_result(r, model, x0, eps, output_map=c)


def strip_seconds(d: dict) -> dict:
    return {k: strip_seconds(v) if isinstance(v, dict) else v
            for k, v in d.items() if k != "seconds"}


def test_determinism_with_seed() -> None:
    model = mlp([4, 10, 10, 3], 7)
    x0 = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for fn in (
        lambda s: random_lower_bound(model, x0, 0.5, n_samples=1000, seed=s),
        lambda s: gradient_lower_bound(model, x0, 0.5, n_steps=20, seed=s),
        lambda s: pgd_lower_bound(model, x0, 0.5, n_steps=20, seed=s),
        lambda s: best_lower_bound(model, x0, 0.5, seed=s, **FAST),
    ):
        a, b = fn(3), fn(3)
        assert a.value == b.value
        assert torch.equal(a.witness, b.witness)
        assert strip_seconds(a.details) == strip_seconds(b.details)
        if a.method in ("random", "gradient"):  # the seed matters
            assert not torch.equal(a.witness, fn(4).witness)


def test_best_reports_winner() -> None:
    model = mlp([3, 8, 2], 11)
    x0 = torch.zeros(1, 3, dtype=torch.float64)
    r = best_lower_bound(model, x0, 0.3, **FAST)
    vals = r.details["values"]
    assert set(vals) == {"random", "gradient", "pgd"}
    assert r.value == vals[r.details["winner"]] == max(vals.values())


# ---------------------------------------------------------------- Jacobian norm


def test_jacobian_norm_exact_and_power_iteration() -> None:
    model = mlp([12, 20, 20, 6], 3)
    x0 = torch.randn(1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = jacobian_matrix(model, x0)
    # independent reference: finite differences (exact for a piecewise-linear net away
    # from kinks, up to rounding)
    h = 1e-7
    fd = torch.stack([(model(x0 + h * e[None]) - model(x0 - h * e[None]))[0] / (2 * h)
                      for e in torch.eye(12, dtype=torch.float64)], 1).detach()
    assert torch.allclose(jac, fd, rtol=1e-6, atol=1e-6)
    exact = jacobian_spectrum(model, x0)
    assert exact.guarantee is Guarantee.ESTIMATE and exact.method == "svd"
    assert math.isclose(exact.value, float(torch.linalg.matrix_norm(fd, ord=2)), rel_tol=1e-5)
    est = jacobian_spectrum(model, x0, exact_threshold=0, n_iter=500, tol=1e-12)
    assert est.guarantee is Guarantee.ESTIMATE and est.method == "power-iteration"
    assert est.value <= exact.value * SAFE  # power iteration approaches from below
    assert est.value >= exact.value * (1 - 1e-6)
    assert math.isclose(jacobian_norm_at(model, x0, exact_threshold=0), est.value,
                        rel_tol=1e-3)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors() -> None:
    model = mlp([3, 4, 2], 0)
    x0 = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="eps"):
        pgd_lower_bound(model, x0, -1.0)
    with pytest.raises(InputError, match="eps"):
        random_lower_bound(model, x0, float("nan"))
    with pytest.raises(InputError, match="batch dimension"):
        gradient_lower_bound(model, torch.zeros(3, dtype=torch.float64), 1.0)
    with pytest.raises(InputError, match="NaN"):
        pgd_lower_bound(model, torch.full((1, 3), float("nan"), dtype=torch.float64), 1.0)
    with pytest.raises(InputError, match="output_map"):
        best_lower_bound(model, x0, 1.0, output_map=torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(InputError, match="n_samples"):
        random_lower_bound(model, x0, 1.0, n_samples=0)
    with pytest.raises(InputError, match="x equals x0"):
        ratio_at(model, x0, x0.clone())
    model.train()
    with pytest.raises(InputError, match="eval"):
        pgd_lower_bound(model, x0, 1.0)


# ---------------------------------------------------------------- the real MNIST LeNet


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(256, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def _mnist_dir() -> Path | None:
    for p in (Path(__file__).resolve().parents[1] / "src/lipbound/zoo/data/mnist",):
        if (p / "lenet_ckpt_99.ckpt").exists() and (p / "8.png").exists():
            return p
    return None


@pytest.fixture(scope="module")
def lenet() -> tuple[nn.Module, torch.Tensor]:
    from PIL import Image

    root = _mnist_dir()
    if root is None:
        pytest.skip("MNIST LeNet weights not found")
    net = LeNet()
    net.load_state_dict(torch.load(root / "lenet_ckpt_99.ckpt", map_location="cpu")["net"])
    net.eval()
    img = np.asarray(Image.open(root / "8.png"), dtype=np.float32) / 255.0
    x0 = ((torch.from_numpy(img) - 0.1307) / 0.3081).reshape(1, 1, 28, 28)
    assert int(net(x0).argmax()) == 8
    return net, x0


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_lenet_pgd_beats_baselines(lenet: tuple[nn.Module, torch.Tensor], eps: float) -> None:
    net, x0 = lenet
    rnd = random_lower_bound(net, x0, eps, n_samples=10_000)
    grad = gradient_lower_bound(net, x0, eps)
    pgd = pgd_lower_bound(net, x0, eps)
    best = best_lower_bound(net, x0, eps)
    for r in (rnd, grad, pgd, best):
        check_result(r, net, x0, eps)
    assert pgd.value >= rnd.value and pgd.value >= grad.value
    assert best.value >= rnd.value and best.value >= grad.value
