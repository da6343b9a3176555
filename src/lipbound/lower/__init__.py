"""Empirical lower bounds on the local Lipschitz constant relative to ``x0``.

The quantity is ``L(x0, eps) = sup_{0 < ||x - x0|| <= eps} ||C (f(x) - f(x0))|| / ||x - x0||``
(L2 norms, ``C`` an optional output map). Every method returns a
:class:`LowerBoundResult` whose value is a ratio attained by its witness ``x`` and
recomputed from it with fresh forward passes, so it never exceeds the true constant (up
to the rounding of the model's own forward pass; on CUDA the public functions run it in IEEE
float32, without TF32, see :mod:`lipbound._precision`).

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
