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
