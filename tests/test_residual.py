"""Residual networks (lipbound.residual, lipbound.residual_graph): local and global bounds
composed over blocks y = act(S x + F(x)), checked against brute force, gradient ascent,
exact 1-D references, closed forms and the chain analyzer; intake errors; the CLI."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev

import lipbound
from cli_helpers import run_json
from lipbound.errors import InputError, UnsupportedModelError
from lipbound.lower import best_lower_bound
from lipbound.residual import ResidualAnalyzer
from lipbound.results import Guarantee

#: tiny float64 networks: one intra-op thread (38 s -> 1.4 s for the convolutional test on a
#: loaded machine)
pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64

#: a lighter gradient ascent than the default (the file's time budget)
LIGHT = dict(n_random=256, gradient_steps=40, pgd_restarts=8, pgd_steps=20, pgd_refine=2,
             pgd_refine_steps=30)


class FCBlock(nn.Module):
    """``act(S x + W2 relu(W1 x + b1) + b2)``; S the identity (``short=None``) or linear."""

    def __init__(self, n: int, hidden: int, short: bool = False, relu: bool = True,
                 scale: float = 1.0):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n))
        with torch.no_grad():
            self.f[2].weight.mul_(scale)
        self.shortcut = nn.Linear(n, n) if short else nn.Sequential()
        self.relu = relu

    def forward(self, x):
        out = self.f(x)
        out += self.shortcut(x)
        return F.relu(out) if self.relu else out


class FCNet(nn.Module):
    def __init__(self, d_in: int, n: int, hidden: int, k: int, blocks: list[tuple[bool, bool]],
                 stem: bool = True):
        super().__init__()
        self.stem = nn.Linear(d_in, n) if stem else nn.Identity()
        self.blocks = nn.ModuleList([FCBlock(n, hidden, s, r) for s, r in blocks])
        self.head = nn.Linear(n, k)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class BasicBlock(nn.Module):
    """torchvision-style: conv-bn-relu-conv-bn, shortcut identity or conv1x1 + bn."""

    def __init__(self, cin: int, cout: int, stride: int = 1, final_relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.final_relu = final_relu

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = torch.add(out, self.shortcut(x))
        return out.relu() if self.final_relu else out


class ConvNet(nn.Module):
    def __init__(self, final_relu: bool = True, c: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.layers = nn.Sequential(BasicBlock(c, c, 1, final_relu),
                                    BasicBlock(c, 2 * c, 2, final_relu))
        self.fc = nn.Linear(2 * c * 3 * 3, 4)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = self.layers(x)
        return self.fc(x.view(x.size(0), -1))


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g, dtype=DT) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g, dtype=DT) - 0.5)
    return model.eval()


def _sampled_max(model: nn.Module, x0: torch.Tensor, eps: float, n: int = 400,
                 c: torch.Tensor | None = None, seed: int = 0) -> float:
    """The largest ``||C (f(x) - f(x0))|| / ||x - x0||`` over random points of the ball
    (directions uniform, radii from 1e-4 eps to eps), lowered by a generous bound on the
    float64 rounding of the ratio itself (the test's own measurement error)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn((n, *x0.shape[1:]), generator=g, dtype=DT)
    d = d / d.reshape(n, -1).norm(dim=1).reshape(n, *([1] * (x0.dim() - 1)))
    radii = eps * torch.logspace(-4, 0, n, dtype=DT)
    x = x0 + d * radii.reshape(n, *([1] * (x0.dim() - 1)))
    with torch.no_grad():
        y, y0 = model(x), model(x0)
        diff = y - y0
        if c is not None:
            diff = diff @ c.T
        ratios = diff.norm(dim=1) / (x - x0).reshape(n, -1).norm(dim=1)
        slack = 1e-12 * (y.abs().sum(1) + y0.abs().sum() + 1.0) / radii
    return float((ratios - slack).max())


def _fc_net(seed: int, blocks, d_in=4, n=5, hidden=6, k=3, stem=True) -> FCNet:
    torch.manual_seed(seed)
    return FCNet(d_in, n, hidden, k, blocks, stem).to(DT).eval()


# ------------------------------------------------------------------ brute force


@pytest.mark.parametrize("blocks", [[(False, True)], [(True, True)], [(False, False)],
                                    [(True, False), (False, True), (True, True)]])
@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0])
def test_fc_upper_bound_above_samples_and_ascent(blocks, eps):
    model = _fc_net(len(blocks), blocks)
    x0 = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(5))
    res = lipbound.local_bound(model, x0, eps)
    assert res.method == "local-residual" and res.guarantee == Guarantee.CERTIFIED
    assert res.failure_prob == 0.0
    assert len(res.layers) == len(blocks) + 2  # stem, blocks, head
    assert res.value >= _sampled_max(model, x0, eps)
    lb = best_lower_bound(model, x0, eps)
    assert res.value >= lb.value


