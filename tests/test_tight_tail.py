"""The hybrid tight bound (:mod:`lipbound.tight`, ``start > 0``): the paper's factors of the
blocks before a boundary ``j`` times the tight construction of the tail from ``j`` on, formed
when the whole network's vector-Jacobian rows exceed the budget.

Soundness against empirical lower bounds (no tolerance) at every boundary (forced with
``min_start`` / small budgets), never above the paper's product, the exact value on tails
that are affine in the ball (the head's factors times ``||J_tail||`` on the coordinates that
may move: catches a dropped head or another boundary's factors), the analyzer's report
(note, guarantee, failure probability) and the per-row form."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import build, conv_specs, fc_specs
from lipbound import Analyzer
from lipbound.lower import best_lower_bound
from lipbound.ops.base import product_up
from lipbound.results import Guarantee
from lipbound.tight import tight_local_bound
from test_tight import conv_net, empirical_lower, fc_net

DT = torch.float64


def deep_net(seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """Conv-ReLU, max pooling, conv-ReLU, FC-ReLU, FC: five blocks, four inner boundaries."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(),
                        nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return net.eval(), (1, 8, 8)


def _net(kind: str, seed: int):
    if kind.startswith("fc"):
        return fc_net(seed, int(kind[2]))
    return deep_net(seed) if kind == "deep" else conv_net(seed)


def _x0(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "tied":  # a constant image: conv outputs tie inside every pooling window
        return torch.full((1, *shape), float(torch.randn(1, generator=g)), dtype=DT)
    return torch.randn(1, *shape, generator=g, dtype=DT)


def _setup(an: Analyzer, x0: torch.Tensor, eps: float, output_map=None):
    key, blocks = an._blocks_for(output_map)
    rec: list = []
    x = x0.to(DT)
    _, bounds, _ = an._propagate(key, blocks, x, eps, record=rec)
    return blocks, x, rec, bounds


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000),
       kind=st.sampled_from(["fc2", "fc3", "conv", "tied", "deep"]),
       eps=st.sampled_from([1e-6, 0.03, 0.3, 3.0]), with_map=st.booleans())
@example(seed=4, kind="tied", eps=0.3, with_map=False)  # (tied windows: pooling deviations)
@example(seed=5, kind="deep", eps=3.0, with_map=True)
@example(seed=6, kind="conv", eps=3.0, with_map=False)
def test_hybrid_sound_at_every_boundary(seed: int, kind: str, eps: float,
                                        with_map: bool) -> None:
    """At every boundary j (forced: ``min_start=j``, that boundary alone) the hybrid is formed
    there, is at least every lower bound (no tolerance) and at most the paper's product; so is
    the smallest over the boundaries, and a budget of exactly the tail's rows starts the
    hybrid at the earliest boundary whose tail fits (the analyzer reports the smaller of it
    and the paper's product)."""
    event(f"{kind}, eps {eps}")
    net, shape = _net(kind, seed)
    x0 = _x0(kind, shape, seed)
    n_out = net(x0).shape[1]
    cm = torch.randn(2, n_out, generator=torch.Generator().manual_seed(seed + 2), dtype=DT) \
        if with_map else None
    an = Analyzer(net, shape, spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, eps, cm)
    paper = an.local_bound(x0, eps, output_map=cm).value
    assert paper == product_up(b.value for b in bounds)
    low = empirical_lower(net, x0, eps, seed, cm)
    full = tight_local_bound(blocks, x, eps, rec, bounds)
    assert full.value is not None and full.start == 0, full.reason
    full_alone = tight_local_bound(blocks, x, eps, rec, bounds, tail_starts=1)  # (B_0 only)
    assert full_alone.tail == 0 and full.value <= full_alone.value
    n_blocks = len(blocks)
    values = []
    for j in range(1, n_blocks):
        out = tight_local_bound(blocks, x, eps, rec, bounds, min_start=j, tail_starts=1)
        assert out.value is not None, out.reason
        assert out.start == out.tail == j
        assert out.rows == blocks[-1].out_dim + sum(full.unstable[j:])
        assert out.value >= low, (j, out.value, low, paper)
        assert out.value <= paper * (1 + 1e-12), (j, out.value, paper)
        values.append(out.value)
    every = tight_local_bound(blocks, x, eps, rec, bounds, min_start=1)
    assert every.value == min(values) and every.tail == 1 + values.index(min(values))
    # budgets: exactly the rows of the tail from each boundary
    for j in range(n_blocks):
        budget = blocks[-1].out_dim + sum(full.unstable[j:])
        out = tight_local_bound(blocks, x, eps, rec, bounds, max_rows=budget)
        first = min(i for i in range(n_blocks)
                    if blocks[-1].out_dim + sum(full.unstable[i:]) <= budget)
        assert out.start == first
        assert out.value >= low
        res = an.local_bound(x0, eps, output_map=cm, tight=True, tight_rows=budget)
        assert res.value == min(out.value, paper) <= paper
        assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0
        if first == 0:  # the whole network fits: the same bound (the whole network's or a
            # later boundary's hybrid, whichever is smaller: both are tried)
            assert out.value == full.value and out.tail == full.tail
            assert out.value == min(full_alone.value, *values)


