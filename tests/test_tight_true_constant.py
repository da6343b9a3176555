"""Adversarial review (session 23) of the opt-in tight local bound (:mod:`lipbound.tight`):
what sessions 21-22 changed (rows on windows per corner, ``_window_index``; deferred norms
kept on windows, ``_Lazy``; in-place error matrices; chunked transposed convolutions; the
hybrid and the row budgets) checked against the *true* local constant, not against the
code before.

* Two-input nets (a linear layer reshaped to a grid, then convolutions with stride, padding
  and dilation, max pooling with padding, ``ceil_mode`` and overlapping windows, pooling
  before and after ReLU, tied pooling windows and units exactly at 0 at ``x0``, integer
  weights): the local constant of a 2-input net is found by rays (every direction of a fine
  fan at 30 radii, each ratio less a float64 rounding allowance), a lower bound close to the
  exact value. The tight bound (matrix and per row, whole network and hybrid under small row
  budgets) must be at least that, with no tolerance, and never above the plain local bound
  it is the minimum with.
* Certified tight radii (local and margin) on 2-input nets: no class change found at a
  distance at most the radius (fans of rays, float64, a margin for rounding); and on a net
  that is affine on a large ball (the exact flip distance in closed form) the radius stays
  below the exact distance.
* Deferred norms on windows (``_Lazy``): the window-based lower and upper bounds bracket the
  gathered matrix's norm bound on adversarial layouts (windows at the grid's far border,
  every row on one corner, every row on its own corner, columns of one channel or a single
  entry, negated twins, scales near the safe range's ends).

Soundness found here: no violation (see the session 23 report for the counts of the wider
campaign these tests sample).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import lipbound.tight as T
from core_helpers import Grid, ray_lower
from lipbound import Analyzer
from lipbound.radius import certified_radius

DT = torch.float64


def _out(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _two_input_net(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A random 2-input float64 net: linear layer -> (C, H, W) grid -> 1-3 of conv (stride,
    padding, dilation; ReLU or not) / max pooling (padding, ceil_mode, overlapping; ReLU after
    or not) -> a small dense head; tied grid units (tied pooling windows at x0 = 0), integer
    weights and x0 at 0 (units exactly at 0) on some seeds."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    c, h, w = rng.choice([1, 2, 3]), rng.randint(3, 9), rng.randint(3, 9)
    first = nn.Linear(2, c * h * w)
    layers: list[nn.Module] = [first]
    if rng.random() < 0.6:
        layers.append(nn.ReLU())
    layers.append(Grid((c, h, w)))
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.55:
            k, s = rng.randint(1, 3), rng.randint(1, 2)
            p = rng.randint(0, k - 1) if k > 1 else 0
            d = rng.choice([1, 1, 2])
            ho, wo = _out(h, k, s, p, d), _out(w, k, s, p, d)
            if ho < 1 or wo < 1:
                continue
            co = rng.choice([1, 2, 3])
            layers.append(nn.Conv2d(c, co, k, s, p, dilation=d))
            if rng.random() < 0.85:
                layers.append(nn.ReLU())
            c, h, w = co, ho, wo
        else:
            k = rng.randint(2, 3)
            s, p = rng.randint(1, k), rng.randint(0, k // 2)
            ceil = rng.random() < 0.3
            if ceil:
                ho, wo = -(-(h + 2 * p - k) // s) + 1, -(-(w + 2 * p - k) // s) + 1
                ho -= (ho - 1) * s >= h + p
                wo -= (wo - 1) * s >= w + p
            else:
                ho, wo = _out(h, k, s, p), _out(w, k, s, p)
            if ho < 1 or wo < 1 or h + 2 * p < k or w + 2 * p < k:
                continue
            layers.append(nn.MaxPool2d(k, s, p, ceil_mode=ceil))
            if rng.random() < 0.3:
                layers.append(nn.ReLU())
            h, w = ho, wo
    layers.append(nn.Flatten())
    body = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        n = body(torch.zeros(1, 2, dtype=DT)).numel()
    tail: list[nn.Module] = [nn.Linear(n, rng.randint(2, 6)), nn.ReLU()] \
        if rng.random() < 0.6 else []
    width = tail[0].out_features if tail else n
    net = nn.Sequential(*body, *tail, nn.Linear(width, rng.randint(1, 3))).to(DT).eval()
    integer = rng.random() < 0.4
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randint(-2, 3, prm.shape, generator=g).to(DT) if integer
                      else torch.randn(prm.shape, generator=g, dtype=DT))
        if rng.random() < 0.5:  # grid units tied in groups: tied pooling windows at 0
            q = rng.randint(1, 3)
            for i in range(first.weight.shape[0]):
                first.weight[i] = first.weight[i % q]
            first.bias.zero_()
    pick = rng.random()
    if pick < 0.4:
        x0 = torch.zeros(1, 2, dtype=DT)
    elif pick < 0.6:
        x0 = torch.randint(-1, 2, (1, 2), generator=g).to(DT)
    else:
        x0 = torch.randn(1, 2, generator=g, dtype=DT)
    return net, x0


# seeds of the campaign's generator whose nets hold rows on windows through a convolution
# or a pooling (checked when they were picked: a window route runs on each)
SEEDS = [1, 5, 11, 16, 23, 37]
EPS = [1e-9, 1e-3, 0.05, 0.5, 3.0]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("seed", SEEDS)
def test_tight_at_least_the_local_constant_of_two_input_conv_nets(seed: int) -> None:
    """The reported tight bound (whole network and hybrids under small row budgets) is at
    least the rays' lower bound on the local constant (no tolerance: the lower bound already
    subtracts the rounding of ``f(x) - f(x0)``) and at most the plain local bound."""
    net, x0 = _two_input_net(seed)
    an = Analyzer(net, (2,), spectral="exact")
    n_out = int(net(x0).shape[1])
    c = torch.eye(n_out, dtype=DT)
    for eps in EPS:
        lower = ray_lower(net, x0, eps, n_angles=360)
        plain = an.local_bound(x0, eps).value
        plain_rows = an.local_bound_rows(x0, eps, c).values
        for rows in (2048, 3, 1):
            v = an.local_bound(x0, eps, tight=True, tight_rows=rows).value
            assert lower <= v <= plain, (seed, eps, rows, lower, v, plain)
            per_row = an.local_bound_rows(x0, eps, c, tight=True, tight_rows=rows).values
            assert bool((per_row <= plain_rows).all()), (seed, eps, rows)
            for i in range(n_out):
                low_i = ray_lower(nn.Sequential(net, _Row(i)), x0, eps, n_angles=90)
                assert low_i <= float(per_row[i]), (seed, eps, rows, i)


class _Row(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.i = i

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.i:self.i + 1]


def test_seeds_exercise_the_window_routes(monkeypatch) -> None:
    """The nets above hold rows on windows (``_back_local`` on windows, or ``_pool_local``)
    and gather columns through ``_window_index``: the review exercises what it reviews."""
    hits = {"conv": 0, "pool": 0, "index": 0}
    back, pool, index = T._back_local, T._pool_local, T._window_index

    def count(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            if out is not None:
                hits[name] += 1
            return out
        return wrapped

    monkeypatch.setattr(T, "_back_local", count("conv", back))
    monkeypatch.setattr(T, "_pool_local", count("pool", pool))
    monkeypatch.setattr(T, "_window_index", count("index", index))
    for seed in SEEDS:
        net, x0 = _two_input_net(seed)
        an = Analyzer(net, (2,), spectral="exact")
        for eps in (0.05, 0.5):
            an.local_bound(x0, eps, tight=True)
            an.local_bound(x0, eps, tight=True, tight_rows=3)
    assert all(hits.values()), hits


def _flip_distance(net: nn.Module, x0: torch.Tensor, cls: int, reach: float,
                   n_angles: int = 720, n_radii: int = 300) -> float:
    """The smallest radius (of ``n_radii`` up to ``reach``) at which some direction of a fan
    changes the class from ``cls`` (float64, a relative margin against rounding): an upper
    bound on the distance to a class change (inf where none was found)."""
    th = torch.arange(n_angles, dtype=DT) * (2 * math.pi / n_angles)
    u = torch.stack([th.cos(), th.sin()], 1)
    with torch.no_grad():
        for t in (reach * torch.linspace(0, 1, n_radii + 1, dtype=DT)[1:]).tolist():
            y = net(x0 + t * u)
            other = y.clone()
            other[:, cls] = -math.inf
            tol = 1e-9 * (1 + y.abs().max(dim=1).values)
            if bool((other.max(dim=1).values > y[:, cls] + tol).any()):
                return t
    return math.inf


RADIUS_SEEDS = [11, 16, 1, 8]


@pytest.mark.parametrize("seed", RADIUS_SEEDS)
def test_tight_radii_admit_no_class_change(seed: int) -> None:
    """Certified tight radii (local and margin certificates) of 2-input nets: no class change
    at any radius up to the certified one along a fan of 720 rays (a class change found at a
    distance <= the radius would be a real counterexample)."""
    net, x0 = _two_input_net(seed)
    y = net(x0)
    assert y.shape[1] >= 2
    cls = int(y.argmax())
    for method in ("local", "margin"):
        r = certified_radius(net, x0, method=method, tight=True, spectral="exact", tol=1e-2)
        assert 0.0 < r.radius < math.inf
        assert _flip_distance(net, x0, cls, r.radius) > r.radius, (seed, method)


def test_tight_radius_below_the_exact_flip_distance_of_an_affine_net() -> None:
    """A ReLU net whose units are all active on a ball far larger than the radii (biases of
    1e3): it is affine there, so the distance to the nearest class change is
    ``min_j delta_j / ||g_j||`` in closed form (``g_j`` the margin rows of the product of the
    weights). The tight margin radius must not exceed it (and comes within 1 % of it: the
    test has teeth); the local one is at most it too."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), Grid((3, 2, 2)), nn.Conv2d(3, 4, 2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).to(DT).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=DT))
        net[0].bias.fill_(1e3)
        net[3].bias.fill_(1e5)
    x0 = torch.tensor([[0.3, -0.2]], dtype=DT)
    with torch.no_grad():  # margins 0.4 and 0.7 at x0 (class 0 first)
        net[6].bias.sub_(net(x0)[0] - torch.tensor([0.0, -0.4, -0.7], dtype=DT))
    jac = torch.autograd.functional.jacobian(lambda x: net(x)[0], x0)[:, 0, :]
    y = net(x0)[0].detach()
    cls = int(y.argmax())
    flip = min(float((y[cls] - y[j]) / (jac[cls] - jac[j]).norm())
               for j in range(3) if j != cls)
    assert flip < 10.0  # (well inside the ball where every unit stays active)
    margin = certified_radius(net, x0, method="margin", tight=True, spectral="exact",
                              tol=1e-4)
    local = certified_radius(net, x0, method="local", tight=True, spectral="exact", tol=1e-4)
    assert margin.radius <= flip and local.radius <= flip
    assert margin.radius >= 0.99 * flip


