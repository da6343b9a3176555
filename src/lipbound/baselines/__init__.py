"""Rival methods, for comparison with lipbound's own bounds (fully connected ReLU networks).

A conv net (Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm, Normalize, ...) is
given to them as an exact fully connected ReLU chain computing the same function
(:func:`~lipbound.baselines.conv_to_fc.relu_chain`, used by
:func:`~lipbound.baselines.fc.fc_layers` when ``input_shape`` is known); their notes then
say ``"conv net as an exact FC ReLU chain of widths ..."``. Methods that cannot scale to the
widths refuse with the size (exact methods: ``max_hidden``; LipSDP: ``max_dim``; SeqLip:
``max_greedy_entries``).

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
``eclipse_fast``     global constant (ECLipsE-Fast closed form)           certified after a
                                                                          float64 LMI check
                                                                          (estimate when the
                                                                          LMI is too large
                                                                          to check)
``fastlip``          local, all pairs in the ball                         certified
``recurjac``         local, all pairs in the ball                         certified
``exact_local_l2``   local, all pairs in the ball                         exact (verified
                                                                          maximiser), else
                                                                          certified
``lipmip``           local, ``c^T f`` on an l_inf box (dual-norm grad.)   exact (HiGHS's
                                                                          optimum, verified,
                                                                          + 1e-6 relative
                                                                          and absolute) or
                                                                          certified (a dual
                                                                          bound)
``pgd_lower_bound``  local, relative to x0 (lipbound.lower's)             lower bound
===================  ===================================================  ===================

Every rival takes ``time_limit`` in seconds (default: none; the exact methods 60 s),
checked between its steps (:mod:`lipbound.baselines.deadline`): a method that reaches it
raises :class:`~lipbound.baselines.deadline.TimeLimitError` (a ``LipboundError``) instead of
returning a value; ``lipmip`` hands the limit to HiGHS and, when HiGHS stops on it with a
MILP dual bound, returns that bound (CERTIFIED) instead (through highspy, the ``mip`` extra,
HiGHS has one once it has bounded its root relaxation; through scipy only with a feasible
point).

Every baseline refuses (``InputError``) magnitudes at which float64 would under- or
overflow inside it (:func:`~lipbound.baselines.fc.check_range`: rows, ``eps`` and ``|x0|`` in
``[2^-160, 2^160]``, products of consecutive layers within ``2^±500``): their rounding
margins are relative and do not cover underflow.

:func:`compare` runs them all (plus lipbound's own bounds) and returns a table.
"""

from lipbound.baselines.autolip import autolip
from lipbound.baselines.compare import CompareRow, compare, format_table
from lipbound.baselines.conv_to_fc import ConversionTooLargeError, relu_chain
from lipbound.baselines.eclipse import eclipse_fast
from lipbound.baselines.exact import exact_local_l2, lipmip
from lipbound.baselines.fc import NotFullyConnectedError, fc_layers
from lipbound.baselines.lipsdp import MissingDependencyError, lipsdp
from lipbound.baselines.recurjac import fastlip, recurjac
from lipbound.baselines.seqlip import seqlip
from lipbound.lower import pgd_lower_bound

__all__ = [
    "CompareRow",
    "ConversionTooLargeError",
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
    "relu_chain",
    "seqlip",
]
