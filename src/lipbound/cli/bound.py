"""``lipbound bound``: the global or local Lipschitz bound of a network at an input."""

from __future__ import annotations

import argparse

from .common import (
    add_common,
    add_model_options,
    build_analyzer,
    is_many_ref,
    load_input,
    load_model,
    note_lines,
    parse_eps_list,
    print_json,
    progress_logging,
    show_progress,
    table,
)
from .rounding import fmt_eps, fmt_radius_in, fmt_up


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bound", help="global or local Lipschitz upper bound",
        description="Compute a sound upper bound on the L2 Lipschitz constant of a network: "
                    "global, or local relative to an input over the ball of radius eps "
                    "(Avant & Morgansen 2023).")
    add_model_options(p, many_inputs=True)
    p.add_argument("--eps", type=float, default=None,
                   help="ball radius (default: 0.1); several radii: --eps-list")
    p.add_argument("--eps-list", default=None, help="comma-separated radii, e.g. 0.01,0.1,1")
    p.add_argument("--eps-file", default=None,
                   help="one radius per input (text/CSV, one number per line), many inputs")
    p.add_argument("--method", choices=["local", "global", "both"], default="local",
                   help="local bound at the input (default), global bound (needs no input), "
                        "or both")
    p.add_argument("--spectral", choices=["auto", "exact", "lanczos"], default="auto",
                   help="spectral norms: exact SVD (certified), Lanczos (probabilistic), "
                        "or auto by cost")
    p.add_argument("--failure-prob", type=float, default=1e-6,
                   help="failure probability budget of a probabilistic bound (default 1e-6)")
    p.add_argument("--tight", action="store_true",
                   help="local bound: also compute the centre-plus-deviation bound and report "
                        "the smaller of it and the paper's product (with several inputs: "
                        "rows labelled tight)")
    p.add_argument("--tight-rows", type=int, default=None,
                   help="with --tight: budget of vector-Jacobian rows (default 2048); beyond "
                        "it the construction covers the last layers only (the paper's factors "
                        "before them), with a note")
    p.add_argument("--out", default=None,
                   help="CSV file: one row per input and radius (also for a single input)")
    add_common(p)
    p.set_defaults(func=run)


@progress_logging
def run(args: argparse.Namespace) -> int:
    import torch

    from ..analyzer import TIGHT_ROWS, Analyzer
    from ..errors import InputError
    from ..results import format_prob_up
    from ..validation import check_eps, check_failure_prob
    from .exact_memory import check_exact_global_fits

    if args.eps_list is not None and args.eps is not None:
        raise InputError("give either --eps or --eps-list, not both")
    if args.method == "global" and (args.eps is not None or args.eps_list is not None
                                      or args.eps_file):
        raise InputError("--method global takes no radius (the global bound holds for every "
                         "input): drop --eps/--eps-list/--eps-file, or use --method both")
    check_failure_prob(args.failure_prob, "--failure-prob")
    if args.tight_rows is not None and not args.tight:
        raise InputError(f"--tight-rows needs --tight ({args.tight_rows} is the row budget "
                         "of the tight bound): add --tight to compute it, or drop --tight-rows")
    if args.tight and args.method == "global":
        raise InputError("--tight tightens the local bound; --method global has none: use "
                         "--method local (the default) or both, or drop --tight")
    if args.tight_rows is not None and args.tight_rows < 1:
        raise InputError(f"--tight-rows must be a positive integer, got {args.tight_rows} "
                         f"(default {TIGHT_ROWS})")
    tight_rows = args.tight_rows  # (None: the default budget; only with --tight)
    if is_many_ref(args.input) or args.eps_file or args.out:
        # several inputs, one radius per input, or a CSV file: one row per input
        from .bound_many import run_many

        return run_many(args)
    if args.eps_list is not None:
        eps_values = parse_eps_list(args.eps_list)
    else:
        eps_values = [check_eps(args.eps if args.eps is not None else 0.1, "--eps")]
    loaded = load_model(args)
    sample = None
    if args.input is not None or args.method != "global":
        # a global bound needs no input: without --input it comes alone (a zoo model's
        # default sample would be named in the header as if it had been asked for)
        try:
            sample = load_input(args, loaded, needed_for="a local bound (--method global "
                                "needs none)")
        except InputError as exc:
            if "batch of" in str(exc):  # an .npy/.pt file holding several inputs
                from .bound_many import run_many

                return run_many(args, loaded)  # the model is loaded once (its seeds settled)
            raise
    an = build_analyzer(args, loaded)  # (a residual network: its ResidualAnalyzer)
    if args.method in ("global", "both") and isinstance(an, Analyzer):
        check_exact_global_fits(an, spectral=args.spectral)
    progress = show_progress(args)
    results = []
    if args.method in ("global", "both"):
        results.append(an.global_bound(progress=progress))
    if args.method in ("local", "both"):
        results.extend(an.local_bound(sample.x, e, progress=progress, tight=args.tight,
                                      tight_rows=tight_rows) for e in eps_values)
    if args.json:
        out = results[0].to_dict() if len(results) == 1 else {
            "results": [r.to_dict() for r in results]}
        if isinstance(out, dict):
            out.update({"input": sample.name if sample is not None else None,
                        "weights": loaded.weights_source})
        print_json(out)
        return 0
    if sample is None:
        print(f"model {loaded.name} ({loaded.weights_source}); no input (global bound)")
    else:
        with_pred = an.forward(sample.x).reshape(-1)
        # (argmax of NaN scores would name a class)
        pred = (f"predicted class {int(with_pred.argmax())}"
                if bool(torch.isfinite(with_pred).all())
                else "no predicted class (the float64 output is not finite there)")
        print(f"model {loaded.name} ({loaded.weights_source}); input {sample.name}"
              + (f", label {sample.label}" if sample.label is not None else "") + f", {pred}")
    # (upper bounds shown rounded up: lipbound.cli.rounding)
    rows = [[r.method, fmt_eps(r.eps), fmt_up(r.value), r.guarantee.value
             + (f" (p_fail<={format_prob_up(r.failure_prob)})" if r.failure_prob else ""),
             f"{r.seconds:.3f}"] for r in results]
    print(table(["method", "eps", "bound", "guarantee", "seconds"], rows))
    if len(results) == 1 and results[0].layers:
        r = results[0]
        print()
        print(table(["layer", "name", "kind", "radius in", "local", "global", "spectral"],
                    [[lf.index, lf.name, lf.kind,
                      fmt_radius_in(lf.radius_in, r.eps),
                      fmt_up(lf.local), fmt_up(lf.global_factor), lf.spectral_method]
                     for lf in r.layers]))
    # the notes all results share once, in their order (a set printed them in an order that
    # changed from run to run), then each result's own, saying which it is (session 26)
    shared = [n for n in results[0].notes if all(n in r.notes for r in results)]
    for n in shared:
        print(f"note: {n}")
    for line in note_lines(((r.method, r.eps, r.notes) for r in results), shared):
        print(line)
    return 0
