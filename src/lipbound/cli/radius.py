"""``lipbound radius``: certified L2 radii (local, margin, global) next to attack radii.

A certified radius is a ball around the input in which the class cannot change (Avant &
Morgansen 2023); an attack radius is the size of a verified class-changing perturbation.
Certified <= attack, always: a violation is reported as an error (exit status 1).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .._modelinfo import model_device
from .._progress import NULL_BAR, NullBar, progress_bar
from ..errors import InputError, LipboundError
from ..radius import exact_class_change
from ..results import format_prob_up
from .common import (
    add_common,
    add_model_options,
    build_analyzer,
    check_input_ref,
    is_many_ref,
    load_input,
    load_model,
    note_lines,
    prepare_out_dir,
    print_json,
    progress_logging,
    show_progress,
    table,
)
from .rounding import fmt_down, fmt_up, g_down, g_up

log = logging.getLogger(__name__)

ALL_ATTACKS = ("fgsm", "ifgsm", "gradient", "cw", "pgd")


#: the files ``--out`` receives (checked before any computation)
RADIUS_FILES = ("radius.csv", "radius.png", "radius.pdf")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "radius", help="certified robustness radius (and attack radii)",
        description="Certified L2 radius around an input within which the predicted class "
                    "cannot change, from the local bound (Avant & Morgansen 2023), per-rival "
                    "margin bounds and the global bound; optionally next to the radii of "
                    "verified adversarial examples found by attacks. Radii are measured in "
                    "the model's input space (normalised space for the zoo networks).")
    add_model_options(p, many_inputs=True)
    p.add_argument("--methods", default="local,margin,global",
                   help="certificates to compute, comma-separated from local, margin, global "
                        "(default: all three)")
    p.add_argument("--attacks", default="none",
                   help="attacks to run, comma-separated from " + ", ".join(ALL_ATTACKS)
                        + ", or 'all' / 'none' (default: none)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="relative tolerance of the radius search (default 1e-3)")
    p.add_argument("--max-eps", type=float, default=None,
                   help="largest radius searched (default 1e12)")
    p.add_argument("--spectral", choices=["auto", "exact", "lanczos"], default="auto",
                   help="spectral norms: exact SVD (certified), Lanczos (probabilistic), "
                        "or auto by cost")
    p.add_argument("--failure-prob", type=float, default=1e-6,
                   help="failure probability budget of a probabilistic bound (default 1e-6)")
    p.add_argument("--reuse-tol", type=float, default=None,
                   help="relative looseness of layer factors reused during the search "
                        "(default 0.02; 0: none)")
    p.add_argument("--tight", action="store_true",
                   help="the local and margin certificates use the tight local bound (the "
                        "smaller of the centre-plus-deviation bound and the paper's product; "
                        "per rival row for margin)")
    p.add_argument("--tight-rows", type=int, default=None,
                   help="with --tight: budget of vector-Jacobian rows of every tight bound of "
                        "the search (default 2048); beyond it the construction covers the "
                        "last layers only (the paper's factors before them)")
    p.add_argument("--out", default=None,
                   help="folder to write radius.csv (one row per input, with each "
                        "certified radius' guarantee and failure probability) and "
                        "radius.png/.pdf (certified vs attack radii per input)")
    add_common(p)
    p.set_defaults(func=run)


def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    text = text.strip()
    if text.lower() == "none" or not text:
        return []
    if text.lower() == "all":
        return list(allowed)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise InputError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _samples(args: argparse.Namespace, loaded) -> tuple[list, bool]:
    """The inputs named by --input and whether this is a many-input run."""
    from ..inputs import load_samples

    if args.input is None:
        return [load_input(args, loaded)], False
    check_input_ref(args, loaded, args.input)
    samples = load_samples(args.input, **loaded.sample_kwargs())
    if not samples:
        raise InputError(f"--input {args.input!r} names no inputs (an empty array or "
                         "file); give at least one input")
    return samples, len(samples) > 1 or is_many_ref(str(args.input))




def radius_guarantee(c) -> str:
    """The guarantee of a certified radius: a certified (deterministic) or probabilistic
    LOWER bound on the minimal adversarial perturbation (never an upper bound)."""
    return c.guarantee_label


def radius_dict(c) -> dict[str, Any]:
    """``RadiusResult.to_dict()`` (it carries the radius' own guarantee label and quantity)."""
    return c.to_dict()


def _one(model, an, sample, methods: list[str], attacks: list[str], args,
         bar: NullBar = NULL_BAR) -> dict[str, Any]:
    """Certificates and attacks at one input, as a JSON-friendly dict (``bar``: the bar over
    the inputs, whose label names the step running)."""
    from ..radius import best, certified_radii
    from ..residual import ResidualAnalyzer
    from ..residual import certified_radius as residual_radius

    t0 = time.perf_counter()
    dev = model_device(model, sample.x.device)  # (also for weights held in buffers, or none)
    x0 = sample.x.to(dev)
    bar.label(f"{sample.name} certificates")
    if isinstance(an, ResidualAnalyzer):  # (the margin test only: see run)
        cert = [residual_radius(an, x0, tol=args.tol)]
    else:
        cert = certified_radii(an, x0, methods=methods, tol=args.tol, max_eps=args.max_eps,
                               progress=show_progress(args), tight=args.tight,
                               tight_rows=getattr(args, "tight_rows", None),
                               **({} if args.reuse_tol is None
                                  else {"reuse_tol": args.reuse_tol}))
    atk = []
    if attacks:
        from ..attacks import run_attacks

        for a in attacks:  # one at a time, as run_attacks would: the bar names each
            bar.label(f"{sample.name} {a}")
            atk += run_attacks(model, x0, methods=[a], seed=args.seed)
    top = best(cert)
    succ = [a for a in atk if a.success and a.radius is not None]
    min_attack = min(a.radius for a in succ) if succ else None
    # the radius certifies the network in exact arithmetic; an attack verified a class change
    # of the model in its own (float32) arithmetic. An adversarial example closer than the
    # certified radius is a violation unless the exact network keeps its class there; every
    # closer one is checked (the closest may be float32 rounding while another is not)
    closer = [a for a in succ if a.radius < top.radius] if top is not None else []
    kept = [exact_class_change(an, a.x_adv, cert[0].predicted_class) == "keeps"
            for a in closer]
    violation = not all(kept)
    rounding_only = bool(closer) and all(kept)
    return {
        "input": sample.name,
        "label": sample.label,
        "predicted": cert[0].predicted_class,
        "runner_up": cert[0].runner_up,
        "margin": cert[0].margin,
        "certified_radius": top.radius if top is not None else None,
        "certified_method": top.method if top is not None else None,
        "certified_guarantee": radius_guarantee(top) if top is not None else None,
        "certified_failure_prob": top.failure_prob if top is not None else None,
        "certified": [radius_dict(r) for r in cert],
        "attacks": [a.to_dict() for a in atk],
        "min_attack_radius": min_attack,
        "violation": violation,
        "closer_attack_is_float32_rounding": rounding_only,
        "seconds": time.perf_counter() - t0,
        "_cert": cert,
        "_top": top,
        "_atk": atk,
    }


def _residual_methods(args: argparse.Namespace, methods: list[str]) -> list[str]:
    """The certificate methods of a residual network: the margin test only
    (:func:`lipbound.residual.certified_radius`). Options that need the chain analyzer are
    refused, naming what runs; the default method list gives ``margin``."""
    if args.tight:
        raise InputError("--tight is not available for residual networks (the tight bound "
                         "takes chains only); drop --tight: the margin test with the composed "
                         "local bound runs")
    if args.max_eps is not None or args.reuse_tol is not None:
        raise InputError("--max-eps and --reuse-tol are not available for residual networks "
                         "(their radius search is lipbound.residual.certified_radius); drop "
                         "them")
    if "margin" not in methods:
        raise InputError(f"--methods {','.join(methods)}: residual networks are certified by "
                         "the margin test only (lipbound.residual.certified_radius); use "
                         "--methods margin")
    return ["margin"]


def _public(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


@progress_logging
def run(args: argparse.Namespace) -> int:
    from ..analyzer import TIGHT_ROWS, Analyzer
    from ..radius import METHODS
    from ..validation import check_eps, check_failure_prob

    t0 = time.perf_counter()
    methods = _split(args.methods, METHODS, "certificate method(s)")
    if not methods:
        raise InputError("--methods must name at least one of local, margin, global")
    attacks = _split(args.attacks, ALL_ATTACKS, "attack(s)")
    if args.tight and "local" not in methods and "margin" not in methods:
        raise InputError("--tight tightens the local and margin certificates: add local or "
                         "margin to --methods (e.g. --methods local,margin), or drop --tight")
    if args.tight_rows is not None and not args.tight:
        raise InputError(f"--tight-rows needs --tight ({args.tight_rows} is the row budget "
                         "of the tight bound): add --tight, or drop --tight-rows")
    if args.tight_rows is not None and args.tight_rows < 1:
        raise InputError(f"--tight-rows must be a positive integer, got {args.tight_rows} "
                         f"(default {TIGHT_ROWS})")
    if not 0 < args.tol < 1:
        raise InputError(f"--tol must be in (0, 1), got {args.tol}")
    if args.max_eps is not None:
        check_eps(args.max_eps, "--max-eps")
    check_failure_prob(args.failure_prob, "--failure-prob")
    # before the work, not after
    out = prepare_out_dir(args.out, files=RADIUS_FILES) if args.out else None
    loaded = load_model(args)
    samples, many = _samples(args, loaded)
    asked = methods
    an = build_analyzer(args, loaded)
    if not isinstance(an, Analyzer):  # a residual network: the margin test only
        methods = _residual_methods(args, methods)
    # the notes printed: the model's and the analyzer's (a float32 model accepted within its
    # rounding; session 25 review: the text output showed only the model's)
    loaded = replace(loaded, notes=an.notes)
    if asked != methods:  # (a residual network: the margin test only)
        loaded = replace(loaded, notes=(*loaded.notes, "residual network: only the margin "
                                        "certificate runs (the local and global radii take "
                                        "chains)"))
    if "global" in methods and isinstance(an, Analyzer):
        from .exact_memory import check_exact_global_fits

        check_exact_global_fits(an, spectral=args.spectral)
    rows = []
    with progress_bar(show_progress(args), len(samples), f"radius {loaded.name}",
                      "input") as bar:
        for i, s in enumerate(samples):
            try:
                rows.append(_one(loaded.model, an, s, methods, attacks, args, bar))
            except LipboundError as exc:
                if many:  # which of the inputs failed
                    from ..batch import name_failing_input

                    name_failing_input(exc, s.name, i)
                raise
            bar.update()
            if many:
                r = rows[-1]
                log.info("%d/%d %s: certified %.4g, attack %s", i + 1, len(samples), s.name,
                         r["certified_radius"], r["min_attack_radius"])
    total = time.perf_counter() - t0
    files: dict[str, str] = {}
    if out is not None:
        files["csv"] = str(_write_csv(out / "radius.csv", rows, methods, attacks))
        files.update(_plot(out, rows, methods, attacks, loaded.name))
    n_viol = sum(r["violation"] for r in rows)
    if args.json:
        if not many:
            obj = {"model": loaded.name, "weights": loaded.weights_source,
                   **_public(rows[0]), "seconds": total}
        else:
            obj = {"model": loaded.name, "weights": loaded.weights_source,
                   "inputs": [_public(r) for r in rows], "violations": n_viol,
                   "seconds": total}
        if files:
            obj["files"] = files
        obj["notes"] = list(loaded.notes)  # (the model's, the analyzer's caveats and ours)
        print_json(obj)
    elif not many:
        _print_one(loaded, rows[0], total)
    else:
        _print_many(loaded, rows, methods, attacks, total, files)
    n_f32 = sum(r["closer_attack_is_float32_rounding"] for r in rows)
    if n_f32:
        print(f"lipbound: note: at {n_f32} input(s) an attack found a class change closer "
              "than the certified radius that the network in exact arithmetic does not make "
              "(checked with a bound on the float64 rounding): the model's float32 rounding, "
              "which the certificate does not cover (docs/guarantees.md)", file=sys.stderr)
    if n_viol:
        print(f"lipbound: error: {n_viol} input(s) have a certified radius larger than a "
              "verified attack radius; this is a bug, please report it", file=sys.stderr)
        return 1
    return 0


def _print_one(loaded, r: dict[str, Any], total: float) -> None:
    print(f"model {loaded.name} ({loaded.weights_source}); input {r['input']}"
          + (f", label {r['label']}" if r["label"] is not None else "")
          + f", predicted class {r['predicted']} (runner-up {r['runner_up']}, margin "
          f"{r['margin']:.4g}); L2 radii in the model's input space")
    rows = []
    for c in r["_cert"]:
        # (a certified radius shown rounded down, an attack radius up: both stay bounds)
        rows.append([c.method, "certified", fmt_down(c.radius), c.guarantee_text,
                     c.n_bound_evaluations, f"{c.seconds:.2f}"])
    for a in r["_atk"]:
        rows.append([a.method, "attack", fmt_up(a.radius) if a.success else None,
                     f"class {a.original_class} -> {a.adversarial_class}" if a.success
                     else "no adversarial found", "-", f"{a.seconds:.2f}"])
    print(table(["method", "kind", "radius", "guarantee / result", "bound evals", "seconds"],
                rows))
    for c in r["_cert"]:
        for key in ("reason", "fallback"):
            if key in c.details:
                print(f"note ({c.method}): {c.details[key]}")
        # (the certifying bound's own notes: tight, global; session 26)
        for line in note_lines([(c.method, None, c.notes)], loaded.notes):
            print(line)
    cr, ma = r["certified_radius"], r["min_attack_radius"]
    top = r["_top"]
    if radius_guarantee(top) == "probabilistic lower bound":
        what = ("probabilistic lower bound, failure prob <= "
                f"{format_prob_up(top.failure_prob)}")
    else:
        what = f"{radius_guarantee(top)}, {top.guarantee_text}"
    line = f"certified radius {g_down(cr, 4)} ({r['certified_method']}; {what})"
    if ma is not None:
        line += f"; smallest attack radius {g_up(ma, 4)}" + (
            f" (gap x{ma / cr:.3g})" if cr else "")
    print(line + f"; total {total:.2f} s")
    print("a certified radius is a lower bound on the smallest class-changing L2 "
          "perturbation; an attack radius is an upper bound on it")
    for n in loaded.notes:
        print(f"note: {n}")


def _print_many(loaded, rows, methods, attacks, total, files) -> None:
    import statistics

    print(f"model {loaded.name} ({loaded.weights_source}); {len(rows)} inputs; L2 radii")
    per = []
    for i, r in enumerate(rows):
        per.append([i, r["input"], "-" if r["label"] is None else r["label"], r["predicted"],
                    *[fmt_down(_radius(r["_cert"], m)) for m in methods],
                    *([fmt_up(r["min_attack_radius"])] if attacks else []),
                    f"{r['seconds']:.2f}"])
    print(table(["#", "input", "label", "pred", *methods,
                 *(["min attack"] if attacks else []), "seconds"], per))
    print()
    summary = []
    for m in methods:
        vals = [c.radius for r in rows for c in r["_cert"] if c.method == m]
        summary.append([m, "certified", *(fmt_down(v) for v in (
            statistics.median(vals), min(vals), max(vals)))])
    for a in attacks:
        vals = [x.radius for r in rows for x in r["_atk"] if x.method == a and x.success]
        summary.append([a, "attack", *(fmt_up(v) for v in (
            (statistics.median(vals), min(vals), max(vals)) if vals else (None,) * 3))])
    print(table(["method", "kind", "median radius", "min", "max"], summary))
    guar = []
    for m in methods:
        texts = sorted({c.guarantee_text for r in rows for c in r["_cert"] if c.method == m})
        guar.append(f"{m}: {' / '.join(texts)}")
    print("certified radii are lower bounds on the smallest class-changing L2 perturbation "
          f"(per input; {'; '.join(guar)})"
          + ("; attack radii are upper bounds on it" if attacks else ""))
    n_viol = sum(r["violation"] for r in rows)
    print(f"violations (certified > attack): {n_viol}; total {total:.1f} s")
    for k, v in files.items():
        print(f"wrote {v}" + ("" if k == "csv" else f" ({k})"))


def _write_csv(path: Path, rows, methods, attacks) -> Path:
    """Write radius.csv, one row per input (every number the exact float, as ``repr``
    writes it: radii rounded to a few digits could pass the bound they stand for): index,
    input, label, predicted, margin; per
    certificate method m: m_radius; per attack a: a_radius (empty when no class change was
    found); the headline certificate (the largest certified radius): certified_radius,
    certified_method, guarantee ("certified lower bound" or "probabilistic lower bound" on
    the smallest class-changing L2 perturbation) and failure_prob (0 when certified; else
    the sum over the probabilistic methods, :func:`lipbound.radius.best`); per
    method m: m_guarantee and m_failure_prob; seconds; notes (since session 26: the
    certificates' notes joined by :data:`lipbound.batch.NOTE_SEPARATOR`, those of one method
    only prefixed ``"m: "``, see :func:`cert_notes`)."""
    from ..batch import NOTE_SEPARATOR

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "input", "label", "predicted", "margin",
                    *[f"{m}_radius" for m in methods], *[f"{a}_radius" for a in attacks],
                    "certified_radius", "certified_method", "guarantee", "failure_prob",
                    *[f"{m}_{c}" for m in methods for c in ("guarantee", "failure_prob")],
                    "seconds", "notes"])
        for i, r in enumerate(rows):
            cert = {c.method: c for c in r["_cert"]}
            atk = {a.method: a.radius for a in r["_atk"]}
            top = r["_top"]
            w.writerow([i, r["input"], "" if r["label"] is None else r["label"],
                        r["predicted"], repr(float(r["margin"])),
                        *[repr(float(cert[m].radius)) for m in methods],
                        *["" if atk.get(a) is None else repr(float(atk[a])) for a in attacks],
                        *(["", "", "", ""] if top is None else
                          [repr(float(top.radius)), top.method, radius_guarantee(top),
                           repr(float(top.failure_prob))]),
                        *[v for m in methods for v in (radius_guarantee(cert[m]),
                                                       repr(float(cert[m].failure_prob)))],
                        f"{r['seconds']:.3f}",
                        NOTE_SEPARATOR.join(cert_notes(r["_cert"]))])
    return path


