"""Tests of the proof of the eigvalsh values in the circulant bound of convolutions.

The frequencies whose value comes from ``eigvalsh`` (those whose Cholesky certificate at the
group's level fails, or all of them without Cholesky certification) must not rest on an assumed
backward error of the eigensolver: an eigensolver that lies (returns its top eigenvalue 1e-6
too low, or 0) must still give a bound >= the exact value, max over the frequencies ω of the
top singular value of the kernel's DFT K(ω), computed here independently (fft2 of the
zero-padded kernel, ``torch.linalg.svdvals`` in complex128). No tolerance in the unsafe
direction.
"""

from __future__ import annotations

import pytest
import torch

from lipbound.ops import conv as conv_mod
from lipbound.ops.conv import ConvOp, circulant_norm_bound

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _make(c_in: int, c_out: int, kh: int, kw: int, padding: int, h: int, w: int, seed: int,
          groups: int = 1) -> ConvOp:
    """A random stride-1 convolution (float64 weights, no bias)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out * groups, c_in, kh, kw, generator=gen, dtype=torch.float64)
    x = torch.zeros(1, c_in * groups, h, w, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight, None, 1, padding, 1, groups)
    return ConvOp("conv", (c_in * groups, h, w), tuple(y.shape[1:]), weight, None, 1, padding,
                  1, groups)


def _exact_circulant(op: ConvOp) -> float:
    """max over ω of ||K(ω)||_2 for the stride-1 circulant embedding on the padded grid
    (M_k = max(N_k, kernel size)), by fft2 of the zero-padded kernel and svdvals, per group."""
    c_out, c_in_g, kh, kw = op.weight.shape
    m1 = max(op.in_shape[1] + 2 * op.padding[0], kh)
    m2 = max(op.in_shape[2] + 2 * op.padding[1], kw)
    pad = torch.zeros(c_out, c_in_g, m1, m2, dtype=torch.float64)
    pad[:, :, :kh, :kw] = op.weight
    k_hat = torch.fft.fft2(pad).permute(2, 3, 0, 1)  # (m1, m2, c_out, c_in_g)
    g = op.groups
    blocks = k_hat.reshape(m1, m2, g, c_out // g, c_in_g)
    return float(torch.linalg.svdvals(blocks)[..., 0].max())


# random small stride-1 convolutions: (c_in, c_out, kh, kw, padding, h, w, groups); Gram
# sizes 1-16 (with and without Cholesky certification by default)
_CASES = [
    (1, 1, 1, 1, 0, 4, 4, 1),
    (1, 6, 5, 5, 0, 12, 12, 1),
    (3, 4, 3, 3, 1, 8, 8, 1),
    (2, 3, 2, 4, 0, 7, 9, 2),
    (8, 5, 3, 3, 1, 10, 6, 1),
    (16, 16, 3, 3, 1, 8, 8, 1),
    (12, 16, 5, 5, 2, 6, 6, 1),
    (16, 9, 1, 1, 0, 16, 16, 1),
    (4, 16, 4, 2, 0, 5, 16, 1),
]


def _liar(kind: str):
    real = torch.linalg.eigvalsh

    def eigvalsh(a, *args, **kwargs):
        ev = real(a, *args, **kwargs)
        return ev * (1.0 - 1e-6) if kind == "low" else torch.zeros_like(ev)

    return eigvalsh


@pytest.mark.parametrize("kind", ["low", "zero"])
@pytest.mark.parametrize("use_cholesky", [None, False])
@pytest.mark.parametrize("case", _CASES)
def test_lying_eigensolver_stays_sound(case, use_cholesky, kind, monkeypatch):
    *shape, groups = case
    op = _make(*shape, seed=sum(case), groups=groups)
    exact = _exact_circulant(op)
    if use_cholesky is False:
        monkeypatch.setattr(conv_mod, "_CHOL_MIN_N", 10 ** 9)
    monkeypatch.setattr(torch.linalg, "eigvalsh", _liar(kind))
    bound = circulant_norm_bound(op)
    assert bound is not None
    assert bound >= exact  # no tolerance in the unsafe direction


@pytest.mark.parametrize("use_cholesky", [None, False])
@pytest.mark.parametrize("case", _CASES)
def test_last_resort_when_every_factorisation_fails(case, use_cholesky, monkeypatch):
    *shape, groups = case
    op = _make(*shape, seed=sum(case) + 1, groups=groups)
    exact = _exact_circulant(op)
    if use_cholesky is False:
        monkeypatch.setattr(conv_mod, "_CHOL_MIN_N", 10 ** 9)

    def never(neg, level):
        return torch.full(neg.shape[:1], torch.inf, dtype=torch.float64)

    monkeypatch.setattr(conv_mod, "_cholesky_upper_neg", never)
    monkeypatch.setattr(torch.linalg, "eigvalsh", _liar("zero"))
    bound = circulant_norm_bound(op)
    assert bound is not None
    assert bound >= exact
