"""Descriptions of the zoo's networks: input shape, preprocessing, samples, radii.

Each :class:`ZooEntry` describes one network of Avant & Morgansen, *Analytical Bounds on the
Local Lipschitz Constants of ReLU Networks* (IEEE TNNLS 2023). The networks take the
*normalised* input; ``mean``/``std`` say how a raw image (pixels scaled to ``[0, 1]``) is
normalised, and the radii in ``eps_range`` are measured in that normalised space, as in the
paper.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from lipbound.errors import ZooError
from lipbound.layers import Normalize
from lipbound.zoo.resources import imagenet_class_names

__all__ = ["ZooEntry", "list_models", "get_entry", "model_names"]

MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

MNIST_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True)
class ZooEntry:
    """What the zoo knows about one network.

    Attributes:
        name: the zoo name (``"mnist"``, ``"vgg16"``, ...).
        description: one line saying what the network is and where it comes from.
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
        n_classes: number of outputs (logits).
        mean: per-channel mean of the input normalisation, or ``None`` if the network takes
            its input as is.
        std: per-channel standard deviation of the normalisation, or ``None``.
        eps_range: ``(smallest, largest)`` radius the paper sweeps for this network, in the
            normalised input space.
        samples: references of the sample inputs shipped for it (for
            :func:`lipbound.inputs.load_sample`).
        default_sample: the paper's nominal input, one of ``samples``.
        class_names: name of each output class, or ``None``.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    n_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    eps_range: tuple[float, float]
    samples: tuple[str, ...]
    default_sample: str
    class_names: tuple[str, ...] | None

    @property
    def testset(self) -> str | None:
        """Name of the shipped test set for this network (``"mnist"``, ``"cifar10"``) or None."""
        return self.name if self.name in ("mnist", "cifar10") else None

    def normalizer(self) -> Normalize | None:
        """A :class:`~lipbound.layers.Normalize` layer mapping ``[0, 1]`` pixels to the
        network's input space, or ``None`` when the network takes its input as is.

        Put it in front of the network (``nn.Sequential(entry.normalizer(), model)``) to
        measure bounds in pixel space instead of the paper's normalised space.
        """
        if self.mean is None or self.std is None:
            return None
        return Normalize(self.mean, self.std, spatial_dims=len(self.input_shape) - 1)


@functools.lru_cache(maxsize=1)
def _entries() -> dict[str, ZooEntry]:
    imagenet = imagenet_class_names()
    entries = [
        ZooEntry(
            name="tiny",
            description="3-D example network of Avant & Morgansen (2023): "
            "fc1 (fixed 3x3 weights) - ReLU - fc2 (identity)",
            input_shape=(3,),
            n_classes=3,
            mean=None,
            std=None,
            eps_range=(0.1, 10.0),
            samples=("tiny:x0",),
            default_sample="tiny:x0",
            class_names=None,
        ),
        ZooEntry(
            name="compnet",
            description="fully connected comparison network of Avant & Morgansen (2023): "
            "7-20-30-10, weights from torch.manual_seed(0) default initialisation",
            input_shape=(7,),
            n_classes=10,
            mean=None,
            std=None,
            eps_range=(0.0005, 0.1),
            samples=("compnet:zeros",),
            default_sample="compnet:zeros",
            class_names=None,
        ),
        ZooEntry(
            name="mnist",
            description="MNIST LeNet of Avant & Morgansen (2023), trained "
            "(99.06% test accuracy)",
            input_shape=(1, 28, 28),
            n_classes=10,
            mean=MNIST_MEAN,
            std=MNIST_STD,
            eps_range=(0.001, 7.0),
            samples=("mnist:8", "mnist:2", "mnist:3"),
            default_sample="mnist:8",
            class_names=MNIST_CLASSES,
        ),
        ZooEntry(
            name="cifar10",
            description="CIFAR-10 convolutional network of Avant & Morgansen (2023), trained "
            "(84.37% test accuracy)",
            input_shape=(3, 32, 32),
            n_classes=10,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            eps_range=(0.001, 2.0),
            samples=("cifar10:dog",),
            default_sample="cifar10:dog",
            class_names=CIFAR10_CLASSES,
        ),
        ZooEntry(
            name="alexnet",
            description="AlexNet (torchvision layout, ImageNet); trained weights only from a "
            "user file, otherwise seeded random weights",
            input_shape=(3, 224, 224),
            n_classes=1000,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            eps_range=(0.001, 3.0),
            samples=("alexnet:random",),
            default_sample="alexnet:random",
            class_names=imagenet,
        ),
        ZooEntry(
            name="vgg16",
            description="VGG-16 (torchvision layout, ImageNet); trained weights only from a "
            "user file, otherwise seeded random weights",
            input_shape=(3, 224, 224),
            n_classes=1000,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            eps_range=(0.001, 3.0),
            samples=("vgg16:random",),
            default_sample="vgg16:random",
            class_names=imagenet,
        ),
    ]
    return {e.name: e for e in entries}


def model_names() -> list[str]:
    """Names of all zoo networks, in the order of :func:`list_models`."""
    return list(_entries())


def list_models() -> list[ZooEntry]:
    """All zoo networks, smallest first."""
    return list(_entries().values())


def get_entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` called ``name`` (case-insensitive).

    Raises:
        ZooError: if there is no such network; the message lists the known names.
    """
    entries = _entries()
    key = name.strip().lower() if isinstance(name, str) else name
    if key in entries:
        return entries[key]
    known = ", ".join(entries)
    hint = ""
    if isinstance(key, str):
        close = difflib.get_close_matches(key, list(entries), n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise ZooError(f"unknown zoo model {name!r}{hint}; known models: {known} (use one of "
                   "them; a network of your own is given as path/to/file.py:factory on the "
                   "command line, or as an nn.Module to the library)")
