"""The sweep's ``"tight"`` curve: ``local_bound(..., tight=True)`` at every radius."""

from __future__ import annotations

import csv
import json

import torch
from torch import nn

from lipbound import Analyzer
from lipbound.cli import main as cli_main
from lipbound.lower import best_lower_bound
from lipbound.sweep import ALL_METHODS, DEFAULT_METHODS, sweep

EPS = [1e-3, 1e-2, 0.1, 1.0, 30.0]


def _net() -> nn.Sequential:
    """A small conv net (ReLU, max pooling) in float64."""
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


X0 = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def test_tight_curve_is_below_the_paper_and_above_every_lower_bound(tmp_path) -> None:
    m = _net()
    assert "tight" in ALL_METHODS and "tight" not in DEFAULT_METHODS  # (opt-in)
    res = sweep(m, X0, EPS, methods="local,tight,global,best", spectral="exact", samples=64,
                steps=10, restarts=2, seed=0)
    assert res.violations() == []
    an = Analyzer(m, (1, 6, 6), spectral="exact")
    formed = 0
    for r in res.rows:
        t, loc = r["tight"], r["local"]
        assert t.guarantee.is_upper_bound and t.value <= loc.value  # (the same exact factors)
        # the value of a fresh tight local bound on its own analyzer
        assert t.value == an.local_bound(X0, r.eps, tight=True).value
        assert t.details["source"] in ("tight", "paper", "global")
        formed += t.details["source"] == "tight"
        if t.details["source"] != "tight":
            assert t.value == min(loc.value, r["global"].value)
        low = best_lower_bound(m, X0, r.eps, n_random=64, gradient_steps=10, pgd_restarts=2,
                               seed=1)
        assert low.value <= t.value
    assert res.settings["tight_formed"] == formed >= 1
    assert any(r["tight"].value < r["local"].value for r in res.rows)  # (a gain somewhere)
    # written out with the other curves
    doc = json.loads(res.to_json(tmp_path / "s.json").read_text())
    assert "tight" in doc["methods"]
    with open(res.to_csv(tmp_path / "s.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["tight_value"]) for row in rows] == res.values("tight")
    assert res.plot(tmp_path / "s.png") is not None


def test_cli_sweep_with_the_tight_curve(tmp_path, capsys) -> None:
    out = tmp_path / "sw"
    rc = cli_main(["sweep", "--model", "tiny", "--eps-min", "0.1", "--eps-max", "10",
                   "--points", "3", "--methods", "local,tight", "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert "tight" in doc["methods"]
    for row in doc["rows"]:
        t, loc = row["tight"], row["local"]
        assert t["guarantee"] == loc["guarantee"] == "certified upper bound"
        assert t["details"]["source"] in ("tight", "paper", "global")
        assert t["value"] <= loc["value"] or t["details"]["source"] != "tight"
