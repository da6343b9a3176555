"""Network architectures of the model zoo.

All networks are plain chains of layers written as :class:`torch.nn.Sequential` subclasses
with named children, so their state-dict keys are ``conv1.weight``, ``fc1.bias``, ... (the
networks of Avant & Morgansen, *Analytical Bounds on the Local Lipschitz Constants of ReLU
Networks*, IEEE TNNLS 2023) or ``features.0.weight``, ``classifier.6.bias``, ... (the
torchvision layouts of AlexNet and VGG-16, so that torchvision weight files load unchanged).

The networks take the *normalised* input (after ``(pixel / 255 - mean) / std``); the
normalisation is not part of the modules. Every ReLU is its own ``nn.ReLU`` module
(never in-place) and flattening is an ``nn.Flatten`` module, so the chain of layers can be
read from the module tree alone.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "TinyNet",
    "CompNet",
    "LeNet",
    "CifarNet",
    "AlexNet",
    "VGG16",
    "TINY_WEIGHT",
    "TINY_BIAS",
    "VGG16_CONFIG",
]

#: First-layer weight of the paper's 3-D example network.
TINY_WEIGHT: tuple[tuple[float, ...], ...] = ((3.0, -1.0, 2.0), (-2.0, 7.0, 1.0), (5.0, -3.0, -1.0))
#: First-layer bias of the paper's 3-D example network.
TINY_BIAS: tuple[float, ...] = (3.0, 4.0, 2.0)

#: VGG configuration "D" (VGG-16): output channels of each 3x3 convolution, "M" = max pool.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class TinyNet(nn.Sequential):
    """The 3-D example network of Avant & Morgansen (2023): ``fc2(relu(fc1(x)))``.

    ``fc1`` has weight ``[[3,-1,2],[-2,7,1],[5,-3,-1]]`` and bias ``[3,4,2]``; ``fc2`` is the
    3x3 identity with zero bias.

    Shape:
        ``(N, 3) -> (N, 3)``.
    """

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                fc1=nn.Linear(3, 3),
                relu1=nn.ReLU(),
                fc2=nn.Linear(3, 3),
            )
        )
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor(TINY_WEIGHT))
            self.fc1.bias.copy_(torch.tensor(TINY_BIAS))
            self.fc2.weight.copy_(torch.eye(3))
            self.fc2.bias.zero_()


class CompNet(nn.Sequential):
    """The fully connected comparison network of Avant & Morgansen (2023).

    ``Linear(7,20) - ReLU - Linear(20,30) - ReLU - Linear(30,10)``. Its weights are whatever
    the layers' default initialisation draws; :func:`lipbound.zoo.load_model` draws them
    right after seeding torch's generator, as the paper does.

    Shape:
        ``(N, 7) -> (N, 10)``.
    """

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                fc1=nn.Linear(7, 20),
                relu1=nn.ReLU(),
                fc2=nn.Linear(20, 30),
                relu2=nn.ReLU(),
                fc3=nn.Linear(30, 10),
            )
        )


class LeNet(nn.Sequential):
    """The MNIST LeNet of Avant & Morgansen (2023).

    ``conv1 (1->6, k5) - ReLU - MaxPool(2) - conv2 (6->16, k5) - ReLU - MaxPool(2) -
    flatten (256) - fc1 (256->120) - ReLU - fc2 (120->84) - ReLU - fc3 (84->10)``.

    Shape:
        ``(N, 1, 28, 28) -> (N, 10)``.
    """

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(1, 6, 5),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(6, 16, 5),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(16 * 4 * 4, 120),
                relu3=nn.ReLU(),
                fc2=nn.Linear(120, 84),
                relu4=nn.ReLU(),
                fc3=nn.Linear(84, 10),
            )
        )


class CifarNet(nn.Sequential):
    """The CIFAR-10 convolutional network of Avant & Morgansen (2023).

    ``conv1 (3->32, k3) - ReLU - conv2 (32->32, k3) - ReLU - MaxPool(2) - Dropout(0.25) -
    conv3 (32->64, k3) - ReLU - conv4 (64->64, k3) - ReLU - MaxPool(2) - Dropout(0.25) -
    flatten (1600) - fc1 (1600->512) - ReLU - Dropout(0.5) - fc2 (512->10)``.

    Shape:
        ``(N, 3, 32, 32) -> (N, 10)``.
    """

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(3, 32, 3),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(32, 32, 3),
                relu2=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                drop1=nn.Dropout(0.25),
                conv3=nn.Conv2d(32, 64, 3),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(64, 64, 3),
                relu4=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                drop2=nn.Dropout(0.25),
                flatten=nn.Flatten(),
                fc1=nn.Linear(64 * 5 * 5, 512),
                relu5=nn.ReLU(),
                drop3=nn.Dropout(0.5),
                fc2=nn.Linear(512, 10),
            )
        )


class AlexNet(nn.Sequential):
    """AlexNet in torchvision's layout (Krizhevsky et al., 2012; the "one weird trick" variant).

    Children ``features`` (5 convolutions, 3 max pools), ``avgpool``
    (``AdaptiveAvgPool2d((6, 6))``), ``flatten`` and ``classifier`` (3 linear layers with
    dropout), with torchvision's state-dict keys (``features.0.weight``, ...,
    ``classifier.6.bias``).

    Shape:
        ``(N, 3, 224, 224) -> (N, 1000)``.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, num_classes),
        )
        super().__init__(
            OrderedDict(
                features=features,
                avgpool=nn.AdaptiveAvgPool2d((6, 6)),
                flatten=nn.Flatten(),
                classifier=classifier,
            )
        )


class VGG16(nn.Sequential):
    """VGG-16 (configuration D, no batch norm) in torchvision's layout (Simonyan & Zisserman, 2015).

    Children ``features`` (13 3x3 convolutions with ReLU, 5 max pools), ``avgpool``
    (``AdaptiveAvgPool2d((7, 7))``), ``flatten`` and ``classifier``
    (``Linear(25088,4096) - ReLU - Dropout - Linear(4096,4096) - ReLU - Dropout -
    Linear(4096,1000)``), with torchvision's state-dict keys.

    Shape:
        ``(N, 3, 224, 224) -> (N, 1000)``.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16_CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(channels, int(v), kernel_size=3, padding=1))
                layers.append(nn.ReLU())
                channels = int(v)
        classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        super().__init__(
            OrderedDict(
                features=nn.Sequential(*layers),
                avgpool=nn.AdaptiveAvgPool2d((7, 7)),
                flatten=nn.Flatten(),
                classifier=classifier,
            )
        )
