"""Certified radii vs attack radii on the shipped MNIST and CIFAR-10 test images.

For each of the first ``--n`` test images (100 shipped per data set) this runs
``lipbound radius`` (local, margin and global certificates; Avant & Morgansen 2023 for the
first and last) and the attacks, writes ``OUT/<model>/radius.csv`` and
``OUT/<model>/radius.png``/``.pdf``, and prints:

* the number of violations (a certified radius above a verified attack radius: must be 0),
* the median certified and attack radii and the median ratio margin / local certificate,
* the time per image.

Usage::

    python examples/radius_testsets.py                       # 100 + 100 images, all attacks
    python examples/radius_testsets.py --models mnist --n 20 --attacks fgsm,pgd

Expect minutes per 100 images on a CPU, most of it in the attacks (C&W and PGD run many
forward and backward passes; the three certificates and FGSM took 0.7 s per CIFAR-10 image in
session 10; with all five attacks session 13 took 178 s for MNIST and 493 s for CIFAR-10 on a
2-core CPU, 220 s and 959 s while other jobs shared it); pass ``--device cuda`` on a GPU
machine.

A violation here is any certified radius above the smallest attack radius, stricter than
``lipbound radius`` itself, which does not count an attack point whose class change the
network in exact arithmetic does not make (float32 rounding, see docs/guarantees.md).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import time
from pathlib import Path

from lipbound.cli import main as lipbound_main


def _f(v: str) -> float | None:
    return float(v) if v not in ("", None) else None


def summarise(path: Path, methods: list[str], attacks: list[str]) -> dict:
    rows = list(csv.DictReader(path.open()))
    viol = 0
    ratios, gaps = [], []
    for r in rows:
        cert = max(_f(r[f"{m}_radius"]) or 0.0 for m in methods)
        atk = [_f(r[f"{a}_radius"]) for a in attacks]
        atk = [a for a in atk if a is not None]
        if atk and cert > min(atk):
            viol += 1
        if "margin" in methods and "local" in methods:
            lo, ma = _f(r["local_radius"]), _f(r["margin_radius"])
            if lo and lo > 0:
                ratios.append(ma / lo)
        if atk and cert > 0:
            gaps.append(min(atk) / cert)
    out = {"inputs": len(rows), "violations": viol,
           "seconds_per_input": statistics.mean(float(r["seconds"]) for r in rows)}
    for m in methods:
        out[f"median_{m}"] = statistics.median(_f(r[f"{m}_radius"]) for r in rows)
    for a in attacks:
        vals = [_f(r[f"{a}_radius"]) for r in rows if _f(r[f"{a}_radius"]) is not None]
        out[f"median_{a}"] = statistics.median(vals) if vals else math.nan
        out[f"failed_{a}"] = len(rows) - len(vals)
    if ratios:
        out["median_margin_over_local"] = statistics.median(ratios)
        out["min_margin_over_local"] = min(ratios)
    if gaps:
        out["median_attack_over_certified"] = statistics.median(gaps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mnist,cifar10")
    p.add_argument("--n", type=int, default=100, help="images per data set (1-100)")
    p.add_argument("--attacks", default="fgsm,ifgsm,gradient,cw,pgd")
    p.add_argument("--methods", default="local,margin,global")
    p.add_argument("--tol", default="1e-3")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="radius_testsets")
    args = p.parse_args(argv)
    if not 1 <= args.n <= 100:
        p.error("--n must be in 1..100")
    logging.getLogger("lipbound.cli.radius").setLevel(logging.INFO)  # one line per image
    methods = [m for m in args.methods.split(",") if m]
    attacks = [a for a in args.attacks.split(",") if a and a != "none"]
    total_viol = 0
    for model in [m for m in args.models.split(",") if m]:
        out = Path(args.out) / model
        t0 = time.perf_counter()
        rc = lipbound_main(["radius", "--model", model, "--input", f"{model}:test/0-{args.n - 1}",
                            "--methods", ",".join(methods), "--attacks",
                            ",".join(attacks) or "none", "--tol", args.tol, "--device",
                            args.device, "--out", str(out)])
        wall = time.perf_counter() - t0
        if rc not in (0, 1):
            return rc
        s = summarise(out / "radius.csv", methods, attacks)
        total_viol += s["violations"]
        print(f"\n== {model}: {s['inputs']} test images, {wall:.0f} s "
              f"({s['seconds_per_input']:.2f} s per image)")
        for k, v in s.items():
            print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"\nviolations in total: {total_viol} (must be 0)")
    return 1 if total_viol else 0


if __name__ == "__main__":
    sys.exit(main())
