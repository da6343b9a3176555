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
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext
from typing import Any

from .common import fmt


def _directed(v: float, spec: str, up: bool) -> str:
    with localcontext() as ctx:
        ctx.rounding = ROUND_CEILING if up else ROUND_FLOOR
        s = format(Decimal(v), spec)  # Decimal(v): the float's exact value
    # the exponent as Python writes floats (1.2346e+06, not Decimal's 1.2346e+6)
    m = re.fullmatch(r"(.*[eE])([+-])(\d+)", s)
    return f"{m.group(1)}{m.group(2)}{int(m.group(3)):02d}" if m else s


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


def g_up(v: float, digits: int) -> str:
    """``f"{v:.{digits}g}"`` rounded toward +inf."""
    return _g(v, digits, True)


def g_down(v: float, digits: int) -> str:
    """``f"{v:.{digits}g}"`` rounded toward -inf."""
    return _g(v, digits, False)


def _g(v: float, digits: int, up: bool) -> str:
    v = float(v)
    if not math.isfinite(v):
        return f"{v:g}"
    s = _directed(v, f".{digits}g", up)
    # no trailing zeros, as Python writes floats with "g" (Decimal keeps them)
    mant, e, exp = s.partition("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return mant + e + exp
