"""The shortest path from "I have a model" to a sound number.

A small convolutional network defined right here, its global Lipschitz bound, its local
bound at a few radii around one input, and its certified robustness radius.

Run:  .venv/bin/python examples/simple_example.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound.radius import certified_radius


class SmallConvNet(nn.Module):
    """A user's own network: conv - relu - maxpool - conv - relu - flatten - linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def main() -> None:
    torch.manual_seed(0)
    model = SmallConvNet().eval()          # bounds need eval mode
    x0 = torch.randn(1, 1, 28, 28)         # the nominal input, with a batch dimension of 1

    analyzer = lipbound.Analyzer(model, input_shape=(1, 28, 28))
    g = analyzer.global_bound()
    print(f"global bound: {g.value:.4f} ({g.guarantee.value})")
    for eps in (0.01, 0.1, 1.0):
        r = analyzer.local_bound(x0, eps)
        print(f"local bound at eps={eps:<5}: {r.value:.4f} ({r.guarantee.value})")

    for method in ("global", "local", "margin"):
        rad = certified_radius(model, x0, analyzer=analyzer, method=method)
        print(f"certified radius ({method}): {rad.radius:.4g} ({rad.guarantee_label})")


if __name__ == "__main__":
    main()
