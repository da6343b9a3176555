"""Global layer factors computed side by side on several threads (:mod:`lipbound._parallel`):
the same factors, bit for bit, as the one-thread computation one layer after another; torch's
thread count restored; errors, autograd modes and progress handled as on one thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import build, conv_specs, n_examples, random_batchnorm, random_normalize
from lipbound import Analyzer, ExactRouteTooLarge, _parallel, _threads, zoo
from lipbound import spectral as sp

CPU = torch.device("cpu")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Records the worker count of every ``run_in_threads`` call."""
    calls: list[int] = []
    real = _parallel.run_in_threads

    def recording(fn, items, workers, **kw):
        calls.append(workers)
        return real(fn, items, workers, **kw)

    monkeypatch.setattr(_parallel, "run_in_threads", recording)
    return calls


@pytest.fixture
def every_layer_threaded(monkeypatch):
    """Small test networks take the threaded path (their layers are below the thresholds)."""
    monkeypatch.setattr(_parallel, "MIN_TOTAL_FLOPS", 0.0)
    monkeypatch.setattr(_parallel, "MAX_SHARE", 1.0)


# ----------------------------------------------------------------------------- the policy


@pytest.mark.parametrize("flops, threads, expected", [
    ([7.8e5, 7.2e6, 2.7e6, 3.7e6, 8.2e5, 5.1e3], 2, 2),   # the CIFAR-10 net's layers
    ([7.8e5, 7.2e6, 2.7e6, 3.7e6, 8.2e5, 5.1e3], 8, 6),   # at most one thread per layer
    ([7.8e5, 7.2e6, 2.7e6, 3.7e6, 8.2e5, 5.1e3], 1, 1),   # --threads 1
    ([8.6e4, 1.5e5, 3.1e4, 1.0e4, 8.4e2], 2, 1),          # MNIST LeNet: too cheap in all
    ([9e6, 1e6, 1e6], 2, 1),                               # one layer dominates
    ([6e6, 3e6], 2, 2),                                    # 2/3 of the total: still spread
    ([5e6], 2, 1),                                         # a single layer
    ([], 2, 1),
])
def test_workers_for(restore_threads, flops, threads, expected):
    torch.set_num_threads(threads)
    assert _parallel.workers_for(CPU, flops) == expected


def test_workers_for_other_devices(restore_threads):
    torch.set_num_threads(2)
    cifar = [7.8e5, 7.2e6, 2.7e6, 3.7e6, 8.2e5]
    assert _parallel.workers_for(torch.device("cuda"), cifar) == 1
    assert _parallel.workers_for(torch.device("meta"), cifar) == 1


# ----------------------------------------------------------------------------- run_in_threads


def test_results_in_order_done_on_caller(restore_threads):
    torch.set_num_threads(2)
    caller = threading.get_ident()
    seen: list[tuple[int, int]] = []
    inside: list[int] = []

    def fn(k: int) -> int:
        inside.append(torch.get_num_threads())
        return k * k

    out = _parallel.run_in_threads(fn, list(range(7)), 3, cost=lambda k: k % 3,
                                   done=lambda k: seen.append((k, threading.get_ident())))
    assert out == [k * k for k in range(7)]
    assert sorted(k for k, _ in seen) == list(range(7))
    assert {t for _, t in seen} == {caller}
    assert inside == [1] * 7  # torch single-threaded in the workers
    assert torch.get_num_threads() == 2  # restored


def test_costliest_start_first():
    started: list[int] = []
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=10)

    def fn(k: int) -> int:
        with lock:
            started.append(k)
            first_two = len(started) <= 2
        if first_two:
            both.wait()  # the first two run at the same time: they were the first dequeued
        return k

    costs = {0: 1.0, 1: 5.0, 2: 2.0, 3: 9.0}
    assert _parallel.run_in_threads(fn, [0, 1, 2, 3], 2, cost=costs.__getitem__) == [0, 1, 2, 3]
    assert set(started[:2]) == {1, 3}


