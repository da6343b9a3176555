"""``lipbound demo``: the main job on the bundled MNIST network (what `make demo` runs)."""

from __future__ import annotations

import argparse
import time

from .common import (
    add_common,
    apply_threads,
    note_lines,
    parse_eps_list,
    print_json,
    resolve_device,
    table,
)
from .rounding import fmt_eps, fmt_up, g_down


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="bounds and radii for the bundled MNIST network and digit 8",
                       description="Global bound, local bounds at several radii and certified "
                                   "L2 radii (local, margin, global) for the paper's MNIST "
                                   "LeNet and its digit 8.")
    p.add_argument("--eps-list", default="0.001,0.01,0.1,1,7",
                   help="comma-separated radii of the local bounds (default "
                        "0.001,0.01,0.1,1,7)")
    p.add_argument("--spectral", choices=["auto", "exact", "lanczos"], default="exact",
                   help="spectral norms: exact SVD gives certified bounds (default here; "
                        "LeNet is small enough), lanczos is faster but probabilistic")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import zoo
    from ..analyzer import Analyzer
    from ..inputs import load_sample
    from .radius import radius_dict

    t0 = time.perf_counter()
    eps_values = parse_eps_list(args.eps_list)
    device = resolve_device(args.device)
    lm = zoo.load_model("mnist", device=device)
    apply_threads(args, lm.model)
    sample = load_sample("mnist:8", entry=lm.entry)
    x0 = sample.x.to(device)
    an = Analyzer(lm.model, lm.entry.input_shape, name="mnist", spectral=args.spectral)
    g = an.global_bound()
    locs = [an.local_bound(x0, e) for e in eps_values]
    # the tighter centre-plus-deviation bound (opt-in, lipbound.tight): over the whole
    # network at the small radii, where few units may switch; beyond its row budget (from
    # eps ~0.24 here) the hybrid, the paper's factors of the first layers times the tail's
    tights = [an.local_bound(x0, e, tight=True) for e in eps_values]
    pred = int(an.forward(x0).argmax())
    # (upper bounds and failure probabilities shown rounded up: lipbound.cli.rounding)
    # (each radius exactly, as lipbound bound shows it: lipbound.cli.rounding.fmt_eps)
    rows = [[kind, "-" if kind == "global" else fmt_eps(r.eps), fmt_up(r.value),
             r.guarantee.value, fmt_up(r.failure_prob), r.seconds]
            for kind, results in (("global", [g]), ("local", locs), ("tight", tights))
            for r in results]
    from ..radius import certified_radii

    # paper's certificate (local), per-rival margins (ours) and the global one, sharing the
    # analyzer (its global bound is already cached above)
    extra = [(r.method, r) for r in certified_radii(
        lm.model, x0, analyzer=an, methods=("local", "margin", "global"))]
    # the margin certificate with per-row tight bounds (opt-in: radius --tight)
    extra += [("margin, tight", r) for r in certified_radii(
        lm.model, x0, analyzer=an, methods=("margin",), tight=True)]
    if args.json:
        print_json({"model": "mnist", "weights": lm.weights_source, "input": sample.name,
                    "predicted": pred,
                    "global": g.to_dict(), "local": [r.to_dict() for r in locs],
                    "tight": [r.to_dict() for r in tights],
                    "radius": [radius_dict(e) for _, e in extra],
                    "seconds": time.perf_counter() - t0})
        return 0
    print(f"lipbound demo: MNIST LeNet ({lm.weights_source}), input {sample.name} "
          f"(label {sample.label}, predicted {pred}); L2 norms in normalised input space")
    print()
    print(table(["bound", "eps", "value", "guarantee", "failure prob", "seconds"], rows))
    if extra:
        print()
        print("certified L2 radii (no class change within; paper: ~0.052 local, ~0.0005 "
              "global, attacks ~3.4-5.4):")
    for how, e in extra:
        print(f"  certified radius: {g_down(e.radius, 4)} ({how}, {e.guarantee_text}, "
              f"{e.n_bound_evaluations} bound evaluations, {e.seconds:.2f} s)")
    # the results' notes (session 26: the text showed none): the analyzer's once, then each
    # result's own (which of the tight bound and the paper's product a tight row is)
    for n in an.notes:
        print(f"note: {n}")
    named = [("global", g), *(("local", r) for r in locs), *(("tight", r) for r in tights),
             *extra]
    for line in note_lines(((kind, getattr(r, "eps", None), r.notes) for kind, r in named),
                           an.notes):
        print(line)
    print()
    print(f"total {time.perf_counter() - t0:.2f} s. Every bound in the table is an upper bound "
          "on the true Lipschitz constant, and every certified radius a lower bound on the "
          "smallest class-changing L2 perturbation (certified/deterministic = always; "
          "probabilistic = except with the stated failure probability over lipbound's own "
          "random draws).")
    return 0
