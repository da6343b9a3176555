"""Transposed convolutions of many rows in chunks (:mod:`lipbound.ops.conv_transpose`) and
the tight bound's error bounds kept out of the subnormal range (:data:`lipbound.tight.ERR_FLOOR`).

The chunks sum each output entry's products in another order than torch's
``conv_transpose2d``: both are within ``γ_n`` of the exact sum (``n`` the products per
entry), so they differ by at most ``2 γ_n`` times the sum of the products' magnitudes; on
integer inputs whose every partial sum is exact both must equal the definition. The tight
bound with the chunks forced (and with torch's product everywhere), and with the error
floor (and with the old ``k 2^-1074`` terms) stays above empirical lower bounds and agrees
with the other to within a relative ``1e-12`` (equal bits were measured)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipbound.tight as tight
from core_helpers import build, conv_specs
from lipbound import Analyzer
from lipbound.ops import conv_transpose
from lipbound.ops.base import UNDERFLOW, gamma
from lipbound.ops.conv_transpose import WHOLE_BYTES, chunk_rows, conv_transpose2d_rows
from test_tight import empirical_lower, raw_tight

DT = torch.float64


@st.composite
def geometries(draw) -> dict:
    """A transposed convolution: kernel 1x1..5x5 (non-square too), stride 1-3, dilation 1-2,
    groups 1-3, padding below the kernel's reach, an output padding below the stride,
    1-40 rows of 1..12 x 1..12, and a chunk size (1 to all rows)."""
    groups = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    s1, s2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    d1, d2 = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    full_h, full_w = (h - 1) * s1 + d1 * (kh - 1) + 1, (w - 1) * s2 + d2 * (kw - 1) + 1
    p1 = draw(st.integers(0, min(2, (full_h - 1) // 2)))
    p2 = draw(st.integers(0, min(2, (full_w - 1) // 2)))
    rows = draw(st.integers(1, 40))
    return dict(rows=rows, c_out=groups * draw(st.integers(1, 4)),
                c_in_g=draw(st.integers(1, 4)), groups=groups, k=(kh, kw), s=(s1, s2),
                d=(d1, d2), p=(p1, p2), op=(draw(st.integers(0, s1 - 1)),
                                            draw(st.integers(0, s2 - 1))), hw=(h, w),
                chunk=draw(st.integers(1, rows)), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _tensors(g: dict, integer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(g["seed"])
    ys = (g["rows"], g["c_out"], *g["hw"])
    ws = (g["c_out"], g["c_in_g"], *g["k"])
    if integer:
        return (torch.randint(-4, 5, ys, generator=gen).to(DT),
                torch.randint(-3, 4, ws, generator=gen).to(DT))
    # magnitudes over many binades (cancellation and rounding in both sums)
    y = torch.randn(ys, generator=gen, dtype=DT) * 2.0 ** torch.randint(-20, 20, ys,
                                                                          generator=gen)
    return y, torch.randn(ws, generator=gen, dtype=DT)


def _torch(y: torch.Tensor, w: torch.Tensor, g: dict) -> torch.Tensor:
    return F.conv_transpose2d(y, w, None, g["s"], g["p"], g["op"], g["groups"], g["d"])


def _chunks(y: torch.Tensor, w: torch.Tensor, g: dict) -> torch.Tensor:
    return conv_transpose2d_rows(y, w, g["s"], g["p"], g["op"], g["groups"], g["d"],
                                 chunk=g["chunk"])


def _definition(y: torch.Tensor, w: torch.Tensor, g: dict) -> torch.Tensor:
    """The transposed convolution by its definition: input pixel ``(i, j)`` of channel ``c``
    (group ``q``) adds ``y W[c, ci, ky, kx]`` to output ``(i s + ky d - p, j s + kx d - p)``
    of channel ``q C_in/groups + ci``, tap by tap and channel by channel (plain loops)."""
    r, c_out, h, wd = y.shape
    _, c_in_g, kh, kw = w.shape
    (s1, s2), (d1, d2), (p1, p2), (o1, o2) = g["s"], g["d"], g["p"], g["op"]
    co_g = c_out // g["groups"]
    full = y.new_zeros(r, g["groups"] * c_in_g, (h - 1) * s1 + d1 * (kh - 1) + 1 + o1,
                       (wd - 1) * s2 + d2 * (kw - 1) + 1 + o2)
    for c in range(c_out):
        q = c // co_g
        for ci in range(c_in_g):
            for ky in range(kh):
                for kx in range(kw):
                    full[:, q * c_in_g + ci, ky * d1:ky * d1 + (h - 1) * s1 + 1:s1,
                         kx * d2:kx * d2 + (wd - 1) * s2 + 1:s2] += y[:, c] * w[c, ci, ky, kx]
    hh = full.shape[2] - 2 * p1
    ww = full.shape[3] - 2 * p2
    return full[:, :, p1:p1 + hh, p2:p2 + ww]


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(g=geometries())
def test_chunks_within_gamma_of_torch(g: dict) -> None:
    """Chunks against torch's ``conv_transpose2d``: each within ``γ_n`` of the exact sum
    (``n = C_out/groups kh kw``, any order), so within ``2 γ_n`` of each other relative to
    the exact ``|W|^T |y|``, of which the computed one is at least ``1 - γ_n`` times."""
    y, w = _tensors(g, integer=False)
    ref, got = _torch(y, w, g), _chunks(y, w, g)
    assert got.shape == ref.shape and got.dtype == DT
    n = g["c_out"] // g["groups"] * g["k"][0] * g["k"][1]
    mag = F.conv_transpose2d(y.abs(), w.abs(), None, g["s"], g["p"], g["op"], g["groups"],
                             g["d"])
    tol = 2.0 * gamma(n) * mag / (1.0 - gamma(n)) + 2 * n * UNDERFLOW
    assert bool(((got - ref).abs() <= tol).all())


@SETTINGS
@given(g=geometries())
def test_chunks_exact_on_integers(g: dict) -> None:
    """Small integers (every product and partial sum exact in float64): the chunks, torch's
    product and the definition agree exactly."""
    y, w = _tensors(g, integer=True)
    want = _definition(y, w, g)
    assert torch.equal(_chunks(y, w, g), want)
    assert torch.equal(_torch(y, w, g), want)
    auto = conv_transpose2d_rows(y, w, g["s"], g["p"], g["op"], g["groups"], g["d"])
    assert torch.equal(auto, want)


def test_chunk_rule() -> None:
    """Chunks for float64 CPU rows at one thread only: many rows of a real kernel, or whole
    batches of columns over ``WHOLE_BYTES``; never a chunk holding every row."""
    cpu = torch.device("cpu")
    w = (32, 32, 3, 3)
    c = chunk_rows(330, (12, 12), w, 1, cpu, DT, threads=1)
    assert 1 <= c < 330
    assert chunk_rows(330, (12, 12), w, 1, torch.device("cuda"), DT, threads=1) == 0
    assert chunk_rows(330, (12, 12), w, 1, cpu, torch.float32, threads=1) == 0
    assert chunk_rows(8, (12, 12), w, 1, cpu, DT, threads=1) == 0  # (few rows)
    assert chunk_rows(330, (12, 12), (32, 3, 3, 3), 1, cpu, DT, threads=1) == 0  # (3 outputs)
    assert chunk_rows(330, (12, 12), (32, 32, 1, 1), 1, cpu, DT, threads=1) == 0  # (1x1)
    assert chunk_rows(330, (12, 12), w, 1, cpu, DT, threads=2) == 0  # (torch's, in parallel)
    big = WHOLE_BYTES // (3 * 9 * 144 * 8) + 1  # (3 output channels, 1x1 kernels: when big)
    assert 1 <= chunk_rows(big, (12, 12), (32, 3, 3, 3), 1, cpu, DT, threads=1) < big
    assert 1 <= chunk_rows(9 * big, (12, 12), (32, 3, 1, 1), 1, cpu, DT, threads=1) < 9 * big
    assert 1 <= chunk_rows(big, (12, 12), (33, 1, 3, 3), 3, cpu, DT, threads=1) < big
    assert chunk_rows(big, (12, 12), (32, 3, 3, 3), 1, cpu, DT, threads=2) == 0


def _forced(chunks: bool):
    """A stand-in for the tight bound's transposed convolution: chunks of a third of the
    rows (at least one), or torch's product everywhere."""
    real = conv_transpose2d_rows

    def conv_t(y, weight, stride, padding, output_padding, groups, dilation, chunk=None):
        return real(y, weight, stride, padding, output_padding, groups, dilation,
                    chunk=max(1, y.shape[0] // 3) if chunks else 0)

    return conv_t


def _variants(an: Analyzer, x0: torch.Tensor, eps: float, spy=None) -> list[float | None]:
    """The tight bound's value with the chunks forced and the error floor (the new path),
    and with torch's product and the ``k 2^-1074`` terms (the old path)."""
    vals = []
    saved = tight.conv_transpose2d_rows, tight.ERR_FLOOR
    try:
        for conv, floor in ((spy or _forced(True), saved[1]), (_forced(False), 0.0)):
            tight.conv_transpose2d_rows, tight.ERR_FLOOR = conv, floor
            vals.append(raw_tight(an, x0, eps)[0].value)
    finally:
        tight.conv_transpose2d_rows, tight.ERR_FLOOR = saved
    return vals


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=conv_specs())
def test_tight_bound_with_chunks_and_floor(spec: dict) -> None:
    """Random conv nets (strides, dilation, groups, pooling): the tight bound on the new path
    (chunks forced, the error floor) and on the old one (torch's product, ``k 2^-1074``):
    both above the empirical lower bound, within a relative 1e-12 of each other."""
    model, shape, x0 = build(spec)
    eps = spec["eps"]
    vals = _variants(Analyzer(model, shape, spectral="exact"), x0, eps)
    if vals[0] is None:
        assert vals[1] is None
        return
    low = empirical_lower(model, x0, eps, spec["seed"] % 1000, None)
    assert min(vals) >= low, (vals, low)
    assert math.isclose(vals[0], vals[1], rel_tol=1e-12), vals


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 0.1])
def test_mnist_chunks_and_floor(eps: float) -> None:
    """The shipped LeNet on mnist:8: the new and the old path within a relative 1e-12 of each
    other (session 21 measured equal bits), above the library's lower bound, and no
    subnormal number in what the rows' transposed convolutions receive on the new path."""
    from lipbound.inputs import load_sample
    from lipbound.lower import best_lower_bound
    from lipbound.zoo import load_model

    lm = load_model("mnist")
    x0 = load_sample("mnist:8", entry=lm.entry).x
    seen: list[float] = []
    forced = _forced(True)

    def spy(y, *a, **k):
        a_ = y.abs()
        seen.append(float(torch.where(a_ > 0, a_, math.inf).min()))
        return forced(y, *a, **k)

    vals = _variants(Analyzer(lm.model, (1, 28, 28)), x0, eps, spy)
    assert vals[0] is not None and math.isclose(vals[0], vals[1], rel_tol=1e-12), vals
    assert seen and min(seen) >= 2.0 ** -1022
    low = best_lower_bound(lm.model, x0, eps, seed=0, n_random=32, gradient_steps=3,
                           pgd_restarts=1, pgd_steps=3, pgd_refine=1,
                           pgd_refine_steps=3).value
    assert min(vals) >= low