def test_one_worker_runs_in_order_on_the_caller(restore_threads):
    torch.set_num_threads(2)
    caller = threading.get_ident()
    order: list[tuple[int, int]] = []
    out = _parallel.run_in_threads(lambda k: order.append((k, threading.get_ident())) or k,
                                   [3, 1, 2], 1, cost=lambda k: k)
    assert out == [3, 1, 2] and order == [(3, caller), (1, caller), (2, caller)]
    assert torch.get_num_threads() == 2  # never changed


def test_first_error_in_item_order_and_threads_restored(restore_threads):
    torch.set_num_threads(2)
    all_started = threading.Barrier(4, timeout=10)

    def fn(k: int) -> int:
        all_started.wait()  # every item runs
        if k in (1, 3):
            raise ValueError(f"item {k}")
        return k

    with pytest.raises(ValueError, match="item 1"):
        _parallel.run_in_threads(fn, [0, 1, 2, 3], 4, cost=lambda k: -k)
    assert torch.get_num_threads() == 2


def test_items_not_started_are_dropped_after_an_error():
    ran: list[int] = []

    def fn(k: int) -> int:
        ran.append(k)
        if k == 0:
            raise RuntimeError("first")
        return k

    with pytest.raises(RuntimeError, match="first"):
        _parallel.run_in_threads(fn, list(range(50)), 2)
    assert len(ran) < 50


def test_done_is_called_as_each_item_finishes():
    """``done`` (a progress bar) runs as soon as an item finishes, while others still run
    (it was called only once all had finished: the bar stood still, then jumped)."""
    first_done = threading.Event()

    def fn(k: int) -> bool:
        return True if k == 0 else first_done.wait(5)

    def done(k: int) -> None:
        if k == 0:
            first_done.set()

    assert _parallel.run_in_threads(fn, [0, 1], 2, done=done) == [True, True]


def test_an_interrupt_from_done_restores_threads_and_drops_the_rest(restore_threads):
    """``done`` runs on the caller (a progress bar): an interrupt raised there propagates
    once the running items finish, items not started are dropped, the count is restored."""
    torch.set_num_threads(2)
    ran: list[int] = []

    def fn(k: int) -> int:
        ran.append(k)
        time.sleep(0.005)
        return k

    def done(_k: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _parallel.run_in_threads(fn, list(range(200)), 2, done=done)
    assert len(ran) < 200
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_workers_take_the_callers_autograd_mode(mode):
    def fn(_k: int) -> tuple[bool, bool]:
        return torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
           "grad": torch.enable_grad}[mode]
    with ctx():
        expected = fn(0)
        got = _parallel.run_in_threads(fn, [0, 1, 2], 2)
    assert got == [expected] * 3


def test_single_threaded_blocks_left_out_of_order(restore_threads):
    """Blocks of one thread that end in the other order restore the count once, at the end of
    the last (a save and restore per block would leave the thread at 1)."""
    torch.set_num_threads(2)
    a, b = _threads.torch_single_threaded(), _threads.torch_single_threaded()
    a.__enter__()
    b.__enter__()
    assert torch.get_num_threads() == 1
    a.__exit__(None, None, None)
    assert torch.get_num_threads() == 1  # b still runs
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == 2


def test_single_threaded_blocks_of_two_threads_restore_each_thread(restore_threads):
    """torch's count is per thread: blocks of two threads, the first left first, give each
    thread its own count back (a count shared between them, restored by the thread that left
    last, left the other one at 1 for good: its later bounds slower, rounded as on one
    thread)."""
    torch.set_num_threads(2)
    ready, main_in, other_in, other_out = (threading.Event() for _ in range(4))
    seen: dict[str, int] = {}

    def other() -> None:
        seen["before"] = torch.get_num_threads()
        ready.set()
        main_in.wait(10)
        with _threads.torch_single_threaded():
            seen["inside"] = torch.get_num_threads()
            other_in.set()
            other_out.wait(10)
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=other)
    t.start()
    ready.wait(10)
    with _threads.torch_single_threaded():
        main_in.set()
        other_in.wait(10)
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # left first, the other block still running
    other_out.set()
    t.join(10)
    assert seen == {"before": 2, "inside": 1, "after": 2}
    assert torch.get_num_threads() == 2


