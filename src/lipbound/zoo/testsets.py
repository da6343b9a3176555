"""The shipped test images: the first 100 MNIST and CIFAR-10 test images.

The CSV files (from the ERAN verifier's repository, Apache-2.0, see
``data/testsets/LICENSE.eran``) hold one image a row: the label, then the pixel values
0-255. MNIST rows are row-major 28x28; CIFAR-10 rows are pixel-interleaved, i.e. in
(H, W, C) order, and are moved to channels-first (C, H, W) here.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from lipbound.errors import InputError, ZooError
from lipbound.zoo.resources import data_file

__all__ = ["TESTSETS", "load_testset", "parse_image_csv", "read_csv_file"]

#: Shipped test sets: name -> (file relative to the data folder, image shape (C, H, W)).
TESTSETS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "mnist": ("testsets/mnist_test.csv", (1, 28, 28)),
    "cifar10": ("testsets/cifar10_test.csv", (3, 32, 32)),
}


def parse_image_csv(
    text: str, image_shape: tuple[int, ...], *, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Parse image rows ``label, v_1, ..., v_n`` (values 0-255) into arrays.

    Layout rule: for a single-channel shape ``(1, H, W)`` (or any non-image shape) the
    values are taken in row-major order of ``image_shape``; for ``(C, H, W)`` with ``C > 1``
    they are pixel-interleaved ``(H, W, C)`` and are moved channels-first. A header line
    whose first field is not a number is skipped.

    Args:
        text: the CSV text.
        image_shape: shape of one image, channels first.
        source: name of the file, for error messages.

    Returns:
        ``(images, labels)``: float32 array ``(N, *image_shape)`` of raw pixel values and
        int64 array ``(N,)`` of labels.

    Raises:
        InputError: if a row has the wrong number of values, a value is not a number, or
            the file has no rows.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines:
        first = lines[0].split(",")[0].strip()
        try:
            float(first)
        except ValueError:
            lines = lines[1:]
    if not lines:
        raise InputError(f"{source}: no image rows found; expected 'label, pixel values...'")
    n_values = int(np.prod(image_shape))
    try:
        data = np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise InputError(
            f"{source}: cannot parse as comma-separated numbers ({exc}); expected one image a "
            "row: label, then the pixel values 0-255"
        ) from exc
    if data.shape[1] != n_values + 1:
        raise InputError(
            f"{source}: rows have {data.shape[1]} values but an image of shape "
            f"{tuple(image_shape)} needs {n_values + 1} (label + {n_values} pixels)"
        )
    labels_f = data[:, 0]
    if not np.all(np.isfinite(labels_f)) or np.any(labels_f != np.round(labels_f)):
        raise InputError(f"{source}: the first column (labels) must hold integers")
    pixels = data[:, 1:].astype(np.float32)
    if len(image_shape) == 3 and image_shape[0] > 1:
        c, h, w = image_shape
        images = pixels.reshape(-1, h, w, c).transpose(0, 3, 1, 2)
    else:
        images = pixels.reshape((-1, *image_shape))
    images = np.ascontiguousarray(images)
    return images, labels_f.astype(np.int64)


@functools.cache
def _cached(name: str) -> tuple[np.ndarray, np.ndarray]:
    relpath, shape = TESTSETS[name]
    text = data_file(relpath).read_text(encoding="ascii")
    images, labels = parse_image_csv(text, shape, source=f"lipbound/zoo/data/{relpath}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_testset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The shipped test images of ``name`` (``"mnist"`` or ``"cifar10"``).

    Parsed once and cached; the returned arrays are read-only.

    Returns:
        ``(images, labels)``: float32 ``(100, C, H, W)`` raw pixel values 0-255 (channels
        first) and int64 ``(100,)`` labels.

    Raises:
        ZooError: if there is no shipped test set called ``name``.
    """
    if name not in TESTSETS:
        raise ZooError(
            f"no shipped test set for {name!r}; use one of those that exist: "
            f"{', '.join(TESTSETS)}"
        )
    return _cached(name)


def read_csv_file(path: Path, image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Parse a user CSV file in the test-set format (see :func:`parse_image_csv`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read CSV file {path}: {exc}") from exc
    return parse_image_csv(text, image_shape, source=str(path))