def _affine_tail_case(seed: int, hidden: int = 3):
    """An FC net whose layers each scale by about 3-6 (every factor far from 1), a generic x0
    and a tiny radius: every unit is stable, so each tail is affine in the ball."""
    g = torch.Generator().manual_seed(seed)
    widths = [3] + [int(torch.randint(3, 6, (1,), generator=g)) for _ in range(hidden)] + [2]
    layers: list[nn.Module] = []
    for i in range(hidden + 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=DT) * 3.0)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=DT))
        layers += [lin, nn.ReLU()] if i < hidden else [lin]
    net = nn.Sequential(*layers).to(DT).eval()
    x0 = torch.randn(1, 3, generator=g, dtype=DT)
    return net, x0


@pytest.mark.parametrize("seed", range(6))
def test_hybrid_is_head_factors_times_the_tail_jacobian(seed: int) -> None:
    """Tails affine in the ball: the hybrid at boundary j is ``F_0 ... F_(j-1)`` (the
    analyzer's own factors) times ``||J_tail(z_j(x0)) I_M||`` (autograd Jacobian of the layers
    from j on, restricted to the coordinates active at x0), up to its rounding margins and
    never below. Catches a dropped head, the factors of another boundary (every factor is
    far from 1) and columns not restricted to the coordinates that may move."""
    net, x0 = _affine_tail_case(seed)
    eps = 1e-9
    an = Analyzer(net, (3,), spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, eps)
    factors = [lf.local for lf in an.local_bound(x0, eps).layers]
    assert all(f > 1.5 or f < 0.67 for f in factors), factors  # (the case)
    n_blocks = len(blocks)
    for j in range(1, n_blocks):
        out = tight_local_bound(blocks, x, eps, rec, bounds, min_start=j, tail_starts=1)
        assert out.value is not None and out.tail == j, out.reason
        assert sum(out.unstable) == 0
        z = net[:2 * j](x0)  # boundary j: after the j-th ReLU
        tail = net[2 * j:]
        jac = torch.autograd.functional.jacobian(lambda v, t=tail: t(v), z).reshape(-1,
                                                                                     z.numel())
        live = (z.reshape(-1) > 0).nonzero().reshape(-1)
        jn = float(torch.linalg.matrix_norm(jac[:, live], 2))
        expected = math.prod(factors[:j]) * jn
        assert out.value >= expected, (j, out.value, expected)
        assert out.value <= expected * (1 + 1e-6), (j, out.value, expected)


def test_analyzer_reports_the_hybrid_with_the_papers_guarantee() -> None:
    """The shipped LeNet at eps = 1 (6228 rows, over the budget of 2048; the paper's product
    was reported): the hybrid is reported below the paper's product with a note naming the
    boundary and the whole network's row count, under exactly the paper's guarantee and
    failure probability (the Lanczos route: probabilistic); the per-layer table stays the
    paper's. The notes keep the prefix that the sweep and the radius search match."""
    from lipbound._rounding import g_up
    from lipbound.inputs import load_sample
    from lipbound.zoo import load_model

    lm = load_model("mnist")
    x0 = load_sample("mnist:8", entry=lm.entry).x
    an = Analyzer(lm.model, (1, 28, 28))
    plain = an.local_bound(x0, 1.0)
    res = an.local_bound(x0, 1.0, tight=True)
    assert plain.guarantee == Guarantee.PROBABILISTIC  # (the case)
    assert res.value < 0.9 * plain.value
    assert res.guarantee == plain.guarantee and res.failure_prob == plain.failure_prob
    assert [lf.local for lf in res.layers] == [lf.local for lf in plain.layers]
    note = next(n for n in res.notes if n.startswith("tight bound ("))
    assert "tail from block 4 (fc1+relu3)" in note and "exceed the budget of 2048" in note
    # (the note's upper bounds rounded up: lipbound._rounding.g_up)
    assert f"{g_up(res.value, 6)} reported" in note and g_up(plain.value, 6) in note


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["conv", "deep"]),
       eps=st.sampled_from([0.03, 0.3, 3.0]))
