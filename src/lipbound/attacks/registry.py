"""Registry of the attacks by name, and :func:`run_attacks` to run several on one input."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lipbound._modelinfo import unwrap_model
from lipbound.attacks.base import Attack, AttackResult, Bounds
from lipbound.attacks.cw import CarliniWagnerL2
from lipbound.attacks.fgsm import FGSM
from lipbound.attacks.gradient import GradientAscent
from lipbound.attacks.ifgsm import IterativeFGSM
from lipbound.attacks.pgd import PGD
from lipbound.errors import InputError
from lipbound.lower._common import one_float64_copy

#: attack classes by registry name; add your own ``Attack`` subclass here to make it
#: available to :func:`run_attacks` (and the CLI).
ATTACKS: dict[str, type[Attack]] = {
    FGSM.name: FGSM,
    IterativeFGSM.name: IterativeFGSM,
    GradientAscent.name: GradientAscent,
    CarliniWagnerL2.name: CarliniWagnerL2,
    PGD.name: PGD,
}

DEFAULT_METHODS: tuple[str, ...] = ("fgsm", "ifgsm", "gradient", "cw", "pgd")


def get_attack(name: str, **options: Any) -> Attack:
    """Instantiate the attack registered as ``name`` with keyword ``options``.

    Raises:
        InputError: for an unknown name or invalid options.
    """
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise InputError(f"unknown attack {name!r}; choose from "
                         f"{', '.join(sorted(ATTACKS))}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise InputError(f"invalid options for attack {name!r} ({exc}); its options are "
                         f"{', '.join(params)}: check the spelling") from exc


def run_attacks(model: nn.Module, x0: Tensor, methods: Sequence[str] = DEFAULT_METHODS, *,
                bounds: Bounds | None = None, seed: int = 0,
                options: Mapping[str, Mapping[str, Any]] | None = None) -> list[AttackResult]:
    """Run several attacks on one input, in the order given.

    Args:
        model: classifier in eval mode, ``(N, *input_shape) -> (N, n_classes)``.
        x0: nominal input, shape ``(1, *input_shape)``.
        methods: registry names (see :data:`ATTACKS`).
        bounds: optional box ``(lo, hi)`` passed to every attack.
        seed: seed passed to every attack.
        options: per-method constructor options, e.g. ``{"cw": {"steps": 200}}``.

    Returns:
        One :class:`AttackResult` per method; the smallest verified radius is
        ``min(r.radius for r in results if r.success)``.

    Raises:
        InputError: for an unknown method, invalid options, options for a method that is not
            run (a likely typo), or an invalid model/input (see :class:`Attack`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lipbound.attacks import run_attacks
        >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
        >>> [r.method for r in run_attacks(model, torch.ones(1, 4), ("fgsm", "pgd"))]
        ['fgsm', 'pgd']
    """
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    if not methods:  # (an empty list returned [], read as "no attack succeeded")
        raise InputError(f"no attack to run (methods={methods!r}); choose from "
                         f"{', '.join(sorted(ATTACKS))}")
    if options is not None and not (isinstance(options, Mapping) and all(
            isinstance(v, Mapping) for v in options.values())):
        raise InputError(f"options must map attack names to dicts of their options, e.g. "
                         f"{{'pgd': {{'steps': 50}}}}, got {options!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise InputError(f"options given for attacks not being run: {unknown}; give options "
                         "only for the attacks in methods")
    attacks = [get_attack(m, **dict(options.get(m, {}))) for m in methods]
    with one_float64_copy(unwrap_model(model)):  # (one float64 copy for all the attacks)
        return [a(model, x0, bounds=bounds, seed=seed) for a in attacks]
