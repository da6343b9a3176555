"""The tight bound through max pooling with padding and ``ceil_mode`` windows.

Until session 20 such a pooling layer anywhere in the network (even in the hybrid's head)
made the tight bound fall back to the paper's. A window's members in the padding (or past
the border) are an index past every input whose entry never wins (``-inf``, as torch pads)
and never moves (:func:`lipbound.tight._windows`); Lemma 2's possible winners are then the
window's real members only.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from core_helpers import ray_lower, tied_pool_net
from lipbound import Analyzer
from lipbound.blocks import PoolBlock
from lipbound.tight import _windows

DT = torch.float64


def _geometries():
    for k, s, p, dl, ceil in itertools.product((1, 2, 3, 4), (1, 2, 3), (0, 1, 2), (1, 2),
                                               (False, True)):
        if p > (dl * (k - 1) + 1) // 2 or p > k // 2:
            continue  # torch refuses padding over half the (effective) kernel
        yield k, s, p, dl, ceil


@pytest.mark.parametrize("geom", list(_geometries()))
def test_windows_give_torch_max_pooling(geom) -> None:
    """For random inputs, the maximum over each window's members (padding: -inf) is torch's
    max_pool2d output, on grids from 1x1 to 9x7 and 1-2 channels (windows entirely in the
    padding are refused by the layer's rule, so those grids are skipped)."""
    k, s, p, dl, ceil = geom
    g = torch.Generator().manual_seed(k * 1000 + s * 100 + p * 10 + dl + 5 * ceil)
    checked = 0
    for c, h, w in ((1, 1, 1), (2, 5, 5), (1, 6, 9), (2, 9, 7), (1, 4, 3)):
        pool = nn.MaxPool2d(k, s, padding=p, dilation=dl, ceil_mode=ceil)
        x = torch.randn(1, c, h, w, generator=g, dtype=DT)
        try:
            ref = pool(x)
        except RuntimeError:
            continue  # output size 0 (torch refuses)
        if not bool(torch.isfinite(ref).all()):
            continue  # a window entirely in the padding (refused by the rule)
        net = nn.Sequential(pool, nn.Flatten()).eval()
        an = Analyzer(net, (c, h, w), spectral="exact")
        block = next(b for b in an.blocks if isinstance(b, PoolBlock))
        win = _windows(block, x.device)
        ext = torch.cat([x.reshape(-1), torch.tensor([-math.inf], dtype=DT)])
        assert torch.equal(ext[win].amax(dim=1), ref.reshape(-1)), (geom, (c, h, w))
        assert bool(((win >= 0) & (win <= block.in_dim)).all())
        checked += 1
    assert checked >= 1


POOLS = {
    "pad1": lambda: [nn.MaxPool2d(3, 2, padding=1)],
    "pad1-s1": lambda: [nn.MaxPool2d(3, 1, padding=1)],
    "pad1-dilated": lambda: [nn.MaxPool2d(2, 1, padding=1, dilation=2)],
    "ceil": lambda: [nn.MaxPool2d(2, 2, ceil_mode=True)],
    "ceil-pad": lambda: [nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)],
    "two": lambda: [nn.MaxPool2d(2, 1, padding=1), nn.MaxPool2d(3, 2, ceil_mode=True)],
}


@pytest.mark.parametrize("kind", sorted(POOLS))
def test_padded_and_ceil_pools_sound_and_formed(kind: str) -> None:
    """The tight bound is formed (source "tight" where it beats the paper's product) and is
    above a ray lower bound (no tolerance), at x0 = 0 (tied windows) and a random x0."""
    formed = 0
    for seed in (0, 1):
        net = tied_pool_net(POOLS[kind](), seed)
        an = Analyzer(net, (2,), spectral="exact")
        for x0 in (torch.zeros(1, 2, dtype=DT),
                   torch.randn(1, 2, generator=torch.Generator().manual_seed(seed),
                               dtype=DT)):
            for eps in (0.05, 1.0):
                plain = an.local_bound(x0, eps)
                r = an.local_bound(x0, eps, tight=True)
                assert not any("padding" in n or "partial windows" in n for n in r.notes)
                assert r.value <= plain.value
                assert r.value >= ray_lower(net, x0, eps), (kind, seed, eps)
                formed += r.source == "tight"
    assert formed >= 1


def test_padded_pool_in_a_conv_net_against_sampling() -> None:
    """A small conv net with a ResNet-style stem pool (3, 2, padding 1): formed and above the
    library's best lower bound and random sampling (no tolerance), several radii."""
    from lipbound.lower import best_lower_bound

    g = torch.Generator().manual_seed(7)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(3, 2, padding=1), nn.Conv2d(3, 4, 3), nn.ReLU(),
                        nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(4, 3)
                        ).to(DT).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x0 = torch.randn(1, 1, 7, 7, generator=g, dtype=DT)
    an = Analyzer(net, (1, 7, 7), spectral="exact")
    for eps in (1e-3, 0.05, 0.5):
        plain = an.local_bound(x0, eps)
        r = an.local_bound(x0, eps, tight=True)
        assert r.source == "tight" and r.value <= plain.value, r.notes
        low = best_lower_bound(net, x0, eps, seed=3, n_random=256, gradient_steps=20,
                               pgd_restarts=4, pgd_steps=20).value
        with torch.no_grad():
            d = torch.randn(2000, 1, 7, 7, generator=g, dtype=DT)
            d = d / d.flatten(1).norm(dim=1)[:, None, None, None]
            d = d * eps * torch.rand(2000, 1, 1, 1, generator=g, dtype=DT)
            f0 = net(x0)
            rnd = 1e-12 * (1 + float(f0.abs().sum()))  # (the differences' rounding)
            num = ((net(x0 + d) - f0).norm(dim=1) - rnd).clamp_min(0)
            low = max(low, float((num / d.flatten(1).norm(dim=1)).max()))
        assert r.value >= low, (eps, r.value, low)
