"""Review of the tight local bound (:mod:`lipbound.tight`): regression tests for soundness
bugs found by an adversarial review, each against an exact (rational) or brute-force truth
with no tolerance."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import torch
from torch import nn

from core_helpers import ray_lower, tied_pool_net
from lipbound import Analyzer
from lipbound.results import Guarantee

DT = torch.float64


def _scale_chain(rng: random.Random, sign: int, k: int) -> tuple[list[float], float, Fraction]:
    """``k`` constants whose float64 running product rounds, step after step, in the
    direction ``sign``: the stored product ``s`` and the exact one."""
    cs: list[float] = []
    s, sx = 1.0, Fraction(1)
    for _ in range(k):
        best: tuple[Fraction, float] | None = None
        for _ in range(200):
            c = rng.uniform(0.7, 1.4)
            rel = (Fraction(s * c) - sx * Fraction(c)) / (sx * Fraction(c))
            if best is None or sign * rel > sign * best[0]:
                best = (rel, c)
        c = best[1]
        cs.append(c)
        s, sx = s * c, sx * Fraction(c)
    return cs, s, sx


class _ScaledChain(nn.Module):
    """x -> relu(W1 x + b) scaled per unit by a chain of k constant multiplications -> W2:
    W2 is chosen so that the float64 rows through the stored product of the scales cancel
    exactly, while the exact network's Jacobian is the product's rounding, amplified."""

    def __init__(self, k: int, seed: int = 0):
        super().__init__()
        rng = random.Random(seed)
        c1, s1, self.s1x = _scale_chain(rng, +1, k)
        c2, s2, self.s2x = _scale_chain(rng, -1, k)
        self.s1, self.s2, self.k = s1, s2, k
        self.l1 = nn.Linear(2, 2).to(DT)
        self.l2 = nn.Linear(2, 1).to(DT)
        with torch.no_grad():
            self.l1.weight.copy_(torch.tensor([[1.0, 0.5], [1.0, 0.5]], dtype=DT))
            self.l1.bias.fill_(10.0)  # every unit stably active in the ball
            self.l2.weight.copy_(torch.tensor([[s2, -s1]], dtype=DT))
            self.l2.bias.zero_()
        for i in range(k):
            self.register_buffer(f"c{i}", torch.tensor([c1[i], c2[i]], dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        for i in range(self.k):
            h = h * getattr(self, f"c{i}")
        return self.l2(torch.relu(h))

    def exact_local_constant(self) -> float:
        """The network is affine in the ball: its exact Jacobian's norm, from rationals (a
        lower bound: rounded down)."""
        d = Fraction(self.s2) * self.s1x - Fraction(self.s1) * self.s2x
        sq = d * d * (Fraction(1) + Fraction(1, 4))
        return math.nextafter(math.sqrt(float(sq)), 0.0) * (1 - 1e-15)


def test_product_of_diagonal_scales_rounding() -> None:
    """A block's stored scale is the float64 product of its diagonal layers' scales (here 40
    multiplications by constants, float64 model, nothing folded: ``fold_factor`` 1); the
    rows' rounding bound ignored that product's rounding, and rows that cancel exactly in
    float64 gave a certified 3.6e-15 for an exact local constant of 1.0e-14."""
    net = _ScaledChain(40).eval()
    x0 = torch.zeros(1, 2, dtype=DT)
    an = Analyzer(net, (2,), spectral="exact")
    assert an.blocks[0].fold_factor == 1.0  # (the case: no folded layer)
    r = an.local_bound(x0, 0.1, tight=True)
    true = net.exact_local_constant()
    assert true > 5e-15  # (the construction worked: the rounding is amplified)
    assert r.guarantee == Guarantee.CERTIFIED
    assert r.value >= true


class _Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.25]], dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T


def test_user_op_without_abs_lin_t_falls_back() -> None:
    """A user-registered mixing op with ``abs_lin`` but no ``abs_lin_t`` crashed
    ``local_bound(..., tight=True)`` with a bare NotImplementedError; now the paper's product
    is reported with the reason."""
    from lipbound.ops.base import MixingOp
    from lipbound.ops.registry import MODULE_RULES, register_rule

    class DenseOp(MixingOp):
        def __init__(self, name, i, o, w):
            super().__init__(name, i, o)
            self.w = w.detach().to(DT)

        def forward(self, x):
            return x @ self.w.T

        def lin(self, x):
            return x @ self.w.T

        def lin_t(self, y):
            return y @ self.w

        def sq_rows(self, w):
            return w @ (self.w ** 2).T

        def abs_lin(self, x):
            return x @ self.w.abs().T

    register_rule(_Dense, lambda m, name, i, o: DenseOp(name, i, o, m.w))
    try:
        net = nn.Sequential(_Dense(), nn.ReLU(), nn.Linear(3, 2)).to(DT).eval()
        an = Analyzer(net, (2,), spectral="exact")
        x0 = torch.tensor([[0.3, -0.2]], dtype=DT)
        plain = an.local_bound(x0, 0.1)
        r = an.local_bound(x0, 0.1, tight=True)
        assert r.value == plain.value
        assert "abs_lin_t" in r.notes[-1]
    finally:
        MODULE_RULES.pop(_Dense, None)


def test_tight_report_keeps_the_local_nominal_error() -> None:
    """With a probabilistic global bound below the local product (reported by the plain
    path, nominal error NaN), the tight result carried the local failure probability alone
    but still a NaN nominal error: the radius search then used the global factors' nominal
    error, whose failure probability it did not count. The tight result now carries the
    local factors' nominal error, valid under its own event."""
    from core_helpers import all_active_net

    net, x0 = all_active_net()
    an = Analyzer(net, (2,), spectral="lanczos")
    gb = an.global_bound()
    plain = an.local_bound(x0, 0.3)
    r = an.local_bound(x0, 0.3, tight=True)
    assert gb.guarantee == Guarantee.PROBABILISTIC
    assert any(n.startswith("the global bound was smaller") for n in plain.notes)
    assert math.isnan(plain.nominal_error)  # (the case)
    assert any(n.startswith("tight bound (") for n in r.notes)
    assert r.failure_prob < plain.failure_prob  # the local event alone
    assert math.isfinite(r.nominal_error) and r.nominal_error > 0


