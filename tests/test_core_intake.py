"""Model intake (lipbound.graph): torch.fx tracing of custom modules written with functional
calls and tensor methods, and one UnsupportedModelError listing every unsupported node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core_helpers import DT, local_lower_bound, random_batchnorm
from lipbound import Analyzer, LipboundError, Normalize, UnsupportedModelError
from lipbound.errors import InputError
from lipbound.graph import chain_forward, trace_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


class FunctionalNet(nn.Module):
    """F.relu, torch.relu, F.max_pool2d, x.view(x.size(0), -1), nested nn.Sequential."""

    def __init__(self):
        super().__init__()
        bn = random_batchnorm(4, torch.Generator().manual_seed(0), dtype=torch.float32)
        self.features = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn),
                                      nn.ReLU())
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc1 = nn.Linear(4 * 2 * 2, 10)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(10, 3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        return self.head(x)

    def as_sequential(self) -> nn.Sequential:
        return nn.Sequential(self.features[0][0], self.features[0][1], nn.ReLU(),
                             nn.MaxPool2d(2), self.conv2, nn.ReLU(), nn.Flatten(), self.fc1,
                             nn.ReLU(), self.head[0], self.head[1])


class MethodNet(nn.Module):
    """Normalize, x.relu(), F.avg_pool2d, torch.flatten, x.reshape(x.shape[0], -1),
    F.adaptive_avg_pool2d, nn.Flatten inside a nested Sequential."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize((0.1, -0.2), (0.5, 2.0))
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, stride=1)
        self.c2 = nn.Conv2d(3, 3, 2, dilation=2)
        self.block = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 6)),
                                   nn.ReLU())
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.c1(self.norm(x)).relu()
        x = F.avg_pool2d(x, 2)
        x = F.relu(self.c2(x))
        x = F.adaptive_avg_pool2d(x, (2, 2))
        x = torch.flatten(x, 1)
        x = x.reshape(x.shape[0], 3, 2, 2)
        x = self.block(x)
        return self.out(x)

    def as_sequential(self) -> nn.Sequential:
        return nn.Sequential(self.norm, self.c1, nn.ReLU(), nn.AvgPool2d(2), self.c2, nn.ReLU(),
                             nn.AdaptiveAvgPool2d((2, 2)), self.block[0][0], self.block[0][1],
                             nn.ReLU(), self.out)


