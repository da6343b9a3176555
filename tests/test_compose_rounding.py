"""Layers without a ReLU between them are multiplied into one matrix (lipbound.blocks); the
float64 product carries an entrywise rounding bound that every norm adds.

The references are exact: the networks here are affine, so their local and global Lipschitz
constants are ``||J||_2`` for the exact Jacobian ``J``, computed in rational arithmetic from
the float64 weights (``fractions.Fraction``). A rational lower bound ``||J v||^2 / ||v||^2``
(any rational ``v``, here a float estimate of the top right singular vector) is compared with
the square of every reported upper bound, exactly: no tolerance at all.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------- the composed matrix itself


def _op_matrix(op) -> list[list[Fraction]]:
    """An op's exact matrix: its linear part applied to basis vectors is exact in float64
    (each entry is one stored coefficient times 1, summed with exact zeros)."""
    from lipbound.ops.base import DiagOp, MixingOp, ReshapeOp

    n = 1
    for s in op.in_shape:
        n *= s
    eye = torch.eye(n, dtype=DT).reshape(n, *op.in_shape)
    if isinstance(op, MixingOp):
        cols = op.lin(eye)
    elif isinstance(op, DiagOp):
        cols = eye * op.scale
    else:
        assert isinstance(op, ReshapeOp)
        cols = op.forward(eye)
    t = cols.reshape(n, -1).T
    return [[Fraction(float(x)) for x in row] for row in t.tolist()]


def _matmul(a: list[list[Fraction]], b: list[list[Fraction]]) -> list[list[Fraction]]:
    return [[sum((a[i][k] * b[k][j] for k in range(len(b)) if a[i][k] and b[k][j]),
                 Fraction(0)) for j in range(len(b[0]))] for i in range(len(a))]


@st.composite
def _conv_heads(draw):
    """Conv2d (stride, padding, dilation, groups) [BatchNorm2d] [average pool] Flatten Linear:
    an affine chain without ReLU, with fewer outputs than inputs (or not)."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k, s, p, d = (draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1)),
                  draw(st.integers(1, 2)))
    hw = draw(st.integers(d * (k - 1) + 1, 6))
    mods = [nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=groups)]
    if draw(st.booleans()):
        mods.append(nn.BatchNorm2d(c_out))
    mods.append(draw(st.sampled_from([None, "avg", "adaptive"])))
    if mods[-1] is None:
        mods.pop()
    elif mods[-1] == "avg":
        mods[-1] = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
    else:
        mods[-1] = nn.AdaptiveAvgPool2d(draw(st.integers(1, 2)))
    mods.append(nn.Flatten())
    probe = nn.Sequential(*mods).to(DT).eval()
    n_mid = probe(torch.zeros(1, c_in, hw, hw, dtype=DT)).shape[1]
    mods.append(nn.Linear(n_mid, draw(st.integers(1, 4))))
    model = nn.Sequential(*mods).to(DT).eval()
    scale = 10.0 ** draw(st.integers(-20, 20))
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=DT) * scale)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g,
                                                 dtype=DT) + 0.1)
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=DT))
    return model, (c_in, hw, hw)


@settings(max_examples=n_examples(40), deadline=None)
@given(case=_conv_heads())
def test_composed_matrix_is_within_its_rounding_bound_both_ways(case):
    """The composed matrix, formed from the input basis (forward) or from the output basis
    (transposed: fewer outputs than inputs), is within its stated entrywise rounding bound of
    the exact product of the layers' float64 matrices, in rational arithmetic."""
    from lipbound.blocks import _dense_compose
    from lipbound.graph import trace_model
    from lipbound.ops.linear import LinearOp

    model, shape = case
    ops = trace_model(model, shape)
    exact = None
    for op in ops:
        m = _op_matrix(op)
        exact = m if exact is None else _matmul(m, exact)
    for transposed in (False, True):
        seq = _dense_compose(ops, transposed=transposed)
        assert seq is not None
        lin = next(op for op in seq if isinstance(op, LinearOp))
        w, err = lin.weight.tolist(), lin.err.tolist()
        assert len(w) == len(exact) and len(w[0]) == len(exact[0])
        for i, row in enumerate(exact):
            for j, x in enumerate(row):
                assert abs(Fraction(w[i][j]) - x) <= Fraction(err[i][j]), (transposed, i, j)


