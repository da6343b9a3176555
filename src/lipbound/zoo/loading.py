"""Building zoo networks with their weights: :func:`load_model`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lipbound.errors import WeightsError
from lipbound.validation import check_seed, default_device
from lipbound.validation import resolve_device as _resolve
from lipbound.zoo.architectures import VGG16, AlexNet, CifarNet, CompNet, LeNet, TinyNet
from lipbound.zoo.registry import ZooEntry, get_entry
from lipbound.zoo.resources import data_path
from lipbound.zoo.weights import init_seeded, load_into, read_checkpoint, read_state_dict

__all__ = ["SEEDED_WEIGHTS", "LoadedModel", "load_model", "resolve_device"]

logger = logging.getLogger(__name__)

#: Shipped checkpoints of the trained networks, relative to ``lipbound/zoo/data``.
SHIPPED_CHECKPOINTS: dict[str, str] = {
    "mnist": "mnist/lenet_ckpt_99.ckpt",
    "cifar10": "cifar10/convnet_ckpt_499.ckpt",
}


@dataclass(frozen=True)
class LoadedModel:
    """A zoo network ready for analysis.

    Attributes:
        model: the network, in eval mode, float32, on the requested device, parameters
            frozen (``requires_grad=False``). It maps a batch ``(N, *entry.input_shape)`` of
            *normalised* inputs to ``(N, entry.n_classes)`` logits.
        entry: the zoo entry (input shape, preprocessing, samples, ...).
        weights_source: where the weights came from, to be shown with every result
            (e.g. ``"seeded random weights (seed=0) — NOT trained"``).
        trained: True when the weights come from a checkpoint (shipped or user file).
    """

    model: nn.Module
    entry: ZooEntry
    weights_source: str
    trained: bool


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or ``None`` into a torch.device.

    ``"auto"`` and ``None`` mean CUDA when it is available, else the CPU. The same rules as
    the analyzer's (:func:`lipbound.validation.resolve_device`).

    Raises:
        InputError: for an unknown device string, a device kind other than CPU/CUDA (e.g.
            ``"meta"``), or a CUDA device that is not available.
    """
    return _resolve(device, default_device())


def _build_small(factory: Callable[[], nn.Module], seed: int | None = None) -> nn.Module:
    """Construct a small network without disturbing torch's global random generator.

    With ``seed`` given, the generator is seeded first, so the default initialisation draws
    exactly what ``torch.manual_seed(seed); factory()`` would.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return factory()


def _build_large(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a large network with uninitialised CPU storage (no wasted default init)."""
    with torch.device("meta"):
        model = factory()
    return model.to_empty(device="cpu")


def _shipped_weights(name: str, model: nn.Module) -> str:
    relpath = SHIPPED_CHECKPOINTS[name]
    with data_path(relpath) as path:
        state, extras = read_checkpoint(path, source=f"lipbound/zoo/data/{relpath}")
    load_into(model, state, source=relpath)
    accuracy = extras.get("correct_pct")
    acc = f"; {float(accuracy):.2f}% test accuracy" if isinstance(accuracy, float) else ""
    return f"shipped checkpoint {relpath} (Avant & Morgansen 2023{acc})"


_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "tiny": TinyNet,
    "compnet": CompNet,
    "mnist": LeNet,
    "cifar10": CifarNet,
    "alexnet": AlexNet,
    "vgg16": VGG16,
}
_LARGE = frozenset({"alexnet", "vgg16"})

#: zoo networks whose weights (without a weights file) depend on ``load_model``'s ``seed``
SEEDED_WEIGHTS: tuple[str, ...] = ("compnet", "alexnet", "vgg16")


def load_model(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Build the zoo network ``name`` with its weights.

    Weights, in order of precedence:

    1. ``weights`` given: a ``torch.save`` file holding a state dict (or a checkpoint dict
       with it under ``"state_dict"``, ``"model_state_dict"``, ``"net"`` or ``"model"``);
       torchvision's AlexNet/VGG-16 weight files load as they are.
    2. ``mnist``, ``cifar10``: the trained checkpoints of Avant & Morgansen (2023) shipped
       with the package.
    3. ``tiny``: the paper's fixed weights. ``compnet``: the default initialisation drawn
       right after ``torch.manual_seed(seed)`` (``seed=0`` gives the paper's network).
    4. ``alexnet``, ``vgg16``: seeded He-normal random weights (``seed``), NOT trained;
       ``weights_source`` says so.

    Torch's global random generator is left as it was.

    Args:
        name: zoo name, see :func:`lipbound.zoo.list_models`.
        weights: optional path of a weights file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        seed: seed of the random weights (compnet, alexnet, vgg16); ignored otherwise.

    Returns:
        A :class:`LoadedModel` with the network in eval mode, float32.

    Raises:
        ZooError: unknown ``name``.
        WeightsError: ``weights`` missing, unreadable, or not matching the architecture.
        InputError: bad ``device`` or ``seed``.

    Example:
        >>> lm = load_model("mnist")
        >>> lm.model(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    entry = get_entry(name)
    seed = check_seed(seed)
    dev = resolve_device(device)
    factory = _FACTORIES[entry.name]

    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise WeightsError(
                f"weights must be the path of a torch.save file, got a "
                f"{type(weights).__name__}; save it with torch.save(state_dict, path), or load "
                "a state dict yourself: load_model(name).model.load_state_dict(state_dict)")
        if not str(weights).strip():
            raise WeightsError("weights is an empty path; give the path of a weights file "
                               "(command line: --weights FILE), or None for the zoo's own "
                               "weights")
        path = Path(weights).expanduser()
        state = read_state_dict(path)
        model = _build_large(factory) if entry.name in _LARGE else _build_small(factory)
        load_into(model, state, source=str(path))
        source, trained = f"user weights file {path}", True
    elif entry.name in SHIPPED_CHECKPOINTS:
        model = _build_small(factory)
        source, trained = _shipped_weights(entry.name, model), True
    elif entry.name == "tiny":
        model = _build_small(factory)
        source, trained = "fixed weights of the paper's 3-D example (Avant & Morgansen 2023)", False
    elif entry.name == "compnet":
        model = _build_small(factory, seed=seed)
        source = f"torch.manual_seed({seed}) default initialisation" + (
            " (the paper's network)" if seed == 0 else ""
        )
        trained = False
    else:
        model = _build_large(factory)
        init_seeded(model, seed)
        source, trained = f"seeded random weights (seed={seed}) — NOT trained", False

    model = model.to(device=dev, dtype=torch.float32).eval()
    model.requires_grad_(False)
    logger.info("loaded zoo model %s on %s: %s", entry.name, dev, source)
    return LoadedModel(model=model, entry=entry, weights_source=source, trained=trained)
