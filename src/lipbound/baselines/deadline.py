"""The wall-clock time limit of a rival method, checked between its steps.

AutoLip, SeqLip, LipSDP, ECLipsE-Fast, Fast-Lip and RecurJac take ``time_limit`` (seconds;
``None``: no limit) and check it **cooperatively**: between their steps (a layer of a
recursion or of an interval product, a layer's spectral norm or SVD, a greedy pass, a chunk
of 2048 activation patterns, an SDP solve), never inside one. A method stops with
:class:`TimeLimitError` at the first check after the limit has passed, so it overruns the
limit by at most one step and the assembly of its result; a step is one dense matrix
computation of the size of a layer (e.g. an eigendecomposition of the widest layer's order)
or one call of the SDP solver, which is also given the time left as its own limit. The exact
methods keep their own limits: :func:`~lipbound.baselines.exact.exact_local_l2` checks it
every 64 branch nodes and raises the same error, :func:`~lipbound.baselines.exact.lipmip`
hands it to HiGHS.
"""

from __future__ import annotations

import math
import time

from lipbound.errors import InputError, LipboundError

__all__ = ["NO_LIMIT", "Deadline", "TimeLimitError", "check_time_limit"]


class TimeLimitError(LipboundError):
    """A rival method reached its ``time_limit`` before finishing (no value)."""


def check_time_limit(time_limit: float | None, name: str = "time_limit") -> float | None:
    """``time_limit`` as a float (``None`` stays ``None``: no limit), or an
    :class:`~lipbound.errors.InputError` unless it is a number > 0 (``inf``: no limit)."""
    if time_limit is None:
        return None
    bad = InputError(f"{name} must be a number of seconds > 0 or None, got {time_limit!r}")
    if isinstance(time_limit, (bool, str, bytes)):
        raise bad
    try:
        v = float(time_limit)
    except (TypeError, ValueError) as exc:
        raise bad from exc
    if not v > 0:  # also refuses NaN
        raise bad
    return None if math.isinf(v) else v


class Deadline:
    """A time limit started now: :meth:`check` raises once it has passed.

    Args:
        time_limit: seconds (``None`` or ``inf``: never expires); validated by
            :func:`check_time_limit`.
        what: the method's name, for the error message.
    """

    def __init__(self, time_limit: float | None, what: str):
        self.time_limit = check_time_limit(time_limit)
        self.what = what
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        """Seconds left (``inf`` without a limit, never below 0)."""
        if self.time_limit is None:
            return math.inf
        return max(self.time_limit - self.elapsed(), 0.0)

    def expired(self) -> bool:
        """Whether the limit has passed."""
        return self.time_limit is not None and self.elapsed() > self.time_limit

    def check(self, done: str) -> None:
        """Raise :class:`TimeLimitError` if the limit has passed; ``done`` says how far the
        method got (``"2 of 9 layers"``) for the message."""
        if self.expired():
            raise self.error(done)

    def error(self, done: str) -> TimeLimitError:
        """The error :meth:`check` raises."""
        return TimeLimitError(
            f"{self.what}: time limit of {self.time_limit:g} s reached after {done} "
            f"({self.elapsed():.3g} s), no value; raise time_limit (lipbound compare: "
            "--time-limit)")


NO_LIMIT = Deadline(None, "no limit")
"""The deadline that never expires: the default of the steps that take one."""
