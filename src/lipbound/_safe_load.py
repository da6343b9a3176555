"""Reading ``torch.save`` files safely (``weights_only=True``: tensors and plain containers,
never arbitrary pickled objects), and a short reason when that fails.

PyTorch's own message for a refused file is long and advises re-running with
``weights_only=False``, which would execute whatever the file holds; lipbound's messages
say what the file should hold instead and keep PyTorch's error as the ``__cause__``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

REASON_CHARS = 160
"""Longest excerpt of another error's first line that a reason quotes."""


class TorchScriptArchive(Exception):
    """The file is a TorchScript archive (``torch.jit.save``), not a ``torch.save`` file."""


def _is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip file whose folder holds
    ``constants.pkl`` (the test ``torch.load`` makes before handing such a file, with a
    warning, to ``torch.jit.load``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(name.split("/", 1)[-1] == "constants.pkl" for name in names)


def torch_load_safely(path: str | Path) -> Any:
    """``torch.load(path)`` onto the CPU with ``weights_only=True``.

    Raises:
        TorchScriptArchive: ``path`` is a TorchScript archive (never run: it holds code).
    """
    if _is_torchscript(path):
        raise TorchScriptArchive(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def why_unreadable(exc: BaseException) -> str:
    """Why a file could not be read, in one short clause (``it is ...``)."""
    if isinstance(exc, TorchScriptArchive):
        return ("it is a TorchScript archive (saved with torch.jit.save), which holds code "
                "that lipbound does not run; torch.jit.load(path) reads it back")
    if isinstance(exc, pickle.UnpicklingError):
        # weights_only refused a Python object (a whole pickled nn.Module, a custom class),
        # or the bytes are not a pickle at all
        return ("it is not readable with torch.load(weights_only=True): it holds a pickled "
                "whole model or other Python objects, or it is corrupt")
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else "no message"
    if len(first) > REASON_CHARS:
        first = first[:REASON_CHARS - 3] + "..."
    return f"it is corrupt or not in a format lipbound reads ({type(exc).__name__}: {first})"
