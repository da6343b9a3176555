"""Access to the data files shipped inside the package (``lipbound/zoo/data``).

The files are read through :mod:`importlib.resources`, so they are found in an installed
wheel, an editable install or a source checkout alike. Contents (see ``LICENSE.seed-data``
and ``testsets/LICENSE.eran`` for their licences):

- ``mnist/lenet_ckpt_99.ckpt``, ``mnist/{2,3,8}.png``: MNIST LeNet weights and digits of
  Avant & Morgansen (2023).
- ``cifar10/convnet_ckpt_499.ckpt``, ``cifar10/dog4.png``: CIFAR-10 network weights and image.
- ``testsets/{mnist,cifar10}_test.csv``: the first 100 test images of each data set (as
  published with the ERAN verifier).
- ``imagenet/classes.txt``: the 1000 ImageNet class names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from lipbound.errors import ZooError

__all__ = ["data_file", "data_path", "read_bytes", "imagenet_class_names"]

_PACKAGE = "lipbound.zoo"


def data_file(relpath: str) -> Traversable:
    """Return the shipped data file ``data/<relpath>`` as an importlib resource.

    Args:
        relpath: path relative to the ``data`` folder, with ``/`` separators,
            e.g. ``"mnist/8.png"``.

    Raises:
        ZooError: if the file is not part of the installed package.
    """
    node: Traversable = resources.files(_PACKAGE).joinpath("data")
    for part in relpath.split("/"):
        node = node.joinpath(part)
    if not node.is_file():
        raise ZooError(
            f"shipped data file {relpath!r} is missing from the installed lipbound package; "
            "reinstall lipbound (pip install --force-reinstall lipbound)"
        )
    return node


@contextlib.contextmanager
def data_path(relpath: str) -> Iterator[Path]:
    """Context manager giving a real filesystem path to the shipped file ``data/<relpath>``.

    For a normal (unzipped) installation this is the file itself; for a zipped one,
    :func:`importlib.resources.as_file` extracts a temporary copy for the duration of the
    ``with`` block.
    """
    with resources.as_file(data_file(relpath)) as path:
        yield Path(path)


def read_bytes(relpath: str) -> bytes:
    """Return the bytes of the shipped file ``data/<relpath>``."""
    return data_file(relpath).read_bytes()


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names, in index order, from ``imagenet/classes.txt``.

    Each line of the file is ``"index: name"``; the returned tuple holds the names
    (e.g. ``"tench, Tinca tinca"``) at their indices.
    """
    text = data_file("imagenet/classes.txt").read_text(encoding="utf-8")
    names: dict[int, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        index, _, name = line.partition(":")
        names[int(index)] = name.strip()
    if sorted(names) != list(range(len(names))):
        raise ZooError("imagenet/classes.txt is damaged (indices are not 0..n-1); reinstall")
    return tuple(names[i] for i in range(len(names)))