def cert_notes(certs) -> list[str]:
    """The notes of one input's certificates (:class:`lipbound.radius.RadiusResult`): those
    all share (the analyzer's: the model's, a float32 model's rounding) once, then each
    method's own prefixed by its name (``"margin: tight bound (...) smaller for 9 of 9
    rows"``)."""
    if not certs:
        return []
    shared = [n for n in certs[0].notes if all(n in c.notes for c in certs)]
    own = [f"{c.method}: {n}" for c in certs for n in c.notes if n not in shared]
    return list(dict.fromkeys([*shared, *own]))


def _plot(out: Path, rows, methods, attacks, name: str) -> dict[str, str]:
    """radius.png/.pdf: per input (ranked by the largest certified radius) each certified
    radius and each attack radius, labelled with its guarantee (:func:`plotting.plot_radii`)."""
    from ..plotting import plot_radii
    from ..results import Guarantee
    from .sweep import DISPLAY_NAMES

    order = sorted(range(len(rows)), key=lambda i: _key(rows[i]))
    certified = {m: [_radius(rows[i]["_cert"], m) for i in order] for m in methods}
    found = {a: [_attack(rows[i]["_atk"], a) for i in order] for a in attacks}
    suffix = {}
    for m in methods:
        probs = [c.failure_prob for r in rows for c in r["_cert"]
                 if c.method == m and c.guarantee == Guarantee.PROBABILISTIC_LOWER]
        suffix[m] = (f" (probabilistic lower bound, p_fail ≤ {format_prob_up(max(probs))})"
                     if probs else " (certified lower bound)")
    for a in attacks:
        suffix[a] = " (verified class change: upper bound)"
    paths = plot_radii(
        certified, found, path_png=out / "radius.png", path_pdf=out / "radius.pdf",
        title=f"{DISPLAY_NAMES.get(name, name)}: certified vs attack radii "
              f"({len(rows)} input{'s' if len(rows) != 1 else ''})",
        label_suffix=suffix, violations=[bool(rows[i]["violation"]) for i in order])
    return {p.suffix[1:]: str(p) for p in paths}


def _key(r) -> float:
    v = r["certified_radius"]
    return v if v is not None else 0.0


def _radius(cert, m: str) -> float | None:
    for c in cert:
        if c.method == m:
            return c.radius
    return None


def _attack(atk, a: str) -> float | None:
    for x in atk:
        if x.method == a:
            return x.radius if x.success else None
    return None
