"""Session 24's fast paths give the same bits as the forms they replace.

Each test runs the fast path and a reference (the code it replaced, kept here) on random
inputs, edge values included (signed zeros, subnormals, inf, NaN where they can occur), and
compares bit patterns, not values within a tolerance. No timing is asserted
(benchmarks/README.md, "Session 24", has the measurements).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from lipbound import _modelinfo, _transpose
from lipbound.ops import winograd
from lipbound.ops.dense import DenseProducts
from lipbound.ops.linear import LinearOp
from lipbound.ops.pooling import MaxPoolOp
from lipbound.ops.winograd import TILE, WinogradConv

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def _edges(t: torch.Tensor, gen: torch.Generator, values=(-0.0, 0.0, 5e-324, -2.0 ** -1070,
                                                           1e300, -1e-310)) -> torch.Tensor:
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[:min(flat.numel(), len(values))]
    flat[idx] = torch.tensor(values[:idx.numel()], dtype=t.dtype)
    return t


# --- WinogradConv._transform: the tap-major copy in row blocks ------------------------------

def _transform_permuted(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The permuted copy sessions up to 23 made."""
    u = g @ w @ g.T
    k, c = w.shape[:2]
    return u.permute(2, 3, 0, 1).reshape(TILE * TILE, k, c).contiguous()


@pytest.mark.parametrize("r", [3, 5])
def test_kernel_transform_is_the_permuted_copy_bit_for_bit(r):
    rng = random.Random(24)
    gen = torch.Generator().manual_seed(24)
    _, g, _ = winograd.toom_cook(winograd.OUTPUT_TILE[r], r)
    # below, at and above one block of rows, and not a multiple of it
    for k, c in [(1, 1), (3, 5), (32, 32), (16, 64), (64, 17), (33, 65), (96, 48),
                 (rng.randint(40, 90), rng.randint(40, 90))]:
        w = _edges(torch.randn(k, c, r, r, generator=gen, dtype=torch.float64), gen)
        for kernel in (w, torch.flip(w, dims=(2, 3)).transpose(0, 1)):  # (_u and _ut)
            got, ref = WinogradConv._transform(g, kernel), _transform_permuted(g, kernel)
            assert got.shape == ref.shape and got.is_contiguous()
            assert torch.equal(_bits(got), _bits(ref))


def test_kernel_transform_blocks_cover_every_row(monkeypatch):
    # a small block size: many blocks and a short last one
    monkeypatch.setattr(winograd, "TRANSPOSE_ROWS", 7)
    gen = torch.Generator().manual_seed(5)
    _, g, _ = winograd.toom_cook(4, 3)
    w = torch.randn(9, 10, 3, 3, generator=gen, dtype=torch.float64)
    w.view(-1)[::11] = float("nan")
    got, ref = WinogradConv._transform(g, w), _transform_permuted(g, w)
    assert torch.equal(_bits(got), _bits(ref))


