"""lipbound: certified local and global Lipschitz bounds for ReLU networks.

Implements and extends T. Avant and K. A. Morgansen, *Analytical Bounds on the Local
Lipschitz Constants of ReLU Networks*, IEEE TNNLS 2023.

Example:
    >>> import lipbound
    >>> from lipbound import inputs, zoo
    >>> net = zoo.load_model("mnist").model                        # doctest: +SKIP
    >>> x0 = inputs.load_sample("mnist:8").x                         # doctest: +SKIP
    >>> lipbound.local_bound(net, x0, eps=0.1).value                 # doctest: +SKIP
"""

from __future__ import annotations

from .analyzer import Analyzer, RowBounds, global_bound, local_bound
from .errors import (
    ExactRouteTooLarge,
    InputError,
    LipboundError,
    UnsupportedModelError,
    WeightsError,
    ZooError,
)
from .layers import Normalize
from .ops.registry import register_rule
from .residual import ResidualAnalyzer
from .results import BoundResult, Guarantee, LayerFactor

__version__ = "0.1.0"

__all__ = [
    "Analyzer",
    "BoundResult",
    "ExactRouteTooLarge",
    "Guarantee",
    "InputError",
    "LayerFactor",
    "LipboundError",
    "Normalize",
    "ResidualAnalyzer",
    "RowBounds",
    "UnsupportedModelError",
    "WeightsError",
    "ZooError",
    "global_bound",
    "local_bound",
    "register_rule",
    "__version__",
]
