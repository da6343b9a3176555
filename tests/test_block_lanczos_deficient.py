"""Session 25: a block Lanczos run whose remainder block is (numerically) rank-deficient -- a
low-rank operator, e.g. a dense layer with duplicated or zero rows -- goes on with the
remainder orthonormalised with pivoting (its tiny rows kept in ``B_j``), instead of ending as if
the start block's span were invariant (Ritz values 0.15-0.99 of the norm and, before 3 steps,
no a posteriori bound: the layer was run again with a single vector).

The a posteriori bound rests on the block three-term relation being exact to rounding; the
tests check that relation for the pivoted block, and the bound itself from start blocks whose
overlap with the top eigenvector is exactly at the floor (the worst start the bound allows)."""

from __future__ import annotations

import math

import pytest
import torch

from lipbound import lanczos
from lipbound.lanczos import _pivoted_block, run_lanczos
from lipbound.posterior import block_overlap_floor
from lipbound.results import Guarantee
from lipbound.spectral import spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _low_rank(n: int, r: int, seed: int, kind: str = "spread") -> tuple[torch.Tensor, float]:
    """An r x n operator M of rank r (its norm is returned too)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=DT))[0]
    if kind == "spread":
        s = torch.linspace(1.0, 3.0, r, dtype=DT)
    elif kind == "near":
        s = torch.ones(r, dtype=DT)
        s[-1] = 1.0001
    else:  # "scales"
        s = (0.1 + torch.rand(r, generator=g, dtype=DT)) * 1e3
    return (u * s).T.contiguous(), float(s.max())


def test_pivoted_block_keeps_the_relation_exact():
    """w = B^T V to rounding, V orthonormal and orthogonal to the basis, and every entry of a
    row of B at most its pivot (so a direction of rounding noise multiplies tiny numbers)."""
    g = torch.Generator().manual_seed(0)
    n, b = 120, 8
    basis = torch.linalg.qr(torch.randn(n, 16, generator=g, dtype=DT))[0].T.contiguous()
    # a remainder of rank 3 (plus rounding-size noise), orthogonal to the basis
    w = torch.randn(b, 3, generator=g, dtype=DT) @ torch.randn(3, n, generator=g, dtype=DT)
    w += 1e-15 * torch.randn(b, n, generator=g, dtype=DT)
    w -= (w @ basis.T) @ basis
    w[5] = 0.0  # an exactly zero row: a fresh random direction
    v, bmat = _pivoted_block(w, basis, torch.Generator().manual_seed(1))
    scale = float(w.abs().max())
    assert float((w - bmat.T @ v).abs().max()) <= 1e-14 * scale
    assert float((v @ v.T - torch.eye(b, dtype=DT)).abs().max()) <= 1e-13
    assert float((v @ basis.T).abs().max()) <= 1e-13
    piv = bmat.abs().max(dim=1).values
    assert bool((piv[3:] <= 1e-12 * scale).all())  # three directions carry the rank


@pytest.mark.parametrize("n, r, kind", [(84, 16, "spread"), (248, 10, "near"),
                                        (130, 4, "scales"), (270, 7, "spread"),
                                        (333, 5, "near"), (70, 2, "spread")])
def test_low_rank_runs_go_on_and_bound(n, r, kind, monkeypatch):
    """The run passes through deficient remainders, reaches the exact norm (the Ritz value
    of a basis holding the operator's range) and has an a posteriori bound above it."""
    calls = []
    real = lanczos._pivoted_block

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(lanczos, "_pivoted_block", counting)
    m, true = _low_rank(n, r, seed=n + r)
    c = block_overlap_floor(n, 8, 1e-7)
    res = run_lanczos(lambda x: x @ m.T, lambda y: y @ m, n, 32,
                      torch.Generator().manual_seed(3), "cpu", block=8, post_c=c,
                      post_stop=1.001)
    assert calls
    assert res.sqrt_theta <= true * (1 + 1e-12)
    assert res.sqrt_theta == pytest.approx(true, rel=1e-9)
    assert true * (1 - 1e-12) <= res.post_sqrt < 1.5 * true


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("log_c", [-2.0, -5.0, -8.0])
def test_bound_holds_for_a_start_at_the_floor(seed, log_c, monkeypatch):
    """A start block whose span meets the top eigenvector with ||V x_1||^2 exactly c (the
    worst case the bound allows) on a low-rank operator: the run goes through deficient
    remainders and its a posteriori bound is still at least the norm."""
    n, b = 150, 8
    r = 3 + 2 * seed
    m, true = _low_rank(n, r, seed, ("spread", "near", "scales")[seed % 3])
    x1 = torch.linalg.svd(m, full_matrices=False)[2][0]  # top right singular vector
    c = 10.0 ** log_c
    g = torch.randn(n, b, generator=torch.Generator().manual_seed(seed + 10), dtype=DT)
    g -= x1[:, None] * (x1 @ g)[None, :]
    g = torch.linalg.qr(g)[0]
    g[:, 0] = math.sqrt(c) * x1 + math.sqrt(1.0 - c) * g[:, 0]
    start = g.T.contiguous()
    assert float(((start @ x1) ** 2).sum()) == pytest.approx(c, rel=1e-6)
    monkeypatch.setattr(lanczos, "_start_block", lambda *a, **k: start.clone())
    calls = []
    real = lanczos._pivoted_block
    monkeypatch.setattr(lanczos, "_pivoted_block", lambda *a: calls.append(1) or real(*a))
    res = run_lanczos(lambda x: x @ m.T, lambda y: y @ m, n, 24,
                      torch.Generator().manual_seed(0), "cpu", block=b, post_c=c)
    assert calls
    assert res.post_sqrt >= true * (1 - 1e-12)
    assert res.sqrt_theta <= true * (1 + 1e-12)


def test_low_rank_dense_layer_keeps_its_block_bound():
    """Through spectral_upper: a 300 x 320 layer of rank 6 (duplicated rows) is bounded by
    the block run itself (before, its run ended at the first deficient remainder without an
    a posteriori bound and the layer was run again with a single vector)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 320, generator=g, dtype=DT)
    mat = base[torch.arange(300) % 6]
    true = float(torch.linalg.matrix_norm(mat, 2))
    res = spectral_upper(lambda x: x @ mat.T, lambda y: y @ mat, n_in=320, n_out=300,
                         cols=torch.arange(320), rows=torch.arange(300), device="cpu",
                         apply_flops=float(300 * 320), mode="lanczos", steps=32,
                         failure_prob=1e-6, generator=torch.Generator().manual_seed(0),
                         block=8)
    assert res.value >= true * (1 - 1e-12)
    assert res.guarantee == Guarantee.PROBABILISTIC and res.method == "block-lanczos", res
    assert res.value <= 1.05 * true
