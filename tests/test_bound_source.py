"""``BoundResult.source`` says which bound a local bound's value is (the paper's product, the
global bound, or the tight bound); the sweep and the radius search read it instead of
matching note texts."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from core_helpers import all_active_net
from lipbound import Analyzer
from lipbound.results import Guarantee

DT = torch.float64


def test_source_names_the_reported_bound() -> None:
    net, x0 = all_active_net()
    an = Analyzer(net, (2,), spectral="lanczos")
    first = an.local_bound(x0, 0.3)  # no global bound computed yet: the product
    assert first.source == "product"
    assert first.value >= math.prod(lf.local for lf in first.layers)
    gb = an.global_bound()
    assert gb.source == "global"
    plain = an.local_bound(x0, 0.3)
    assert plain.source == "global" and plain.value == gb.value
    assert any(n.startswith("the global bound was smaller") for n in plain.notes)
    tight = an.local_bound(x0, 0.3, tight=True)
    assert tight.source == "tight" and tight.value < plain.value
    assert any(n.startswith("tight bound (") and "and the global bound" in n
               for n in tight.notes)
    assert not any(n.startswith("the global bound was smaller") for n in tight.notes)
    assert tight.guarantee == Guarantee.PROBABILISTIC
    for r in (first, gb, plain, tight):
        assert json.loads(json.dumps(r.to_dict()))["source"] == r.source


def test_source_is_product_when_the_tight_bound_is_not_formed() -> None:
    """A row budget below the outputs: no tight bound (not even a tail); the product is
    reported and says so."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT).eval()
    an = Analyzer(net, (3,), spectral="exact")
    x0 = torch.randn(1, 3, dtype=DT)
    plain = an.local_bound(x0, 0.5)
    r = an.local_bound(x0, 0.5, tight=True, tight_rows=1)
    assert plain.source == "product" and r.source == "product"
    assert r.value == plain.value
    assert any(n.startswith("tight bound not formed") and "the paper's product" in n
               for n in r.notes)
    ok = an.local_bound(x0, 0.5, tight=True)
    assert ok.source == ("tight" if ok.value < plain.value else "product")
