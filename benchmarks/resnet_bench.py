"""Time lipbound's residual-network bounds on a ResNet-20-style CIFAR-10 net (session 26).

The net: a 3x3 stem convolution (16 channels) with batch norm and ReLU, three stages of three
BasicBlocks (16, 32, 64 channels; the first block of stages 2 and 3 halves the resolution, its
shortcut a 1x1 convolution with batch norm), global average pooling and a 10-way linear layer:
the ResNet-20 of He et al. 2016 with 1x1-convolution shortcuts, float32, random weights from a
fixed seed (batch-norm statistics drawn at random too, so the layers are not identities).

Prints one line of JSON: the medians over ``--repeat`` runs (each on a fresh
``ResidualAnalyzer``, built off the clock; its build time is ``intake_s``) of a local bound at
``--eps`` (default 0.1) and of the global bound, the first (cold) local bound of the process
including the analyzer's build, a second local bound on the same analyzer at another eps
(``local_reuse_s``: what a radius search or sweep pays per bound), and the values. Run it in
a fresh process::

    .venv/bin/python benchmarks/resnet_bench.py --repeat 3 --threads 1

Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from resnet_cifar import BasicBlock  # noqa: E402  (the example's block: one definition)


class ResNet20(nn.Module):
    def __init__(self, n: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for k in range(n):
                blocks.append(BasicBlock(cin, cout, stride if k == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))


def make_model(seed: int = 0) -> nn.Module:
    """The seeded ResNet-20-style net (float32, eval mode)."""
    torch.manual_seed(seed)
    model = ResNet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from lipbound.residual import ResidualAnalyzer

    model = make_model(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.rand(1, 3, 32, 32, generator=gen)

    t = time.perf_counter()
    ra = ResidualAnalyzer(model, (3, 32, 32))
    r = ra.local_bound(x0, args.eps)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    r2 = ra.local_bound(x0, args.eps / 10)
    reuse = time.perf_counter() - t

    intake, local, glob = [], [], []
    value_local = value_global = None
    for _ in range(args.repeat):
        t = time.perf_counter()
        ra = ResidualAnalyzer(model, (3, 32, 32))
        intake.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = ra.local_bound(x0, args.eps)
        local.append(time.perf_counter() - t)
        value_local = r.value
        ra = ResidualAnalyzer(model, (3, 32, 32))
        t = time.perf_counter()
        g = ra.global_bound()
        glob.append(time.perf_counter() - t)
        value_global = g.value
    print(json.dumps({
        "model": f"resnet20-cifar (random weights, seed {args.seed})",
        "threads": torch.get_num_threads(), "eps": args.eps, "repeat": args.repeat,
        "intake_s": statistics.median(intake), "local_s": statistics.median(local),
        "global_s": statistics.median(glob), "cold_local_s": cold,
        "local_reuse_s": reuse,
        "local": value_local, "local_guarantee": r.guarantee.value,
        "local_failure_prob": r.failure_prob,
        "local_eps_div_10": r2.value, "global": value_global,
        "global_guarantee": g.guarantee.value,
    }))


if __name__ == "__main__":
    main()
