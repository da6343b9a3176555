"""Per-layer CPU-time breakdown of one local or global bound (where the time goes).

Wraps the analyzer's building blocks with timers (exclusive times: a nested call is not
counted twice) and prints, for every block, the seconds spent in the forward pass, the row
norms, the layer and transposed-layer applications (``mv``/``rmv``: Lanczos products or
materialisation), dense materialisation, SVDs, the rest of a Lanczos run (``run_lanczos``)
(re-orthogonalisation, Rayleigh-Ritz) and the FFT-circulant bound. It patches library
internals, so it is a development tool, not part of the package; names that no longer exist
are skipped.

Usage::

    .venv/bin/python benchmarks/profile_layers.py cifar10 local --eps 0.1
    .venv/bin/python benchmarks/profile_layers.py alexnet global --threads 1
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import lipbound.analyzer as az  # noqa: E402
import lipbound.blocks as bl  # noqa: E402
import lipbound.spectral as sp  # noqa: E402
from lipbound._memory import keep_freed_memory  # noqa: E402
from lipbound.inputs import load_sample  # noqa: E402
from lipbound.zoo import load_model  # noqa: E402

CATS = ["forward", "row_norms", "mv", "rmv", "materialize", "svd", "lanczos_other", "fft"]
T: dict = collections.defaultdict(float)
N: dict = collections.defaultdict(int)
_stack: list[str] = []
_cur: list = [None]


def _wrap(owner, name: str, cat: str) -> None:
    f = getattr(owner, name, None)
    if f is None:
        print(f"(no {getattr(owner, '__name__', owner)}.{name}; not timed)", file=sys.stderr)
        return

    def timed(*a, **k):
        t = time.process_time()
        _stack.append(cat)
        try:
            return f(*a, **k)
        finally:
            dt = time.process_time() - t
            _stack.pop()
            T[(_cur[0], cat)] += dt
            N[(_cur[0], cat)] += 1
            if _stack:
                T[(_cur[0], _stack[-1])] -= dt

    setattr(owner, name, timed)


def _label_blocks() -> None:
    orig_aff = az.Analyzer._affine_local

    def aff(self, b, i, *a, **k):
        _cur[0] = (i, b.name)
        return orig_aff(self, b, i, *a, **k)

    az.Analyzer._affine_local = aff
    # a global factor starts in _lanczos_first (when it exists) or _block_alternatives
    for meth in ("_lanczos_first", "_block_alternatives"):
        orig = getattr(az.Analyzer, meth, None)
        if orig is None:
            continue

        def labelled(self, b, *a, _orig=orig, **k):
            _cur[0] = (self.blocks.index(b), b.name)
            return _orig(self, b, *a, **k)

        setattr(az.Analyzer, meth, labelled)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("what", choices=["local", "global"])
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    keep_freed_memory()  # as the lipbound command does (lipbound._memory)
    _wrap(bl.AffineBlock, "forward", "forward")
    _wrap(bl.AffineBlock, "sq_rows", "row_norms")
    _wrap(bl.AffineBlock, "lin", "mv")
    _wrap(bl.AffineBlock, "lin_t", "rmv")
    _wrap(sp, "_materialize", "materialize")
    _wrap(sp, "exact_norm", "svd")
    _wrap(sp, "run_lanczos", "lanczos_other")
    for name in ("circulant_probe", "circulant_hint", "circulant_norm_bound"):
        if hasattr(az, name):
            _wrap(az, name, "fft")
    _label_blocks()

    lm = load_model(ns.model)
    x0 = load_sample(lm.entry.default_sample, entry=lm.entry).x
    t = time.process_time()
    an = az.Analyzer(lm.model, lm.entry.input_shape)
    trace = time.process_time() - t
    T.clear()
    N.clear()
    t = time.process_time()
    r = an.local_bound(x0, ns.eps) if ns.what == "local" else an.global_bound()
    total = time.process_time() - t
    print(f"{ns.model} {ns.what} (eps {ns.eps if ns.what == 'local' else '-'}), "
          f"{torch.get_num_threads()} thread(s): {total:.3f} CPU-s (analyzer {trace:.3f} s); "
          f"bound {r.value:.6g} {r.guarantee.value}; load {os.getloadavg()[0]:.1f}")
    lf = {lay.index: lay for lay in r.layers}
    blocks = sorted({k[0] for k in T if k[0] is not None}, key=lambda x: x[0])
    head = f"{'block':32s} {'route':14s} {'active in/out':>16s} "
    print(head + " ".join(f"{c[:11]:>11s}" for c in CATS) + f" {'sum':>8s}")
    acc = 0.0
    for bk in blocks:
        row = [T[(bk, c)] for c in CATS]
        acc += sum(row)
        lay = lf.get(bk[0])
        route = lay.spectral_method if lay else "?"
        act = f"{lay.active_in}/{lay.active_out}" if lay else ""
        print(f"{bk[1][:32]:32s} {route:14s} {act:>16s} "
              + " ".join(f"{v:11.4f}" for v in row) + f" {sum(row):8.4f}")
    print(f"accounted {acc:.3f} of {total:.3f} CPU-s; operator applications per block: "
          + str({bk[0]: N[(bk, 'mv')] + N[(bk, 'rmv')] for bk in blocks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
