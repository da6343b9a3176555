"""``lipbound sweep``: upper and lower bounds over a range of radii, as CSV, JSON and plots."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import (
    add_common,
    add_model_options,
    fmt,
    load_input,
    load_model,
    prepare_out_dir,
    print_json,
    progress_logging,
    show_progress,
    table,
)

#: names used in plot titles
DISPLAY_NAMES = {
    "tiny": "3-D example network",
    "compnet": "comparison network 7-20-30-10",
    "mnist": "MNIST LeNet",
    "cifar10": "CIFAR-10 ConvNet",
    "alexnet": "AlexNet",
    "vgg16": "VGG-16",
}


#: the files ``--out`` receives (checked before any computation)
SWEEP_FILES = ("sweep.csv", "sweep.json", "sweep.png", "sweep.pdf")


def _shown(r) -> str:
    """A table cell: an upper bound rounded up, a lower bound rounded down (rounded to
    nearest, the PGD lower bound 1.2345599... of a network of constant 1.23456 read 1.2346),
    an estimate to nearest."""
    from ..results import Guarantee
    from .rounding import fmt_down, fmt_up

    v = float(r.value)
    if r.guarantee in (Guarantee.CERTIFIED, Guarantee.PROBABILISTIC):
        return fmt_up(v)
    if r.guarantee == Guarantee.LOWER:
        return fmt_down(v)
    return fmt(v)


def _p_fail(res, method: str) -> str:
    """``" (p_fail<=p)"``: the largest failure probability of the method's probabilistic
    points, rounded up (as ``lipbound bound`` states it); empty when none is probabilistic."""
    from ..results import Guarantee, format_prob_up

    fps = [r[method].failure_prob for r in res.rows
           if r[method].guarantee == Guarantee.PROBABILISTIC]
    return f" (p_fail<={format_prob_up(max(fps))})" if fps else ""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="bounds over a range of radii (CSV, JSON, PNG, PDF)",
        description="For log-spaced radii eps, compute the local upper bound (Avant & "
                    "Morgansen 2023), the global upper bound and empirical lower bounds "
                    "(random sampling, gradient ascent, PGD) of the local Lipschitz constant "
                    "relative to the input; write DIR/sweep.csv, sweep.json, sweep.png and "
                    "sweep.pdf.")
    add_model_options(p)
    p.add_argument("--eps-min", type=float, default=None,
                   help="smallest radius (default: the zoo entry's range)")
    p.add_argument("--eps-max", type=float, default=None,
                   help="largest radius (default: the zoo entry's range)")
    p.add_argument("--points", type=int, default=30,
                   help="number of radii, log-spaced from --eps-min to --eps-max (>= 2; "
                        "default 30)")
    p.add_argument("--out", default=None,
                   help="output folder (default: out/sweep_<model>)")
    p.add_argument("--methods", default="local,global,random,gradient,pgd",
                   help="comma-separated: local, tight, global, random, gradient, pgd, best "
                        "(default: all but tight and best; tight: the centre-plus-deviation "
                        "local bound, lipbound bound --tight)")
    p.add_argument("--samples", type=int, default=10_000,
                   help="points of the random-sampling lower bound per radius (default 10000)")
    p.add_argument("--steps", type=int, default=100,
                   help="steps of the gradient-ascent and PGD lower bounds (default 100)")
    p.add_argument("--restarts", type=int, default=16, help="restarts of PGD (default 16)")
    p.add_argument("--lower-dtype", choices=["float64", "model"], default="float64",
                   help="precision of the lower bounds' forward passes (default float64: the "
                        "precision of the upper-bound analysis)")
    p.add_argument("--spectral", choices=["auto", "exact", "lanczos"], default="auto",
                   help="spectral norms: exact SVD, Lanczos (probabilistic), or auto by cost")
    p.add_argument("--failure-prob", type=float, default=1e-6,
                   help="failure probability budget of a probabilistic bound (default 1e-6)")
    p.add_argument("--reuse-tol", type=float, default=None,
                   help="relative looseness a reused layer factor of a larger radius may have "
                        "(default 0.02; 0: compute every radius afresh)")
    p.add_argument("--title", default=None, help="plot title (default: network and input)")
    add_common(p)
    p.set_defaults(func=run)


MAX_POINTS = 10_000
"""Most radii a sweep takes (``--points``)."""


def _eps_range(args: argparse.Namespace, loaded) -> list[float]:
    from ..errors import InputError
    from ..sweep import eps_grid
    from ..validation import check_eps

    lo, hi = args.eps_min, args.eps_max
    if loaded.entry is not None:
        lo = loaded.entry.eps_range[0] if lo is None else lo
        hi = loaded.entry.eps_range[1] if hi is None else hi
    if lo is None or hi is None:
        raise InputError("a user model has no default radius range: pass --eps-min and "
                         "--eps-max")
    lo, hi = check_eps(lo, "--eps-min"), check_eps(hi, "--eps-max")
    if lo >= hi:
        raise InputError(f"--eps-min ({lo:g}) must be smaller than --eps-max ({hi:g}); "
                         + ("swap them" if lo > hi else "for a single radius use "
                            "`lipbound bound --eps`"))
    if args.points < 2:
        raise InputError(f"--points must be at least 2 (the radii run from --eps-min to "
                         f"--eps-max), got {args.points}; for a single radius use "
                         "`lipbound bound --eps`")
    if args.points > MAX_POINTS:
        raise InputError(f"--points must be at most {MAX_POINTS} (each radius runs every "
                         f"method), got {args.points}")
    return eps_grid(lo, hi, args.points)


def random_weights(weights_source: str) -> bool:
    """Whether a zoo network runs on seeded random (untrained) weights (the source that
    :func:`lipbound.zoo.load_model` gives them; a user's file named ``random...`` is not)."""
    return weights_source.startswith("seeded random weights")


def plot_title(loaded, sample_name: str) -> str:
    """``"MNIST LeNet, input mnist:8"`` (plus a warning for random, untrained weights)."""
    name = DISPLAY_NAMES.get(loaded.name, loaded.name)
    title = f"{name}, input {sample_name}"
    if random_weights(loaded.weights_source):
        title += " (random weights)"
    return title


@progress_logging
def run(args: argparse.Namespace) -> int:
    import torch

    from ..sweep import parse_methods, sweep

    t0 = time.perf_counter()
    from ..analyzer import Analyzer
    from ..validation import check_failure_prob
    from .exact_memory import check_exact_global_fits

    methods = parse_methods(args.methods)
    check_failure_prob(args.failure_prob, "--failure-prob")
    if args.out:
        prepare_out_dir(args.out, files=SWEEP_FILES)  # before the work, not after
    loaded = load_model(args)
    eps_values = _eps_range(args, loaded)
    sample = load_input(args, loaded)
    an = None
    if "global" in methods and args.spectral == "exact":
        an = Analyzer(loaded.model, loaded.input_shape, spectral=args.spectral,
                      failure_prob=args.failure_prob, seed=args.seed, name=loaded.name,
                      notes=loaded.notes)
        check_exact_global_fits(an, spectral=args.spectral)
    out = prepare_out_dir(args.out if args.out else Path("out") / f"sweep_{loaded.name}",
                          files=SWEEP_FILES)
    res = sweep(an if an is not None else loaded.model, sample.x, eps_values, methods,
                progress=show_progress(args), input_shape=loaded.input_shape, name=loaded.name,
                input_name=sample.name, samples=args.samples, steps=args.steps,
                restarts=args.restarts, seed=args.seed,
                lower_dtype=torch.float64 if args.lower_dtype == "float64" else None,
                spectral=args.spectral, failure_prob=args.failure_prob,
                notes=loaded.notes, **({} if args.reuse_tol is None
                                       else {"reuse_tol": args.reuse_tol}))
    files = [res.to_csv(out / "sweep.csv"), res.to_json(out / "sweep.json")]
    files += res.plot(out / "sweep.png", out / "sweep.pdf",
                      title=args.title or plot_title(loaded, sample.name))
    problems = res.violations()
    if args.json:
        d = res.to_dict()
        d.update({"weights": loaded.weights_source, "files": [str(f) for f in files],
                  "violations": problems})
        print_json(d)
        return 1 if problems else 0
    print(f"model {loaded.name} ({loaded.weights_source}); input {sample.name}; "
          f"{len(eps_values)} radii from {eps_values[0]!r} to {eps_values[-1]!r}")
    headers = ["eps"] + list(methods)
    # each radius exactly (shortest repr): a rounded one would put an upper bound at a
    # larger radius than it was computed for (0.46415888... shown 0.4642), or a lower bound
    # at a smaller one
    rows = [[repr(r.eps)] + [_shown(r[m]) for m in methods] for r in res.rows]
    print(table(headers, rows))
    print()
    guarantees = {m: " / ".join(sorted({r[m].guarantee.value for r in res.rows}))
                  + _p_fail(res, m) for m in methods}
    print("guarantees: " + ", ".join(f"{m}: {g}" for m, g in guarantees.items()))
    secs = {m: sum(r[m].seconds for r in res.rows) for m in methods}
    print("seconds per method (all radii): "
          + ", ".join(f"{m} {s:.2f}" for m, s in secs.items()))
    for n in res.notes:
        print(f"note: {n}")
    for p in problems:
        print(f"SOUNDNESS CHECK FAILED: {p}")
    print("wrote " + ", ".join(str(f) for f in files)
          + f" in {time.perf_counter() - t0:.1f} s")
    return 1 if problems else 0