def test_composing_in_chunks_gives_the_one_batch_matrix(monkeypatch):
    """Basis vectors go through the chain in chunks (bounded memory): the same matrix and
    rounding bound as in one batch, both ways."""
    import lipbound.blocks as blocks_mod
    from lipbound.graph import trace_model
    from lipbound.ops.linear import LinearOp

    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(27, 5)).to(DT).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=DT))
    ops = trace_model(model, (2, 6, 6))

    def composed(batch: int, transposed: bool):
        monkeypatch.setattr(blocks_mod, "DENSE_COMPOSE_BATCH", batch)
        seq = blocks_mod._dense_compose(ops, transposed=transposed)
        return next(op for op in seq if isinstance(op, LinearOp))

    for transposed in (False, True):
        whole, parts = composed(1 << 30, transposed), composed(200, transposed)
        assert torch.equal(whole.bias, parts.bias)
        assert torch.allclose(whole.err, parts.err, rtol=1e-12, atol=0)
        assert bool(((whole.weight - parts.weight).abs() <= whole.err + parts.err).all())


def test_a_convolution_into_a_wide_layer_is_composed_from_the_outputs():
    """A 64-channel convolution into a fully connected layer (20736 inputs, 64 outputs):
    formed from the input basis it was a 38 GB batch (a raw allocation error) and 1.7e11
    multiply-adds; from the 64 output basis vectors it is 5e8, and the bound is sound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 64, 3, padding=2), nn.ReLU(),
                          nn.Conv2d(64, 32, 3, padding=2), nn.Flatten(),
                          nn.Linear(12800, 64)).eval()
    an = Analyzer(model, (1, 16, 16))
    assert [b.name for b in an.blocks] == ["0+1", "2*4"]
    x = torch.randn(1, 1, 16, 16)
    jac = torch.autograd.functional.jacobian(lambda z: model(z).reshape(-1), x).reshape(64, -1)
    assert an.local_bound(x, 0.1).value >= float(torch.linalg.matrix_norm(jac.double(), 2))


def test_costly_runs_are_not_composed(monkeypatch):
    """Beyond DENSE_COMPOSE_WORK multiply-adds the layers stay separate (a product of their
    factors), whichever way the matrix would be formed."""
    import lipbound.blocks as blocks_mod

    monkeypatch.setattr(blocks_mod, "DENSE_COMPOSE_WORK", 5e4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(288, 4)).eval()
    an = Analyzer(model, (1, 8, 8))
    assert [b.name for b in an.blocks] == ["0+1", "2", "4"]  # 4 outputs x 2.2e4 > 5e4
    monkeypatch.setattr(blocks_mod, "DENSE_COMPOSE_WORK", 1e9)
    assert [b.name for b in Analyzer(model, (1, 8, 8)).blocks] == ["0+1", "2*4"]


def test_global_average_pool_head_is_composed_from_the_outputs():
    """AdaptiveAvgPool2d(1) + Flatten + Linear on a 512 x 7 x 7 map: the 10 x 25088 matrix is
    formed from the 10 output basis vectors (it took 9 s and 5 GB from the 25088 input basis
    vectors), and the bound covers the exact matrix's norm."""
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)).to(DT)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=DT))
    an = Analyzer(model.eval(), (512, 7, 7), spectral="exact")
    assert len(an.blocks) == 1 and an.blocks[0].mixing is not None
    # the exact matrix: W / 49 on each channel's 49 positions
    exact = (model[2].weight.detach()[:, :, None] / 49.0).expand(10, 512, 49).reshape(10, -1)
    assert an.global_bound().value >= float(torch.linalg.matrix_norm(exact, 2))


