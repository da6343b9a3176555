"""Minimal-L2 adversarial attacks: verified upper bounds on the minimal adversarial radius.

Each attack returns an :class:`AttackResult` whose ``radius`` is the L2 size of a concrete
perturbation that a fresh forward pass confirmed changes the predicted class
(guarantee :attr:`lipbound.results.Guarantee.ATTACK`). Certified radii must never exceed
these numbers.

Attacks: :class:`FGSM` (``"fgsm"``), :class:`IterativeFGSM` (``"ifgsm"``),
:class:`GradientAscent` (``"gradient"``), :class:`CarliniWagnerL2` (``"cw"``),
:class:`PGD` (``"pgd"``). Use them as ``FGSM(**options)(model, x0, bounds=None, seed=0)``
or through :func:`run_attacks`.
"""

from lipbound.attacks.base import Attack, AttackContext, AttackResult
from lipbound.attacks.cw import CarliniWagnerL2
from lipbound.attacks.fgsm import FGSM
from lipbound.attacks.gradient import GradientAscent
from lipbound.attacks.ifgsm import IterativeFGSM
from lipbound.attacks.pgd import PGD
from lipbound.attacks.registry import ATTACKS, DEFAULT_METHODS, get_attack, run_attacks

__all__ = [
    "ATTACKS",
    "DEFAULT_METHODS",
    "Attack",
    "AttackContext",
    "AttackResult",
    "CarliniWagnerL2",
    "FGSM",
    "GradientAscent",
    "IterativeFGSM",
    "PGD",
    "get_attack",
    "run_attacks",
]
