"""Review of session 16's intake checks (hooks, replaced methods, stale analyzers): ways to
change what a module computes that the first version of the checks did not see.

Each model below is a "tent" network whose tail layer is inactive at every input the chain
check uses (the tent ``relu(x1-5) - 2 relu(x1-6) + relu(x1-7)`` is 0 outside ``5 < x1 < 7``),
so a tail computing 10x what its rule says would pass that check and give a certified bound
of 1 for a local constant of 10 at ``x1 = 5.5``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import lipbound
from lipbound.errors import InputError, UnsupportedModelError

X0 = torch.tensor([[5.5, 0.0, 0.0, 0.0]])


def _tent(tail: nn.Module) -> nn.Sequential:
    l1, l2 = nn.Linear(4, 3), nn.Linear(3, 1)
    with torch.no_grad():
        l1.weight.zero_()
        l1.weight[:, 0] = 1.0
        l1.bias.copy_(torch.tensor([-5.0, -6.0, -7.0]))
        l2.weight.copy_(torch.tensor([[1.0, -2.0, 1.0]]))
        l2.bias.zero_()
    return nn.Sequential(l1, nn.ReLU(), l2, tail).eval()


def _true_ratio(model: nn.Module) -> float:
    with torch.no_grad():
        step = torch.tensor([[0.1, 0.0, 0.0, 0.0]])
        return float((model(X0 + step) - model(X0)).norm() / 0.1)


def test_tent_control():
    """Without tampering the bound is 1 and the network's ratio at X0 is 1."""
    m = _tent(nn.Dropout())
    assert _true_ratio(m) == pytest.approx(1.0, rel=1e-5)
    assert lipbound.local_bound(m, X0, 0.1).value >= 1.0


def test_class_level_forward_replacement_refused(monkeypatch):
    """``nn.Dropout.forward = ...`` (on the class, not the instance) was analysed as the
    original Dropout: certified 1.0 for a ratio of 10."""
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: 10 * x)
    m = _tent(nn.Dropout())
    assert _true_ratio(m) == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(UnsupportedModelError, match="replaced on the class Dropout"):
        lipbound.local_bound(m, X0, 0.1)


def test_subclass_of_class_with_replaced_forward_refused(monkeypatch):
    class MyDropout(nn.Dropout):
        pass

    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: 10 * x)
    m = _tent(MyDropout())
    assert _true_ratio(m) == pytest.approx(10.0, rel=1e-5)
    # no rule takes the subclass of a class whose forward was replaced, so torch.fx traces
    # the replacement: ``10 * x``, which lipbound.ops.scalar analyses since session 17 (it
    # was refused as an unsupported operation before); never the dropout's identity
    assert lipbound.local_bound(m, X0, 0.1).value >= 10.0


def test_global_hook_added_after_analyzer_makes_it_stale():
    """A global forward hook registered after the Analyzer was built went unseen: certified
    1.0 for a ratio of 10."""
    m = _tent(nn.Identity())
    an = lipbound.Analyzer(m, (4,))
    handle = register_module_forward_hook(
        lambda mod, i, o: 10 * o if isinstance(mod, nn.Identity) else None)
    try:
        assert _true_ratio(m) == pytest.approx(10.0, rel=1e-5)
        with pytest.raises(InputError, match="global forward"):
            an.local_bound(X0, 0.1)
    finally:
        handle.remove()
    assert an.local_bound(X0, 0.1).value >= 1.0  # removed again: the same model


def test_pruning_subclass_redefining_call_refused():
    """A subclass of torch's pruning method passed the allowed-hook check by isinstance
    alone, though its ``__call__`` returned a changed input."""

    class Scaling(prune.L1Unstructured):
        def __call__(self, module, inputs):
            super().__call__(module, inputs)
            return (inputs[0] * 10,)

    m = _tent(nn.Identity())
    Scaling.apply(m[2], "weight", amount=0.0)
    assert _true_ratio(m) == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(UnsupportedModelError, match="forward pre-hook"):
        lipbound.local_bound(m, X0, 0.1)