def test_kinks_at_x0():
    """Units of a block's ReLU exactly at (and just beside) their kink at x0."""
    model = _fc_net(11, [(False, True), (True, True)])
    x0 = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # shift the first block's output bias: pre-activations 0, ±1e-9
        h = model.stem(x0)
        z = model.blocks[0].f(h) + h
        model.blocks[0].f[2].bias -= z[0] - torch.tensor([0, 1e-9, -1e-9, 0, 0], dtype=DT)
    for eps in (1e-8, 1e-4, 0.05):
        res = lipbound.local_bound(model, x0, eps)
        assert res.value >= _sampled_max(model, x0, eps)
        assert res.value >= best_lower_bound(model, x0, eps).value


@pytest.mark.parametrize("final_relu", [True, False])
def test_conv_resnet_bounds(final_relu):
    torch.manual_seed(2)
    model = _randomise_bn(ConvNet(final_relu).to(DT), 3)
    x0 = torch.randn(1, 1, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    glob = lipbound.global_bound(model, (1, 6, 6))
    assert glob.method == "global-residual"
    for eps in (1e-3, 0.3):
        res = lipbound.local_bound(model, x0, eps)
        assert res.value >= _sampled_max(model, x0, eps, n=300)
        assert glob.value >= res.value * (1 - 1e-9)
    assert res.value >= best_lower_bound(model, x0, 0.3, **LIGHT).value
    c = torch.tensor([[1.0, -1.0, 0.0, 0.0]], dtype=DT)
    res = lipbound.local_bound(model, x0, 0.3, output_map=c)
    assert res.value >= _sampled_max(model, x0, 0.3, n=300, c=c)
    assert res.value >= best_lower_bound(model, x0, 0.3, output_map=c, **LIGHT).value


def test_output_map_on_a_last_block():
    """The network ends in a block (no head): the map multiplies the block's slopes."""
    for relu in (True, False):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(3, 4), FCBlock(4, 5, short=True, relu=relu)).to(
            DT).eval()
        x0 = torch.randn(1, 3, dtype=DT)
        c = torch.randn(2, 4, dtype=DT)
        for eps in (1e-2, 1.0):
            res = lipbound.local_bound(model, x0, eps, output_map=c)
            assert res.value >= _sampled_max(model, x0, eps, c=c)
            assert res.value >= best_lower_bound(model, x0, eps, output_map=c).value
        glob = lipbound.global_bound(model, (3,), output_map=c)
        assert glob.value >= res.value * (1 - 1e-9)


def test_lanczos_route_probabilistic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 120), FCBlock(120, 130, short=True),
                          FCBlock(120, 110), nn.Linear(120, 3)).to(DT).eval()
    x0 = torch.randn(1, 3, dtype=DT)
    res = lipbound.local_bound(model, x0, 0.1, spectral="lanczos", lanczos_steps=8,
                               failure_prob=1e-4)
    assert res.guarantee == Guarantee.PROBABILISTIC
    assert 0 < res.failure_prob <= 1e-4
    assert res.value >= _sampled_max(model, x0, 0.1, n=200)
    exact = lipbound.local_bound(model, x0, 0.1, spectral="exact")
    assert exact.guarantee == Guarantee.CERTIFIED and exact.failure_prob == 0.0
    assert exact.value >= _sampled_max(model, x0, 0.1, n=200)
    glob = lipbound.global_bound(model, (3,), spectral="lanczos", lanczos_steps=8,
                                 failure_prob=1e-4)
    assert glob.guarantee == Guarantee.PROBABILISTIC and 0 < glob.failure_prob <= 1e-4


# ------------------------------------------------------------------ exact 1-D reference