# ------------------------------------------------ the ends of the float64 range (review s14)


def _composed(ops, transposed):
    from lipbound.blocks import _dense_compose
    from lipbound.ops.linear import LinearOp

    seq = _dense_compose(ops, transposed=transposed)
    return None if seq is None else next(op for op in seq if isinstance(op, LinearOp))


def _exact_product(ops) -> list[list[Fraction]]:
    """The exact product of the ops' float64 matrices; a convolution's output scale (average
    pooling) as a diagonal factor of its own (its kernel is ones: ``_op_matrix`` is exact)."""
    exact = None
    for op in ops:
        m = _op_matrix(op)
        exact = m if exact is None else _matmul(m, exact)
    return exact


def _within(lin, exact) -> bool:
    w, err = lin.weight.tolist(), lin.err.tolist()
    return all(abs(Fraction(w[i][j]) - x) <= Fraction(err[i][j])
               for i, row in enumerate(exact) for j, x in enumerate(row))


def _subnormal_chain(transposed_first: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """A conv weight 2^-600 * 1.1, a batch-norm scale 2^-460 * 1.3 and a layer 2^1000: the
    product of the first two is subnormal (2^-1060, 14 significant bits), the whole O(2^-60).
    ``transposed_first``: the tiny factors at the output end and fewer outputs than inputs
    (the run is formed from its output end by default)."""
    a, b, c = 2.0 ** -600 * 1.1, 2.0 ** -460 * 1.3, 2.0 ** 1000
    if transposed_first:
        m = nn.Sequential(nn.Conv2d(2, 1, 1, bias=False), nn.Flatten(),
                          nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1, eps=0.0))
        big, small, bn, shape = m[0], m[2], m[3], (2, 1, 1)
    else:
        m = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1, eps=0.0),
                          nn.Flatten(), nn.Linear(1, 1, bias=False))
        small, bn, big, shape = m[0], m[1], m[3], (1, 1, 1)
    m = m.to(DT).eval()
    with torch.no_grad():
        big.weight.fill_(c)
        small.weight.fill_(a)
        bn.weight.fill_(b)
        bn.bias.zero_()
        bn.running_var.fill_(1.0)
        bn.running_mean.zero_()
    return m, shape


@pytest.mark.parametrize("transposed_first", [False, True])
def test_products_that_underflow_are_not_composed_that_way(transposed_first):
    """The rounding bound ``2 γ P`` is relative; a product below 2^-1022 is rounded on the
    subnormal grid (here 3e-6 relative error against a stated 3e-15). The way that forms it
    is declined, the other way round is taken, and the bounds cover the exact norm (both
    were below it: 1.24032093e-18 against 1.24032729e-18)."""
    from lipbound.graph import trace_model

    model, shape = _subnormal_chain(transposed_first)
    ops = trace_model(model, shape)
    exact = _exact_product(ops)
    assert _composed(ops, transposed=transposed_first) is None
    for way in (not transposed_first, None):
        assert _within(_composed(ops, transposed=way), exact)
    an = Analyzer(model, shape)
    low = sum((x * x for x in exact[0]), Fraction(0))
    for res in (an.global_bound(), an.local_bound(torch.zeros(1, *shape, dtype=DT), 1.0)):
        assert Fraction(res.value) ** 2 >= low, res.value


