"""``lipbound compare``: lipbound's bounds next to the rival methods, on one network and input.

Runs :func:`lipbound.baselines.compare` and prints a table (or JSON with ``--json``).
The exit status is 0, or 1 when some upper bound fell below the empirical lower bound
(which would mean a soundness bug).
"""

from __future__ import annotations

import argparse

from .common import (
    add_common,
    add_model_options,
    check_positive_number,
    load_input,
    load_model,
    print_json,
    progress_logging,
    show_progress,
)
from .rounding import fmt_eps


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    from ..baselines.compare import METHODS

    p = sub.add_parser(
        "compare", help="compare with rival methods (AutoLip, SeqLip, LipSDP, ...)",
        description="Compare lipbound's local and global bounds with rival methods on one "
                    "network and input: AutoLip and SeqLip (Scaman & Virmaux 2018), "
                    "LipSDP-Neuron/-Layer (Fazlyab et al. 2019), ECLipsE-Fast (Xu & "
                    "Sivaranjani 2024), Fast-Lip (Weng et al. 2018), RecurJac (Zhang et al. "
                    "2019), the exact local L2 constant, lipMIP (Jordan & Dimakis 2020) and "
                    "the best empirical lower bound. The rival methods support fully "
                    "connected ReLU networks; a conv net (Conv2d, MaxPool2d, AvgPool2d, "
                    "BatchNorm, ...) is given to them as an exact fully connected ReLU chain, "
                    "and methods that cannot scale to its widths say so in their row; other "
                    "networks get a 'not supported' row.")
    add_model_options(p)
    p.set_defaults(model="compnet")
    p.add_argument("--eps", type=float, default=0.1,
                   help="L2 radius of the ball around the input (lipMIP: l_inf box); "
                        "default 0.1")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="methods to run (space- or comma-separated); default: all of "
                        + ", ".join(METHODS))
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="time limit in seconds of each rival method, each on its own "
                        "(default 60): checked between a method's steps (layers, passes, "
                        "branch nodes, solver calls), so one step may run past it; a method "
                        "that reaches it gets a 'not run: ... time limit' row (lipMIP "
                        "instead reports HiGHS's dual bound as a certified upper bound when "
                        "the solver has one by then). lipbound's own bounds, the lower bound "
                        "and the conversion of a conv net are not limited")
    add_common(p)
    p.set_defaults(func=run)


@progress_logging
def run(args: argparse.Namespace) -> int:
    """Run the comparison and print it; 1 if an upper bound fell below the lower bound."""
    from .._stdout import fd1_redirected
    from ..baselines.compare import METHODS, compare, format_table, violations
    from ..errors import InputError
    from ..validation import check_eps

    eps = check_eps(args.eps, "--eps")
    time_limit = check_positive_number(args.time_limit, "--time-limit", "60")
    methods = None
    if args.methods:
        # an empty list (``--methods ,``) is refused by compare (it printed an empty table)
        methods = [m for item in args.methods for m in item.split(",") if m.strip()]
        unknown = [m for m in methods if m.strip().lower() not in METHODS]
        if unknown:
            raise InputError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(METHODS)}")
        if not methods:
            raise InputError(f"--methods {' '.join(args.methods)!r} names no method; choose "
                             f"from {', '.join(METHODS)}, or drop --methods for all")
    loaded = load_model(args)
    x0, name = load_input(args, loaded).x, loaded.name
    # the solvers' native output (scipy's HiGHS prints on the C stdout) goes to stderr, so
    # that stdout holds the table or the JSON document alone
    with fd1_redirected(2):
        rows = compare(loaded.model, x0, eps, methods, model_name=name,
                       time_limit=time_limit, seed=args.seed, progress=show_progress(args))
    bad = violations(rows)
    if args.json:
        print_json({"model": name, "weights": loaded.weights_source, "eps": eps,
                    "rows": [r.to_dict() for r in rows],
                    "violations": [r.method for r in bad], "notes": list(loaded.notes)})
    else:
        print(f"model {name} ({loaded.weights_source}), eps {fmt_eps(eps)} (L2 ball; lipMIP: l_inf "
              "box)")
        print(format_table(rows))
        print("quantities: local L2 rel. x0 <= local L2 all pairs <= global L2; the lower "
              "bound is for rel. x0; lipMIP's l_inf quantity is not comparable with them")
        chain = next((part for r in rows for part in r.note.split("; ")
                      if " an exact FC ReLU chain of widths " in part), None)
        if chain is not None:
            print(f"note: the rival methods ran on the {chain} (same function)")
        own = next((r for r in rows if r.method in ("local", "global")
                    and r.note.startswith("not supported: the model has")), None)
        if own is not None:  # (the table's column shows its beginning only)
            print(f"note: {own.method}: {own.note}")
        for n in loaded.notes:
            print(f"note: {n}")
        if bad:
            print("upper bounds below the lower bound: " + ", ".join(r.method for r in bad))
    return 1 if bad else 0