def test_per_row_hybrid_sound_and_matches_single_rows(seed: int, kind: str,
                                                      eps: float) -> None:
    """Per-row hybrid (``row_last``): at every boundary each row's value is at least the
    lower bound of its scalar function (no tolerance), at most its paper row value, and
    within 1e-6 of the single-row matrix path's hybrid at the same boundary; through
    ``local_bound_rows(..., tight=True, tight_rows=small)`` no row gets worse."""
    net, shape = _net(kind, seed)
    x0 = _x0(kind, shape, seed)
    n_out = net(x0).shape[1]
    cm = torch.randn(2, n_out, generator=torch.Generator().manual_seed(seed + 3), dtype=DT)
    an = Analyzer(net, shape, spectral="exact")
    paper_rows = an.local_bound_rows(x0, eps, cm)
    key, blocks = an._blocks_for(cm)
    rec: list = []
    x = x0.to(DT)
    _, bounds, _ = an._propagate(key, blocks, x, eps, stop_before_last=True, record=rec)
    rb_last = _row_last(paper_rows)
    lows = [best_lower_bound(net, x0, eps, seed=seed, output_map=cm[i:i + 1], n_random=64,
                             gradient_steps=10, pgd_restarts=2, pgd_steps=10).value
            for i in range(2)]
    for j in range(1, len(blocks)):
        out = tight_local_bound(blocks, x, eps, rec, bounds, row_last=rb_last, min_start=j,
                                tail_starts=1)
        assert out.row_values is not None, out.reason
        for i in range(2):
            v = out.row_values[i]
            assert v >= lows[i], (j, i, v, lows[i])
            assert v <= float(paper_rows.values[i]) * (1 + 1e-8)  # (row_last widened)
            b1, x1, rec1, bounds1 = _setup(an, x0, eps, cm[i:i + 1])
            single = tight_local_bound(b1, x1, eps, rec1, bounds1, min_start=j, tail_starts=1)
            assert math.isclose(v, single.value, rel_tol=1e-6), (j, i, v, single.value)
    small = an.local_bound_rows(x0, eps, cm, tight=True, tight_rows=2)
    assert bool((small.values <= paper_rows.values).all())
    assert small.guarantee == paper_rows.guarantee


def _row_last(rb) -> list[float]:
    """Upper bounds on the rows' last factors ``||c_i^T A D||``: the paper's row values over
    the product of the shared factors (the analyzer's certified norms, rounded), widened."""
    prefix = product_up(lf.local for lf in rb.prefix)
    return [float(v) / prefix * (1 + 1e-9) for v in rb.values]


@settings(max_examples=10, deadline=None)
@given(spec=st.one_of(fc_specs(max_width=8), conv_specs()))
def test_hybrid_sound_on_varied_nets(spec: dict) -> None:
    """The shared random nets of the core tests (folded batch norm and normalisation,
    products of layers, strides, dilation, groups, average pooling, padded max pooling (a
    fallback wherever it sits)): the hybrid at every boundary, when formed, is above the
    empirical lower bound (no tolerance) and not above the paper's product."""
    model, shape, x0 = build(spec)
    eps = spec["eps"]
    an = Analyzer(model, shape, spectral="exact")
    blocks, x, rec, bounds = _setup(an, x0, eps)
    paper = product_up(b.value for b in bounds)
    low = None
    formed = 0
    for j in range(1, len(blocks)):
        out = tight_local_bound(blocks, x, eps, rec, bounds, min_start=j, tail_starts=1)
        if out.value is None:
            continue
        if low is None:  # (the library's lower bounds only: cheaper)
            low = best_lower_bound(model, x0, eps, seed=spec["seed"] % 1000, n_random=64,
                                   gradient_steps=10, pgd_restarts=2, pgd_steps=10).value
        formed += 1
        assert out.value >= low, (j, out.value, low, paper)
        assert out.value <= paper * (1 + 1e-12)
    event(f"hybrid formed at {formed} of {len(blocks) - 1} boundaries")


def test_whole_network_competes_with_later_hybrids_on_mnist() -> None:
    """Where the whole network's rows fit, the hybrids from later boundaries are formed too
    and the smallest is reported (session 20; before, only the whole network's B_0): on the
    MNIST LeNet at eps = 0.1 the tail from conv2 is below the whole network's bound, and the
    value is still above the library's lower bound."""
    from lipbound.inputs import load_sample
    from lipbound.zoo import load_model

    lm = load_model("mnist")
    x0 = load_sample("mnist:8", entry=lm.entry).x
    an = Analyzer(lm.model, tuple(x0.shape[1:]), spectral="exact")
    eps = 0.1
    blocks, x, rec, bounds = _setup(an, x0, eps)
    alone = tight_local_bound(blocks, x, eps, rec, bounds, tail_starts=1)
    both = tight_local_bound(blocks, x, eps, rec, bounds)
    hybrids = [tight_local_bound(blocks, x, eps, rec, bounds, min_start=j, tail_starts=1).value
               for j in range(1, len(blocks))]
    assert alone.start == both.start == 0 and alone.tail == 0
    assert both.value == min(alone.value, *hybrids) < alone.value
    res = an.local_bound(x0, eps, tight=True)
    assert res.value == both.value and res.source == "tight"
    assert any("smallest with the paper's factors before block" in n for n in res.notes)
    low = best_lower_bound(lm.model, x0, eps, seed=0, n_random=64, gradient_steps=10,
                           pgd_restarts=2, pgd_steps=10).value
    assert res.value >= low
