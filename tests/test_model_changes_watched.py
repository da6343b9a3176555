"""Adversarial review (session 18, second reviewer): regression tests of the bugs found.

Each test failed before its fix: an Analyzer answered with the bound of a network the model no
longer computed, or a bound fell below a lower bound of the true constant.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import pytest
import torch
from torch import nn

from lipbound import Analyzer
from lipbound.errors import InputError


def _seeded(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m.eval()


class _Branch(nn.Module):
    """``x * 100`` when ``self.big`` (a numpy bool), else ``x``: torch.fx traces the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.big = np.bool_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 100.0 if self.big else x


def test_numpy_flag_watched():
    m = _div_net(_Branch())
    an = Analyzer(m, (3,))
    _assert_refused_after(an, lambda: setattr(m[1], "big", np.bool_(True)))


class _Div(nn.Module):
    """``x / self.d`` where ``d`` is set only when given (another instance of the class has no
    ``d``, or a ``d`` of another type)."""

    def __init__(self, d: object = None) -> None:
        super().__init__()
        if d is not None:
            self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.d if hasattr(self, "d") else x


class _Level(enum.IntEnum):
    ONE = 1
    BYTE = 255


def _div_net(div: nn.Module) -> nn.Module:
    return _seeded(nn.Sequential(nn.Linear(3, 3), div).double())


def _assert_refused_after(an: Analyzer, change) -> None:
    an.global_bound()
    change()
    with pytest.raises(InputError, match="changed after this Analyzer was built"):
        an.global_bound()


def test_watched_attribute_not_chosen_by_first_instance_of_class():
    # the record's getter was cached per class, named from the first instance seen: an
    # Analyzer of a _Div() (no d) made d of every later _Div unwatched (255x too small)
    Analyzer(_div_net(_Div()), (3,)).global_bound()
    m = _div_net(_Div(255))
    an = Analyzer(m, (3,))
    _assert_refused_after(an, lambda: setattr(m[1], "d", 1))


@pytest.mark.parametrize("first, later", [(np.float64(255.0), np.float64(1.0)),
                                          (_Level.BYTE, _Level.ONE)])
def test_numbers_of_other_types_watched(first, later):
    # np.float64 / IntEnum attributes were not watched (torch.fx records their value)
    m = _div_net(_Div(first))
    an = Analyzer(m, (3,))
    _assert_refused_after(an, lambda: setattr(m[1], "d", later))


def _pool_net(conv: type[nn.Conv2d] = nn.Conv2d, pool: type[nn.AvgPool2d] = nn.AvgPool2d
              ) -> nn.Module:
    return _seeded(nn.Sequential(conv(1, 2, 3), nn.ReLU(), pool(2), nn.Flatten(),
                                 nn.Linear(18, 2)).double())


def test_layer_setting_that_was_none_watched():
    # AvgPool2d(divisor_override=None) set to 1 afterwards: the pool sums its windows (4x the
    # constant); None-valued settings of torch's layers were not watched
    m = _pool_net()
    an = Analyzer(m, (1, 8, 8))
    _assert_refused_after(an, lambda: setattr(m[2], "divisor_override", 1))


class _MyConv(nn.Conv2d):
    pass


def test_tuple_settings_of_a_layer_subclass_watched():
    # a user's subclass of nn.Conv2d: its stride / padding / dilation tuples were not watched
    # (only flags and numbers of a user's class); dilation 2 with padding 1 keeps the shapes
    m = _pool_net(conv=_MyConv)
    an = Analyzer(m, (1, 8, 8))

    def change():
        m[0].dilation = (2, 2)
        m[0].padding = (1, 1)
    _assert_refused_after(an, change)


class _Cfg(nn.Module):
    """``x / self.cfg["max_val"] * self.scales[0] - self.shift[0]``: numbers read from a
    dict, a list and a tuple (torch.fx records them in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = {"max_val": 255}
        self.scales = [2.0]
        self.shift = (0.5,)
        self.seen: list[torch.Tensor] = []  # the forward appends to it: not a setting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x / self.cfg["max_val"] * self.scales[0] - self.shift[0]


@pytest.mark.parametrize("change", ["dict", "list", "tuple"])
def test_numbers_in_containers_watched(change):
    m = _div_net(_Cfg())
    an = Analyzer(m, (3,))
    an.local_bound(torch.zeros(1, 3, dtype=torch.float64), 0.1)  # (runs the model: no alarm)
    edits = {"dict": lambda: m[1].cfg.__setitem__("max_val", 1),
             "list": lambda: m[1].scales.__setitem__(0, 510.0),
             "tuple": lambda: setattr(m[1], "shift", (0.5, 1.0))}
    _assert_refused_after(an, edits[change])


class _Lazy(nn.Module):
    """An integer set by the first call (lazily): not a counter, and read by the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _seeded(nn.Linear(3, 3).double())
        self.k = 0
        self.calls = 0  # a true counter stays unwatched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.k == 0:
            self.k = 255
        return self.net(x) / self.k