def test_many_unstable_windows_fall_back_before_allocating() -> None:
    """A constant 200 x 200 image ties every max pooling window at x0: the pooling
    secant formed its 353584 deviation rows of 640000 entries (a 1.4 TB allocation) before
    the budget check, and ``local_bound(..., tight=True)`` raised a RuntimeError instead of
    reporting the paper's product. (Now the hybrid is formed on the last layer's tail: the
    light pass counts the windows' rows without forming them.)"""
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 100 * 100, 10)).to(DT).eval()
    x0 = torch.full((1, 1, 200, 200), 0.5, dtype=DT)
    an = Analyzer(net, (1, 200, 200))
    plain = an.local_bound(x0, 1e-3)
    r = an.local_bound(x0, 1e-3, tight=True)
    assert r.value <= plain.value and r.guarantee == plain.guarantee
    assert any("exceed the budget of 2048" in n for n in r.notes)


POOLS = {"overlap": [nn.MaxPool2d(3, 1)], "dilated": [nn.MaxPool2d(2, 1, dilation=2)],
         "stride>kernel": [nn.MaxPool2d(2, 3)], "two": [nn.MaxPool2d(2, 1), nn.MaxPool2d(2, 1)],
         "kernel1": [nn.MaxPool2d(1, 1)]}


def test_pooling_geometries_sound() -> None:
    """Overlapping, dilated, stride > kernel, kernel 1 and two consecutive max poolings, after
    a ReLU or directly after the affine map, windows tied at x0, a ReLU as last layer: the
    tight bound is above a lower bound from rays (no tolerance)."""
    x0 = torch.zeros(1, 2, dtype=DT)
    for kind in ("overlap", "dilated", "stride>kernel", "two", "kernel1"):
        for seed in (0, 1):
            net = tied_pool_net(POOLS[kind], seed)
            an = Analyzer(net, (2,), spectral="exact")
            for eps in (0.05, 1.0):
                r = an.local_bound(x0, eps, tight=True)
                assert r.value >= ray_lower(net, x0, eps), (kind, seed, eps)
