"""``lipbound bench``: time one local and one global bound of a network (and their memory)."""

from __future__ import annotations

import argparse
import logging

from ..errors import InputError
from ..results import format_prob_up
from ..validation import check_eps
from .common import (
    add_common,
    add_model_options,
    fmt,
    load_input,
    load_model,
    print_json,
    progress_logging,
    show_progress,
    table,
)

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time local/global bounds of a network and measure peak memory",
        description="Benchmark the bound computations of a network: the median, min and max "
                    "seconds of one local and one global bound over several runs (each on "
                    "a fresh analyzer built outside the timer), the cold first run "
                    "including tracing, and the peak memory, compared with the project's "
                    "targets. Run one network per process for a clean memory peak.")
    add_model_options(p)
    p.add_argument("--eps", type=float, default=None,
                   help="radius of the local bound, also the unit of --sweep (default 0.1, "
                        "normalised input space)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed runs per quantity (the cold run comes on top; default 5)")
    p.add_argument("--no-warmup", action="store_true",
                   help="count the cold run (analyzer built just before) as the first timed "
                        "run instead of running it untimed first (big networks)")
    p.add_argument("--what", default="local,global",
                   help="quantities to time: local, global or local,global (default)")
    p.add_argument("--spectral", choices=["auto", "exact", "lanczos"], default="auto",
                   help="spectral-norm route of the analyzer (default auto)")
    p.add_argument("--lanczos-steps", type=int, default=None,
                   help="Krylov dimension of the Lanczos runs (analyzer default when unset)")
    p.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="also time an N-radius sweep on one analyzer, in units of one local "
                        "bound (zoo networks: over their eps range)")
    p.add_argument("--sweep-range", default=None, metavar="LO,HI",
                   help="radius range of --sweep (default: the zoo entry's range)")
    p.add_argument("--radius-images", type=int, default=0, metavar="N",
                   help="also time certifying the first N shipped test images with "
                        "lipbound.radius (zoo networks with a test set: mnist, cifar10; "
                        "N <= 100)")
    add_common(p)
    p.set_defaults(func=run)


def _sweep_range(args: argparse.Namespace, loaded) -> tuple[float, float]:
    if args.sweep_range:
        try:
            lo, hi = (float(v) for v in args.sweep_range.split(","))
        except ValueError as exc:
            raise InputError(f"--sweep-range expects LO,HI (e.g. 0.001,1), got "
                             f"{args.sweep_range!r}") from exc
        lo, hi = check_eps(lo, "--sweep-range LO"), check_eps(hi, "--sweep-range HI")
        if hi <= lo:
            raise InputError(f"--sweep-range {args.sweep_range}: LO must be smaller than HI"
                             + ("; swap them" if lo > hi else ""))
        return lo, hi
    if loaded.entry is None:
        raise InputError("--sweep on a user model needs --sweep-range LO,HI")
    return tuple(loaded.entry.eps_range)


