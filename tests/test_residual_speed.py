"""The residual analyzer's fast path (session 26): a branch's scaled bound continues from its
rows' run after the branch's first layers (``lipbound.residual._REUSE_PREFIX``) instead of
recomputing them. On the exact route (deterministic factors) it must give the very same bound
as the straightforward path, with fewer factors computed; on the probabilistic route, a
sound bound with a failure probability no larger."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound.residual as residual
from lipbound import Analyzer
from lipbound.residual import ResidualAnalyzer, _same_prefix
from lipbound.results import Guarantee
from test_residual import BasicBlock, _randomise_bn  # (one definition each)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


class FCBlock(nn.Module):
    def __init__(self, n: int, hidden: int, short: bool, relu: bool):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n))
        self.shortcut = (nn.Sequential(nn.Linear(n, 7), nn.ReLU(), nn.Linear(7, n))
                         if short else nn.Sequential())
        self.relu = relu

    def forward(self, x):
        out = self.f(x) + self.shortcut(x)
        return F.relu(out) if self.relu else out


class ConvNet(nn.Module):
    def __init__(self, c: int = 3, head: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.layers = nn.Sequential(BasicBlock(c, c), BasicBlock(c, 2 * c, 2))
        self.fc = nn.Linear(2 * c * 3 * 3, 4) if head else None

    def forward(self, x):
        x = self.layers(F.relu(self.conv(x)))
        return self.fc(x.flatten(1)) if self.fc is not None else x


def _fc(seed: int, blocks, head: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5)] + [FCBlock(5, 6, s, r) for s, r in blocks]
    if head:
        layers.append(nn.Linear(5, 3))
    return nn.Sequential(*layers).to(DT).eval()


def _conv(seed: int, head: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(ConvNet(head=head).to(DT), seed + 1)


def _bounds(model, shape, x0, eps_list, c, fast: bool, monkeypatch, **kw):
    """Local bounds at each eps on one analyzer, and the number of layer factors computed."""
    monkeypatch.setattr(residual, "_REUSE_PREFIX", fast)
    ra = ResidualAnalyzer(model, shape, **kw)
    calls = []
    orig = Analyzer._affine_factor

    def counted(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(Analyzer, "_affine_factor", counted)
    out = [ra.local_bound(x0, eps, output_map=c) for eps in eps_list]
    monkeypatch.setattr(Analyzer, "_affine_factor", orig)
    return out, len(calls)


#: (name, model, input shape, output map, branches with a layer before their last one that
#: follow a block's ReLU: the layers the fast path computes once instead of twice per bound)
CASES = [
    ("fc relu", lambda: _fc(0, [(False, True), (True, True)]), (4,), None, 3),
    ("fc no relu", lambda: _fc(1, [(True, False), (False, True)]), (4,), None, 1),
    ("fc last block, map", lambda: _fc(2, [(True, True)], head=False), (4,),
     torch.tensor([[1.0, -1.0, 0.5, 0.0, 2.0]], dtype=DT), 2),
    ("fc last block", lambda: _fc(3, [(False, True), (True, True)], head=False), (4,), None,
     3),
    # (the 1x1 shortcut has a single layer: nothing before its last)
    ("conv", lambda: _conv(4), (1, 6, 6), None, 2),
    ("conv, map", lambda: _conv(5), (1, 6, 6),
     torch.tensor([[1.0, -1.0, 0.0, 0.0]], dtype=DT), 2),
    ("conv last block", lambda: _conv(6, head=False), (1, 6, 6), None, 2),
]


@pytest.mark.parametrize("name,make,shape,c,n_saved", CASES, ids=[c[0] for c in CASES])
def test_fast_path_same_bound_on_the_exact_route(name, make, shape, c, n_saved, monkeypatch):
    model = make()
    x0 = torch.randn(1, *shape, dtype=DT, generator=torch.Generator().manual_seed(7))
    eps_list = (1e-3, 0.1, 1.0, 0.1)  # (0.1 twice: the second on caches of the first)
    slow, n_slow = _bounds(model, shape, x0, eps_list, c, False, monkeypatch,
                           spectral="exact")
    fast, n_fast = _bounds(model, shape, x0, eps_list, c, True, monkeypatch, spectral="exact")
    for a, b in zip(slow, fast, strict=True):
        assert b.guarantee == a.guarantee == Guarantee.CERTIFIED
        assert b.value == a.value
        assert b.failure_prob == a.failure_prob == 0.0
        if c is None:
            assert b.nominal_error == a.nominal_error
        else:
            assert math.isnan(a.nominal_error) and math.isnan(b.nominal_error)
        assert [lf.local for lf in b.layers] == [lf.local for lf in a.layers]
    assert n_slow - n_fast == n_saved * len(eps_list)


def test_fast_path_on_the_lanczos_route(monkeypatch):
    """Probabilistic factors: a bound above sampled ratios and a failure probability no larger
    than the straightforward path's (each reused factor is one computation, counted once)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 60), FCBlock(60, 70, True, True),
                          FCBlock(60, 50, False, True), nn.Linear(60, 3)).to(DT).eval()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    kw = dict(spectral="lanczos", lanczos_steps=8, failure_prob=1e-4)
    (slow,), _ = _bounds(model, (3,), x0, (0.1,), None, False, monkeypatch, **kw)
    (fast,), _ = _bounds(model, (3,), x0, (0.1,), None, True, monkeypatch, **kw)
    assert fast.guarantee == slow.guarantee == Guarantee.PROBABILISTIC
    assert 0 < fast.failure_prob < slow.failure_prob <= 1e-4
    g = torch.Generator().manual_seed(2)
    d = torch.randn(300, 3, dtype=DT, generator=g)
    d = d / d.norm(dim=1, keepdim=True) * 0.1 * torch.rand(300, 1, dtype=DT, generator=g)
    with torch.no_grad():
        ratios = (model(x0 + d) - model(x0)).norm(dim=1) / d.norm(dim=1)
    assert fast.value >= float(ratios.max()) * (1 + 1e-9)
    exact = ResidualAnalyzer(model, (3,), spectral="exact").local_bound(x0, 0.1)
    assert fast.value >= float(ratios.max()) and exact.value >= float(ratios.max())


