"""Batch norm and input normalisation are folded into a float64 scale and shift; the exact
layer is the formula on the parameters (``γ (x - μ) / sqrt(σ² + eps) + β``,
``(x - mean) / std``), with a real square root. The fold's own rounding is carried: in the
nominal pass's rounding bound (``DiagOp.forward_error``), in every factor of a block holding
such a layer (``AffineBlock.fold_factor``), and in the rounding bounds of products of layers
through it (``blocks._fold_error``).
References here are computed in 80-digit decimal arithmetic."""

from __future__ import annotations

import random
from decimal import Decimal, getcontext

import pytest
import torch
from torch import nn

from lipbound import Analyzer
from lipbound.layers import Normalize
from lipbound.ops.elementwise import batchnorm_rule, normalize_rule

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _d(v) -> Decimal:
    return Decimal(float(v.detach()) if isinstance(v, torch.Tensor) else float(v))


def _random_bn(rng: random.Random) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(1, eps=rng.choice([1e-5, 1e-3, 0.0, 0.1])).eval()
    with torch.no_grad():
        bn.running_var.fill_(rng.uniform(0.01, 10.0))
        bn.running_mean.fill_(rng.uniform(-100.0, 100.0))
        bn.weight.fill_(rng.uniform(-3.0, 3.0))
        bn.bias.fill_(rng.choice([0.0, rng.uniform(-1e-3, 1e-3), rng.uniform(-100.0, 100.0)]))
    return bn


def test_batch_norm_rounding_bound_covers_the_exact_layer():
    """The bound was the rounding of evaluating the folded layer only, against which the
    fold's own rounding (the square root, the reciprocal, the shift ``β - μ s``) was up to 59
    times too large: 516 of 20,000 random layers and inputs (an input near 0 with ``β ≈ μ s``:
    the shift nearly cancels, the scale's error times ``μ`` does not)."""
    getcontext().prec = 80
    rng = random.Random(0)
    for _ in range(2000):
        bn = _random_bn(rng)
        op = batchnorm_rule(bn, "bn", (1,), (1,))
        mu = float(bn.running_mean)
        x = torch.tensor([[rng.choice([0.0, rng.uniform(-1e-3, 1e-3), mu * rng.uniform(-2, 2)])]],
                         dtype=DT)
        y = op.forward(x)
        bound = op.forward_error(x, y, torch.zeros((), dtype=DT)).reshape(-1)[0]
        exact = (_d(bn.weight) * (_d(x) - _d(mu)) / (_d(bn.running_var) + _d(bn.eps)).sqrt()
                 + _d(bn.bias))
        assert abs(_d(y) - exact) <= _d(bound), (bn.state_dict(), float(x))


def test_normalisation_rounding_bound_covers_the_exact_layer():
    getcontext().prec = 80
    rng = random.Random(1)
    for _ in range(1000):
        mean, std = rng.uniform(-10.0, 10.0), rng.uniform(1e-3, 10.0)
        op = normalize_rule(Normalize([mean], [std]), "norm", (1, 1, 1), (1, 1, 1))
        x = torch.tensor([[[[rng.choice([0.0, mean * (1 + rng.uniform(-1e-6, 1e-6)),
                                         rng.uniform(-10.0, 10.0)])]]]], dtype=DT)
        y = op.forward(x)
        bound = op.forward_error(x, y, torch.zeros((), dtype=DT)).reshape(-1)[0]
        exact = (_d(x) - _d(torch.tensor(mean, dtype=torch.float32))) \
            / _d(torch.tensor(std, dtype=torch.float32))
        assert abs(_d(y) - exact) <= _d(bound), (mean, std, float(x))


def test_an_input_error_through_the_fold_is_covered():
    """With an inherited error ``e`` the exact layer sees ``x*`` within ``e`` of ``x``: its
    own scale times ``e``, which may exceed the stored one."""
    getcontext().prec = 80
    rng = random.Random(2)
    for _ in range(300):
        bn = _random_bn(rng)
        op = batchnorm_rule(bn, "bn", (1,), (1,))
        x = torch.tensor([[rng.uniform(-5, 5)]], dtype=DT)
        e = abs(float(x)) * 1e-3 + 1e-6
        x_star = _d(x) + Decimal(e) * (1 if rng.random() < 0.5 else -1)
        y = op.forward(x)
        bound = op.forward_error(x, y, torch.tensor(e, dtype=DT)).reshape(-1)[0]
        exact = (_d(bn.weight) * (x_star - _d(bn.running_mean))
                 / (_d(bn.running_var) + _d(bn.eps)).sqrt() + _d(bn.bias))
        assert abs(_d(y) - exact) <= _d(bound)


def test_factors_cover_the_exact_scale():
    """A block with a batch norm reports factors for the exact scale ``γ / sqrt(σ² + eps)``,
    not only the folded one: Linear(1, 1) with weight 1 into a batch norm whose folded scale
    rounds below the exact one."""
    getcontext().prec = 80
    rng = random.Random(3)
    checked = 0
    for _ in range(200):
        bn = _random_bn(rng)
        exact = abs(_d(bn.weight)) / (_d(bn.running_var) + _d(bn.eps)).sqrt()
        folded = batchnorm_rule(bn, "bn", (1,), (1,)).scale.reshape(-1)[0]
        if _d(folded.abs()) >= exact:
            continue  # rounded up: not the interesting case
        m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1), nn.ReLU()).to(DT)
        with torch.no_grad():
            m[0].weight.fill_(1.0)
        m[1].load_state_dict(bn.state_dict())
        m[1].eps = bn.eps
        m = m.eval()
        an = Analyzer(m, (1,))
        assert an.blocks[0].fold_factor > 1.0
        assert _d(an.global_bound().value) >= exact
        # far on the active side of the ReLU: the local constant is the scale itself
        side = 1.0 if float(bn.weight.detach()) > 0 else -1.0
        x0 = torch.tensor([[float(bn.running_mean) + 1000.0 * side]], dtype=DT)
        assert _d(an.local_bound(x0, 0.1).value) >= exact
        checked += 1
    assert checked >= 20


