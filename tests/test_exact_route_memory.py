"""The exact spectral route never forms a matrix that cannot fit in memory: forced
(``spectral="exact"``) it is refused with an error naming the layer and the masked matrix's
size; chosen by ``auto`` it gives way to Lanczos (local and global bounds alike)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipbound.spectral as sp
from lipbound import Analyzer, ExactRouteTooLarge, Guarantee, InputError
from lipbound._memory import exact_bytes
from lipbound.cli import main


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double().eval()


@pytest.fixture
def tiny_machine(monkeypatch):
    """A machine with 1000 bytes of memory, and every matrix checked."""
    monkeypatch.setattr(sp, "EXACT_MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(sp, "physical_memory", lambda device=None: 1000)


X0 = torch.linspace(-1, 1, 49, dtype=torch.float64).reshape(1, 1, 7, 7)


def test_forced_exact_local_bound_is_refused_naming_the_layer(tiny_machine):
    az = Analyzer(small_cnn(), (1, 7, 7), spectral="exact")
    with pytest.raises(ExactRouteTooLarge) as exc:
        az.local_bound(X0, 0.05)
    e = exc.value
    assert isinstance(e, InputError)
    assert e.layer is not None and e.layer in str(e)
    assert e.layer == az.blocks[0].name  # the first layer already cannot fit
    # the masked matrix: every input moves, the rows are those that can be active
    assert e.cols == 49 and 0 < e.rows <= 3 * 49
    assert e.need == exact_bytes(e.rows, e.cols) and e.avail == 1000
    assert "spectral='auto'" in str(e) and "this machine" in str(e)


def test_forced_exact_global_bound_is_refused(tiny_machine):
    with pytest.raises(ExactRouteTooLarge) as exc:
        Analyzer(small_cnn(), (1, 7, 7), spectral="exact").global_bound()
    assert exc.value.layer is not None
    assert (exc.value.rows, exc.value.cols) == (3 * 49, 49)


@pytest.mark.parametrize("what", ["local", "global"])
def test_auto_gives_way_to_lanczos_when_the_exact_matrix_cannot_fit(monkeypatch, what):
    def run(az):
        return az.local_bound(X0, 0.05) if what == "local" else az.global_bound()

    exact = run(Analyzer(small_cnn(), (1, 7, 7), spectral="exact"))
    auto = run(Analyzer(small_cnn(), (1, 7, 7), spectral="auto"))
    assert exact.guarantee is Guarantee.CERTIFIED
    assert auto.layers[0].spectral_method == "svd"  # small: exact
    monkeypatch.setattr(sp, "EXACT_MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(sp, "physical_memory", lambda device=None: 1000)
    low_mem = run(Analyzer(small_cnn(), (1, 7, 7), spectral="auto"))
    assert low_mem.layers[0].spectral_method.startswith("lanczos")  # 147 x 49 > 1000 B
    # sound: at least the norm of the Jacobian at x0 (x0 is inside a linear region)
    jac = torch.autograd.functional.jacobian(small_cnn(), X0).reshape(4, -1)
    assert low_mem.value >= float(torch.linalg.matrix_norm(jac, 2))
    # and as tight: the layers are small enough for a Lanczos run over the whole space
    assert low_mem.value <= exact.value * 1.001


def test_unreadable_memory_does_not_refuse(monkeypatch):
    monkeypatch.setattr(sp, "EXACT_MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(sp, "physical_memory", lambda device=None: None)
    res = Analyzer(small_cnn(), (1, 7, 7), spectral="exact").local_bound(X0, 0.05)
    assert res.guarantee is Guarantee.CERTIFIED


def test_small_matrices_are_not_checked(monkeypatch):
    def boom(device=None):
        raise AssertionError("physical memory read for a small matrix")

    monkeypatch.setattr(sp, "physical_memory", boom)
    Analyzer(small_cnn(), (1, 7, 7), spectral="exact").local_bound(X0, 0.05)


def test_cli_local_exact_beyond_memory_is_a_clear_error(capsys, tiny_machine):
    rc = main(["bound", "--model", "mnist", "--method", "local", "--spectral", "exact"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lipbound: error: spectral='exact' (CLI --spectral exact) cannot "
                          "compute layer ")
    assert "Use spectral='auto'" in err


def failing_allocation(kind: str):
    """An ``exact_norm`` whose matrix cannot be allocated, as each allocator reports it."""
    def fail(m):
        if kind == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if kind == "cpu":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                               "DefaultCPUAllocator: can't allocate memory: you tried ...")
        raise MemoryError()
    return fail


@pytest.mark.parametrize("kind", ["cuda", "cpu", "python"])
def test_allocation_failure_in_the_exact_route(monkeypatch, kind):
    """The memory check reads the total memory; when forming the matrix still fails (a GPU
    shared with other processes), forced exact gives ExactRouteTooLarge naming the layer,
    and auto takes Lanczos, with a sound bound."""
    monkeypatch.setattr(sp, "exact_norm", failing_allocation(kind))
    az = Analyzer(small_cnn(), (1, 7, 7), spectral="exact")
    with pytest.raises(ExactRouteTooLarge) as exc:
        az.local_bound(X0, 0.05)
    e = exc.value
    assert e.avail is None and e.layer == az.blocks[0].name
    assert "ran out of memory" in str(e) and "spectral='auto'" in str(e)
    res = Analyzer(small_cnn(), (1, 7, 7), spectral="auto").local_bound(X0, 0.05)
    assert all(lf.spectral_method.startswith("lanczos") for lf in res.layers)
    jac = torch.autograd.functional.jacobian(small_cnn(), X0).reshape(4, -1)
    assert res.value >= float(torch.linalg.matrix_norm(jac, 2))


def test_other_runtime_errors_in_the_exact_route_are_not_hidden(monkeypatch):
    def broken(m):
        raise RuntimeError("some other failure")
    monkeypatch.setattr(sp, "exact_norm", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        Analyzer(small_cnn(), (1, 7, 7), spectral="auto").local_bound(X0, 0.05)
