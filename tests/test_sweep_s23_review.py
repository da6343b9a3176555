"""Session 23 adversarial review of the eps sweep (:mod:`lipbound.sweep`, ``lipbound sweep``,
:mod:`lipbound.plotting`) and of the probabilistic bookkeeping behind it.

Checked against independent references: dense ray sampling of tiny 2-D-input networks (the
local constant relative to ``x0``), fresh single bounds (a reused factor bounds a dominating
operator), the count of a layer's probabilistic computations (the union bound of a reused
factor), and exact CSV / JSON round trips. Defects found in this review have a test here
that fails on the code before the fix (said in its docstring)."""

from __future__ import annotations

import json

import pytest
import torch

from lipbound import Guarantee
from lipbound.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _stated(text: str, marker: str = "p_fail<=") -> list[float]:
    """Every number that follows ``marker`` in ``text``."""
    out = []
    for part in text.split(marker)[1:]:
        num = ""
        for ch in part:
            if ch.isdigit() or ch in ".e-+":
                num += ch
            else:
                break
        out.append(float(num))
    return out


# ------------------------------------------------------------------ CLI: failure probability
def test_cli_sweep_states_the_failure_probability_of_probabilistic_bounds(tmp_path, capsys):
    """Defect (fails before the fix): ``lipbound sweep`` printed "local: probabilistic upper
    bound" with no failure probability anywhere in its terminal output (``lipbound bound``
    and ``lipbound layers`` state ``p_fail<=...``): a reader of the table could not tell
    how likely a printed bound is to fail. Now every method with a probabilistic point says
    the largest failure probability of its points, rounded up; the JSON agrees."""
    out = tmp_path / "sw"
    rc = main(["sweep", "--model", "mnist", "--input", "mnist:8", "--eps-min", "0.01",
               "--eps-max", "1", "--points", "2", "--methods", "local,global",
               "--spectral", "lanczos", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    d = json.loads((out / "sweep.json").read_text())
    line = next(t for t in text.splitlines() if t.startswith("guarantees:"))
    for m in ("local", "global"):
        fps = [r[m]["failure_prob"] for r in d["rows"]
               if r[m]["guarantee"] == Guarantee.PROBABILISTIC.value]
        assert fps, m  # (Lanczos forced on MNIST: probabilistic factors)
        part = line.split(f"{m}: ")[1].split(", ")[0] if m == "local" else \
            line.split(f"{m}: ")[1]
        stated = _stated(part)
        assert len(stated) == 1, (m, line)
        assert stated[0] >= max(fps)