def _strided_net() -> tuple[torch.nn.Module, torch.Tensor]:
    """Convolutions with groups, a stride and a dilation on a 1 x 28 x 28 image."""
    from torch import nn

    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, groups=2),
                        nn.ReLU(), nn.Conv2d(16, 8, 3, dilation=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10)).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))
    return net.eval(), torch.randn(1, 1, 28, 28, generator=g, dtype=DT)


@pytest.mark.parametrize("case", ["conv16", "strided"])
def test_memory_estimate_covers_the_chunks(case: str, monkeypatch) -> None:
    """At one thread (where the chunks run) the memory estimate, which counts one chunk's
    columns there, is still at least the allocator's peak (``tests/test_tight_memory.py``'s
    measurement and nets), with chunks of 16 KiB of columns (these nets' rows are too few for
    1 MiB chunks), and the chunks did run."""
    tm = pytest.importorskip("test_tight_memory")
    monkeypatch.setattr(conv_transpose, "CHUNK_BYTES", 1 << 14)
    net, x0 = tm._conv_net() if case == "conv16" else _strided_net()
    shape, eps = (1, 28, 28), (3e-3 if case == "conv16" else 3e-2)
    chunked: list[int] = []
    real = tight.conv_transpose2d_rows

    def spy(y, weight, stride, padding, output_padding, groups, dilation, chunk=None):
        chunked.append(chunk_rows(y.shape[0], tuple(y.shape[-2:]), tuple(weight.shape), groups,
                                  y.device, y.dtype))
        return real(y, weight, stride, padding, output_padding, groups, dilation, chunk)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tight.conv_transpose2d_rows = spy
    try:
        an = Analyzer(net, shape)
        blocks, x, rec, bounds = tm._record(an, x0, eps)
        out, peak, est = tm._estimate_and_peak(blocks, x, eps, rec, bounds)
    finally:
        tight.conv_transpose2d_rows = real
        torch.set_num_threads(threads)
    tm._check(out, peak, est, case)
    assert any(chunked), chunked
