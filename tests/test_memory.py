"""lipbound._memory: the command line's allocator setting is applied once, reports whether it
took effect, and leaves tensors working (the library itself never calls it on import)."""

from __future__ import annotations

import subprocess
import sys

import torch

from lipbound import _memory


def test_keep_freed_memory_is_idempotent_and_harmless():
    first = _memory.keep_freed_memory()
    assert isinstance(first, bool)
    assert _memory.keep_freed_memory() is first
    x = torch.ones(3_000_000, dtype=torch.float64)  # above glibc's default mmap threshold
    assert float((x * 2).sum()) == 6_000_000.0


def test_importing_lipbound_does_not_change_the_allocator():
    code = "import lipbound, lipbound._memory as m; print(m._done)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "None"


def test_bounds_run_without_autograd_and_hand_back_ordinary_tensors():
    """Bounds run in torch.inference_mode; afterwards the analyzer's cached layers still work
    outside it (Winograd's padded buffers are written in place on every call), and tensors
    given to the caller are ordinary ones (in-place use allowed)."""
    from torch import nn

    from lipbound import Analyzer
    from lipbound.ops import winograd
    from lipbound.ops.conv import ConvOp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(48 * 26 * 26, 3)).double().eval()
    an = Analyzer(net, (48, 26, 26), spectral="lanczos", lanczos_steps=8)
    x0 = torch.randn(1, 48, 26, 26, dtype=torch.float64)
    an.local_bound(x0, 0.1)
    an.global_bound()
    conv = an.blocks[0].mixing
    assert isinstance(conv, ConvOp) and conv._winograd() is not None
    x = torch.randn(1, *conv.in_shape, dtype=torch.float64)  # the shape the bound used
    with winograd.enabled():  # outside inference mode: the cached buffers are written
        y = conv.lin(x)
    assert not y.is_inference()
    assert torch.allclose(y, torch.nn.functional.conv2d(x, conv.weight, padding=1),
                          atol=1e-10)
    rows = an.local_bound_rows(x0, 0.1, torch.eye(3, dtype=torch.float64))
    assert not rows.values.is_inference()
    rows.values.mul_(1.0)  # in place: allowed on an ordinary tensor
    out = an.forward(x0)
    assert not out.is_inference()
