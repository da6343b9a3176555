"""A small CIFAR-10 ResNet (ResNet-8 layout: a 3x3 stem and three torchvision-style
BasicBlocks of 16, 32 and 64 channels, 1x1-convolution + batch-norm shortcuts where the shape
changes) with seeded random weights, for lipbound's residual-network support:

    lipbound bound --model examples/resnet_cifar.py:make --input cifar10:test/3 --eps 0.01
    lipbound radius --model examples/resnet_cifar.py:make --input cifar10:test/3

The model normalises its input itself (``lipbound.Normalize``), so it takes CIFAR-10 pixels in
[0, 1]. Train it (or load your own weights) before reading anything into its bounds: with
random weights they only show what lipbound computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lipbound

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet8(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.norm = lipbound.Normalize(CIFAR_MEAN, CIFAR_STD)
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2),
                                    BasicBlock(32, 64, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(self.norm(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def make(seed: int = 0) -> dict:
    """The network with weights and batch-norm statistics drawn from ``seed``, in eval mode,
    its input shape, and mean 0 / std 1: it takes pixels in [0, 1] and normalises them
    itself (what ``lipbound --model FILE:make`` reads)."""
    g = torch.Generator().manual_seed(seed)
    model = ResNet8()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return {"model": model.eval(), "input_shape": (3, 32, 32), "mean": 0.0, "std": 1.0}