def _exact_bn(bn) -> tuple[list[Decimal], list[Decimal]]:
    """The exact scale and shift of an eval-mode batch norm, per channel (80 digits)."""
    sc, sh = [], []
    for c in range(bn.num_features):
        s = _d(bn.weight[c]) / (_d(bn.running_var[c]) + _d(bn.eps)).sqrt()
        sc.append(s)
        sh.append(_d(bn.bias[c]) - _d(bn.running_mean[c]) * s)
    return sc, sh


def _cancelling_bn(n: int, rng: random.Random) -> nn.BatchNorm1d:
    """A batch norm whose folded shift ``β - μ s`` nearly cancels (β set to the float64
    ``μ s``): its rounding is then large against the shift itself."""
    bn = nn.BatchNorm1d(n).to(DT).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([rng.uniform(0.01, 10.0) for _ in range(n)]))
        bn.running_mean.copy_(torch.tensor([rng.uniform(-100.0, 100.0) for _ in range(n)]))
        bn.weight.copy_(torch.tensor([rng.uniform(-3.0, 3.0) for _ in range(n)]))
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bn.bias.copy_(bn.running_mean * s * (1 + 1e-15 * torch.randn(n, dtype=DT)))
    return bn


@pytest.mark.parametrize("kind", ["linear", "conv-forward", "conv-transposed"])
def test_products_through_a_batch_norm_are_within_their_bound(kind):
    """Linear, BatchNorm1d, Linear (multiplied as matrices) and Conv2d, BatchNorm2d,
    Flatten, Linear (composed densely, from the inputs or from the outputs): the composed
    matrix and bias are within their stated rounding bounds of the product with the exact
    batch norm. The bias's bound missed the batch norm's own rounding (a shift ``β - μ s``
    that nearly cancels: its rounding is ``u |μ s|``, not ``u |β - μ s|``)."""
    from lipbound.blocks import _compose_linear_run, _dense_compose
    from lipbound.graph import trace_model
    from lipbound.ops.linear import LinearOp

    getcontext().prec = 80
    rng = random.Random(4)
    for trial in range(25):
        torch.manual_seed(trial)
        if kind == "linear":
            first: nn.Module = nn.Linear(2, 3)
            bn: nn.Module = _cancelling_bn(3, rng)
            mods = [first, bn, nn.Linear(3, 2)]
            shape: tuple[int, ...] = (2,)
        else:
            first = nn.Conv2d(1, 3, 1)
            bn1 = _cancelling_bn(3, rng)
            bn = nn.BatchNorm2d(3).to(DT).eval()
            bn.load_state_dict(bn1.state_dict())
            mods = [first, bn, nn.Flatten(), nn.Linear(3, 2 if kind == "conv-forward" else 1)]
            shape = (1, 1, 1)
        m = nn.Sequential(*mods).to(DT).eval()
        ops = trace_model(m, shape)
        if kind == "linear":
            seq = _compose_linear_run(ops)
        else:
            seq = _dense_compose(ops, transposed=kind == "conv-transposed")
        assert seq is not None
        lin = [op for op in seq if isinstance(op, LinearOp)]
        assert len(lin) == 1 and lin[0].err is not None
        lin = lin[0]
        w1, b1 = first.weight.detach().reshape(3, -1), first.bias.detach()
        w2, b2 = mods[-1].weight.detach(), mods[-1].bias.detach()
        sc, sh = _exact_bn(bn)
        for i in range(w2.shape[0]):
            bias = _d(b2[i]) + sum((_d(w2[i, c]) * (sc[c] * _d(b1[c]) + sh[c])
                                    for c in range(3)), Decimal(0))
            assert abs(_d(lin.bias[i]) - bias) <= _d(lin.bias_err[i]), (trial, i)
            for j in range(w1.shape[1]):
                x = sum((_d(w2[i, c]) * sc[c] * _d(w1[c, j]) for c in range(3)), Decimal(0))
                assert abs(_d(lin.weight[i, j]) - x) <= _d(lin.err[i, j]), (trial, i, j)


@pytest.mark.parametrize("weight, var, eps", [(1e-200, 1e260, 1e-5), (1e200, 1.7e308, 1e308)])
def test_a_batch_norm_scale_that_underflows_is_refused(weight, var, eps):
    """``γ / sqrt(σ² + eps)`` below the normal range rounds absolutely (here to 0): the
    relative bound ``fold_rel`` does not hold. Linear, BatchNorm1d (weight 1e-200, variance
    1e260, mean 1e300), Linear: exact constant 1e-330 and exact output -1e-30 at 0, but the
    global bound was 0 and the nominal error 7e-323. And ``σ² + eps`` beyond float64 (1.7e308
    + 1e308 = inf, so the reciprocal 0) with a weight 1e200: exact constant 6e45, bound 0."""
    from lipbound.errors import InputError

    bn = nn.BatchNorm1d(1, eps=eps).to(DT).eval()
    with torch.no_grad():
        bn.weight.fill_(weight)
        bn.running_var.fill_(var)
        bn.running_mean.fill_(1e300)
        bn.bias.fill_(0.0)
    m = nn.Sequential(nn.Linear(1, 1), bn, nn.Linear(1, 1)).to(DT).eval()
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight.fill_(1.0)
            lin.bias.fill_(0.0)
    with pytest.raises(InputError, match="normal range"):
        Analyzer(m, (1,)).global_bound()
