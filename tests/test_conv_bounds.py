"""ConvOp.dense_matrix (index arithmetic) and circulant_norm_bound (polyphase circulant
embedding with explicit rounding terms), checked against independent references: the
matrix obtained by applying the convolution to basis vectors, its exact largest singular
value, and a copy of the previous (stride-ignoring) circulant bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipbound.ops import conv as conv_mod
from lipbound.ops.conv import ConvOp, _max_freq_norm, _Plan, circulant_norm_bound
from lipbound.ops.pooling import avgpool2d_rule

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ----------------------------------------------------------------------------- helpers
def _make(c_in_g: int, c_out_g: int, kh: int, kw: int, stride, padding, dilation, groups: int,
          h: int, w: int, seed: int, scaled: bool = False) -> ConvOp:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out_g * groups, c_in_g, kh, kw, generator=gen, dtype=torch.float64)
    x = torch.zeros(1, c_in_g * groups, h, w, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    out_scale = None
    if scaled:  # per-output scale of either supported shape, with both signs
        shape = y.shape[1:] if seed % 2 else y.shape[2:]
        out_scale = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return ConvOp("conv", (c_in_g * groups, h, w), tuple(y.shape[1:]), weight, None, stride,
                  padding, dilation, groups, out_scale=out_scale)


def _basis_matrix(op: ConvOp) -> torch.Tensor:
    """The matrix of ``lin``, column by column: lin applied to every input basis vector."""
    eye = torch.eye(op.in_dim, dtype=torch.float64).reshape(op.in_dim, *op.in_shape)
    return op.lin(eye).reshape(op.in_dim, op.out_dim).T


def _basis_matrix_t(op: ConvOp) -> torch.Tensor:
    """The matrix of ``lin_t`` (should be A^T), row by row from output basis vectors."""
    eye = torch.eye(op.out_dim, dtype=torch.float64).reshape(op.out_dim, *op.out_shape)
    return op.lin_t(eye).reshape(op.out_dim, op.in_dim).T


def _old_grid_bound(op: ConvOp) -> float:
    """Independent reference: the previous bound, the circulant embedding on the padded
    N1 x N2 grid that ignores the stride (rfft2 of the zero-padded kernel), no rounding
    terms."""
    c_out, c_in_g, kh, kw = op.weight.shape
    h, w = op.in_shape[-2:]
    n1 = max(h + 2 * op.padding[0], op.dilation[0] * (kh - 1) + 1)
    n2 = max(w + 2 * op.padding[1], op.dilation[1] * (kw - 1) + 1)
    g = op.groups
    grid = torch.zeros(c_out, c_in_g, n1, n2, dtype=torch.float64)
    for a in range(kh):
        for b in range(kw):
            grid[:, :, a * op.dilation[0], b * op.dilation[1]] += op.weight[:, :, a, b]
    spec = torch.fft.fft2(grid).reshape(g, c_out // g, c_in_g, n1 * n2).permute(0, 3, 1, 2)
    val = float(torch.linalg.matrix_norm(spec, ord=2).max())
    if op.out_scale is not None:
        val *= float(op.out_scale.abs().max())
    return val


def _exact(op: ConvOp) -> float:
    return float(torch.linalg.matrix_norm(_basis_matrix(op), ord=2))


@st.composite
def convs(draw, min_stride: int = 1, scaled: bool = True) -> ConvOp:
    groups = draw(st.integers(1, 2))
    c_in_g = draw(st.integers(1, 3))
    c_out_g = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(min_stride, 4)), draw(st.integers(min_stride, 4)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # the input must hold the dilated kernel (after padding)
    h_min = max(4, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    w_min = max(4, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h = draw(st.integers(h_min, max(h_min, 12)))
    w = draw(st.integers(w_min, max(w_min, 12)))
    use_scale = scaled and draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return _make(c_in_g, c_out_g, kh, kw, stride, padding, dilation, groups, h, w, seed,
                 use_scale)


# ----------------------------------------------------------------------------- dense_matrix
@settings(max_examples=100)
@given(convs())
def test_dense_matrix_equals_basis_images_exactly(op):
    a = op.dense_matrix()
    assert a.dtype == torch.float64 and a.shape == (op.out_dim, op.in_dim)
    assert torch.equal(a, _basis_matrix(op))  # bit-identical: every entry is one weight
    assert torch.equal(a.T, _basis_matrix_t(op))


@settings(max_examples=100)
@given(convs(), st.integers(0, 10 ** 6), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_dense_submatrix_is_the_submatrix_exactly(op, seed, frac_r, frac_c):
    """Scattering only the requested rows and columns gives exactly the indexed submatrix
    of the whole matrix (strides, padding, dilation, groups, output scales)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.nonzero(torch.rand(op.out_dim, generator=g) < frac_r).reshape(-1)
    cols = torch.nonzero(torch.rand(op.in_dim, generator=g) < frac_c).reshape(-1)
    sub = op.dense_submatrix(rows, cols)
    assert torch.equal(sub, op.dense_matrix()[rows][:, cols])


