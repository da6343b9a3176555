"""Tests of the Lanczos route of lipbound.spectral against exact SVDs: the memory-lean Lanczos
(H read off the Gram-Schmidt coefficients), the run on the smaller side (M M^T), the early
exit against certified alternatives, rank-deficient / invariant Krylov spaces and warm starts.

Every comparison is in the safe direction: reported upper bounds >= the true norm, Ritz
values <= the true norm^2 up to rounding (1e-10 relative)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from core_helpers import n_examples, spectral_norm
from lipbound import Guarantee
from lipbound.spectral import SAFETY, LanczosResult, kw_factor, lanczos_top, spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64
RITZ_TOL = 1e-10


def _orth(g: torch.Generator, n: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(s: Tensor, m: int, n: int, seed: int) -> Tensor:
    """A random (m, n) matrix with singular values s (len(s) <= min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    r = s.numel()
    u, v = _orth(g, m)[:, :r], _orth(g, n)[:, :r]
    return (u * s.to(DT)) @ v.T


SPECTRA = ("gauss", "geometric", "gap", "linear", "clustered", "rank3", "flat", "sparse")


def make(kind: str, m: int, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    k = min(m, n)
    if kind == "gauss":
        return torch.randn(m, n, generator=g, dtype=DT)
    if kind == "sparse":
        a = torch.randn(m, n, generator=g, dtype=DT)
        return a * (torch.rand(m, n, generator=g, dtype=DT) < 0.05)
    if kind == "geometric":
        s = 0.8 ** torch.arange(k, dtype=DT)
    elif kind == "gap":  # well separated top: Lanczos converges to machine precision
        s = torch.rand(k, generator=g, dtype=DT) * 0.5
        s[0] = 2.0
    elif kind == "linear":
        s = torch.linspace(1.0, 0.0, k, dtype=DT)
    elif kind == "clustered":
        s = torch.rand(k, generator=g, dtype=DT) * 0.5
        top = min(k, 8)
        s[:top] = 1.0 - 1e-5 * torch.arange(top, dtype=DT)
    elif kind == "rank3":
        s = torch.tensor([3.0, 2.0, 1.0], dtype=DT)[:k]
    elif kind == "flat":
        s = torch.full((k,), 2.5, dtype=DT)
    else:
        raise ValueError(kind)
    return with_spectrum(s, m, n, seed)


class Counted:
    """mv / rmv of a dense matrix that count the vectors they are applied to."""

    def __init__(self, mat: Tensor):
        self.mat = mat
        self.n_mv = 0
        self.n_rmv = 0

    def mv(self, x: Tensor) -> Tensor:
        self.n_mv += x.shape[0]
        return x @ self.mat.T

    def rmv(self, y: Tensor) -> Tensor:
        self.n_rmv += y.shape[0]
        return y @ self.mat


def upper(mat: Tensor, *, steps: int = 24, delta: float = 1e-6, seed: int = 0, alts=(),
          warm=None, cols: Tensor | None = None, rows: Tensor | None = None):
    m, n = mat.shape
    op = Counted(mat)
    return spectral_upper(
        op.mv, op.rmv, n_in=n, n_out=m,
        cols=torch.arange(n) if cols is None else cols,
        rows=torch.arange(m) if rows is None else rows,
        device="cpu", apply_flops=float(m * n), mode="lanczos", steps=steps,
        failure_prob=delta, generator=torch.Generator().manual_seed(seed),
        certified_alternatives=alts, warm=warm)


def top(mat: Tensor, steps: int, seed: int = 0, **kw) -> LanczosResult:
    op = Counted(mat)
    return lanczos_top(op.mv, op.rmv, torch.arange(mat.shape[1]), mat.shape[1], steps,
                       torch.Generator().manual_seed(seed), "cpu", **kw)


# --------------------------------------------------------------------------- vs exact SVD
@settings(max_examples=n_examples(60))
@given(kind=st.sampled_from(SPECTRA), m=st.integers(8, 90), n=st.integers(8, 90),
       seed=st.integers(0, 10 ** 6), steps=st.integers(4, 40))
def test_lanczos_vs_svd(kind, m, n, seed, steps):
    mat = make(kind, m, n, seed)
    true = spectral_norm(mat)
    res = top(mat, steps, seed)
    assert res.theta <= true ** 2 * (1 + RITZ_TOL) + 1e-300
    assert res.sqrt_theta == pytest.approx(math.sqrt(res.theta), rel=1e-12, abs=1e-300)
    assert 1 <= res.dim <= min(steps, n)
    bound = upper(mat, steps=steps, seed=seed)
    assert bound.value >= true, (bound, true)
    assert bound.estimate <= true * (1 + RITZ_TOL) + 1e-300


@pytest.mark.parametrize("kind", SPECTRA)
def test_ritz_vector_and_value_agree(kind):
    """The returned Ritz vector has unit norm and Rayleigh quotient theta (no slack here);
    the image is M v / ||M v||; with a gap the value is the true one to ~1e-12."""
    mat = make(kind, 60, 50, 3)
    true = spectral_norm(mat)
    res = top(mat, 30, 1)
    assert abs(float(res.vector.norm()) - 1.0) < 1e-12
    assert float((mat @ res.vector).norm()) ** 2 == pytest.approx(res.theta, rel=1e-9)
    if res.image is not None:
        mz = mat @ res.vector
        assert torch.allclose(res.image, mz / mz.norm(), rtol=0, atol=1e-12)
    if kind in ("gap", "geometric", "rank3", "flat"):
        assert res.theta == pytest.approx(true ** 2, rel=1e-10)


def test_ritz_values_of_nested_runs_never_decrease():
    """The early-exit argument: with the same start vector, more steps span a larger Krylov
    space, so the top Ritz value cannot go down (Cauchy interlacing)."""
    for kind in ("gauss", "linear", "clustered", "geometric"):
        mat = make(kind, 70, 80, 11)
        prev = 0.0
        for steps in range(1, 30):
            th = top(mat, steps, 4).theta
            assert th >= prev * (1 - 1e-12), (kind, steps, th, prev)
            prev = th


def test_operator_applications_per_run():
    """k mv and k - 1 rmv for k steps, plus one mv for the Ritz vector's Rayleigh quotient; the
    images are not kept (nothing else is applied)."""
    mat = make("gauss", 40, 60, 0)
    for steps in (1, 2, 5, 17):
        op = Counted(mat)
        res = lanczos_top(op.mv, op.rmv, torch.arange(60), 60, steps,
                          torch.Generator().manual_seed(0), "cpu")
        assert op.n_mv == steps + 1 and op.n_rmv == steps - 1
        assert res.matvecs == 2 * steps


def test_result_unpacks_like_the_old_tuple():
    mat = make("gauss", 20, 30, 0)
    res = top(mat, 6)
    theta, vec, k, dim = res
    assert (theta, k, dim) == (res.theta, res.k, res.dim) and vec is res.vector
    assert res[0] == theta and len(res) == 4
    assert k == 6 and dim == 6 and not res.dominated


# --------------------------------------------------------------------------- smaller side
@pytest.mark.parametrize("seed", range(4))
def test_smaller_side_route(seed):
    """m < n: Lanczos runs on M M^T (dimension m). Same theta as on M^T M for a well
    separated spectrum, the KW factor uses m, and the vector is a right singular vector
    estimate in the input space."""
    m, n = 30, 200
    mat = make("gap", m, n, seed)
    true = spectral_norm(mat)
    wide = top(mat, 25, seed)
    tall = lanczos_top(lambda y: y @ mat, lambda x: x @ mat.T, torch.arange(m), m, 25,
                       torch.Generator().manual_seed(seed), "cpu")
    assert tall.theta == pytest.approx(wide.theta, rel=1e-8)
    assert tall.theta <= true ** 2 * (1 + RITZ_TOL)
    delta = 1e-6
    res = upper(mat, steps=25, seed=seed, delta=delta)
    assert res.value >= true and res.method == "lanczos"
    # never above the a priori bound of the full run on the m-dimensional side (the
    # a posteriori bound may stop earlier and be smaller)
    assert res.value <= res.estimate * math.sqrt(kw_factor(m, 25, delta)) * (1 + SAFETY) * (
        1 + 1e-12)
    assert res.vector is not None and res.vector.shape == (n,)
    assert float((mat @ res.vector).norm()) == pytest.approx(true, rel=1e-8)


@settings(max_examples=n_examples(40))
@given(kind=st.sampled_from(SPECTRA), m=st.integers(2, 40), extra=st.integers(1, 80),
       seed=st.integers(0, 10 ** 6), steps=st.integers(4, 30), subset=st.booleans())
def test_smaller_side_is_sound(kind, m, extra, seed, steps, subset):
    mat = make(kind, m, m + extra, seed)
    cols = rows = None
    if subset:
        g = torch.Generator().manual_seed(seed)
        rows = torch.nonzero(torch.rand(m, generator=g) < 0.7).reshape(-1)
        cols = torch.nonzero(torch.rand(m + extra, generator=g) < 0.7).reshape(-1)
        keep = torch.zeros_like(mat)
        keep[rows[:, None], cols[None, :]] = 1.0
        mat = mat * keep
    true = spectral_norm(mat)
    res = upper(mat, steps=steps, seed=seed, cols=cols, rows=rows)
    assert res.value >= true, (res, true)
    assert res.estimate <= true * (1 + RITZ_TOL) + 1e-300
    if res.method == "lanczos-full":
        assert res.value <= true * (1 + 1e-8)


# --------------------------------------------------------------------------- early exit
@pytest.mark.parametrize("kind", ("gauss", "gap", "linear", "clustered"))
@pytest.mark.parametrize("shape", ((80, 100), (100, 80)))
def test_early_exit_is_never_looser(kind, shape):
    """With one alternative a: the alternative (certified) when it is below the full run's
    bound; above it, either the full run, or -- when the run stopped early -- the alternative,
    which is then no larger than the full run's a priori (Kuczynski-Wozniakowski) bound (the
    a posteriori bound of a completed run could have been smaller, by at most that factor)."""
    mat = make(kind, *shape, 5)
    true = spectral_norm(mat)
    full = upper(mat, steps=30, seed=2)
    assert full.value >= true and full.method == "lanczos"
    prior = full.estimate * math.sqrt(kw_factor(min(shape), 30, 1e-6 / 2)) * (1 + SAFETY)
    for ratio in (0.5, 0.9, 0.99, 0.999999, 1.0, 1.000001, 1.01, 2.0):
        a = full.value * ratio
        res = upper(mat, steps=30, seed=2, alts=((a, "given"),))
        if a <= full.value:
            assert res.value == a and res.method == "given"
            assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0
        elif res.method == "given":
            assert res.value == a <= prior * (1 + 1e-12)
            assert res.guarantee == Guarantee.CERTIFIED
        else:
            assert res.value == full.value and res.method == "lanczos"
            assert res.estimate == full.estimate
        assert res.value <= max(full.value, prior) * (1 + 1e-12)


def test_early_exit_stops_early_and_is_sound():
    """A certified alternative just above the true norm (here from the exact SVD) stops the
    run after a few steps; the reported value is that certified number."""
    mat = make("gap", 300, 400, 1)
    true = spectral_norm(mat)
    a = true * (1 + 1e-6)
    f = kw_factor(300, 40, 1e-6)
    res = lanczos_top(lambda y: y @ mat, lambda x: x @ mat.T, torch.arange(300), 300, 40,
                      torch.Generator().manual_seed(0), "cpu",
                      stop_theta=(a / (1 + SAFETY)) ** 2, kw_full=f)
    assert res.dominated and res.k < 40
    # the justification: the stopped Ritz value, inflated, is already above the alternative
    assert math.sqrt(res.theta * f) * (1 + SAFETY) >= a
    assert res.theta <= true ** 2 * (1 + RITZ_TOL)
    out = upper(mat, steps=40, alts=((a, "svd-given"), (float(mat.norm()), "frobenius")))
    assert out.method == "svd-given" and out.value == a >= true
    assert out.guarantee == Guarantee.CERTIFIED and out.estimate <= true * (1 + RITZ_TOL)
    assert out.vector is not None and out.vector.shape == (400,)


def test_early_exit_arguments():
    mat = make("gauss", 20, 30, 0)
    with pytest.raises(ValueError):
        top(mat, 8, stop_theta=1.0)
    # an infinite KW factor (steps too few for a finite bound) stops at the first check
    res = top(mat, 30, stop_theta=1e300, kw_full=math.inf)
    assert res.dominated and res.k == 4
    # a threshold that cannot be reached: a complete run
    res = top(mat, 12, stop_theta=1e300, kw_full=2.0)
    assert not res.dominated and res.k == 12
    # too few steps for the KW bound: the a posteriori bound is still finite and beats a
    # huge certified alternative; with a smaller one the alternative is reported
    res = upper(mat, steps=4, alts=((1e6, "big"),))
    assert res.method == "lanczos" and spectral_norm(mat) <= res.value < 1e6
    res = upper(mat, steps=4, alts=((res.value * 0.999, "smaller"),))
    assert res.method == "smaller"


def test_no_early_exit_when_the_run_can_be_exact():
    """steps >= dimension: the full run is 'lanczos-full' (no inflation), so only an
    alternative below the exact norm could stop it -- none does, and the result is exact."""
    mat = make("gauss", 12, 15, 3)
    true = spectral_norm(mat)
    res = upper(mat, steps=12, alts=((true * (1 + 1e-6), "given"),))
    assert res.method == "lanczos-full" and true <= res.value <= true * (1 + 1e-8)


# --------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("m,n", ((40, 30), (30, 40), (25, 25)))
@pytest.mark.parametrize("rank", (0, 1, 2, 5))
@pytest.mark.parametrize("steps", (3, 8, 20, 60))
def test_rank_deficient_and_invariant_krylov_spaces(m, n, rank, steps):
    g = torch.Generator().manual_seed(rank * 100 + steps)
    if rank == 0:
        mat = torch.zeros(m, n, dtype=DT)
    else:
        mat = torch.randn(m, rank, generator=g, dtype=DT) @ torch.randn(rank, n, generator=g,
                                                                        dtype=DT)
    true = spectral_norm(mat)
    res = upper(mat, steps=steps, seed=steps)
    assert res.value >= true, (res, true)
    assert res.estimate <= true * (1 + RITZ_TOL) + 1e-300
    if res.method == "lanczos-full":
        assert res.guarantee == Guarantee.CERTIFIED and res.value <= true * (1 + 1e-8)
    elif res.method == "lanczos":
        assert res.guarantee == Guarantee.PROBABILISTIC
    th = top(mat, steps, steps)
    if rank == 0:  # a zero first image: the run reports no estimate (an underflow looks alike)
        assert math.isnan(th.theta) and th.vector is None and res.method == "svd"
    else:
        assert th.theta >= 0.0 and th.dim <= min(steps, n)


def test_start_orthogonal_to_the_top_direction_restarts():
    """A start vector whose Krylov space is invariant after one step (M = I + u u^T, u
    orthogonal to the start): the restart with fresh directions still finds ||M|| = 2, and a
    certified 'lanczos-full' needs the whole space."""
    n = 10
    g0 = torch.Generator().manual_seed(5)
    start = torch.randn(n, generator=g0, dtype=DT)
    u = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DT)
    u = u - start * (start @ u) / (start @ start)
    u = u / u.norm()
    mat = torch.eye(n, dtype=DT) + torch.outer(u, u)
    for steps in (4, 10, 30):
        res = upper(mat, steps=steps, seed=5)
        if res.guarantee == Guarantee.CERTIFIED:
            assert res.value >= 2.0
        assert res.value >= 2.0 or res.method == "lanczos"
    res = upper(mat, steps=n, seed=5)
    assert res.method == "lanczos-full" and res.value >= 2.0


# --------------------------------------------------------------------------- warm start
@pytest.mark.parametrize("shape", ((80, 100), (100, 80)))
def test_warm_start_is_sound_on_both_sides(shape):
    m, n = shape
    mat = make("clustered", m, n, 3)
    true = spectral_norm(mat)
    _, _, vh = torch.linalg.svd(mat)
    g = torch.Generator().manual_seed(9)
    warms = [
        [vh[0]],
        [torch.randn(n, generator=g, dtype=DT)],
        [torch.zeros(n, dtype=DT)],
        [vh[5], vh[5], -vh[5]],
        [vh[0] * 1e-200],
        [torch.full((n,), math.nan, dtype=DT)],
    ]
    for warm in warms:
        res = upper(mat, steps=10, seed=1, warm=warm)
        assert res.value >= true, (warm, res)
        assert res.estimate <= true * (1 + RITZ_TOL)
    res = upper(mat, steps=10, seed=1, warm=[vh[0]])
    assert res.estimate >= true * (1 - 1e-10)  # the top vector is in the subspace
    # the returned vector warm-starts the next run (it lives in the input space)
    first = upper(mat, steps=10, seed=1)
    again = upper(mat, steps=10, seed=2, warm=[first.vector])
    assert first.vector.shape == (n,)
    assert again.estimate >= first.estimate * (1 - 1e-12) and again.value >= true


def test_warm_start_masked_to_active_columns():
    """A warm vector with weight outside the active columns is masked (the operator is zero
    there); the bound stays sound and the warm direction is used."""
    mat = make("gauss", 40, 50, 2)
    cols = torch.arange(0, 50, 2)
    mat = mat * torch.isin(torch.arange(50), cols).to(DT)
    true = spectral_norm(mat)
    _, _, vh = torch.linalg.svd(mat)
    warm = vh[0] + torch.where(torch.isin(torch.arange(50), cols), 0.0, 5.0).to(DT)
    res = upper(mat, steps=6, cols=cols, warm=[warm])
    assert res.value >= true and res.estimate >= true * (1 - 1e-10)


@pytest.mark.parametrize("scale", [1e-170, 1e-200, 1e160, 1e200])
def test_extreme_operator_scales_stay_finite_and_sound(scale):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(30, 20, generator=g, dtype=torch.float64)
    true = float(torch.linalg.matrix_norm(base, ord=2))
    m = base * scale

    def mv(v):
        return v @ m.T

    def rmv(y):
        return y @ m

    for steps in (16, 40):  # probabilistic, and a run that spans the space (certified)
        res = spectral_upper(mv, rmv, n_in=20, n_out=30, cols=torch.arange(20),
                             rows=torch.arange(30), device="cpu", apply_flops=600.0,
                             mode="lanczos", steps=steps, failure_prob=1e-6,
                             generator=torch.Generator().manual_seed(0))
        assert math.isfinite(res.value)
        # compare in the unscaled units: value / scale >= the true norm of base
        assert res.value / scale >= true * (1 - 1e-12), (scale, steps, res)


@pytest.mark.parametrize("spectrum", ["continuum", "clustered", "gap"])
def test_float32_update_copy_gives_the_float64_run(monkeypatch, spectrum):
    """Runs on >= F32_UPDATE_MIN_N coordinates update from a float32 copy of the basis: the
    same steps, Ritz values and a posteriori bounds as the all-float64 run (to rounding), and
    the bound stays above the true norm."""
    import lipbound.lanczos as lz
    from lipbound.posterior import overlap_floor

    n = lz.F32_UPDATE_MIN_N + 1000
    g = torch.Generator().manual_seed(len(spectrum))
    s = torch.rand(n, generator=g, dtype=DT)
    if spectrum == "clustered":
        s[:20] = 1.0 - 1e-6 * torch.rand(20, generator=g, dtype=DT)
    elif spectrum == "gap":
        s = s * 0.5
        s[0] = 1.0
    else:
        s = s ** 0.25  # a continuous top
    true = float(s.max())

    def run():
        return lz.run_lanczos(lambda v: v * s, lambda y: y * s, n, 48,
                              torch.Generator().manual_seed(7), "cpu",
                              post_c=overlap_floor(n, 1e-6 / 2), post_stop=1.02)
    fast = run()
    monkeypatch.setattr(lz, "F32_UPDATE_MIN_N", 10 ** 12)
    ref = run()
    assert fast.k == ref.k and fast.dim == ref.dim and fast.matvecs == ref.matvecs
    assert fast.sqrt_theta == pytest.approx(ref.sqrt_theta, rel=1e-12)
    if math.isfinite(ref.post_sqrt):
        assert fast.post_sqrt == pytest.approx(ref.post_sqrt, rel=1e-9)
        assert fast.post_sqrt >= true
    assert fast.sqrt_theta <= true * (1 + 1e-12)


@pytest.mark.parametrize("stop", (1.015, 1.02, 1.023, 1.025, 1.026, 1.027))
def test_early_exit_is_not_delayed_by_skipped_a_posteriori_checks(stop):
    """The early-exit test keeps its own schedule: a run whose a posteriori checks are being
    skipped (slow Christoffel growth: 3000 coordinates, a dense spectrum near the top) still
    stops at the first step of the check grid where the inflated Ritz value reaches the
    alternative (before, it waited for the next a posteriori check: up to 12 steps later).
    The reference Ritz values come from runs of each length from the same start."""
    from lipbound.lanczos import run_lanczos
    from lipbound.posterior import overlap_floor

    n = 3000
    d = torch.sqrt(torch.linspace(0.0, 1.0, n, dtype=DT))

    def run(steps: int, **kw) -> LanczosResult:
        return run_lanczos(lambda v: v * d, lambda y: y * d, n, steps,
                           torch.Generator().manual_seed(1), "cpu",
                           post_c=overlap_floor(n, 1e-7), post_stop=1.001, **kw)

    f = kw_factor(n, 64, 1e-7)
    thetas = {k: run(k).theta for k in range(4, 65, 4)}
    first = min(k for k, th in thetas.items() if th * f >= stop * (1 + 1e-9))
    res = run(64, stop_theta=stop, kw_full=f)
    assert res.dominated and res.k == first
    assert res.theta * f >= stop * (1 - 1e-12)  # the exit is justified
    assert res.theta <= 1.0 * (1 + RITZ_TOL)  # Ritz values stay below ||M||^2 = 1