def test_one_dimensional_input_exact_reference():
    """f: R -> R^3 is piecewise linear; the ratio on the segment is largest at a kink, an
    end or next to x0, all of which a fine grid approaches from below."""
    torch.manual_seed(7)
    model = FCNet(1, 3, 4, 3, [(False, True), (True, True)]).to(DT).eval()
    x0 = torch.tensor([[0.3]], dtype=DT)
    for eps in (0.05, 0.5, 2.0):
        t = torch.linspace(-eps, eps, 40001, dtype=DT)
        t = t[t != 0].reshape(-1, 1)
        with torch.no_grad():
            r = (model(x0 + t) - model(x0)).norm(dim=1) / t.abs().reshape(-1)
        exact = float(r.max())
        res = lipbound.local_bound(model, x0, eps)
        assert res.value >= exact
        # and the one-sided derivatives at x0
        for s in (1.0, -1.0):
            j = jacrev(model)(x0 + s * 1e-9).reshape(3)
            assert res.value >= float(j.detach().norm()) * (1 - 1e-9)


# ------------------------------------------------------------------ closed forms


def test_zero_branch_equals_the_chain():
    """relu(x + 0) then a head equals the chain ReLU -> head: the same bound within
    rounding (every unit may turn on at this radius, so the chain's masks are all ones)."""
    torch.manual_seed(0)
    block = FCBlock(4, 3)
    with torch.no_grad():
        block.f[2].weight.zero_()
        block.f[2].bias.zero_()
    head = nn.Linear(4, 2)
    res_net = nn.Sequential(block, head).to(DT).eval()
    chain = nn.Sequential(nn.ReLU(), head).to(DT).eval()
    x0 = torch.tensor([[0.5, -0.2, 1.0, -0.7]], dtype=DT)
    for eps in (1.5, 3.0):
        a = lipbound.local_bound(res_net, x0, eps)
        b = lipbound.local_bound(chain, x0, eps)
        assert a.method == "local-residual" and b.method == "local"
        assert a.value == pytest.approx(b.value, rel=1e-8)
        assert a.layers[0].local == pytest.approx(max(
            lf.local for lf in b.layers[:1]), rel=1e-8)
    ga = lipbound.global_bound(res_net, (4,))
    gb = lipbound.global_bound(chain, (4,))
    assert ga.value == pytest.approx(gb.value, rel=1e-8)


def test_zero_branch_identity_factor_one():
    torch.manual_seed(1)
    block = FCBlock(3, 4)
    with torch.no_grad():
        block.f[2].weight.zero_()
    model = nn.Sequential(block).to(DT).eval()
    x0 = torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)  # all units on, far from the kink
    res = lipbound.local_bound(model, x0, 0.1)
    assert 1.0 <= res.value <= 1.0 + 1e-6
    assert 1.0 <= lipbound.global_bound(model, (3,)).value <= 1.0 + 1e-6


def test_linear_shortcut_only():
    """No activation, F = 0: the block is S x + b, its bound ||S||."""
    torch.manual_seed(2)
    block = FCBlock(4, 3, short=True, relu=False)
    with torch.no_grad():
        block.f[2].weight.zero_()
    model = nn.Sequential(block).to(DT).eval()
    s = float(torch.linalg.matrix_norm(block.shortcut.weight.detach(), 2))
    x0 = torch.randn(1, 4, dtype=DT)
    res = lipbound.local_bound(model, x0, 0.5)
    assert s <= res.value <= s * (1 + 1e-6)
    g = lipbound.global_bound(model, (4,))
    assert s <= g.value <= s * (1 + 1e-6)


def test_global_above_sampled_jacobians_and_locals():
    model = _fc_net(3, [(True, True), (False, True), (False, False)])
    glob = lipbound.global_bound(model, (4,))
    gen = torch.Generator().manual_seed(9)
    for _ in range(30):
        x = torch.randn(1, 4, dtype=DT, generator=gen) * 2
        j = jacrev(model)(x).reshape(3, 4)
        assert glob.value >= float(torch.linalg.matrix_norm(j.detach(), 2)) * (1 + 1e-12)
        loc = lipbound.local_bound(model, x, 0.3)
        assert glob.value >= loc.value * (1 - 1e-9)