@progress_logging
def run(args: argparse.Namespace) -> int:
    from ..bench import _check_what, bench_model, bench_radius, bench_sweep_model, environment

    if args.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {args.repeat}")
    if args.eps is not None:  # before loading the network (VGG-16: seconds)
        check_eps(args.eps, "--eps")
    if args.sweep < 0 or args.sweep == 1:
        raise InputError(f"--sweep needs at least 2 radii, got {args.sweep}")
    try:
        whats = _check_what(tuple(w for w in args.what.split(",")))
    except InputError:
        raise InputError(f"--what must be local, global or local,global; got "
                         f"{args.what!r}") from None
    if args.eps is not None and whats == ("global",) and not args.sweep:
        logger.warning("--eps %s has no effect with --what global (a global bound has no "
                       "radius): add local to --what, or drop --eps", args.eps)
    if args.sweep_range is not None and not args.sweep:
        raise InputError("--sweep-range sets the radii of --sweep N: add --sweep N (e.g. "
                         "--sweep 10), or drop --sweep-range")
    if args.radius_images < 0:
        raise InputError(f"--radius-images must be >= 0 (0: none), got {args.radius_images}")
    if args.radius_images and args.weights is not None:
        raise InputError("--radius-images times the zoo network with its shipped weights, not "
                         "those of --weights: drop one of them")
    opts = {} if args.lanczos_steps is None else {"lanczos_steps": args.lanczos_steps}
    loaded = load_model(args)
    if args.radius_images:  # before the work, not after
        from ..zoo.testsets import TESTSETS, load_testset

        if loaded.entry is None or loaded.entry.testset is None:
            raise InputError("--radius-images needs a zoo network with a shipped test set "
                             f"({', '.join(TESTSETS)})")
        n = len(load_testset(loaded.entry.testset)[1])
        if args.radius_images > n:
            raise InputError(f"--radius-images {args.radius_images}: the shipped test set of "
                             f"{loaded.entry.name} has {n} images; give at most {n}")
    opts["seed"] = args.seed  # settled by load_model (a fresh one drawn there)
    eps_range = _sweep_range(args, loaded) if args.sweep else None  # before the work
    no_input = args.input is None and loaded.entry is None and whats == ("global",) \
        and not args.sweep
    if no_input:
        # a global bound needs no input: a user model's input is only its shape here
        import torch

        from .._modelinfo import model_device
        from ..inputs import Sample

        sample = Sample(x=torch.zeros(1, *loaded.input_shape,
                                      device=model_device(loaded.model, torch.device("cpu"))),
                        label=None, name="none (global bound)")
    else:
        sample = load_input(args, loaded, needed_for="the local bound and --sweep (--what "
                            "global needs none)")
    if "global" in whats and args.spectral == "exact":
        from ..analyzer import Analyzer
        from .exact_memory import check_exact_global_fits

        check_exact_global_fits(Analyzer(loaded.model, loaded.input_shape, spectral="exact"),
                                spectral="exact")
    # load_model applied --threads (lipbound.cli.common.apply_threads)
    progress = show_progress(args)
    res = bench_model(loaded.model, sample.x, name=loaded.name, what=whats, eps=args.eps,
                      repeat=args.repeat, spectral=args.spectral, threads=None,
                      analyzer_options=opts, notes=loaded.notes, warmup=not args.no_warmup,
                      progress=progress)
    sweep = None
    if args.sweep:
        sweep = bench_sweep_model(loaded.model, sample.x, name=loaded.name,
                                  eps_range=eps_range, n_points=args.sweep,
                                  local_repeat=args.repeat, eps=args.eps,
                                  spectral=args.spectral,
                                  threads=None, analyzer_options=opts,
                                  notes=loaded.notes, progress=progress)
    radius = None
    if args.radius_images:
        radius = bench_radius(loaded.name, n_images=args.radius_images, device=args.device,
                              progress=progress,
                              analyzer_options={**opts, "spectral": args.spectral})
    if args.json:
        out = res.to_dict()
        out.update({"input": None if no_input else sample.name,
                    "weights": loaded.weights_source,
                    "environment": environment()})
        if args.sweep:
            out["sweep"] = sweep.to_dict() if sweep is not None else None
        if args.radius_images:
            out["radius"] = radius.to_dict()
        print_json(out)
        return 0
    print(f"model {loaded.name} ({loaded.weights_source}); input {sample.name}; device "
          f"{res.device}; {res.threads} thread(s); spectral {res.spectral}")
    rows = []
    for r in res.results.values():
        rows.append([r.what, r.eps, r.median_seconds, r.min_seconds, r.max_seconds,
                     r.cpu_median_seconds, r.cold_seconds, r.trace_seconds, r.peak_memory_mb,
                     r.target_seconds, r.ratio_to_target, r.value,
                     # (a probabilistic bound with its failure probability, rounded up)
                     r.guarantee.value + (f" (p_fail<={format_prob_up(r.failure_prob)})"
                                          if r.failure_prob > 0 else "")])
    print(table(["quantity", "eps", "median s", "min s", "max s", "cpu s", "cold s", "trace s",
                 "peak MB", "target s", "ratio", "value", "guarantee"], rows))
    la = [r.load_average for r in res.results.values()]
    print(f"runs per quantity: {args.repeat}; load average (1 min) {fmt(la[0][0])} -> "
          f"{fmt(la[-1][1])}; memory: {res.memory_source}")
    if sweep is not None:
        print(f"sweep of {sweep.n_points} radii in [{fmt(sweep.eps_range[0])}, "
              f"{fmt(sweep.eps_range[1])}]: {sweep.total_seconds:.3f} s = "
              f"{sweep.cost_in_local_bounds:.2f} local bounds (CPU time: "
              f"{sweep.cpu_cost_in_local_bounds:.2f}"
              + (f"; target <= {fmt(sweep.target_units)} for 30 radii)"
                 if sweep.target_units is not None else "; the target is for 30 radii)"))
    if radius is not None:
        print(f"certified radius of {radius.n_images} test images: "
              f"{radius.total_seconds:.3f} s, CPU {radius.cpu_total_seconds:.3f} s ("
              + (f"target <= {fmt(radius.target_seconds)} s" if radius.target_seconds
                 is not None else "the target is for the 100 MNIST test images") + ")")
    shown = [*(n for r in res.results.values() for n in r.notes),
             *(sweep.notes if sweep is not None else ()),
             *(radius.notes if radius is not None else ())]
    for n in dict.fromkeys(shown):
        print(f"note: {n}")
    return 0
