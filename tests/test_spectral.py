"""Tests of lipbound.spectral: the exact route equals the SVD (on the safe side), the Lanczos
route's inflated value is >= the true norm on many kinds of matrices, the
Kuczynski-Wozniakowski factor behaves as the theorem says, and the guarantees reported with
each number are the right ones."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from core_helpers import n_examples, spectral_norm
from lipbound import Analyzer, Guarantee
from lipbound.spectral import SAFETY, exact_norm, kw_factor, lanczos_top, spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64
KINDS = ("gauss", "lowrank", "rank1", "clustered", "linear", "flat", "zero", "sparse")
"""Matrix kinds of the property tests; "tiny"/"huge" (entries 1e-120 / 1e120) have their own
scale tests below."""


def _orth(g: torch.Generator, n: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def make_matrix(kind: str, m: int, n: int, seed: int) -> Tensor:
    """A random (m, n) float64 matrix of a given spectral type."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "gauss":
        return torch.randn(m, n, generator=g, dtype=DT)
    if kind == "lowrank":
        r = 1 + seed % 3
        return torch.randn(m, r, generator=g, dtype=DT) @ torch.randn(r, n, generator=g,
                                                                       dtype=DT)
    if kind == "rank1":
        return torch.outer(torch.randn(m, generator=g, dtype=DT),
                           torch.randn(n, generator=g, dtype=DT))
    if kind == "zero":
        return torch.zeros(m, n, dtype=DT)
    if kind == "tiny":
        return torch.randn(m, n, generator=g, dtype=DT) * 1e-120
    if kind == "huge":
        return torch.randn(m, n, generator=g, dtype=DT) * 1e120
    if kind == "sparse":
        a = torch.randn(m, n, generator=g, dtype=DT)
        return a * (torch.rand(m, n, generator=g, dtype=DT) < 0.05)
    if kind == "clustered":  # many singular values within 1e-3 of the top: slow convergence
        s = torch.rand(k, generator=g, dtype=DT) * 0.5
        top = min(k, 10)
        s[:top] = 1.0 - 1e-4 * torch.arange(top, dtype=DT)
    elif kind == "linear":  # evenly spread spectrum: the hard case of the KW analysis
        s = torch.linspace(1.0, 0.0, k, dtype=DT)
    elif kind == "flat":  # all singular values equal
        s = torch.full((k,), 3.0, dtype=DT)
    else:
        raise ValueError(kind)
    u, v = _orth(g, m)[:, :k], _orth(g, n)[:, :k]
    return (u * s) @ v.T


def _ops(mat: Tensor):
    def mv(x: Tensor) -> Tensor:
        return x @ mat.T

    def rmv(y: Tensor) -> Tensor:
        return y @ mat
    return mv, rmv


def _upper(mat: Tensor, mode: str, *, steps: int = 32, delta: float = 1e-6, seed: int = 0,
           dense: bool = False, cols: Tensor | None = None, rows: Tensor | None = None,
           alts=(), warm=None, exact_budget: float = 3e8):
    m, n = mat.shape
    mv, rmv = _ops(mat)
    return spectral_upper(
        mv, rmv, n_in=n, n_out=m,
        cols=torch.arange(n) if cols is None else cols,
        rows=torch.arange(m) if rows is None else rows,
        device="cpu", dense=(lambda: mat) if dense else None, apply_flops=float(m * n),
        mode=mode, steps=steps, failure_prob=delta,
        generator=torch.Generator().manual_seed(seed), certified_alternatives=alts, warm=warm,
        exact_budget=exact_budget)


# --------------------------------------------------------------------------- exact route
@settings(max_examples=n_examples(60))
@given(kind=st.sampled_from(KINDS), m=st.integers(1, 40), n=st.integers(1, 40),
       seed=st.integers(0, 10 ** 6), dense=st.booleans(), subset=st.booleans())
