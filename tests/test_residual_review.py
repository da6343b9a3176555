"""Adversarial review of residual networks (lipbound.residual, lipbound.residual_graph): models
whose traced graph computes another function than the model (in-place operations read
again), the intake's messages, and the bounds against brute force where the split is right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound.errors import UnsupportedModelError
from lipbound.residual import ResidualAnalyzer

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64

#: the first coordinate of the stage check's random input (ResidualAnalyzer._verify: seed
#: 1234), on whose line every point of that check lies for a model of one input
_V = float(torch.randn((1, 1), generator=torch.Generator().manual_seed(1234), dtype=DT))


class PreActAlias(nn.Module):
    """A pre-activation block whose in-place ReLU changes the tensor its identity shortcut
    reads: the model adds ``relu(h)``, the traced graph ``h``. ``h_2 = t / v + 1.5`` is
    positive at every point of the stage check (``t`` in ``v``, ``-v``, ``1e-3 v``, ``1e3 v``),
    where the in-place ReLU changes nothing, and negative at ``t = -20 v``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(1, 2)
        self.act = nn.ReLU(inplace=True)
        self.f = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.stem.weight.copy_(torch.tensor([[0.01 / _V], [1 / _V]]))
            self.stem.bias.copy_(torch.tensor([1.0, 1.5]))
            self.f.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            self.f.bias.copy_(torch.tensor([-1.0, 5.0]))
            self.head.weight.copy_(torch.tensor([[0.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        h = self.stem(x)
        identity = h
        out = self.f(self.act(h))
        return self.head(F.relu(out + identity))


def test_inplace_relu_on_the_fork_read_by_the_shortcut_is_refused():
    """Before the review the stages (shortcut ``h``) passed the stage check and the certified
    local bound at ``-20 v`` was 0, the model's local constant there 0.0217 / |v| = 0.217."""
    model = PreActAlias().to(DT).eval()
    x0 = torch.tensor([[-20 * _V]], dtype=DT)
    with torch.no_grad():  # the model's own secant: positive
        slope = float((model(x0 + 1e-3) - model(x0)).abs()) / 1e-3
    assert slope > 0.2
    with pytest.raises(UnsupportedModelError, match="in-place") as err:
        lipbound.local_bound(model, x0, 1e-3)
    assert "module 'act'" in str(err.value) and "inplace=False" in str(err.value)
    with pytest.raises(UnsupportedModelError, match="read again after it"):
        ResidualAnalyzer(model, (1,))


class Forms(nn.Module):
    """In-place forms on a tensor read again later (each refused), and the safe ones."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.act = nn.ReLU(inplace=True)
        self.how = how

    def forward(self, x):
        h = self.a(x)
        if self.how == "relu_ on the fork":
            f = self.b(h)
            torch.relu_(h)
            y = f + h
        elif self.how == "F.relu inplace on the fork":
            f = self.b(F.relu(h, inplace=True))
            y = f + h
        elif self.how == "add_ result unused":
            f = self.b(F.relu(h))
            f.add_(h)
            y = F.relu(f)
        elif self.how == "alias of the fork":
            s = h
            h.add_(self.b(F.relu(h)))
            y = F.relu(s)
        elif self.how == "view of the fork":
            v = h.view(-1, 3)
            f = self.b(self.act(h))
            y = f + v
        elif self.how == "out= on the fork":
            f = self.b(h)
            torch.clamp(h, min=0, out=h)
            y = f + h
        elif self.how == "torchvision":  # out += identity; relu(inplace) after: safe
            out = self.b(self.act(self.a(h)))
            out += h
            y = self.act(out)
        else:  # "x += F(x)" on the fork, not read again: safe
            h += self.b(F.relu(h))
            y = h
        return self.head(y)


@pytest.mark.parametrize("how", ["relu_ on the fork", "F.relu inplace on the fork",
                                 "add_ result unused", "alias of the fork",
                                 "view of the fork", "out= on the fork"])
def test_inplace_forms_read_again_are_refused_by_name(how):
    torch.manual_seed(0)
    model = Forms(how).to(DT).eval()
    with pytest.raises(UnsupportedModelError, match="in-place operation on") as err:
        ResidualAnalyzer(model, (3,))
    assert str(err.value).count("in-place operation on") == 1


@pytest.mark.parametrize("how", ["torchvision", "x += F(x)"])
def test_safe_inplace_forms_still_analysed(how):
    torch.manual_seed(0)
    model = Forms(how).to(DT).eval()
    ra = ResidualAnalyzer(model, (3,))
    x = torch.randn(20, 3, dtype=DT)
    with torch.no_grad():
        assert torch.allclose(ra.forward(x), model(x), atol=1e-12)


class SizeOfInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.f, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        n = x.size(0)
        h = F.relu(self.stem(x))
        out = F.relu(self.f(h) + h)
        return self.head(out.view(n, -1))


def test_size_of_the_model_input_named_with_the_fix():
    """It was reported as 'a branch that does not start at the fork' on the head (a chain
    piece, not a branch), without the fix."""
    model = SizeOfInput().to(DT).eval()
    with pytest.raises(UnsupportedModelError, match=r"out\.size\(0\)") as err:
        ResidualAnalyzer(model, (3,))
    assert "'size'" in str(err.value) and "branch" not in str(err.value)


class LastReluBlock(nn.Module):
    """``relu(S x + F(x))`` with ``S = (1, -1)`` and ``F`` (nearly) the constant ``(0.5,
    -0.5)``: at ``x0 = 0`` the first unit is on, the second off and turning on at ``x = -0.5``
    (its secant slope over the unit ball 0.5)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Linear(1, 2, bias=False)
        self.f = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
        with torch.no_grad():
            self.s.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.f[0].weight.fill_(1.0)
            self.f[0].bias.zero_()
            self.f[2].weight.fill_(1e-9)
            self.f[2].bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x):
        return F.relu(self.s(x) + self.f(x))


def test_output_map_after_a_last_relu_block_bounds_the_secant():
    """``C = [1, 1]`` after the block: ``C R S = 1 - 0.5`` cancels, while the actual slopes
    at ``x = 1`` are ``(1, 0)``: the composed ``L(C R S) + L(C R F)`` was a certified 0.5 for
    the secant 1 from ``x0`` to ``x0 + 1``."""
    model = LastReluBlock().to(DT).eval()
    x0 = torch.zeros(1, 1, dtype=DT)
    c = torch.tensor([[1.0, 1.0]], dtype=DT)
    with torch.no_grad():
        secant = float((c @ (model(x0 + 1.0) - model(x0)).T).abs())
    assert secant > 0.99
    res = lipbound.local_bound(model, x0, 1.0, output_map=c)
    assert res.method == "local-residual" and res.guarantee.name == "CERTIFIED"
    assert res.value >= secant
    # the random maps of a wider last block, against sampled secants
    torch.manual_seed(4)
    for _ in range(5):
        cm = torch.randn(2, 2, dtype=DT)
        ra = ResidualAnalyzer(model, (1,))
        xs = torch.linspace(-1.0, 1.0, 201, dtype=DT).reshape(-1, 1)
        xs = xs[xs.abs().reshape(-1) > 0]
        with torch.no_grad():
            d = (model(xs) - model(x0)) @ cm.T
        worst = float((d.norm(dim=1) / xs.abs().reshape(-1)).max())
        assert ra.local_bound(x0, 1.0, output_map=cm).value >= worst


class ScaledAdd(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.how = how

    def forward(self, x):
        h = self.a(x)
        f = self.b(F.relu(h))
        y = h.add(f, alpha=2) if self.how == "method" else torch.add(h, f, alpha=0)
        return self.head(F.relu(y))


@pytest.mark.parametrize("how", ["method", "alpha=0"])
def test_addition_with_alpha_named_with_the_fix(how):
    """alpha=2 was reported as 'no addition of two branches found'; alpha=0 was read as a
    plain addition (``not alpha``), caught only by the stage check's numbers."""
    torch.manual_seed(0)
    model = ScaledAdd(how).to(DT).eval()
    with pytest.raises(UnsupportedModelError, match="alpha=") as err:
        ResidualAnalyzer(model, (3,))
    assert "a + alpha * b" in str(err.value)
    with pytest.raises(UnsupportedModelError, match="addition with a factor"):
        lipbound.local_bound(model, torch.zeros(1, 3, dtype=DT), 0.1)


def test_stage_check_looks_off_the_line_of_its_first_input(monkeypatch):
    """ResidualAnalyzer's stage check also runs at a second, independent random input: a
    split that is wrong only off the line through its first input (which every scaled copy
    lies on) is refused. Simulated by stages that differ from the model by ``relu(w . x)``
    with ``w`` orthogonal to that first input (0 on its whole line)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(x + self.f(torch.relu(x)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), torch.nn.Linear(4, 3)).double().eval()
    x1 = torch.randn((1, 4), generator=torch.Generator().manual_seed(1234),
                     dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64)
    w = w - (w @ x1[0]) / (x1[0] @ x1[0]) * x1[0]  # (orthogonal to the check's first input)
    true_forward = ResidualAnalyzer.forward

    def off_line(self, x):
        y = true_forward(self, x)
        return y + 10.0 * torch.relu(x.reshape(x.shape[0], -1) @ w).unsqueeze(1)

    lipbound.ResidualAnalyzer(model, (4,))  # (the model itself passes)
    monkeypatch.setattr(ResidualAnalyzer, "forward", off_line)
    with pytest.raises(UnsupportedModelError, match="second random input"):
        ResidualAnalyzer(model, (4,))
