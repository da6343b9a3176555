"""Session 24 user audit: a new user's own networks through the README's API and CLI.

Zero padding before a convolution (``nn.ZeroPad2d``, ``nn.ConstantPad2d(p, 0)``, ``F.pad``) is
folded into the convolution's padding: the bounds are bit for bit those of the same network
written with the convolution's own padding. Adaptive max pooling with windows of one size is
max pooling. Layers without a rule that users' models often hold (a softmax / log-softmax /
sigmoid head, other activations, 1-D layers, other padding, an input permutation, x.mean)
are refused with what to do; a single-logit classifier's radius names the two-score fix.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound.errors import InputError, UnsupportedModelError
from lipbound.lower import random_lower_bound
from lipbound.radius import certified_radius

ROOT = Path(__file__).resolve().parents[1]


def _values(model: nn.Module, x0: torch.Tensor, eps: float, more: bool = True
            ) -> tuple[float, ...]:
    an = lipbound.Analyzer(model, tuple(x0.shape[1:]))
    out = (an.global_bound().value, an.local_bound(x0, eps).value)
    if not more:
        return out
    r = certified_radius(model, x0, method="margin", analyzer=an)
    return out + (an.local_bound(x0, eps, tight=True).value, r.radius)


class _PadNet(nn.Module):
    """A user's net: explicit zero padding before each convolution (F.pad and a module)."""

    def __init__(self, pad_module: nn.Module, fpad: bool):
        super().__init__()
        self.pad = pad_module
        self.fpad = fpad
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 5 * 5, 5)

    def forward(self, x):
        x = F.relu(self.conv1(self.pad(x)))
        x = F.pad(x, (1, 1, 1, 1)) if self.fpad else self.pad(x)
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class _PlainNet(nn.Module):
    """The same function with the convolutions' own padding."""

    def __init__(self, src: _PadNet):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = src.fc
        self.conv1.load_state_dict(src.conv1.state_dict())
        self.conv2.load_state_dict(src.conv2.state_dict())

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("pad,fpad,more", [(nn.ZeroPad2d(1), False, True),
                                           (nn.ZeroPad2d(1), True, False),
                                           (nn.ConstantPad2d(1, 0.0), False, False),
                                           (nn.ConstantPad2d((1, 1, 1, 1), 0), True, False)])
def test_zero_padding_before_conv_gives_the_padded_conv_bits(pad, fpad, more):
    torch.manual_seed(0)
    net = _PadNet(pad, fpad).eval()
    plain = _PlainNet(net).eval()
    x0 = torch.randn(1, 1, 10, 10)
    assert torch.equal(net(x0), plain(x0))
    got = _values(net, x0, 0.2, more)
    assert got == _values(plain, x0, 0.2, more)
    # and sound against sampling
    low = random_lower_bound(net, x0, 0.2, n_samples=300, seed=1)
    assert low.value <= got[1]


def test_stacked_zero_pads_and_pad_before_avgpool():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    a = nn.Sequential(nn.ZeroPad2d(1), nn.ZeroPad2d((1, 1, 1, 1)), conv, nn.ReLU(),
                      nn.ZeroPad2d(1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)
                      ).eval()
    conv3 = nn.Conv2d(2, 3, 3, padding=3)
    conv3.load_state_dict(conv.state_dict())
    b = nn.Sequential(conv3, nn.ReLU(), nn.AvgPool2d(2, padding=1), nn.Flatten(), a[7]).eval()
    x0 = torch.randn(1, 2, 6, 6)
    assert torch.equal(a(x0), b(x0))
    ga = lipbound.global_bound(a, (2, 6, 6))
    la = lipbound.local_bound(a, x0, 0.5)
    assert (ga.value, la.value) == (lipbound.global_bound(b, (2, 6, 6)).value,
                                    lipbound.local_bound(b, x0, 0.5).value)
    assert la.guarantee.value == "certified upper bound"
    assert "0+1+2" in [layer.name for layer in la.layers][0]


@pytest.mark.parametrize("layers,needle", [
    ([nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 2, 3, stride=2)], "asymmetric zero padding"),
    ([nn.Conv2d(1, 2, 3), nn.ReLU(), nn.ZeroPad2d(1), nn.MaxPool2d(2)], "here none does"),
    ([nn.ConstantPad2d(1, 0.5), nn.Conv2d(1, 2, 3)], "value 0.5"),
    ([nn.ZeroPad2d(-1), nn.Conv2d(1, 2, 3)], "negative padding"),
    ([nn.ReflectionPad2d(1), nn.Conv2d(1, 2, 3)], "only zero padding"),
])
def test_other_padding_refused_with_reason(layers, needle):
    model = nn.Sequential(*layers, nn.Flatten()).eval()
    with pytest.raises(UnsupportedModelError) as info:
        lipbound.global_bound(model, (1, 8, 8))
    assert needle in str(info.value)
    assert len(info.value.nodes) == 1