def test_winograd_products_unchanged_with_the_new_layout(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    for r, pad in [(3, (1, 1)), (5, (2, 2))]:
        w = torch.randn(40, 30, r, r, generator=gen, dtype=torch.float64)
        x = torch.randn(2, 30, 13, 13, generator=gen, dtype=torch.float64)
        y = torch.randn(2, 40, 13, 13, generator=gen, dtype=torch.float64)
        fast = WinogradConv(w, pad)
        with monkeypatch.context() as m:
            m.setattr(WinogradConv, "_transform", staticmethod(_transform_permuted))
            ref = WinogradConv(w, pad)
        assert torch.equal(_bits(fast.conv(x)), _bits(ref.conv(x)))
        assert torch.equal(_bits(fast.conv_t(y)), _bits(ref.conv_t(y)))


# --- LinearOp.sq_rows of big layers: the squared chunks written into one buffer -------------

def _sq_rows_fresh(op: LinearOp, w: torch.Tensor) -> torch.Tensor:
    """The chunked form sessions up to 23 used (a fresh tensor per chunk)."""
    out = []
    for s in range(0, op.weight.shape[0], 512):
        e = s + 512
        a = op.weight[s:e] if op.err is None else op.weight[s:e].abs() + op.err[s:e]
        out.append(w @ (a * a).T)
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("with_err", [False, True])
def test_rows_sq_into_a_buffer_is_the_fresh_product(with_err):
    gen = torch.Generator().manual_seed(11)
    for rows, cols in [(1, 1), (5, 9), (600, 40), (1030, 33)]:
        weight = _edges(torch.randn(rows, cols, generator=gen, dtype=torch.float64), gen,
                        (-0.0, 0.0, 5e-324, -1e-170, 1e160, -2.0 ** -1030, float("inf")))
        err = torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 1e-16 \
            if with_err else None
        op = LinearOp("fc", weight, None, err=err)
        buf = torch.full((min(512, rows), cols), float("nan"), dtype=torch.float64)
        for s in range(0, rows, 512):
            got = op._rows_sq(s, s + 512, buf)
            assert torch.equal(_bits(got), _bits(op._rows_sq(s, s + 512)))
            assert got.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("with_err", [False, True])
def test_sq_rows_of_a_big_layer_same_bits(with_err):
    gen = torch.Generator().manual_seed(12)
    rows, cols = 1100, 3700  # above the 4M entries that are squared once and kept
    weight = _edges(torch.randn(rows, cols, generator=gen, dtype=torch.float64), gen)
    err = torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 1e-16 \
        if with_err else None
    op = LinearOp("fc", weight, None, err=err)
    assert op.weight.numel() > 4_000_000
    for w in (torch.ones(1, cols, dtype=torch.float64),
              (torch.rand(2, cols, generator=gen) > 0.3).to(torch.float64),
              torch.rand(3, cols, generator=gen, dtype=torch.float64)):
        got = op.sq_rows(w)
        assert torch.equal(_bits(got), _bits(_sq_rows_fresh(op, w)))
    assert op._weight_sq is None  # nothing of the layer's size kept


# --- the model-content check: memcmp of the bit patterns ------------------------------------

@pytest.mark.parametrize("min_bytes", [0, 32768])
def test_same_bits_answers_as_torch_equal(monkeypatch, min_bytes):
    monkeypatch.setattr(_modelinfo, "MEMCMP_MIN_BYTES", min_bytes)  # 0: memcmp on every size
    gen = torch.Generator().manual_seed(13)
    cases = []
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        a = torch.randint(-100, 100, (370, 29), generator=gen).to(dtype)
        cases.append((a, a.clone()))
        for pos in (0, 5000, a.numel() - 1):  # one element differs: first, middle, last
            b = a.clone()
            b.view(-1)[pos] += 1
            cases.append((a, b))
        cases.append((a, a.clone().reshape(29, 370)))  # same bytes, another shape
        cases.append((a[1:], a.clone()[1:]))  # views at an offset
        cases.append((a[:, ::2], a.clone()[:, ::2]))  # not contiguous: torch.equal
        cases.append((a.T, a.T.contiguous()))
        cases.append((a[:0], a[:0].clone()))  # empty
    f = torch.randn(50, generator=gen, dtype=torch.float64)
    f[3], f[7] = -0.0, float("nan")
    g = f.clone()
    g[3] = 0.0
    cases += [(f, f.clone()), (f, g),  # floats: torch.equal (NaN != NaN, -0.0 == 0.0)
              (f.view(torch.int64), g.view(torch.int64)),  # their bit patterns differ
              (f.view(torch.int64), f.clone().view(torch.int64)),
              (torch.tensor([True, False]), torch.tensor([True, False])),
              (torch.arange(6, dtype=torch.int32), torch.arange(6, dtype=torch.int64))]
    for a, b in cases:
        assert _modelinfo.same_bits(a, b) == torch.equal(a, b)
        assert _modelinfo.same_bits(b, a) == torch.equal(b, a)


def test_content_check_sees_a_write_through_data_with_memcmp():
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    snap = _modelinfo.content_snapshot(model)
    assert _modelinfo.changed_contents(snap) is None
    with torch.no_grad():
        model[2].weight.data[1, 7] = -model[2].weight.data[1, 7]
    assert "2.weight" in _modelinfo.changed_contents(snap)
    model2 = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model2.bias.data[0] = 0.0
    snap2 = _modelinfo.content_snapshot(model2)
    with torch.no_grad():
        model2.bias.data[0] = -0.0  # equal as a float, another bit pattern
    assert "bias" in _modelinfo.changed_contents(snap2)


# --- MaxPoolOp.local_constant: the masked maximum without boolean indexing ------------------

def _local_constant_indexed(op: MaxPoolOp, mask: torch.Tensor) -> float:
    """The boolean-indexing form sessions up to 23 used."""
    m = mask.reshape(-1, *op.in_shape[-2:]).amax(dim=0) > 0
    if not bool(m.any()):
        return 0.0
    return math.sqrt(float(op.counts.to(mask.device)[m].max())) * (1 + 1e-12)


def test_pool_local_constant_same_bits():
    rng = random.Random(8)
    gen = torch.Generator().manual_seed(8)
    seen_zero = 0
    for _ in range(200):
        c, h, w = rng.randint(1, 3), rng.randint(4, 12), rng.randint(4, 12)
        k, s = rng.randint(1, 3), rng.randint(1, 4)  # stride > kernel: inputs in no window
        p = rng.randint(0, k // 2)
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        op = MaxPoolOp("pool", (c, h, w), (c, ho, wo), k, s, p, 1, False)
        density = rng.choice([0.0, 0.02, 0.3, 1.0])
        mask = (torch.rand(c, h, w, generator=gen) < density).to(torch.float64)
        got, ref = op.local_constant(mask), _local_constant_indexed(op, mask)
        assert math.copysign(1.0, got) == math.copysign(1.0, ref) and got == ref
        seen_zero += got == 0.0
    assert seen_zero > 0


# --- DenseProducts: the transposed copy by MKL's out-of-place transposition -----------------

def _random_bit_patterns(shape, gen: torch.Generator) -> torch.Tensor:
    """float64 with random bit patterns: NaNs (quiet and signalling, any payload),
    infinities, subnormals and signed zeros among them."""
    bits = torch.randint(-2 ** 62, 2 ** 62, shape, generator=gen, dtype=torch.int64)
    special = torch.tensor([0x7FF0000000000001, 0x7FF8000000000123, 1, 0, -2 ** 63,
                            0x7FF0000000000000], dtype=torch.int64)
    k = min(bits.numel(), special.numel())
    bits.view(-1)[:k] = special[:k]
    return bits.view(torch.float64)


@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_copy_moves_every_bit(monkeypatch, threads):
    if not _transpose._mkl_omatcopy():
        pytest.skip("this torch exports no MKL_Domatcopy: torch's own copy is used")
    monkeypatch.setattr(_transpose, "MKL_MIN_ENTRIES", 0)  # MKL's path on every size
    gen = torch.Generator().manual_seed(14)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 1), (1, 7), (7, 1), (3, 5), (64, 64), (1000, 37), (37, 1000),
                      (513, 1031)]:
            m = _random_bit_patterns(shape, gen)
            got = _transpose.transposed_copy(m)
            assert got.shape == (shape[1], shape[0]) and got.is_contiguous()
            assert torch.equal(got.view(torch.int64), m.T.contiguous().view(torch.int64))
            assert got.data_ptr() != m.data_ptr()
    finally:
        torch.set_num_threads(n)


