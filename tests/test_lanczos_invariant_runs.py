"""Single-vector Lanczos runs whose Krylov space becomes (numerically) invariant (session 23).

A run on a rank-``r`` operator ``A = M^T M`` is invariant after at most ``r + 1`` steps (the
Krylov space of ``q`` lies in ``span(q, range(A))``), so these operators reach the invariant
path of :mod:`lipbound.lanczos` (slack added, restart with a fresh direction, the
Kuczynski-Wozniakowski bound of the full step count; since session 23 also the a posteriori
bound of the steps before the invariant one) by construction. The start vector is the
one the run draws (same generator seed), and the operator is built around it so that the
start's overlap with the top right singular vector is exactly at the a posteriori overlap
floor ``c`` the route uses (``γ₁² = c``: the worst start the probabilistic guarantee allows),
at scales 1e-150 .. 1e150. Every such deterministic case must report a value >= the SVD norm
with no tolerance; a start that misses the top singular vector altogether (``γ₁ = 0``, outside
every event the guarantee rests on) may be reported lower only as PROBABILISTIC.

A start at the floor whose remaining part spans one other singular vector makes the Krylov
space two-dimensional and invariant while the top component is only ``sqrt(c)`` (1e-9 ..
1e-8): the case where a bound read off the invariant space could lose the top eigenvalue if
it ignored the residual."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipbound.lanczos import _start_block, run_lanczos
from lipbound.results import Guarantee
from lipbound.spectral import run_parameters, spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64
FP = 1e-7  # the failure probability given to spectral_upper (its floor uses FP / 2)


def drawn_start(n: int, seed: int) -> np.ndarray:
    """The start vector a single-vector run with ``Generator().manual_seed(seed)`` draws."""
    return _start_block(n, 1, torch.Generator().manual_seed(seed), "cpu")[0].numpy()


def floor_c(n: int, steps: int) -> float:
    c = run_parameters(n, steps, FP, [], 1).post_c
    assert c is not None and 0.0 < c < 1e-12
    return c


def basis_around(q: np.ndarray, gamma: float, rng: np.random.Generator,
                 second_in_start: bool) -> np.ndarray:
    """Orthonormal columns ``V`` with ``<q, V[:, 0]> = gamma`` (up to rounding); with
    ``second_in_start`` the rest of ``q`` lies along ``V[:, 1]`` (so ``q`` is in the span of
    the first two columns)."""
    n = q.size
    p = rng.standard_normal(n)
    p -= q * (q @ p)
    p /= np.linalg.norm(p)
    x1 = gamma * q + math.sqrt(1.0 - gamma * gamma) * p
    cols = [x1]
    if second_in_start:
        v2 = q - gamma * x1
        cols.append(v2 / np.linalg.norm(v2))
    rest = rng.standard_normal((n, n - len(cols)))
    v, _ = np.linalg.qr(np.column_stack(cols + [rest]))
    v[:, 0] *= np.sign(v[:, 0] @ x1)
    return v


def upper(m: torch.Tensor, steps: int, seed: int):
    rows, cols = m.shape
    return spectral_upper(lambda v: v @ m.T, lambda y: y @ m, n_in=cols, n_out=rows,
                          cols=torch.arange(cols), rows=torch.arange(rows), device="cpu",
                          apply_flops=rows * cols, mode="lanczos", steps=steps,
                          failure_prob=FP, generator=torch.Generator().manual_seed(seed))


def svd_norm(m: torch.Tensor, scale: float) -> float:
    """``||M||_2`` for ``M = scale * M0`` computed on ``M0`` (no over- or underflow)."""
    return float(torch.linalg.matrix_norm(m / scale, 2)) * scale


@pytest.mark.parametrize("scale", [1e-150, 1e-20, 1.0, 1e20, 1e150])
@pytest.mark.parametrize("rank", [1, 2, 3, 5])
@pytest.mark.parametrize("steps", [8, 64])
def test_low_rank_start_at_the_floor_is_covered(scale, rank, steps):
    """Rank 1..5 (invariant after <= rank + 1 steps), overlap with the top right singular
    vector exactly at the floor: the reported value is >= the SVD norm."""
    n, seed = 150, 3 + rank
    q = drawn_start(n, seed)
    c = floor_c(n, steps)
    rng = np.random.default_rng(rank)
    v = basis_around(q, math.sqrt(c), rng, second_in_start=False)
    sig = np.zeros(n)
    sig[:rank] = np.linspace(1.0, 0.3, rank)
    m0 = torch.from_numpy((v * sig) @ v.T)  # symmetric, top eigenvector v[:, 0]
    assert float(v[:, 0] @ q) ** 2 == pytest.approx(c, rel=1e-6)
    m = m0 * scale
    true = svd_norm(m, scale)
    res = upper(m, steps, seed)
    assert res.value >= true, (res.value / true, res.method)


@pytest.mark.parametrize("scale", [1e-150, 1.0, 1e150])
@pytest.mark.parametrize("steps", [8, 16, 64])
def test_two_dimensional_invariant_space_with_the_top_at_the_floor(scale, steps):
    """The start lies in the span of the top singular vector (overlap sqrt(c), 1e-9 ..
    1e-8) and one other (singular value 0.5); the other singular values (up to 0.99) are
    orthogonal to it: the Krylov space is invariant after two steps and its top Ritz value is
    the top singular value only through a component at the floor."""
    n, seed = 150, 11
    q = drawn_start(n, seed)
    c = floor_c(n, steps)
    v = basis_around(q, math.sqrt(c), np.random.default_rng(5), second_in_start=True)
    sig = np.concatenate([[1.0, 0.5], np.linspace(0.99, 0.01, n - 2)])
    m = torch.from_numpy((v * sig) @ v.T) * scale
    true = svd_norm(m, scale)
    res = upper(m, steps, seed)
    assert res.value >= true, (res.value / true, res.method)


@pytest.mark.parametrize("steps", [8, 64])
def test_a_start_orthogonal_to_the_top_is_never_certified_below_it(steps):
    """γ₁ = 0 exactly (the failure event of the probabilistic bounds, probability 0): the
    start's Krylov space (two-dimensional, invariant) misses the top singular vector. A value
    below the SVD norm may then be reported only as PROBABILISTIC, never CERTIFIED."""
    n, seed = 150, 2
    q = drawn_start(n, seed)
    v = basis_around(q, 0.0, np.random.default_rng(9), second_in_start=True)
    sig = np.concatenate([[1.0, 0.5], np.linspace(0.9, 0.1, n - 2)])
    m = torch.from_numpy((v * sig) @ v.T)
    true = svd_norm(m, 1.0)
    res = upper(m, steps, seed)
    if res.value < true:
        assert res.guarantee == Guarantee.PROBABILISTIC and res.failure_prob > 0.0


@pytest.mark.parametrize("steps", [4, 8, 12, 16])
def test_an_invariant_run_keeps_the_bound_of_its_last_steps(steps):
    """The review's case: a 30 x 20 operator with column scales 1e-20 .. 1e20, invariant
    (to 1e-9 of the scale) at step 4. A 4-step run reports its a posteriori bound (1 + 9e-7
    times the norm); longer runs had none (the invariant step disabled it before any bound
    was formed) and reported Kuczynski-Wozniakowski alone: infinity at 8 steps, 2.25x at 12,
    1.31x at 16. They now keep the bound of the steps before the invariant one."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(30, 20, generator=g, dtype=DT) * torch.logspace(-20, 20, 20, dtype=DT)
    true = float(torch.linalg.matrix_norm(m, 2))
    res = upper(m, steps, 0)
    assert res.guarantee == Guarantee.PROBABILISTIC
    assert true <= res.value <= true * (1 + 1e-5)