def test_dense_matrix_of_avgpool_with_per_position_scale():
    pool = torch.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
    x = torch.zeros(1, 2, 7, 6, dtype=torch.float64)
    op = avgpool2d_rule(pool, "pool", (2, 7, 6), tuple(pool(x).shape[1:]))
    assert op.out_scale is not None and op.out_scale.unique().numel() > 1
    assert torch.equal(op.dense_matrix(), _basis_matrix(op))
    assert circulant_norm_bound(op) >= _exact(op)


def test_dense_matrix_nonzero_count_is_the_number_of_valid_taps():
    # 3x3 kernel, padding 1, stride 1 on 5x5: corner outputs see 4 taps, edges 6, inside 9
    op = _make(1, 1, 3, 3, 1, 1, 1, 1, 5, 5, seed=3)
    a = op.dense_matrix()
    assert int((a != 0).sum()) == 4 * 4 + 12 * 6 + 9 * 9


# ----------------------------------------------------------------------------- the bound
@settings(max_examples=100)
@given(convs())
def test_circulant_bound_is_an_upper_bound(op):
    bound = circulant_norm_bound(op)
    assert bound is not None
    assert bound >= _exact(op)  # no tolerance in the unsafe direction


@settings(max_examples=40)
@given(convs(min_stride=2))
def test_polyphase_never_worse_than_grid_bound_on_strided_convs(op):
    bound = circulant_norm_bound(op)
    assert bound is not None
    # comparing two upper bounds: the new one carries ~1e-12 of rounding terms
    assert bound <= _old_grid_bound(op) * (1 + 1e-9)


def _polyphase_only(op: ConvOp) -> float:
    """The polyphase value alone (without the stride-1 fallback), weights unscaled."""
    grid = (op.in_shape[1] + 2 * op.padding[0], op.in_shape[2] + 2 * op.padding[1])
    plan = _Plan(op.weight, op.groups, op.stride, op.dilation, grid)
    return _max_freq_norm(plan, op.weight, 2 ** 26)


@settings(max_examples=40)
@given(convs(min_stride=2, scaled=False))
def test_polyphase_value_alone_is_an_upper_bound(op):
    assert _polyphase_only(op) >= _exact(op)


def test_polyphase_grid_must_cover_ceil_n_over_s():
    # 3x3 kernel, dilation 2, stride 4, padding 1 on 12x12: N = 14, ceil(14/4) = 4; a grid
    # of floor(14/4) = 3 wraps around and gives 0.98 x the true norm
    op = _make(1, 1, 3, 3, 4, 1, 2, 1, 12, 12, seed=153)
    assert _polyphase_only(op) >= _exact(op)


@pytest.mark.parametrize("args", [
    (1, 1, 2, 2, 2, 1, 2, 2, 5, 5, 90),
    (3, 2, 2, 2, 2, 3, 2, 2, 5, 5, 66),
    (2, 1, 5, 5, 2, 2, 2, 2, 9, 9, 161),
])
def test_polyphase_alone_can_lose_when_the_stride_does_not_divide_the_grid(args):
    # (c_in_g, c_out_g, kh, kw, stride, padding, dilation, groups, h, w, seed): the padded
    # grid is odd, the polyphase grid (2 * ceil(N / 2)) differs from the stride-1 grid N and
    # the polyphase value alone exceeds the grid bound by 0.5-2.5 %; the function must then
    # return the smaller (stride-1) value
    op = _make(*args)
    bound = circulant_norm_bound(op)
    assert _exact(op) <= bound <= _old_grid_bound(op) * (1 + 1e-9)


@settings(max_examples=25)
@given(convs(scaled=False))
def test_stride_one_equals_the_grid_bound(op):
    if op.stride != (1, 1):
        op = ConvOp("conv", op.in_shape, tuple(torch.nn.functional.conv2d(
            torch.zeros(1, *op.in_shape, dtype=torch.float64), op.weight, None, 1, op.padding,
            op.dilation, op.groups).shape[1:]), op.weight, None, 1, op.padding, op.dilation,
            op.groups)
    bound = circulant_norm_bound(op)
    old = _old_grid_bound(op)
    assert old <= bound <= old * (1 + 1e-9)


