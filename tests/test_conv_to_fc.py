"""The exact conversion of conv nets into fully connected ReLU chains (baselines/conv_to_fc.py).

Checks: the chain computes the model's function (brute force on random inputs, every
supported layer kind, max pools with and without a preceding ReLU); the MNIST LeNet converts
and agrees on the shipped samples; every rival that runs on a converted net gives an upper
bound above sampled Jacobian norms and lipbound's lower bounds; clear errors; ``compare``
rows on conv nets.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipbound import Normalize
from lipbound.baselines import (
    autolip,
    compare,
    eclipse_fast,
    exact_local_l2,
    fastlip,
    fc_layers,
    format_table,
    lipmip,
    recurjac,
    seqlip,
)
from lipbound.baselines.compare import NOT_FC, violations
from lipbound.baselines.conv_to_fc import ConversionTooLargeError, relu_chain
from lipbound.baselines.fc import (
    NotFullyConnectedError,
    as_fc,
    chain_note,
    describe,
    fc_forward,
    is_converted,
)
from lipbound.errors import InputError
from lipbound.lower import best_lower_bound
from lipbound.results import Guarantee

# --------------------------------------------------------------------------- networks


def _bn(c: int, gen: torch.Generator, dims: int = 2, negative: bool = False) -> nn.Module:
    bn = nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=gen) - (2.0 if negative else 0.0))
        bn.bias.copy_(torch.randn(c, generator=gen))
    return bn


class _Functional(nn.Module):
    """Functional forms: F.relu, F.max_pool2d, F.avg_pool2d, torch.flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), 2)  # no ReLU before: negative inputs
        x = F.avg_pool2d(F.relu(x), 2, 1)
        x = F.max_pool2d(x, 2, stride=1, padding=1)
        return self.fc(torch.flatten(x, 1))


