"""Measurement for notes/residual_proposal.md (session 26): lipbound's residual bounds on a
small CIFAR-style ResNet (random weights, batch-norm statistics drawn at random), against
the best lower bound. Run: ``.venv/bin/python notes/residual_measure.py``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound.lower import best_lower_bound

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from resnet_bench import BasicBlock  # noqa: E402  (the benchmark's block: one definition)


class ResNet8(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layers = nn.ModuleList([BasicBlock(16, 16), BasicBlock(16, 32, 2),
                                     BasicBlock(32, 64, 2)])
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for b in self.layers:
            x = b(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))


def main() -> None:
    torch.manual_seed(0)
    model = ResNet8()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x0 = torch.rand(1, 3, 32, 32)
    t = time.perf_counter()
    g = lipbound.global_bound(model, (3, 32, 32))
    print(f"global {g.value:.4g} ({g.guarantee.value}, {time.perf_counter() - t:.1f} s)")
    for eps in (1e-3, 1e-2, 0.1, 1.0):
        t = time.perf_counter()
        r = lipbound.local_bound(model, x0, eps)
        tl = time.perf_counter() - t
        t = time.perf_counter()
        lb = best_lower_bound(model, x0, eps)
        print(f"eps {eps:g}: local {r.value:.4g} ({r.guarantee.value}, p_fail "
              f"{r.failure_prob:.2g}, {tl:.1f} s), best lower {lb.value:.4g} "
              f"({time.perf_counter() - t:.1f} s), ratio {r.value / lb.value:.2f}; stage "
              f"factors {', '.join(f'{lf.local:.3g}' for lf in r.layers)}")


if __name__ == "__main__":
    main()
