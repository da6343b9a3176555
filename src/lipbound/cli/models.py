"""``lipbound models``: the model zoo."""

from __future__ import annotations

import argparse

from .common import add_common, apply_threads, print_json, resolve_device, table

WEIGHTS = {
    "tiny": "fixed weights (paper's 3-D example)",
    "compnet": "torch.manual_seed(0) default init (paper)",
    "mnist": "shipped trained checkpoint (paper)",
    "cifar10": "shipped trained checkpoint (paper)",
    "alexnet": "--weights FILE, else seeded random (NOT trained)",
    "vgg16": "--weights FILE, else seeded random (NOT trained)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo",
                       description="List the zoo networks, their input shapes, samples and "
                                   "where their weights come from.")
    add_common(p, json_flag=False)
    p.add_argument("--json", action="store_true",
                   help="print one JSON array (one object per network)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import zoo

    # the common options are checked as everywhere, though listing uses neither (session 25:
    # --threads abc and --device cuda without CUDA were accepted silently)
    resolve_device(args.device)
    if str(args.threads) != "auto":
        apply_threads(args, None)
    entries = zoo.list_models()
    rows = []
    for e in entries:
        rows.append({
            "name": e.name,
            "input_shape": list(e.input_shape),
            "classes": e.n_classes,
            "weights": WEIGHTS.get(e.name, "see --weights"),
            "samples": list(e.samples),
            "eps_range": list(e.eps_range),
            "description": e.description,
        })
    if args.json:
        print_json(rows)
        return 0
    print(table(["name", "input", "classes", "samples", "eps range", "weights"],
                [[r["name"], "x".join(map(str, r["input_shape"])), r["classes"],
                  ", ".join(r["samples"]), f"{r['eps_range'][0]:g}-{r['eps_range'][1]:g}",
                  r["weights"]] for r in rows]))
    return 0
