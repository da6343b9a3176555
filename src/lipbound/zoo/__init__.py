"""The model zoo: the networks of Avant & Morgansen (2023) and two ImageNet classics.

Avant & Morgansen, *Analytical Bounds on the Local Lipschitz Constants of ReLU Networks*,
IEEE TNNLS 2023 (arXiv 2104.14672), evaluate their bounds on these networks:

========  ==============  =============================================================
name      input           weights
========  ==============  =============================================================
tiny      (3,)            fixed 3x3 example weights from the paper
compnet   (7,)            default init after ``torch.manual_seed(0)``
mnist     (1, 28, 28)     shipped trained LeNet checkpoint
cifar10   (3, 32, 32)     shipped trained CIFAR-10 checkpoint
alexnet   (3, 224, 224)   user file (torchvision layout), else seeded random, NOT trained
vgg16     (3, 224, 224)   user file (torchvision layout), else seeded random, NOT trained
========  ==============  =============================================================

The networks take the *normalised* input; the paper's bounds and radii live in that
space. Each :class:`ZooEntry` says how to normalise (``mean``/``std``) and names its sample
inputs, which :func:`lipbound.inputs.load_sample` turns into tensors.

Example:
    >>> from lipbound.zoo import load_model
    >>> from lipbound.inputs import load_sample
    >>> lm = load_model("mnist")
    >>> x0 = load_sample("mnist:8").x          # (1, 1, 28, 28), normalised
    >>> int(lm.model(x0).argmax())
    8
"""

from __future__ import annotations

from lipbound.zoo.architectures import VGG16, AlexNet, CifarNet, CompNet, LeNet, TinyNet
from lipbound.zoo.loading import LoadedModel, load_model, resolve_device
from lipbound.zoo.registry import ZooEntry, get_entry, list_models, model_names
from lipbound.zoo.resources import data_path, imagenet_class_names
from lipbound.zoo.testsets import load_testset

__all__ = [
    "ZooEntry",
    "LoadedModel",
    "list_models",
    "get_entry",
    "model_names",
    "load_model",
    "load_testset",
    "resolve_device",
    "data_path",
    "imagenet_class_names",
    "TinyNet",
    "CompNet",
    "LeNet",
    "CifarNet",
    "AlexNet",
    "VGG16",
]