def _net(name: str, gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    """A small float64 conv net; every supported layer kind appears in some net."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    if name == "norm-bn-groups-pool3pad":
        net = nn.Sequential(
            Normalize([0.1, -0.2], [0.5, 2.0]), nn.Conv2d(2, 4, 3, padding=1), _bn(4, gen),
            nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=1, padding=1), nn.Flatten(), nn.Linear(64, 6), nn.ReLU(),
            nn.Dropout(0.3), nn.Linear(6, 3))
        shape = (2, 9, 9)
    elif name == "dilated-conv-maxpool-before-relu-avgpool":
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=2, dilation=2), nn.MaxPool2d(2, stride=1),
            nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3, 5))
        shape = (1, 8, 8)
    elif name == "pool3-stride2-ceil-adaptive-bn1d":
        net = nn.Sequential(
            nn.Conv2d(3, 2, 2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Identity(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 5),
            _bn(5, gen, dims=1), nn.ReLU(), nn.Linear(5, 3))
        shape = (3, 8, 8)
    elif name == "maxpool-on-input":
        net = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(9, 3))
        shape = (1, 6, 6)
    elif name == "negative-bn-then-two-maxpools":
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), _bn(3, gen, negative=True), nn.MaxPool2d(2),
            nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(27, 4))
        shape = (2, 10, 10)
    elif name == "leading-relu-dilated-pool-trailing-relu":
        net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, stride=2, dilation=2, padding=1),
                            nn.Flatten(), nn.Linear(9, 4), nn.ReLU())
        shape = (1, 7, 7)
    elif name == "avgpool-excl-pad-then-maxpool-k3":
        net = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1,
                                                        count_include_pad=False),
            nn.MaxPool2d(3, stride=1, padding=1), nn.Flatten(), nn.Linear(32, 3))
        shape = (1, 9, 9)
    elif name == "functional":
        net = _Functional()
        shape = (1, 8, 8)
    else:  # pragma: no cover
        raise ValueError(name)
    return net.double().eval(), shape


NETS = ["norm-bn-groups-pool3pad", "dilated-conv-maxpool-before-relu-avgpool",
        "pool3-stride2-ceil-adaptive-bn1d", "maxpool-on-input", "negative-bn-then-two-maxpools",
        "leading-relu-dilated-pool-trailing-relu", "avgpool-excl-pad-then-maxpool-k3",
        "functional"]


def _assert_same_function(net: nn.Module, layers: list, shape: tuple[int, ...],
                          gen: torch.Generator) -> None:
    for scale in (0.1, 1.0, 10.0):
        x = torch.randn((16, *shape), generator=gen, dtype=torch.float64) * scale
        with torch.no_grad():
            want = net(x).reshape(16, -1).numpy()
        got = fc_forward(layers, x.reshape(16, -1).numpy())
        assert got.shape == want.shape
        err = np.max(np.abs(got - want))
        assert err <= 1e-12 * (1.0 + np.max(np.abs(want))), err


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", NETS)
def test_chain_computes_the_model_function(name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    net, shape = _net(name, gen)
    layers = relu_chain(net, shape)
    assert is_converted(layers)
    assert all(w.dtype == np.float64 and b.dtype == np.float64 for w, b in layers)
    _assert_same_function(net, layers, shape, gen)
    if seed == 0:  # the fc_layers fallback gives the same chain
        again = fc_layers(net, input_shape=shape)
        assert is_converted(again) and describe(again) == describe(layers)


def test_max_pool_widths_use_nonnegativity() -> None:
    gen = torch.Generator().manual_seed(0)
    # on the raw input (either sign): per 2x2 window relu(a-b), relu(b), relu(-b) for both
    # pairs (6 units), then 3 units: v = relu(v) - relu(-v) is needed
    net, shape = _net("maxpool-on-input", gen)
    assert describe(relu_chain(net, shape)) == "36-54-27-3"
    # after a ReLU the inputs are >= 0: relu(a-b), relu(b) (4 units), then 2
    net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(9, 3)).double()
    assert describe(relu_chain(net.eval(), (1, 6, 6))) == "36-36-36-18-3"
    # overlapping windows share their identical pair neurons (stride 1: 6 pairs, 6 b's)
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1),
                        nn.Flatten(), nn.Linear(4, 3)).double().eval()
    assert describe(relu_chain(net, (1, 5, 5))) == "25-9-12-8-3"


@pytest.fixture(scope="module")
def lenet():
    from lipbound.inputs import load_sample, load_samples
    from lipbound.zoo import get_entry, load_model

    loaded = load_model("mnist")
    entry = get_entry("mnist")
    xs = [load_sample("mnist:8", entry=entry).x]
    xs += [s.x for s in load_samples("mnist:test/0-4", entry=entry)]
    return loaded.model, torch.cat(xs)


LENET_WIDTHS = "784-3456-3456-1728-1024-1024-512-120-84-10"


def test_lenet_converts_and_agrees_on_the_shipped_samples(lenet) -> None:
    model, xs = lenet
    layers = relu_chain(model, (1, 28, 28))
    assert describe(layers) == LENET_WIDTHS
    assert chain_note(layers) == f"conv net as an exact FC ReLU chain of widths {LENET_WIDTHS}"
    ref64 = copy.deepcopy(model).double()  # the same (float32) weights, exactly, in float64
    x = xs.to(torch.float64)
    with torch.no_grad():
        want = ref64(x).numpy()
        want32 = model(xs).to(torch.float64).numpy()
    got = fc_forward(layers, x.reshape(len(x), -1).numpy())
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
    assert np.max(np.abs(got - want32)) <= 1e-4 * np.max(np.abs(want))
    assert (got.argmax(1) == want32.argmax(1)).all()


# --------------------------------------------------------------------------- soundness


def _jacobian_norms(net: nn.Module, x: torch.Tensor, dual_of_linf: torch.Tensor | None = None
                    ) -> np.ndarray:
    """Per-point spectral norms of the Jacobian (or l1 norms of c^T J) by autograd."""
    x = x.clone().requires_grad_(True)
    out = net(x).reshape(len(x), -1)
    if dual_of_linf is not None:
        (g,) = torch.autograd.grad((out @ dual_of_linf).sum(), x)
        return g.reshape(len(x), -1).abs().sum(1).detach().numpy()
    rows = []
    for k in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)
        rows.append(g.reshape(len(x), -1))
    jac = torch.stack(rows, dim=1)
    return torch.linalg.matrix_norm(jac, ord=2).detach().numpy()


@pytest.fixture(scope="module")
def small():
    """A conv net small enough for every rival (hidden widths 9-12-8)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1),
                        nn.Flatten(), nn.Linear(4, 3)).double().eval()
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 1, 5, 5, generator=gen, dtype=torch.float64)
    return net, x0, gen


