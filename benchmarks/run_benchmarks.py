"""Benchmark suite of lipbound (``make bench``).

For each network (MNIST LeNet, CIFAR-10 net, AlexNet, VGG-16 at 224x224) one local and one
global bound are timed, each quantity in a fresh subprocess (``lipbound bench ... --json``) so
that the peak memory is that network's own. Also timed: a 30-radius sweep on one analyzer
(MNIST, CIFAR-10), in units of one local bound measured in the same process, and certifying
the 100 shipped MNIST test images when ``lipbound.radius`` exists.

Prints a table per network (median / min / max seconds, peak memory, target, ratio) and
writes ``benchmarks/results.json``. Timings on a shared machine are noisy: the load average
is recorded with every number; compare numbers from the same run only.

Usage::

    .venv/bin/python benchmarks/run_benchmarks.py                    # everything, 5 runs
    .venv/bin/python benchmarks/run_benchmarks.py --quick            # 2 runs, small nets
    .venv/bin/python benchmarks/run_benchmarks.py --models mnist,cifar10 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("mnist", "cifar10", "alexnet", "vgg16")
SWEEP_MODELS = ("mnist", "cifar10")
BIG_MODELS = ("alexnet", "vgg16")
CLI = "import sys; from lipbound.cli import main; sys.exit(main())"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_cli(args: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run ``lipbound <args> --json`` in a fresh interpreter; (parsed JSON or None, error)."""
    cmd = [sys.executable, "-c", CLI, *args, "--json"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env=_env(), check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return None, f"exit code {proc.returncode}: " + " | ".join(tail)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        return None, f"bad JSON ({exc}): {proc.stdout[-300:]!r}"
    out["process_wall_seconds"] = wall
    return out, ""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _common(ns: argparse.Namespace) -> list[str]:
    out = ["--device", ns.device]
    if ns.threads is not None:
        out += ["--threads", str(ns.threads)]
    if ns.spectral != "auto":
        out += ["--spectral", ns.spectral]
    return out


def _network(model: str, ns: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    if model in BIG_MODELS:
        # one bound takes half a minute: fewer timed runs (after the untimed cold run, whose
        # time -- analyzer construction included -- is reported as "cold s")
        extra = ["--repeat", str(min(ns.repeat, ns.repeat_big))]
    else:
        extra = ["--repeat", str(ns.repeat)]
    for what in ns.what:
        print(f"  {model} {what} ...", file=sys.stderr, flush=True)
        res, err = _run_cli(["bench", "--model", model, "--what", what, *extra, *_common(ns)],
                            ns.timeout)
        rows[what] = res if res is not None else {"model": model, "what": what, "error": err}
    return rows


def _print_network(model: str, rows: dict[str, Any]) -> None:
    first = next((r for r in rows.values() if "error" not in r), None)
    weights = first.get("weights", "") if first else ""
    print(f"\n== {model} ({weights}) ==")
    table_rows = []
    for what, r in rows.items():
        if "error" in r:
            table_rows.append([what, "error: " + r["error"]] + [None] * 11)
            continue
        mem_t = r.get("target_memory_mb")
        table_rows.append([what, r["median_seconds"], r["min_seconds"], r["max_seconds"],
                           r.get("cpu_median_seconds"), r["cold_seconds"], r["peak_memory_mb"],
                           mem_t, r["target_seconds"],
                           r["ratio_to_target"], r["value"], r["guarantee"],
                           f"{r['load_average'][0]:.1f}->{r['load_average'][1]:.1f}"])
    print(_table(["quantity", "median s", "min s", "max s", "cpu s", "cold s", "peak MB",
                  "target MB",
                  "target s", "ratio", "value", "guarantee", "load"], table_rows))
    for r in rows.values():
        if "error" not in r:
            print(f"  {r['what']}: runs {[round(x, 4) for x in r['runs']]}, threads "
                  f"{r['threads']}, spectral routes {r['layer_methods']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated zoo networks (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed runs per quantity (default 5; 2 with --quick)")
    p.add_argument("--repeat-big", type=int, default=3,
                   help="at most this many timed runs for AlexNet and VGG-16, after the "
                        "untimed cold run (default 3)")
    p.add_argument("--what", default="local,global",
                   help="quantities to time, each in its own process (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="2 runs per quantity; unless --models is given only mnist,cifar10")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch and numpy/scipy's BLAS) in the benchmark "
                        "processes (default: the CLI's auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--spectral", default="auto", choices=["auto", "exact", "lanczos"])
    p.add_argument("--sweep-points", type=int, default=30, help="radii in the sweep (30)")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep benchmark")
    p.add_argument("--no-radius", action="store_true", help="skip the radius benchmark")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds allowed to each benchmark process (default 3600)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"),
                   help="where to write the JSON results (default benchmarks/results.json)")
    ns = p.parse_args(argv)
    models_given = any(a == "--models" or a.startswith("--models=") for a in (argv or sys.argv))
    if ns.repeat is None:
        ns.repeat = 2 if ns.quick else 5
    models = [m.strip() for m in ns.models.split(",") if m.strip()]
    ns.what = [w.strip() for w in ns.what.split(",") if w.strip()]
    if not ns.what or any(w not in ("local", "global") for w in ns.what):
        p.error("--what takes local, global or local,global")
    if ns.quick and not models_given:
        models = [m for m in models if m in SWEEP_MODELS]
    if ns.repeat < 1 or ns.repeat_big < 1:
        p.error("--repeat and --repeat-big must be >= 1")
    if not ns.no_sweep and ns.sweep_points < 2:
        p.error(f"--sweep-points must be >= 2 (got {ns.sweep_points}); or give --no-sweep")

    from lipbound.bench import cpu_model  # (imports torch: after the arguments are checked)

    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    la_start = _loadavg()
    print(f"lipbound benchmarks: {', '.join(models)}; {ns.repeat} timed runs per quantity; "
          f"load average {la_start:.2f} on {os.cpu_count()} CPUs ({cpu_model()})", flush=True)
    results: dict[str, Any] = {}
    for m in models:
        results[m] = _network(m, ns)
        _print_network(m, results[m])

    sweeps: dict[str, Any] = {}
    if not ns.no_sweep:
        for m in [m for m in models if m in SWEEP_MODELS]:
            print(f"  {m} sweep ...", file=sys.stderr, flush=True)
            res, err = _run_cli(["bench", "--model", m, "--what", "local", "--repeat",
                                 str(ns.repeat), "--sweep", str(ns.sweep_points),
                                 *_common(ns)], ns.timeout)
            sweeps[m] = (res.get("sweep") or {"error": "no sweep in the output"}) \
                if res is not None else {"error": err}
        if sweeps:
            print(f"\n== sweep of {ns.sweep_points} radii on one analyzer "
                  "(target <= 10 local bounds) ==")
            print(_table(["network", "sweep s", "one local s", "cost (local bounds)",
                          "cost (CPU time)", "target", "load"],
                         [[m, s.get("total_seconds"), s.get("local_median_seconds"),
                           s.get("cost_in_local_bounds"), s.get("cpu_cost_in_local_bounds"),
                           s.get("target_units"),
                           f"{s['load_average'][0]:.1f}->{s['load_average'][1]:.1f}"]
                          if "error" not in s else [m, "error: " + s["error"], None, None,
                                                    None, None, None]
                          for m, s in sweeps.items()]))

    radius: dict[str, Any] | None = None
    if not ns.no_radius and "mnist" in models:
        print("  mnist radius ...", file=sys.stderr, flush=True)
        res, err = _run_cli(["bench", "--model", "mnist", "--what", "local", "--repeat", "1",
                             "--radius-images", "100", *_common(ns)], ns.timeout)
        if res is None:
            radius = {"error": err}
        else:
            radius = res.get("radius") or {"skipped": "lipbound.radius is not available"}
        print("\n== certified radius of the 100 MNIST test images (target <= 10 s) ==")
        if "total_seconds" in radius:
            per = radius["per_image_seconds"]
            print(f"total {radius['total_seconds']:.3f} s, CPU {radius['cpu_total_seconds']:.3f} s"
                  f" (analyzer {radius['trace_seconds']:.3f}"
                  f" s; per image median {statistics.median(per):.4f} s, max "
                  f"{max(per):.4f} s)")
        else:
            print(radius)

    la_end = _loadavg()
    summary = []
    for m, rows in results.items():
        for what, r in rows.items():
            if "error" not in r:
                summary.append([m, what, r["median_seconds"], r.get("cpu_median_seconds"),
                                r["target_seconds"],
                                r["ratio_to_target"], r["peak_memory_mb"],
                                r.get("target_memory_mb"), r.get("memory_ratio_to_target")])
    print("\n== summary ==")
    print(_table(["network", "quantity", "median s", "cpu s", "target s", "ratio", "peak MB",
                  "target MB", "memory ratio"], summary))
    print(f"load average (1 min): {la_start:.2f} at start, {la_end:.2f} at end")
    doc = {
        "started": started,
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "argv": argv if argv is not None else sys.argv[1:],
        "repeat": ns.repeat,
        "threads": ns.threads,
        "load_average": {"start": la_start, "end": la_end},
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "results": results,
        "sweep": sweeps,
        "radius": radius,
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
