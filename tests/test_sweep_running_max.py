"""Lower bounds in a sweep are running maxima over the radii: ``L(x0, eps)`` is
non-decreasing in ``eps``, so a witness found at a smaller radius is reported (with its
value, its witness and the radius it came from) at every larger radius where the method
itself found less."""

from __future__ import annotations

import json

import torch
from torch import nn

from lipbound.lower import ratio_at
from lipbound.sweep import sweep

X0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
# a budget small enough for gradient ascent to find less at some larger radii
EPS = [0.1 * 1.5 ** k for k in range(12)]


def _net() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 3)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


def test_lower_bounds_never_fall_as_eps_grows(tmp_path):
    # (was: gradient ascent 19.97 at eps=1.14, then 12.35 at eps=1.71 and 8.28 at 3.84)
    m = _net()
    # the radii out of order and one given twice: the running maximum is over radii
    eps = EPS[::-1] + [EPS[4]]
    res = sweep(m, X0, eps, methods=("random", "gradient"), samples=16, steps=3, seed=0)
    for meth in ("random", "gradient"):
        # the curves the plot draws, in increasing eps, never fall
        by_eps = sorted(zip(res.eps, res.values(meth), strict=True))
        assert all(a[1] <= b[1] for a, b in zip(by_eps, by_eps[1:], strict=False))
    carried = 0
    for meth in ("random", "gradient"):
        own = {}  # radius -> the value the method found there
        for r in res.rows:
            pt = r[meth]
            own[r.eps] = pt.details.get("own_value", pt.value)
        for r in res.rows:
            pt = r[meth]
            # the reported value is the best of the radii up to this one
            assert pt.value == max(v for e, v in own.items() if e <= r.eps)
            # and attained by its witness, inside this row's ball (and the one it came from)
            assert pt.witness is not None
            dist = float(torch.linalg.vector_norm(pt.witness - X0))
            assert 0 < dist <= r.eps
            assert pt.value <= ratio_at(m, X0, pt.witness)
            if "from_eps" in pt.details:
                carried += 1
                assert pt.details["from_eps"] < r.eps and dist <= pt.details["from_eps"]
                assert pt.details["own_value"] < pt.value
                assert pt.details["witness_distance"] == dist
    assert carried > 0  # (the case this test is about happened)
    assert any("smaller radius" in n for n in res.notes)
    # JSON and CSV report the carried values
    d = json.loads(res.to_json(tmp_path / "s.json").read_text())
    for row, r in zip(d["rows"], res.rows, strict=True):
        assert row["gradient"]["value"] == r["gradient"].value
        assert ("from_eps" in row["gradient"]["details"]) == ("from_eps" in r["gradient"].details)
    lines = res.to_csv(tmp_path / "s.csv").read_text().splitlines()[1:]
    col = res.columns().index("gradient_value")
    assert [float(x.split(",")[col]) for x in lines] == res.values("gradient")
