"""Reading weight files and drawing reproducible random weights for zoo networks."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipbound._safe_load import torch_load_safely, why_unreadable
from lipbound.errors import WeightsError

__all__ = ["read_checkpoint", "read_state_dict", "check_values", "load_into", "init_seeded"]

logger = logging.getLogger(__name__)

#: Keys under which checkpoints commonly keep the state dict, tried in this order.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "net", "model")

_MAX_LISTED = 8


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _load_file(path: Path, source: str) -> Any:
    """``torch.load`` the file safely (tensors only), translating failures to WeightsError."""
    if not path.exists():
        raise WeightsError(f"weights file not found: {source}; check the path")
    if path.is_dir():
        raise WeightsError(f"weights path is a directory, not a file: {source}; give the "
                           "file saved with torch.save(model.state_dict(), path)")
    try:
        return torch_load_safely(path)
    except Exception as exc:  # a whole pickled model, a corrupt zip, not a torch file, ...
        raise WeightsError(
            f"cannot read weights file {source}: {why_unreadable(exc)}. Save the weights "
            "with torch.save(model.state_dict(), path)"
        ) from exc


def read_checkpoint(
    path: str | Path, *, source: str | None = None, unwrap: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a state dict, and the checkpoint's other entries, from a ``torch.save`` file.

    The file may hold the state dict itself, or a dict with the state dict under one of the
    keys ``"state_dict"``, ``"model_state_dict"``, ``"net"`` or ``"model"`` (as training
    checkpoints do). A ``"module."`` prefix on every key (left by ``nn.DataParallel``) is
    removed. Only tensors and plain containers are unpickled (``weights_only=True``).

    Args:
        path: the file.
        source: how to name the file in error messages (defaults to the path).
        unwrap: remove a ``"module."`` prefix on every key; ``False`` leaves it to
            :func:`unwrapped_state`, which also looks at the model's own keys.

    Returns:
        ``(state_dict, extras)``: the state dict on the CPU, and the checkpoint's other
        top-level entries (e.g. ``{"correct_pct": 99.06, "epoch": 99}``; empty for a bare
        state dict).

    Raises:
        WeightsError: if the file is missing, unreadable, or holds no state dict.
    """
    p = Path(path).expanduser()
    name = source or str(p)
    obj = _load_file(p, name)
    state: Any = obj
    extras: dict[str, Any] = {}
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        found = [key for key in STATE_DICT_KEYS if key in obj and _is_state_dict(obj[key])]
        if found:
            state = obj[found[0]]
            extras = {str(k): v for k, v in obj.items() if k != found[0]}
        if len(found) > 1:  # (session 22: the first was taken without a word)
            logger.warning("weights file %s holds state dicts under several keys %s; using "
                           "%r (save only the one to analyse to be sure)", name, found,
                           found[0])
    if not _is_state_dict(state):
        what = (
            f"a dict with keys {sorted(map(str, obj))[:_MAX_LISTED]}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise WeightsError(
            f"weights file {name} holds {what}, not a state dict; save one with "
            "torch.save(model.state_dict(), path), or a dict with the state dict under "
            f"one of the keys {list(STATE_DICT_KEYS)}"
        )
    state = dict(state)
    if unwrap and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, extras


