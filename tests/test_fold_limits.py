"""Rule 3's limits with layers whose exact scale is only known within ``fold_rel``.

A float32 model computing ``x * 0.1`` multiplies by ``fl32(0.1)``, 1.5e-8 above the 0.1
lipbound stores (:mod:`lipbound.ops.scalar` carries the difference as ``fold_rel``). The
row norms of the stored block are then smaller than the exact layer's by up to that factor;
the margin ``SAFETY`` (1e-9) of ``ȳ`` did not cover it, and a ReLU that turns on at the edge
of the ball looked stably off: a certified bound of 0 for a network whose local constant is
5e-4.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

import lipbound
from lipbound.analyzer import _relu_slopes


class _Scaled(nn.Module):
    """``1e6 relu(0.1 x - fl32(0.1))`` in float32 (one input, one output)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(1, 1)
        self.l2 = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.l1.weight.fill_(1.0)
            self.l1.bias.fill_(-0.1)  # float32: -fl32(0.1)
            self.l2.weight.fill_(1e6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x * 0.1)))


def _exact_ratio(eps: float) -> float:
    """``(f(eps) - f(0)) / eps`` of the network with the constant as the float32 model uses
    it, in rationals (a lower bound of its local constant at x0 = 0, radius eps)."""
    c = Fraction(float(torch.tensor(0.1, dtype=torch.float32)))
    y = c * Fraction(eps) - c  # the bias is -fl32(0.1) = -c
    return float(Fraction(10 ** 6) * max(y, Fraction(0)) / Fraction(eps))


def test_a_relu_that_turns_on_through_a_rounded_constant_is_not_stably_off() -> None:
    m = _Scaled().eval()
    eps = 1 + 5e-9  # on at x = eps for fl32(0.1); off for 0.1 plus rule 3's old margin
    truth = _exact_ratio(eps)
    assert truth > 4e-4
    for spectral in ("exact", "auto"):
        r = lipbound.local_bound(m, torch.zeros(1, 1), eps, spectral=spectral)
        assert r.value >= truth, (spectral, r.value, truth)  # was 0.0, certified
    rt = lipbound.local_bound(m, torch.zeros(1, 1), eps, spectral="exact", tight=True)
    assert rt.value >= truth


def test_relu_slopes_widen_the_radius_by_the_fold_factor() -> None:
    """The unit sits 3e-9 (relative) below the stored radius: off with the stored row norm,
    and on once the row norm may be 1e-7 larger."""
    rn = torch.tensor([1.0], dtype=torch.float64)
    y0 = torch.tensor([-(1 + 3e-9)], dtype=torch.float64)
    e_out = torch.zeros(1, dtype=torch.float64)
    moving = torch.tensor([True])
    r, on, _ = _relu_slopes(y0, e_out, rn, 1.0, moving)
    assert not bool(on[0]) and float(r[0]) == 0.0  # within the stored limits: off
    r, on, _ = _relu_slopes(y0, e_out, rn, 1.0, moving, 1 + 1e-7)
    assert bool(on[0]) and float(r[0]) > 0.0
    # no change without folded layers (the same bits as before)
    r1, on1, m1 = _relu_slopes(-y0, e_out, rn, 0.5, moving)
    r2, on2, m2 = _relu_slopes(-y0, e_out, rn, 0.5, moving, 1.0)
    assert torch.equal(r1, r2) and torch.equal(on1, on2) and torch.equal(m1, m2)