# ------------------------------------------------------------------ property test


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_blocks=st.integers(1, 3), width=st.integers(2, 5),
       hidden=st.integers(1, 6), shorts=st.lists(st.booleans(), min_size=3, max_size=3),
       relus=st.lists(st.booleans(), min_size=3, max_size=3),
       eps=st.sampled_from([1e-4, 1e-2, 0.3, 2.0]), scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_property_random_nets(seed, n_blocks, width, hidden, shorts, relus, eps, scale):
    torch.manual_seed(seed)
    blocks = nn.ModuleList([FCBlock(width, hidden, shorts[i], relus[i], scale)
                            for i in range(n_blocks)])
    model = nn.Sequential(nn.Linear(3, width), *blocks, nn.Linear(width, 2)).to(DT).eval()
    x0 = torch.randn(1, 3, dtype=DT)
    res = lipbound.local_bound(model, x0, eps)
    assert res.value >= _sampled_max(model, x0, eps, n=200, seed=seed)
    glob = lipbound.global_bound(model, (3,))
    assert glob.value >= res.value * (1 - 1e-9)


# ------------------------------------------------------------------ intake


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1))


class ThreeBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return torch.relu(x + self.a(x) + self.b(x))


class NonlinearShortcut(nn.Module):
    """Both branches start at x, one of them with a ReLU: a block (S any chain)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return torch.relu(h + self.b(x))


class NotFromFork(nn.Module):
    """A branch reads the batch size of a tensor from before the block's input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        s = x.size(0)
        h = torch.relu(self.a(x))
        return torch.relu(h + self.b(h).view(s, -1))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = FCBlock(3, 4)

    def forward(self, x):
        return torch.relu(x + self.inner(x))


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1)

    def forward(self, x):
        return torch.relu(x + self.a(x))


class UnsupportedInBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return torch.relu(x + torch.tanh(self.a(x)))


@pytest.mark.parametrize("model, words", [
    (Cat(), ["cat"]),
    (ThreeBranches(), ["more than two branches"]),
    (NotFromFork(), ["'size'", "out.size(0)"]),
    (Nested(), ["nested"]),
    (Broadcast(), ["broadcasts"]),
    (UnsupportedInBranch(), ["tanh", "branch"]),
])
def test_unsupported_patterns_are_refused_clearly(model, words):
    model = model.to(DT).eval()
    x0 = torch.randn(1, 3, dtype=DT)
    with pytest.raises(UnsupportedModelError) as info:
        lipbound.local_bound(model, x0, 0.1)
    text = str(info.value)
    for w in words:
        assert w in text, text
    with pytest.raises(UnsupportedModelError):
        lipbound.global_bound(model, (3,))


def test_nonlinear_shortcut_is_a_block():
    torch.manual_seed(3)
    model = nn.Sequential(NonlinearShortcut(), nn.Linear(3, 2)).to(DT).eval()
    x0 = torch.randn(1, 3, dtype=DT)
    for eps in (1e-3, 0.5):
        res = lipbound.local_bound(model, x0, eps)
        assert res.method == "local-residual"
        assert res.value >= _sampled_max(model, x0, eps)
        assert res.value >= best_lower_bound(model, x0, eps, **LIGHT).value


def test_analyzer_names_the_blocks_and_what_works():
    model = _fc_net(0, [(False, True), (True, True)])
    with pytest.raises(UnsupportedModelError) as info:
        lipbound.Analyzer(model, (4,))
    text = str(info.value)
    assert "2 residual block(s)" in text and "lipbound.local_bound" in text
    with pytest.raises(UnsupportedModelError, match="residual block"):
        lipbound.Analyzer(nn.Sequential(nn.Linear(4, 4), model).to(DT).eval(), (4,))
    # a chain keeps its own error, without the note
    with pytest.raises(UnsupportedModelError) as info:
        lipbound.Analyzer(nn.Sequential(nn.Linear(3, 3), nn.Tanh()).eval(), (3,))
    assert "residual block" not in str(info.value)


def test_tight_refused_and_analyzer_reused():
    model = _fc_net(0, [(False, True)])
    x0 = torch.zeros(1, 4, dtype=DT)
    with pytest.raises(InputError, match="tight"):
        lipbound.local_bound(model, x0, 0.1, tight=True)
    ra = ResidualAnalyzer(model, (4,), seed=3)
    a = lipbound.local_bound(ra, x0, 0.1)
    assert a.value == lipbound.local_bound(model, x0, 0.1, seed=3).value
    with pytest.raises(InputError, match="seed"):
        lipbound.local_bound(ra, x0, 0.1, seed=4)
    with torch.no_grad():
        model.head.weight.mul_(2)
    with pytest.raises(InputError, match="changed"):
        ra.local_bound(x0, 0.1)


