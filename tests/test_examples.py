"""The shipped example runs and labels what it prints: bounds as upper bounds, certified
radii as lower bounds (on the smallest class-changing perturbation)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "simple_example.py"


@pytest.mark.usefixtures("torch_one_thread")
def test_simple_example_labels_bounds_and_radii(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    bounds = [line for line in out if " bound" in line and "radius" not in line]
    radii = [line for line in out if line.startswith("certified radius")]
    assert bounds and radii
    assert all("upper bound" in line for line in bounds)
    assert all("lower bound" in line and "upper" not in line for line in radii)


@pytest.mark.usefixtures("torch_one_thread")
def test_radius_testsets_runs_and_counts_no_violation(capsys, tmp_path):
    """examples/radius_testsets.py on two MNIST test images with one attack (the full run,
    100 + 100 images and all attacks, takes minutes)."""
    mod = runpy.run_path(str(EXAMPLES / "radius_testsets.py"), run_name="radius_testsets")
    rc = mod["main"](["--models", "mnist", "--n", "2", "--attacks", "fgsm",
                      "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "== mnist: 2 test images" in out and "violations: 0" in out
    assert "violations in total: 0 (must be 0)" in out
    s = mod["summarise"](tmp_path / "mnist" / "radius.csv", ["local", "margin", "global"],
                         ["fgsm"])
    assert s["inputs"] == 2 and s["violations"] == 0 and s["failed_fgsm"] == 0
    assert s["min_margin_over_local"] >= 1.0  # the margin certificate is never smaller


@pytest.mark.usefixtures("torch_one_thread")
def test_sweep_all_runs_and_writes_its_files(capsys, tmp_path):
    """examples/sweep_all.py on the two small zoo networks with few radii and small
    lower-bound budgets (the full run, every network at 30 radii, takes hours on a CPU): it
    exits 0 (no lower bound above an upper bound) and writes the four files per sample."""
    mod = runpy.run_path(str(EXAMPLES / "sweep_all.py"), run_name="sweep_all")
    rc = mod["main"](["--out", str(tmp_path), "--models", "tiny,compnet", "--points", "3",
                      "--samples", "200", "--steps", "10", "--restarts", "2",
                      "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "SOUNDNESS CHECK FAILED" not in out
    for folder in (tmp_path / "tiny" / "tiny_x0", tmp_path / "compnet" / "compnet_zeros"):
        for name in ("sweep.csv", "sweep.json", "sweep.png", "sweep.pdf"):
            assert (folder / name).stat().st_size > 0
        rows = (folder / "sweep.csv").read_text().splitlines()
        assert len(rows) == 1 + 3  # header and one row per radius


@pytest.mark.usefixtures("torch_one_thread")
def test_resnet_example_bounds_its_sampled_ratios():
    """examples/resnet_cifar.py (the README's residual example): its factory gives an eval
    model, its input shape and mean 0 / std 1 (it normalises itself); the composed local bound
    of the float64 model is above the ratios at sampled points of the ball, and so is the
    global bound."""
    import torch

    import lipbound

    mod = runpy.run_path(str(EXAMPLES / "resnet_cifar.py"), run_name="resnet_cifar")
    info = mod["make"]()
    model = info["model"].double()
    assert not model.training and info["input_shape"] == (3, 32, 32)
    assert (info["mean"], info["std"]) == (0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((1, 3, 32, 32), generator=g, dtype=torch.float64)
    eps = 0.01
    res = lipbound.local_bound(model, x0, eps)
    assert res.method == "local-residual"
    d = torch.randn((64, 3, 32, 32), generator=g, dtype=torch.float64)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        ratio = ((model(x0 + d) - model(x0)).norm(dim=1) / eps).max().item()
    assert 0 < ratio <= res.value
    assert lipbound.global_bound(model, (3, 32, 32)).value >= ratio
