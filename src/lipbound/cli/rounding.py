"""Numbers shown in tables, rounded in the direction that keeps their guarantee.

A table cell rounded to nearest can state less than the bound it shows: the certified radius
0.35355338917 of ``y = x`` at (1, 0.5) was shown as 0.3536, above the exact smallest
class-changing distance 0.35355339059, and an upper bound 1.23454000... as 1.2345, below the
exact constant 1.23454. Upper bounds (Lipschitz bounds, layer factors, attack radii, failure
probabilities) are therefore shown rounded up, lower bounds (certified radii) rounded down,
from the exact binary value of the float. JSON and CSV files keep the exact floats.
"""

from __future__ import annotations

import math
from typing import Any

from .._rounding import _directed, g_down, g_up
from .common import fmt

__all__ = ["fmt_up", "fmt_down", "fmt_eps", "fmt_radius_in", "g_up", "g_down"]


def fmt_up(v: Any) -> str:
    """:func:`lipbound.cli.common.fmt`'s layout, rounded toward +inf (for upper bounds)."""
    return _fmt(v, True)


def fmt_down(v: Any) -> str:
    """:func:`lipbound.cli.common.fmt`'s layout, rounded toward -inf (for lower bounds)."""
    return _fmt(v, False)


def _fmt(v: Any, up: bool) -> str:
    if isinstance(v, bool) or not isinstance(v, float) or not math.isfinite(v):
        return fmt(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return _directed(v, ".4e", up)
    return _directed(v, ".4f" if abs(v) < 100 else ".2f", up)


def fmt_eps(eps: Any) -> str:
    """A radius a bound was computed for, exactly (the shortest string that reads back as the
    same float): rounded either way it would state the bound for another ball (0.123456
    shown as 0.1235 is a larger ball than the one bounded)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return fmt(eps)
    return repr(float(eps))


def fmt_radius_in(radius_in: float, eps: float) -> str:
    """A layer's input radius in the per-layer tables: the bound's own ``eps`` exactly
    (:func:`fmt_eps`), the radii grown by the layers before (upper bounds) rounded up."""
    return fmt_eps(radius_in) if radius_in == eps else fmt_up(radius_in)
