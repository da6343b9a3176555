"""Integer attributes of a user's own module are watched by an Analyzer: torch.fx records
their value in the analysed graph (``x / self.max_val``, ``x * self.k``), so a later change
must be refused, not answered with the bound of the old value; integers that the forward
itself updates at every call (a count) stay unwatched, so lipbound's own runs of the model
(attacks, lower bounds, radius searches) never trip the check."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lipbound
from lipbound import Analyzer
from lipbound.errors import InputError

X0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
EPS = 0.1


def _net() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


class Divided(nn.Module):
    """``x / self.max_val`` (a pixel scale) with an integer attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.max_val = 255

    def forward(self, x):
        return self.net(x / self.max_val)


class Multiplied(nn.Module):
    """``x * self.k``, and a count of the calls (``self.calls += 1``) in a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.k = 2
        self.counter = Counting()

    def forward(self, x):
        return self.net(self.counter(x) * self.k)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.width = 4  # (not changed by forward: watched)

    def forward(self, x):
        self.calls += 1
        return x


def _refused(an: Analyzer) -> None:
    for call in (lambda: an.global_bound(), lambda: an.local_bound(X0, EPS),
                 lambda: an.forward(X0)):
        with pytest.raises(InputError, match=r"changed after.*self\.max_val"):
            call()


@pytest.mark.parametrize("cls,attr,new", [(Divided, "max_val", 1), (Multiplied, "k", 200)])
def test_changed_int_attribute_is_refused(cls, attr, new):
    # (was: the bound of the old value, certified: 255 times too small for Divided)
    m = cls().eval()
    an = Analyzer(m, (4,))
    old = an.global_bound().value
    setattr(m, attr, new)
    truth = Analyzer(m, (4,)).global_bound().value
    assert truth > 50 * old  # the old bound is far below the new network's constant
    _refused(an)
    # copies and twins made after the change are refused too
    _refused(an.reuse_copy(0.0))
    _refused(copy.deepcopy(an))
    _refused(pickle.loads(pickle.dumps(an)))


def test_twins_and_copies_made_before_the_change_watch_the_integer():
    m = Divided().eval()
    an = Analyzer(m, (4,))
    twin = an.reuse_copy(0.1)
    dup = copy.deepcopy(an)  # (holds its own copy of the model)
    m.max_val = 1
    _refused(an)
    _refused(twin)
    dup.global_bound()  # its model did not change
    dup.model.max_val = 1
    _refused(dup)


def test_counter_updated_by_forward_is_not_a_change():
    from lipbound.lower import best_lower_bound
    from lipbound.radius import certified_radius

    m = Multiplied().eval()
    an = Analyzer(m, (4,))
    first = an.local_bound(X0, EPS).value
    calls = m.counter.calls
    best_lower_bound(m, X0, EPS)
    certified_radius(an, X0, method="local")
    with torch.no_grad():
        m(X0)
    assert m.counter.calls > calls
    assert an.local_bound(X0, EPS).value == first
    assert an.global_bound().value > 0
    for other in (an.reuse_copy(0.1), copy.deepcopy(an), pickle.loads(pickle.dumps(an))):
        other.model(X0)
        assert other.local_bound(X0, EPS).value == first
    # an integer of the same module that forward does not change is watched
    m.counter.width = 5
    with pytest.raises(InputError, match="changed after"):
        an.local_bound(X0, EPS)


def test_bools_are_flags_not_counts():
    class Flagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()
            self.double_it = False

        def forward(self, x):
            return self.net(x * 2 if self.double_it else x)

    m = Flagged().eval()
    an = Analyzer(m, (4,))
    an.global_bound()
    m.double_it = True
    with pytest.raises(InputError, match="changed after"):
        an.global_bound()
    assert lipbound.global_bound(m, (4,)).value > 0
