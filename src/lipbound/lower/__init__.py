"""Empirical lower bounds on the local Lipschitz constant relative to ``x0``.

The quantity is ``L(x0, eps) = sup_{0 < ||x - x0|| <= eps} ||C (f(x) - f(x0))|| / ||x - x0||``
(L2 norms, ``C`` an optional output map). Every method returns a :class:`LowerBoundResult`
whose value is a ratio attained by its witness ``x``, recomputed from it with fresh float64
forward passes (a float64 copy of a float32 model: its float32 forward pass rounds ``f(x) -
f(x0)`` too coarsely near ``x0``) and lowered by an allowance for their rounding, so it does
not exceed the network's true constant (up to a rounding estimate, see
``details["rounding_error_estimate"]``). The witness lies in the ball exactly. On CUDA the
model's own float32 passes run in IEEE float32, without TF32 (:mod:`lipbound._precision`).

Methods: :func:`random_lower_bound` and :func:`gradient_lower_bound` (the baselines of
Avant & Morgansen, IEEE TNNLS 2023), :func:`pgd_lower_bound` (Jacobian directions plus
multi-start PGD on the ratio) and :func:`best_lower_bound` (all three). Helpers:
:func:`sample_ball`, :func:`ratio_at`, :func:`jacobian_norm_at`, :func:`jacobian_spectrum`.
"""

from lipbound.lower._common import ratio_at
from lipbound.lower.best import best_lower_bound
from lipbound.lower.gradient import gradient_lower_bound
from lipbound.lower.jacobian import (
    JacobianNorm,
    jacobian_matrix,
    jacobian_norm_at,
    jacobian_spectrum,
)
from lipbound.lower.pgd import pgd_lower_bound
from lipbound.lower.result import LowerBoundResult
from lipbound.lower.sampling import random_lower_bound, sample_ball

__all__ = [
    "JacobianNorm",
    "LowerBoundResult",
    "best_lower_bound",
    "gradient_lower_bound",
    "jacobian_matrix",
    "jacobian_norm_at",
    "jacobian_spectrum",
    "pgd_lower_bound",
    "random_lower_bound",
    "ratio_at",
    "sample_ball",
]