def test_workers_stay_single_threaded_when_another_thread_sets_a_count(restore_threads):
    """A worker computes on one torch thread even when another thread sets torch's count
    (e.g. another caller restoring its own) after the worker set 1 but before its first
    product: a new thread takes the most recent setting of any thread then."""
    torch.set_num_threads(2)
    started, was_set = threading.Event(), threading.Event()

    def setter() -> None:
        started.wait(10)
        torch.set_num_threads(2)
        was_set.set()

    t = threading.Thread(target=setter)
    t.start()

    def fn(_k: int) -> int:
        started.set()
        was_set.wait(10)
        return torch.get_num_threads()

    try:
        assert _parallel.run_in_threads(fn, [0, 1], 2) == [1, 1]
    finally:
        started.set()
        t.join(10)
    assert torch.get_num_threads() == 2


# ----------------------------------------------------------------------------- the analyzer


def _factors(model: nn.Module, shape, threads: int, **kw) -> list:
    with _threads.limited_threads(threads):
        an = Analyzer(model, shape, **kw)
        an.global_bound()
        return an._global[""]


def _same_factors(a: list, b: list) -> None:
    assert len(a) == len(b)
    for fa, fb in zip(a, b, strict=True):
        assert fa.value == fb.value  # bit for bit
        assert fa.estimate == fb.estimate or (fa.estimate != fa.estimate
                                              and fb.estimate != fb.estimate)  # NaN
        assert (fa.guarantee, fa.failure_prob, fa.method) == \
            (fb.guarantee, fb.failure_prob, fb.method)


def test_cifar10_global_threaded_is_the_one_thread_bound(spy):
    """The zoo's CIFAR-10 net takes the threaded path on two threads (unpatched policy) and
    gives exactly the factors of one thread, one layer after another."""
    lm = zoo.load_model("cifar10", device="cpu")
    shape = lm.entry.input_shape
    threaded = _factors(lm.model, shape, 2)
    assert spy == [2]
    alone = _factors(lm.model, shape, 1)
    assert spy == [2]  # one thread: no threads spread
    _same_factors(threaded, alone)


@settings(max_examples=n_examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=conv_specs(), route=st.sampled_from(["auto", "lanczos", "exact"]))
def test_random_networks_threaded_is_the_one_thread_bound(every_layer_threaded, spec, route):
    model, shape, x0 = build(spec)
    kw = dict(spectral=route, lanczos_steps=spec["lanczos_steps"], seed=spec["seed"] % 1000)
    threaded = _factors(model, shape, 2, **kw)
    _same_factors(threaded, _factors(model, shape, 1, **kw))
    # and the local bound that uses them
    with _threads.limited_threads(2):
        an = Analyzer(model, shape, **kw)
        an.global_bound()
        loc2 = an.local_bound(x0, spec["eps"])
    with _threads.limited_threads(1):
        an = Analyzer(model, shape, **kw)
        an.global_bound()
        loc1 = an.local_bound(x0, spec["eps"])
    assert loc2.value == loc1.value and loc2.guarantee == loc1.guarantee


def _cnn() -> nn.Module:
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU(),
                      nn.Flatten(), nn.Linear(27, 4)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


def test_an_error_in_a_threaded_layer_names_it(every_layer_threaded, spy, restore_threads,
                                               monkeypatch):
    import lipbound.analyzer as analyzer_mod

    real = analyzer_mod.spectral_upper

    def fail(*a, **kw):
        if kw.get("n_in") == 27:  # the linear layer's run
            raise ExactRouteTooLarge(4, 27, 10**12, 10**9, "memory")
        return real(*a, **kw)

    monkeypatch.setattr(analyzer_mod, "spectral_upper", fail)
    torch.set_num_threads(2)
    an = Analyzer(_cnn(), (1, 7, 7), spectral="lanczos")
    with pytest.raises(ExactRouteTooLarge) as exc:
        an.global_bound()
    assert spy == [2]
    assert exc.value.layer == an.blocks[-1].name
    assert torch.get_num_threads() == 2
    assert "" not in an._global  # nothing half-computed is kept


