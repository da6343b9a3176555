"""Adversarial soundness review of the rival methods (session 19).

Each test names the defect it pins; each failed on the code before its fix.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipbound.baselines import (
    autolip,
    eclipse_fast,
    exact_local_l2,
    fastlip,
    fc_layers,
    lipmip,
    lipsdp,
    recurjac,
    relu_chain,
    seqlip,
)
from lipbound.baselines.fold import ABS, REL, exact_dot, fold_axpy, fold_matmul
from lipbound.results import Guarantee

THIRD = 1.0 / 3.0
#: |fl(1/3) * 3 + fl(1/3) * 3 - 2| = 2^-53 exactly: the sum that a float64 product rounds to 0
#: (three terms, so that no order of fused multiply-adds in the BLAS recovers it)
GAP = float(abs(2 * Fraction(THIRD) * 3 - 2))
C3 = [THIRD, THIRD, -1.0]  # C3 . (3, 3, 2) = -GAP


def _all_methods(layers, x0, eps, output_map):
    """Every rival with a value for the quantity of ``C f`` (lipMIP: its own quantity)."""
    c = np.asarray(output_map, dtype=np.float64)
    return {
        "autolip": lambda: autolip(layers, output_map=c),
        "seqlip": lambda: seqlip(layers, output_map=c),
        "eclipse": lambda: eclipse_fast(layers, output_map=c),
        "lipsdp": lambda: lipsdp(layers, output_map=c),
        "fastlip": lambda: fastlip(layers, x0, eps, output_map=c),
        "recurjac": lambda: recurjac(layers, x0, eps, output_map=c),
        "exact": lambda: exact_local_l2(layers, x0, eps, output_map=c),
        "lipmip": lambda: lipmip(layers, x0, eps, c=c[0]),
    }


# ---------------------------------------------------------------- folding affine maps


@pytest.mark.parametrize("method", ["autolip", "seqlip", "eclipse", "lipsdp", "fastlip",
                                    "recurjac", "exact", "lipmip"])
def test_output_map_fold_keeps_cancelling_digits(method):
    # C f(x) = -GAP relu(2^100 x): the constant is GAP * 2^100 = 2^47 = 1.4e14 (the same on
    # every ball and box around x0 = 1: one linear piece there). apply_output_map formed
    # C @ W_2 in float64, which rounds the sum to 0: every rival reported 0 (exact-l2:
    # EXACT 0; lipMIP only its absolute cushion)
    layers = [(np.array([[2.0 ** 100]]), np.zeros(1)),
              (np.array([[3.0], [3.0], [2.0]]), np.zeros(3))]
    true = GAP * 2.0 ** 100
    res = _all_methods(layers, np.array([1.0]), 0.5, [C3])[method]()
    assert res.guarantee in (Guarantee.CERTIFIED, Guarantee.EXACT)
    assert res.value >= true
    if res.guarantee is Guarantee.EXACT:
        assert res.value <= true * (1 + 1e-5)


def _cancelling_model() -> nn.Module:
    # out_0 = 2^60 relu(-GAP x) = 128 relu(-x); out_1 a large second output, so that the
    # float64 forward check of the extraction (tolerance 1e-9 times the largest output)
    # passes with or without the cancellation
    net = nn.Sequential(nn.Linear(1, 3, bias=False), nn.Linear(3, 2, bias=False), nn.ReLU(),
                        nn.Linear(2, 2, bias=False)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0], [3.0], [2.0]], dtype=torch.float64))
        net[1].weight.copy_(torch.tensor([C3, [0.0, 0.0, 1.0]], dtype=torch.float64))
        net[3].weight.copy_(torch.tensor([[2.0 ** 60, 0.0], [0.0, 1e12]], dtype=torch.float64))
    return net


def test_fc_layers_fold_of_consecutive_linears_keeps_cancelling_digits():
    # fc_layers multiplied the two Linear layers in float64 (W_2 W_1 = [[0], [2]]), so
    # out_0 looked constant: autolip / recurjac / exact-l2 gave 0 for C = e_0, true 128
    layers = fc_layers(_cancelling_model())
    assert layers[0][0][0, 0] == -GAP
    e0 = np.array([[1.0, 0.0]])
    assert autolip(layers, output_map=e0).value >= 128.0
    assert recurjac(layers, np.array([-1.0]), 0.5, output_map=e0).value >= 128.0
    res = exact_local_l2(layers, np.array([-1.0]), 0.5, output_map=e0)
    assert res.guarantee is Guarantee.EXACT
    assert 128.0 <= res.value <= 128.0 * (1 + 1e-6)


def test_conv_conversion_fold_keeps_cancelling_digits():
    # the same cancellation through 1x1 convolutions (the conv net conversion composes the
    # convolutions' matrices in float64): channel 0 of the output is 128 relu(-x)
    net = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 2, 1, bias=False),
                        nn.ReLU(), nn.Conv2d(2, 2, 1, bias=False), nn.Flatten()).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([3.0, 3.0, 2.0],
                                         dtype=torch.float64).reshape(3, 1, 1, 1))
        net[1].weight.copy_(torch.tensor([C3, [0.0, 0.0, 1.0]],
                                         dtype=torch.float64).reshape(2, 3, 1, 1))
        net[3].weight.copy_(torch.tensor([[2.0 ** 60, 0.0], [0.0, 1e12]],
                                         dtype=torch.float64).reshape(2, 2, 1, 1))
    layers = relu_chain(net, (1, 1, 1))
    assert layers[0][0][0, 0] == -GAP
    assert autolip(layers, output_map=np.array([[1.0, 0.0]])).value >= 128.0


def test_fold_bias_cancellation_is_exact():
    # Normalize-like diagonal map then a layer: s * b + t and W b + c cancel in the biases
    assert fold_axpy(np.array([THIRD]), np.array([3.0]), np.array([-1.0]))[0] == -2.0 ** -54
    assert fold_matmul(np.array([C3]), np.array([3.0, 3.0, 2.0]), np.array([0.0]))[0] == -GAP
    assert fold_matmul(np.array([C3]), np.array([3.0, 3.0, 0.0]), np.array([-2.0]))[0] == -GAP


_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.data())
def test_fold_matmul_entries_are_accurate(m, k, n, data):
    # every entry within max(REL, 64 (k + 2) 2^-52) |exact| + ABS of the exact product,
    # also for cancelling sums (the last column of a is built to cancel with b)
    a = np.array(data.draw(st.lists(_floats, min_size=m * k, max_size=m * k))).reshape(m, k)
    b = np.array(data.draw(st.lists(_floats, min_size=k * n, max_size=k * n))).reshape(k, n)
    if k >= 2 and data.draw(st.booleans()):
        a[0, -1] = -a[0, 0]
        b[-1, 0] = b[0, 0] * (1 + 2.0 ** -40)
    add = np.array(data.draw(st.lists(_floats, min_size=m, max_size=m)))
    p = fold_matmul(a, b)
    q = fold_matmul(a, b[:, 0], add)
    rel = Fraction(max(REL, 64 * (k + 2) * 2.0 ** -52))
    for i in range(m):
        for j in range(n):
            exact = sum(Fraction(a[i, t]) * Fraction(b[t, j]) for t in range(k))
            assert abs(Fraction(p[i, j]) - exact) <= rel * abs(exact) + Fraction(ABS)
        exact = sum(Fraction(a[i, t]) * Fraction(b[t, 0]) for t in range(k)) + Fraction(add[i])
        assert abs(Fraction(q[i]) - exact) <= rel * abs(exact) + Fraction(ABS)


def test_exact_dot_is_correctly_rounded():
    rng = np.random.default_rng(0)
    for _ in range(50):
        xs = rng.standard_normal(6) * 2.0 ** rng.integers(-400, 400, 6)
        ys = rng.standard_normal(6) * 2.0 ** rng.integers(-400, 400, 6)
        exact = sum(Fraction(x) * Fraction(y) for x, y in zip(xs, ys, strict=True))
        assert exact_dot(xs, ys) == float(exact)


def _exact_1d_constant(w1, b1, cw2):
    """The exact global Lipschitz constant of ``x -> cw2 . relu(w1 x + b1)`` (1-D input,
    scalar output), in rationals: the largest |slope| over the linear pieces."""
    w1f = [Fraction(float(v)) for v in w1]
    b1f = [Fraction(float(v)) for v in b1]
    cuts = sorted({-b / w for w, b in zip(w1f, b1f, strict=True) if w != 0})
    probes = ([cuts[0] - 1] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:], strict=False)]
              + [cuts[-1] + 1]) if cuts else [Fraction(0)]
    best = Fraction(0)
    for x in probes:
        slope = sum((c * w for c, w, b in zip(cw2, w1f, b1f, strict=True) if w * x + b > 0),
                    Fraction(0))
        best = max(best, abs(slope))
    return best, cuts


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(2, 3), st.integers(0, 2 ** 32 - 1))
def test_cancelling_output_maps_random(width, n_out, seed):
    # f(x) = C W_2 relu(W_1 x + b_1), 1-D input, with the last row of W_2 chosen so that
    # C W_2 nearly cancels (its float64 product is 0 or a rounding residue): every certified
    # rival must stay above the exact (rational) constant
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((width, 1))
    b1 = rng.standard_normal(width)
    c = rng.standard_normal(n_out)
    w2 = rng.standard_normal((n_out, width))
    w2[-1] = -(c[:-1] @ w2[:-1]) / c[-1]  # rounded: C W_2 is a residue of ~1e-16
    cw2 = [sum(Fraction(float(c[i])) * Fraction(float(w2[i, j])) for i in range(n_out))
           for j in range(width)]
    true, cuts = _exact_1d_constant(w1[:, 0], b1, cw2)
    layers = [(w1, b1), (w2, np.zeros(n_out))]
    cmap = c[None, :]
    x0 = np.zeros(1)
    eps = 2.0 * float(max(abs(v) for v in cuts)) + 1.0  # the ball holds every piece
    for res in (autolip(layers, output_map=cmap), seqlip(layers, output_map=cmap),
                eclipse_fast(layers, output_map=cmap),
                recurjac(layers, x0, eps, output_map=cmap),
                exact_local_l2(layers, x0, eps, output_map=cmap)):
        assert res.guarantee in (Guarantee.CERTIFIED, Guarantee.EXACT)
        assert Fraction(res.value) >= true, (res.method, res.value, float(true))
        if res.guarantee is Guarantee.EXACT:
            assert Fraction(res.value) <= true * (1 + Fraction(1, 10 ** 5))


def test_fold_matmul_sparse_operands():
    # the conv conversion composes CSR and dense matrices in every combination
    import scipy.sparse as sp

    a, b = np.array([C3]), np.array([[3.0], [3.0], [2.0]])
    for left in (a, sp.csr_matrix(a)):
        for right in (b, sp.csr_matrix(b)):
            p = fold_matmul(left, right)
            p = p.toarray() if sp.issparse(p) else np.asarray(p)
            assert p[0, 0] == -GAP


# ---------------------------------------------------------------- ECLipsE-Fast


def test_eclipse_certifies_when_the_closed_form_lmi_is_singular():
    # a hidden unit with no incoming weights (layer 2, unit 1): at the closed form the hidden
    # block of M(rho, T) was singular, the float64 check could pass at no rho, and
    # ECLipsE-Fast returned NaN (estimate) instead of a bound; it now re-checks with rho and
    # T raised by 1 + 2^-20 and certifies
    layers = [(np.array([[-1.0], [-2.0]]), np.array([1.0, 1.0])),
              (np.array([[0.0, 0.0], [0.0, 1.0], [0.0, -1.0]]), np.array([0.0, 1.0, 1.0])),
              (np.array([[2.0, -1.0, -1.0], [-2.0, 0.0, 0.0]]), np.array([-1.0, 1.0]))]
    res = eclipse_fast(layers)
    assert res.guarantee is Guarantee.CERTIFIED
    assert np.isfinite(res.value)
    # the largest Jacobian norm on a fine grid of the 1-D input (a lower bound)
    xs = np.linspace(-4.0, 4.0, 4001)[:, None]
    h = xs
    pats = []
    for w, b in layers[:-1]:
        z = h @ w.T + b
        pats.append((z > 0).astype(float))
        h = np.maximum(z, 0.0)
    lower = 0.0
    for i in range(xs.shape[0]):
        jac = layers[0][0]
        for (w, _), p in zip(layers[1:], pats, strict=True):
            jac = w @ (p[i][:, None] * jac)
        lower = max(lower, float(np.linalg.norm(jac)))
    assert lower > 0
    assert res.value >= lower
    assert res.value <= autolip(layers).value


# ---------------------------------------------------------------- time limits


def _branchy_net():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((12, 4)), rng.standard_normal(12)),
            (rng.standard_normal((8, 12)), rng.standard_normal(8)),
            (rng.standard_normal((2, 8)), np.zeros(2))]


def test_exact_l2_time_limit_is_validated_like_the_other_rivals():
    # time_limit=None (no limit, as for every other rival) raised a TypeError on the 64th
    # branch node; NaN never stopped and -1 stopped at once with a TimeLimitError
    from lipbound.errors import InputError

    layers = _branchy_net()
    res = exact_local_l2(layers, np.zeros(4), 1.0, time_limit=None)
    assert res.guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED)
    assert res.value == exact_local_l2(layers, np.zeros(4), 1.0, time_limit=60.0).value
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(InputError, match="time_limit"):
            exact_local_l2(layers, np.zeros(4), 1.0, time_limit=bad)


class _DuckNormalize(nn.Module):
    """A user's own ``Normalize`` (same name, ``mean``/``std``), optionally off by ``f``."""

    def __init__(self, f: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=dtype))
        self.register_buffer("std", torch.tensor([0.3, 0.5, 0.7, 1.1], dtype=dtype))
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std * self.f


