"""Per-row tight bounds (``Analyzer.local_bound_rows(..., tight=True)``) and the margin
certificate built on them (``certified_radius(..., method="margin", tight=True)``).

Each row's value must bound the local constant of its scalar function ``C[i] f`` (checked
against empirical lower bounds, no tolerance), never exceed the paper's row value, and
agree with the single-row tight bound computed through the matrix path
(``local_bound(..., output_map=C[i:i+1], tight=True)``, an independent route through the
same mathematics)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lipbound import Analyzer
from lipbound.radius import certified_radius
from test_tight import SETTINGS, conv_net, empirical_lower, fc_net

DT = torch.float64


def _margin_rows(n_out: int, c: int) -> torch.Tensor:
    rows = [j for j in range(n_out) if j != c]
    m = torch.zeros(len(rows), n_out, dtype=DT)
    for i, j in enumerate(rows):
        m[i, c], m[i, j] = 1.0, -1.0
    return m


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["fc2", "conv", "tied"]),
       eps=st.sampled_from([1e-6, 0.03, 0.3, 3.0]))
def test_row_bounds_are_sound_below_the_paper_and_match_single_rows(seed, kind, eps):
    net, shape = conv_net(seed) if kind != "fc2" else fc_net(seed, 2)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.full((1, *shape), 0.3, dtype=DT) if kind == "tied" else \
        torch.randn(1, *shape, generator=g, dtype=DT)
    n_out = net(x0).shape[1]
    cm = _margin_rows(n_out, int(net(x0).argmax()))
    an = Analyzer(net, shape, spectral="exact")
    paper = an.local_bound_rows(x0, eps, cm)
    rb = an.local_bound_rows(x0, eps, cm, tight=True)
    assert rb.guarantee == paper.guarantee and rb.failure_prob == paper.failure_prob
    assert bool((rb.values <= paper.values).all())
    assert torch.equal(rb.nominal_error, paper.nominal_error)
    assert len(rb.notes) == 1 and rb.notes[0].startswith("tight bound")
    for i in range(cm.shape[0]):
        row = cm[i:i + 1]
        single = an.local_bound(x0, eps, output_map=row, tight=True).value
        v = float(rb.values[i])
        # both are upper bounds of the same row's constant, through different norm code
        assert v <= single * (1 + 1e-6) + 1e-12 and single <= v * (1 + 1e-6) + 1e-12
        assert empirical_lower(net, x0, eps, seed, row) <= v


def test_row_bounds_gain_on_the_tied_windows_of_a_constant_image():
    net, shape = conv_net(7)
    x0 = torch.full((1, *shape), 0.3, dtype=DT)
    cm = _margin_rows(3, int(net(x0).argmax()))
    an = Analyzer(net, shape, spectral="exact")
    paper = an.local_bound_rows(x0, 1e-3, cm).values
    tight = an.local_bound_rows(x0, 1e-3, cm, tight=True).values
    assert bool((tight < paper).any())


def test_row_budget_falls_back_to_the_paper_rows():
    net, shape = conv_net(3)
    x0 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    cm = _margin_rows(3, int(net(x0).argmax()))
    an = Analyzer(net, shape, spectral="exact")
    paper = an.local_bound_rows(x0, 0.3, cm).values
    rb = an.local_bound_rows(x0, 0.3, cm, tight=True, tight_rows=1)
    assert torch.equal(rb.values, paper)
    assert "budget" in rb.notes[0] and "not formed" in rb.notes[0]
    with pytest.raises(Exception, match="tight"):
        an.local_bound_rows(x0, 0.3, cm, tight="yes")


def test_margin_radius_with_tight_rows_is_certified_and_not_smaller():
    """The tight margin radius holds (no class change at points sampled on and inside its
    sphere, nor along the gradient of each rival margin) and is at least the paper's."""
    net, shape = conv_net(11)
    x0 = torch.full((1, *shape), 0.3, dtype=DT)
    x0 = x0 + 0.05 * torch.randn(1, *shape, generator=torch.Generator().manual_seed(5),
                                 dtype=DT)
    paper = certified_radius(net, x0, method="margin", spectral="exact")
    tight = certified_radius(net, x0, method="margin", spectral="exact", tight=True)
    assert tight.radius >= paper.radius * (1 - 2e-3)
    r = tight.radius
    assert r > 0
    c = int(net(x0).argmax())
    g = torch.Generator().manual_seed(9)
    d = torch.randn(4000, x0.numel(), generator=g, dtype=DT)
    d = d / d.norm(dim=1, keepdim=True) * r * torch.rand(4000, 1, generator=g, dtype=DT) ** 0.1
    with torch.no_grad():
        assert bool((net(x0 + d.reshape(-1, *shape)).argmax(dim=1) == c).all())
