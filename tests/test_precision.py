"""Float32 precision settings: the checks that keep TF32 out of float32 computations the
library reasons about (CUDA), exercised on the CPU (lipbound._precision)."""

import math

import pytest
import torch

from lipbound import _precision
from lipbound.lanczos import F32_UPDATE_MIN_N, run_lanczos


def _raise(*_a, **_k):
    raise RuntimeError("PyTorch is checking the matmul precision without a specific backend "
                       "name ... mix of the legacy and new APIs")


def test_products_exact_by_default_and_false_when_unreadable(monkeypatch):
    assert _precision.float32_products_exact() is (
        torch.get_float32_matmul_precision() == "highest")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", _raise)
    assert _precision.float32_products_exact() is False


def test_lanczos_f32_update_survives_unreadable_precision(monkeypatch):
    # torch raises from get_float32_matmul_precision() after the legacy and new precision
    # APIs were mixed; big single-vector runs then take the float64 update, not an error
    n = F32_UPDATE_MIN_N
    d = torch.linspace(0.5, 2.0, n, dtype=torch.float64)

    def mv(v):
        return v * d

    def run():
        return run_lanczos(mv, mv, n, 6, torch.Generator().manual_seed(3), "cpu")

    ref = run()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", _raise)
    res = run()
    assert math.isfinite(res.theta) and res.theta <= 4.0 * (1 + 1e-9)
    assert res.theta == pytest.approx(ref.theta, rel=1e-12)


def _flags():
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


@pytest.mark.skipif(not _precision._NEW_API, reason="torch < 2.9: legacy TF32 flags")
def test_exact_float32_sets_ieee_on_cuda_only_and_restores():
    before = _flags()
    with _precision.exact_float32("cpu"):
        assert _flags() == before  # CPU: nothing changes
    with _precision.exact_float32(None):
        assert _flags() == before
    with _precision.exact_float32("cuda:0"):  # the CUDA branch (flags exist on CPU builds)
        assert _flags() == ("ieee", "ieee")
    assert _flags() == before
    with _precision._ieee_float32_cuda():
        assert _flags() == ("ieee", "ieee")
        with _precision._ieee_float32_cuda():  # nested
            assert _flags() == ("ieee", "ieee")
        assert _flags() == ("ieee", "ieee")
    assert _flags() == before
    with pytest.raises(ValueError), _precision._ieee_float32_cuda():
        raise ValueError("restored on errors too")
    assert _flags() == before


@pytest.mark.skipif(not _precision._NEW_API, reason="torch < 2.9: legacy TF32 flags")
def test_exact_float32_across_threads_restores_only_when_the_last_leaves():
    """Thread A enters, thread B enters, A leaves while B is still inside: the flags stay
    IEEE for B (A must not restore TF32 under it); they are restored when B leaves."""
    import threading

    before = _flags()
    a_in, b_in, a_out, b_may_leave = (threading.Event() for _ in range(4))
    seen = {}

    def a():
        with _precision.exact_float32("cuda:0"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with _precision.exact_float32("cuda:0"):
            b_in.set()
            a_out.wait(5)
            seen["b_after_a_left"] = _flags()
            b_may_leave.wait(5)

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start()
    tb.start()
    ta.join(10)
    a_out.wait(5)
    b_may_leave.set()
    tb.join(10)
    assert seen["b_after_a_left"] == ("ieee", "ieee")
    assert _flags() == before


def test_model_device_and_decorator():
    from lipbound._modelinfo import model_device

    lin = torch.nn.Linear(2, 2)
    assert model_device(lin) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) is None
    assert model_device("not a module") is None
    assert model_device(torch.nn.ReLU(), torch.device("cpu")) == torch.device("cpu")

    @_precision.exact_float32_on_model
    def f(model, x, *, k=1):
        return model, x, k

    assert f(lin, 2, k=3) == (lin, 2, 3)
    assert f(model=lin, x=1) == (lin, 1, 1)


def test_model_dtype_device_uses_the_first_floating_tensor():
    """One rule: the first floating-point parameter, else buffer; a non-floating tensor
    before it is skipped; without one, the default's type (float32 if none)."""
    from lipbound._modelinfo import floating_tensor, model_dtype_device

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.count = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64),
                                            requires_grad=False)
            self.lin = torch.nn.Linear(2, 2).double()

    odd = Odd()
    assert floating_tensor(odd) is odd.lin.weight
    assert model_dtype_device(odd) == (torch.float64, torch.device("cpu"))
    # buffers only, an integer one first
    bn = torch.nn.BatchNorm1d(3, affine=False).double()
    bn.register_buffer("a_first_int", torch.zeros(1, dtype=torch.int64))
    assert model_dtype_device(bn) == (torch.float64, torch.device("cpu"))
    # no floating tensor: the default's type, else float32
    ints = torch.nn.Module()
    ints.register_buffer("n", torch.zeros(1, dtype=torch.int64))
    x64 = torch.zeros(1, dtype=torch.float64)
    assert model_dtype_device(ints, default=x64) == (torch.float64, torch.device("cpu"))
    assert model_dtype_device(torch.nn.ReLU()) == (torch.float32, torch.device("cpu"))
    assert model_dtype_device(torch.nn.ReLU(), default=torch.zeros(1, dtype=torch.int64)) \
        == (torch.float32, torch.device("cpu"))