def test_exact_route_equals_svd_on_the_safe_side(kind, m, n, seed, dense, subset):
    mat = make_matrix(kind, m, n, seed)
    cols = rows = None
    if subset:
        g = torch.Generator().manual_seed(seed + 1)
        cols = torch.nonzero(torch.rand(n, generator=g) < 0.6).reshape(-1)
        rows = torch.nonzero(torch.rand(m, generator=g) < 0.6).reshape(-1)
        keep = torch.zeros(m, n, dtype=DT)
        keep[rows[:, None], cols[None, :]] = 1.0
        mat = mat * keep  # the operator is zero outside the active rows/columns
    true = spectral_norm(mat)
    res = _upper(mat, "exact", dense=dense, cols=cols, rows=rows)
    assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0
    assert res.value >= true
    assert res.value <= true * (1 + 1e-8)
    assert res.method in ("svd", "zero")


def test_exact_norm_helper():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.randn(7, 5, generator=g, dtype=DT)
        s = float(torch.linalg.svdvals(a)[0])
        assert exact_norm(a) >= s
        assert exact_norm(a) <= s * (1 + 1e-8)
    assert exact_norm(torch.zeros(3, 4, dtype=DT)) == 0.0
    assert exact_norm(torch.zeros(0, 4, dtype=DT)) == 0.0


# --------------------------------------------------------------------------- Lanczos route
@settings(max_examples=n_examples(150))
@given(kind=st.sampled_from(KINDS), m=st.integers(20, 120), n=st.integers(20, 120),
       seed=st.integers(0, 10 ** 6), steps=st.integers(6, 40),
       delta=st.sampled_from([1e-6, 1e-8]))
def test_lanczos_bound_is_above_the_true_norm(kind, m, n, seed, steps, delta):
    mat = make_matrix(kind, m, n, seed)
    true = spectral_norm(mat)
    res = _upper(mat, "lanczos", steps=steps, delta=delta, seed=seed)
    assert res.value >= true, (res, true)
    # the raw Ritz value is (up to rounding) a lower estimate; it is not reported as a bound,
    # so a rounding-level excess is harmless -- a larger one would mean a broken Rayleigh-Ritz
    assert res.estimate <= true * (1 + 1e-8) + 1e-300
    assert res.value >= res.estimate
    if res.method == "lanczos":
        assert res.guarantee == Guarantee.PROBABILISTIC
        assert res.failure_prob == delta
        # (also when steps >= n: an early invariant Krylov space is not a proof)
    else:
        assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_lanczos_full_when_steps_cover_the_dimension(kind):
    for seed, (m, n) in enumerate([(10, 6), (6, 10), (12, 12), (3, 1), (1, 5)]):
        mat = make_matrix(kind, m, n, seed)
        true = spectral_norm(mat)
        res = _upper(mat, "lanczos", steps=max(n, 4), seed=seed)
        # a zero operator gives a zero first image: no estimate, so the exact route
        zero = not bool(mat.any())
        assert res.method in (("svd",) if zero else ("lanczos-full", "zero")), res
        assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0
        assert res.value >= true
        assert res.value <= true * (1 + 1e-8)


@settings(max_examples=n_examples(80))
@given(kind=st.sampled_from(KINDS), m=st.integers(1, 40), n=st.integers(1, 30),
       seed=st.integers(0, 10 ** 6), extra=st.integers(0, 10))
def test_lanczos_full_is_sound(kind, m, n, seed, extra):
    """steps >= dimension: the result is certified, so it must be >= the norm for every
    matrix (rank-deficient and sparse ones included), not just with high probability."""
    mat = make_matrix(kind, m, n, seed)
    true = spectral_norm(mat)
    res = _upper(mat, "lanczos", steps=max(n + extra, 4), seed=seed)
    assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0
    assert res.value >= true, (res, true)


def test_lanczos_zero_and_empty_operators():
    for mode in ("exact", "lanczos", "auto"):
        z = torch.zeros(30, 50, dtype=DT)
        res = _upper(z, mode, steps=30)
        assert res.value == 0.0
        assert res.guarantee.is_upper_bound
        res = _upper(make_matrix("gauss", 30, 50, 1), mode, steps=8,
                     cols=torch.arange(0), rows=torch.arange(30))
        assert res.value == 0.0 and res.method == "zero"