def test_global_rivals_on_a_converted_net_are_above_sampled_jacobians(small) -> None:
    net, x0, gen = small
    shape = (1, 5, 5)
    pts = torch.cat([torch.randn(2000, *shape, generator=gen, dtype=torch.float64) * s
                     for s in (0.3, 1.0, 3.0)])
    sampled = float(_jacobian_norms(net, pts).max())
    lower = best_lower_bound(net, x0, 2.0, seed=0, pgd_restarts=8, n_random=256).value
    assert sampled > 0
    results = [autolip(net, input_shape=shape), seqlip(net, input_shape=shape),
               eclipse_fast(net, input_shape=shape)]
    assert results[1].guarantee is Guarantee.CERTIFIED  # widths <= 16: exact enumeration
    try:
        from lipbound.baselines import lipsdp

        results.append(lipsdp(net, input_shape=shape))
    except ImportError:  # cvxpy is optional
        pass
    for res in results:
        assert res.guarantee is Guarantee.CERTIFIED, (res.method, res.notes)
        assert res.value >= sampled * (1 - 1e-12), (res.method, res.value, sampled)
        assert res.value >= lower * (1 - 1e-12), (res.method, res.value, lower)
        assert any("conv net as an exact FC ReLU chain of widths 25-9-12-8-3" in n
                   for n in res.notes), res.notes
    # the naive product on the chain is at least every tighter certified value
    assert results[0].value >= max(r.value for r in results[1:]) * (1 - 1e-9)


def test_local_rivals_on_a_converted_net_are_above_sampled_jacobians(small) -> None:
    net, x0, gen = small
    shape, eps = (1, 5, 5), 0.5
    d = torch.randn(3000, *shape, generator=gen, dtype=torch.float64)
    d = d / d.reshape(len(d), -1).norm(dim=1).reshape(-1, 1, 1, 1)
    r = torch.rand(len(d), 1, 1, 1, generator=gen, dtype=torch.float64) ** (1 / 25)
    pts = x0 + eps * r * d
    sampled = float(_jacobian_norms(net, pts).max())
    lower = best_lower_bound(net, x0, eps, seed=0, pgd_restarts=8, n_random=256).value
    exact = exact_local_l2(net, x0, eps, input_shape=shape, time_limit=20)
    assert exact.guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED), exact.notes
    rj = recurjac(net, x0, eps, input_shape=shape)
    fl = fastlip(net, x0, eps, input_shape=shape)
    for res in (exact, rj, fl):
        assert res.value >= sampled * (1 - 1e-9), (res.method, res.value, sampled)
        assert res.value >= lower * (1 - 1e-9), (res.method, res.value, lower)
    assert rj.value >= exact.value * (1 - 1e-9) and fl.value >= rj.value * (1 - 1e-12)
    # lipMIP: max ||grad c^T f||_1 over the l_inf box, above sampled gradients in the box
    eps = 0.2  # a smaller box: HiGHS needs ~15 s at 0.5
    with torch.no_grad():
        top = torch.argsort(net(x0).reshape(-1), descending=True)
    c = torch.zeros(3, dtype=torch.float64)
    c[top[0]], c[top[1]] = 1.0, -1.0
    box = x0 + eps * (2 * torch.rand(3000, *shape, generator=gen, dtype=torch.float64) - 1)
    sampled_l1 = float(_jacobian_norms(net, box, dual_of_linf=c).max())
    mip = lipmip(net, x0, eps, c=c, input_shape=shape, time_limit=20)
    assert mip.guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED), mip.notes
    assert mip.value >= sampled_l1 * (1 - 1e-9), (mip.value, sampled_l1)


# --------------------------------------------------------------------------- errors


def test_unsupported_layers_are_listed() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.act = nn.Tanh()
            self.fc = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.act(self.conv(x)) + x, 1))

    for net, kinds in [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)), ["Tanh"]),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(), nn.MaxPool2d(2), nn.Flatten(),
                       nn.Linear(2, 2), nn.Sigmoid()), ["LeakyReLU", "Sigmoid"]),
        (Residual(), ["Tanh", "add"]),
    ]:
        with pytest.raises(NotFullyConnectedError) as info:
            relu_chain(net.eval(), (1, 4, 4))
        text = str(info.value)
        for kind in kinds:
            assert kind in text, text
        assert "convertible" in text and "Conv2d, MaxPool2d" in text
        with pytest.raises(NotFullyConnectedError):
            fc_layers(net.eval(), input_shape=(1, 4, 4))


