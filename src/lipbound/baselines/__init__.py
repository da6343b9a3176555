"""Rival methods, for comparison with lipbound's own bounds (fully connected ReLU networks).

One module per method; every function returns a :class:`~lipbound.results.BoundResult`
whose ``quantity`` and ``guarantee`` say exactly what the number is:

===================  ===================================================  ===================
function             quantity (L2 unless said)                            guarantee
===================  ===================================================  ===================
``autolip``          global constant                                      certified
``seqlip``           global constant                                      certified (exact
                                                                          enumeration) or
                                                                          estimate (greedy)
``lipsdp``           global constant (LipSDP-Neuron / -Layer)             certified after a
                                                                          float64 LMI check
``eclipse_fast``     global constant (ECLipsE-Fast closed form)           certified
``fastlip``          local, all pairs in the ball                         certified
``recurjac``         local, all pairs in the ball                         certified
``exact_local_l2``   local, all pairs in the ball                         exact
``lipmip``           local, ``c^T f`` on an l_inf box (dual-norm grad.)   exact (HiGHS's
                                                                          optimum + 1e-6
                                                                          relative)
``pgd_lower_bound``  local, relative to x0 (lipbound.lower's)             lower bound
===================  ===================================================  ===================

Every baseline refuses (``InputError``) magnitudes at which float64 would under- or
overflow inside it (:func:`~lipbound.baselines.fc.check_range`: rows, ``eps`` and ``|x0|`` in
``[2^-160, 2^160]``, products of consecutive layers within ``2^±500``): their rounding
margins are relative and do not cover underflow.

:func:`compare` runs them all (plus lipbound's own bounds) and returns a table.
"""

from lipbound.baselines.autolip import autolip
from lipbound.baselines.compare import CompareRow, compare, format_table
from lipbound.baselines.eclipse import eclipse_fast
from lipbound.baselines.exact import exact_local_l2, lipmip
from lipbound.baselines.fc import NotFullyConnectedError, fc_layers
from lipbound.baselines.lipsdp import MissingDependencyError, lipsdp
from lipbound.baselines.recurjac import fastlip, recurjac
from lipbound.baselines.seqlip import seqlip
from lipbound.lower import pgd_lower_bound

__all__ = [
    "CompareRow",
    "MissingDependencyError",
    "NotFullyConnectedError",
    "autolip",
    "compare",
    "eclipse_fast",
    "exact_local_l2",
    "fastlip",
    "fc_layers",
    "format_table",
    "lipmip",
    "lipsdp",
    "pgd_lower_bound",
    "recurjac",
    "seqlip",
]