def test_output_map_checked():
    model = _fc_net(0, [(False, True)])
    with pytest.raises(InputError, match="output_map"):
        lipbound.local_bound(model, torch.zeros(1, 4, dtype=DT), 0.1,
                             output_map=torch.ones(1, 7, dtype=DT))


# ------------------------------------------------------------------ CLI


RESNET_FILE = textwrap.dedent("""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
            self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
            self.shortcut = nn.Sequential()

        def forward(self, x):
            out = self.conv2(F.relu(self.conv1(x)))
            out += self.shortcut(x)
            return F.relu(out)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 2, 3, padding=1)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.fc = nn.Linear(2 * 5 * 5, 3)

        def forward(self, x):
            x = F.relu(self.stem(x))
            for b in self.blocks:
                x = b(x)
            return self.fc(x.flatten(1))

    def make():
        torch.manual_seed(0)
        return Net().eval()
""")


def test_cli_bound_on_a_residual_model_file(capsys, tmp_path):
    src = tmp_path / "resnet.py"
    src.write_text(RESNET_FILE)
    x = np.random.default_rng(0).normal(size=(1, 5, 5)).astype(np.float32)
    xfile = tmp_path / "x.npy"
    np.save(xfile, x)
    out = run_json(capsys, ["bound", "--model", f"{src}:make", "--input", str(xfile),
                            "--input-shape", "1,5,5", "--eps", "0.5"])
    ns: dict = {}
    exec(RESNET_FILE, ns)
    model = ns["make"]()
    direct = lipbound.local_bound(model, torch.from_numpy(x)[None], 0.5)
    assert out["method"] == "local-residual"
    assert out["value"] == pytest.approx(direct.value, rel=1e-12)
    glob = run_json(capsys, ["bound", "--model", f"{src}:make", "--input-shape", "1,5,5",
                             "--method", "global"])
    assert glob["value"] >= out["value"] * (1 - 1e-9)


def _exact_forward(model: FCNet, x: torch.Tensor) -> list:
    """The network in exact rational arithmetic from its float64 weights and input."""
    from fractions import Fraction

    def lin(layer: nn.Linear, v: list) -> list:
        w, b = layer.weight.detach().tolist(), layer.bias.detach().tolist()
        return [sum((Fraction(wij) * vj for wij, vj in zip(row, v, strict=True)), Fraction(0))
                + Fraction(bi) for row, bi in zip(w, b, strict=True)]

    def relu(v: list) -> list:
        return [max(t, Fraction(0)) for t in v]

    v = lin(model.stem, [Fraction(t) for t in x.reshape(-1).tolist()])
    for blk in model.blocks:
        f = lin(blk.f[2], relu(lin(blk.f[0], v)))
        s = lin(blk.shortcut, v) if isinstance(blk.shortcut, nn.Linear) else v
        z = [a + b for a, b in zip(f, s, strict=True)]
        v = relu(z) if blk.relu else z
    return lin(model.head, v)


def test_nominal_error_bounds_the_exact_output():
    """The composed nominal error (carried across the stages, with the additions' rounding)
    bounds the float64 output's distance from the exact network's at x0 (rationals)."""
    for seed in range(3):
        model = _fc_net(20 + seed, [(False, True), (True, False), (True, True)], n=6,
                        hidden=8)
        with torch.no_grad():  # large weights: rounding well above the float64 unit
            for blk in model.blocks:
                blk.f[0].weight.mul_(1e3)
                blk.f[2].weight.mul_(1e-3)
        x0 = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(seed)) * 1e3
        ra = ResidualAnalyzer(model, (4,))
        res = ra.local_bound(x0, 1e-6)
        got = ra.forward(x0).reshape(-1).tolist()
        exact = _exact_forward(model, x0)
        from fractions import Fraction
        dist2 = sum((Fraction(g) - e) ** 2 for g, e in zip(got, exact, strict=True))
        assert dist2 > 0  # (rounding happened: the check is not empty)
        assert Fraction(res.nominal_error) ** 2 >= dist2


# ------------------------------------------------------------------ certified radius