def test_forced_exact_route_is_not_spread(every_layer_threaded, spy, restore_threads,
                                          monkeypatch):
    """The exact route's memory check sees one matrix at a time: layers forming their
    matrices at once could together exceed it, so spectral='exact' runs them one by one."""
    def fail(m):
        raise MemoryError()

    real = sp.exact_norm
    monkeypatch.setattr(sp, "exact_norm", fail)
    torch.set_num_threads(2)
    an = Analyzer(_cnn(), (1, 7, 7), spectral="exact")
    with pytest.raises(ExactRouteTooLarge) as exc:
        an.global_bound()
    assert spy == []
    assert exc.value.layer == an.blocks[0].name  # the first layer, as one after another
    monkeypatch.setattr(sp, "exact_norm", real)
    Analyzer(_cnn(), (1, 7, 7), spectral="exact").global_bound()
    assert spy == []
    Analyzer(_cnn(), (1, 7, 7), spectral="auto").global_bound()
    assert spy == [2]  # the same network is spread on the other routes


def _cnn_48() -> tuple[nn.Module, tuple[int, ...], torch.Tensor]:
    """A small CNN of the CIFAR-10 net's kind that the real policy spreads: two 48-channel
    3x3 convolutions at 14x14 (4.1e6 multiply-adds each; Winograd products, with per-thread
    buffers), batch norm, a Normalize input layer, max pooling."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(random_normalize(3, g, 2), nn.Conv2d(3, 48, 3, padding=1),
                      random_batchnorm(48, g), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1),
                      nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), random_batchnorm(48, g),
                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(48 * 7 * 7, 10)).double().eval()
    with torch.no_grad():
        for mod in m:
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64)
                                 / mod.weight[0].numel() ** 0.5)
    x0 = torch.randn(1, 3, 14, 14, generator=g, dtype=torch.float64)
    return m, (3, 14, 14), x0


def test_spread_cnn_with_winograd_layers_is_the_one_thread_bound(spy, monkeypatch):
    """The real policy spreads this CNN's layers (Winograd products on the workers): its
    factors, those of an output map, and a local bound computed afterwards on the same
    analyzer are those of one thread."""
    from lipbound.ops import winograd

    threads_used: set[int] = set()
    real_conv = winograd.WinogradConv.conv

    def conv(self, x):
        threads_used.add(threading.get_ident())
        return real_conv(self, x)

    monkeypatch.setattr(winograd.WinogradConv, "conv", conv)
    # fast products are off by default (session 24): the opt-in path is what runs on workers
    monkeypatch.setattr(sp, "FAST_REL_ERROR", 1e-8)
    model, shape, x0 = _cnn_48()
    c = torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = []
    for threads in (2, 1):
        with _threads.limited_threads(threads):
            an = Analyzer(model, shape)
            an.global_bound()
            an.global_bound(output_map=c)
        with _threads.limited_threads(2):
            loc = an.local_bound(x0, 0.05)
        runs.append((an, loc))
    assert spy == [2, 2]  # both global bounds spread on two threads, none on one
    assert any(t != threading.get_ident() for t in threads_used)  # Winograd on a worker
    (an2, loc2), (an1, loc1) = runs
    assert sorted(an2._global) == sorted(an1._global) and len(an2._global) == 2
    for key in an2._global:
        _same_factors(an2._global[key], an1._global[key])
    assert loc2.value == loc1.value
    assert [lf.local for lf in loc2.layers] == [lf.local for lf in loc1.layers]


class _Bar:
    def __init__(self) -> None:
        self.updates = 0
        self.labels: list[str] = []

    def update(self, n: int = 1) -> None:
        self.updates += n

    def label(self, text: str) -> None:
        self.labels.append(text)


def test_progress_over_threaded_layers(every_layer_threaded, spy, restore_threads):
    torch.set_num_threads(2)
    an = Analyzer(_cnn(), (1, 7, 7), spectral="lanczos")
    bar = _Bar()
    facs = an._global_factors("", an.blocks, bar)
    assert spy == [2]
    assert bar.updates <= len(an.blocks)
    assert any("threads" in lab for lab in bar.labels)
    with _threads.limited_threads(1):
        alone = Analyzer(_cnn(), (1, 7, 7), spectral="lanczos")
        alone.global_bound()
    _same_factors(facs, alone._global[""])
