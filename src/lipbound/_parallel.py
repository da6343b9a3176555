"""Independent pieces of one computation run side by side, one core each.

The global factors of a network's layers do not depend on one another: each layer draws its
own start vectors (:meth:`lipbound.analyzer.Analyzer._gen`). On a small layer (the CIFAR-10
net's: 0.8-7 MFlop a product) torch splits a product poorly between its intra-op threads,
and the rest of a Lanczos step (Gram-Schmidt passes, stopping checks, Python) runs on one
core anyway. Handing each of ``n`` Python threads whole layers, with torch single-threaded,
keeps ``n`` cores busy: the CIFAR-10 net's global bound 1.15-1.35x faster on two cores (62 ->
54 ms median; the same value, bit for bit the one-thread one; benchmarks/README.md, session
14). Large layers' products split well within torch (AlexNet's 4096 x 4096 layer: 0.67 s on
two torch threads, 1.15 s on one), so they run one after another with every thread, and only
layers up to :data:`MAX_FLOPS` are spread over threads, when no one of them dominates
(:data:`MAX_SHARE`).

Each piece computes exactly what it computes on one thread alone, so the results do not
depend on how the pieces were spread or in which order they finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from ._threads import torch_single_threaded

T = TypeVar("T")
R = TypeVar("R")

MAX_FLOPS = 1e7
"""A layer whose product costs at most this many flops (multiply-adds) may run on its own
thread (the CIFAR-10 net's largest: 7.2e6; AlexNet's smallest but one: 1.7e7)."""

MAX_SHARE = 2 / 3
"""Pieces are spread over threads only when none costs more than this share of them all: one
piece then takes about as long on one thread as all of them on torch's threads one after
another (intra-op threads make these layers' products about 1.5x faster on two cores)."""

MIN_TOTAL_FLOPS = 2e6
"""Fewer flops than this over all such layers run on one thread: on tiny layers a step is
Python-bound, and Python threads take turns (MNIST LeNet, 2.8e5 in all: no gain measured)."""


def workers_for(device: torch.device, flops: Sequence[float]) -> int:
    """How many threads to spread pieces with these product costs over: torch's thread
    count on the CPU (``--threads`` sets it), at most one per piece; 1 on other devices (a GPU
    runs one piece's kernels at a time), with one torch thread, or when the pieces are few or
    cheap (see :data:`MIN_TOTAL_FLOPS`), or when one dominates (see :data:`MAX_SHARE`)."""
    total = sum(flops)
    if (device.type != "cpu" or len(flops) < 2 or total < MIN_TOTAL_FLOPS
            or max(flops) > MAX_SHARE * total):
        return 1
    return max(1, min(torch.get_num_threads(), len(flops)))


def run_in_threads(fn: Callable[[T], R], items: Sequence[T], workers: int, *,
                   cost: Callable[[T], float] | None = None,
                   done: Callable[[T], None] | None = None) -> list[R]:
    """``[fn(item) for item in items]`` computed on ``workers`` threads, torch single-threaded
    while they run (restored afterwards). Costlier items start first (``cost``: the longest
    first keeps the threads' loads even). Each thread runs in the caller's autograd mode
    (grad and inference mode are per thread). ``done(item)`` is called on the calling thread
    as each item finishes (a progress bar). The first exception, in the order of ``items``,
    is raised once every started item has finished; items not yet started are dropped."""
    if workers <= 1 or len(items) <= 1:
        out = []
        for item in items:
            out.append(fn(item))
            if done is not None:
                done(item)
        return out
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()

    def run(item: T) -> R:
        # this thread's own count: read first, so that torch gives the new thread its count
        # now (at its first read or parallel operation it takes the most recent setting of
        # any thread, e.g. another caller's restore), and then 1 for good
        torch.get_num_threads()
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    order = sorted(range(len(items)), key=lambda k: -cost(items[k])) if cost is not None \
        else list(range(len(items)))
    with torch_single_threaded(), ThreadPoolExecutor(max_workers=workers) as pool:
        futures: dict[Future, int] = {pool.submit(run, items[k]): k for k in order}
        try:
            pending = set(futures)
            while pending:
                # as each finishes (FIRST_EXCEPTION would wait for all of them unless one
                # fails: a progress bar standing still, then jumping to the end)
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    if f.exception() is None and done is not None:
                        done(items[futures[f]])
                if any(f.exception() is not None for f in finished):
                    break
        finally:
            for f in futures:
                f.cancel()  # not yet started: dropped; the executor waits for the rest
    by_index = {k: f for f, k in futures.items()}
    for k in range(len(items)):
        f = by_index[k]
        if f.cancelled():
            continue
        exc = f.exception()
        if exc is not None:
            raise exc
    return [by_index[k].result() for k in range(len(items))]
