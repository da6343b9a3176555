"""Tests of block Lanczos and its a posteriori bound (lipbound.lanczos, lipbound.posterior):
the subspace overlap floor against the exact Beta distribution and a Monte Carlo draw, the
measure of the start block against polynomial norms computed independently, the
deterministic implication (overlap at the floor => bound >= λ_max) on spectra built to be
hard, the route against exact SVDs, the compact-coordinate maps of a masked layer against
the plain ones, and the dense block products against plain matrix products.

Every comparison is in the safe direction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from core_helpers import n_examples, spectral_norm
from lipbound import Guarantee
from lipbound.analyzer import _compact, _masked_maps
from lipbound.blocks import AffineBlock
from lipbound.lanczos import run_lanczos
from lipbound.ops.conv import ConvOp
from lipbound.ops.dense import DenseProducts
from lipbound.ops.linear import LinearOp
from lipbound.posterior import (
    block_christoffel_bound,
    block_christoffel_exceeds,
    block_measure_jacobi,
    block_overlap_floor,
    overlap_floor,
)
from lipbound.spectral import spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


# --------------------------------------------------------------------------- helpers
def block_lanczos_from(a: np.ndarray, v0: np.ndarray, k: int) -> np.ndarray:
    """Reference block Lanczos (numpy, two full re-orthogonalisation passes): the
    block-tridiagonal T_k (k blocks of size b) from the orthonormal columns of v0."""
    n, b = v0.shape
    qs = [v0]
    t = np.zeros((k * b, k * b))
    b_prev = None
    for j in range(k):
        v = qs[-1]
        w = a @ v
        if b_prev is not None:
            w -= qs[-2] @ b_prev.T
        aj = v.T @ w
        aj = (aj + aj.T) / 2
        w -= v @ aj
        basis = np.concatenate(qs, axis=1)
        for _ in range(2):
            w -= basis @ (basis.T @ w)
        t[j * b:(j + 1) * b, j * b:(j + 1) * b] = aj
        if j == k - 1:
            break
        qn, bj = np.linalg.qr(w)
        t[(j + 1) * b:(j + 2) * b, j * b:(j + 1) * b] = bj
        t[j * b:(j + 1) * b, (j + 1) * b:(j + 2) * b] = bj.T
        qs.append(qn)
        b_prev = bj
    return t


def spectrum(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Eigenvalues in [0, 1] with the top one equal to 1 (as in test_posterior)."""
    if kind == "continuous":
        lam = np.linspace(0.0, 1.0, n)
    elif kind == "edge":
        lam = 1.0 - np.linspace(0.0, 1.0, n) ** 2
    elif kind == "gap":
        lam = rng.uniform(0.0, 0.6, n)
    elif kind == "cluster":
        lam = rng.uniform(0.0, 1.0, n)
        lam[: min(n, 6)] = 1.0 - 1e-6 * np.arange(min(n, 6))
    else:
        raise ValueError(kind)
    lam[0] = 1.0
    return np.sort(lam)[::-1]