def test_fully_connected_products_that_underflow_stay_separate():
    """The same subnormal product between fully connected layers (Linear, BatchNorm1d,
    Linear, multiplied as matrices): it was below the exact norm."""
    a, b, c = 2.0 ** -600 * 1.1, 2.0 ** -460 * 1.3, 2.0 ** 1000
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1, eps=0.0),
                      nn.Linear(1, 1, bias=False)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(a)
        m[1].weight.fill_(b)
        m[1].bias.zero_()
        m[1].running_var.fill_(1.0)
        m[1].running_mean.zero_()
        m[2].weight.fill_(c)
    exact = Fraction(a) * Fraction(b) * Fraction(c)
    an = Analyzer(m, (1,))
    for res in (an.global_bound(), an.local_bound(torch.zeros(1, 1, dtype=DT), 1.0)):
        assert Fraction(res.value) >= exact, res.value


def test_an_overflow_one_way_is_formed_the_other_way():
    """Conv 1e-250 into two layers of 1e200 with fewer outputs than inputs: from the output
    end the product of the two large layers overflows (the model was refused: 'non-finite
    coefficients'), from the input basis every value is finite."""
    m = nn.Sequential(nn.Conv2d(2, 1, 1, bias=False), nn.Flatten(), nn.Linear(1, 1, bias=False),
                      nn.Linear(1, 1, bias=False)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.fill_(1e-250)
        m[2].weight.fill_(1e200)
        m[3].weight.fill_(1e200)
    an = Analyzer(m, (2, 1, 1))
    assert [b.name for b in an.blocks] == ["0*2*3"]
    w = Fraction(1e-250) * Fraction(1e200) * Fraction(1e200)
    assert Fraction(an.global_bound().value) ** 2 >= 2 * w * w


def test_an_infinite_rounding_bound_is_not_dropped():
    """A composed matrix whose absolute product overflows (two products of 1.1e308 summed)
    while the matrix itself is finite: its rounding bound is infinite, and ``inf * 0`` (a
    zero input after a ReLU) made the nominal pass's error NaN, which left every row of the
    layer off: a local bound of 0 for a network of norm ~1e293."""
    a = 1.0e154
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1, bias=False),
                      nn.Flatten(), nn.Linear(4, 1, bias=False)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([1.0, -1.0], dtype=DT).reshape(2, 1, 1, 1))
        m[0].bias.zero_()
        m[2].weight.copy_(torch.tensor([[a, a], [a, a * (1 - 2.0 ** -50)]],
                                       dtype=DT).reshape(2, 2, 1, 1))
        m[4].weight.copy_(torch.tensor([[a, a, -a, -a]], dtype=DT) * 1.1)
    an = Analyzer(m, (1, 1, 2))
    # the exact network is linear around x0 = (1, -1) (every pre-activation is +-1): its
    # Jacobian there, from the exact composed weights, has norm ~1e293
    exact_w = Fraction(1.1 * a) * (Fraction(a) - Fraction(a * (1 - 2.0 ** -50)))
    res = an.local_bound(torch.tensor([[[[1.0, -1.0]]]], dtype=DT), 0.1)
    assert res.value == math.inf or Fraction(res.value) >= exact_w, res.value


