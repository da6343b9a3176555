"""``lipbound bound`` for many inputs: one row per input, CSV or table, and a summary.

Called by :mod:`lipbound.cli.bound` when ``--input`` names several inputs (a test-set range
such as ``mnist:test/0-99``, a folder, a CSV file, an ``.npy``/``.pt`` batch) or when
``--eps-file`` gives one radius per input.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..results import _jsonable
from .common import (
    Loaded,
    check_input_ref,
    load_model,
    note_lines,
    parse_eps_list,
    prepare_out_file,
    print_json,
    show_progress,
    table,
    tracing,
)
from .rounding import fmt_eps, fmt_up, g_up


def load_inputs(args: argparse.Namespace, loaded: Loaded) -> list:
    """All inputs named by ``--input`` (default: the zoo entry's default sample)."""
    from ..inputs import load_samples

    ref = args.input
    if ref is None:
        if loaded.entry is None:
            extra = ("; --out writes one row per input: drop --out for a global bound alone"
                     if getattr(args, "method", None) == "global" else "")
            raise InputError("a user model has no default input: give --input (a folder, "
                             "CSV, .npy/.pt batch or image file)" + extra)
        ref = loaded.entry.default_sample
    check_input_ref(args, loaded, ref)
    samples = load_samples(ref, **loaded.sample_kwargs())
    if not samples:
        raise InputError(f"--input {ref!r} names no inputs")
    return samples


def read_eps_file(path: str | Path, keys: dict[str, list[str]] | None = None) -> list[float]:
    """Radii from a text file (one number per line; blank lines and ``#`` comments are
    skipped) or a CSV file with a header that has a column ``eps``. ``keys``: a dict that
    receives the CSV's ``index`` and ``name`` columns, where it has them (see
    :func:`check_eps_order`).

    Raises:
        InputError: missing file, no ``eps`` column, a value that is not a positive finite
            number (the line is named).
    """
    from ..validation import check_eps

    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise InputError(f"--eps-file {p} {what}; give a text file with one radius per line "
                         "(or a CSV file with a column 'eps')")
    try:
        text = p.read_text(encoding="utf-8-sig")  # (a byte order mark, as spreadsheets write)
    except UnicodeDecodeError as exc:
        raise InputError(f"--eps-file {p} is not a UTF-8 text file ({exc.reason} at byte "
                         f"{exc.start}); give a text file with one radius per line (or a "
                         "CSV file with a column 'eps'), not an array file") from None
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise InputError(f"--eps-file {p} holds no radii; write one number per line")
    first = lines[0][1]
    try:
        float(first.split(",")[0])
        has_header = False
    except ValueError:
        has_header = True
    values: list[float] = []
    if has_header:
        reader = csv.DictReader(io.StringIO("\n".join(ln for _, ln in lines)))
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "eps" not in cols:
            raise InputError(f"--eps-file {p}: the header has no column 'eps' (columns: "
                             f"{', '.join(reader.fieldnames or [])}); name the radius column "
                             "'eps' or write one number per line")
        for k, row in enumerate(reader):
            line_no = lines[k + 1][0]
            values.append(_number(row[cols["eps"]], p, line_no, check_eps))
            if keys is not None:
                for key in ("index", "name"):
                    if key in cols:
                        keys.setdefault(key, []).append((row[cols[key]] or "").strip())
    else:
        for line_no, ln in lines:
            if "," in ln:
                raise InputError(f"--eps-file {p}, line {line_no}: {ln!r} has several fields "
                                 "but the file has no header; add a header with a column "
                                 "'eps' or write one number per line")
            values.append(_number(ln, p, line_no, check_eps))
    return values


def check_eps_order(path: str | Path, keys: dict[str, list[str]], names: list[str]) -> None:
    """Radii are matched to the inputs by position. A radius file that lists the inputs
    (an ``index`` column, or a ``name`` column holding exactly the inputs' names, as the CSV
    of ``lipbound bound --out`` does) in another order would give each input another one's
    radius: refused."""
    idx = keys.get("index")
    if idx is not None and idx != [str(i) for i in range(len(names))]:
        raise InputError(f"--eps-file {path}: its 'index' column is not 0, 1, 2, ... in order "
                         f"(it starts {', '.join(idx[:4])}); radii are matched to the inputs "
                         "by position: sort the rows by index, or drop the column")
    given = keys.get("name")
    if given is not None and given != names and sorted(given) == sorted(names):
        k = next(i for i, (a, b) in enumerate(zip(given, names, strict=True)) if a != b)
        raise InputError(f"--eps-file {path}: its 'name' column lists the inputs in another "
                         f"order (row {k + 1} names {given[k]!r}, input {k} is {names[k]!r}); "
                         "radii are matched to the inputs by position: sort the rows in the "
                         "inputs' order, or drop the column")


def _number(s: str | None, p: Path, line_no: int, check) -> float:
    if s is None or not s.strip():
        raise InputError(f"--eps-file {p}, line {line_no}: the radius is missing (an empty "
                         "field); give one positive number per input")
    try:
        v = float(s.strip())
    except ValueError as exc:
        raise InputError(f"--eps-file {p}, line {line_no}: {s!r} is not a number") from exc
    return check(v, f"radius on line {line_no} of {p}")


def _radii(args: argparse.Namespace, names: list[str]) -> list[list[float] | float]:
    """Per run: the radius for all inputs, or one list with one radius per input (``names``:
    the inputs')."""
    n = len(names)
    from ..validation import check_eps

    if args.eps_file:
        if args.eps is not None or args.eps_list is not None:
            raise InputError("give either --eps-file or --eps/--eps-list, not both")
        keys: dict[str, list[str]] = {}
        values = read_eps_file(args.eps_file, keys)
        if len(values) != n:
            raise InputError(f"--eps-file {args.eps_file} has {len(values)} radii but --input "
                             f"names {n} input(s); give exactly one radius per input")
        check_eps_order(args.eps_file, keys, names)
        return [values]
    if args.eps_list is not None:
        return parse_eps_list(args.eps_list)
    return [check_eps(args.eps if args.eps is not None else 0.1, "--eps")]


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def write_rows_csv(rows, fh) -> None:
    """Write rows (:class:`lipbound.batch.InputBound`) as CSV with a header (the last column,
    ``notes``: a row's notes joined by :data:`lipbound.batch.NOTE_SEPARATOR`)."""
    from ..batch import COLUMNS, NOTE_SEPARATOR

    w = csv.writer(fh)
    w.writerow(COLUMNS)
    for r in rows:
        d = r.to_dict()
        d["notes"] = NOTE_SEPARATOR.join(d["notes"])
        w.writerow([_cell(d[c]) for c in COLUMNS])


def run_many(args: argparse.Namespace, loaded: Loaded | None = None) -> int:
    """Bounds for every input named by ``--input`` (see the module docstring); ``loaded``:
    the model when the caller has loaded it already (loaded once: its seeds settled once)."""
    import time

    from ..analyzer import Analyzer
    from ..batch import bound_many, summarize
    from .exact_memory import check_exact_global_fits

    t0 = time.perf_counter()
    out = prepare_out_file(args.out) if args.out else None  # before the work, not after
    if args.eps_list is not None and not args.eps_file:
        parse_eps_list(args.eps_list)  # a bad list is reported before loading anything
    if loaded is None:
        loaded = load_model(args)
    samples = load_inputs(args, loaded)
    runs = _radii(args, [s.name for s in samples])
    method = getattr(args, "method", "local")
    spectral = getattr(args, "spectral", "auto")
    with tracing(args, loaded.name):
        an = Analyzer(loaded.model, loaded.input_shape, spectral=spectral,
                      failure_prob=getattr(args, "failure_prob", 1e-6), seed=args.seed,
                      name=loaded.name, notes=loaded.notes)
    # bound_many computes the global factors in every case (share_global)
    check_exact_global_fits(an, spectral=spectral)
    timings: dict[str, float] = {}
    progress = show_progress(args)
    rows = []
    if method in ("global", "both"):
        rows += bound_many(an, samples, None, "global", timings=timings, progress=progress)
    if method in ("local", "both"):
        for eps in runs:
            rows += bound_many(an, samples, eps, "local", timings=timings, progress=progress,
                               tight=getattr(args, "tight", False),
                               tight_rows=getattr(args, "tight_rows", None))
    summary: dict[str, Any] = {"n_inputs": len(samples), "model": loaded.name,
                               "weights": loaded.weights_source,
                               "setup_seconds": timings.get("setup_seconds", 0.0),
                               "total_seconds": time.perf_counter() - t0,
                               "methods": summarize(rows)}
    if out is not None:
        with out.open("w", newline="") as fh:
            write_rows_csv(rows, fh)
    if args.json:
        # (the summary's min / median / max of infinite bounds: "inf", as in the rows)
        print_json({"rows": [r.to_dict() for r in rows], "summary": _jsonable(summary),
                    "notes": list(an.notes)})
        return 0
    print(f"model {loaded.name} ({loaded.weights_source}); {len(samples)} input(s) from "
          f"{args.input or 'the default sample'}")
    if not args.out:
        print(table(["index", "name", "label", "predicted", "eps", "method", "bound",
                     "guarantee", "p_fail", "seconds"],
                    # (upper bounds and failure probabilities shown rounded up)
                    [[r.index, r.name, r.label, r.predicted, fmt_eps(r.eps), r.method,
                      fmt_up(r.bound), r.guarantee.value, fmt_up(r.failure_prob),
                      f"{r.seconds:.3f}"]
                     for r in rows]))
        print()
    for m, s in summary["methods"].items():
        acc = f", accuracy {s['accuracy']:.3f}" if "accuracy" in s else ""
        print(f"{m}: {s['n']} bound(s); seconds min {s['seconds']['min']:.3f} / median "
              f"{s['seconds']['median']:.3f} / max {s['seconds']['max']:.3f}; bound min "
              f"{g_up(s['bound']['min'], 6)} / median {g_up(s['bound']['median'], 6)} / max "
              f"{g_up(s['bound']['max'], 6)}; {', '.join(s['guarantees'])}{acc}")
    print(f"shared setup (tracing, global factors, predictions) {summary['setup_seconds']:.2f} s;"
          f" total {summary['total_seconds']:.2f} s")
    for n in an.notes:  # (the model's, and the analyzer's: a float32 model's rounding)
        print(f"note: {n}")
    # (each row's own notes: tight, global reported)
    own = note_lines(((f"input {r.name}" + (f", eps {fmt_eps(r.eps)}" if r.eps is not None
                                            else "") + f", {r.method}", None, r.notes)
                      for r in rows), an.notes)
    if args.out and own:
        print(f"note: {len(own)} note(s) of single rows (tight bound, global bound reported): "
              f"see the column 'notes' of {args.out}")
    elif own:
        print("\n".join(own))
    if args.out:
        print(f"wrote {args.out}", file=sys.stdout)
    return 0