def test_certified_radius_linear_closed_form():
    """A block without activation whose residual branch is 0: the network is affine,
    f(x) = W S x + b, and the smallest class-changing distance is min_j δ_j / ||m_j^T W S||;
    the certified radius must not exceed it (and is close: S's norm is a product bound)."""
    from lipbound.residual import certified_radius

    torch.manual_seed(5)
    block = FCBlock(4, 3, short=True, relu=False)
    with torch.no_grad():
        block.f[2].weight.zero_()
    model = nn.Sequential(block, nn.Linear(4, 3)).to(DT).eval()
    x0 = torch.randn(1, 4, dtype=DT)
    res = certified_radius(model, x0, tol=1e-4)
    a = model[1].weight.detach() @ block.shortcut.weight.detach()
    with torch.no_grad():
        y = model(x0).reshape(-1)
    c = int(y.argmax())
    exact = min(float(y[c] - y[j]) / float((a[c] - a[j]).norm()) for j in range(3) if j != c)
    assert res.guarantee == Guarantee.CERTIFIED_LOWER and res.predicted_class == c
    assert 0 < res.radius <= exact
    assert res.radius >= exact / (float(torch.linalg.matrix_norm(block.shortcut.weight.detach(),
                                                                 2)) * 3)


def test_certified_radius_keeps_the_class():
    from lipbound.attacks.registry import run_attacks
    from lipbound.residual import certified_radius

    model = _fc_net(8, [(False, True), (True, True)])
    x0 = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    res = certified_radius(model, x0)
    assert res.radius > 0 and res.upper is not None and res.upper <= res.radius * (1 + 1e-3)
    c = res.predicted_class
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2000, 4, dtype=DT, generator=g)
    x = x0 + d / d.norm(dim=1, keepdim=True) * res.radius * torch.rand(2000, 1, generator=g,
                                                                      dtype=DT)
    with torch.no_grad():
        assert bool((model(x).argmax(1) == c).all())
    found = [r.radius for r in run_attacks(model, x0, ("fgsm", "pgd")) if r.success]
    assert found  # (the check below is not empty)
    assert res.radius <= min(found)


# ------------------------------------------------------------------ nominal error plumbing


@pytest.mark.parametrize("blocks", [[(False, True)], [(True, True)], [(True, False)]])
def test_nominal_error_carried_through_each_stage(blocks):
    """A stage given a computed input within ``dl`` of the exact one must report an output
    error at least as large as the stage's own change over that ball: any point within
    ``dl`` may be the exact one (here ``dl`` is large, so the test sees it)."""
    model = _fc_net(30, blocks, stem=True)
    ra = ResidualAnalyzer(model, (4,))
    x0 = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    dl = 0.05
    with torch.inference_mode():
        x = x0.clone()
        for i, s in enumerate(ra.stages):
            if hasattr(s, "module"):
                an = ra.parts[i][0]
                _f, _b, y, out = ra._chain(an, x, 1e-6, dl, ("", an.blocks))
            else:
                _f, _b, y, out, _n = ra._block(i, x, 1e-6, dl, None)
            g = torch.Generator().manual_seed(i)
            d = torch.randn(500, *x.shape[1:], dtype=DT, generator=g)
            d = d / d.reshape(500, -1).norm(dim=1, keepdim=True) * dl
            moved = ra._stage_forward(i, x + d) - ra._stage_forward(i, x)
            assert out >= float(moved.reshape(500, -1).norm(dim=1).max())
            x = y


class Forms(nn.Module):
    """The additions and activations users write: ``x.add(y)``, ``torch.add``, ``+=``,
    ``nn.ReLU(inplace=True)``, ``x.relu()``, ``torch.relu``, and a block without one."""

    def __init__(self, how: str):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(3, 2)
        self.how = how

    def forward(self, x):
        if self.how == "method":
            z = self.act(x.add(self.f(x)))
        elif self.how == "torch.add":
            z = torch.add(self.f(x), x).relu()
        elif self.how == "iadd":
            out = self.f(x)
            out += x
            z = torch.relu(out)
        else:
            z = self.f(x) + x
        return self.head(z)