def test_convolution_weights_whose_squares_overflow():
    """Conv weights ~1e155 with zero padding: the squared row norms are ``inf``, and ``inf *
    0`` at the padding made some NaN; NaN rows were left out and the layer's factor was 0
    (a local bound of 0 for a Jacobian of norm ~2.6e154)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 2, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(32, 2)).to(DT).eval()
    with torch.no_grad():
        m[0].weight.mul_(1e155)
        m[0].bias.zero_()
    x0 = torch.randn(1, 1, 3, 3, dtype=DT)
    jac = torch.autograd.functional.jacobian(lambda z: m(z).reshape(-1), x0).reshape(2, -1)
    res = Analyzer(m, (1, 3, 3)).local_bound(x0, 0.1)
    assert res.value >= float(torch.linalg.matrix_norm(jac, 2)), res.value


def test_output_map_products_that_underflow_stay_separate():
    """An output map multiplied into the last layer is a new matrix: a map of 1e-100 after
    a layer of 1e-100 gave entries of 1e-200 whose squares underflow, and a bound of 0 (the
    model's own blocks are refused for that; the map's were not checked). Such a product is
    no longer formed: the map is a layer of its own, and the bound covers the exact norm."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    with torch.no_grad():
        m[2].weight.mul_(1e-100)
    an = Analyzer(m, (4,))
    c = torch.randn(2, 3, dtype=DT) * 1e-100
    assert [b.name for b in an._blocks_for(c)[1]][-2:] == ["2", "output_map"]
    x0 = torch.randn(1, 4, dtype=DT)
    on = (m[0](x0)[0] > 0).tolist()  # the ReLUs' pattern at x0 (no pre-activation near 0)
    w1, w2, cm = (t.detach().tolist() for t in (m[0].weight, m[2].weight, c))
    jac = [[sum((Fraction(cm[i][k]) * Fraction(w2[k][h]) * Fraction(w1[h][j])
                 for k in range(3) for h in range(6) if on[h]), Fraction(0))
            for j in range(4)] for i in range(2)]
    low = _rayleigh_sq(jac)
    assert low > 0
    for res in (an.global_bound(output_map=c), an.local_bound(x0, 1e-3, output_map=c)):
        assert Fraction(res.value) ** 2 >= low, res.value


def _cancelling_pair(kind: str) -> tuple[nn.Module, tuple[int, ...], Fraction]:
    """Two layers without a ReLU between them whose product cancels to exactly 0 in float64
    (``a + 2^-60 a - a``, ``a = 1e-148``) while the exact product is ``2^-60 a``; a ReLU and
    a unit layer follow. Returns the model, its input shape and the exact product entry."""
    a = 1e-148
    if kind == "linear":
        first: nn.Module = nn.Linear(2, 3, bias=False)
        shape: tuple[int, ...] = (2,)
        mods = [first]
    else:
        first = nn.Conv2d(2, 3, 1, bias=False)
        shape = (2, 1, 1)
        mods = [first, nn.Flatten()]
    m = nn.Sequential(*mods, nn.Linear(3, 1, bias=False), nn.ReLU(),
                      nn.Linear(1, 1, bias=False)).to(DT).eval()
    with torch.no_grad():
        first.weight.fill_(a)
        m[-3].weight.copy_(torch.tensor([[1.0, 2.0 ** -60, -1.0]], dtype=DT))
        m[-1].weight.fill_(1.0)
    return m, shape, Fraction(a) * Fraction(2) ** -60


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_product_whose_rounding_bound_squares_to_zero_stays_separate(kind):
    """The product above is computed as 0 with a rounding bound of 4.9e-163 per entry, whose
    square (the error norm, the row norms) underflows to 0: a certified bound of 0 for a
    network of Lipschitz constant 1.2e-166. The layers now stay separate."""
    m, shape, c = _cancelling_pair(kind)
    an = Analyzer(m, shape)
    exact_sq = 2 * c * c  # relu(c (x1 + x2)): Lipschitz constant |c| sqrt(2)
    x0 = torch.ones(1, *shape, dtype=DT)
    for res in (an.global_bound(), an.local_bound(x0, 0.1), an.local_bound(x0, 1e-3)):
        assert res.value > 0 and Fraction(res.value) ** 2 >= exact_sq, res.value
    assert len(an.blocks) == 3


def test_error_norm_scales_tiny_slopes():
    """``err_norm`` squared each row's error norm times the slope ``r``: rows of 1e-150 with
    slopes of 1e-20 gave squares of 1e-340, i.e. 0. It scales by the largest before squaring."""
    from lipbound.blocks import AffineBlock
    from lipbound.ops.linear import LinearOp

    w = torch.zeros(2, 3, dtype=DT)
    err = torch.full((2, 3), 1e-150, dtype=DT)
    block = AffineBlock([LinearOp("w", w, None, err=err)], True)
    r = torch.tensor([1e-20, 3e-21], dtype=DT)
    exact = sum((Fraction(float(ri)) ** 2 * 3 * Fraction(1e-150) ** 2 for ri in r),
                Fraction(0))
    got = block.err_norm(r, torch.ones(3, dtype=DT))
    assert got > 0 and Fraction(got) ** 2 >= exact, got


