"""The shipped example runs and labels what it prints: bounds as upper bounds, certified
radii as lower bounds (on the smallest class-changing perturbation)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "simple_example.py"


@pytest.mark.usefixtures("torch_one_thread")
def test_simple_example_labels_bounds_and_radii(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    bounds = [line for line in out if " bound" in line and "radius" not in line]
    radii = [line for line in out if line.startswith("certified radius")]
    assert bounds and radii
    assert all("upper bound" in line for line in bounds)
    assert all("lower bound" in line and "upper" not in line for line in radii)