@pytest.mark.parametrize("c_in, c_out, k, h, w, groups", [
    (3, 8, 4, 16, 16, 1),   # patchify, divisible input
    (3, 5, 2, 9, 7, 1),     # leftover rows / columns are never read: still exact
    (4, 6, 3, 12, 9, 2),    # grouped
    (2, 40, 2, 8, 8, 1),    # c_out > c_in * s^2 (Gram on the input side)
])
def test_exact_when_kernel_equals_stride(c_in, c_out, k, h, w, groups):
    op = _make(c_in // groups, c_out // groups, k, k, k, 0, 1, groups, h, w, seed=11)
    exact = _exact(op)
    bound = circulant_norm_bound(op)
    assert exact <= bound <= exact * (1 + 1e-9)
    # the previous bound is far from it
    assert _old_grid_bound(op) > 1.2 * exact


def test_strided_bound_much_tighter_than_grid_bound_alexnet_like():
    op = _make(3, 8, 11, 11, 4, 2, 1, 1, 31, 31, seed=5)
    exact = _exact(op)
    bound = circulant_norm_bound(op)
    assert exact <= bound < _old_grid_bound(op) * 0.8


def test_chunking_does_not_change_the_bound():
    op = _make(3, 4, 3, 3, 2, 1, 2, 1, 12, 11, seed=7)
    full = circulant_norm_bound(op)
    tiny = circulant_norm_bound(op, chunk_bytes=1)  # one frequency per chunk
    assert full is not None and tiny is not None
    assert math.isclose(full, tiny, rel_tol=1e-12)
    assert full >= _exact(op)


def test_budget_returns_none_when_too_large():
    op = _make(3, 4, 3, 3, 1, 1, 1, 1, 12, 12, seed=1)
    assert circulant_norm_bound(op, budget_flops=1e3) is None
    assert circulant_norm_bound(op, budget_flops=1e12) is not None
    # a VGG-16 block-4 sized layer (512 -> 512, 28 x 28): refused at the default budget
    # before any large allocation (only the 512 x 512 x 3 x 3 weight exists)
    big = ConvOp("vgg", (512, 28, 28), (512, 28, 28),
                 torch.ones(512, 512, 3, 3, dtype=torch.float64), None, 1, 1, 1, 1)
    assert circulant_norm_bound(big) is None


def test_zero_and_non_finite_weights():
    op = _make(2, 2, 3, 3, 2, 1, 1, 1, 8, 8, seed=2)
    op.weight.zero_()
    assert circulant_norm_bound(op) == 0.0
    op.weight[0, 0, 0, 0] = math.nan
    assert circulant_norm_bound(op) == math.inf


@pytest.mark.parametrize("magnitude", [1e-300, 1e-150, 1e150, 1e300])
def test_extreme_weight_magnitudes_stay_upper_bounds(magnitude):
    op = _make(2, 3, 3, 3, 2, 1, 1, 1, 8, 8, seed=4)
    op.weight.mul_(magnitude)
    bound = circulant_norm_bound(op)
    assert bound is not None and math.isfinite(bound)
    exact = _exact(op)
    assert exact > 0
    assert exact <= bound <= exact * 1.5


def test_first_bound_scatters_the_submatrix_later_ones_use_the_kept_matrix():
    """A fresh analyzer's first exact-route convolution scatters only its masked submatrix;
    from the second request on the whole matrix is kept. Both give identical bounds (exact
    route everywhere: a Lanczos layer's second computation would draw its own start
    vector)."""
    from lipbound import Analyzer, zoo
    from lipbound.inputs import load_sample

    lm = zoo.load_model("mnist")
    x0 = load_sample("mnist:8", entry=lm.entry).x
    fresh = Analyzer(lm.model, lm.entry.input_shape, spectral="exact").local_bound(x0, 0.1)
    an = Analyzer(lm.model, lm.entry.input_shape, spectral="exact")
    an.local_bound(x0, 0.05)
    assert not an._dense  # nothing kept after one bound
    again = an.local_bound(x0, 0.1)
    assert an._dense  # the whole matrix is kept from the second request on
    assert again.value == fresh.value
    assert [lf.local for lf in again.layers] == [lf.local for lf in fresh.layers]


# ----------------------------------------------------------------------------- Cholesky level
def _dense_norm(op: ConvOp) -> float:
    return float(torch.linalg.matrix_norm(op.dense_matrix(), ord=2))


def _certified_and_eig_only(op: ConvOp, **patch) -> tuple[float, float]:
    """circulant_norm_bound with Cholesky certification forced on every Gram size (module
    attributes in ``patch`` overridden meanwhile), and with ``eigvalsh`` for every frequency
    (the previous computation)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv_mod, "_CHOL_MIN_N", 1)
        for name, value in patch.items():
            mp.setattr(conv_mod, name, value)
        new = circulant_norm_bound(op)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv_mod, "_CHOL_MIN_N", 10 ** 9)
        old = circulant_norm_bound(op)
    assert new is not None and old is not None
    return new, old


@st.composite
def varied_convs(draw) -> ConvOp:
    """Small convolutions (strides 1-3, padding, dilation, groups, kernel sizes) with Gaussian
    kernels, a dominant frequency, tiny taps or output channels on scales 1e-6..1e6."""
    groups = draw(st.integers(1, 2))
    c_in_g, c_out_g = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h_min = max(3, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    w_min = max(3, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h = draw(st.integers(h_min, max(h_min, 8)))
    w = draw(st.integers(w_min, max(w_min, 8)))
    kind = draw(st.sampled_from(["gauss", "dominant", "tiny", "mixed"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    c_out = c_out_g * groups
    weight = torch.randn(c_out, c_in_g, kh, kw, generator=gen, dtype=torch.float64)
    if kind == "dominant":  # a rank-one channel pattern on one spatial frequency (or DC)
        f1, f2 = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        a = torch.arange(kh, dtype=torch.float64)[:, None]
        b = torch.arange(kw, dtype=torch.float64)[None, :]
        wave = torch.cos(math.pi * (f1 * a + f2 * b) / 2)
        u = torch.randn(c_out, 1, 1, 1, generator=gen, dtype=torch.float64)
        v = torch.randn(1, c_in_g, 1, 1, generator=gen, dtype=torch.float64)
        weight = 0.05 * weight + 10.0 * u * v * wave
    elif kind == "tiny":  # some taps many orders of magnitude below the others
        scale = 10.0 ** -draw(st.sampled_from([8, 100, 300]))
        mask = torch.rand(weight.shape, generator=gen) < 0.5
        weight = torch.where(mask, weight * scale, weight)
    elif kind == "mixed":  # output channels on very different scales
        expo = torch.empty(c_out, 1, 1, 1, dtype=torch.float64).uniform_(-6, 6, generator=gen)
        weight = weight * 10.0 ** expo
    x = torch.zeros(1, c_in_g * groups, h, w, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    return ConvOp("conv", (c_in_g * groups, h, w), tuple(y.shape[1:]), weight, None, stride,
                  padding, dilation, groups)


def _worst_first(est: torch.Tensor, grp: torch.Tensor, groups: int) -> torch.Tensor:
    """Candidate choice reversed: the frequency with the smallest estimate gets eigvalsh first
    (the level starts low and many factorisations fail)."""
    return _GROUP_TOPS(-est, grp, groups)


_GROUP_TOPS = conv_mod._group_tops


@settings(max_examples=80)
@given(varied_convs())
def test_cholesky_certified_bound_is_sound_and_as_tight_as_eigvalsh(op):
    exact = _dense_norm(op)
    new, old = _certified_and_eig_only(op)
    assert new >= exact  # no tolerance in the unsafe direction
    assert new <= old * (1 + 1e-9)
    # the same with the worst candidate order (levels below the maximum, fallbacks)
    worst, _ = _certified_and_eig_only(op, _group_tops=_worst_first)
    assert exact <= worst <= old * (1 + 1e-9)


def _failure_spy():
    """A wrapper of ``_cholesky_upper_neg`` (what the certification calls) that records, per
    call, how many factorisations failed (non-finite results), and the list it appends to."""
    failures: list[int] = []
    real = conv_mod._cholesky_upper_neg

    def spy(neg, level):
        out = real(neg, level)
        failures.append(int((~torch.isfinite(out)).sum()))
        return out
    return spy, failures


@pytest.mark.parametrize("margin, retries", [(-1e-3, 2), (-0.05, 2), (-1e-3, 0), (-0.2, 1)])
@pytest.mark.parametrize("args", [
    (4, 6, 3, 3, 1, 1, 1, 1, 8, 8, 21),    # stride 1, Gram of the input side
    (3, 2, 5, 5, 2, 2, 1, 1, 9, 9, 22),    # stride 2: 12 polyphase columns
    (2, 3, 3, 3, 3, 1, 2, 2, 11, 10, 23),  # stride 3, dilation 2, two groups
])
def test_levels_below_the_maximum_fall_back_to_eigvalsh(args, margin, retries):
    """A negative level margin puts the Cholesky level below the largest eigenvalue found, so
    factorisations fail (checked) and those frequencies take the eigvalsh route; the bound
    must stay above the exact norm and equal the eigvalsh-only bound (up to rounding)."""
    op = _make(*args)
    spy, failures = _failure_spy()

    new, old = _certified_and_eig_only(op, _LEVEL_MARGIN=margin, _LEVEL_RETRIES=retries,
                                       _cholesky_upper_neg=spy)
    assert sum(failures) > 0
    assert _dense_norm(op) <= new <= old * (1 + 1e-9)
    # and with the smallest candidate first
    worst, _ = _certified_and_eig_only(op, _LEVEL_MARGIN=margin, _LEVEL_RETRIES=retries,
                                       _group_tops=_worst_first)
    assert _dense_norm(op) <= worst <= old * (1 + 1e-9)


@pytest.mark.parametrize("retries", [0, 1, 2, 5])
def test_worst_candidate_order_still_certifies(retries):
    """Estimates that rank the frequencies backwards (the smallest top eigenvalue gets
    eigvalsh first) cost more factorisations but never a wrong or looser bound."""
    op = _make(4, 4, 3, 3, 1, 1, 1, 1, 10, 10, seed=31)
    spy, failures = _failure_spy()

    new, old = _certified_and_eig_only(op, _LEVEL_RETRIES=retries, _group_tops=_worst_first,
                                       _cholesky_upper_neg=spy)
    assert sum(failures) > 0
    assert _dense_norm(op) <= new <= old * (1 + 1e-9)


def test_cholesky_with_an_all_zero_group():
    """A group whose kernel is zero has zero Gram matrices at every frequency: they are
    certified at the floor level (a handful of factorisations, not one eigvalsh each)."""
    op = _make(3, 4, 3, 3, 1, 1, 1, 2, 9, 9, seed=12)
    op.weight[4:].zero_()
    calls = []
    real = conv_mod._eig_upper

    def spy(gram, gf, cnu):
        calls.append(gram.shape[0])
        return real(gram, gf, cnu)

    new, old = _certified_and_eig_only(op, _eig_upper=spy)
    assert len(calls) <= 8
    assert _dense_norm(op) <= new <= old * (1 + 1e-9)


@pytest.mark.parametrize("n, k", [(1, 3), (2, 1), (5, 4), (9, 7), (16, 2)])
def test_block_triangular_gram_real_part(n, k):
    gen = torch.Generator().manual_seed(n * 10 + k)
    x = torch.randn(3, n, k, generator=gen, dtype=torch.float64)
    y = torch.randn(3, k, n, generator=gen, dtype=torch.float64).mT  # a transposed view
    ref = x @ x.mT + y @ y.mT
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv_mod, "_SYM_BLOCK_N", 1)
        re = conv_mod._gram_real(x, y)
    assert torch.equal(re, re.mT)
    assert torch.allclose(re, ref, rtol=1e-13, atol=1e-13)


@settings(max_examples=25)
@given(varied_convs())
def test_cholesky_bound_with_block_triangular_gram(op):
    exact = _dense_norm(op)
    new, old = _certified_and_eig_only(op, _SYM_BLOCK_N=2)
    assert exact <= new <= old * (1 + 1e-9)


def test_cholesky_chunking_does_not_change_the_bound():
    op = _make(3, 5, 3, 3, 2, 1, 1, 1, 12, 11, seed=8)
    grid = (op.in_shape[1] + 2 * op.padding[0], op.in_shape[2] + 2 * op.padding[1])
    plan = _Plan(op.weight, op.groups, op.stride, op.dilation, grid)
    full = _max_freq_norm(plan, op.weight, 2 ** 26, use_cholesky=True)
    tiny = _max_freq_norm(plan, op.weight, 1, use_cholesky=True)  # one frequency per chunk
    old = _max_freq_norm(plan, op.weight, 2 ** 26, use_cholesky=False)
    assert math.isclose(full, tiny, rel_tol=1e-10)
    assert old <= full <= old * (1 + 1e-9)
    assert full >= _exact(op)


def _unitary_units(n: int, gen: torch.Generator) -> torch.Tensor:
    """An n x n matrix H with entries in {±1, ±i} and H H^H = n I (n a power of two):
    Kronecker powers of [[1, i], [1, -i]], rows permuted and multiplied by random units."""
    h = torch.ones(1, 1, dtype=torch.complex128)
    base = torch.tensor([[1, 1j], [1, -1j]], dtype=torch.complex128)
    while h.shape[0] < n:
        h = torch.kron(h, base)
    units = torch.tensor([1, -1, 1j, -1j], dtype=torch.complex128)
    phase = units[torch.randint(0, 4, (n,), generator=gen)]
    return (phase[:, None] * h)[torch.randperm(n, generator=gen)]


def _known_spectrum(sizes: list[int], gen: torch.Generator, clustered: bool = False
                    ) -> tuple[torch.Tensor, float]:
    """A dense Hermitian PSD matrix with exactly known eigenvalues (non-negative integers
    below 2^30, so every entry of (1/n) H diag(λ) H^H is computed exactly), as a direct sum of
    blocks of the given power-of-two sizes, symmetrically permuted and rephased."""
    n = sum(sizes)
    gram = torch.zeros(n, n, dtype=torch.complex128)
    lam_all = []
    off = 0
    for m in sizes:
        lam = torch.randint(0, 2 ** 30, (m,), generator=gen).to(torch.float64)
        if clustered:  # top eigenvalues within a few units of each other
            lam = 2.0 ** 30 - torch.randint(0, 4, (m,), generator=gen).to(torch.float64)
        if m > 1:
            lam[torch.randint(0, m, (1,), generator=gen)] = 0.0  # singular
        hm = _unitary_units(m, gen)
        gram[off:off + m, off:off + m] = (hm * lam) @ hm.mH / m
        lam_all.append(lam)
        off += m
    perm = torch.randperm(n, generator=gen)
    units = torch.tensor([1, -1, 1j, -1j], dtype=torch.complex128)
    phase = units[torch.randint(0, 4, (n,), generator=gen)]
    gram = phase[:, None] * gram[perm][:, perm] * phase.conj()[None, :]
    return gram, float(torch.cat(lam_all).max())


def test_known_spectrum_construction_is_exact():
    gen = torch.Generator().manual_seed(0)
    gram, top = _known_spectrum([16, 4, 1], gen)
    assert torch.equal(gram, gram.mH)
    assert math.isclose(float(torch.linalg.eigvalsh(gram)[-1]), top, rel_tol=1e-13)


@pytest.mark.parametrize("sizes", [[1], [2], [4, 1], [8, 2, 1], [16, 16], [32, 8, 4],
                                   [64], [128, 2]])
@pytest.mark.parametrize("clustered", [False, True])
def test_cholesky_certificate_on_known_spectra(sizes, clustered):
    gen = torch.Generator().manual_seed(sum(sizes) + 7 * clustered)
    grams, tops = zip(*[_known_spectrum(sizes, gen, clustered) for _ in range(4)],
                      strict=True)
    gram = torch.stack(grams)
    top = torch.tensor(tops, dtype=torch.float64)
    # just above λmax: certified, never below λmax, and within 1e-10 of it
    up = conv_mod._cholesky_upper(gram, top * (1 + 1e-11))
    assert torch.isfinite(up).all()
    assert (up >= top).all()
    assert (up <= top * (1 + 1e-10)).all()
    # below λmax: no certificate
    for rel in (1e-9, 1e-6, 1e-2, 0.5):
        assert torch.isinf(conv_mod._cholesky_upper(gram, top * (1 - rel))).all()
    # whatever the level, a certificate is never below λmax
    for rel in (-1e-12, -1e-13, -1e-14, -1e-15, 0.0, 1e-15, 1e-14, 1e-13, 1e-12, 1e-3):
        up = conv_mod._cholesky_upper(gram, top * (1 + rel))
        ok = torch.isfinite(up)
        assert (up[ok] >= top[ok]).all()


def test_cholesky_certificate_degenerate_inputs():
    gen = torch.Generator().manual_seed(3)
    gram, top = _known_spectrum([4, 2], gen)
    batch = gram.expand(5, 6, 6).clone()
    levels = torch.tensor([0.0, -1.0, math.nan, math.inf, 2.0 * top], dtype=torch.float64)
    up = conv_mod._cholesky_upper(batch, levels)
    assert torch.isinf(up[:4]).all()  # no level, negative, NaN, infinite: no certificate
    assert top <= float(up[4]) <= 2.0 * top * (1 + 1e-10)
    bad = batch.clone()
    bad[4, 1, 0] = complex(math.nan, 0.0)
    bad[4, 0, 1] = complex(math.nan, 0.0)
    assert torch.isinf(conv_mod._cholesky_upper(bad[4:], levels[4:])).all()
    # an all-zero matrix is certified at any positive level
    zero = torch.zeros(1, 3, 3, dtype=torch.complex128)
    up0 = conv_mod._cholesky_upper(zero, torch.tensor([1e-3], dtype=torch.float64))
    assert 0.0 < float(up0[0]) <= 1e-3 * (1 + 1e-12)
    # an empty batch
    assert conv_mod._cholesky_upper(batch[:0], levels[:0]).shape == (0,)


def test_negated_cholesky_is_the_same_certificate_and_restores_its_input():
    """``_cholesky_upper_neg(-Ĝ)`` factorises in place: the same values as
    ``_cholesky_upper(Ĝ)`` bit for bit (certified or not), and its input unchanged after."""
    gen = torch.Generator().manual_seed(5)
    grams, tops = zip(*[_known_spectrum([8, 4, 1], gen) for _ in range(6)], strict=True)
    gram = torch.stack(grams)
    top = torch.tensor(tops, dtype=torch.float64)
    # above, at and below the top eigenvalue, and no level: certified and failed ones
    levels = top * torch.tensor([1 + 1e-11, 1.5, 1.0, 1 - 1e-3, 0.5, 0.0],
                                dtype=torch.float64)
    neg = gram.neg()
    before = neg.clone()
    got = conv_mod._cholesky_upper_neg(neg, levels)
    assert torch.equal(torch.view_as_real(neg), torch.view_as_real(before))
    ref = conv_mod._cholesky_upper(gram, levels)
    assert torch.equal(got, ref)
    assert torch.isfinite(got[:2]).all() and torch.isinf(got[3:]).all()
    assert (got[torch.isfinite(got)] >= top[torch.isfinite(got)]).all()


@settings(max_examples=40)
@given(varied_convs(), st.sampled_from([-1e-3, 1e-12]))
def test_whole_chunk_factorisation_gives_the_gathered_values(op, margin):
    """Factorising the whole chunk in place (reading only the frequencies due) and gathering
    those frequencies first give the same bound bit for bit, above the exact norm; with a
    level margin below the maximum, failures and retries take both paths."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv_mod, "_CHOL_MIN_N", 1)
        mp.setattr(conv_mod, "_LEVEL_MARGIN", margin)
        mp.setattr(conv_mod, "_WHOLE_CHUNK", 0.0)  # always the whole chunk
        whole = circulant_norm_bound(op, chunk_bytes=1 << 16)
        mp.setattr(conv_mod, "_WHOLE_CHUNK", 2.0)  # never: gathered copies only
        gathered = circulant_norm_bound(op, chunk_bytes=1 << 16)
    assert whole is not None and whole == gathered
    assert whole >= _dense_norm(op)


@pytest.mark.parametrize("c_in,c_out,pad", [(32, 32, (0, 0)), (64, 40, (1, 1)),
                                            (48, 64, (2, 0)), (40, 32, (1, 2)),
                                            (8, 8, (0, 0)), (32, 24, (1, 0)), (24, 32, (0, 1))])
def test_transpose_by_flipped_kernel_matches_conv_transpose(c_in, c_out, pad):
    """Wide 3x3 stride-1 layers compute A^T y as a convolution with the flipped,
    channel-swapped kernel: the same map as conv_transpose2d (to rounding), adjoint to A."""
    from lipbound.ops.conv import ConvOp, _flip_pays

    g = torch.Generator().manual_seed(c_in + c_out)
    w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    h, wd = 11, 9
    ho, wo = h + 2 * pad[0] - 2, wd + 2 * pad[1] - 2
    op = ConvOp("c", (c_in, h, wd), (c_out, ho, wo), w, None, 1, pad, 1, 1)
    assert op._use_flip and _flip_pays(w, (1, 1), pad, (1, 1), 1, (0, 0))
    y = torch.randn(3, c_out, ho, wo, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.conv_transpose2d(y, w, padding=pad)
    got = op.lin_t(y)
    assert got.shape == ref.shape
    assert float((got - ref).norm()) <= 1e-12 * float(ref.norm())
    x = torch.randn(3, c_in, h, wd, generator=g, dtype=torch.float64)
    lhs, rhs = float((op.lin(x) * y).sum()), float((x * got).sum())
    assert abs(lhs - rhs) <= 1e-11 * float(op.lin(x).norm() * y.norm())
    # narrow layers, 5x5 kernels and strides keep conv_transpose2d
    assert not _flip_pays(torch.zeros(32, 16, 3, 3), (1, 1), pad, (1, 1), 1, (0, 0))
    assert not _flip_pays(torch.zeros(64, 64, 5, 5), (1, 1), (2, 2), (1, 1), 1, (0, 0))
    assert not _flip_pays(w, (2, 2), pad, (1, 1), 1, (0, 0))
    assert not _flip_pays(torch.zeros(64, 32, 3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0))
    assert not _flip_pays(torch.zeros(4, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0))


@pytest.mark.parametrize("stride,pad,scaled", [(1, 0, False), (1, 1, True), (2, 1, False)])
def test_channel_subset_is_the_masked_convolution(stride, pad, scaled):
    """A convolution block restricted to some input and output channels computes exactly the
    full block's products with the other input channels zero and the other outputs dropped,
    and its transpose is its adjoint."""
    from lipbound.blocks import AffineBlock
    from lipbound.ops.conv import ConvOp

    g = torch.Generator().manual_seed(stride + 3 * pad + scaled)
    c_in, c_out, h = 6, 7, 9
    ho = (h + 2 * pad - 3) // stride + 1
    w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    blk = AffineBlock([ConvOp("c", (c_in, h, h), (c_out, ho, ho), w, None, stride, pad, 1, 1)],
                      relu=True)
    if scaled:
        blk.s_in = torch.rand(c_in * h * h, generator=g, dtype=torch.float64) + 0.5
        blk.s_out = torch.rand(c_out * ho * ho, generator=g, dtype=torch.float64) + 0.5
    in_ch, out_ch = torch.tensor([0, 2, 5]), torch.tensor([1, 2, 3, 6])
    sub = blk.channel_subset(in_ch, out_ch)
    assert sub.in_shape == (3, h, h) and sub.out_shape == (4, ho, ho)
    x = torch.randn(2, 3, h, h, generator=g, dtype=torch.float64)
    x_full = torch.zeros(2, c_in, h, h, dtype=torch.float64)
    x_full[:, in_ch] = x
    ref = blk.lin(x_full.reshape(2, -1)).reshape(2, c_out, ho, ho)[:, out_ch]
    got = sub.lin(x.reshape(2, -1)).reshape(2, 4, ho, ho)
    assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    y = torch.randn(2, 4 * ho * ho, generator=g, dtype=torch.float64)
    lhs = (sub.lin(x.reshape(2, -1)) * y).sum(1)
    rhs = (x.reshape(2, -1) * sub.lin_t(y)).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ungrouped"):
        ConvOp("g", (4, h, h), (4, h - 2, h - 2), torch.randn(4, 2, 3, 3, dtype=torch.float64),
               None, 1, 0, 1, 2).channel_subset(in_ch[:1], out_ch[:1])


def _dead_channel_net() -> tuple[torch.nn.Sequential, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 5, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(5, 4, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
        net[0].bias[[1, 4]] = -1e3  # two channels that never turn on
        net[2].bias[2] = -1e3
    return net.eval(), torch.randn(1, 2, 12, 12, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_channel_subsets_leave_local_bounds_unchanged(monkeypatch, eps):
    """Lanczos products on the live channels only: the same bounds as on the whole layers
    (same operator, same start vectors), above the exact masked norms and a sampled lower
    bound, and a warm-start vector in the block's own input space."""
    import lipbound.analyzer as az
    from core_helpers import local_lower_bound

    net, x0 = _dead_channel_net()
    calls = []
    orig = az.Analyzer._channel_subset

    def spy(self, b, *a):
        out = orig(self, b, *a)
        calls.append(out[-1] is not None)
        return out
    monkeypatch.setattr(az.Analyzer, "_channel_subset", spy)
    an = az.Analyzer(net, (2, 12, 12), spectral="lanczos")
    an.warm_start = True
    got = an.local_bound(x0, eps)
    assert any(calls), "no layer ran on a channel subset"
    for (_, i), v in an._warm.items():
        assert v.numel() == an.blocks[i].in_dim
    monkeypatch.setattr(az, "CHANNEL_SUBSET_MIN", 2.0)  # never
    ref = az.Analyzer(net, (2, 12, 12), spectral="lanczos").local_bound(x0, eps)
    assert got.value == pytest.approx(ref.value, rel=1e-10)
    for a, b in zip(got.layers, ref.layers, strict=True):
        assert a.local == pytest.approx(b.local, rel=1e-10)
    exact = az.Analyzer(net, (2, 12, 12), spectral="exact").local_bound(x0, eps)
    for a, b in zip(got.layers, exact.layers, strict=True):
        assert a.local >= b.local / (1 + 1e-12)
    low = local_lower_bound(net, x0, eps, 0, n_samples=200, ascent_starts=2,
                            ascent_steps=10)[0]
    assert got.value >= low
