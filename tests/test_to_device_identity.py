"""``.to(x.device)``: the README's supported-layers table lists ``.to(device)`` as the
identity, but a device read off a tensor of the graph (``x.device``, ``self.fc.weight.device``,
the usual way to write it) was refused ("getattr produces a non-tensor value", ".to() no rule
for this operation"), on the chain and on a constant (``self.mean.to(x.device)``). It is a
move, the identity: the bounds are those of the same network without it (up to
rounding terms), and sound against sampled difference quotients. Likewise ``.to(x.dtype)``
(session 23, refused the same way) when the traced dtype is float32 / float64; a cast to an
integer tensor's dtype stays refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound.errors import UnsupportedModelError


class _Net(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0 = nn.Linear(4, 6)
        self.fc1 = nn.Linear(6, 3)
        self.register_buffer("mean", torch.linspace(-0.5, 0.5, 6))
        self.register_buffer("std", torch.linspace(0.5, 2.0, 6))
        self.register_buffer("count", torch.arange(6))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc0(x)
        if self.how == "plain":
            h = (h - self.mean) / self.std
        elif self.how == "chain":  # the chain moved to devices read off tensors
            h = h.to(x.device)
            h = ((h - self.mean) / self.std).to(self.fc1.weight.device)
            h = h.to(device=x.device, dtype=torch.float32)
        elif self.how == "const":  # constants moved to the input's device
            h = (h - self.mean.to(x.device)) / self.std.to(device=h.device)
        elif self.how == "int":  # not a move: a cast to an integer type truncates
            h = h.to(x.device, torch.int32).float()
        elif self.how == "dtype_chain":  # casts to dtypes read off tensors
            h = h.to(x.dtype)
            h = ((h - self.mean) / self.std).to(self.fc1.weight.dtype)
            h = h.to(device=x.device, dtype=x.dtype)
        elif self.how == "dtype_const":
            h = (h - self.mean.to(x.dtype)) / self.std.to(dtype=h.dtype)
        elif self.how == "dtype_int":  # a cast to an integer tensor's dtype truncates
            h = h.to(self.count.dtype).float()
        return self.fc1(F.relu(h))


@pytest.mark.parametrize("how", ["chain", "const", "dtype_chain", "dtype_const"])
def test_to_a_tensors_device_is_the_identity(how):
    x0 = torch.tensor([[0.3, -0.2, 0.5, 0.1]])
    ref = lipbound.Analyzer(_Net("plain").eval(), (4,), spectral="exact")
    an = lipbound.Analyzer(_Net(how).eval(), (4,), spectral="exact")
    for eps in (0.05, 0.5, 5.0):
        r, r0 = an.local_bound(x0, eps), ref.local_bound(x0, eps)
        # (the same network: the same bound up to the rounding terms of its blocks)
        assert r.value == pytest.approx(r0.value, rel=1e-12) and r.guarantee == r0.guarantee
        # sound against sampled quotients of the model itself
        g = torch.Generator().manual_seed(1)
        d = torch.randn(2000, 4, generator=g)
        d = d / d.norm(dim=1, keepdim=True) * eps * torch.rand(2000, 1, generator=g)
        m = _Net(how).eval()
        with torch.no_grad():
            q = ((m(x0 + d) - m(x0)).norm(dim=1) / d.norm(dim=1)).max().item()
        assert q <= r.value
    assert an.global_bound().value == pytest.approx(ref.global_bound().value, rel=1e-12)


@pytest.mark.parametrize("how", ["int", "dtype_int"])
def test_to_an_integer_type_on_a_tensors_device_is_still_refused(how):
    with pytest.raises(UnsupportedModelError, match="to"):
        lipbound.Analyzer(_Net(how).eval(), (4,))