@pytest.mark.parametrize("how", ["method", "torch.add", "iadd", "none"])
def test_intake_forms(how):
    torch.manual_seed(0)
    model = Forms(how).to(DT).eval()
    ra = ResidualAnalyzer(model, (3,))
    blocks = [s for s in ra.stages if not hasattr(s, "module")]
    assert len(blocks) == 1 and blocks[0].relu == (how != "none")
    assert blocks[0].shortcut is None and blocks[0].main is not None
    x0 = torch.randn(1, 3, dtype=DT)
    res = lipbound.local_bound(model, x0, 0.2)
    assert res.value >= _sampled_max(model, x0, 0.2)


def test_certified_radius_margins_from_the_bounded_computation(monkeypatch):
    """The radius's margins come from the computed output whose distance from the exact one
    the composition bounds (``_local``'s), not from another float64 forward pass, whose
    rounding that error does not cover: a forward pass that is off by far more than its
    rounding must not change the radius."""
    from lipbound.residual import certified_radius

    model = _fc_net(8, [(False, True), (True, True)])
    x0 = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    ra = ResidualAnalyzer(model, (4,))
    ref = certified_radius(ra, x0)
    true_forward = ResidualAnalyzer.forward

    def shifted(self, x):  # (a forward pass that rounds "differently", grossly)
        y = true_forward(self, x)
        return y + torch.linspace(0.0, 0.5, y.shape[-1], dtype=y.dtype, device=y.device)

    monkeypatch.setattr(ResidualAnalyzer, "forward", shifted)
    got = certified_radius(ra, x0)
    assert got.radius == ref.radius and got.margin == ref.margin
    assert got.predicted_class == ref.predicted_class


def test_cli_radius_on_a_residual_model_file(capsys, tmp_path):
    """``lipbound radius`` on a residual network: the margin certificate (the same radius as
    lipbound.residual.certified_radius), a note that only it runs, attacks no closer; options
    that need the chain analyzer are refused naming what runs."""
    from lipbound.cli import main
    from lipbound.residual import certified_radius

    src = tmp_path / "resnet.py"
    src.write_text(RESNET_FILE)
    x = np.random.default_rng(0).normal(size=(1, 5, 5)).astype(np.float32)
    xfile = tmp_path / "x.npy"
    np.save(xfile, x)
    base = ["radius", "--model", f"{src}:make", "--input", str(xfile), "--input-shape", "1,5,5"]
    out = run_json(capsys, [*base, "--attacks", "fgsm,pgd"])
    ns: dict = {}
    exec(RESNET_FILE, ns)
    direct = certified_radius(ns["make"](), torch.from_numpy(x)[None], tol=1e-3)
    assert [c["method"] for c in out["certified"]] == ["margin"]
    assert out["certified_radius"] == direct.radius > 0
    assert out["violation"] is False
    assert any("only the margin certificate" in n for n in out["notes"])
    found = [a["radius"] for a in out["attacks"] if a["success"]]
    assert all(r >= out["certified_radius"] for r in found)
    for extra, words in ((["--tight"], "--tight is not available"),
                         (["--methods", "local"], "use --methods margin"),
                         (["--max-eps", "1"], "--max-eps and --reuse-tol")):
        assert main([*base, *extra]) == 2
        assert words in capsys.readouterr().err


def test_nominal_error_method_bounds_its_own_output():
    """ResidualAnalyzer.nominal_error (what exact_class_change uses): its output is within
    its bound of the exact network's output (rationals), with large weights so that the
    rounding is far above the float64 unit."""
    from fractions import Fraction

    from lipbound.radius import exact_class_change

    for seed in range(3):
        model = _fc_net(30 + seed, [(False, True), (True, True)], n=6, hidden=8)
        with torch.no_grad():
            for blk in model.blocks:
                blk.f[0].weight.mul_(1e3)
                blk.f[2].weight.mul_(1e-3)
        x0 = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(seed)) * 1e3
        ra = ResidualAnalyzer(model, (4,))
        y, delta, g, fp = ra.nominal_error(x0)
        assert g == Guarantee.CERTIFIED and fp == 0.0
        exact = _exact_forward(model, x0)
        dist2 = sum((Fraction(v) - e) ** 2 for v, e in zip(y.tolist(), exact, strict=True))
        assert dist2 > 0 and Fraction(delta) ** 2 >= dist2
        c = int(torch.tensor([float(e) for e in exact]).argmax())
        assert exact_class_change(ra, x0, c) in ("keeps", "undecided")