def test_same_prefix_refuses_other_layers():
    m1, m2 = _fc(0, [(False, True)]), _fc(1, [(False, True)])
    a1, a2 = Analyzer(m1[1].f, (5,)), Analyzer(m2[1].f, (5,))
    key, scaled = a1._blocks_for_scale(torch.ones(5, dtype=DT))
    assert key.startswith("scale:") and len(scaled) == len(a1.blocks) == 2
    assert _same_prefix(a1.blocks, scaled, 1)
    assert _same_prefix(a1.blocks, scaled, 0)
    assert not _same_prefix(a2.blocks, scaled, 1)  # other weights
    assert not _same_prefix(a1.blocks, scaled, 2)  # nothing after the prefix
    assert not _same_prefix(a1.blocks, scaled[:1], 1)
    assert not _same_prefix(a1.blocks, scaled, -1)


def test_propagate_resume_equals_one_run():
    """Analyzer._propagate(resume=...) continues a stop_before_last run exactly (exact
    route: the same factors, state and nominal error as one run over every block)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 9), nn.ReLU(),
                        nn.Linear(9, 3)).to(DT).eval()
    x0 = torch.randn(1, 4, dtype=DT)
    one = Analyzer(net, (4,), spectral="exact")
    _l, full, (y, d, ek, nom) = one._propagate("", one.blocks, x0, 0.2, nom0=(1e-9, 0.0))
    two = Analyzer(net, (4,), spectral="exact")
    _l, first, state = two._propagate("", two.blocks, x0, 0.2, stop_before_last=True,
                                      nom0=(1e-9, 0.0))
    _l, rest, (y2, d2, ek2, nom2) = two._propagate("", two.blocks, x0, 0.2, nom0=(1e-9, 0.0),
                                                   resume=(len(first), state))
    assert [b.value for b in full] == [b.value for b in (*first, *rest)]
    assert torch.equal(y, y2) and torch.equal(d, d2) and ek == ek2 and nom == nom2


def test_small_layers_run_on_one_thread_and_restore_the_count(monkeypatch):
    """A local bound of a network with small layers runs on one torch thread: the same value
    as on one thread by the user's choice; the caller's count is restored; a network with a
    layer above the size limit keeps the caller's count."""
    model = _conv(8)
    x0 = torch.randn(1, 1, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(3))
    seen = []
    orig = ResidualAnalyzer._local

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        return orig(self, *a, **k)

    monkeypatch.setattr(ResidualAnalyzer, "_local", spy)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(residual, "_SINGLE_THREAD", False)
        torch.set_num_threads(1)
        ref = ResidualAnalyzer(model, (1, 6, 6), spectral="lanczos").local_bound(x0, 0.2)
        torch.set_num_threads(2)
        monkeypatch.setattr(residual, "_SINGLE_THREAD", True)
        got = ResidualAnalyzer(model, (1, 6, 6), spectral="lanczos").local_bound(x0, 0.2)
        assert torch.get_num_threads() == 2
        assert got.value == ref.value and got.failure_prob == ref.failure_prob
        monkeypatch.setattr(residual._parallel, "MAX_FLOPS", 0.0)
        ResidualAnalyzer(model, (1, 6, 6)).local_bound(x0, 0.2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert seen == [1, 1, 2]
