"""The lower bounds' rounding allowance with an output map that cancels.

At ``eps = 1e-6`` a witness's output change is ~1e-7 while the outputs themselves are ~5:
their float64 rounding (a few ulps of the outputs) is then ~1e-8 of the change. The
allowance was ``4 u ||C f(x0)||``, which for a margin row ``e_c - e_j`` of two close logits
understates it: ``best_lower_bound`` reported 0.10220950313 for a row whose exact local
constant is 0.10220950275 (the network is affine in the ball), above the certified (and
here nearly exact) tight upper bound.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from lipbound import Analyzer
from lipbound.lower import best_lower_bound
from test_tight import fc_net

DT = torch.float64


def _exact_row_norm_sq(net, x0: torch.Tensor, c: torch.Tensor) -> Fraction:
    """``||c^T J(x0)||^2`` in rationals for a Linear-ReLU-...-Linear net (float64 weights)."""
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    h = [Fraction(float(v)) for v in x0.reshape(-1)]
    jac = None  # rows: d h / d x0
    n = len(h)
    jac = [[Fraction(int(i == j)) for j in range(n)] for i in range(n)]
    for k, lin in enumerate(layers):
        w = [[Fraction(float(v)) for v in row] for row in lin.weight.detach()]
        b = [Fraction(float(v)) for v in lin.bias.detach()]
        y = [sum(wi[j] * h[j] for j in range(len(h))) + b[i] for i, wi in enumerate(w)]
        jy = [[sum(wi[j] * jac[j][m] for j in range(len(h))) for m in range(n)] for wi in w]
        if k < len(layers) - 1:  # ReLU: the net is affine near x0 when no y is 0
            assert all(v != 0 for v in y)
            h = [max(v, Fraction(0)) for v in y]
            jac = [row if v > 0 else [Fraction(0)] * n for v, row in zip(y, jy, strict=True)]
        else:
            h, jac = y, jy
    cf = [Fraction(float(v)) for v in c.reshape(-1)]
    row = [sum(cf[i] * jac[i][m] for i in range(len(cf))) for m in range(n)]
    return sum(v * v for v in row)


def test_margin_row_lower_bound_at_a_tiny_radius_is_below_the_exact_constant():
    net, shape = fc_net(130, 2)
    x0 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(131), dtype=DT)
    out = net(x0)[0]
    c, j = int(out.argmax()), 0
    row = torch.zeros(1, out.numel(), dtype=DT)
    row[0, c], row[0, j] = 1.0, -1.0
    eps = 1e-6
    exact_sq = _exact_row_norm_sq(net, x0, row[0])
    low = best_lower_bound(net, x0, eps, seed=130, output_map=row, n_random=128,
                           gradient_steps=10, pgd_restarts=4, pgd_steps=10, pgd_refine=2,
                           pgd_refine_steps=10)
    assert Fraction(low.value) ** 2 <= exact_sq  # (was 0.10220950313 > 0.10220950275)
    # the network is affine in this ball: the tight row bound is the exact constant (up to
    # its rounding margin) and above the lower bound
    an = Analyzer(net, shape, spectral="exact")
    up = float(an.local_bound_rows(x0, eps, row, tight=True).values[0])
    assert Fraction(up) ** 2 >= exact_sq and low.value <= up <= float(exact_sq) ** 0.5 * 1.01
