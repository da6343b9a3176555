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


def test_model_device_and_decorator():
    lin = torch.nn.Linear(2, 2)
    assert _precision.model_device(lin) == torch.device("cpu")
    assert _precision.model_device(torch.nn.ReLU()) is None
    assert _precision.model_device("not a module") is None

    @_precision.exact_float32_on_model
    def f(model, x, *, k=1):
        return model, x, k

    assert f(lin, 2, k=3) == (lin, 2, 3)
    assert f(model=lin, x=1) == (lin, 1, 1)
