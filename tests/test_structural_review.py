"""Structural soundness review (session 16): whole-network bounds on unusual layer
combinations, checked against independent references (float64 Jacobians of the torch model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import lipbound
from lipbound import radius
from lipbound.errors import InputError, UnsupportedModelError


def _jac_norm(model: nn.Module, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0))[0], x[0])
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2))


def _dead_relu_net() -> nn.Sequential:
    """Its ReLUs are off on every standard-normal input (bias -50), on at x0 = (100, 100)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2, dtype=torch.float64))
        net[0].bias.fill_(-50.0)
        net[2].weight.fill_(1.0)
        net[2].bias.zero_()
    return net


def test_forward_hook_changing_an_output_is_refused():
    # a hook scaling a ReLU's output by 10: the chain check (one random input, where that
    # ReLU is off) did not see it, and the certified bound was 1.41 for a constant of 14.1
    net = _dead_relu_net()
    x0 = torch.tensor([[100.0, 100.0]], dtype=torch.float64)
    handle = net[1].register_forward_hook(lambda m, i, o: o * 10.0)
    assert _jac_norm(net, x0) == pytest.approx(10 * 2 ** 0.5)
    with pytest.raises(UnsupportedModelError, match="forward hook"):
        lipbound.local_bound(net, x0, 1.0)
    handle.remove()
    assert lipbound.local_bound(net, x0, 1.0).value >= _jac_norm(net, x0)


def test_forward_pre_hook_and_global_hook_are_refused():
    net = _dead_relu_net()
    handle = net[2].register_forward_pre_hook(lambda m, i: (i[0] * 3.0,))
    with pytest.raises(UnsupportedModelError, match="pre-hook"):
        lipbound.Analyzer(net, (2,))
    handle.remove()
    from torch.nn.modules.module import register_module_forward_hook
    handle = register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(UnsupportedModelError, match="global"):
            lipbound.Analyzer(net, (2,))
    finally:
        handle.remove()
    lipbound.Analyzer(net, (2,))  # nothing registered any more


def test_hook_added_after_the_analyzer_is_detected():
    net = _dead_relu_net()
    x0 = torch.tensor([[100.0, 100.0]], dtype=torch.float64)
    an = lipbound.Analyzer(net, (2,))
    handle = net[1].register_forward_hook(lambda m, i, o: o * 10.0)
    with pytest.raises(InputError, match="hook"):
        an.local_bound(x0, 1.0)
    handle.remove()
    assert an.local_bound(x0, 1.0).value >= _jac_norm(net, x0)


def test_spectral_norm_weight_hook_is_still_analysed():
    # torch.nn.utils.spectral_norm recomputes `weight` in a pre-hook (no power step in eval
    # mode): the rules read that weight, so the model stays supported
    torch.manual_seed(0)
    lin = torch.nn.utils.spectral_norm(nn.Linear(4, 3).double())
    net = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 2).double()).eval()
    x0 = torch.randn(1, 4, dtype=torch.float64)
    g = lipbound.global_bound(net, (4,)).value
    assert g >= _jac_norm(net, x0) * (1 - 1e-12)


def test_pruned_weight_hook_is_still_analysed():
    # torch.nn.utils.prune recomputes `weight = weight_orig * weight_mask` in a pre-hook
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    prune.l1_unstructured(net[0], "weight", amount=0.4)
    prune.random_unstructured(net[0], "weight", amount=0.2)  # a container
    x0 = torch.randn(1, 4, dtype=torch.float64)
    an = lipbound.Analyzer(net, (4,), spectral="exact")
    assert an.global_bound().value >= _jac_norm(net, x0) * (1 - 1e-12)
    assert an.local_bound(x0, 1e-3).value >= _jac_norm(net, x0) * (1 - 1e-9)


