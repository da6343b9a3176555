"""Adversarial review of the layer rules and the model intake (session 22).

Each test names a construction that lipbound mishandled: a crash (a torch or Python error
instead of lipbound's own, naming the layer and the fix), or a layer whose computation
lipbound's view of it does not reproduce. Soundness references are float64 Jacobians of the
torch model (exact for affine maps) and lipbound's own forward pass against the model's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipbound
from lipbound import Analyzer, Normalize
from lipbound.errors import InputError, UnsupportedModelError

DT = torch.float64


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _jac_norm(model: nn.Module, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).reshape(-1), x[0])
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2))


def test_conv2d_on_a_tensor_without_channels_is_refused_naming_it():
    # nn.Conv2d on (N, H, W) treats the batch as the channels of one unbatched image: with
    # in_channels = out_channels = 2 (the trace's batch) the shapes passed the batch check
    # and the rule crashed (RuntimeError: expand(...)) instead of a refusal
    net = _seeded(nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(),
                                nn.Linear(4, 2)).double())
    with pytest.raises(UnsupportedModelError, match="channel") as err:
        Analyzer(net, (4, 4))
    assert "module '0'" in str(err.value)


def test_identity_network_gives_its_tight_bound():
    # a chain with no layer left (nn.Identity, an empty nn.Sequential): the global and the
    # local bound are 1; the tight local bound raised IndexError (blocks[-1] of no blocks)
    x0 = torch.randn(1, 3, dtype=DT)
    for net in (nn.Sequential(), nn.Identity(), nn.Sequential(nn.Identity(), nn.Flatten())):
        an = Analyzer(net.eval(), (3,), spectral="exact")
        assert an.global_bound().value >= 1.0
        res = an.local_bound(x0, 0.5, tight=True)
        assert res.value >= 1.0
        assert res.guarantee in (lipbound.Guarantee.EXACT, lipbound.Guarantee.CERTIFIED)


def test_uninitialised_lazy_module_is_a_clear_error():
    # nn.LazyLinear before its first forward pass: ValueError from torch's
    # UninitializedParameter instead of lipbound's error naming the fix
    net = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with pytest.raises(InputError, match="forward pass") as err:
        Analyzer(net, (4,))
    assert "0.weight" in str(err.value)
    net(torch.zeros(1, 4))  # materialised: analysed like nn.Linear
    an = Analyzer(net, (4,))
    x = torch.randn(3, 4)
    torch.testing.assert_close(an.forward(x), net(x).double(), rtol=1e-6, atol=1e-6)


def test_normalize_broadcasting_to_more_channels_is_refused_naming_it():
    # an RGB normalisation in front of a one-channel input: torch broadcasts (3, 1, 1) with
    # (N, 1, H, W) to (N, 3, H, W); the rule crashed with RuntimeError (broadcast_to)
    net = _seeded(nn.Sequential(Normalize((0.1, 0.2, 0.3), (1.0, 2.0, 3.0)), nn.Flatten(),
                                nn.Linear(48, 2)))
    with pytest.raises(UnsupportedModelError, match="Normalize") as err:
        Analyzer(net, (1, 4, 4))
    assert "module '0'" in str(err.value)


class _ViewDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.view(torch.int32).float() * 1e-9)


def test_view_as_another_dtype_is_refused_naming_the_node():
    # x.view(torch.int32) reinterprets the bits (not a reshape); it was taken as a reshape
    # and only the check of the chain against the model caught it, naming no layer
    net = _seeded(_ViewDtype())
    with pytest.raises(UnsupportedModelError, match="node 'view'") as err:
        Analyzer(net, (3,))
    assert "dtype" in str(err.value)


def test_batch_norm_without_running_statistics_names_the_fix():
    # in eval mode such a layer normalises with the batch's own statistics (it mixes the
    # samples): refused, and the message says what to do
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False),
                        nn.ReLU(), nn.Linear(6, 2)).eval()
    with pytest.raises(UnsupportedModelError, match="batch") as err:
        Analyzer(net, (4,))
    assert "track_running_stats=True" in str(err.value)


@pytest.mark.parametrize("layer, shape", [
    (nn.Dropout(0.3), (4,)),
    (nn.AlphaDropout(0.3), (4,)),
    (nn.BatchNorm1d(4), (4,)),
    (nn.BatchNorm2d(2), (2, 3, 3)),
    (nn.Identity(), (4,)),
])
def test_a_supported_layer_as_the_whole_model_is_analysed(layer, shape):
    # torch.fx traces the root module's own forward: nn.Dropout / nn.BatchNorm as the model
    # itself became F.dropout / F.batch_norm, which have no rule (refused), though the same
    # layer inside a Sequential is analysed
    layer = layer.double().eval()
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.1)
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    an = Analyzer(layer, shape, spectral="exact")
    x = torch.randn(3, *shape, dtype=DT)
    torch.testing.assert_close(an.forward(x), layer(x), rtol=1e-12, atol=1e-12)
    x0 = torch.randn(1, *shape, dtype=DT)
    exact = _jac_norm(layer, x0)
    assert an.global_bound().value >= exact * (1 - 1e-12)
    assert an.local_bound(x0, 0.1, tight=True).value >= exact * (1 - 1e-12)


class _PoolByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(input=torch.relu(self.conv(x)), kernel_size=2)
        return self.fc(x.flatten(1))


def test_functional_average_pooling_with_input_by_keyword():
    # F.avg_pool2d(input=x, kernel_size=2): the keyword 'input' was passed on to
    # nn.AvgPool2d(...) (TypeError) instead of being read as the chain's tensor
    net = _seeded(_PoolByKeyword().double())
    an = Analyzer(net, (1, 4, 4), spectral="exact")
    x = torch.randn(3, 1, 4, 4, dtype=DT)
    torch.testing.assert_close(an.forward(x), net(x), rtol=1e-12, atol=1e-12)
    x0 = torch.randn(1, 1, 4, 4, dtype=DT)
    assert an.local_bound(x0, 1e-3, tight=True).value >= _jac_norm(net, x0) * (1 - 1e-9)


@pytest.mark.parametrize("target, rule, what", [
    (nn.ReLU(), lambda *a: None, "instance"),     # a layer instance, not its class
    (torch.Tensor, lambda *a: None, "class"),     # a class that is no nn.Module
    (nn.ReLU, None, "callable"),                  # no rule
    ("", lambda *a: None, "method"),              # no method name
])
def test_register_rule_refuses_what_it_would_never_use(target, rule, what):
    # register_rule(nn.ReLU(), rule) stored the rule under the instance, where no lookup
    # ever finds it (silently ignored); register_rule(nn.ReLU, None) broke every later
    # analysis of a ReLU with TypeError 'NoneType' object is not callable
    from lipbound.ops.registry import FUNCTION_RULES, METHOD_RULES, MODULE_RULES
    before = (dict(FUNCTION_RULES), dict(METHOD_RULES), dict(MODULE_RULES))
    try:
        with pytest.raises(InputError, match=what):
            lipbound.register_rule(target, rule)
        assert (FUNCTION_RULES, METHOD_RULES, MODULE_RULES) == before
    finally:
        for reg, old in zip((FUNCTION_RULES, METHOD_RULES, MODULE_RULES), before, strict=True):
            reg.clear()
            reg.update(old)
