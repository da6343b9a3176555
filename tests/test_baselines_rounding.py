"""Rounding audit of the rival methods: cases at the edges of float64 (see the audit notes).

Each test failed on the code before the fix it names.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lipbound.baselines import (
    autolip,
    eclipse_fast,
    exact_local_l2,
    fastlip,
    lipmip,
    lipsdp,
    recurjac,
    seqlip,
)
from lipbound.errors import InputError


def _net(seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((5, 3)), 0.3 * rng.standard_normal(5)),
            (rng.standard_normal((4, 5)), 0.3 * rng.standard_normal(4)),
            (rng.standard_normal((2, 4)), 0.3 * rng.standard_normal(2))]


def _scaled(layers, e: int):
    """Every W_k times 2^e, b_k times 2^(k e): f_scaled = 2^(K e) f, same activation regions."""
    return [(np.ldexp(w, e), np.ldexp(b, (k + 1) * e)) for k, (w, b) in enumerate(layers)]


def test_exact_l2_row_norm_underflow_is_refused():
    # Row 2 of W1 is 2^-1000: np.linalg.norm squares it to 0, so the unit (pre-activation in
    # [-1.25, 0.25] * 2^-1000 on the ball) was fixed inactive and the old code reported
    # EXACT 0.0, while the true constant is 2^-1000 (a normal float64): relu(z2) has slope
    # 2^-1000 for x in (1.25, 1.5].
    t = 2.0 ** -1000
    layers = [(np.array([[1.0], [t]]), np.array([0.0, -1.25 * t])),
              (np.array([[0.0, 1.0]]), np.array([0.0]))]
    with pytest.raises(InputError, match="rescale"):
        exact_local_l2(layers, np.array([1.0]), 0.5)


@pytest.mark.parametrize("method", ["autolip", "seqlip", "eclipse", "lipsdp", "fastlip",
                                    "recurjac", "exact", "lipmip"])
def test_underflowing_chain_is_refused(method):
    # weights 2^-400 per layer: the true constant is ~2^-1200 > 0, which float64 cannot hold;
    # the old code reported 0.0 (CERTIFIED, and EXACT for exact-l2 and lipMIP)
    layers = _scaled(_net(), -400)
    x0 = np.array([0.3, -0.2, 0.5])
    calls = {
        "autolip": lambda: autolip(layers),
        "seqlip": lambda: seqlip(layers),
        "eclipse": lambda: eclipse_fast(layers),
        "lipsdp": lambda: lipsdp(layers),
        "fastlip": lambda: fastlip(layers, x0, 0.3),
        "recurjac": lambda: recurjac(layers, x0, 0.3),
        "exact": lambda: exact_local_l2(layers, x0, 0.3),
        "lipmip": lambda: lipmip(layers, x0, 0.3, c=np.array([1.0, -1.0])),
    }
    with pytest.raises(InputError, match="rescale"):
        calls[method]()


def test_eps_out_of_range_is_refused():
    with pytest.raises(InputError, match="eps"):
        recurjac(_net(), np.zeros(3), 2.0 ** -200)


def test_eclipse_weights_scaled_by_powers_of_two():
    # 2^-150 per layer: the old recursion squared lambda_1 ~ 2^300 twice (overflow -> NaN)
    # and LAPACK raised LinAlgError; the bound is homogeneous, so it must scale exactly
    base = eclipse_fast(_net())
    for e in (-150, 150):
        r = eclipse_fast(_scaled(_net(), e))
        assert r.guarantee.is_upper_bound
        assert math.isclose(r.value, math.ldexp(base.value, 3 * e), rel_tol=1e-9)
        # and it stays above the exact global-over-the-ball value of the same network
        x0 = np.array([0.3, -0.2, 0.5])
        assert r.value >= exact_local_l2(_scaled(_net(), e), x0, 0.3).value


def _box_reference(layers, x0, eps):
    """Brute force for lipMIP's quantity: max ||grad||_1 over patterns whose region has
    interior in the l_inf box (a strictly feasible LP: margin t > 0)."""
    from itertools import product

    from scipy import optimize

    from lipbound.baselines.exact import _pattern_gradient, _pattern_maps

    widths = [w.shape[0] for w, _ in layers[:-1]]
    best = 0.0
    for bits in product((0.0, 1.0), repeat=sum(widths)):
        pattern, i = [], 0
        for n in widths:
            pattern.append(np.array(bits[i:i + n]))
            i += n
        rows, rhs = [], []
        for (a, c, _, _), d in zip(_pattern_maps(layers, pattern), pattern, strict=True):
            for j in range(a.shape[0]):
                s = 1.0 if d[j] > 0.5 else -1.0
                nrm = np.linalg.norm(a[j])
                rows.append(np.concatenate([-s * a[j], [nrm]]))
                rhs.append(s * c[j])
        n0 = x0.size
        obj = np.zeros(n0 + 1)
        obj[-1] = -1.0
        bnds = [(x0[k] - eps, x0[k] + eps) for k in range(n0)] + [(None, 1.0)]
        lp = optimize.linprog(obj, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bnds,
                              method="highs")
        if lp.status == 0 and lp.x[-1] > 1e-6 * eps:
            best = max(best, float(np.sum(np.abs(_pattern_gradient(layers, pattern)))))
    return best


def test_lipmip_tiny_box_matches_brute_force():
    # the same network in input units 1e-9 times smaller (W1 * 1e9, x0 and eps * 1e-9): the
    # constant is exactly 1e9 times the original. The old code (HiGHS on a box of
    # half-width 3e-10, below its feasibility tolerance) returned a quarter of it as EXACT.
    layers = [(w, b) for w, b in _net()]
    layers = [*layers[:-1], (np.array([[1.0, -1.0]]) @ layers[-1][0],
                             np.array([1.0, -1.0]) @ layers[-1][1])]
    x0 = np.array([0.3, -0.2, 0.5])
    ref = _box_reference(layers, x0, 0.3)
    assert ref > 0
    r1 = lipmip(layers, x0, 0.3)
    assert r1.value >= ref
    xs = 2.0 ** -30  # exact rescaling of the input
    tiny = [(layers[0][0] / xs, layers[0][1]), *layers[1:]]
    r = lipmip(tiny, x0 * xs, 0.3 * xs)
    assert r.guarantee.is_upper_bound
    assert r.value * xs >= ref
    if r.guarantee.name == "EXACT":
        assert r.value * xs <= ref * (1 + 1e-5)


@pytest.mark.parametrize("e", [-20, -10, 10, 17])
def test_lipmip_weight_scaling_is_exact(e):
    # f_scaled = 2^(3e) f on the same regions; HiGHS drops coefficients below 1e-9 and its
    # tolerances are absolute, so the old code's value moved with the scale (and with
    # 2^17 per layer HiGHS gave up)
    c = np.array([1.0, -1.0])
    x0 = np.array([0.3, -0.2, 0.5])
    base = lipmip(_net(), x0, 0.3, c=c)
    r = lipmip(_scaled(_net(), e), x0, 0.3, c=c)
    assert r.guarantee.is_upper_bound and base.guarantee.is_upper_bound
    assert math.isclose(r.value, math.ldexp(base.value, 3 * e), rel_tol=1e-9)
