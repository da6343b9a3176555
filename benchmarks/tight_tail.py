"""Measure the tight local bound where the whole network's rows exceed the budget (the hybrid
of lipbound.tight, session 19): values of the paper's product and of ``tight=True``, times,
rows and the tail's boundary. One thread. Run with this checkout's ``src`` on PYTHONPATH
(with an older checkout, ``tight=True`` reports the paper's product there).

    PYTHONPATH=src .venv/bin/python benchmarks/tight_tail.py [--alexnet]
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from lipbound import Analyzer
from lipbound.inputs import load_sample
from lipbound.zoo import load_model


def _case(name: str, model, shape, x0, eps: float) -> None:
    an = Analyzer(model, shape)
    t = time.perf_counter()
    plain = an.local_bound(x0, eps)
    tp = time.perf_counter() - t
    an2 = Analyzer(model, shape)  # (fresh: no remembered factors)
    t = time.perf_counter()
    res = an2.local_bound(x0, eps, tight=True)
    tt = time.perf_counter() - t
    note = next((n for n in res.notes if "tight bound" in n), "")
    rows = re.search(r"(\d+) VJP rows", note)
    tail = re.search(r"tail from block (\d+ \([^)]*\))", note)
    full = re.search(r"(\d+) rows of vector-Jacobian", note)
    print(f"| {name} | {eps:g} | {plain.value:.6g} | {res.value:.6g} | "
          f"{plain.value / res.value:.3f} | {tp:.2f} | {tt:.2f} | "
          f"{rows.group(1) if rows else '-'} | {full.group(1) if full else '-'} | "
          f"{tail.group(1) if tail else ('whole' if rows else 'not formed')} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alexnet", action="store_true", help="also AlexNet (seeded, 224x224)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| net | eps | paper | tight | gain | s paper | s tight | rows | whole rows | tail |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    lm = load_model("mnist")
    x0 = load_sample("mnist:8", entry=lm.entry).x
    for eps in (0.1, 0.3, 1.0, 3.0):
        _case("MNIST mnist:8", lm.model, (1, 28, 28), x0, eps)
    lm = load_model("cifar10")
    x0 = load_sample("cifar10:dog", entry=lm.entry).x
    for eps in (1e-2, 0.1):
        _case("CIFAR-10 cifar10:dog", lm.model, tuple(x0.shape[1:]), x0, eps)
    if args.alexnet:
        lm = load_model("alexnet")
        x0 = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        _case("AlexNet (seeded), rand x0", lm.model, (3, 224, 224), x0, 0.1)


if __name__ == "__main__":
    main()