def test_transposed_copy_falls_back_to_torch(monkeypatch):
    gen = torch.Generator().manual_seed(15)
    m = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    for t in (m.T, m[:, ::2], m.to(torch.float32), m[:0], m.neg()._neg_view()):
        got = _transpose.transposed_copy(t)
        assert torch.equal(_bits(got) if got.dtype == torch.float64 else got,
                           _bits(t.T.contiguous()) if got.dtype == torch.float64
                           else t.T.contiguous())
    monkeypatch.setattr(_transpose, "_omatcopy", False)  # no MKL: torch's copy
    monkeypatch.setattr(_transpose, "MKL_MIN_ENTRIES", 0)
    assert torch.equal(_transpose.transposed_copy(m), m.T.contiguous())


def test_dense_block_products_same_bits_with_the_mkl_copy(monkeypatch):
    monkeypatch.setattr(_transpose, "MKL_MIN_ENTRIES", 0)
    gen = torch.Generator().manual_seed(16)
    m = _edges(torch.randn(300, 520, generator=gen, dtype=torch.float64), gen)
    y = torch.randn(8, 300, generator=gen, dtype=torch.float64)
    fast = DenseProducts(m)
    got = fast.rmv(y)
    ref = (m.T.contiguous() @ y.T.contiguous()).T.contiguous()
    assert torch.equal(_bits(got), _bits(ref))
    assert torch.equal(_bits(fast._mt), _bits(m.T.contiguous()))
