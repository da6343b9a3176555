"""LipSDP solves stopped before the solver's tolerance (``optimal_inaccurate``, ``user_limit``).

Fazlyab et al., NeurIPS 2019: any ``(rho, T)`` with ``T >= 0`` and ``M(rho, T) <= 0`` proves
``L <= sqrt(rho)``, whatever produced it. The float64 LMI check is that proof, so an SDP
solve stopped early (SCS or Clarabel at an iteration limit) is certified once the check passes, and
its value can only be above the SDP's optimum. Before this test, every status other than
``optimal`` gave NaN (ESTIMATE), a time- or iteration-limited solve never a bound.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from lipbound.baselines import lipsdp
from lipbound.baselines.exact import exact_local_l2_detailed
from lipbound.results import Guarantee

pytest.importorskip("cvxpy")


def _layers(seed: int, dims: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(dims[i + 1], dims[i])) / math.sqrt(dims[i]),
             0.5 * rng.normal(size=dims[i + 1])) for i in range(len(dims) - 1)]


def _status(res) -> str:
    note = next(n for n in res.notes if n.startswith("solver "))
    return note.split("status ")[1].split(",")[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stopped_solves_are_certified_by_the_check_and_sound(seed):
    layers = _layers(seed, [3, 6, 5, 2])
    # the exact local constant over a large ball: a lower bound on the global constant
    lo = exact_local_l2_detailed(layers, np.zeros(3), 50.0).lower
    best = lipsdp(layers)  # Clarabel to its tolerance
    assert best.guarantee is Guarantee.CERTIFIED and best.value >= lo
    seen = 0
    for iters in (5, 10, 20, 50):
        res = lipsdp(layers, solver="SCS", solver_options={"max_iters": iters})
        status = _status(res)
        if status == "optimal_inaccurate" and res.guarantee is Guarantee.CERTIFIED:
            seen += 1
            assert res.value >= lo
            # a feasible point of the SDP: not below its optimum (Clarabel's to 1e-6)
            assert res.value >= best.value * (1 - 1e-6)
            assert any("stopped before its tolerance" in n for n in res.notes)
        elif res.guarantee is Guarantee.CERTIFIED:
            assert res.value >= lo
        else:
            assert math.isnan(res.value) and res.guarantee is Guarantee.ESTIMATE
    assert seen >= 1, "no iteration limit gave an optimal_inaccurate solve to check"


@pytest.mark.parametrize("iters", [3, 5])
def test_clarabel_at_its_iteration_limit_is_certified_by_the_check(iters):
    """Clarabel stopped by ``max_iter`` reports ``user_limit`` with its last iterate."""
    layers = _layers(4, [4, 6, 6, 2])
    lo = exact_local_l2_detailed(layers, np.zeros(4), 50.0).lower
    best = lipsdp(layers)
    res = lipsdp(layers, solver="CLARABEL", solver_options={"max_iter": iters})
    if _status(res) != "user_limit":
        pytest.skip(f"this Clarabel version ended with status {_status(res)}")
    if res.guarantee is Guarantee.CERTIFIED:
        assert res.value >= lo and res.value >= best.value * (1 - 1e-6)
        assert any("stopped before its tolerance" in n for n in res.notes)
    else:
        assert math.isnan(res.value) and res.guarantee is Guarantee.ESTIMATE


def test_other_statuses_and_eigensolver_failures_are_no_bound(monkeypatch):
    layers = _layers(3, [3, 6, 5, 2])
    res = lipsdp(layers, solver="SCS", solver_options={"max_iters": 2})
    if _status(res) not in ("optimal", "optimal_inaccurate"):
        assert math.isnan(res.value) and res.guarantee is Guarantee.ESTIMATE
        assert any("is not one whose multipliers are checked" in n for n in res.notes)

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    # (the package attribute lipbound.baselines.lipsdp is the function: the module by name)
    monkeypatch.setattr(sys.modules["lipbound.baselines.lipsdp"], "certify_lmi", broken)
    res = lipsdp(layers)
    assert math.isnan(res.value) and res.guarantee is Guarantee.ESTIMATE
    assert any("eigensolver failed" in n for n in res.notes)