@pytest.mark.parametrize("steps", [6, 12, 40])
def test_lanczos_is_scale_invariant(steps):
    """Scaling the operator by s scales the bound by s: the Lanczos route must not depend on
    the magnitude of the entries (no underflow of norms deciding an early stop). Operators
    with norm ~1e-120 occur e.g. as R A D with tiny ReLU slopes r."""
    for kind in ("gauss", "linear", "lowrank"):
        base = make_matrix(kind, 20, 20, 0)
        ref = _upper(base, "lanczos", steps=steps, seed=3)
        for s in (1e-120, 1e-80, 1e-40, 1e40):
            mat = base * s
            true = spectral_norm(mat)
            res = _upper(mat, "lanczos", steps=steps, seed=3)
            assert res.value >= true, (kind, s, res, true)
            assert res.guarantee == ref.guarantee and res.method == ref.method
            assert res.value == pytest.approx(ref.value * s, rel=1e-6)


def test_lanczos_huge_entries_stay_sound():
    for steps in (6, 20, 40):
        mat = make_matrix("gauss", 20, 20, 0) * 1e120
        res = _upper(mat, "lanczos", steps=steps, seed=3)
        assert res.value >= spectral_norm(mat)


def test_lanczos_hard_spectra_many_seeds():
    """The slowest-converging spectra (evenly spread, clustered near the top) at the default
    failure probability: the inflation must cover every draw of the start vector."""
    for kind in ("linear", "clustered"):
        mat = make_matrix(kind, 300, 300, 17)
        true = spectral_norm(mat)
        for seed in range(25):
            res = _upper(mat, "lanczos", steps=20, delta=1e-6, seed=seed)
            assert res.value >= true, (kind, seed, res.value, true)


def test_lanczos_warm_start_never_breaks_the_bound():
    mat = make_matrix("clustered", 80, 100, 3)
    true = spectral_norm(mat)
    _, _, vh = torch.linalg.svd(mat)
    g = torch.Generator().manual_seed(9)
    warms = [
        [vh[0]],                                             # the exact top vector
        [torch.randn(100, generator=g, dtype=DT)],           # a random vector
        [torch.zeros(100, dtype=DT)],                        # nothing new
        [vh[5], vh[5], -vh[5]],                              # dependent vectors
        [vh[0] * 1e-200],                                    # a tiny vector
    ]
    base = _upper(mat, "lanczos", steps=12, seed=1)
    assert base.value >= true
    for warm in warms:
        res = _upper(mat, "lanczos", steps=12, seed=1, warm=warm)
        assert res.value >= true, (warm, res)
        assert res.estimate <= true * (1 + 1e-12)
    res = _upper(mat, "lanczos", steps=12, seed=1, warm=[vh[0]])
    assert res.estimate >= true * (1 - 1e-10)  # the top vector is in the subspace


def test_lanczos_top_ritz_value_is_a_lower_bound():
    for kind in ("gauss", "linear", "clustered", "lowrank"):
        mat = make_matrix(kind, 60, 70, 4)
        mv, rmv = _ops(mat)
        theta, vec, k, _ = lanczos_top(mv, rmv, torch.arange(70), 70, 10,
                                    torch.Generator().manual_seed(0), "cpu")
        true = spectral_norm(mat)
        assert theta <= true ** 2 * (1 + 1e-12)
        assert 1 <= k <= 10
        assert abs(float(vec.norm()) - 1.0) < 1e-9
        # the Ritz vector's Rayleigh quotient is theta
        assert float((mat @ vec).norm()) ** 2 == pytest.approx(theta, rel=1e-8)


def test_lanczos_full_certified_needs_the_whole_space():
    """A start vector orthogonal to the top singular vector makes the Krylov space invariant
    after one step. 'lanczos-full' (CERTIFIED, deterministic) may then only be reported if the
    basis really spans all active coordinates; otherwise the number is not an upper bound.

    M = I + u u^T with u orthogonal to the (seeded) start vector: ||M|| = 2, but the Krylov
    space of the start vector is span(start) and its Ritz value is 1."""
    n = 8
    seed = 5
    start = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    u = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DT)
    u = u - start * (start @ u) / (start @ start)
    u = u / u.norm()
    mat = torch.eye(n, dtype=DT) + torch.outer(u, u)
    true = spectral_norm(mat)
    assert true == pytest.approx(2.0)
    res = _upper(mat, "lanczos", steps=n, seed=seed)
    if res.guarantee == Guarantee.CERTIFIED:
        assert res.value >= true, (
            f"certified {res.method} value {res.value} < true norm {true}")


