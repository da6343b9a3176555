"""Measure the tight local bound's value, time and peak memory for one case, in this process
(run each case in a fresh process: the peak RSS is the process's). One thread. Run with a
checkout's ``src`` on PYTHONPATH:

    PYTHONPATH=src .venv/bin/python benchmarks/tight_mem.py cifar10 cifar10:dog 1e-2 \
        [--rows 20000] [--bytes 8589934592]

Prints one JSON line: value, seconds (the tight ``local_bound`` on a fresh analyzer, the
propagation included), ru_maxrss before and after it (MiB), the tight bound's note and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from lipbound import Analyzer
from lipbound.inputs import load_sample
from lipbound.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("input")
    ap.add_argument("eps", type=float)
    ap.add_argument("--rows", type=int, default=None, help="tight_rows (default: the library's)")
    ap.add_argument("--bytes", type=int, default=None,
                    help="the rows' memory cap (default: the library's DEFAULT_BYTES)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.bytes is not None:
        import lipbound.tight as tight

        kw = dict(tight.tight_local_bound.__kwdefaults__)
        kw["max_bytes"] = args.bytes
        tight.tight_local_bound.__kwdefaults__ = kw
    lm = load_model(args.model)
    x0 = load_sample(args.input, entry=lm.entry).x
    an = Analyzer(lm.model, tuple(x0.shape[1:]))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kw = {} if args.rows is None else {"tight_rows": args.rows}
    t = time.perf_counter()
    res = an.local_bound(x0, args.eps, tight=True, **kw)
    sec = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    note = next((n for n in res.notes if "tight bound" in n), "")
    print(json.dumps({"model": args.model, "input": args.input, "eps": args.eps,
                      "rows": args.rows, "bytes": args.bytes, "value": res.value,
                      "seconds": sec, "rss_before_mib": rss0, "rss_peak_mib": rss1,
                      "load": os.getloadavg()[0], "note": note}), flush=True)


if __name__ == "__main__":
    main()