def read_state_dict(path: str | Path, *, source: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a ``torch.save`` file; see :func:`read_checkpoint`."""
    return read_checkpoint(path, source=source)[0]


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes of a state dict saved from a wrapped model: ``nn.DataParallel`` /
``DistributedDataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``)."""


def unwrapped_state(state: Mapping[str, Any], expected: Iterable[str]) -> Mapping[str, Any]:
    """``state`` with the prefix of a wrapper (:data:`WRAPPER_PREFIXES`, at any depth)
    removed from every key, when every key has it and none of the model's ``expected`` keys
    does; else ``state`` itself. The same tensors under the names the model gives them (the
    load then checks every key and shape)."""
    expected = set(expected)
    for _ in range(8):
        if not state or any(k in expected for k in state):
            return state
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)),
                      None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_values(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                 source: str) -> None:
    """Refuse values that loading would change silently: tensors that are not dense, complex
    values (the copy drops the imaginary part), integer or boolean values for floating-point
    parameters (quantised weights would lose their scale), NaN/inf, and finite values beyond
    the range of the parameter's dtype (the copy makes them inf). ``expected``: the model's
    state dict (keys missing from it are left to the key check).

    Raises:
        WeightsError: naming every offending key and the fix.
    """
    sparse, complex_, integer, nonfinite, over = [], [], [], [], []
    for k, v in state.items():
        target = expected.get(k)
        if v.layout != torch.strided:
            sparse.append(k)
        elif v.is_complex():
            complex_.append(k)
        elif target is not None and target.is_floating_point() and not v.is_floating_point():
            integer.append(f"{k} ({v.dtype})")
        elif v.is_floating_point():
            if not bool(v.isfinite().all()):
                nonfinite.append(k)
            elif (target is not None and target.is_floating_point()
                  and v.numel() and float(v.abs().max()) > torch.finfo(target.dtype).max):
                dtype = str(target.dtype).removeprefix("torch.")
                over.append(f"{k} (largest magnitude {float(v.abs().max()):.4g}, beyond the "
                            f"{dtype} range)")
    if sparse:
        raise WeightsError(f"weights file {source} holds sparse tensors ({_listing(sparse)}); "
                           "save dense ones (t.to_dense())")
    if complex_:
        raise WeightsError(f"weights file {source} holds complex values in "
                           f"{_listing(complex_)}; the network's parameters are real (loading "
                           "would drop the imaginary part): save real tensors")
    if integer:
        raise WeightsError(f"weights file {source} holds integer or boolean values for "
                           f"floating-point parameters: {_listing(integer)}; quantised weights "
                           "would lose their scale. Save the float weights (dequantise first)")
    if nonfinite:
        raise WeightsError(f"weights file {source} has NaN or inf values in: "
                           f"{_listing(nonfinite)}; load a valid checkpoint (a diverged "
                           "training run or a corrupt file?)")
    if over:
        raise WeightsError(f"weights file {source} has values too large for the dtype of "
                           f"the model's parameters in {_listing(over)} (they would load as "
                           "inf); rescale the weights")


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` into ``model``, checking keys and shapes first.

    Raises:
        WeightsError: listing every missing key, unexpected key and shape mismatch.
    """
    expected = model.state_dict()
    state = unwrapped_state(state, expected)  # saved from a DataParallel / compiled model
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_listing(mismatched)}")
        raise WeightsError(
            f"weights file {source} does not match the {type(model).__name__} architecture; "
            + "; ".join(parts)
            + ". Check that the file was saved from this network's state_dict()"
        )
    check_values(state, expected, source=source)
    converted = {
        k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()
    }
    model.load_state_dict(converted, strict=True)


def init_seeded(model: nn.Module, seed: int) -> None:
    """Fill every Linear/Conv2d layer of ``model`` with reproducible random weights.

    He (Kaiming) normal initialisation, ``N(0, 2 / fan_in)``, so that activations keep their
    scale through the ReLU layers; the last layer uses ``N(0, 1 / fan_in)`` (no ReLU
    follows). Biases are ``N(0, 0.01^2)``. The numbers come from a CPU
    :class:`torch.Generator` seeded with ``seed``, so they are the same on every machine and
    device, and torch's global generator is not touched.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def fill(param: torch.Tensor, std: float) -> None:
        if param.device.type == "cpu" and param.dtype == torch.float32:
            param.normal_(0.0, std, generator=gen)
        else:  # draw on the CPU so the numbers do not depend on the device
            values = torch.empty(param.shape, dtype=torch.float32)
            param.copy_(values.normal_(0.0, std, generator=gen))

    with torch.no_grad():
        for i, layer in enumerate(layers):
            fan_in = layer.weight[0].numel()
            gain = 1.0 if i == len(layers) - 1 else 2.0
            fill(layer.weight, math.sqrt(gain / fan_in))
            if layer.bias is not None:
                fill(layer.bias, 0.01)
    logger.debug("seeded random weights (seed=%d) for %d layers", seed, len(layers))