@pytest.mark.parametrize("scale", [1e-150, 1.0, 1e150])
@pytest.mark.parametrize("rank", [4, 6, 8, 12])
@pytest.mark.parametrize("decay", ["linear", "geometric"])
def test_bound_before_the_invariant_step_holds_at_the_floor(scale, rank, decay):
    """Rank 4..12 (invariant after at most rank + 1 of the 64 steps), start at the overlap
    floor: the a posteriori bound of the steps before the invariant one is reported and is
    >= the SVD norm (no tolerance). With linearly spaced singular values it is within 1e-3 of
    the norm (1.3 % above it, the Kuczynski-Wozniakowski factor, before session 23)."""
    n, seed, steps = 150, 20 + rank, 64
    q = drawn_start(n, seed)
    c = floor_c(n, steps)
    v = basis_around(q, math.sqrt(c), np.random.default_rng(rank), second_in_start=False)
    sig = np.zeros(n)
    sig[:rank] = (np.linspace(1.0, 0.5, rank) if decay == "linear"
                  else np.geomspace(1.0, 0.05, rank))
    m = torch.from_numpy((v * sig) @ v.T) * scale
    true = svd_norm(m, scale)
    res = upper(m, steps, seed)
    assert res.value >= true, (res.value / true, res.method)
    if decay == "linear":
        assert res.value <= true * (1 + 1e-3), res.value / true
    # the engine's own a posteriori bound (no stopping rule): finite and above the norm
    run = run_lanczos(lambda x: x @ m.T, lambda y: y @ m, n, steps,
                      torch.Generator().manual_seed(seed), "cpu", post_c=c)
    assert run.dim < n
    assert math.isfinite(run.post_sqrt) and run.post_sqrt >= true


@pytest.mark.parametrize("rank", [1, 3])
def test_run_level_ritz_value_plus_slack_reaches_the_top(rank):
    """At the engine level (run_lanczos, start at the floor, rank <= 3, 64 steps): the
    reported θ (top Ritz value plus the residual slack) is >= the top eigenvalue up to the
    float64 rounding the route's SAFETY margin covers (1e-9 relative), and the run does
    not end in a full span (so the probabilistic route, not 'lanczos-full', reports it)."""
    n, seed, steps = 150, 7, 64
    q = drawn_start(n, seed)
    c = floor_c(n, steps)
    v = basis_around(q, math.sqrt(c), np.random.default_rng(rank), second_in_start=False)
    sig = np.zeros(n)
    sig[:rank] = np.linspace(2.0, 1.0, rank)
    m = torch.from_numpy((v * sig) @ v.T)
    res = run_lanczos(lambda x: x @ m.T, lambda y: y @ m, n, steps,
                      torch.Generator().manual_seed(seed), "cpu")
    assert res.dim < n
    assert res.sqrt_theta * (1 + 1e-9) >= svd_norm(m, 1.0)
