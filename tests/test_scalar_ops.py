"""Arithmetic with a constant inside ``forward`` (src/lipbound/ops/scalar.py): ``x / 255``,
``x * 2 - 1``, ``(x - self.mean) / self.std``, ``0.5 * x``, ``x.mul(c)``, ``torch.add(x, c)``,
``-x``, ... analysed as diagonal affine layers.

Checks: every form's global and local bounds agree (within rounding) with the same network
written with ``lipbound.Normalize`` or a diagonal ``nn.Linear``, lie above lipbound's lower
bounds and the exact local constant; the global bound scales by ``|c|``; the refusals (``x *
x``, residual sums, ``c / x``, a divisor with a zero, a non-finite constant, a shape-changing
broadcast, a plain tensor attribute) name their node; a hypothesis property over random
constants (tiny, huge, negative) and random small nets; the rivals' exact FC conversion and
``compare``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipbound
from core_helpers import n_examples
from lipbound import Analyzer, Normalize
from lipbound.baselines import compare, exact_local_l2
from lipbound.baselines.compare import violations
from lipbound.baselines.conv_to_fc import relu_chain
from lipbound.baselines.fc import fc_forward
from lipbound.errors import LipboundError, UnsupportedModelError
from lipbound.graph import trace_model
from lipbound.lower import best_lower_bound
from lipbound.ops.base import DiagOp

DT = torch.float64
N_IN, N_HID, N_OUT = 4, 6, 3
CH, HW = 2, 3
REL = 1e-9  # agreement of two analyses of the same function (rounding of different routes)
REL_LOCAL = 1e-6
LOW_KW = dict(n_random=64, gradient_steps=20, pgd_restarts=4, pgd_steps=10, pgd_refine=1,
              pgd_refine_steps=10)


def _net(seed: int, n_in: int = N_IN) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, N_HID), nn.ReLU(), nn.Linear(N_HID, N_OUT)).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return net.eval()


class Pre(nn.Module):
    """``net(fn(self, x))``: a preprocessing written as plain arithmetic in forward."""

    def __init__(self, fn, net: nn.Module, **buffers: torch.Tensor):
        super().__init__()
        self.fn = fn
        for k, v in buffers.items():
            self.register_buffer(k, v)
        self.net = net

    def forward(self, x):
        return self.net(self.fn(self, x))


def _pre(fn, net, **buffers) -> nn.Module:
    return Pre(fn, net, **buffers).eval()


class DiagLinear(nn.Module):
    """The reference: ``net(s * x + t)`` as an ``nn.Linear`` with weight ``diag(s)``."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor, net: nn.Module):
        super().__init__()
        n = s.numel()
        self.lin = nn.Linear(n, n).to(DT)
        with torch.no_grad():
            self.lin.weight.copy_(torch.diag(s.to(DT)))
            self.lin.bias.copy_(t.to(DT))
        self.net = net

    def forward(self, x):
        return self.net(self.lin(x))


def _bounds(model: nn.Module, shape: tuple[int, ...], x0: torch.Tensor, eps: float):
    an = lipbound.Analyzer(model, shape)
    return an.global_bound().value, an.local_bound(x0, eps).value


def _close_above(got: float, ref: float, rel: float = REL) -> None:
    """``got`` agrees with ``ref`` within rounding (and lies above the truth: see callers).
    Local bounds get ``REL_LOCAL``: their secant slopes come from pre-activation limits that
    carry the rounding bounds of the nominal pass, a few ulps larger through two diagonal
    layers than through one."""
    assert got <= ref * (1 + rel) + 1e-300, (got, ref)
    assert got >= ref * (1 - rel), (got, ref)