class _FunctionalPool(nn.Module):
    """Conv -> a functional pooling call -> ReLU -> flatten."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.conv = nn.Conv2d(1, 2, 2).double()

    def forward(self, x):
        return torch.flatten(torch.relu(self.fn(self.conv(x))), 1)


@pytest.mark.parametrize("fn", [
    lambda x: torch.nn.functional.max_pool2d(x, 2, []),  # empty stride: the kernel size
    lambda x: torch.nn.functional.avg_pool2d(x, 2, []),
    lambda x: torch.nn.functional.max_pool2d(x, [2], [1], [1]),  # one entry for both axes
    lambda x: torch.nn.functional.avg_pool2d(x, [3], [2], [1]),
    lambda x: torch.nn.functional.max_pool2d(x, [2], [1], [0], [2]),
])
def test_functional_pooling_with_list_arguments(fn):
    # torch reads stride=[] as the kernel size and a one-entry list as both axes: the rules
    # raised IndexError
    torch.manual_seed(2)
    net = _FunctionalPool(fn).eval()
    x0 = torch.randn(1, 1, 7, 7, dtype=torch.float64)
    an = lipbound.Analyzer(net, (1, 7, 7), spectral="exact")
    assert an.local_bound(x0, 1e-6).value >= _jac_norm(net, x0) * (1 - 1e-9)
    assert an.global_bound().value >= _jac_norm(net, x0) * (1 - 1e-9)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2), nn.AdaptiveAvgPool2d((2, 3))])
def test_average_pooling_without_channel_dimension_is_refused(pool):
    # a per-sample (H, W) tensor: a RuntimeError / ValueError from inside the rule before
    net = nn.Sequential(nn.ReLU(), pool, nn.Flatten()).double().eval()
    with pytest.raises(UnsupportedModelError, match="channel dimension"):
        lipbound.Analyzer(net, (4, 6))


def test_forward_replaced_on_an_instance_is_refused():
    # `relu.forward = ...` on one instance: the ReLU rule described the class's computation
    # (the chain check's random input leaves that ReLU off): 1.41 for a constant of 14.1
    net = _dead_relu_net()
    x0 = torch.tensor([[100.0, 100.0]], dtype=torch.float64)
    net[1].forward = lambda x: torch.relu(x) * 10.0
    assert _jac_norm(net, x0) == pytest.approx(10 * 2 ** 0.5)
    with pytest.raises(UnsupportedModelError, match="replaced on the instance"):
        lipbound.local_bound(net, x0, 1.0)
    del net[1].forward
    an = lipbound.Analyzer(net, (2,))
    assert an.local_bound(x0, 1.0).value >= _jac_norm(net, x0)
    net[1].forward = lambda x: torch.relu(x) * 10.0  # after the analyzer was built
    with pytest.raises(InputError, match="changed"):
        an.local_bound(x0, 1.0)


def test_call_impl_replaced_on_an_instance_is_refused():
    # torch.fx traces through Module.__call__ itself, so a replaced _call_impl was never seen
    net = _dead_relu_net()
    x0 = torch.tensor([[100.0, 100.0]], dtype=torch.float64)
    orig = net[1]._call_impl
    net[1]._call_impl = lambda *a, **k: orig(*a, **k) * 10.0
    assert _jac_norm(net, x0) == pytest.approx(10 * 2 ** 0.5)
    with pytest.raises(UnsupportedModelError, match="_call_impl replaced"):
        lipbound.local_bound(net, x0, 1.0)


def test_certified_radius_leaves_x0_alone_with_an_inplace_first_relu():
    # the model's own forward pass at x0 (its class) ran on the caller's tensor: ReLU(inplace)
    # overwrote x0 with relu(x0)
    net = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        net[1].bias.copy_(torch.tensor([0.0, -0.5]))
    x0 = torch.tensor([[-1.0, -0.9, 5.0]], dtype=torch.float64)
    before = x0.clone()
    r = radius.certified_radius(net, x0, method="local")
    assert torch.equal(x0, before)
    assert r.radius > 0
    with torch.no_grad():  # no class change on the ball's boundary towards the rival
        x = before + r.radius * torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
        assert int(net(x.clone()).argmax()) == r.predicted_class


def test_spectral_norm_in_training_mode_is_refused():
    # its pre-hook makes a power step (a new weight) at every call: what would be analysed?
    lin = torch.nn.utils.spectral_norm(nn.Linear(4, 3).double())
    net = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 2).double()).eval()
    lin.train()
    with pytest.raises(UnsupportedModelError, match="training mode"):
        lipbound.Analyzer(net, (4,))


class _Times10(nn.Module):
    def forward(self, x):
        return 10.0 * x


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_misread_layer_behind_relus_off_at_the_test_input_is_caught(sign, monkeypatch):
    """A user's wrong rule (identity for a layer that scales by 10) behind ReLUs whose
    biases keep them off at the standard-normal test input: the check of the chain against
    the model at scaled copies of that input finds it (at the one input alone it passed,
    and the certified local bound was 10 times below the constant)."""
    from lipbound.ops import registry

    monkeypatch.setitem(registry.MODULE_RULES, _Times10, registry.MODULE_RULES[nn.Dropout])
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(sign * torch.eye(2, dtype=torch.float64))
        lin.bias.fill_(-5.0)
    model = nn.Sequential(lin, nn.ReLU(), _Times10(), nn.Linear(2, 1).double()).eval()
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        lipbound.Analyzer(model, (2,))
