"""An Analyzer answers for the weights it was built with: once the model changes, every bound
and forward pass refuses (a bound of the old weights, labelled certified, could be far below
the new network's constant), and lipbound's own work on the model never trips the check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipbound import Analyzer
from lipbound.errors import InputError


def _net() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


X0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(1))


def _calls(an: Analyzer):
    return {
        "global_bound": lambda: an.global_bound(),
        "local_bound": lambda: an.local_bound(X0, 0.1),
        "local_bound_rows": lambda: an.local_bound_rows(X0, 0.1, torch.eye(3)),
        "forward": lambda: an.forward(X0),
        "nominal_error": lambda: an.nominal_error(X0),
    }


def _scale_first(m: nn.Module) -> None:
    with torch.no_grad():
        m[0].weight.mul_(10)


def _sgd_step(m: nn.Module) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(5, 4)).sum().backward()
    opt.step()


def _load_other(m: nn.Module) -> None:
    other = _net()
    with torch.no_grad():
        other[3].weight.mul_(-2)
    m.load_state_dict(other.state_dict())


def _replace_layer(m: nn.Module) -> None:
    m[3] = nn.Linear(8, 3)


def _new_parameter(m: nn.Module) -> None:
    m[0].weight = nn.Parameter(m[0].weight.detach() * 3)


def _to_double(m: nn.Module) -> None:
    m.double()


def _running_stats(m: nn.Module) -> None:
    m.train()
    m(torch.randn(6, 4))  # batch norm updates its running statistics
    m.eval()


CHANGES = [_scale_first, _sgd_step, _load_other, _replace_layer, _new_parameter, _to_double,
           _running_stats]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_every_entry_point_refuses_a_changed_model(change):
    m = _net()
    an = Analyzer(m, (4,))
    before = an.global_bound().value
    for call in _calls(an).values():  # unchanged: every call works
        call()
    change(m)
    for what, call in _calls(an).items():
        with pytest.raises(InputError, match="changed after this Analyzer was built") as ei:
            call()
        assert "build a new Analyzer" in str(ei.value), what
    # a new analyzer sees the new weights (and the global bound moved: the change mattered)
    if change is not _running_stats and change is not _to_double:
        assert Analyzer(m, (4,)).global_bound().value != before


def test_the_message_names_the_tensor():
    m = _net()
    an = Analyzer(m, (4,))
    _scale_first(m)
    with pytest.raises(InputError, match=r"parameter 0\.weight"):
        an.global_bound()


def test_a_twin_of_a_changed_model_refuses_too():
    m = _net()
    an = Analyzer(m, (4,))
    twin = an.reuse_copy(0.02)
    _scale_first(m)
    with pytest.raises(InputError, match="changed after"):
        twin.local_bound(X0, 0.1)


def test_lipbounds_own_work_leaves_the_model_unchanged():
    """Lower bounds, attacks, sweeps and radius searches run the model itself (float64
    copies, gradients, IEEE float32): none of that may count as a change."""
    from lipbound.attacks import run_attacks
    from lipbound.lower import best_lower_bound
    from lipbound.radius import certified_radii
    from lipbound.sweep import sweep

    m = _net()
    an = Analyzer(m, (4,), spectral="lanczos", seed=2)
    first = an.local_bound(X0, 0.1).value
    best_lower_bound(m, X0, 0.1)
    run_attacks(m, X0, methods=("fgsm", "pgd"))
    sweep(an, X0, [0.05, 0.5], ("local", "global", "random", "gradient"))
    certified_radii(an, X0, methods=("local", "margin"))
    assert an.local_bound(X0, 0.1).value >= 0  # no error
    assert Analyzer(m, (4,), spectral="lanczos", seed=2).local_bound(X0, 0.1).value == first


def test_copies_and_pickles_follow_their_own_model():
    import copy
    import pickle

    m = _net()
    an = Analyzer(m, (4,))
    first = an.local_bound(X0, 0.1).value
    for twin in (copy.deepcopy(an), pickle.loads(pickle.dumps(an))):
        assert twin.local_bound(X0, 0.1).value == first  # a copy of an unchanged model
        _scale_first(twin.model)  # the copy's own model changes
        with pytest.raises(InputError, match="changed after"):
            twin.global_bound()
    assert an.local_bound(X0, 0.1).value == first  # the original's model did not change
    _scale_first(m)
    for twin in (copy.deepcopy(an), pickle.loads(pickle.dumps(an))):  # copied when stale
        with pytest.raises(InputError, match=r"0\.weight"):
            twin.local_bound(X0, 0.1)