# the vector forms: (fn, scale s, shift t) with y = s x + t (per coordinate)
C = 0.37
VEC = torch.tensor([0.5, -2.0, 3.0, 0.25], dtype=DT)
FORMS = {
    "x / 255": (lambda m, x: x / 255, 1 / 255, 0.0),
    "x * 2 - 1": (lambda m, x: x * 2 - 1, 2.0, -1.0),
    "(x - 0.5) / 0.5": (lambda m, x: (x - 0.5) / 0.5, 2.0, -1.0),
    "0.5 * x": (lambda m, x: 0.5 * x, 0.5, 0.0),
    "x.mul(c)": (lambda m, x: x.mul(C), C, 0.0),
    "x.div(c)": (lambda m, x: x.div(C), 1 / C, 0.0),
    "torch.mul(x, c)": (lambda m, x: torch.mul(x, -C), -C, 0.0),
    "torch.mul(c, x)": (lambda m, x: torch.mul(-C, x), -C, 0.0),
    "x.sub(c)": (lambda m, x: x.sub(C), 1.0, -C),
    "x.add(c)": (lambda m, x: x.add(C), 1.0, C),
    "torch.add(x, c)": (lambda m, x: torch.add(x, C), 1.0, C),
    "torch.sub(x, other=c)": (lambda m, x: torch.sub(x, other=C), 1.0, -C),
    "1 - x": (lambda m, x: 1 - x, -1.0, 1.0),
    "-x": (lambda m, x: -x, -1.0, 0.0),
    "torch.neg(x)": (lambda m, x: torch.neg(x), -1.0, 0.0),
    "x * int 3": (lambda m, x: x * 3, 3.0, 0.0),
    "x * buffer": (lambda m, x: x * m.v, VEC, 0.0),
    "x / buffer": (lambda m, x: x / m.v, 1 / VEC, 0.0),
    "buffer - x": (lambda m, x: m.v - x, -1.0, VEC),
    "x + int buffer": (lambda m, x: x + m.k, 1.0, torch.tensor([1.0, -2.0, 3.0, 0.0])),
    "x * 0": (lambda m, x: x * 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_vector_form_matches_diagonal_linear(form: str) -> None:
    fn, s, t = FORMS[form]
    s = torch.broadcast_to(torch.as_tensor(s, dtype=DT), (N_IN,))
    t = torch.broadcast_to(torch.as_tensor(t, dtype=DT), (N_IN,))
    net = _net(1)
    model = _pre(fn, net, v=VEC.clone(), k=torch.tensor([1, -2, 3, 0]))
    ops = trace_model(model, (N_IN,))
    assert isinstance(ops[0], DiagOp) and ops[0].kind == "diag"
    ref = DiagLinear(s, t, net).eval()
    x0 = torch.randn(1, N_IN, generator=torch.Generator().manual_seed(2), dtype=DT)
    eps = 0.3
    g, loc = _bounds(model, (N_IN,), x0, eps)
    g_ref, loc_ref = _bounds(ref, (N_IN,), x0, eps)
    _close_above(g, g_ref)
    _close_above(loc, loc_ref, REL_LOCAL)
    assert g >= loc * (1 - REL)
    low = best_lower_bound(model, x0, eps, seed=0, **LOW_KW).value
    assert loc >= low
    if float(s.abs().max()) == 0.0:
        assert g == 0.0 and loc == 0.0  # a constant map
        return
    # the exact constant over all pairs of the ball (above the x0-relative one the local
    # bound is about): below the global bound
    exact = exact_local_l2(ref, x0, eps, time_limit=20).value
    assert g >= exact * (1 + 1e-12)
    assert exact >= low * (1 - 1e-9)


MEAN = torch.tensor([0.4, -0.3], dtype=DT)
STD = torch.tensor([0.5, 2.0], dtype=DT)


def _conv_net(seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(CH, 3, 2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * (HW - 1) ** 2, N_OUT)).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return net.eval()


@pytest.mark.parametrize("shape", [(CH, 1, 1), (1, CH, 1, 1), (CH, 1, 1, "view")])
def test_per_channel_buffers_match_normalize(shape) -> None:
    """``(x - self.mean) / self.std`` with (C,1,1) or (1,C,1,1) buffers (or viewed from (C,)
    in forward) against lipbound.Normalize."""
    net = _conv_net(3)
    if shape[-1] == "view":
        model = _pre(lambda m, x: (x - m.mean.view(CH, 1, 1)) / m.std.view(1, CH, 1, 1),
                     net, mean=MEAN.clone(), std=STD.clone())
    else:
        model = _pre(lambda m, x: (x - m.mean) / m.std, net, mean=MEAN.view(shape).clone(),
                     std=STD.view(shape).clone())
    ref = nn.Sequential(Normalize(MEAN, STD).to(DT), net).eval()
    in_shape = (CH, HW, HW)
    x0 = torch.randn(1, *in_shape, generator=torch.Generator().manual_seed(4), dtype=DT)
    g, loc = _bounds(model, in_shape, x0, 0.2)
    g_ref, loc_ref = _bounds(ref, in_shape, x0, 0.2)
    _close_above(g, g_ref)
    _close_above(loc, loc_ref, REL_LOCAL)
    assert loc >= best_lower_bound(model, x0, 0.2, seed=0, **LOW_KW).value


@pytest.mark.parametrize("c", [3.0, -0.125, 1e-100, 7e120, 2.0 ** -60])
def test_global_bound_scales_by_abs_c(c: float) -> None:
    net = _net(5)
    base = lipbound.global_bound(net, (N_IN,)).value
    got = lipbound.global_bound(_pre(lambda m, x: x * c, net), (N_IN,)).value
    want = abs(c) * base
    assert got >= want * (1 - REL) and got <= want * (1 + REL), (got, want)
    got_div = lipbound.global_bound(_pre(lambda m, x: x / (1 / c), net), (N_IN,)).value
    assert got_div >= want * (1 - REL) and got_div <= want * (1 + REL), (got_div, want)


def _refused(model: nn.Module, shape: tuple[int, ...], node: str, words: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        trace_model(model, shape)
    msg = str(info.value)
    assert f"'{node}'" in msg and words in msg, msg


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(N_IN, N_IN).to(DT)
        self.net = _net(0)

    def forward(self, x):
        return self.net(x + self.fc(x))


class PlainAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.mean = torch.ones(N_IN, dtype=DT)  # not a registered buffer
        self.net = _net(0)

    def forward(self, x):
        return self.net(x - self.mean)


def test_refusals_name_the_node() -> None:
    net = _net(0)
    _refused(_pre(lambda m, x: x * x, net), (N_IN,), "mul", "2 operands on the chain")
    _refused(_pre(lambda m, x: x + x, net), (N_IN,), "add", "2 operands on the chain")
    _refused(Residual().eval(), (N_IN,), "add", "not a chain")
    _refused(_pre(lambda m, x: 1 / x, net), (N_IN,), "truediv", "division by the chain")
    _refused(_pre(lambda m, x: x * math.inf, net), (N_IN,), "mul", "not finite")
    _refused(_pre(lambda m, x: x + math.nan, net), (N_IN,), "add", "not finite")
    _refused(_pre(lambda m, x: x / m.v, net, v=torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=DT)),
             (N_IN,), "truediv", "zero entry")
    _refused(_pre(lambda m, x: x / 0.0, net), (N_IN,), "truediv", "zero entry")
    _refused(_pre(lambda m, x: x / 1e-310, net), (N_IN,), "truediv", "normal range")
    _refused(_pre(lambda m, x: torch.add(x, 1.0, alpha=2), net), (N_IN,), "add", "alpha")
    _refused(_pre(lambda m, x: torch.div(x, 2.0, rounding_mode="floor"), net), (N_IN,), "div",
             "rounding_mode")
    _refused(_pre(lambda m, x: x + True, net), (N_IN,), "add", "boolean")
    with pytest.raises(LipboundError, match="mul"):  # (torch itself cannot run it)
        trace_model(_pre(lambda m, x: x * 2 ** 1100, net), (N_IN,))
    _refused(_pre(lambda m, x: x * (2 ** 60 + 1), net), (N_IN,), "mul", "not exactly")
    _refused(PlainAttribute().eval(), (N_IN,), "sub", "register_buffer")
    _refused(_pre(lambda m, x: x * torch.full((N_IN,), 2.0, dtype=DT), net), (N_IN,), "mul",
             "register_buffer")  # a tensor made in forward
    _refused(_pre(lambda m, x: x * (m.w * 2), net, w=torch.ones(N_IN, dtype=DT)), (N_IN,),
             "mul", "register_buffer")
    # a constant that broadcasts a (1, 3, 3) image to (2, 3, 3): the shape changes
    conv = nn.Sequential(nn.Conv2d(CH, 1, 2), nn.Flatten()).to(DT).eval()
    _refused(_pre(lambda m, x: x * m.v, conv, v=torch.ones(CH, 1, 1, dtype=DT)), (1, HW, HW),
             "mul", "another shape")
    # a constant with its own batch dimension of 2
    _refused(_pre(lambda m, x: x + m.v, net, v=torch.ones(2, 1, N_IN, dtype=DT)), (N_IN,),
             "add", "")


def test_conversion_and_compare() -> None:
    """The rivals' exact FC conversion takes the new diagonal ops (the converted chain
    computes the model), and ``compare`` runs with no bound below the lower bound."""
    net = _net(7)
    model = _pre(lambda m, x: (x / 255 - m.v) * 2 - 1, net, v=VEC.clone())
    layers = relu_chain(model, (N_IN,))
    x = torch.randn(16, N_IN, generator=torch.Generator().manual_seed(8), dtype=DT)
    with torch.no_grad():
        want = model(x)
    got = torch.as_tensor(fc_forward(layers, x.numpy()))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    x0 = x[:1]
    rows = compare(model, x0, 0.5, methods=["local", "global", "exact-l2",
                                             "fastlip", "autolip", "lower"],
                   exact_time_limit=20)
    assert not violations(rows)
    by = {r.method: r for r in rows}
    assert all(math.isfinite(by[k].value) for k in by), [(r.method, r.note) for r in rows]
    assert by["global"].value >= by["exact-l2"].value
    assert by["local"].value >= by["lower"].value


SCALARS = st.one_of(
    st.sampled_from([1e-300, -1e-300, 1e300, -1e300, 1e-160, 1e150, -1.0, 255.0, 0.0, -0.0]),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
)
OPS = {
    "mul": (lambda c: (lambda m, x: x * c), lambda c: (c, 0.0)),
    "rmul": (lambda c: (lambda m, x: c * x), lambda c: (c, 0.0)),
    "div": (lambda c: (lambda m, x: x / c), lambda c: (1 / c, 0.0)),
    "add": (lambda c: (lambda m, x: x + c), lambda c: (1.0, c)),
    "sub": (lambda c: (lambda m, x: x - c), lambda c: (1.0, -c)),
    "rsub": (lambda c: (lambda m, x: c - x), lambda c: (-1.0, c)),
}


@settings(max_examples=n_examples(25))
@given(c=SCALARS, op=st.sampled_from(sorted(OPS)), seed=st.integers(0, 10_000))
def test_random_scalar_property(c: float, op: str, seed: int) -> None:
    """Sound or refused: the bounds of ``net(x op c)`` lie above the lower bound and agree
    with the diagonal-Linear reference when both analyse; the refusals are clear errors."""
    make, affine = OPS[op]
    net = _net(seed)
    model = _pre(make(c), net)
    x0 = torch.randn(1, N_IN, generator=torch.Generator().manual_seed(seed), dtype=DT)
    eps = 0.25
    try:
        g, loc = _bounds(model, (N_IN,), x0, eps)
    except LipboundError as exc:
        # refused: only for a divisor of 0, or scales whose squares leave float64
        # (the analyser refuses coefficients below 1e-150 of the composed layers)
        s = 0.0 if (op == "div" and c == 0) else abs(affine(c)[0])
        assert s == 0.0 and op == "div" or s < 1e-100 or s > 1e100 or abs(c) > 1e100, exc
        return
    assert g >= loc * (1 - REL) or math.isinf(g)
    s, t = affine(c)
    if math.isfinite(g) and math.isfinite(loc) and abs(s) < 1e100:
        # (beyond, the lower bound's own differences of outputs overflow: NaN)
        with torch.no_grad():
            finite = bool(torch.isfinite(model(x0)).all())
        if finite:
            low = best_lower_bound(model, x0, eps, seed=0, **LOW_KW).value
            assert loc >= low, (loc, low)
    if op in ("mul", "rmul", "div") and s != 0.0:
        base_g = lipbound.global_bound(net, (N_IN,)).value
        want = abs(s) * base_g
        if math.isfinite(want) and want > 0:
            assert g >= want * (1 - REL) and (g <= want * (1 + REL)), (g, want)
    if op in ("add", "sub", "rsub") and abs(c) < 1e6:
        s_t = torch.full((N_IN,), s, dtype=DT)
        ref = DiagLinear(s_t, torch.full((N_IN,), t, dtype=DT), net).eval()
        g_ref, loc_ref = _bounds(ref, (N_IN,), x0, eps)
        _close_above(g, g_ref)
        _close_above(loc, loc_ref, REL_LOCAL)


def test_float32_model_rounds_its_constants() -> None:
    """In a float32 model torch multiplies by the float32 number nearest 0.1: the bounds
    cover both that constant and 0.1 itself (``fold_rel`` / ``shift_err``)."""
    net = _net(9).float()
    c32 = float(torch.tensor(0.1, dtype=torch.float32))
    assert c32 > 0.1
    base = lipbound.global_bound(net, (N_IN,)).value
    model = _pre(lambda m, x: x * 0.1, net)
    op = trace_model(model, (N_IN,))[0]
    assert op.fold_rel >= (c32 - 0.1) / 0.1
    got = lipbound.global_bound(model, (N_IN,)).value
    assert got >= c32 * base * (1 - 1e-12) and got <= 0.1 * base * (1 + 1e-6), (got, base)
    op = trace_model(_pre(lambda m, x: x / 0.1, net), (N_IN,))[0]
    # the model divides by c32: both 1 / c32 and the exact 1 / 0.1 lie within fold_rel
    for exact in (1 / c32, 10.0):
        assert abs(exact - float(op.scale[0])) <= op.fold_rel * float(op.scale[0])
    op = trace_model(_pre(lambda m, x: x + 0.1, net), (N_IN,))[0]
    assert float(op.shift_err[0]) >= c32 - 0.1 and float(op.shift[0]) == 0.1
    # exact in float32: nothing added
    op = trace_model(_pre(lambda m, x: x * 0.5 - 0.25, net), (N_IN,))[0]
    assert op.fold_rel == 0.0 and op.shift_err is None


class ScaledByAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = 2.0  # a plain float attribute: torch.fx records its value
        self.net = _net(0)

    def forward(self, x):
        return self.net(x * self.scale)


def test_changed_float_attribute_is_seen() -> None:
    """An Analyzer built with ``self.scale = 2.0`` must not answer for ``self.scale = 100``
    (it would report the old, 50 times smaller, bound)."""
    m = ScaledByAttribute().eval()
    an = lipbound.Analyzer(m, (N_IN,))
    before = an.global_bound().value
    m.scale = 100.0
    with pytest.raises(LipboundError, match="changed"):
        an.global_bound()
    assert lipbound.global_bound(m, (N_IN,)).value >= 50 * before * (1 - REL)


def test_tracing_leaves_no_attribute_on_the_model():
    """torch.fx stores a view it records (``self.std.view(1, -1, 1, 1)``) on the traced
    module as ``_tensor_constant0``: lipbound takes it back (it changes no model)."""
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("std", torch.tensor([0.5], dtype=torch.float64))
            self.f = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()

        def forward(self, x):
            return self.f((x / 255 - 0.5) / self.std.view(1, -1, 1, 1))

    m = Scaled().eval()
    before = dict(vars(m))
    an = Analyzer(m, (1, 2, 2))
    assert an.global_bound().value > 0
    assert vars(m).keys() == before.keys()
