"""``F.linear(x, self.w, self.b)`` and ``F.conv2d(x, self.weight, self.bias, ...)`` with
registered parameters (hand-written models) are analysed as the ``nn.Linear`` /
``nn.Conv2d`` they compute: the same bounds as the module model; later changes of their
parameters are refused like a layer's; weights computed in forward or held as plain tensor
attributes are refused with a message naming the fix (not taken as constants)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound.errors import InputError, UnsupportedModelError
from lipbound.lower import best_lower_bound


def _seeded(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m.double().eval()


class ModuleNet(nn.Module):
    def __init__(self, groups: int = 1, padding: object = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=stride, padding=padding, groups=groups)
        self.conv2 = nn.Conv2d(4, 2, 3, bias=False, dilation=2)
        self.fc = nn.Linear(2 * self._side(stride, padding) ** 2, 5)
        self.out = nn.Linear(5, 3, bias=False)

    @staticmethod
    def _side(stride: int, padding: object) -> int:
        side = 10 if padding == "same" else (10 + 2 * (padding == 1) - 3) // stride + 1
        return side - 4

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.conv2(h)).flatten(1)
        return self.out(torch.relu(self.fc(h)))


class FunctionalNet(nn.Module):
    """The same network with parameters of its own and functional calls."""

    def __init__(self, ref: ModuleNet) -> None:
        super().__init__()
        self.ref = ref
        self.cw = nn.Parameter(ref.conv.weight.detach().clone())
        self.cb = nn.Parameter(ref.conv.bias.detach().clone())
        self.c2w = nn.Parameter(ref.conv2.weight.detach().clone())
        self.fw = nn.Parameter(ref.fc.weight.detach().clone())
        self.register_buffer("fb", ref.fc.bias.detach().clone())
        self.ow = nn.Parameter(ref.out.weight.detach().clone())
        self.opts = (ref.conv.stride, ref.conv.padding, ref.conv.groups)

    def forward(self, x):
        stride, padding, groups = self.opts
        h = torch.relu(F.conv2d(x, self.cw, self.cb, stride, padding, 1, groups))
        h = torch.relu(F.conv2d(h, weight=self.c2w, dilation=2)).flatten(1)
        return F.linear(torch.relu(F.linear(h, self.fw, self.fb)), self.ow)


X0 = torch.randn(1, 2, 10, 10, generator=torch.Generator().manual_seed(3),
                 dtype=torch.float64)


@pytest.mark.parametrize("kw", [{}, {"groups": 2, "stride": 2}, {"padding": "same"}])
def test_functional_layers_give_the_module_models_bounds(kw):
    # (was: "not a chain: takes 3 tensor input(s) / ... residual connections are not
    # supported")
    ref = _seeded(ModuleNet(**kw), 0)
    fun = FunctionalNet(ref).double().eval()
    del fun.ref  # (only its own parameters)
    with torch.no_grad():
        assert torch.equal(fun(X0), ref(X0))
    a, b = lipbound.Analyzer(ref, (2, 10, 10)), lipbound.Analyzer(fun, (2, 10, 10))
    assert [op.kind for op in a.ops] == [op.kind for op in b.ops]
    ga, gb = a.global_bound(), b.global_bound()
    assert ga.value == gb.value and ga.guarantee == gb.guarantee
    for eps in (0.01, 1.0):
        la, lb = a.local_bound(X0, eps), b.local_bound(X0, eps)
        assert la.value == lb.value and la.guarantee == lb.guarantee
        # and the bound is sound: >= a sampled ratio
        assert lb.value >= best_lower_bound(fun, X0, eps).value


def test_changed_parameter_of_a_functional_layer_is_refused():
    ref = _seeded(ModuleNet(), 1)
    fun = FunctionalNet(ref).double().eval()
    del fun.ref
    an = lipbound.Analyzer(fun, (2, 10, 10))
    an.global_bound()
    with torch.no_grad():
        fun.ow.mul_(100)
    with pytest.raises(InputError, match="changed after"):
        an.global_bound()
    an = lipbound.Analyzer(fun, (2, 10, 10))
    fun.fb.data.add_(1.0)  # (a buffer, through .data)
    with pytest.raises(InputError, match="changed after"):
        an.local_bound(X0, 0.1)


class Computed(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.plain = torch.randn(3, 4, dtype=torch.float64)
        self.cw = nn.Parameter(torch.randn(2, 1, 3, 3, dtype=torch.float64))

    def forward(self, x):
        if self.how == "scaled":
            return F.linear(x, self.w * 2)
        if self.how == "plain":
            return F.linear(x, self.plain)
        if self.how == "bias from input":
            return F.linear(x, self.w, x[:, :3])
        if self.how == "conv scaled":
            return F.conv2d(x.view(-1, 1, 2, 2), self.cw * 3, padding=1).flatten(1)
        return F.linear(x.view(-1, 2, 2), self.w)  # (a 2-d per-sample input)


@pytest.mark.parametrize("how,match", [
    ("scaled", r"weight 'mul' is not a parameter.*use an nn\.Linear module"),
    ("plain", r"weight '\w+' is not a parameter.*use an nn\.Linear module"),
    ("bias from input", r"linear.*not a chain: takes 2 tensor input"),
    ("conv scaled", r"weight 'mul' is not a parameter.*use an nn\.Conv2d module"),
])
def test_weights_computed_in_forward_are_refused(how, match):
    m = Computed(how).eval()
    with pytest.raises(UnsupportedModelError, match=match) as info:
        lipbound.Analyzer(m, (4,))
    if how != "bias from input":  # (the node's line names the fix, not residual connections)
        line = next(t for t in str(info.value).splitlines() if "'linear'" in t
                    or "'conv2d'" in t)
        assert "residual" not in line