# --------------------------------------------------------------------------- overlap floor
@pytest.mark.parametrize("n", [10, 100, 10_000, 1_000_000, 3_211_264])
@pytest.mark.parametrize("b", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("delta", [0.5, 0.1, 1e-3, 1e-7, 1e-12])
def test_block_floor_against_the_exact_beta_distribution(n, b, delta):
    """||P x||^2 ~ Beta(b/2, (n-b)/2) for the projection on a uniformly random b-dimensional
    subspace: the floor's failure probability is at most δ, and not needlessly small."""
    c = block_overlap_floor(n, b, delta)
    if n - b < 2:
        assert c is None
        return
    p = float(stats.beta.cdf(c, b / 2, (n - b) / 2))
    assert p <= delta * (1 + 1e-9)
    if n >= 100 * b and delta <= 1e-3 and b <= 8:
        # the closed form drops only the factor (1 - t)^((n-b)/2 - 1) of the density
        assert p >= 0.3 * delta


def test_block_floor_monte_carlo_and_arguments():
    rng = np.random.default_rng(0)
    for n, b, delta in ((6, 2, 0.3), (12, 4, 0.2), (60, 8, 0.1)):
        g = rng.standard_normal((20_000, n, b))
        q, _ = np.linalg.qr(g)
        p2 = (q[:, 0, :] ** 2).sum(axis=1)  # ||Q^T e_1||^2
        freq = float(np.mean(p2 < block_overlap_floor(n, b, delta)))
        assert freq <= delta + 4 * math.sqrt(delta * (1 - delta) / g.shape[0])
    assert block_overlap_floor(100, 1, 1e-3) == overlap_floor(100, 1e-3)
    assert block_overlap_floor(5, 4, 0.1) is None
    # a bigger block has a (much) bigger floor: the reason block runs need fewer steps
    assert block_overlap_floor(10_000, 4, 1e-7) > 1e6 * overlap_floor(10_000, 1e-7)
    for bad in (0.0, 1.0, -1e-3, math.nan):
        with pytest.raises(ValueError):
            block_overlap_floor(10, 2, bad)
    with pytest.raises(ValueError):
        block_overlap_floor(10, 0, 0.1)


# --------------------------------------------------------------------------- the measure
@pytest.mark.parametrize("b", [2, 4])
@pytest.mark.parametrize("k", [3, 6, 12])
def test_measure_reproduces_polynomial_norms_of_the_start_block(b, k):
    """∫ p² dμ (from the Jacobi data of block_measure_jacobi) equals ||p(A) V||_F^2 computed
    directly for polynomials of degree < k, and the orthonormal polynomials are orthonormal
    for the normalised measure."""
    n = 60
    rng = np.random.default_rng(k + 10 * b)
    lam = rng.uniform(0.0, 1.0, n)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (basis * lam) @ basis.T
    v0, _ = np.linalg.qr(rng.standard_normal((n, b)))
    t = block_lanczos_from(a, v0, k)
    diag, off, beta_last = block_measure_jacobi(torch.from_numpy(t), b, k)
    m = len(diag)
    assert m == k - 1
    betas = list(off) + [beta_last]

    def pis(x):  # orthonormal polynomials pi_0 .. pi_m of ν = μ / b at the points x
        out = [np.ones_like(x)]
        prev = np.zeros_like(x)
        for i in range(m):
            nxt = ((x - diag[i]) * out[-1] - (betas[i - 1] if i else 0.0) * prev) / betas[i]
            prev = out[-1]
            out.append(nxt)
        return np.array(out)

    coef = rng.standard_normal(m)  # p = Σ coef_i π_i, degree m - 1 < k
    w = (basis.T @ v0) ** 2  # spectral weights of the start block, per eigenvector
    p_lam = coef @ pis(lam)[:m]
    direct = float((w.sum(axis=1) * p_lam ** 2).sum())  # ||p(A) V||_F^2
    assert direct == pytest.approx(b * float(coef @ coef), rel=1e-8)


# --------------------------------------------------------------------------- the implication
@settings(max_examples=n_examples(50), deadline=None)
@given(kind=st.sampled_from(["continuous", "edge", "gap", "cluster"]),
       n=st.integers(30, 240), b=st.sampled_from([2, 3, 4, 8]), k=st.integers(3, 14),
       seed=st.integers(0, 10 ** 6), log_c=st.floats(-12.0, -1.0))
def test_block_bound_holds_whenever_the_overlap_is_at_the_floor(kind, n, b, k, seed, log_c):
    """The deterministic core: a start block whose span meets the top eigenvector with
    ||V^T x_1||^2 exactly at the floor c (the worst case allowed) gives U >= λ_max = 1, even
    with no margin on the polynomial norms."""
    k = min(k, n // b - 1)
    if k < 3:
        return
    rng = np.random.default_rng(seed)
    lam = spectrum(kind, n, rng)
    c = 10.0 ** log_c
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (basis * lam) @ basis.T
    # in the eigenbasis: the block's span holds sqrt(c) e_1 + sqrt(1-c) r (r ⊥ e_1), and
    # b - 1 other random directions orthogonal to e_1
    g = rng.standard_normal((n, b))
    g[0, :] = 0.0
    g, _ = np.linalg.qr(g)
    g[:, 0] *= math.sqrt(1 - c)
    g[0, 0] = math.sqrt(c)
    v, _ = np.linalg.qr(basis @ g)
    assert float(((v.T @ basis[:, 0]) ** 2).sum()) == pytest.approx(c, rel=1e-6)
    t = block_lanczos_from(a, v, k)
    u = block_christoffel_bound(torch.from_numpy(t), b, k, c, margin=1.0)
    assert u >= 1.0 * (1 - 1e-9)
    u2 = block_christoffel_bound(torch.from_numpy(t), b, k, c)
    assert u2 >= u
    lam_t = float(np.linalg.eigvalsh(t)[-1])
    assert not block_christoffel_exceeds(torch.from_numpy(t), b, k, c, lam_t)
    if math.isfinite(u2):
        assert block_christoffel_exceeds(torch.from_numpy(t), b, k, c, u2 * (1 + 1e-6))


def test_the_block_floor_is_what_makes_it_sound():
    """A start block nearly orthogonal to the top eigenvector can miss λ_max: the test above
    is not vacuous."""
    n, b, k = 200, 4, 6
    lam = np.concatenate([[1.0], np.linspace(0.5, 0.0, n - 1)])
    g = np.random.default_rng(0).standard_normal((n, b))
    g[0, :] = 1e-9
    v, _ = np.linalg.qr(g)
    t = block_lanczos_from(np.diag(lam), v, k)
    assert block_christoffel_bound(torch.from_numpy(t), b, k, 1e-3, margin=1.0) < 1.0


# --------------------------------------------------------------------------- the route
def _make(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=DT)
    if kind == "gap":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        s = s * 0.3
        s[0] = 3.0
        a = (u * s) @ vh
    elif kind == "lowrank":
        a = torch.randn(m, 3, generator=g, dtype=DT) @ torch.randn(3, n, generator=g, dtype=DT)
    elif kind == "sparse":
        a = a * (torch.rand(m, n, generator=g, dtype=DT) < 0.05)
    return a


@settings(max_examples=n_examples(40), deadline=None)
@given(kind=st.sampled_from(["gauss", "gap", "lowrank", "sparse"]), m=st.integers(10, 120),
       n=st.integers(10, 120), b=st.sampled_from([2, 4, 8]), steps=st.integers(3, 30),
       seed=st.integers(0, 10 ** 6))
def test_block_route_against_the_svd(kind, m, n, b, steps, seed):
    mat = _make(kind, m, n, seed)
    true = spectral_norm(mat)
    res = spectral_upper(lambda x: x @ mat.T, lambda y: y @ mat, n_in=n, n_out=m,
                         cols=torch.arange(n), rows=torch.arange(m), device="cpu",
                         apply_flops=float(m * n), mode="lanczos", steps=steps,
                         failure_prob=1e-6, generator=torch.Generator().manual_seed(seed),
                         block=b)
    assert res.value >= true * (1 - 1e-12), (res, true)
    assert res.estimate <= true * (1 + 1e-10) + 1e-300
    if res.guarantee == Guarantee.PROBABILISTIC:
        assert res.method in ("block-lanczos", "lanczos") and res.failure_prob == 1e-6


def test_block_run_needs_fewer_steps_for_the_same_bound():
    """On a random (Marchenko-Pastur) matrix a block of 8 reaches the tightness of a
    64-step single-vector run in far fewer steps (the reason block runs exist)."""
    mat = _make("gauss", 400, 900, 1)
    single = spectral_upper(lambda x: x @ mat.T, lambda y: y @ mat, n_in=900, n_out=400,
                            cols=torch.arange(900), rows=torch.arange(400), device="cpu",
                            apply_flops=3.6e5, mode="lanczos", steps=64, failure_prob=1e-7)
    calls = []

    def mv(x):
        calls.append(x.shape[0])
        return x @ mat.T

    block = spectral_upper(mv, lambda y: y @ mat, n_in=900, n_out=400, cols=torch.arange(900),
                           rows=torch.arange(400), device="cpu", apply_flops=3.6e5,
                           mode="lanczos", steps=64, failure_prob=1e-7, block=8)
    true = spectral_norm(mat)
    assert block.method == "block-lanczos" and single.method == "lanczos"
    assert true <= block.value <= single.value * (1 + 1e-9)
    assert len(calls) < 32  # block steps (+ the Ritz vector's product), vs ~50 single steps


def test_run_lanczos_argument_checks():
    mv = rmv = (lambda x: x)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        run_lanczos(mv, rmv, 0, 5, g, "cpu")
    with pytest.raises(ValueError):
        run_lanczos(mv, rmv, 10, 5, g, "cpu", block=0)
    # a block too big for the dimension falls back to a single vector
    res = run_lanczos(mv, rmv, 5, 5, g, "cpu", block=4)
    assert res.block == 1 and res.theta == pytest.approx(1.0)


# --------------------------------------------------------------------------- maps, products
@pytest.mark.parametrize("frac_in,frac_out", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.5), (0.4, 0.7)])
def test_masked_maps_equal_the_plain_operator(frac_in, frac_out):
    """The analyzer's compact maps (scatter/gather instead of the 0/1 mask) give exactly the
    Gram products of M = R A D on both sides."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=DT)
    op = ConvOp("c", (3, 8, 8), (5, 6, 6), w, None, 1, 0, 1, 1)
    blk = AffineBlock([op], relu=True)
    d = (torch.rand(blk.in_dim, generator=g, dtype=DT) < frac_in).to(DT)
    r = torch.rand(blk.out_dim, generator=g, dtype=DT) * (
        torch.rand(blk.out_dim, generator=g, dtype=DT) < frac_out)
    cols = torch.nonzero(d > 0).reshape(-1)
    rows = torch.nonzero(r > 0).reshape(-1)
    dense = op.dense_matrix() * r[:, None] * d[None, :]
    maps = _masked_maps(blk, r, d, rows, cols)
    for swap in (False, True):
        mv_c, rmv_c = maps(swap)
        idx = rows if swap else cols
        v = torch.randn(3, idx.numel(), generator=g, dtype=DT)
        gram = (dense @ dense.T)[rows][:, rows] if swap else (dense.T @ dense)[cols][:, cols]
        got = rmv_c(mv_c(v))
        assert torch.allclose(got, v @ gram.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frac_in,frac_out", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.4), (0.3, 0.6)])
@pytest.mark.parametrize("scaled", [False, True])
def test_compact_is_the_masked_submatrix(frac_in, frac_out, scaled):
    """``_compact`` (which skips the selection when every row / column is active) equals
    ``(R S_out A S_in D)[rows][:, cols]`` formed the plain way."""
    g = torch.Generator().manual_seed(int(10 * frac_in + 100 * frac_out) + scaled)
    w = torch.randn(7, 11, generator=g, dtype=DT)
    s_in = torch.rand(11, generator=g, dtype=DT) + 0.5 if scaled else None
    s_out = torch.rand(7, generator=g, dtype=DT) + 0.5 if scaled else None
    blk = AffineBlock([LinearOp("fc", w, None)], relu=True)
    blk.s_in, blk.s_out = s_in, s_out
    d = (torch.rand(11, generator=g, dtype=DT) < frac_in).to(DT)
    r = torch.rand(7, generator=g, dtype=DT) * (torch.rand(7, generator=g, dtype=DT) < frac_out)
    cols = torch.nonzero(d > 0).reshape(-1)
    rows = torch.nonzero(r > 0).reshape(-1)
    full = w * (r if s_out is None else r * s_out)[:, None]
    full = full * (d if s_in is None else d * s_in)[None, :]
    got = _compact(blk, blk.dense_fn(), rows, cols, r, d)
    assert torch.equal(got, full[rows][:, cols])


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8, 9])
def test_dense_block_products_equal_plain_products(batch):
    g = torch.Generator().manual_seed(batch)
    m = torch.randn(37, 53, generator=g, dtype=DT)
    p = DenseProducts(m)
    v = torch.randn(batch, 53, generator=g, dtype=DT)
    y = torch.randn(batch, 37, generator=g, dtype=DT)
    assert torch.allclose(p.mv(v), v @ m.T, rtol=1e-13, atol=1e-13)
    assert torch.allclose(p.rmv(y), y @ m, rtol=1e-13, atol=1e-13)
    assert p.mv(v).is_contiguous() and p.rmv(y).is_contiguous()
    p.drop_transpose()
    assert torch.allclose(p.rmv(y), y @ m, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- in the analyzer
@pytest.fixture(scope="module")
def block_everywhere():
    """Lower the analyzer's size threshold for block runs (module-wide: hypothesis runs
    many examples per test)."""
    import lipbound.analyzer as az

    old = az.DENSE_BLOCK_MIN
    az.DENSE_BLOCK_MIN = 0
    yield
    az.DENSE_BLOCK_MIN = old


@settings(max_examples=n_examples(15), deadline=None)
@given(seed=st.integers(0, 10 ** 6), eps=st.sampled_from([0.01, 0.3, 3.0]))
def test_analyzer_block_runs_are_sound(block_everywhere, seed, eps):
    """With the size threshold lowered, the analyzer runs block Lanczos on the fully
    connected layers of random networks: local and global bounds stay above brute-force lower
    bounds and exact products of norms, and the block method is what was used."""
    from core_helpers import local_lower_bound
    from lipbound import Analyzer

    g = torch.Generator().manual_seed(seed)
    widths = [int(v) for v in torch.randint(30, 90, (3,), generator=g)]
    layers: list[torch.nn.Module] = []
    n_in = 20
    for w in widths:
        lin = torch.nn.Linear(n_in, w).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(w, n_in, generator=g, dtype=DT) / math.sqrt(n_in))
            lin.bias.copy_(torch.randn(w, generator=g, dtype=DT) * 0.3)
        layers += [lin, torch.nn.ReLU()]
        n_in = w
    out = torch.nn.Linear(n_in, 5).double()
    model = torch.nn.Sequential(*layers, out).eval()
    x0 = torch.randn(1, 20, generator=g, dtype=DT)
    an = Analyzer(model, (20,), spectral="lanczos", seed=seed)
    glob = an.global_bound()
    true_global = math.prod(spectral_norm(m.weight.detach()) for m in model
                            if isinstance(m, torch.nn.Linear))
    assert glob.value >= true_global
    assert any(lf.spectral_method == "block-lanczos" for lf in glob.layers)
    fresh = Analyzer(model, (20,), spectral="lanczos", seed=seed).local_bound(x0, eps)
    lo, info = local_lower_bound(model, x0, eps, seed=seed, n_samples=300, ascent_starts=2)
    assert fresh.value >= lo, info
    for lf in fresh.layers:
        if lf.spectral_method == "block-lanczos":
            assert lf.guarantee == Guarantee.PROBABILISTIC and 0 < lf.failure_prob <= 1e-6