def test_conv_net_without_input_shape_and_in_training_mode() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(NotFullyConnectedError, match="pass input_shape"):
        fc_layers(net.eval())
    with pytest.raises(NotFullyConnectedError):
        fc_layers(net.eval(), input_shape=(1, 4, 4), convert=False)
    with pytest.raises(InputError, match="training mode"):
        relu_chain(nn.Sequential(net[0], nn.BatchNorm2d(2), nn.ReLU()).train(), (1, 4, 4))
    assert describe(as_fc(net.eval(), input_shape=(1, 4, 4))) == "16-8-2"


def test_too_large_dense_matrix_is_refused_with_layer_and_size() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 64 * 64, 2)).eval()
    with pytest.raises(ConversionTooLargeError) as info:
        relu_chain(net, (3, 64, 64))
    text = str(info.value)
    assert "'0'" in text and "Conv" in text and "32768 x 12288" in text and "50M" in text
    # a max pool level: the limit is checked before anything is formed
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64, 2)).eval()
    assert describe(relu_chain(net, (1, 8, 8))) == "64-384-192-2"
    with pytest.raises(ConversionTooLargeError, match=r"MaxPool2d '1 \(level 1\)' .*384 x 64"):
        relu_chain(net, (1, 8, 8), max_entries=20000)
    rows = compare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 64 * 64, 2)).eval(),
                   torch.zeros(1, 3, 64, 64), 0.1, methods=["autolip", "recurjac"])
    for r in rows:
        assert r.note.startswith("not supported: conv net too large") and math.isnan(r.value)


# --------------------------------------------------------------------------- compare


def test_compare_on_a_small_conv_net(small) -> None:
    net, x0, _ = small
    rows = compare(net, x0, 0.2, exact_time_limit=20)
    assert not violations(rows)
    by = {r.method: r for r in rows}
    for r in rows:
        assert math.isfinite(r.value) or r.note.startswith("not "), (r.method, r.note)
    for name in ("exact-l2", "recurjac", "fastlip", "autolip", "seqlip", "eclipse-fast",
                 "lipmip"):
        assert math.isfinite(by[name].value), (name, by[name].note)
        assert "conv net as an exact FC ReLU chain of widths 25-9-12-8-3" in by[name].note
    assert by["exact-l2"].value <= by["recurjac"].value * (1 + 1e-9)
    assert by["lower"].value <= by["exact-l2"].value * (1 + 1e-9)
    assert "converted" not in by["local"].note and "FC ReLU chain" not in by["local"].note
    format_table(rows)


def test_compare_on_lenet_refuses_by_size(lenet) -> None:
    model, xs = lenet
    methods = ["exact-l2", "lipmip", "seqlip", "lipsdp-neuron", "lipsdp-layer"]
    rows = compare(model, xs[:1], 0.1, methods=methods, exact_time_limit=5)
    assert [r.method for r in rows] == ["exact-l2", "seqlip", "lipsdp-neuron", "lipsdp-layer",
                                        "lipmip"]
    for r in rows:
        assert math.isnan(r.value) and r.guarantee is None
        assert r.note.startswith("not run: ") or r.note.startswith("not available: "), r.note
        if r.note.startswith("not run: "):
            assert any(s in r.note for s in ("11404 hidden units", "12188", "width 3456"))
    assert NOT_FC not in format_table(rows)



def test_a_fully_connected_net_with_batch_norm_is_not_called_a_conv_net() -> None:
    """The conversion also folds the batch norm of a fully connected net; its note said
    "conv net" for a network without a convolution."""
    from lipbound.baselines.compare import compare

    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    note = "FC net with diagonal layers folded, as an exact FC ReLU chain of widths 4-8-3"
    assert chain_note(relu_chain(m, (4,))) == note
    rows = compare(m, torch.randn(1, 4, generator=g), 0.1, ["fastlip"])
    assert any(note in r.note for r in rows)
    for conv in (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)),
                 nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3))):
        assert chain_note(relu_chain(conv.eval(), (1, 4, 3))).startswith(
            "conv net as an exact FC ReLU chain")