# ------------------------------------------------------------------ deferred norms on windows
def _lazy_case(layout: str, seed: int, scale_to: float
               ) -> tuple[T._Local | T._Mirror, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c_, hh, ww, h, w, rows = 2, 7, 6, 3, 2, 9
    if layout == "far_border":  # every window at the grid's bottom-right corner
        r0 = torch.full((rows,), hh - h)
        c0 = torch.full((rows,), ww - w)
    elif layout == "own_corner":  # every row its own corner (no shared index)
        r0 = torch.arange(rows) % (hh - h + 1)
        c0 = torch.arange(rows) % (ww - w + 1)
        r0 = (r0 + torch.arange(rows) // (ww - w + 1)) % (hh - h + 1)
    else:  # two corners shared by all rows (the once-per-corner index)
        r0 = torch.tensor([0, hh - h] * 5)[:rows]
        c0 = torch.tensor([ww - w, 0] * 5)[:rows]
    vals = torch.randn(rows, c_, h, w, generator=g, dtype=DT)
    vals[0] = -vals[1] if layout != "own_corner" else vals[0]  # exact cancellation pairs
    loc = T._Local(vals * scale_to, vals.abs() * scale_to * 1e-15 + 1e-300, r0, c0,
                   (c_, hh, ww))
    held: T._Local | T._Mirror = loc
    n_full = rows
    if seed % 2:  # twins: rows rebuilt as negations, one kept row used three times
        src = torch.tensor([0, 0, 0, *range(1, rows)])
        neg = torch.zeros(src.numel(), dtype=torch.bool)
        neg[1] = True
        held, n_full = T._Mirror(loc, src, neg), src.numel()
    sc = torch.rand(n_full, generator=g, dtype=DT) + 0.25
    return held, sc, torch.tensor([c_, hh, ww])


@pytest.mark.parametrize("layout", ["far_border", "own_corner", "shared_corners"])
@pytest.mark.parametrize("cols_kind", ["all", "one_channel", "one_entry", "outside"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale_to", [1e-140, 1.0, 1e140])
def test_lazy_bounds_bracket_the_gathered_norm_on_adversarial_windows(
        layout: str, cols_kind: str, seed: int, scale_to: float) -> None:
    """``_Lazy``'s lower and upper bounds (from the windows) bracket the norm bound of the
    gathered matrix, with no tolerance; its value is the gathered one's bits; and the
    gathered matrix is the rows placed on the grid, entry for entry (the windows' index)."""
    held, sc, grid = _lazy_case(layout, seed, scale_to)
    c_, hh, ww = grid.tolist()
    n_grid = c_ * hh * ww
    if cols_kind == "all":
        cols = None
    elif cols_kind == "one_channel":
        cols = torch.arange(hh * ww, 2 * hh * ww)
    elif cols_kind == "one_entry":
        cols = torch.tensor([n_grid - 1])  # the far corner's last channel
    else:  # columns no window reaches (the top-left entry of channel 0, windows elsewhere)
        cols = torch.tensor([0])
    gg, ee = T._columns(held, cols)
    dense_g, _ = T._columns(held, None)
    ref = dense_g if cols is None else dense_g[:, cols]
    assert torch.equal(gg, ref)
    eager = T._floor(T._norm_bound(gg, ee, None, sc))
    lazy = T._Deferred(T._Lazy(held, cols, sc), None)
    assert lazy.low <= eager <= lazy.high, (lazy.low, eager, lazy.high)
    assert lazy.value() == eager
    m = gg * sc[:, None]
    peak = float(m.abs().max())
    if peak > 0:
        assert lazy.low <= float(torch.linalg.svdvals(m / peak)[0]) * peak * (1 + 1e-12)


# ------------------------------------------------------------------ chunked transposed convs
def _wide_net(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A 2-input net whose grid has 4-6 channels, convolutions with at least 4 input channels
    per group (where the rows' transposed convolutions may run in chunks), stride, padding,
    dilation, groups, and max pooling."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    c, h, w = rng.choice([4, 5, 6]), rng.randint(4, 9), rng.randint(4, 9)
    first = nn.Linear(2, c * h * w)
    layers: list[nn.Module] = [first, nn.ReLU(), Grid((c, h, w))]
    for _ in range(rng.randint(1, 3)):
        k, s, d = rng.randint(2, 3), rng.randint(1, 3), rng.choice([1, 1, 2])
        p = rng.randint(0, k - 1)
        ho, wo = _out(h, k, s, p, d), _out(w, k, s, p, d)
        if ho < 1 or wo < 1:
            continue
        groups = rng.choice([q for q in (1, 2) if c % q == 0])
        co = rng.choice([4, 6]) if groups == 1 else rng.choice([4, 6, 8])
        layers += [nn.Conv2d(c, co, k, s, p, dilation=d, groups=groups), nn.ReLU()]
        if rng.random() < 0.3 and ho >= 2 and wo >= 2:
            ps = rng.choice([1, 2])
            layers.append(nn.MaxPool2d(2, ps))
            ho, wo = _out(ho, 2, ps, 0), _out(wo, 2, ps, 0)
        c, h, w = co, ho, wo
    layers.append(nn.Flatten())
    body = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        n = body(torch.zeros(1, 2, dtype=DT)).numel()
    net = nn.Sequential(*body, nn.Linear(n, 3)).to(DT).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=DT))
        if rng.random() < 0.5:
            q = rng.randint(1, 3)
            for i in range(first.weight.shape[0]):
                first.weight[i] = first.weight[i % q]
            first.bias.zero_()
    x0 = torch.zeros(1, 2, dtype=DT) if rng.random() < 0.4 else \
        torch.randn(1, 2, generator=g, dtype=DT)
    return net, x0


def test_chunked_transposed_convolutions_sound_and_same_bits(monkeypatch) -> None:
    """With chunks forced small (:data:`lipbound.ops.conv_transpose.CHUNK_BYTES` 1 KiB, two
    rows at least), the rows' transposed convolutions run in chunks inside the tight bound;
    the values are those of the unchunked bound (to 1e-12 relative: another summation order)
    and above the rays' lower bound, whole network and hybrid."""
    import lipbound.ops.conv_transpose as ct

    chunked = []
    real = ct.chunk_rows

    def spy(*a, **k):
        out = real(*a, **k)
        chunked.append(out)
        return out

    monkeypatch.setattr(ct, "chunk_rows", spy)
    for seed in (10, 16, 28, 38):  # (seeds where the chunks run)
        net, x0 = _wide_net(seed)
        for eps in (0.5, 3.0):
            lower = ray_lower(net, x0, eps, n_angles=360)
            vals = []
            for cb, least in ((ct.CHUNK_BYTES, ct.MIN_ROWS), (1024, 2)):
                monkeypatch.setattr(ct, "CHUNK_BYTES", cb)
                monkeypatch.setattr(ct, "MIN_ROWS", least)
                an = Analyzer(net, (2,), spectral="exact")
                vals.append([an.local_bound(x0, eps, tight=True, tight_rows=r).value
                             for r in (2048, 7)])
            # (the chunks sum each entry's products in another order, within the same γ_n:
            # the campaign saw 1.7e-16 relative at most, bits mostly the same)
            assert vals[1] == pytest.approx(vals[0], rel=1e-12, abs=0.0), (seed, eps, vals)
            assert all(lower <= v for v in vals[1]), (seed, eps, lower, vals)
    assert any(c > 0 for c in chunked)  # (the chunks ran)


# ------------------------------------------------------------------ exact constants at kinks
@pytest.mark.parametrize("seed", [0, 5, 11, 23, 37, 55])
def test_tight_at_least_the_exact_constant_of_homogeneous_nets_at_zero(seed: int) -> None:
    """Every bias 0 and ``x0 = 0``: every unit is exactly at 0 at ``x0`` and every pooling
    window tied (each unit unstable at every radius), and the net is positively homogeneous,
    ``f(t u) = t f(u)``, so the local constant at *every* radius is exactly
    ``max_{||u|| = 1} ||f(u)||`` (per row ``max |f_i(u)|``), here over 20000 directions of
    the plane (a lower bound on it, each value less 1e-12 relative for rounding). The tight
    bound (matrix and per row; whole network and hybrid) must be at least that, at radii
    from 1e-12 to 1e3."""
    net, _ = _two_input_net(seed)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        x0 = torch.zeros(1, 2, dtype=DT)
        assert float(net(x0).abs().max()) == 0.0
        th = torch.arange(20000, dtype=DT) * (2 * math.pi / 20000)
        y = net(torch.stack([th.cos(), th.sin()], 1))
    exact = float(y.norm(dim=1).max()) * (1 - 1e-12)
    exact_rows = y.abs().amax(dim=0) * (1 - 1e-12)
    an = Analyzer(net, (2,), spectral="exact")
    c = torch.eye(y.shape[1], dtype=DT)
    for eps in (1e-12, 1e-3, 1.0, 1e3):
        for rows in (2048, 3, 1):
            assert an.local_bound(x0, eps, tight=True, tight_rows=rows).value >= exact
            per_row = an.local_bound_rows(x0, eps, c, tight=True, tight_rows=rows).values
            assert bool((per_row >= exact_rows).all()), (seed, eps, rows)


@pytest.mark.parametrize("seed", [2, 4, 8, 16])
def test_tight_at_least_the_jacobian_norm_at_tiny_radii(seed: int) -> None:
    """At a generic ``x0`` (random, no unit at 0, no tie) the net is differentiable and its
    local constant at any radius is at least ``||J(x0)||`` (the ratio along the top right
    singular vector tends to it): at radii 1e-14 .. 1e-8, where the ray sampling is lost in
    rounding, the tight bound must be at least ``||J(x0)||`` (1e-12 relative below it for the
    Jacobian's own rounding)."""
    net, _ = _two_input_net(seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 2, generator=g, dtype=DT)
    jac = torch.autograd.functional.jacobian(lambda z: net(z)[0], x0).reshape(-1, 2)
    jn = float(torch.linalg.svdvals(jac)[0]) * (1 - 1e-12)
    an = Analyzer(net, (2,), spectral="exact")
    for eps in (1e-14, 1e-11, 1e-8):
        for rows in (2048, 2):
            assert an.local_bound(x0, eps, tight=True, tight_rows=rows).value >= jn


# ------------------------------------------------------------------ bad input
def test_radius_functions_check_tight_rows_naming_the_fix() -> None:
    """``certified_radius(..., tight=True, tight_rows=N)`` (the option of ``local_bound``)
    went on to ``Analyzer(...)`` and raised a bare ``TypeError`` about
    ``Analyzer.__init__``; session 23 refused it with an :class:`lipbound.errors.InputError`,
    session 24 takes it (the budget of every tight bound of the search): a bad budget, or one
    without ``tight=True``, is an InputError naming the fix, with or without an analyzer, for
    both radius functions (tests/test_tight_rows_and_sweep_radii.py checks what the budget does)."""
    from lipbound.errors import InputError
    from lipbound.radius import certified_radii

    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT).eval()
    x0 = torch.zeros(1, 2, dtype=DT)
    an = Analyzer(net, (2,))
    for call in (lambda: certified_radius(net, x0, tight=True, tight_rows=0),
                 lambda: certified_radius(None, x0, analyzer=an, tight=True, tight_rows=-5),
                 lambda: certified_radii(net, x0, methods=("local",), tight=True,
                                         tight_rows=2.5)):
        with pytest.raises(InputError, match="tight_rows must be an integer >= 1"):
            call()
    with pytest.raises(InputError, match="pass tight=True.*drop tight_rows"):
        certified_radius(net, x0, tight_rows=5)
