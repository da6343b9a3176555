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


# ---------------------------------------------------------------- writes through .data
def _data_scale(m: nn.Module) -> None:
    m[0].weight.data.mul_(10)


def _data_clip(m: nn.Module) -> None:  # weight clipping as in WGAN-style training loops
    for p in m.parameters():
        p.data.clamp_(-0.1, 0.1)


def _data_copy(m: nn.Module) -> None:
    m[3].bias.data.copy_(m[3].bias.data.flip(0))  # a permutation keeps every sum


def _data_buffer(m: nn.Module) -> None:
    m[2].running_var.data.fill_(1e-3)


def _data_one_ulp(m: nn.Module) -> None:
    w = m[0].weight.data
    w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf")))


DATA_WRITES = [_data_scale, _data_clip, _data_copy, _data_buffer, _data_one_ulp]


@pytest.mark.parametrize("change", DATA_WRITES, ids=lambda f: f.__name__.strip("_"))
def test_writes_through_data_are_refused(change):
    """``p.data`` is a tensor with a version counter of its own: such writes left the
    tensors' records unchanged, and the analyzer answered for the old weights (a global
    bound 10x below the new network's after ``_data_scale``)."""
    m = _net()
    an = Analyzer(m, (4,))
    version = m[0].weight._version
    for call in _calls(an).values():
        call()
    twin = an.reuse_copy(0.02)
    change(m)
    assert m[0].weight._version == version  # invisible to the version counter
    for what, call in _calls(an).items():
        with pytest.raises(InputError, match=r"through \.data") as ei:
            call()
        assert "build a new Analyzer" in str(ei.value), what
    with pytest.raises(InputError, match="changed after"):
        twin.local_bound(X0, 0.1)


def test_the_data_message_names_the_tensor_and_copies_follow():
    import copy
    import pickle

    m = _net()
    an = Analyzer(m, (4,))
    first = an.global_bound().value
    _data_buffer(m)
    with pytest.raises(InputError, match=r"buffer 2\.running_var"):
        an.global_bound()
    for twin in (copy.deepcopy(an), pickle.loads(pickle.dumps(an))):  # copied when stale
        with pytest.raises(InputError, match=r"2\.running_var"):
            twin.global_bound()
    fresh = _net()
    an = Analyzer(fresh, (4,))
    for twin in (copy.deepcopy(an), pickle.loads(pickle.dumps(an))):
        assert twin.global_bound().value == first
        _data_scale(twin.model)  # the copy's own model changes through .data
        with pytest.raises(InputError, match=r"parameter 0\.weight"):
            twin.global_bound()
    assert an.global_bound().value == first  # the original's did not


def test_contents_compare_bits():
    from lipbound._modelinfo import changed_contents, content_snapshot

    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([float("nan"), 0.0]))
    snap = content_snapshot(m)
    assert changed_contents(snap) is None  # NaN equals itself bit for bit
    m.bias.data[1] = -0.0  # equal as a number, another bit pattern
    assert "parameter bias" in changed_contents(snap)


def test_a_list_setting_changed_in_place_is_refused():
    """Plain attributes are recorded by value: a list (``MaxPool2d(kernel_size=[2, 2])``
    keeps the caller's list) was recorded by reference, so changing it in place went
    unseen and the analyzer answered for the old window."""
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(kernel_size=[2, 2], stride=[2, 2]), nn.Flatten(),
                      nn.Linear(2 * 4 * 4, 3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(1, 1, 8, 8, generator=g)
    an = Analyzer(m, (1, 8, 8))
    an.local_bound(x, 0.1)
    m[2].kernel_size[0] = 1
    with pytest.raises(InputError, match="changed after this Analyzer was built"):
        an.local_bound(x, 0.1)


def _reparametrised():
    from torch.nn.utils import parametrizations, prune, spectral_norm, weight_norm

    def base():
        return _net()

    def sn(m):
        m[0] = spectral_norm(m[0])

    def wn(m):
        m[0] = weight_norm(m[0])

    return {
        "spectral_norm hook": sn, "weight_norm hook": wn,
        "spectral_norm parametrization": lambda m: parametrizations.spectral_norm(m[0]),
        "weight_norm parametrization": lambda m: parametrizations.weight_norm(m[3]),
        "orthogonal": lambda m: parametrizations.orthogonal(m[3], orthogonal_map="cayley"),
        "pruned": lambda m: prune.l1_unstructured(m[0], "weight", 0.3),
    }, base


@pytest.mark.parametrize("kind", list(_reparametrised()[0]))
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_weights_computed_in_forward_are_not_a_change(kind):
    """Weights that torch recomputes from other tensors at every call (weight hooks,
    parametrizations, pruning masks) must not make the content check refuse after lipbound
    runs the model (lower bounds, radius searches, plain calls)."""
    from lipbound.lower import best_lower_bound
    from lipbound.radius import certified_radii

    changes, base = _reparametrised()
    m = base()
    changes[kind](m)
    m.eval()
    an = Analyzer(m, (4,))
    first = an.local_bound(X0, 0.1).value
    best_lower_bound(m, X0, 0.1)
    certified_radii(an, X0, methods=("local",))
    with torch.no_grad():
        m(torch.randn(5, 4))
    assert an.local_bound(X0, 0.1).value == first
    with torch.no_grad():  # and a write through .data into what they compute from is seen
        next(m.parameters()).data.mul_(3)
    with pytest.raises(InputError, match="changed after"):
        an.local_bound(X0, 0.1)
