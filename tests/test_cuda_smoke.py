"""benchmarks/cuda_smoke.py, the script to run once a GPU is available, keeps working: its
CPU self-check (``--device cpu``: the same comparisons, CPU against CPU) passes every item.
A GPU run compares CUDA with the CPU; CI has none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SMOKE = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_smoke.py"


def test_cuda_smoke_self_check_passes_on_the_cpu():
    p = subprocess.run([sys.executable, str(SMOKE), "--device", "cpu", "--models", "mnist",
                        "--no-cli"], capture_output=True, text=True, timeout=600, check=False)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert out.rstrip().endswith("0 failure(s)")
    assert "FAIL" not in out
    # the paths the script covers, each reported
    for item in ("global bound CPU vs CUDA", "certified radius (margin)", "PGD attack",
                 "cw attack", "lower bounds", "sweep of 3 radii", "--spectral exact",
                 "output map", "rival methods", "float64 conv conv1", "bench on cpu",
                 "--spectral lanczos", "bound_many of 3 inputs",
                 # the small net: batch norm, average pooling, clamps; float32 and float64
                 "small net (float32): local bound (lanczos)", "small net (float64): tight rows",
                 "small net (float64): tight margin radius", "small net (float32): bound_many",
                 "sweep with tight and pgd", "compare (conv-to-FC rivals)"):
        assert item in out, item
