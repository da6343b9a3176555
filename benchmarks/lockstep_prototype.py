"""Prototype measured in session 7 and not adopted: ``K`` independent single-vector Lanczos
runs on masked operators ``R_k A D_k`` of one 3x3 convolution, advanced in lockstep (one
batched convolution per step for all ``K``, batched Gram-Schmidt, per-run stand-in checks),
against ``K`` runs of the engine (``lipbound.lanczos.run_lanczos``) on the same operators.
A development measurement (no bound is reported); see benchmarks/README.md, "Measured for the
open decisions".

Usage::

    .venv/bin/python benchmarks/lockstep_prototype.py THREADS C_IN C_OUT SIDE STEPS
    .venv/bin/python benchmarks/lockstep_prototype.py 2 32 32 30 32   # CIFAR-10 conv2-sized
    .venv/bin/python benchmarks/lockstep_prototype.py 2 3 32 32 52    # CIFAR-10 conv1-sized
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lipbound._memory import keep_freed_memory  # noqa: E402
from lipbound.lanczos import run_lanczos  # noqa: E402


def main() -> int:
    threads, ci, co, hw, steps = (int(a) for a in sys.argv[1:6])
    torch.set_num_threads(threads)
    keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / 20
    w_flip = w.flip(2, 3).transpose(0, 1).contiguous()
    ho = hw - 2
    n = ci * hw * hw

    def conv(x):
        return F.conv2d(x, w)

    def conv_t(y):
        return F.conv2d(y, w_flip, padding=2)

    def masks(k: int):
        d = (torch.rand(k, ci, hw, hw, generator=g, dtype=torch.float64) < 0.7).double()
        r = (torch.rand(k, co, ho, ho, generator=g, dtype=torch.float64)
             * (torch.rand(k, co, ho, ho, generator=g) < 0.6))
        return d, r

    def lockstep(ds, rs, n_steps: int) -> None:
        k = ds.shape[0]
        d = ds.reshape(k, -1)
        q = torch.empty(k, n_steps + 1, n, dtype=torch.float64)
        v = torch.randn(k, n, generator=g, dtype=torch.float64) * d
        q[:, 0] = v / v.norm(dim=1, keepdim=True)
        beta_prev = torch.zeros(k, 1, dtype=torch.float64)
        al, be = [], []
        for j in range(n_steps):
            qj = q[:, j]
            u = conv((qj * d).reshape(k, ci, hw, hw)) * rs
            wv = conv_t(u * rs).reshape(k, -1) * d
            if j > 0:
                wv -= beta_prev * q[:, j - 1]
            alpha = (wv * qj).sum(1, keepdim=True)
            wv -= alpha * qj
            basis = q[:, :j + 1]
            coef = torch.bmm(basis, wv.unsqueeze(2))
            wv -= torch.bmm(basis.transpose(1, 2), coef).squeeze(2)
            beta = wv.norm(dim=1, keepdim=True)
            torch.div(wv, beta, out=q[:, j + 1])
            beta_prev = beta
            al.append(alpha)
            be.append(beta)
            if j % 4 == 3:  # stand-in for the per-run checks: one small eigvalsh each
                a_, b_ = torch.cat(al, 1), torch.cat(be, 1)
                for i in range(k):
                    t = (torch.diag(a_[i]) + torch.diag(b_[i, :-1], 1)
                         + torch.diag(b_[i, :-1], -1))
                    torch.linalg.eigvalsh(t)

    def engine(ds, rs, n_steps: int) -> None:
        for i in range(ds.shape[0]):
            r = rs[i:i + 1]
            cols = torch.nonzero(ds[i].reshape(-1) > 0).reshape(-1)

            def mv(v, r=r, cols=cols):
                x = torch.zeros(v.shape[0], n, dtype=torch.float64)
                x[:, cols] = v
                return (conv(x.reshape(-1, ci, hw, hw)) * r).reshape(v.shape[0], -1)

            def rmv(y, r=r, cols=cols):
                return conv_t(y.reshape(-1, co, ho, ho) * r).reshape(y.shape[0], -1)[:, cols]

            run_lanczos(mv, rmv, cols.numel(), n_steps, torch.Generator().manual_seed(i), "cpu")

    for k in (1, 8, 16, 30):
        ds, rs = masks(k)
        lockstep(ds, rs, 4)  # warm-up
        t = time.perf_counter()
        lockstep(ds, rs, steps)
        tl = time.perf_counter() - t
        t = time.perf_counter()
        engine(ds, rs, steps)
        te = time.perf_counter() - t
        print(f"K={k}: lockstep {tl / k * 1e3:.2f} ms/run, engine {te / k * 1e3:.2f} ms/run, "
              f"ratio {te / tl:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
