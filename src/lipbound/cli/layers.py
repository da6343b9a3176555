"""``lipbound layers``: the per-layer view of a local bound (local vs global factor, radius).

Reproduces the per-layer analysis of Avant & Morgansen (IEEE TNNLS 2023; their AlexNet
figure): each layer's local factor at the radius it sees, next to its global factor.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from .common import (
    add_common,
    add_model_options,
    load_input,
    load_model,
    prepare_out_dir,
    print_json,
    progress_logging,
    show_progress,
    table,
    tracing,
)
from .rounding import fmt_eps, fmt_radius_in, fmt_up, g_up

CSV_COLUMNS = ["index", "name", "kind", "radius_in", "local_factor", "global_factor",
               "active_in", "active_out", "spectral_local", "spectral_global",
               "local_guarantee", "local_failure_prob", "global_guarantee",
               "global_failure_prob", "notes"]
"""layers.csv: each factor (local at the layer's radius, and global) with its own guarantee
and failure probability (0 when certified); ``notes`` (since session 26): the analysis'
notes, which qualify every factor (the model's; a float32 model's rounding), joined by
:data:`lipbound.batch.NOTE_SEPARATOR`."""


#: the files ``--out`` receives (checked before any computation)
LAYER_FILES = ("layers.csv", "layers.png", "layers.pdf")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layers", help="per-layer local and global factors of a local bound",
        description="Compute the global bound and the local bound at one radius, and show "
                    "for each layer the radius it sees, its local and global factor and how "
                    "many of its inputs/outputs can move. With --out, also write "
                    "DIR/layers.csv, layers.png and layers.pdf.")
    add_model_options(p)
    p.add_argument("--eps", type=float, default=0.1, help="ball radius (default 0.1)")
    p.add_argument("--out", default=None, help="folder for layers.csv/.png/.pdf")
    p.add_argument("--spectral", choices=["auto", "exact", "lanczos"], default="auto",
                   help="spectral norms: exact SVD, Lanczos (probabilistic), or auto by cost")
    p.add_argument("--failure-prob", type=float, default=1e-6,
                   help="failure probability budget of a probabilistic bound (default 1e-6)")
    add_common(p)
    p.set_defaults(func=run)


def _short(name: str, width: int = 26) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _csv_value(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def write_csv(path: Path, local, glob) -> Path:
    """One row per layer with :data:`CSV_COLUMNS`."""
    from ..batch import NOTE_SEPARATOR

    # the notes of both results (the analyzer's), not those of one bound's total
    notes = NOTE_SEPARATOR.join(n for n in local.notes if n in glob.notes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for lf, gf in zip(local.layers, glob.layers, strict=True):
            w.writerow([_csv_value(v) for v in (
                lf.index, lf.name, lf.kind, lf.radius_in, lf.local, lf.global_factor,
                lf.active_in, lf.active_out, lf.spectral_method, gf.spectral_method,
                lf.guarantee.value, lf.failure_prob, gf.guarantee.value, gf.failure_prob,
                notes)])
    return path


def describe(r) -> str:
    """``"value, guarantee (p_fail<=p)"`` of an upper bound; both rounded up, never below the
    bound and the failure probability."""
    from ..plotting import format_prob_up

    fp = f" (p_fail<={format_prob_up(r.failure_prob)})" if r.failure_prob else ""
    return f"{g_up(r.value, 6)}, {r.guarantee.value}{fp}"  # (an upper bound: rounded up)


def _prob_label(*layer_lists) -> str:
    """Legend text of the hatching that marks probabilistic factors: their largest failure
    probability, rounded up."""
    from ..plotting import format_prob_up
    from ..results import Guarantee
    fps = [lf.failure_prob for layers in layer_lists for lf in layers
           if lf.guarantee == Guarantee.PROBABILISTIC]
    return (f"hatched: probabilistic (p_fail ≤ {format_prob_up(max(fps))} each); "
            "plain: certified" if fps else "")


def _certified_note(layers) -> str:
    """`` (all certified)`` when no factor of ``layers`` is probabilistic (else the hatching
    says which are)."""
    return "" if any(_is_prob(layers)) else " (all certified)"


def _is_prob(layers) -> list[bool]:
    from ..results import Guarantee
    return [lf.guarantee == Guarantee.PROBABILISTIC for lf in layers]


@progress_logging
def run(args: argparse.Namespace) -> int:
    from ..analyzer import Analyzer
    from ..ops.base import product_up
    from ..plotting import plot_layer_factors
    from ..validation import check_eps, check_failure_prob
    from .exact_memory import check_exact_global_fits
    from .sweep import DISPLAY_NAMES, random_weights

    eps = check_eps(args.eps, "--eps")
    check_failure_prob(args.failure_prob, "--failure-prob")
    # before the work, not after
    out = prepare_out_dir(args.out, files=LAYER_FILES) if args.out else None
    loaded = load_model(args)
    sample = load_input(args, loaded)
    with tracing(args, loaded.name):
        an = Analyzer(loaded.model, loaded.input_shape, spectral=args.spectral,
                      failure_prob=args.failure_prob, seed=args.seed, name=loaded.name,
                      notes=loaded.notes)
    check_exact_global_fits(an, spectral=args.spectral)
    progress = show_progress(args)
    glob = an.global_bound(progress=progress)
    local = an.local_bound(sample.x, eps, progress=progress)
    files: list[Path] = []
    if out is not None:
        files.append(write_csv(out / "layers.csv", local, glob))
        title = (f"{DISPLAY_NAMES.get(loaded.name, loaded.name)}, input {sample.name}, "
                 f"ε = {fmt_eps(eps)}")
        if random_weights(loaded.weights_source):
            title += " (random weights)"
        files += plot_layer_factors(
            [f"{lf.index}: {_short(lf.name)}" for lf in local.layers],
            [lf.local for lf in local.layers], [lf.global_factor for lf in local.layers],
            [lf.radius_in for lf in local.layers], path_png=out / "layers.png",
            path_pdf=out / "layers.pdf", title=title,
            local_label=f"local factor at ε = {fmt_eps(eps)}" + _certified_note(local.layers),
            global_label="global factor" + _certified_note(glob.layers),
            local_probabilistic=_is_prob(local.layers),
            global_probabilistic=_is_prob(glob.layers),
            probabilistic_label=_prob_label(local.layers, glob.layers))
    if args.json:
        print_json({"model": loaded.name, "input": sample.name, "eps": eps,
                    "weights": loaded.weights_source, "global": glob.to_dict(),
                    "local": local.to_dict(), "files": [str(f) for f in files]})
        return 0
    print(f"model {loaded.name} ({loaded.weights_source}); input {sample.name}; eps {fmt_eps(eps)}")
    # (the factors and radii are upper bounds: shown rounded up)
    rows = [[lf.index, lf.name, lf.kind,
             fmt_radius_in(lf.radius_in, eps), fmt_up(lf.local),
             fmt_up(lf.global_factor),
             f"{lf.active_in}", f"{lf.active_out}", f"{lf.spectral_method} / "
             f"{gf.spectral_method}"]
            for lf, gf in zip(local.layers, glob.layers, strict=True)]
    print(table(["layer", "name", "kind", "radius in", "local", "global", "active in",
                 "active out", "spectral (local / global)"], rows))
    print()

    print(f"local bound at eps {fmt_eps(eps)}: {describe(local)}")
    print(f"global bound:          {describe(glob)}")
    print("product of the local factors: "
          f"{g_up(product_up(lf.local for lf in local.layers), 6)}")
    for n in local.notes:
        print(f"note: {n}")
    if files:
        print("wrote " + ", ".join(str(f) for f in files))
    return 0
