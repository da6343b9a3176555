"""Review (session 20) of the tight bound through padded / ``ceil_mode`` max pooling.

No defect was found; this file keeps the sharpest of the attacks run on it. References: the
exact local constant of scalar-input nets (the largest ratio on the segment, 20000 points and
100 log-spaced ones next to x0) and ray lower bounds of 2-input nets whose first layer is the
pooling. Every value is compared without tolerance, for the whole network, the hybrid from
every boundary (``min_start=j``, so padded pools sit in the head or the tail) and, on the
line nets, the per-row form (``row_last``) with a cancelling row.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core_helpers import View, ratios
from lipbound import Analyzer
from lipbound.tight import tight_local_bound
from test_tight_tail_review import rows_every_boundary_above

DT = torch.float64

#: (kernel, stride, padding, dilation, ceil_mode): windows whose only real member is a corner
#: (kernel 2, padding 1), partial ceil_mode windows (stride > kernel too), dilated and
#: rectangular ones
POOLS = [(2, 1, 1, 1, False), (2, 2, 1, 1, False), (3, 2, 1, 1, False), (3, 1, 1, 1, False),
         (2, 2, 0, 1, True), (3, 2, 0, 1, True), (2, 3, 0, 1, True), (3, 2, 1, 1, True),
         (2, 1, 1, 2, False), (2, 2, 1, 2, True), (3, 3, 1, 1, True), (4, 3, 2, 1, True),
         (2, 3, 1, 1, True), (3, 2, 1, 2, True), ((2, 3), (1, 2), (1, 1), 1, True),
         ((3, 2), (2, 1), (1, 0), (1, 2), True)]


class _Unflatten(View):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _pool(pick, shape):
    for _ in range(30):
        k, s, p, dl, ceil = pick(*POOLS)
        pool = nn.MaxPool2d(k, s, padding=p, dilation=dl, ceil_mode=ceil)
        try:
            y = pool(torch.zeros(1, *shape, dtype=DT))
        except RuntimeError:
            continue
        if y.numel() and bool(torch.isfinite(y).all()):
            return pool, tuple(y.shape[1:])
    return None, shape


def _line_net(seed: int):
    """A scalar input spread over a (C, H, W) image (its units tied in groups at x0, or
    equal), 1-3 padded / ceil_mode pools (ReLU, a convolution or nothing between them), then
    FC-ReLU-FC."""
    g = torch.Generator().manual_seed(seed)

    def pick(*o):
        return o[int(torch.randint(len(o), (1,), generator=g))]

    c, h, w = pick(1, 2, 3), pick(2, 3, 4, 5, 6), pick(2, 3, 4, 5, 7)
    mods: list[nn.Module] = [nn.Linear(1, c * h * w), _Unflatten((c, h, w))]
    mods += [nn.ReLU()] if pick(True, False) else []
    shape = (c, h, w)
    n_pools = pick(1, 2, 3)
    for i in range(n_pools):
        pool, shape = _pool(pick, shape)
        if pool is None:
            break
        mods.append(pool)
        r = pick(0, 1, 2)
        if r == 1:
            mods.append(nn.ReLU())
        elif r == 2 and i < n_pools - 1:
            conv = nn.Conv2d(shape[0], pick(1, 2), pick(1, 2) if min(shape[1:]) >= 2 else 1,
                             padding=pick(0, 1)).to(DT)
            shape = tuple(conv(torch.zeros(1, *shape, dtype=DT)).shape[1:])
            mods += [conv, nn.ReLU()]
    width = pick(2, 3, 4)
    mods += [nn.Flatten(), nn.Linear(math.prod(shape), width), nn.ReLU(),
             nn.Linear(width, pick(1, 2, 3))]
    net = nn.Sequential(*mods).to(DT)
    x0 = torch.randn(1, 1, generator=g, dtype=DT) * pick(0.0, 1.0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
        lin, mode, groups = net[0], pick("tie", "equal"), pick(1, 2, 3)
        v = torch.randn(groups, generator=g, dtype=DT)
        for i in range(lin.out_features):
            if mode == "equal":
                lin.weight[i] = lin.weight[i % groups]
            lin.bias[i] = v[i % groups] - lin.weight[i, 0] * x0[0, 0]  # tied at x0
    return net.eval(), x0, float(pick(0.01, 0.3, 1.0, 3.0))


def _segment(eps: float) -> torch.Tensor:
    t = torch.linspace(-eps, eps, 20001, dtype=DT)
    t = t[t.abs() >= 1e-6 * eps]
    near = eps * 10.0 ** -torch.linspace(1, 12, 50, dtype=DT)
    return torch.cat([t, near, -near])[:, None]


def test_padded_pools_on_a_line_at_every_boundary_and_per_row() -> None:
    """40 line nets: the whole network, every hybrid boundary and every row of an output map
    with a cancelling row are above the exact constants (no tolerance)."""
    closest = math.inf
    for seed in range(40):
        net, x0, eps = _line_net(seed)
        t = _segment(eps)
        exact = float(ratios(net, x0, t).max())
        an = Analyzer(net, (1,), spectral="exact")
        key, blocks = an._blocks_for(None)
        rec: list = []
        _, bounds, _ = an._propagate(key, blocks, x0, eps, record=rec)
        outs = [tight_local_bound(blocks, x0, eps, rec, bounds)]
        outs += [tight_local_bound(blocks, x0, eps, rec, bounds, min_start=j, tail_starts=1)
                 for j in range(len(blocks))]
        for j, out in enumerate(outs):
            assert out.value is not None, (seed, out.reason)
            assert out.value >= exact, (seed, j, out.value, exact)
            if exact > 0:
                closest = min(closest, out.value / exact)
        rows_every_boundary_above(an, net, x0, eps, t, seed)
    assert closest < 1.01  # (a net at its exact constant: the check is sharp)


def _ray_lower(net: nn.Module, x0: torch.Tensor, eps: float) -> float:
    th = torch.arange(720, dtype=DT) * (2 * math.pi / 720)
    u = torch.stack([th.cos(), th.sin()], 1).reshape(720, *x0.shape[1:])
    best = 0.0
    with torch.no_grad():
        f0 = net(x0)
        rnd = 1e-12 * (1 + float(f0.abs().sum()))  # (the ratios' rounding)
        for r in (eps * torch.logspace(-4, 0, 40, dtype=DT)).tolist():
            q = ((net(x0 + r * u) - f0).norm(dim=1) - rnd).clamp_min(0) / r
            best = max(best, float(q.max()))
    return best


@pytest.mark.parametrize("shape", [(1, 1, 2), (1, 2, 1), (2, 1, 1)])
def test_pool_as_first_layer_on_two_inputs(shape: tuple[int, int, int]) -> None:
    """Padded / ceil_mode pooling of the input itself (one or two pools, 1x1 convolutions
    between them), at x0 = 0 (every window tied), x0 = 0.3 and a random x0: the whole network
    and every hybrid boundary above a ray lower bound (no tolerance)."""
    for seed in range(3):
        g = torch.Generator().manual_seed(100 * seed + sum(shape[:2]))

        def pick(*o, g=g):
            return o[int(torch.randint(len(o), (1,), generator=g))]

        mods: list[nn.Module] = []
        sh = shape
        for _ in range(2):
            pool, sh = _pool(pick, sh)
            if pool is None:
                continue
            mods.append(pool)
            if pick(True, False):
                co = pick(1, 2, 3)
                mods += [nn.Conv2d(sh[0], co, 1), nn.ReLU()]
                sh = (co, *sh[1:])
        net = nn.Sequential(*mods, nn.Flatten(), nn.Linear(math.prod(sh), 3), nn.ReLU(),
                            nn.Linear(3, 2)).to(DT).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
        an = Analyzer(net, shape, spectral="exact")
        for x0 in (torch.zeros(1, *shape, dtype=DT), torch.full((1, *shape), 0.3, dtype=DT),
                   torch.randn(1, *shape, generator=g, dtype=DT)):
            for eps in (0.05, 1.0):
                low = _ray_lower(net, x0, eps)
                key, blocks = an._blocks_for(None)
                rec: list = []
                _, bounds, _ = an._propagate(key, blocks, x0, eps, record=rec)
                outs = [tight_local_bound(blocks, x0, eps, rec, bounds)]
                outs += [tight_local_bound(blocks, x0, eps, rec, bounds, min_start=j,
                                           tail_starts=1) for j in range(len(blocks))]
                for out in outs:
                    assert out.value is not None, out.reason
                    assert out.value >= low, (shape, seed, eps, out.value, low)