def test_tiny_rounding_bounds_are_refused():
    """A block whose product's rounding bound has nonzero entries below 1e-150 (squared by
    the row norms) is refused like tiny weights; an infinite bound is sound (loose) and
    accepted."""
    from lipbound.analyzer import _check_magnitudes
    from lipbound.blocks import AffineBlock
    from lipbound.errors import InputError
    from lipbound.ops.linear import LinearOp

    w = torch.tensor([[1.0, 0.0]], dtype=DT)
    for e, refused in ((1e-160, True), (1e-140, False), (math.inf, False)):
        err = torch.tensor([[0.0, e]], dtype=DT)
        blocks = [AffineBlock([LinearOp("w", w, None, err=err)], True)]
        if refused:
            with pytest.raises(InputError, match="below 1e-150"):
                _check_magnitudes(blocks)
        else:
            _check_magnitudes(blocks)


def test_composing_from_the_outputs_keeps_no_transposed_copy():
    """The transposed products make a transposed copy of a fully connected layer
    (``DenseProducts``); the layer stays in the analyser's op list after it is composed, so
    the copy was kept there for good (doubling that layer's memory, in pickles too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(),
                          nn.Linear(256, 8)).eval()
    an = Analyzer(model, (1, 8, 8))
    assert [b.name for b in an.blocks] == ["0*2"]
    assert an.ops[-1]._products._mt is None


@st.composite
def _extreme_chains(draw):
    """Conv [BatchNorm2d] [average pool] Flatten Linear [BatchNorm1d]: each layer's weights
    of one random magnitude from 2^-540 to 2^540, so that products of two or three layers
    often underflow or overflow, one way and not the other."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    c_in, c_out, hw = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 4))
    mods = [nn.Conv2d(c_in, c_out, draw(st.integers(1, 2)), padding=draw(st.integers(0, 1)))]
    if draw(st.booleans()):
        mods.append(nn.BatchNorm2d(c_out))
    if draw(st.booleans()):
        mods.append(nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False))
    mods.append(nn.Flatten())
    probe = nn.Sequential(*mods).to(DT).eval()
    n_mid = probe(torch.zeros(1, c_in, hw, hw, dtype=DT)).shape[1]
    n_out = draw(st.integers(1, 4))
    mods.append(nn.Linear(n_mid, n_out))
    if draw(st.booleans()):
        mods.append(nn.BatchNorm1d(n_out))
    model = nn.Sequential(*mods).to(DT).eval()
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
                scale = 2.0 ** (draw(st.sampled_from([-540, -500, 0, 500, 540]))
                                + draw(st.integers(-8, 8)))
                w = torch.randn(mod.weight.shape, generator=g, dtype=DT)
                mod.weight.copy_(w * scale)
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g,
                                                 dtype=DT) + 0.5)
    return model, (c_in, hw, hw)


@settings(max_examples=n_examples(40), deadline=None)
@given(case=_extreme_chains())
def test_composed_matrix_is_within_its_bound_at_the_ends_of_the_range(case):
    """Whichever way a run is composed (or both), a finite matrix is within its stated
    entrywise rounding bound of the exact product, in rational arithmetic."""
    from lipbound.errors import InputError
    from lipbound.graph import trace_model

    model, shape = case
    try:
        ops = trace_model(model, shape)
    except InputError:  # the forward pass itself overflows
        return
    exact = _exact_product(ops)
    for way in (False, True, None):
        lin = _composed(ops, transposed=way)
        if lin is None or not bool(torch.isfinite(lin.weight).all()):
            continue
        assert _within(lin, exact), way
