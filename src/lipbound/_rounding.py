"""Numbers written as text, rounded in the direction that keeps their guarantee.

Plain formatting rounds to nearest, and can then state less than the bound it shows (an upper
bound 1.23454000... as 1.2345, below the exact constant 1.23454; a certified radius above the
exact smallest class-changing distance). Upper bounds are written rounded toward +inf, lower
bounds toward -inf, from the exact binary value of the float (:mod:`lipbound.cli.rounding`
for the command line's tables; :func:`lipbound.baselines.compare.format_table`).
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext

__all__ = ["g_up", "g_down"]


def _directed(v: float, spec: str, up: bool) -> str:
    with localcontext() as ctx:
        ctx.rounding = ROUND_CEILING if up else ROUND_FLOOR
        s = format(Decimal(v), spec)  # Decimal(v): the float's exact value
    # the exponent as Python writes floats (1.2346e+06, not Decimal's 1.2346e+6)
    m = re.fullmatch(r"(.*[eE])([+-])(\d+)", s)
    return f"{m.group(1)}{m.group(2)}{int(m.group(3)):02d}" if m else s


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