def test_fpad_reflect_mode_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return torch.flatten(self.c(F.pad(x, (1, 1, 1, 1), mode="reflect")), 1)

    with pytest.raises(UnsupportedModelError, match="mode='reflect'"):
        lipbound.global_bound(M().eval(), (1, 6, 6))


def test_adaptive_max_pool_with_equal_windows_is_max_pooling():
    torch.manual_seed(2)
    conv, fc = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(12, 4)

    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = conv, fc

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_max_pool2d(F.relu(self.conv(x)), 2), 1))

    ref = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), fc).eval()
    x0 = torch.randn(1, 1, 8, 8)
    want = _values(ref, x0, 0.3)
    for m, more in ((nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d((2, 2)), nn.Flatten(),
                                   fc), True), (Fn(), False)):
        assert _values(m.eval(), x0, 0.3, more) == want[:len(want) if more else 2]
    bad = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d(3), nn.Flatten()).eval()
    with pytest.raises(UnsupportedModelError, match="windows of varying size"):
        lipbound.global_bound(bad, (1, 8, 8))


class _FSoftmax(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.fc1, self.fc2, self.how = nn.Linear(6, 8), nn.Linear(8, 3), how

    def forward(self, x):
        z = self.fc2(F.relu(self.fc1(x)))
        if self.how == "F.softmax":
            return F.softmax(z, dim=1)
        if self.how == "method":
            return z.log_softmax(dim=-1)
        return torch.softmax(z, 1)


def _head(*tail: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), *tail).eval()


@pytest.mark.parametrize("model", [
    _head(nn.Softmax(dim=1)), _head(nn.LogSoftmax(dim=1)), _head(nn.Sigmoid()),
    _FSoftmax("F.softmax").eval(), _FSoftmax("method").eval(), _FSoftmax("torch").eval(),
])
def test_output_head_refused_naming_the_logits_model(model):
    with pytest.raises(UnsupportedModelError) as info:
        lipbound.local_bound(model, torch.randn(1, 6), 0.1)
    msg = str(info.value)
    assert "bounds the logits" in msg and "certified radii of the model without it" in msg
    assert len(info.value.nodes) == 1
    # the fix it names works: the Sequential without its head
    if isinstance(model, nn.Sequential):
        assert lipbound.local_bound(model[:-1].eval(), torch.randn(1, 6), 0.1).value > 0


@pytest.mark.parametrize("model,needle", [
    (nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3)), "ReLU networks"),
    (nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)), "ReLU networks"),
    (nn.Sequential(nn.Linear(6, 8), nn.Softmax(dim=1), nn.Linear(8, 3)),
     "softmax inside the network"),
])
def test_other_activations_name_the_reason(model, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        lipbound.global_bound(model.eval(), (6,))


def test_one_d_layers_permute_and_other_means_name_the_rewrite():
    m = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten()).eval()
    with pytest.raises(UnsupportedModelError) as info:
        lipbound.global_bound(m, (1, 16))
    assert len(info.value.nodes) == 2
    msg = str(info.value)
    assert msg.count("1-D layers have no rule") == 2 and "nn.MaxPool2d((1, k)" in msg

    class Nhwc(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return torch.flatten(F.relu(self.c(x.permute(0, 3, 1, 2))), 1).mean(dim=1,
                                                                                keepdim=True)

    with pytest.raises(UnsupportedModelError) as info:
        lipbound.global_bound(Nhwc().eval(), (6, 6, 3))
    msg = str(info.value)
    assert "keeps L2 distances" in msg and "adaptive_avg_pool2d(x, 1)" in msg
    assert len(info.value.nodes) == 2


class _MeanNet(nn.Module):
    def __init__(self, conv: nn.Module, fc: nn.Module, how: int):
        super().__init__()
        self.conv, self.fc, self.how = conv, fc, how

    def forward(self, x):
        h = F.relu(self.conv(x))
        if self.how == 0:
            h = h.mean(dim=(2, 3))
        elif self.how == 1:
            h = h.mean([-1, -2])
        else:
            h = torch.mean(h, (2, 3), keepdim=True).flatten(1)
        return self.fc(h)


def test_spatial_mean_is_global_average_pooling():
    torch.manual_seed(4)
    conv, fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 4)
    ref = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    x0 = torch.randn(1, 3, 6, 6)
    want = _values(ref, x0, 0.2, False)
    for how in (0, 1, 2):
        assert _values(_MeanNet(conv, fc, how).eval(), x0, 0.2, False) == want