def test_attribute_set_by_the_first_call_watched():
    # it changed while the Analyzer was built, so it was taken for a call count and left
    # unwatched: k = 1 afterwards gave the bound of x / 255 (0.0029 for a constant 0.74)
    m = _Lazy().eval()
    an = Analyzer(m, (3,))
    an.local_bound(torch.zeros(1, 3, dtype=torch.float64), 0.1)  # (the counter: no alarm)
    _assert_refused_after(an, lambda: setattr(m, "k", 1))


class _ViewAttr(nn.Module):
    """``F.linear(x, self.P)`` with ``self.P`` a plain attribute viewing a parameter (or
    aliasing a buffer, ``x - self.B``): a later ``model.P = other`` changes the model."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64))
        self.register_buffer("mean", torch.ones(3, dtype=torch.float64))
        self.how = how
        self.P = self.w[:, :]
        self.B = self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "direct":
            return torch.nn.functional.linear(x, self.P)
        if self.how == "view":
            return torch.nn.functional.linear(x, self.P.view(3, 4))
        return torch.nn.functional.linear(x, self.w) - self.B.view(1, 3)


@pytest.mark.parametrize("how", ["direct", "view", "alias"])
def test_plain_attribute_viewing_a_parameter_is_no_constant(how):
    # it was read as the parameter (its view's base is one) but not watched: model.P = 100 w'
    # afterwards gave the bound of the old w (2.86 for a constant 239), certified
    from lipbound.errors import UnsupportedModelError

    m = _ViewAttr(how).eval()
    with pytest.raises(UnsupportedModelError, match="plain tensor attribute"):
        Analyzer(m, (4,))


@pytest.mark.parametrize("first, second", [(1e-320, 1e300), (1e-318, 1.0)])
def test_lower_bounds_not_above_the_constant_through_subnormal_values(first, second):
    """A network whose forward pass goes through values below float64's normal range
    (absolute rounding): the witnesses' ratios exceeded the exact constant (by 8% for
    weights 1e-320 then 1e300, 68% for 1e-318 alone; and radius_floor divided by zero).
    Exact constant ``|w2| ||w1||`` in rationals, no tolerance."""
    from fractions import Fraction

    from lipbound.lower import best_lower_bound

    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False))
    net = net.double().eval()
    with torch.no_grad():
        net[0].weight.copy_((torch.rand(1, 2, generator=g, dtype=torch.float64) + 0.5) * first)
        net[1].weight.fill_(second)
    w2 = Fraction(float(net[1].weight.detach()))
    exact_sq = sum((Fraction(v) * w2) ** 2 for v in net[0].weight.reshape(-1).tolist())
    r = best_lower_bound(net, torch.zeros(1, 2, dtype=torch.float64), 1.0, seed=0,
                         n_random=64, gradient_steps=10, pgd_restarts=2, pgd_steps=10)
    assert math.isfinite(r.value)
    assert Fraction(r.value) ** 2 <= exact_sq


@pytest.mark.parametrize("eps", [3e-162, 1e-160])
def test_lower_bounds_at_radii_whose_squares_underflow(eps):
    """Distances of a ball of radius 3e-162: their squares are subnormal, the distance came
    out 35% short and every method reported a ratio above the exact constant sqrt(2)
    (1.92). No tolerance (squares compared in rationals)."""
    from fractions import Fraction

    from lipbound.lower import best_lower_bound

    net = nn.Linear(2, 1, bias=False).double().eval()
    with torch.no_grad():
        net.weight.fill_(1.0)
    r = best_lower_bound(net, torch.zeros(1, 2, dtype=torch.float64), eps, seed=0,
                         n_random=64, gradient_steps=10, pgd_restarts=2, pgd_steps=10)
    for v in r.details["values"].values():
        assert Fraction(v) ** 2 <= 2
    assert r.value > 1.4  # (the ratio is found: distances are not lost either)
    assert float(r.details["witness_distance"]) <= eps


class _MatMul(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w if self.how == "@" else torch.matmul(x, self.w)


@pytest.mark.parametrize("how", ["@", "matmul"])
def test_matmul_with_a_parameter_refused_naming_f_linear(how):
    # was refused as 'residual or multi-input connections are not supported'
    from lipbound.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="F.linear") as info:
        Analyzer(_MatMul(how).eval(), (4,))
    assert "residual" not in str(info.value)
