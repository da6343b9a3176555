"""CUDA-readiness audit (session 23), run on the CPU.

The analysed paths were checked with a device-taint TorchFunctionMode (tensors made on the
default device without ``device=`` tracked against the model's; mixed operations,
``.numpy()`` of model tensors and CPU generators drawing on the model's device flagged):
no site on the library's paths mixes devices. What CPU tests can hold on to:

* every tensor an analysed op holds moves with ``Op.to`` (checked by moving to ``meta``);
* the analysed paths make no factory tensor without ``device=`` that meets a model tensor,
  for one small network with batch norm, pooling and clamps;
* :func:`lipbound.lower.sample_ball` refuses a generator of another device than ``x0``
  (torch's RuntimeError on CUDA) or a non-generator with an InputError naming the fix.
"""

from __future__ import annotations

import pytest
import torch

from lipbound.errors import InputError
from lipbound.lower import sample_ball


class _OtherDeviceGenerator(torch.Generator):
    """A CPU generator that reports the CUDA device: what ``torch.Generator("cuda")`` is on
    a machine with a GPU, for the checks made before any draw."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda")


def test_sample_ball_refuses_a_generator_on_another_device():
    # (was: on CUDA, torch's RuntimeError "Expected a 'cuda' device type for generator";
    # here the draw went ahead)
    with pytest.raises(InputError, match=r"generator is on cuda.*x0 is on cpu.*device="):
        sample_ball(torch.zeros(1, 3), 0.5, 4, generator=_OtherDeviceGenerator())


@pytest.mark.parametrize("bad", [0, "seed", torch.zeros(1)])
def test_sample_ball_refuses_a_non_generator(bad):
    # (was: torch's TypeError from randn, naming none of sample_ball's arguments)
    with pytest.raises(InputError, match=r"generator must be a torch.Generator"):
        sample_ball(torch.zeros(1, 3), 0.5, 4, generator=bad)


def test_sample_ball_same_device_generator_is_reproducible():
    a = sample_ball(torch.zeros(1, 3), 0.5, 4, generator=torch.Generator().manual_seed(3))
    b = sample_ball(torch.zeros(1, 3), 0.5, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and bool((a.double().norm(dim=1) <= 0.5).all())
