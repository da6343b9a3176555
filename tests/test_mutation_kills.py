"""Tests that kill mutations of the soundness-critical code that the rest of the suite let
through (session 25; the driver and the table of all 40 mutations: notes/mutation_s25.py and
notes/mutation_s25.md).

Each test checks a reported number against an independent reference (rational arithmetic
with :class:`fractions.Fraction`, 50-digit mpmath, an explicitly formed matrix and its SVD,
gradients sampled with autograd), with tolerances only in the safe direction; its docstring
names the mutation it kills. Each passes on the library's code and fails on its mutant
(``notes/mutation_s25.py --extra tests/test_mutation_kills.py M06 ...``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
import lipbound.baselines.exact as exact_mod
import lipbound.radius
import lipbound.spectral as spectral_mod
from lipbound.baselines.exact import lipmip
from lipbound.lanczos import LanczosResult
from lipbound.ops.winograd import WinogradConv, toom_cook
from lipbound.spectral import _certified_gram_norm


@pytest.mark.parametrize("eps", [3e-12, 1e-11, 3e-11, 1e-13])
def test_secant_slope_uses_the_upper_end_of_the_nominal_value(eps):
    """Kills M06 (analyzer.py, rule 1: the secant slope ``ȳ / (ȳ - y0)`` formed with the
    computed ``y0`` instead of its upper end ``y0 + e``, ``e`` the bound on the nominal
    pass's rounding). In ``relu(-relu(x / 3) + b2)`` at ``x0 = 3`` the first layer computes
    ``fl(1/3) * 3 = 1`` for the exact ``1 - 2^-54``, so the second pre-activation is computed
    5.6e-17 below its exact value ``y* = -2.94e-15``; the unit turns on inside a ball of
    radius ``eps`` (``eps / 3 > |y*|``) and the exact local constant is
    ``(y* + eps/3) / eps`` (the ratio grows with the distance; rational arithmetic). The
    mutation's bound is 5e-6 to 5e-5 (relative) too small for the first three radii."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU()).double().eval()
    a1 = 1.0 / 3.0
    with torch.no_grad():
        net[0].weight.fill_(a1)
        net[0].bias.zero_()
        net[2].weight.fill_(-1.0)
        net[2].bias.fill_(1.0 - 3e-15)
    b2 = Fraction(float(net[2].bias.detach()))
    x0 = torch.tensor([[3.0]], dtype=torch.float64)
    y_star = -Fraction(a1) * 3 + b2
    assert y_star < 0 < y_star + Fraction(a1) * Fraction(eps)
    exact = (y_star + Fraction(a1) * Fraction(eps)) / Fraction(eps)
    # (the sup is attained at x0 - eps, inside the first ReLU's active region)
    assert Fraction(lipbound.local_bound(net, x0, eps).value) >= exact


def test_block_run_and_its_retry_use_shares_that_add_up_to_delta(monkeypatch):
    """Kills M12 (spectral.py: the single-vector run that follows a block run without a
    bound given the whole ``δ`` instead of the rest ``(1 - BLOCK_SHARE) δ``: the reported
    bound fails if either run's event fails, so the two shares must add up to at most the
    ``δ`` reported). tests/test_review_fixes.py checks the floors with ``pytest.approx``,
    whose default absolute tolerance 1e-12 is far above floors of order 1e-15: every share
    passed there. Here the failure probabilities the runs are planned with are recorded and
    summed exactly."""
    n, delta = 200, 1e-6
    planned: list[tuple[int, float]] = []
    real_params = spectral_mod.run_parameters
    real_run = spectral_mod.run_lanczos

    def params(n_used, steps, failure_prob, alts, block=1):
        planned.append((block, failure_prob))
        return real_params(n_used, steps, failure_prob, alts, block)

    def run(*a, block=1, **kw):
        res = real_run(*a, block=block, **kw)
        if block > 1:  # the block run finds no bound: the single-vector run follows
            return LanczosResult(res.theta, res.vector, res.k, res.dim,
                                 sqrt_theta=res.sqrt_theta, image=res.image,
                                 matvecs=res.matvecs, block=block)
        return res
    monkeypatch.setattr(spectral_mod, "run_parameters", params)
    monkeypatch.setattr(spectral_mod, "run_lanczos", run)
    g = torch.Generator().manual_seed(3)
    mat = torch.randn(n, n, generator=g, dtype=torch.float64)
    res = spectral_mod.spectral_upper(
        lambda v: v @ mat.T, lambda y: y @ mat, n_in=n, n_out=n, cols=torch.arange(n),
        rows=torch.arange(n), device="cpu", apply_flops=float(n * n), mode="lanczos",
        steps=30, failure_prob=delta, generator=torch.Generator().manual_seed(0), block=8)
    assert [b for b, _ in planned] == [8, 1]
    assert res.failure_prob == delta
    assert sum(Fraction(fp) for _, fp in planned) <= Fraction(delta) * (1 + Fraction(1, 10**12))
    assert res.value >= float(torch.linalg.matrix_norm(mat, 2))


def _abs_winograd(w: torch.Tensor, pad: tuple[int, int]) -> WinogradConv:
    """The Winograd pipeline of ``w`` with every transform and tap in absolute value: its
    ``conv`` / ``conv_t`` apply the non-negative map ``N`` of the error bound's proof
    (``Σ_c |A^T| ((|G| |g_kc| |G|^T) ⊙ (|B^T| d_c |B|)) |A|`` per tile)."""
    ab = WinogradConv(w.abs(), pad)
    bt, g, at = toom_cook(ab.m, ab.r)
    ab._kb = torch.kron(bt.abs(), bt.abs())
    ab._ka = torch.kron(at.abs(), at.abs())
    ab._u = WinogradConv._transform(g.abs(), w.abs())
    ab._ut = WinogradConv._transform(g.abs(), torch.flip(w.abs(), dims=(2, 3)).transpose(0, 1))
    return ab


@pytest.mark.parametrize(("k", "c", "r", "hw", "ones"), [
    (4, 3, 3, 12, False), (3, 2, 5, 10, False), (2, 2, 5, 12, True), (1, 1, 5, 16, True)])
def test_winograd_error_bound_covers_the_explicit_absolute_map(k, c, r, hw, ones):
    """Kills M16 (ops/winograd.py: the factor ``ceil(6/m)^2`` (tiles that read one input
    element) dropped from the column sums in ``error_bound``). The computed products are
    within ``γ_L N |x|`` of the exact ones (Higham's componentwise bound, ``L = 2 c + 200``),
    so the stated ``Δ`` must be at least ``γ_L ||N||_2``: here ``N`` is formed explicitly
    (the absolute-value pipeline applied to every basis vector) and its norm taken by SVD,
    for the product and for the transpose."""
    g = torch.Generator().manual_seed(k * 100 + hw)
    w = torch.ones(k, c, r, r, dtype=torch.float64) if ones else \
        torch.randn(k, c, r, r, generator=g, dtype=torch.float64)
    pad = (r // 2, r // 2)
    delta = WinogradConv(w, pad).error_bound()
    ab = _abs_winograd(w, pad)
    n_in = c * hw * hw
    n_fwd = ab.conv(torch.eye(n_in, dtype=torch.float64).reshape(n_in, c, hw, hw))
    n_fwd = n_fwd.reshape(n_in, -1).T
    n_out = n_fwd.shape[0]
    n_t = ab.conv_t(torch.eye(n_out, dtype=torch.float64).reshape(n_out, k, hw, hw))
    n_t = n_t.reshape(n_out, -1).T
    u = 2.0 ** -53
    for mat, chan in ((n_fwd, c), (n_t, k)):
        nu = (2 * chan + 200) * u
        assert delta >= nu / (1 - nu) * float(torch.linalg.matrix_norm(mat, 2)) * (1 + 1e-12)


def test_exact_norm_certificate_holds_for_any_backward_stable_cholesky():
    """Kills M17 (spectral.py: the backward-error term ``γ_c trace(B̂) / ...`` dropped from
    ``_cholesky_cert``). The certificate may assume neither an accurate eigensolver nor
    LAPACK's particular rounding, only Higham's Theorem 10.3: a computed factorisation of
    ``B̂ = fl(μ I - Ĝ)`` has ``R^T R = B̂ + ΔB`` with ``||ΔB|| <= γ_{n+1} Σ ||r_j||^2``, so it
    may complete whenever ``λmin(B̂) > -γ_{n+1} trace(B̂)``. Here the eigensolver's value is
    1.9e-8 low and the factorisation completes exactly when the theorem allows (half of that
    slack); the certified norm must still be at least the exact ``||M||_2`` (50-digit
    mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(0)
    k, n = 60, 40
    m = rng.standard_normal((k, 1)) @ rng.standard_normal((1, n)) \
        + 1e-3 * rng.standard_normal((k, n))
    peak = float(np.abs(m).max())
    ms = m / peak
    gram = ms.T @ ms  # Ĝ, as exact_norm forms it
    frob2 = float(np.einsum("ij,ij->", ms, ms))
    gd = np.diag(gram).tolist()
    with mpmath.workdps(50):
        lam_hat = max(mpmath.eigsy(mpmath.matrix(gram.tolist()), eigvals_only=True))
        mm = mpmath.matrix(m.tolist())
        true_sq = max(mpmath.eigsy(mm.T * mm, eigvals_only=True))
        u = 2.0 ** -53
        gam = (n + 1) * u / (1 - (n + 1) * u)
        completed = []

        def factor(mu: float) -> tuple[bool, float]:
            tr = math.fsum(mu - g for g in gd)  # trace of fl(μ I - Ĝ)
            ok = bool(mpmath.mpf(mu) - lam_hat > -0.5 * gam * tr)
            completed.append(ok)
            return ok, tr

        # an eigensolver 1.9e-8 low: the fifth higher level tried lands 500 u below λmax(Ĝ)
        lam = float(lam_hat) * (1 - 500 * u) / (1 + 64 * n * u * 16.0 ** 4)
        value = _certified_gram_norm(lam, frob2, k, n, peak, max(gd), math.fsum(gd), factor)
        assert completed[-1] and not any(completed[:-1])  # (the level below λmax was used)
        assert mpmath.mpf(value) ** 2 >= true_sq


class _TimesTenth(nn.Module):
    """A float32 linear layer followed by ``* 0.1``: torch multiplies by the float32
    constant ``0.1f = 0.100000001490116...``, 1.5e-8 relative above the written 0.1."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(x) * 0.1


@pytest.mark.parametrize("seed", range(3))
def test_a_float32_constant_is_covered_by_the_factor(seed):
    """Kills M19 (analyzer.py: a block's spectral factor not multiplied by its
    ``fold_factor``). A float32 model's ``x * 0.1`` multiplies by ``0.1f``, 1.5e-8 above
    0.1, far beyond the factors' relative margin 1e-9: the global and local bounds of this
    one-row linear network must be at least its exact constant ``0.1f ||w||``, in rational
    arithmetic."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 7, generator=g)
    net = _TimesTenth(w).eval()
    x = torch.randn(1, 7, generator=g)
    with torch.no_grad():  # the model does use 0.1f
        assert float((net(x) - net.fc(x) * torch.tensor(0.1, dtype=torch.float32)).abs()) == 0
    c = Fraction(float(torch.tensor(0.1, dtype=torch.float32)))
    exact_sq = c * c * sum((Fraction(v) ** 2 for v in w[0].double().tolist()), Fraction(0))
    assert Fraction(lipbound.global_bound(net, (7,)).value) ** 2 >= exact_sq
    assert Fraction(lipbound.local_bound(net, x, 0.3).value) ** 2 >= exact_sq


def _opposite_linear_classifier(seed: int, scale: float) -> tuple[nn.Module, torch.Tensor]:
    """Two classes with weights ``w`` and ``-w``: the paper's radius ``δ / (sqrt(2) ||W||)``
    is then exactly the distance ``δ / (2 ||w||)`` to the decision boundary (no slack in the
    Lipschitz argument), and ``x0`` far from the origin (``scale``) makes the logits a
    cancellation of large terms, whose float64 rounding is far above the relative margins."""
    g = torch.Generator().manual_seed(seed)
    d = 6
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x0 = torch.randn(1, d, generator=g, dtype=torch.float64) * scale
    s = float(w @ x0[0])
    net = nn.Sequential(nn.Linear(d, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.stack([w, -w]))
        net[0].bias.copy_(torch.tensor([-s + 0.25, s - 0.25], dtype=torch.float64))
    return net, x0


@pytest.mark.parametrize("method", ["local", "margin", "global"])
@pytest.mark.parametrize("seed", range(3))
def test_certified_radius_is_at_most_the_exact_distance_to_the_boundary(seed, method):
    """Kills M22 and M37 (radius.py: the nominal-error allowance of the local test, or the
    nominal deviation of the margin test, added to the threshold instead of subtracted).
    For ``W = [w; -w]`` the exact minimal adversarial distance is ``δ* / (2 ||w||)``, ``δ*``
    the exact margin of the float64 weights at ``x0`` (rational arithmetic); the certified
    radius of every method must not exceed it: ``(2 r ||w||)^2 <= δ*^2``. The logits are sums
    of terms of size 1e8 that cancel to 0.25, so the forward pass's rounding bound (about
    1e-7) decides."""
    net, x0 = _opposite_linear_classifier(seed, 1e8)
    w = [Fraction(v) for v in net[0].weight[0].tolist()]
    b = [Fraction(v) for v in net[0].bias.tolist()]
    xs = [Fraction(v) for v in x0[0].tolist()]
    y0 = sum((p * q for p, q in zip(w, xs, strict=True)), Fraction(0)) + b[0]
    y1 = -sum((p * q for p, q in zip(w, xs, strict=True)), Fraction(0)) + b[1]
    delta = y0 - y1
    assert delta > 0
    res = lipbound.radius.certified_radius(net, x0, method=method)
    assert res.radius > 0  # (a radius is certified: the test below is not vacuous)
    w2 = sum((v * v for v in w), Fraction(0))
    assert (2 * Fraction(res.radius)) ** 2 * w2 <= delta * delta


def test_lipmip_refutes_a_wrong_optimum_of_the_solver(monkeypatch):
    """Kills M29 (baselines/exact.py: lipMIP's check of HiGHS's optimum against gradients
    sampled in the box skipped). The solver is replaced by one whose first answer is a wrong
    "optimal" point (the pattern of *smallest* gradient norm in the box, a feasible MILP
    point, as HiGHS 1.16's presolve once returned); the reported value must still be at least
    the gradient norms sampled independently in the box (torch autograd, float64), each a
    value the constant attains."""
    from scipy import optimize

    real = exact_mod._solve_scipy

    def wrong_first(milp, deadline, strict=False):
        if strict:
            return real(milp, deadline, strict)
        res = optimize.milp(c=milp.objective(), constraints=milp.constraints(),
                            integrality=milp.integrality(), bounds=milp.bounds())
        x = np.asarray(res.x, dtype=np.float64)
        fun = -float(milp.objective() @ x)
        return exact_mod._MipOutcome("optimal", x, fun, fun, "faked", "a wrong solver")
    monkeypatch.setattr(exact_mod, "_solve_scipy", wrong_first)
    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    eps = 1.0
    pts = (x0 + eps * (2 * torch.rand(512, 2, generator=g, dtype=torch.float64) - 1))
    pts.requires_grad_(True)
    net(pts).sum().backward()
    sampled = float(pts.grad.abs().sum(dim=1).max())  # ||grad||_1: the l_inf-box constant
    res = lipmip(net, x0, eps, solver="scipy")
    assert res.value >= sampled


def _exact_forward(net: nn.Sequential, x: list[Fraction]) -> list[Fraction]:
    """The network's output at ``x`` in rational arithmetic (Linear and ReLU layers)."""
    h = list(x)
    for layer in net:
        if isinstance(layer, nn.Linear):
            w, b = layer.weight.detach().tolist(), layer.bias.detach().tolist()
            h = [sum((Fraction(a) * v for a, v in zip(row, h, strict=True)), Fraction(0))
                 + Fraction(c) for row, c in zip(w, b, strict=True)]
        else:
            h = [max(v, Fraction(0)) for v in h]
    return h


def test_nominal_error_covers_an_output_that_cannot_move():
    """Kills M38 (analyzer.py ``_nominal_total``: the part ``sqrt(#fixed) η`` of the outputs
    that cannot move in the ball dropped). ``BoundResult.nominal_error`` bounds
    ``||f̂(x0) - f(x0)||`` (the computed float64 output against the exact one; the local
    radius test subtracts it). Here the second logit depends only on two hidden units that
    are constant (zero weights), and is a cancellation of products of size 1e8: its rounding
    (about 2e-9) is not in the moving part's error (1e-14)."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.0], [0.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([5.0, 3.0, 7.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e8 / 3.0, -1e8 / 7.0]],
                                         dtype=torch.float64))
        net[2].bias.copy_(torch.tensor([0.0, 0.5]))
    x0 = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    an = lipbound.Analyzer(net, (2,))
    computed = an.forward(x0)[0].tolist()
    exact = _exact_forward(net, [Fraction(v) for v in x0[0].tolist()])
    err_sq = sum(((Fraction(a) - b) ** 2 for a, b in zip(computed, exact, strict=True)),
                 Fraction(0))
    assert err_sq > 0  # (the check below is not vacuous)
    res = an.local_bound(x0, 0.1)
    assert res.source == "product"
    assert Fraction(res.nominal_error) ** 2 >= err_sq
