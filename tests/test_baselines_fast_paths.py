"""The rival methods' cheaper computations give what the plain formulas give.

ECLipsE-Fast (Cholesky inverse, sparse products, the first layer's smaller Gram matrix) is
compared with the recursion written out with dense inverses; Fast-Lip / RecurJac with CSR
operands (forced on every layer here) with the dense products, and their enclosures with
sampled pre-activations and Jacobians. AutoLip on a converted conv net (sparse max-pool
levels, split into blocks) is compared with the product of float64 SVDs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lipbound.baselines import autolip, eclipse_fast, fastlip, fc, recurjac
from lipbound.baselines.eclipse import eclipse_fast_multipliers
from lipbound.baselines.fc import fc_layers, fc_preactivations, pattern_jacobian
from lipbound.baselines.recurjac import jacobian_bounds, preactivation_bounds


def random_layers(seed: int, dims: list[int], density: float = 1.0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(dims) - 1):
        w = rng.normal(size=(dims[i + 1], dims[i])) / math.sqrt(dims[i])
        w[rng.random(w.shape) > density] = 0.0
        w[np.arange(dims[i + 1]), np.arange(dims[i + 1]) % dims[i]] += 1.0  # no zero row
        out.append((w, 0.3 * rng.normal(size=dims[i + 1])))
    return out


def reference_eclipse(layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[float]]:
    """The ECLipsE-Fast recursion as written in the paper: dense products and inverses."""
    x_inv = np.eye(layers[0][0].shape[1])
    lams = []
    for w, _ in layers[:-1]:
        g = w @ x_inv @ w.T
        mu = float(np.linalg.eigvalsh(0.5 * (g + g.T))[-1])
        lam = 1.0 / mu
        lams.append(lam)
        x_inv = np.linalg.inv(2.0 * lam * np.eye(w.shape[0]) - lam * lam * g)
        x_inv = 0.5 * (x_inv + x_inv.T)
    g = layers[-1][0] @ x_inv @ layers[-1][0].T
    return float(np.linalg.eigvalsh(0.5 * (g + g.T))[-1]), lams


@pytest.fixture(params=["dense", "sparse"])
def operands(request, monkeypatch):
    """Run with every weight matrix a CSR operand ("sparse") or none ("dense")."""
    if request.param == "sparse":
        monkeypatch.setattr(fc, "SPARSE_MIN_ENTRIES", 0)
        monkeypatch.setattr(fc, "SPARSE_MAX_DENSITY", 1.0)
    else:
        monkeypatch.setattr(fc, "SPARSE_MAX_DENSITY", -1.0)
    return request.param


@pytest.mark.parametrize("dims", [[3, 9, 5, 2], [6, 4, 4, 3], [2, 30, 12, 30, 4], [5, 5]])
@pytest.mark.parametrize("density", [1.0, 0.2])
def test_eclipse_matches_the_plain_recursion(operands, dims, density):
    for seed in range(3):
        layers = random_layers(seed, dims, density)
        rho, lams = eclipse_fast_multipliers(layers)
        if len(dims) == 2:
            assert lams == []
            want = float(np.linalg.svd(layers[0][0], compute_uv=False)[0]) ** 2
            assert math.isclose(rho, want, rel_tol=1e-12)
            continue
        ref_rho, ref_lams = reference_eclipse(layers)
        assert math.isclose(rho, ref_rho, rel_tol=1e-10)
        assert np.allclose(lams, ref_lams, rtol=1e-10, atol=0)
        # and the checked value (the float64 LMI check) stays below AutoLip (a theorem)
        res = eclipse_fast(layers)
        assert res.guarantee.is_upper_bound
        assert res.value <= autolip(layers).value * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_interval_bounds_with_sparse_operands_contain_samples(operands, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(seed, [4, 12, 10, 3], density=0.4)
    x0 = rng.normal(size=4)
    for eps in (0.05, 0.5):
        bounds = preactivation_bounds(layers, x0, eps)
        d = rng.normal(size=(1500, 4))
        xs = x0 + eps * rng.random((1500, 1)) ** 0.25 * d / np.linalg.norm(d, axis=1,
                                                                            keepdims=True)
        zs = fc_preactivations(layers, xs)
        for (lo, hi), z in zip(bounds, zs, strict=True):
            assert np.all(z >= lo) and np.all(z <= hi)
        for direction in ("forward", "backward", "both"):
            jl, ju = jacobian_bounds(layers, x0, eps, direction)
            for i in range(0, 1500, 50):
                pattern = [(z[i] > 0).astype(np.float64) for z in zs]
                j = pattern_jacobian(layers, pattern)
                assert np.all(j >= jl) and np.all(j <= ju)


def test_sparse_and_dense_operands_give_the_same_local_values(monkeypatch):
    layers = random_layers(7, [5, 40, 30, 20, 3], density=0.1)
    x0 = np.random.default_rng(7).normal(size=5)
    monkeypatch.setattr(fc, "SPARSE_MAX_DENSITY", -1.0)
    dense = [fastlip(layers, x0, 0.3).value, recurjac(layers, x0, 0.3).value,
             eclipse_fast(layers).value]
    monkeypatch.setattr(fc, "SPARSE_MIN_ENTRIES", 0)
    monkeypatch.setattr(fc, "SPARSE_MAX_DENSITY", 1.0)
    sparse = [fastlip(layers, x0, 0.3).value, recurjac(layers, x0, 0.3).value,
              eclipse_fast(layers).value]
    # the same enclosures up to the order of summation (1e-15), far inside the margins
    assert np.allclose(dense, sparse, rtol=1e-12, atol=0)
    assert sparse[1] <= sparse[0]  # RecurJac intersects Fast-Lip's enclosure


def test_autolip_on_a_converted_conv_net_matches_float64_svds():
    # conv -> relu -> 2x2 max-pool -> linear: the pool levels are sparse (blocks of a few
    # entries), the conv layer dense enough to stay whole
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3 * 5 * 5, 4)).to(torch.float64).eval()
    layers = fc_layers(net, input_shape=(1, 12, 12))
    sparse_layers = [w for w, _ in layers if fc._diagonal_blocks(w) is not None]
    assert sparse_layers  # the max-pool levels are split
    want = math.prod(float(np.linalg.svd(w, compute_uv=False)[0]) for w, _ in layers)
    got = autolip(layers).value
    # each norm: margin 1e-9 plus the Gram and eigensolver terms (~1e-12 here)
    assert want * (1 - 1e-13) <= got <= want * (1 + 1.01e-9) ** len(layers)