_DuckNormalize.__name__ = "Normalize"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duck_typed_normalize_is_checked_in_float64(dtype):
    """A module named Normalize is folded only if its forward is (x - mean) / std to float64
    accuracy: a float32 check at 1e-4 accepted ``* 1.00005`` and AutoLip then certified
    1.07482 for a true 1.07488 (session 19 review)."""
    from lipbound.baselines.fc import NotFullyConnectedError

    torch.manual_seed(3)
    lin1, lin2 = nn.Linear(4, 6), nn.Linear(6, 2)
    good = nn.Sequential(_DuckNormalize(1.0, dtype), lin1, nn.ReLU(), lin2).to(dtype).eval()
    r = autolip(good, input_shape=(4,))
    assert r.guarantee == Guarantee.CERTIFIED
    # AutoLip's product bounds the Jacobian norm at any point, computed here independently
    for seed in range(5):
        x = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(
            lambda v: good.double()(v), x).reshape(2, 4)
        assert r.value >= float(torch.linalg.matrix_norm(jac, 2))
    bad = nn.Sequential(_DuckNormalize(1.00005, dtype), nn.Linear(4, 6), nn.ReLU(),
                        nn.Linear(6, 2)).to(dtype).eval()
    with pytest.raises(NotFullyConnectedError, match="not \\(x - mean\\) / std"):
        autolip(bad, input_shape=(4,))