def test_custom_pruning_method_with_own_mask_allowed():
    """A pruning method that only redefines ``compute_mask`` (torch's documented way to
    write one) keeps being accepted, as are custom_from_mask's and stacked prunings."""

    class EveryOther(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            mask = default_mask.clone()
            mask.view(-1)[::2] = 0
            return mask

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    EveryOther.apply(m[0], "weight")
    prune.custom_from_mask(m[2], "weight", torch.ones(2, 6))
    prune.l1_unstructured(m[2], "weight", 0.3)
    r = lipbound.global_bound(m, (4,))
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        m(torch.zeros(1, 4))  # the pre-hooks compute the effective weights
        for a, b in ((plain[0], m[0]), (plain[2], m[2])):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    assert float(m[0].weight[0, 0]) == 0.0
    assert r.value == lipbound.global_bound(plain, (4,)).value


class _Spy(nn.Module):
    """Records a copy of every input the wrapped model gets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


def test_verify_scaled_copies_of_the_untouched_input():
    """A float64 model starting with ReLU(inplace=True) overwrote the chain check's test
    input with relu(x), so its -x and -1e3 x checks ran at -relu(x) <= 0 (a check at 0)."""
    from lipbound.graph import _verify, trace_model

    torch.manual_seed(0)
    m = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    m = m.double().eval()
    ops = trace_model(m, (5,))
    spy = _Spy(m)
    _verify(ops, spy, torch.zeros(2, 5, dtype=torch.float64))
    x = spy.seen[0]
    assert bool((x < 0).any())
    for c, seen in zip((-1.0, 1e-3, 1e3, -1e3), spy.seen[1:], strict=True):
        assert torch.equal(seen, x * c)



def test_root_forward_replaced_on_instance_refused():
    """torch.fx traces ``type(root).forward``: a forward replaced on the model instance
    itself was never seen (certified 1.0 for a ratio of 10)."""
    m = _tent(nn.Identity())
    inner = m.forward
    m.forward = lambda x: 10 * inner(x)
    assert _true_ratio(m) == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(UnsupportedModelError, match="forward replaced on the instance"):
        lipbound.local_bound(m, X0, 0.1)


def _hooked(kind: str, monkeypatch) -> nn.Module:
    m = _tent(nn.Identity())
    if kind == "hook":
        m[2].register_forward_hook(lambda mod, i, o: 10 * o)
    elif kind == "pre-hook":
        m[2].register_forward_pre_hook(lambda mod, i: (10 * i[0],))
    elif kind == "leaf forward":
        m[3].forward = lambda x: 10 * x
    elif kind == "root forward":
        inner = m.forward
        m.forward = lambda x: 10 * inner(x)
    else:
        monkeypatch.setattr(nn.Identity, "forward", lambda self, x: 10 * x)
    return m


@pytest.mark.parametrize("kind", ["hook", "pre-hook", "leaf forward", "root forward",
                                  "class forward"])
def test_rival_methods_refuse_what_they_do_not_see(kind, monkeypatch):
    """The rival methods' own fully connected extraction (lipbound.baselines.fc) had none of
    the intake checks: Fast-Lip certified 1.0 and exact_local_l2 gave EXACT 1.0 for a
    network whose ratio at X0 is 10."""
    from lipbound.baselines import exact_local_l2, fastlip
    from lipbound.baselines.fc import NotFullyConnectedError

    m = _hooked(kind, monkeypatch)
    assert _true_ratio(m) == pytest.approx(10.0, rel=1e-5)
    for method in (fastlip, exact_local_l2):
        with pytest.raises((UnsupportedModelError, NotFullyConnectedError)):
            method(m, X0, 0.1)


def test_fd1_redirected_without_a_libc_handle(monkeypatch):
    """On Windows ``ctypes.CDLL(None)`` raises TypeError (a path is required): the
    redirection (compare's, lipMIP's banner) raised it instead of running its block."""
    import ctypes

    from lipbound import _stdout

    def no_handle(name, *args, **kwargs):
        raise TypeError("expected str, bytes or os.PathLike object, not NoneType")

    monkeypatch.setattr(ctypes, "CDLL", no_handle)
    ran = []
    with _stdout.fd1_redirected(None):
        ran.append(1)
    assert ran == [1]


def test_setting_changed_after_analyzer_makes_it_stale():
    """A change of a module's plain attribute (bn.eps, conv.padding) or class after the
    Analyzer was built went unseen: its bound, 0.34, was that of the old model, half the new
    model's (0.68)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    m[1].eps = 3.0
    an = lipbound.Analyzer(m, (4,))
    old = an.global_bound().value
    m[1].eps = 1e-5
    assert lipbound.global_bound(m, (4,)).value > 1.5 * old
    with pytest.raises(InputError, match="setting of a module"):
        an.global_bound()
    m[1].eps = 3.0  # restored: the same model again
    assert an.global_bound().value == old
    m[2].__class__ = nn.Identity
    with pytest.raises(InputError, match="setting of a module"):
        an.global_bound()


def test_settings_record_ignores_weight_hooks_and_mode_round_trips():
    """The record does not move with what torch's weight hooks write at every call (a plain
    tensor attribute) or with a train()/eval() round trip."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    prune.l1_unstructured(m[0], "weight", 0.5)
    nn.utils.spectral_norm(m[2])
    an = lipbound.Analyzer(m, (4,))
    with torch.no_grad():
        m(torch.randn(3, 4))
    m.train()
    m.eval()
    assert an.global_bound().value > 0


def test_compiled_call_impl_replaced_refused():
    """Module._wrapped_call_impl runs ``_compiled_call_impl`` instead of ``_call_impl`` when
    set: a replacement was never seen (certified 1.0 for a ratio of 10)."""
    m = _tent(nn.Identity())
    m[3]._compiled_call_impl = lambda x: 10 * x
    assert _true_ratio(m) == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(UnsupportedModelError, match="_compiled_call_impl"):
        lipbound.local_bound(m, X0, 0.1)


def test_module_compile_is_not_refused_by_the_hook_check():
    """``module.compile()`` sets torch.compile(module._call_impl): the same computation."""
    from lipbound.graph import check_hooks

    m = _tent(nn.Identity())
    m[2].compile()
    check_hooks(m)


def test_compiled_call_impl_set_after_analyzer_makes_it_stale():
    m = _tent(nn.Identity())
    an = lipbound.Analyzer(m, (4,))
    m[3]._compiled_call_impl = lambda x: 10 * x
    with pytest.raises(InputError, match="changed after"):
        an.local_bound(X0, 0.1)


def test_settings_record_ignores_a_user_module_state():
    """A user's module that keeps a call counter or a list of tensors (reassigned at every
    call) does not make the Analyzer stale (nor fail comparing tensors)."""

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.calls, self.seen = 0, [torch.ones(2), torch.ones(2)]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.lin(x)

    m = Counting().eval()
    an = lipbound.Analyzer(m, (4,))
    m(torch.zeros(1, 4))  # (an integer that forward does not change is watched: session 18)
    m.seen = [torch.ones(2), torch.ones(2)]
    assert an.global_bound().value > 0