def test_analyzer_lanczos_full_certified_needs_the_whole_space():
    """The same through the Analyzer: a single Linear layer whose top singular vector is
    orthogonal to the seeded Lanczos start vector of its global bound."""
    n = 8
    start = torch.randn(n, generator=torch.Generator().manual_seed(10_000), dtype=DT)
    u = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DT)
    u = u - start * (start @ u) / (start @ start)
    u = u / u.norm()
    lin = nn.Linear(n, n, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n, dtype=DT) + torch.outer(u, u))
    model = nn.Sequential(lin).eval()
    res = Analyzer(model, (n,), spectral="lanczos", lanczos_steps=n, seed=0).global_bound()
    if res.guarantee == Guarantee.CERTIFIED:
        assert res.value >= 2.0, (res.value, res.layers[0].spectral_method)


# --------------------------------------------------------------------------- alternatives
def test_certified_alternatives_are_used_when_smaller():
    mat = make_matrix("gauss", 40, 50, 2)
    true = spectral_norm(mat)
    frob = float(mat.norm()) * (1 + SAFETY)
    for mode in ("exact", "lanczos"):
        # an alternative just above the norm wins over a Lanczos inflation and is certified
        res = _upper(mat, mode, steps=10, alts=((true * 1.0001, "given"), (frob, "frobenius")))
        if mode == "lanczos":
            assert res.method == "given" and res.value == true * 1.0001
            assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0
        else:
            assert res.method == "svd" and res.value <= true * (1 + 1e-8)
        # larger / non-finite alternatives are ignored
        res = _upper(mat, mode, steps=10, alts=((math.inf, "inf"), (math.nan, "nan"),
                                                (1e6, "big")))
        assert res.method not in ("inf", "nan", "big")
        assert res.value >= true


def test_kw_factor_monotone_and_matches_the_theorem():
    ns = [1, 10, 100, 10 ** 4, 10 ** 6]
    ks = list(range(2, 200, 3))
    deltas = [0.5, 1e-2, 1e-4, 1e-6, 1e-9, 1e-12]
    for n in ns:
        for d in deltas:
            prev = None
            for k in ks:
                f = kw_factor(n, k, d)
                if f is None:
                    assert prev is None, "once valid, a larger k must stay valid"
                    continue
                assert f > 1.0
                if prev is not None:
                    assert f <= prev  # more steps, smaller inflation
                prev = f
                # Thm 4.2(a) of Kuczynski & Wozniakowski with k steps (the code uses k - 1,
                # which is more conservative): P[theta < (1 - t) lambda] <= delta
                t = 1.0 - 1.0 / f
                assert 1.648 * math.sqrt(n) * math.exp(-math.sqrt(t) * (2 * k - 1)) <= d
    for n in ns:
        for k in (20, 60, 150):
            fs = [kw_factor(n, k, d) for d in deltas]
            fs = [f for f in fs if f is not None]
            assert fs == sorted(fs)  # smaller delta, larger inflation
    for d in deltas:
        for k in (30, 100):
            fs = [kw_factor(n, k, d) for n in ns]
            fs = [f for f in fs if f is not None]
            assert fs == sorted(fs)  # larger dimension, larger inflation
    assert kw_factor(100, 2, 1e-6) is None
    assert kw_factor(100, 3, 1e-6) is None
    for bad in (0.0, 1.0, -1e-3, 2.0):
        with pytest.raises(ValueError):
            kw_factor(10, 10, bad)


def test_auto_mode_picks_exact_when_cheap_and_lanczos_otherwise():
    mat = make_matrix("gauss", 90, 100, 8)
    true = spectral_norm(mat)
    res = _upper(mat, "auto", steps=20)
    assert res.method == "svd" and res.guarantee == Guarantee.CERTIFIED
    res = _upper(mat, "auto", steps=20, exact_budget=1.0)
    assert res.method in ("lanczos", "frobenius")
    assert res.value >= true
    with pytest.raises(ValueError):
        _upper(mat, "power")
