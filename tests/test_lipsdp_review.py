"""Adversarial multipliers for the float64 LMI check of LipSDP (review, session 20).

Since solves stopped early (``optimal_inaccurate``, ``user_limit``) are certified by
:func:`lipbound.baselines.lipsdp.certify_lmi` alone, the check must be a proof whatever
``(rho, T)`` it is given. Reference: a 1-D network ``x -> c relu(a x)`` whose global constant
is exactly ``|a c|`` (and whose LipSDP optimum is ``(a c)^2`` at ``t = c^2``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lipbound.baselines.lipsdp import certify_lmi


def _line(a: float, c: float) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array([[a]]), np.zeros(1)), (np.array([[c]]), np.zeros(1))]


@pytest.mark.parametrize("a, c", [(1e10, 1e-160), (1e10, 3.3e-161), (1e5, 1.234e-159),
                                  (1e12, 1.7e-161)])
def test_subnormal_entries_do_not_pass_below_the_constant(a: float, c: float) -> None:
    """``T = c^2`` lies in the subnormal range, where products round absolutely (``c^2``
    itself: up to 2.5e-4 relative): the check passed at ``rho = 0.999 (a c)^2`` (and
    returned a rho below ``(a c)^2``: 0.99989, 0.998, 0.9999992) before its margin counted
    that rounding. Now it passes nothing below ``(a c)^2`` (here: nothing at all)."""
    true_sq = (a * c) ** 2 * (1 - 1e-15)  # (a lower bound on the exact square)
    for t in (c * c, c * c * (1 + 1e-4), 1.5 * c * c):
        for rho in (0.0, 0.5 * true_sq, 0.999 * true_sq):
            cert = certify_lmi(_line(a, c), np.array([t]), rho)
            assert not cert.ok or cert.rho >= true_sq, (a, c, t, rho, cert)


def test_normal_range_unchanged_and_non_finite_multipliers_refused() -> None:
    """In the normal range the check still certifies the optimum of the same line net (to a
    relative 1e-9); non-finite or overflowing multipliers are a failed check with a reason,
    not numpy's LinAlgError (which they raised before)."""
    a, c = 3.0, 0.5
    cert = certify_lmi(_line(a, c), np.array([c * c]), (a * c) ** 2)
    assert cert.ok and (a * c) ** 2 <= cert.rho <= (a * c) ** 2 * (1 + 1e-9)
    absx = [(np.array([[1.0], [-1.0]]), np.zeros(2)), (np.array([[1.0, 1.0]]), np.zeros(1))]
    for t in ([math.nan, 1.0], [math.inf, 1.0], [1e308, 1e308], [-math.inf, 1.0]):
        for rho in (0.5, 2.0):
            with np.errstate(over="ignore", invalid="ignore"):  # (1e308: 2 T overflows)
                cert = certify_lmi(absx, np.array(t), rho)
            assert not cert.ok and cert.reason, (t, rho)
