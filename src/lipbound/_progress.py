"""Progress bars for long computations: tqdm on stderr, only on a terminal, only after a delay.

Library functions that can run for long take ``progress: bool = False`` and open a bar with
:func:`progress_bar`; the command line turns it on. A bar is shown only when it was asked
for *and* stderr is a terminal, and only once the work has run for :data:`DELAY` seconds,
so short jobs (tests, CI, small networks) write nothing. It is removed when the work ends
(``leave=False``). While shown, a background thread redraws it every :data:`TICK` seconds,
so the elapsed time moves during a long step (one VGG-16 layer, one exact solver run).

Nothing is created when no bar is wanted: the work runs against :data:`NULL_BAR`, whose
methods do nothing.
"""

from __future__ import annotations

import functools
import sys
import threading
from types import TracebackType
from typing import IO, Any

DELAY = 2.0
"""Seconds of work before a bar first appears."""

TICK = 1.0
"""Seconds between redraws of a shown bar (its elapsed time moves during a long step)."""


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` is an interactive terminal (False when it cannot tell)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):  # replaced, closed, or not a stream
        return False


class NullBar:
    """A bar that shows nothing (``progress=False``, or stderr is not a terminal)."""

    def update(self, n: int = 1) -> None:
        """Count ``n`` items done (nothing to do)."""

    def label(self, text: str) -> None:
        """Name the item now running (nothing to do)."""

    def close(self) -> None:
        """Remove the bar (nothing to do)."""

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NULL_BAR = NullBar()
"""The shared bar that shows nothing."""


@functools.cache
def _tqdm_class() -> type:
    """tqdm, made to keep its ``delay`` also when ``tqdm.write`` (log records during a bar,
    see :func:`lipbound.cli.common.progress_logging`) redraws every open bar, and to know
    whether it was ever drawn: only then does it clear its line (tqdm alone decides both
    from its last update, so a bar redrawn by a log record could be left behind)."""
    from tqdm import tqdm

    class DelayedTqdm(tqdm):  # type: ignore[misc]
        drawn = False

        def display(self, msg: str | None = None, pos: int | None = None) -> Any:
            if not self.drawn and self.delay > 0 and \
                    self._time() < self.start_t + self.delay:
                return None  # still within the delay
            self.drawn = True
            return super().display(msg, pos)

        def clear(self, nolock: bool = False) -> None:
            if self.drawn:
                super().clear(nolock)

        def close(self) -> None:
            if self.drawn and not self.disable:
                # tqdm clears the line only if its last update came after the delay
                self.last_print_t = max(self.last_print_t, self.start_t + self.delay)
            super().close()

    return DelayedTqdm


class Bar(NullBar):
    """A tqdm bar on ``file`` that appears after :data:`DELAY` seconds and then moves every
    :data:`TICK` seconds. Use as a context manager (closed, and removed from the terminal, on
    exit, also on an exception).

    Args:
        total: number of items (``None``: unknown; then a count and the elapsed time,
            e.g. ``"radius vgg16: local eps=0.01 [evaluations: 7, 01:02]"``, or only the
            elapsed time when ``unit`` is empty).
        desc: what is being iterated over, e.g. ``"local bound vgg16"``.
        unit: the item's name, e.g. ``"layer"``.
        file: the stream (default ``sys.stderr`` at creation).
    """

    def __init__(self, total: int | None, desc: str, unit: str, file: IO[str] | None = None):
        self._desc = desc
        self._lock = threading.Lock()
        # miniters=0 keeps every update (also the ticker's update(0)) eligible for a redraw
        # once the bar is past its `delay` (before, nothing draws it: _tqdm_class)
        fmt = None
        if total is None:
            fmt = "{desc} [{unit}: {n_fmt}, {elapsed}]" if unit else "{desc} [{elapsed}]"
        # smoothing=0: the rate (and time left) is the average over the whole run; the
        # ticker's redraws would otherwise shorten the intervals the moving average sees
        self._bar = _tqdm_class()(total=total, desc=desc, unit=unit, leave=False,
                                  delay=DELAY, miniters=0, smoothing=0,
                                  file=sys.stderr if file is None else file,
                                  dynamic_ncols=True, bar_format=fmt)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="lipbound-progress",
                                        daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            with self._lock:
                self._bar.update(0)

    def update(self, n: int = 1) -> None:
        """Count ``n`` items done."""
        with self._lock:
            self._bar.update(n)

    def label(self, text: str) -> None:
        """Name the item now running (in the bar's description; redrawn at once when the bar
        is up)."""
        with self._lock:
            bar = self._bar
            bar.set_description_str(f"{self._desc}: {text}" if text else self._desc,
                                    refresh=False)
            if bar.drawn:  # up already: redraw now
                bar.refresh()
            else:
                bar.update(0)  # drawn if the delay has passed

    def close(self) -> None:
        """Stop the ticker and remove the bar."""
        self._stop.set()
        if self._ticker.is_alive() and self._ticker is not threading.current_thread():
            self._ticker.join()
        with self._lock:
            self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def progress_bar(progress: Any, total: int | None, desc: str, unit: str) -> NullBar:
    """A :class:`Bar` when ``progress`` is true and stderr is a terminal, else
    :data:`NULL_BAR`.

    Args:
        progress: whether the caller asked for a bar.
        total: number of items (``None``: unknown, see :class:`Bar`).
        desc: what is being iterated over.
        unit: the item's name.
    """
    if not progress or not stderr_is_terminal():
        return NULL_BAR
    return Bar(total, desc, unit)
