"""CPU thread counts of every pool the computations run on: torch's intra-op threads and the
BLAS / OpenMP pools of numpy and scipy.

``torch.set_num_threads`` does not reach the OpenBLAS libraries that numpy and scipy bundle;
they keep one thread per core. The rival methods (:mod:`lipbound.baselines`: ECLipsE-Fast's
eigenvalues and Cholesky factorisations, the exact spectral norms) run in numpy/scipy LAPACK,
and on a busy 2-core machine a second BLAS thread made ECLipsE-Fast 3-4.5x slower while torch
had one (benchmarks/README.md, session 13). So a thread count is applied to both: torch, and
through threadpoolctl the BLAS/OpenMP pools of the libraries loaded in the process (numpy's
and scipy's OpenBLAS are loaded first, so that theirs are among them).

Thread settings are process-wide, so the library never changes them on import;
:func:`set_threads` is for the command line (``--threads``, for the command's lifetime) and
:func:`limited_threads` for a block of work (:mod:`lipbound.bench`), restored afterwards.
threadpoolctl is imported only here, when a limit is applied.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)

_single = threading.local()  # per thread: depth and saved count of torch_single_threaded


def _threadpoolctl() -> Any:
    """threadpoolctl, after loading numpy and scipy's linear algebra: it sees only the
    libraries already loaded, and their OpenBLAS pools are the ones to read or limit."""
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401
    import threadpoolctl

    return threadpoolctl


def _limit_pools(n: int) -> Any | None:
    """Limit the BLAS and OpenMP pools of the loaded libraries to ``n`` threads each; the
    threadpoolctl limiter (leaving it as a context manager restores the previous limits), or
    None when the pools could not be limited (threadpoolctl missing or failing: torch's
    threads are set anyway). A process without any pool threadpoolctl recognises is not an
    error: there is nothing to limit."""
    try:
        return _threadpoolctl().threadpool_limits(limits=n)
    except Exception as exc:  # an unreadable library, no threadpoolctl: do not fail the work
        log.warning("numpy/scipy BLAS threads not limited to %d: %s", n, exc)
        return None


def set_threads(n: int) -> None:
    """``n`` threads for torch and for the BLAS/OpenMP pools of numpy and scipy, for the rest
    of the process (nothing restores them; see :func:`limited_threads`)."""
    _limit_pools(n)
    torch.set_num_threads(n)


@contextmanager
def limited_threads(n: int) -> Iterator[None]:
    """``n`` threads for torch and the BLAS/OpenMP pools inside the block; the previous
    counts of both are restored on exit."""
    old = torch.get_num_threads()
    limiter = _limit_pools(n)
    if limiter is not None:
        # entered and left as threadpoolctl's context manager: leaving it also hands the
        # control of OpenBLAS's process-wide pool back (since threadpoolctl 3.8 only the
        # thread that set a limit can change it until then)
        limiter.__enter__()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if limiter is not None:
            try:
                limiter.__exit__(None, None, None)
            except Exception as exc:
                log.warning("numpy/scipy BLAS thread limits not restored: %s", exc)


def blas_threads() -> int | None:
    """The largest thread count of the BLAS pools loaded in the process (numpy's and scipy's
    are loaded first), as threadpoolctl reads them; None when it cannot tell."""
    try:
        counts = [int(d["num_threads"]) for d in _threadpoolctl().threadpool_info()
                  if d["user_api"] == "blas"]
    except Exception:  # threadpoolctl missing or failing: not worth failing a benchmark
        return None
    return max(counts) if counts else None


@contextmanager
def torch_single_threaded() -> Iterator[None]:
    """torch's intra-op threads set to 1 on the calling thread inside the block, for work that
    runs on several Python threads, one core each (:mod:`lipbound._parallel`).

    torch's count is per thread (with its OpenMP backend: ``torch.set_num_threads`` sets, and
    ``torch.get_num_threads`` reads, the calling thread's own; a thread gets one at its first
    parallel operation from the most recent ``set_num_threads`` in any thread). So each thread
    saves and restores its own count, and blocks of other threads never change it: a count
    shared between threads, restored by whichever thread leaves last, left the thread that
    left first at 1 for good (slower, and its later products rounded as on one thread). Blocks
    of one thread may nest and be left out of order: the count from before the first is
    restored when the last one leaves."""
    depth = getattr(_single, "depth", 0)
    if depth == 0:
        _single.saved = torch.get_num_threads()
        torch.set_num_threads(1)
    _single.depth = depth + 1
    try:
        yield
    finally:
        _single.depth -= 1
        if _single.depth == 0:
            torch.set_num_threads(_single.saved)
