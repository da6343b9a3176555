"""Layers without a ReLU between them are multiplied into one matrix (lipbound.blocks); the
float64 product carries an entrywise rounding bound that every norm adds.

The references are exact: the networks here are affine, so their local and global Lipschitz
constants are ``||J||_2`` for the exact Jacobian ``J``, computed in rational arithmetic from
the float64 weights (``fractions.Fraction``). A rational lower bound ``||J v||^2 / ||v||^2``
(any rational ``v``, here a float estimate of the top right singular vector) is compared with
the square of every reported upper bound, exactly: no tolerance at all.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import n_examples
from lipbound import Analyzer

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _exact_matrix(module: nn.Module, shape: tuple[int, ...]) -> list[list[Fraction]]:
    """The exact matrix of a linear (bias-free) torch module, from its float64 columns on
    basis vectors computed in rational arithmetic: the module is Conv2d / Linear / Flatten /
    BatchNorm (eval) only, applied layer by layer on Fractions."""
    n = 1
    for s in shape:
        n *= s
    cols = []
    for j in range(n):
        v = [Fraction(0)] * n
        v[j] = Fraction(1)
        cols.append(_apply_exact(module, v, shape))
    m = len(cols[0])
    return [[cols[j][i] for j in range(n)] for i in range(m)]


def _apply_exact(module: nn.Module, v: list[Fraction], shape: tuple[int, ...]) -> list[Fraction]:
    cur_shape = shape
    for layer in module:
        if isinstance(layer, nn.Flatten):
            cur_shape = (len(v),)
        elif isinstance(layer, nn.Linear):
            w = layer.weight.detach().tolist()
            v = [sum((Fraction(w[i][k]) * v[k] for k in range(len(v))), Fraction(0))
                 for i in range(len(w))]
            cur_shape = (len(v),)
        elif isinstance(layer, nn.BatchNorm1d):
            # eval mode: y = (x - mean) / sqrt(var + eps) * gamma + beta; the analyser folds
            # it as a float64 scale, so the exact reference is that float64 scale's value
            sc = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).detach().tolist()
            v = [Fraction(sc[i]) * v[i] for i in range(len(v))]
        elif isinstance(layer, nn.Conv2d):
            w = layer.weight.detach()
            c_out, c_in, kh, kw = w.shape
            _, h, wd = cur_shape
            ho, wo = h - kh + 1, wd - kw + 1  # no padding, stride 1
            wl = w.tolist()
            out = []
            for o in range(c_out):
                for i in range(ho):
                    for j in range(wo):
                        acc = Fraction(0)
                        for c in range(c_in):
                            for a in range(kh):
                                for b in range(kw):
                                    x = v[(c * h + i + a) * wd + j + b]
                                    if x:
                                        acc += Fraction(wl[o][c][a][b]) * x
                        out.append(acc)
            v = out
            cur_shape = (c_out, ho, wo)
        else:
            raise TypeError(type(layer))
    return v


def _rayleigh_sq(mat: list[list[Fraction]]) -> Fraction:
    """A rational lower bound on ||M||_2^2: ||M v||^2 / ||v||^2 with v a float estimate of
    the top right singular vector, converted exactly."""
    t = torch.tensor([[float(x) for x in row] for row in mat], dtype=DT)
    if not bool(t.abs().max() > 0):
        return Fraction(0)
    v = [Fraction(float(x)) for x in torch.linalg.svd(t)[2][0]]
    mv = [sum((row[k] * v[k] for k in range(len(v))), Fraction(0)) for row in mat]
    return sum((x * x for x in mv), Fraction(0)) / sum((x * x for x in v), Fraction(0))


def _check(model: nn.Module, shape: tuple[int, ...], x0: torch.Tensor, eps: float,
           out_map: torch.Tensor | None = None) -> None:
    mat = _exact_matrix(model, shape)
    if out_map is not None:
        c = out_map.tolist()
        mat = [[sum((Fraction(c[i][k]) * mat[k][j] for k in range(len(mat))), Fraction(0))
                for j in range(len(mat[0]))] for i in range(len(c))]
    low = _rayleigh_sq(mat)
    an = Analyzer(model, shape, spectral="exact")
    for res in (an.local_bound(x0, eps, output_map=out_map),
                an.global_bound(output_map=out_map)):
        assert Fraction(res.value) ** 2 >= low, (res.value, float(low) ** 0.5)
        assert res.guarantee.is_upper_bound


def test_large_output_bias_does_not_cancel_the_composed_matrix():
    """Conv -> Flatten -> Linear with a 1e8 output bias: forming the product as
    ``f(e_i) - f(0)`` lost ~1e-8 of it to cancellation against the bias (below the exact
    norm, beyond the 1e-9 margin); the product is now formed without biases."""
    for seed in range(6):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).to(DT).eval()
        with torch.no_grad():
            m[2].bias.fill_(1e8)
        _check(m, (1, 4, 4), torch.randn(1, 1, 4, 4, dtype=DT), 0.1)


def test_tiny_weights_under_a_bias_are_not_a_zero_matrix():
    """Conv weights 2^-66 under a bias of 1: ``f(e_i) - f(0)`` was exactly 0, and a certified
    bound of 0 was reported; the composed matrix is now exactly the product."""
    m = nn.Sequential(nn.Conv2d(1, 1, 2), nn.Flatten(), nn.Linear(1, 1)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(2.0 ** -66)
        m[0].bias.fill_(1.0)
        m[2].weight.fill_(1.0)
        m[2].bias.fill_(0.0)
    an = Analyzer(m, (1, 2, 2))
    exact = 2.0 ** -65  # ||(1, 1, 1, 1)|| * 2^-66, exactly
    for res in (an.local_bound(torch.zeros(1, 1, 2, 2, dtype=DT), 1.0), an.global_bound()):
        assert exact <= res.value <= exact * (1 + 1e-6), res.value


def test_cancelling_linear_chain_keeps_a_sound_bound():
    """Two fully connected layers whose product nearly cancels (W2 W1 ~ 1e-12 of |W2||W1|):
    the float64 product is mostly rounding, and the reported bound covers the exact norm."""
    w1 = torch.tensor([[1.0, 1e-3], [1.0, 0.0]], dtype=DT)
    w2 = torch.tensor([[1.0, -1.0 + 2.0 ** -40]], dtype=DT)
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.copy_(w1 * 3.0 ** 0.5)
        m[0].bias.fill_(1e6)
        m[1].weight.copy_(w2)
        m[1].bias.zero_()
    _check(m, (2,), torch.zeros(1, 2, dtype=DT), 1.0)


@st.composite
def _affine_chains(draw):
    kind = draw(st.sampled_from(["conv-linear", "linear-linear", "linear-bn-linear"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    bias_scale = 10.0 ** draw(st.integers(-2, 9))
    w_scale = 10.0 ** draw(st.integers(-30, 30))
    if kind == "conv-linear":
        c_in, c_out, k = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
        hw = draw(st.integers(k, 4))
        n_mid = c_out * (hw - k + 1) ** 2
        n_out = draw(st.integers(1, 3))
        model = nn.Sequential(nn.Conv2d(c_in, c_out, k), nn.Flatten(), nn.Linear(n_mid, n_out))
        shape = (c_in, hw, hw)
    else:
        n_in, n_mid, n_out = (draw(st.integers(1, 6)) for _ in range(3))
        mods = [nn.Linear(n_in, n_mid)]
        if kind == "linear-bn-linear":
            mods.append(nn.BatchNorm1d(n_mid))
        mods.append(nn.Linear(n_mid, n_out))
        model = nn.Sequential(*mods)
        shape = (n_in,)
    model = model.to(DT).eval()
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=DT) * w_scale)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=DT) * bias_scale)
            elif isinstance(mod, nn.BatchNorm1d):
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g,
                                                 dtype=DT) + 0.1)
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=DT))
        if draw(st.booleans()):
            # make the last layer's first row nearly cancel the first layer (W2 W1 small)
            last = model[-1]
            if isinstance(model[0], nn.Linear) and kind == "linear-linear" \
                    and last.weight.shape[1] >= 2:
                last.weight[0, 1] = -last.weight[0, 0] * (model[0].weight[0, 0]
                                                          / model[0].weight[1, 0])
    x0 = torch.randn(1, *shape, generator=g, dtype=DT)
    out_map = None
    n_out = model[-1].weight.shape[0]
    if n_out >= 2 and draw(st.booleans()):
        out_map = torch.zeros(1, n_out, dtype=DT)
        out_map[0, 0], out_map[0, 1] = 1.0, -1.0  # a logit margin, as radius searches use
    return model, shape, x0, 10.0 ** draw(st.integers(-6, 2)), out_map


@settings(max_examples=n_examples(40), deadline=None)
@given(case=_affine_chains())
def test_composed_affine_chains_are_bounded_exactly_from_above(case):
    model, shape, x0, eps, out_map = case
    _check(model, shape, x0, eps, out_map)
