"""Redirection of the process's file descriptor 1 (C-level stdout).

Native solvers (HiGHS, through highspy or scipy) print on the C stdout, which Python's
``sys.stdout`` redirection does not catch; a JSON document on stdout would be corrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator


def _flush_c_stdio() -> None:
    """Flush every C stdio buffer (a native library's ``printf`` to a pipe is buffered)."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no libc handle (Windows: TypeError)
        pass


@contextlib.contextmanager
def fd1_redirected(to_fd: int | None = None) -> Iterator[None]:
    """Point file descriptor 1 at ``to_fd`` (``None``: ``/dev/null``) for the block.

    Python's and C's buffered output are flushed on both sides of the switch, so what was
    written before lands on the old stdout and what is written inside on the new target.
    Without a usable fd 1 (closed, or no ``fileno``) the block runs unredirected. Not
    thread-safe: the caller serialises concurrent redirections.
    """
    saved = -1
    try:
        sys.stdout.flush()
        _flush_c_stdio()
        saved = os.dup(1)
        if to_fd is None:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, 1)
            finally:
                os.close(null)
        else:
            os.dup2(to_fd, 1)
    except (OSError, ValueError, AttributeError):  # no usable fd 1: leave it as it is
        if saved >= 0:
            os.close(saved)
        saved = -1
    try:
        yield
    finally:
        if saved >= 0:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stdout.flush()
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)