def test_single_logit_radius_names_the_two_score_fix():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    x0 = torch.randn(1, 6)
    with pytest.raises(InputError, match=r"two scores \(0, z\)"):
        certified_radius(model, x0)
    # the fix as the message spells it
    head = nn.Linear(1, 2)
    head.weight.data = torch.tensor([[0.0], [1.0]])
    head.bias.data.zero_()
    model2 = nn.Sequential(model, nn.Flatten(), head).eval()
    r = certified_radius(model2, x0)
    assert r.radius > 0
    z = float(model(x0).detach())
    g = lipbound.global_bound(model, (6,)).value
    assert r.radius >= abs(z) / g * (1 - 1e-9) * 0.5  # at least half the global certificate


def _cli(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess:
    f = tmp_path / "usernet.py"
    f.write_text(textwrap.dedent(body))
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "lipbound", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


_NET = """
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(2 * 6 * 6, 3){tail}).eval()
"""


def test_cli_user_model_with_zero_pad_and_with_softmax(tmp_path):
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((1, 1, 6, 6)).astype("f4"))
    ok = _cli(tmp_path, _NET.format(tail=""), "bound", "--model", "usernet.py:make",
              "--input", "x.npy", "--input-shape", "1,6,6", "--eps", "0.1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"certified upper bound"' in ok.stdout
    bad = _cli(tmp_path, _NET.format(tail=", nn.Softmax(dim=1)"), "bound", "--model",
               "usernet.py:make", "--input", "x.npy", "--input-shape", "1,6,6", "--eps", "0.1")
    assert bad.returncode == 2
    assert "bounds the logits" in bad.stderr and "Traceback" not in bad.stderr


def test_weights_with_a_lightning_style_prefix_name_the_fix(tmp_path):
    from lipbound.cli.common import load_state_dict_file
    from lipbound.errors import WeightsError

    torch.manual_seed(5)
    src = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    path = tmp_path / "lightning.ckpt"
    sd = {f"model.{k}": v for k, v in src.state_dict().items()}
    torch.save({"epoch": 2, "state_dict": sd}, path)
    dst = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(WeightsError, match=r"does not match.*wrapper.model.state_dict\(\)"):
        load_state_dict_file(dst, str(path))
    # the fix it names
    torch.save({k.removeprefix("model."): v for k, v in sd.items()}, path)
    load_state_dict_file(dst, str(path))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a prefix that does not leave the model's keys: the usual mismatch, naming the keys
    torch.save({f"model.{k}": v for k, v in src.state_dict().items() if k != "2.bias"}, path)
    with pytest.raises(WeightsError, match="2.bias"):
        load_state_dict_file(dst, str(path))


def test_parallel_branches_named_as_a_branch():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))

    with pytest.raises(UnsupportedModelError) as info:
        lipbound.global_bound(Cat().eval(), (6,))
    details = dict((w, d) for w, _, d in info.value.nodes)
    assert "a branch (its input also feeds another layer" in details["module 'b'"]
    assert "takes 2 tensor input(s)" in details["node 'cat'"]


def test_compare_rows_name_the_unsupported_layer():
    from lipbound.baselines.compare import compare

    # since session 25 a model that none of the asked methods can run, refused by the
    # intake, raises its error (two rows that said the same before); with a method that
    # runs (the lower bound), the rows name the layer
    with pytest.raises(UnsupportedModelError) as exc:
        compare(_head(nn.Softmax(dim=1)), torch.randn(1, 6), 0.1, ["local", "global"])
    assert "module '3': Softmax" in str(exc.value) and "bounds the logits" in str(exc.value)
    rows = compare(_head(nn.Softmax(dim=1)), torch.randn(1, 6), 0.1,
                   ["lower", "local", "global"])
    assert rows[0].guarantee is not None
    for r in rows[1:]:
        assert r.guarantee is None and math.isnan(r.value)  # (not run)
        assert "module '3': Softmax" in r.note and "bounds the logits" in r.note


def test_device_read_for_a_tensor_made_in_forward_is_not_listed():
    class InForwardMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
            return torch.flatten(self.c(x - mean), 1)

    with pytest.raises(UnsupportedModelError) as info:
        lipbound.global_bound(InForwardMean().eval(), (3, 5, 5))
    assert "register_buffer" in str(info.value)
    assert "non-tensor value" not in str(info.value)  # (was: x.device listed as well)
