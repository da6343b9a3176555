"""Loading nominal inputs ``x0``: shipped samples, test images, image and array files.

Every input is returned as a :class:`Sample` whose ``x`` has shape ``(1, *input_shape)``,
dtype float32, on the CPU, in the network's *normalised* input space (the space the
bounds of Avant & Morgansen, IEEE TNNLS 2023, are measured in).

References understood by :func:`load_sample`:

- ``tiny:x0``: the paper's nominal input of the 3-D example network
  (``torch.rand(1, 3)`` after ``torch.manual_seed(0)``, plus ``[-1, 2, 2]``).
- ``compnet:zeros``: the zero vector, compnet's nominal input.
- ``mnist:8``, ``mnist:2``, ``mnist:3``: the shipped MNIST digits (8 is the paper's default).
- ``cifar10:dog``: the shipped CIFAR-10 dog image (label 5).
- ``alexnet:random``, ``vgg16:random``, ``alexnet:random/N``: a seeded uniform random image
  in [0, 1], normalised; ``/N`` picks the seed (default 0).
- ``mnist:test/17``, ``cifar10:test/3``: one image of a shipped test set (100 images, 0-99).
- a path: an image file (.png, .jpg, ...) or an array file (.npy, .pt, .pth).

:func:`load_samples` also takes ``mnist:test`` (all 100), ranges and lists
(``mnist:test/0-9``, ``mnist:test/0,5,7-9``), a folder of images, a CSV file in the test-set
format, and ``.npy``/``.pt`` batches.

Preprocessing rules:

- *Images* (PNG/JPEG/... files, the shipped samples, test-set rows, CSV rows) are raw
  pixels: they are multiplied by ``scale`` (default 1/255) and normalised with
  ``(x - mean) / std`` per channel when ``mean``/``std`` are known. Image files are
  converted to the expected number of channels (1: grayscale, 3: RGB) and, if their size
  differs, resized (bilinear) so that they cover the expected size, then centre-cropped.
  Images with transparent pixels are refused (the conversion would drop the alpha channel),
  and so are 16-bit, 32-bit and float images unless they hold whole numbers 0-255 (the
  conversion to 8 bits would clamp the rest), and images of several frames (animations,
  multi-page files). An EXIF orientation tag is applied (the image as viewers show it).
  CSV pixel values must lie in 0-255.
- *Arrays* (``.npy``, ``.pt``) are taken as they are, i.e. already in the normalised space,
  unless ``raw=True``, in which case they are treated like image pixels (``* scale``, then
  normalised); an integer array (raw pixels) for a network with a normalisation is
  refused without ``raw=True``, and so is a float array whose values, read back through
  ``mean``/``std``, are pixels far outside ``[0, 1]`` (raw 0-255 pixels saved as floats; see
  :data:`PIXEL_SLACK`). A single array may have shape ``input_shape`` or
  ``(1, *input_shape)``; a batch has shape ``(N, *input_shape)``. Without a known input
  shape a single array is one input of its own shape (a batch: the first dimension is the
  batch). CSV labels must be classes of the network (0 to n_classes - 1).
- *Vector samples* (``tiny:x0``, ``compnet:zeros``) are defined in the network's input
  space and are never rescaled.

Where shape, mean and std come from: explicit ``input_shape``/``mean``/``std`` arguments
first (``mean`` and ``std`` go together), then ``entry``, then the zoo entry named in the
reference (``mnist`` for ``mnist:8``). A shipped image (``mnist:8``, ``cifar10:test/3``, ...)
is refused for a network with another input shape or normalisation than its own (it would
be silently converted; pass an image file to have it converted explicitly), and keeps its
label only when it is used with its own network. Float arrays holding values beyond the
float32 range are refused (inputs are float32), and so are empty arrays.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipbound._safe_load import torch_load_safely, why_unreadable
from lipbound.errors import InputError, ZooError
from lipbound.validation import SEED_LIMIT, check_bool
from lipbound.zoo.registry import ZooEntry, get_entry, model_names
from lipbound.zoo.resources import data_path
from lipbound.zoo.testsets import TESTSETS, load_testset, read_csv_file

__all__ = ["Sample", "load_sample", "load_samples", "normalize_pixels"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
ARRAY_SUFFIXES: frozenset[str] = frozenset({".npy", ".pt", ".pth"})

#: Shipped image samples: (model, sample name) -> (file in the data folder, label).
_IMAGE_SAMPLES: dict[tuple[str, str], tuple[str, int]] = {
    ("mnist", "2"): ("mnist/2.png", 2),
    ("mnist", "3"): ("mnist/3.png", 3),
    ("mnist", "8"): ("mnist/8.png", 8),
    ("cifar10", "dog"): ("cifar10/dog4.png", 5),
}

_INDEX_SPEC = re.compile(r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$")


@dataclass(frozen=True)
class Sample:
    """One input of a network.

    Attributes:
        x: shape ``(1, *input_shape)``, float32, CPU, in the network's normalised input space.
        label: the true class when known (shipped samples, test sets, CSV rows), else None.
        name: where it came from (``"mnist:8"``, ``"mnist:test/17"``, a file name, ...).
    """

    x: torch.Tensor
    label: int | None
    name: str


@dataclass(frozen=True)
class _Context:
    """Shape and normalisation in effect for one call."""

    shape: tuple[int, ...] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    scale: float
    raw: bool
    entry: ZooEntry | None


def _floats(name: str, values: Sequence[float] | torch.Tensor | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in torch.as_tensor(values, dtype=torch.float64).reshape(-1))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name} must be a sequence of numbers, got {values!r}") from exc
    if not out or not all(math.isfinite(v) for v in out):
        raise InputError(f"{name} must be a non-empty sequence of finite numbers, got {values!r}")
    return out


def _make_context(
    ref_entry: ZooEntry | None,
    entry: ZooEntry | None,
    input_shape: Sequence[int] | None,
    mean: Sequence[float] | torch.Tensor | None,
    std: Sequence[float] | torch.Tensor | None,
    scale: float,
    raw: bool,
) -> _Context:
    base = entry if entry is not None else ref_entry
    shape: tuple[int, ...] | None
    if input_shape is not None:
        try:
            shape = tuple(int(s) for s in input_shape)
        except (TypeError, ValueError) as exc:
            raise InputError(f"input_shape must be a tuple of ints, got {input_shape!r}") from exc
        if not shape or any(s <= 0 for s in shape):
            raise InputError(f"input_shape must be non-empty and positive, got {input_shape!r}")
    else:
        shape = base.input_shape if base is not None else None
    if (mean is None) != (std is None):
        raise InputError("give both mean and std for the normalisation, or neither")
    if mean is not None:
        m, s = _floats("mean", mean), _floats("std", std)
    else:
        m, s = (base.mean, base.std) if base is not None else (None, None)
    if s is not None and any(v <= 0 for v in s):
        raise InputError(f"every std must be > 0, got {s}; give the standard deviations of "
                         "the preprocessing")
    if m is not None and s is not None:
        if len(m) != len(s):
            raise InputError(f"mean has {len(m)} values but std has {len(s)}; give one mean "
                             "and one std per channel")
        if shape is not None and len(m) not in (1, shape[0]):
            raise InputError(
                f"mean/std have {len(m)} values but the input has {shape[0]} channels "
                f"(input shape {shape}); give one value per channel"
            )
    # (numbers.Real: numpy's scalars too, np.float32(1 / 255) included -- refused by
    # normalize_pixels since session 25, which it had accepted)
    if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool)
            and math.isfinite(scale) and scale > 0):
        raise InputError(f"scale must be a positive number (e.g. 1/255), got {scale!r}")
    return _Context(shape=shape, mean=m, std=s, scale=float(scale),
                    raw=bool(check_bool(raw, "raw")), entry=base)


def normalize_pixels(
    pixels: torch.Tensor,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    scale: float = 1 / 255,
) -> torch.Tensor:
    """Map raw pixels to the normalised space: ``(pixels * scale - mean) / std``.

    Args:
        pixels: ``(N, C, *spatial)`` or ``(N, n)`` raw values (e.g. 0-255).
        mean: per-channel means (or one value for all), or None for no normalisation.
        std: per-channel standard deviations, or None.
        scale: factor applied first (1/255 maps 8-bit pixels to [0, 1]).

    Returns:
        A float32 tensor of the same shape.

    Raises:
        InputError: ``pixels`` is not a real batch, ``mean`` without ``std`` (or the
            reverse), non-finite values, a ``std`` <= 0, another number of values than the
            channels (1 or ``C``), or a ``scale`` that is not a positive number.
    """
    if not isinstance(pixels, torch.Tensor):
        raise InputError(f"pixels must be a tensor (N, C, *spatial) or (N, n), got "
                         f"{type(pixels).__name__}")
    if pixels.is_complex():  # (the float32 cast would drop the imaginary part)
        raise InputError(f"pixels are complex ({pixels.dtype}); pass real pixel values")
    if pixels.dim() < 2:
        raise InputError(f"pixels must be a batch (N, C, *spatial) or (N, n), got shape "
                         f"{tuple(pixels.shape)}; add the batch dimension with "
                         "pixels.unsqueeze(0)")
    # (session 25: a std of 0 or a NaN mean gave NaN pixels, three means for a one-channel
    # image broadcast it to three channels, and a mean without a std was ignored)
    ctx = _make_context(None, None, tuple(pixels.shape[1:]), mean, std, scale, False)
    x = pixels.to(torch.float32) * ctx.scale
    if ctx.mean is not None and ctx.std is not None:
        view = (1, -1) + (1,) * (x.dim() - 2)
        m = torch.tensor(ctx.mean, dtype=torch.float32, device=x.device).reshape(view)
        s = torch.tensor(ctx.std, dtype=torch.float32, device=x.device).reshape(view)
        x = (x - m) / s
    return x


def _finish(x: torch.Tensor, ctx: _Context, name: str, label: int | None) -> Sample:
    """Check shape and values and wrap a batch-1 tensor as a Sample."""
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if ctx.shape is not None and tuple(x.shape) != (1, *ctx.shape):
        raise InputError(
            f"input {name!r} has shape {tuple(x.shape[1:])} but the network expects "
            f"{ctx.shape}; pick an input made for this network"
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise InputError(
            f"input {name!r} contains {bad} NaN or inf value(s); clean the data first"
        )
    return Sample(x=x, label=label, name=name)


def _pixels_to_sample(pixels: torch.Tensor, ctx: _Context, name: str, label: int | None) -> Sample:
    """``pixels``: ``(1, *shape)`` raw values."""
    if not bool(torch.isfinite(pixels).all()):
        raise InputError(f"input {name!r} contains NaN or inf values; clean the data first")
    x = normalize_pixels(pixels, mean=ctx.mean, std=ctx.std, scale=ctx.scale)
    return _finish(x, ctx, name, label)


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------


#: PIL modes of one channel wider than 8 bits (16/32-bit integers, 32-bit floats)
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _eight_bit(image, name: str):
    """``image`` ready for conversion to 8-bit ``L``/``RGB`` pixels without losing anything:
    an image with transparent pixels is refused (the conversion drops the alpha channel, so
    whatever colour lies under them would decide the input), and so is a 16-bit, 32-bit or
    float image unless its values are whole numbers 0-255 (PIL's conversion clamps the rest
    to 255: a 16-bit image becomes a saturated one; a float image in [0, 1] a black one)."""
    from PIL import Image

    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        low = image.convert("RGBA").getchannel("A").getextrema()[0]
        if low < 255:
            raise InputError(
                f"image {name!r} has transparent pixels (alpha down to {low}); converting it "
                "drops the alpha channel, so the colour hidden under them would become the "
                "input. Flatten it onto a background first (e.g. with PIL: "
                "Image.alpha_composite(Image.new('RGBA', img.size, 'black'), "
                "img.convert('RGBA')).convert('RGB')) and save that")
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(values) & (values >= 0) & (values <= 255) & (values == np.round(values))
    if not bool(ok.all()):
        finite = values[np.isfinite(values)]
        span = (f"values {finite.min():.6g} to {finite.max():.6g}" if finite.size
                else "no finite values")
        raise InputError(
            f"image {name!r} has {image.mode} pixels ({span}), but image files are read as "
            "8-bit pixels 0-255 (then x --scale, default 1/255); the conversion would clamp "
            "them. Save it as an 8-bit image, or save the normalised input as an .npy/.pt "
            "array")
    return Image.fromarray(values.astype(np.uint8))


def _single_upright(image, name: str):
    """``image`` turned as its EXIF orientation tag says, as image viewers show it (since
    session 23; before, the stored pixels were taken unturned: a photo's digit on its side)."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: nothing to turn by
        return image
    if orientation in (None, 1):
        return image
    logger.warning("image %s carries EXIF orientation %s: turned upright as image viewers "
                   "show it; the results are for the turned image", name, orientation)
    return ImageOps.exif_transpose(image)


def _read_image(path: Path, ctx: _Context, name: str) -> torch.Tensor:
    """Read an image file as raw pixels ``(1, C, H, W)`` in the context's shape."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            frames = int(getattr(img, "n_frames", 1) or 1)
            # (a camera's MPO JPEG: the first frame is the photo, the others are previews
            # or depth images by the format's definition)
            if frames > 1 and img.format != "MPO":
                # (since session 23; the first frame was taken silently)
                raise InputError(
                    f"image {name!r} holds {frames} frames (an animation or a multi-page "
                    f"file); which one is the input is ambiguous. Save the frame you mean as "
                    "its own image (e.g. with PIL: img.seek(k); img.save('frame.png'))")
            image = img.copy()
    except FileNotFoundError as exc:
        raise InputError(f"image file not found: {path}; check the path") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large to read safely ({exc}); give an image "
                         "of about the network's input size") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}; give an image file PIL reads "
                         "(e.g. PNG or JPEG), or the input as a .npy/.pt array") from exc
    except Exception as exc:  # a decoder's own error on a damaged file (ValueError, ...)
        raise InputError(f"cannot read image {path}: it is damaged or not in a format PIL "
                         f"decodes ({type(exc).__name__}: {exc}); save it again as a PNG "
                         "file") from exc
    image = _eight_bit(_single_upright(image, name), name)
    shape = ctx.shape
    if shape is None:
        channels = 1 if image.mode in ("1", "L") else 3
        shape = (channels, image.height, image.width)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InputError(
            f"cannot use image {name!r} as input of shape {shape}: images need an input "
            "shape (C, H, W) with 1 or 3 channels; give an .npy/.pt array instead"
        )
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    if image.mode != mode:
        logger.info("converting image %s from mode %s to %s", name, image.mode, mode)
        try:
            image = image.convert(mode)
        except ValueError as exc:  # e.g. LAB -> L
            raise InputError(f"image {name!r} has {image.mode} pixels, which PIL cannot "
                             f"convert to {mode} ({exc}); save it as an RGB or grayscale "
                             "image") from exc
    if (image.width, image.height) != (w, h):
        factor = max(w / image.width, h / image.height)
        size = (max(w, round(image.width * factor)), max(h, round(image.height * factor)))
        # a warning, not a detail: the bound is computed at the resized (and cropped) copy,
        # not at the file's own pixels
        logger.warning("image %s is %sx%s but the network takes %sx%s: resized (bilinear) "
                       "and centre-cropped; the results are for that copy", name, image.width,
                       image.height, w, h)
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        image = image.crop((left, top, left + w, top + h))
    arr = np.asarray(image, dtype=np.float32)
    if c == 1:
        arr = arr[None, :, :]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)


# ---------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------


def _read_array(path: Path, ctx: _Context | None = None) -> torch.Tensor:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            obj = torch_load_safely(path)
            if isinstance(obj, np.ndarray):
                obj = torch.from_numpy(obj)
            if not isinstance(obj, torch.Tensor):
                raise InputError(
                    f"{path} holds a {type(obj).__name__}, not a tensor; save the input with "
                    "torch.save(x, path)"
                )
            if obj.layout != torch.strided:
                raise InputError(f"{path} holds a tensor with the {obj.layout} layout; save "
                                 "a dense one: torch.save(x.to_dense(), path)")
            data = obj
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"input file not found: {path}") from exc
    except Exception as exc:
        raise InputError(
            f"cannot read array file {path}: {why_unreadable(exc)}. Save the input with "
            "np.save(path, x) or torch.save(x, path)"
        ) from exc
    if not (data.is_floating_point() or data.dtype in (torch.uint8, torch.int16, torch.int32,
                                                       torch.int64, torch.int8)):
        raise InputError(f"{path}: unsupported dtype {data.dtype}; save a float array")
    if data.numel() == 0:
        raise InputError(f"{path} holds an empty array (shape {tuple(data.shape)}): no input "
                         "to analyse; save at least one input")
    if (not data.is_floating_point() and ctx is not None and not ctx.raw
            and ctx.mean is not None):
        dtype = str(data.dtype).removeprefix("torch.")
        raise InputError(
            f"{path} holds {dtype} values, raw image pixels for a network that normalises "
            "its images, but arrays are taken as inputs already in the network's normalised "
            "space (the pixels would be used without scaling and normalisation). Pass "
            "raw=True to load_sample(s) to have them scaled and normalised, save them as an "
            "image file (.png), or save the normalised float input")
    return _to_float32(data, str(path))


_F32_MAX = float(torch.finfo(torch.float32).max)


def _to_float32(data: torch.Tensor, name: str) -> torch.Tensor:
    """``data`` as float32 (the inputs' dtype), refusing finite values that float32 cannot
    hold: the cast would turn them into inf (and the error would then blame the data)."""
    if data.dtype != torch.float32 and data.is_floating_point() or data.dtype == torch.int64:
        wide = data.to(torch.float64)
        finite = torch.isfinite(wide)
        over = finite & (wide.abs() > _F32_MAX)
        if bool(over.any()):
            peak = float(wide[over].abs().max())
            raise InputError(
                f"{name}: {int(over.sum())} value(s) out of float32 range (largest magnitude "
                f"{peak:.4g} > {_F32_MAX:.4g}); inputs are analysed in float32, where they "
                "would become inf. Rescale the input (e.g. to the model's normalised range)")
    return data.to(torch.float32)


def _array_to_batch(data: torch.Tensor, ctx: _Context, name: str, *, single: bool) -> torch.Tensor:
    """Bring an array to ``(N, *shape)`` (``N == 1`` when ``single``)."""
    shape = ctx.shape
    if shape is None:
        return data.unsqueeze(0) if single else (data if data.dim() >= 2 else data[:, None])
    if tuple(data.shape) == shape:
        return data.unsqueeze(0)
    if data.dim() == len(shape) + 1 and tuple(data.shape[1:]) == shape:
        if single and data.shape[0] != 1:
            raise InputError(
                f"{name} holds a batch of {data.shape[0]} inputs; use load_samples for "
                "batches, or save a single input"
            )
        return data
    raise InputError(
        f"{name} has shape {tuple(data.shape)} but the network expects {shape}, "
        f"(1, *{shape}) or (N, *{shape}); reshape the array before saving it"
    )


#: pixels (scaled, ``x * scale``) beyond this range from [0, 1] make a float array no input
#: in the normalised space (:func:`_check_normalised`): a wide margin, for inputs a little
#: outside the image range (noise, attacks, standard-normal test inputs); raw 0-255 pixels
#: read as normalised values are pixels near 255 std + mean (about 60 to 80 for the zoo's)
PIXEL_SLACK = 10.0


def _check_normalised(batch: torch.Tensor, ctx: _Context, name: str) -> None:
    """Refuse a float array taken as already normalised whose values lie far outside the
    normalised image of pixels in ``[0, 1]`` under the network's ``mean`` / ``std``
    (``[-PIXEL_SLACK, 1 + PIXEL_SLACK]`` per channel): raw 0-255 pixels saved as floats (since
    session 23; they were analysed as they were, hundreds of standard deviations out)."""
    if ctx.mean is None or ctx.std is None or batch.dim() < 2:
        return
    n = batch.shape[1]
    if len(ctx.mean) not in (1, n):
        return
    view = (1, -1) + (1,) * (batch.dim() - 2)
    m = torch.tensor(ctx.mean, dtype=torch.float64).reshape(view)
    s = torch.tensor(ctx.std, dtype=torch.float64).reshape(view)
    pixels = batch.to(torch.float64) * s + m  # (the values read back as pixels in [0, 1])
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo >= -PIXEL_SLACK and hi <= 1.0 + PIXEL_SLACK:
        return
    raw = " (they look like raw 0-255 pixels)" if float(batch.min()) >= 0.0 \
        and float(batch.max()) <= 255.0 else ""
    raise InputError(
        f"{name} holds values {float(batch.min()):.4g} to {float(batch.max()):.4g}, which "
        f"as normalised inputs (x = (pixel - mean) / std with mean {ctx.mean}, std "
        f"{ctx.std}) are pixels from {lo:.4g} to {hi:.4g}, far outside [0, 1]{raw}. Arrays "
        "are taken as already normalised: pass raw=True to load_sample(s) to have them "
        "scaled and normalised, save the image as a .png file, or save the normalised input "
        "(pixels / 255 - mean) / std")


def _array_samples(path: Path, ctx: _Context, *, single: bool) -> list[Sample]:
    data = _read_array(path, ctx)
    if not bool(torch.isfinite(data).all()):
        bad = int((~torch.isfinite(data)).sum())
        raise InputError(f"{path} contains {bad} NaN or inf value(s); clean the data first")
    batch = _array_to_batch(data, ctx, str(path), single=single)
    if ctx.raw:
        batch = normalize_pixels(batch, mean=ctx.mean, std=ctx.std, scale=ctx.scale)
    else:
        _check_normalised(batch, ctx, str(path))
    if single:
        return [_finish(batch, ctx, str(path), None)]
    return [_finish(batch[i : i + 1], ctx, f"{path}[{i}]", None) for i in range(batch.shape[0])]


# ---------------------------------------------------------------------------------------
# zoo references
# ---------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, ctx: _Context, source: str) -> None:
    """Refuse a label that is no class of the network (a negative one, or one beyond the zoo
    network's classes): it would be reported next to the prediction and counted in the
    accuracy as if it were one."""
    n = ctx.entry.n_classes if ctx.entry is not None else None
    bad = np.flatnonzero((labels < 0) | (labels >= n if n is not None else False))
    if bad.size:
        i = int(bad[0])
        classes = f"{ctx.entry.name} has classes 0-{n - 1}" if n is not None else \
            "classes are numbered from 0"
        raise InputError(f"{source}: row {i} has the label {int(labels[i])}, but {classes} "
                         f"({bad.size} row(s) like it); fix the first column (the labels)")


def _check_csv_pixels(images: np.ndarray, source: str) -> None:
    """Refuse CSV pixel values outside 0-255, the format's range (since session 23; they were
    scaled and normalised as they were)."""
    bad = np.flatnonzero(((images < 0) | (images > 255)).reshape(len(images), -1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        row = images[i]
        raise InputError(
            f"{source}: row {i} has pixel values from {float(row.min()):.6g} to "
            f"{float(row.max()):.6g}, but CSV inputs hold raw pixels 0-255 ({bad.size} "
            "row(s) like it); save the pixel values 0-255, or save normalised inputs as an "
            ".npy/.pt array")


def _split_zoo_ref(ref: str) -> tuple[ZooEntry, str] | None:
    """``"mnist:8"`` -> (mnist entry, "8"); None when ``ref`` is not a zoo reference."""
    if ":" not in ref:
        return None
    prefix, _, rest = ref.partition(":")
    key = prefix.strip().lower()
    if key in model_names():
        return get_entry(key), rest.strip()
    if Path(ref).expanduser().exists() or len(prefix) == 1:  # a path such as C:\x.png
        return None
    raise ZooError(
        f"unknown sample reference {ref!r}: no zoo model {prefix!r}; references look like "
        f"'mnist:8' or 'cifar10:test/3' (models: {', '.join(model_names())}), or give a "
        "file path"
    )


def _parse_indices(spec: str, n: int, ref: str) -> list[int]:
    if not _INDEX_SPEC.match(spec):
        raise ZooError(
            f"bad test-set index {spec!r} in {ref!r}; use e.g. 'test/17', 'test/0-99' or "
            "'test/0,5,7-9'"
        )
    out: list[int] = []
    for part in spec.split(","):
        lo_s, _, hi_s = part.partition("-")
        lo = int(lo_s)
        hi = int(hi_s) if hi_s.strip() else lo
        if hi < lo:
            raise InputError(f"empty index range {part.strip()!r} in {ref!r}; write low-high")
        if hi >= n:
            raise InputError(
                f"index {hi} in {ref!r} is out of range: the shipped test set has {n} images "
                f"(indices 0-{n - 1}); use an index in that range"
            )
        out.extend(range(lo, hi + 1))
    return out


def _testset_samples(entry: ZooEntry, spec: str | None, ref: str, ctx: _Context) -> list[Sample]:
    if entry.name not in TESTSETS:
        raise ZooError(
            f"{ref!r}: there is no shipped test set for {entry.name}; test sets exist for "
            f"{', '.join(TESTSETS)}"
        )
    images, labels = load_testset(entry.name)
    indices = list(range(len(labels))) if spec is None else _parse_indices(spec, len(labels), ref)
    own = ctx.entry is None or ctx.entry.name == entry.name
    out = []
    for i in indices:
        pixels = torch.tensor(images[i : i + 1])
        label = int(labels[i]) if own else None
        out.append(_pixels_to_sample(pixels, ctx, f"{entry.name}:test/{i}", label))
    return out


def _check_image_sample_fits(entry: ZooEntry, ref: str, ctx: _Context) -> None:
    """Refuse a shipped image (sample or test-set image) of one zoo network for a network
    with another input shape or normalisation: it would be silently resized, converted and
    normalised into an input that network was never meant to see."""
    other = ctx.entry is not None and ctx.entry.name != entry.name
    same_shape = ctx.shape is None or tuple(ctx.shape) == tuple(entry.input_shape)
    same_norm = (ctx.mean, ctx.std) == (entry.mean, entry.std)
    if same_shape and (same_norm or not other):
        return
    target = f"the network in use ({ctx.entry.name})" if other else "the network in use"
    want = f"shape {ctx.shape}" + (f", mean {ctx.mean}, std {ctx.std}" if other else "")
    have = f"shape {entry.input_shape}" + (f", mean {entry.mean}, std {entry.std}"
                                           if other else "")
    own = (f" (e.g. {', '.join(ctx.entry.samples)})" if other and ctx.entry.samples else "")
    raise InputError(
        f"sample {ref!r} is an input of the zoo network {entry.name} ({have}) but "
        f"{target} expects {want}; it would be silently converted. Use a sample made for "
        f"that network{own}, or pass an image file to have it converted explicitly"
    )


def _zoo_samples(entry: ZooEntry, rest: str, ref: str, ctx: _Context, *, many: bool
                 ) -> list[Sample]:
    name = f"{entry.name}:{rest}"
    own = ctx.entry is None or ctx.entry.name == entry.name
    if rest == "test" or rest.startswith("test/") or (entry.name, rest) in _IMAGE_SAMPLES:
        _check_image_sample_fits(entry, ref, ctx)
    if rest == "test" or rest.startswith("test/"):
        spec = rest[len("test/"):] if rest.startswith("test/") else None
        if spec is not None and entry.name in TESTSETS and not _INDEX_SPEC.match(spec):
            n = len(load_testset(entry.name)[1])
            valid = [f"'{entry.name}:test/3' (one test image, 0-{n - 1})"]
            if many:
                valid.append(f"'{entry.name}:test/0-9' or '{entry.name}:test/0,5,7-9'")
            valid += [f"'{s}'" for s in entry.samples]
            raise ZooError(
                f"bad test-set index {spec!r} in {ref!r}; valid references: "
                + ", ".join(valid) + ", or an image/.npy/.pt file"
            )
        if not many and (spec is None or not spec.strip().isdigit()):
            raise InputError(
                f"{ref!r} names several inputs; use load_samples, or one index such as "
                f"'{entry.name}:test/0'"
            )
        return _testset_samples(entry, spec, ref, ctx)
    if (entry.name, rest) in _IMAGE_SAMPLES:
        relpath, label = _IMAGE_SAMPLES[(entry.name, rest)]
        with data_path(relpath) as path:
            pixels = _read_image(path, ctx, name)
        return [_pixels_to_sample(pixels, ctx, name, label if own else None)]
    if entry.name == "tiny" and rest == "x0":
        # The paper's nominal input: torch.manual_seed(0); torch.rand(1, 3) + [-1, 2, 2].
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand(1, 3, generator=gen) + torch.tensor([[-1.0, 2.0, 2.0]])
        return [_finish(x, ctx, name, None)]
    if entry.name == "compnet" and rest == "zeros":
        return [_finish(torch.zeros(1, 7), ctx, name, None)]
    match = re.fullmatch(r"random(?:/(\d+))?", rest)
    if entry.name in ("alexnet", "vgg16") and match:
        seed = int(match.group(1) or 0)
        if seed >= SEED_LIMIT:
            raise ZooError(f"the seed {seed} of {ref!r} is too large: torch's random "
                           f"generators take seeds below 2**64; use e.g. "
                           f"'{entry.name}:random/1'")
        shape = ctx.shape if ctx.shape is not None else entry.input_shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        pixels01 = torch.rand((1, *shape), generator=gen)
        x = normalize_pixels(pixels01, mean=ctx.mean, std=ctx.std, scale=1.0)
        return [_finish(x, ctx, name, None)]
    known = list(entry.samples) + ([f"{entry.name}:test/N"] if entry.name in TESTSETS else [])
    raise ZooError(
        f"unknown sample {ref!r} for {entry.name}; use one of the known samples: "
        f"{', '.join(known)}"
    )


# ---------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------


def _check_ref(ref: str | Path) -> str:
    if isinstance(ref, Path):
        return str(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise InputError(f"an input reference must be a non-empty string or path, got {ref!r}")
    return ref.strip()


def load_sample(
    ref: str | Path,
    *,
    entry: ZooEntry | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: float = 1 / 255,
    raw: bool = False,
) -> Sample:
    """Load one nominal input.

    Args:
        ref: a zoo reference (``"mnist:8"``, ``"cifar10:dog"``, ``"mnist:test/17"``,
            ``"tiny:x0"``, ``"compnet:zeros"``, ``"vgg16:random"``) or the path of an image
            (.png, .jpg, ...) or array (.npy, .pt) file. See the module docstring.
        entry: the zoo entry of the network the input is for; gives the input shape and
            normalisation.
        input_shape: shape of one input (overrides ``entry``), e.g. ``(1, 28, 28)``.
        mean: per-channel normalisation mean (overrides ``entry``).
        std: per-channel normalisation std (overrides ``entry``).
        scale: factor applied to raw pixels before normalising (1/255 for 8-bit images).
        raw: treat ``.npy``/``.pt`` arrays as raw pixels (scaled and normalised) instead of
            as already-normalised inputs.

    Returns:
        A :class:`Sample` with ``x`` of shape ``(1, *input_shape)``.

    Raises:
        ZooError: unknown model prefix or sample name.
        InputError: missing or unreadable file, index out of range, wrong shape, NaN/inf.

    Example:
        >>> load_sample("mnist:8").x.shape
        torch.Size([1, 1, 28, 28])
    """
    text = _check_ref(ref)
    zoo = _split_zoo_ref(text) if isinstance(ref, str) else None
    ctx = _make_context(zoo[0] if zoo else None, entry, input_shape, mean, std, scale, raw)
    if zoo is not None:
        return _zoo_samples(zoo[0], zoo[1], text, ctx, many=False)[0]
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(
            f"input file not found: {path}. Give an existing image/.npy/.pt file or a zoo "
            f"sample such as 'mnist:8' (models: {', '.join(model_names())})"
        )
    if path.is_dir():
        raise InputError(f"{path} is a folder; use load_samples for a folder of images")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _pixels_to_sample(_read_image(path, ctx, path.name), ctx, str(path), None)
    if suffix in ARRAY_SUFFIXES:
        return _array_samples(path, ctx, single=True)[0]
    if suffix == ".csv":
        raise InputError(f"{path} is a CSV of many inputs; use load_samples")
    raise InputError(
        f"unsupported input file type {suffix or '(none)'!r} for {path}; use an image "
        f"({', '.join(sorted(IMAGE_SUFFIXES))}), .npy or .pt file"
    )


def load_samples(
    ref: str | Path,
    *,
    entry: ZooEntry | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: float = 1 / 255,
    raw: bool = False,
) -> list[Sample]:
    """Load many inputs.

    Args:
        ref: one of
            - a shipped test set or part of it: ``"mnist:test"`` (all 100 images),
              ``"mnist:test/0-99"``, ``"cifar10:test/0,5,7-9"``;
            - a folder: every image file in it, sorted by file name;
            - a ``.csv`` file in the test-set format: one image a row, the label then the
              pixel values 0-255 (row-major for one channel; pixel-interleaved (H, W, C) for
              colour images), needs the input shape from ``entry`` or ``input_shape``;
            - an ``.npy``/``.pt`` batch of shape ``(N, *input_shape)``;
            - anything :func:`load_sample` accepts (giving a one-element list).
        entry, input_shape, mean, std, scale, raw: as for :func:`load_sample`.

    Returns:
        The samples, each with ``x`` of shape ``(1, *input_shape)``.

    Raises:
        ZooError: unknown model prefix or sample name.
        InputError: missing or unreadable files, out-of-range indices, wrong shapes, NaN/inf,
            a folder without images.
    """
    text = _check_ref(ref)
    zoo = _split_zoo_ref(text) if isinstance(ref, str) else None
    ctx = _make_context(zoo[0] if zoo else None, entry, input_shape, mean, std, scale, raw)
    if zoo is not None:
        return _zoo_samples(zoo[0], zoo[1], text, ctx, many=True)
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"input path not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(
                f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return [_pixels_to_sample(_read_image(p, ctx, p.name), ctx, str(p), None)
                for p in files]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if ctx.shape is None:
            raise InputError(
                f"reading {path} needs the image shape: pass entry=... or input_shape=..."
            )
        images, labels = read_csv_file(path, ctx.shape)
        _check_labels(labels, ctx, str(path))
        _check_csv_pixels(images, str(path))
        return [
            _pixels_to_sample(torch.from_numpy(images[i : i + 1]), ctx, f"{path}#{i}",
                              int(labels[i]))
            for i in range(len(labels))
        ]
    if suffix in ARRAY_SUFFIXES:
        return _array_samples(path, ctx, single=False)
    return [load_sample(path, entry=entry, input_shape=input_shape, mean=mean, std=std,
                        scale=scale, raw=raw)]
