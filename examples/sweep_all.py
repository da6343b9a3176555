"""Run the eps sweep of Avant & Morgansen (IEEE TNNLS 2023) for every zoo network and sample.

For each zoo network and each of its shipped sample inputs, computes the local and global
upper bounds and the random / gradient-ascent / PGD lower bounds over the network's radius
range (``ZooEntry.eps_range``, log-spaced) and writes, under ``OUT/<model>/<sample>/``,
``sweep.csv``, ``sweep.json``, ``sweep.png`` and ``sweep.pdf``.

AlexNet and VGG-16 are large (VGG-16's local bound is the paper's one-hour case on a GPU);
``--quick`` gives them fewer radii and smaller lower-bound budgets.

Usage:
    python examples/sweep_all.py --out out/sweeps
    python examples/sweep_all.py --out out/sweeps --models mnist,cifar10 --points 30
    python examples/sweep_all.py --out out/sweeps --quick --device cuda
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from lipbound import zoo
from lipbound.cli.sweep import DISPLAY_NAMES, random_weights
from lipbound.inputs import load_sample
from lipbound.sweep import DEFAULT_METHODS, default_eps_range, parse_methods, sweep

BIG = ("alexnet", "vgg16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/sweeps", help="output folder")
    p.add_argument("--models", default=",".join(zoo.model_names()),
                   help="comma-separated zoo names (default: all)")
    p.add_argument("--points", type=int, default=30, help="radii per sweep")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--samples", type=int, default=10_000, help="random-sampling budget")
    p.add_argument("--steps", type=int, default=100, help="gradient / PGD steps")
    p.add_argument("--restarts", type=int, default=16, help="PGD restarts")
    p.add_argument("--quick", action="store_true",
                   help="AlexNet/VGG-16: 6 radii, 500 samples, 20 steps, 4 restarts")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    methods = parse_methods(args.methods)
    out = Path(args.out)
    failures = 0
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        lm = zoo.load_model(name, device=device)
        quick = args.quick and name in BIG
        points = min(args.points, 6) if quick else args.points
        budget = {"samples": 500, "steps": 20, "restarts": 4} if quick else \
            {"samples": args.samples, "steps": args.steps, "restarts": args.restarts}
        notes = () if lm.trained else (f"{name}: {lm.weights_source}",)
        for ref in lm.entry.samples:
            sample = load_sample(ref, entry=lm.entry)
            t0 = time.perf_counter()
            res = sweep(lm.model, sample.x.to(device), default_eps_range(name, points),
                        methods, name=name, input_name=ref, notes=notes, progress=True, **budget)
            folder = out / name / re.sub(r"[^A-Za-z0-9_.-]+", "_", ref)
            res.to_csv(folder / "sweep.csv")
            res.to_json(folder / "sweep.json")
            title = f"{DISPLAY_NAMES.get(name, name)}, input {ref}" + \
                (" (random weights)" if random_weights(lm.weights_source) else "")
            res.plot(folder / "sweep.png", folder / "sweep.pdf", title=title)
            bad = res.violations()
            failures += len(bad)
            print(f"{name:8s} {ref:16s} {points:3d} radii  {time.perf_counter() - t0:8.1f} s  "
                  f"-> {folder}" + (f"  SOUNDNESS CHECK FAILED: {bad}" if bad else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