@pytest.mark.parametrize("cls,shape", [(FunctionalNet, (1, 8, 8)), (MethodNet, (2, 9, 9))])
def test_functional_and_method_calls_are_traced(cls, shape):
    model = _randomize(cls(), 3).to(DT).eval()
    seq = model.as_sequential().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, *shape, generator=g, dtype=DT)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(seq(x), ref, rtol=0, atol=0)
    an = Analyzer(model, shape, spectral="exact")
    an_seq = Analyzer(seq, shape, spectral="exact")
    torch.testing.assert_close(chain_forward(an.ops, x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(an.forward(x), ref, rtol=1e-12, atol=1e-12)
    # the same layers and the same bounds as the equivalent nn.Sequential
    assert [op.kind for op in an.ops if op.kind != "reshape"] == \
        [op.kind for op in an_seq.ops if op.kind != "reshape"]
    assert [b.kind for b in an.blocks] == [b.kind for b in an_seq.blocks]
    assert an.global_bound().value == pytest.approx(an_seq.global_bound().value, rel=1e-12)
    x0 = x[:1]
    for eps in (0.01, 1.0):
        loc = an.local_bound(x0, eps)
        assert loc.value == pytest.approx(an_seq.local_bound(x0, eps).value, rel=1e-12)
        lo, info = local_lower_bound(seq, x0, eps, seed=1, n_samples=300, ascent_starts=3)
        assert loc.value >= lo, info


def test_layer_names_say_where_the_layer_sits():
    model = _randomize(FunctionalNet(), 1).to(DT).eval()
    res = Analyzer(model, (1, 8, 8)).global_bound()
    names = [lf.name for lf in res.layers]
    assert "features.0.0" in names[0] and "features.0.1" in names[0]
    assert any("fc1" in n for n in names)
    assert any("head.1" in n for n in names)


def test_float32_model_is_analysed_in_float64():
    model32 = _randomize(FunctionalNet(), 2).eval()
    model64 = _randomize(FunctionalNet(), 2).to(DT).eval()
    model64.load_state_dict({k: v.to(DT) for k, v in model32.state_dict().items()})
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a32, a64 = Analyzer(model32, (1, 8, 8)), Analyzer(model64, (1, 8, 8))
    for op in a32.ops:
        for v in vars(op).values():
            if isinstance(v, Tensor) and v.is_floating_point():
                assert v.dtype == DT
    assert a32.global_bound().value == a64.global_bound().value
    assert a32.local_bound(x0, 0.3).value == a64.local_bound(x0.to(DT), 0.3).value


# --------------------------------------------------------------------------- unsupported
class ThreeProblems(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(5, 5)
        self.act2 = nn.Sigmoid()
        self.fc3 = nn.Linear(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        z = self.act2(self.fc2(self.act1(self.fc1(x))))
        return z + self.fc3(z)  # residual connection


def test_all_unsupported_nodes_are_listed_at_once():
    with pytest.raises(UnsupportedModelError) as info:
        Analyzer(ThreeProblems().eval(), (4,))
    err = info.value
    assert len(err.nodes) == 3, err.nodes
    text = [" ".join(n) for n in err.nodes]
    assert any("act1" in t and "Tanh" in t for t in text), text
    assert any("act2" in t and "Sigmoid" in t for t in text), text
    assert any("add" in t and "residual" in t for t in text), text
    msg = str(err)
    assert "3 unsupported" in msg and "Tanh" in msg and "Sigmoid" in msg
    assert "register_rule" in msg  # says how to fix it
    assert isinstance(err, LipboundError) and isinstance(err, ValueError)


class ManyProblems(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")
        self.act = nn.LeakyReLU()
        self.pool = nn.AvgPool2d(2, ceil_mode=True)  # adds partial windows on 5x5
        self.fc = nn.Linear(2 * 3 * 3, 3)
        self.gelu = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.conv(x)))
        x = torch.flatten(x, 1) ** 2  # (x * 2.0 is supported: ops/scalar.py)
        return self.gelu(self.fc(x))


def test_unsupported_configurations_are_all_named():
    with pytest.raises(UnsupportedModelError) as info:
        Analyzer(ManyProblems().eval(), (1, 5, 5))
    text = [" ".join(n) for n in info.value.nodes]
    assert len(text) == 5, text
    assert any("conv" in t and "padding_mode" in t for t in text), text
    assert any("LeakyReLU" in t for t in text), text
    assert any("pool" in t and "ceil_mode" in t for t in text), text
    assert any("pow" in t for t in text), text
    assert any("GELU" in t for t in text), text


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return torch.relu(y) + y


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor):
        y = self.fc(x)
        return y, y


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.fc(x) + y


class LinearOnImage(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)  # applied to the last axis of (N, 1, 4, 4)


@pytest.mark.parametrize("model,shape,word", [
    (Branching(), (3,), "chain"),
    (TupleOut(), (3,), "output"),
    (TwoInputs(), (3,), "one input"),
    (LinearOnImage(), (1, 4, 4), "flatten"),
    (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), (3,), "Softmax"),
], ids=["branching", "tuple-output", "two-inputs", "linear-on-image", "softmax"])
def test_unsupported_structures_raise_a_clear_error(model, shape, word):
    with pytest.raises(UnsupportedModelError) as info:
        Analyzer(model.eval(), shape)
    assert info.value.nodes
    assert word in str(info.value)


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent: not traceable
            return torch.relu(self.fc(x))
        return self.fc(x)


def test_untraceable_control_flow_is_a_clear_error():
    with pytest.raises(UnsupportedModelError) as info:
        Analyzer(ControlFlow().eval(), (3,))
    msg = str(info.value)
    assert "trace" in msg and "control flow" in msg
    assert len(info.value.nodes) == 1


def test_wrong_input_shape_for_the_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 2)).eval()
    with pytest.raises(InputError, match="input shape"):
        Analyzer(model, (3, 3))
    with pytest.raises(InputError, match="input shape"):
        trace_model(model, (11,))


@pytest.mark.parametrize("drop", [nn.Dropout(0.3), nn.Dropout1d(0.3), nn.Dropout2d(0.3),
                                  nn.Dropout3d(0.3), nn.AlphaDropout(0.3),
                                  nn.FeatureAlphaDropout(0.3)])
def test_every_dropout_in_eval_mode_is_the_identity(drop):
    """Every dropout class of torch is accepted in eval mode and changes no bound."""
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(2, 3, 3), nn.Linear(3 * 4 * 4, 2)
    body = [conv, nn.ReLU()] if isinstance(drop, nn.Dropout1d) else [conv, nn.ReLU(), drop]
    tail = [nn.Flatten(), drop, lin] if isinstance(drop, nn.Dropout1d) else [nn.Flatten(), lin]
    with_drop = nn.Sequential(*body, *tail).double().eval()
    plain = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin).double().eval()
    x0 = torch.randn(1, 2, 6, 6, dtype=DT)
    a, b = Analyzer(with_drop, (2, 6, 6)), Analyzer(plain, (2, 6, 6))
    assert a.local_bound(x0, 0.1).value == b.local_bound(x0, 0.1).value
    assert a.global_bound().value == b.global_bound().value
