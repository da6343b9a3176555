"""Reading ``torch.save`` files safely (``weights_only=True``: tensors and plain containers,
never arbitrary pickled objects), and a short reason when that fails.

PyTorch's own message for a refused file is long and advises re-running with
``weights_only=False``, which would execute whatever the file holds; lipbound's messages
say what the file should hold instead and keep PyTorch's error as the ``__cause__``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

REASON_CHARS = 160
"""Longest excerpt of another error's first line that a reason quotes."""


def torch_load_safely(path: str | Path) -> Any:
    """``torch.load(path)`` onto the CPU with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def why_unreadable(exc: BaseException) -> str:
    """Why a file could not be read, in one short clause (``it is ...``)."""
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
