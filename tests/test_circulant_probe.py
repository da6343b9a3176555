"""The circulant bound's test vector (lipbound.ops.conv.circulant_probe) and its use by
spectral_upper (``probe``): a Rayleigh quotient that passes the early-exit test lets the
certified circulant bound be reported without a Lanczos run.

Checked against exact singular values of the convolution's matrix (basis vectors): the
quotient never exceeds the norm, the reported value is the certified bound (>= the norm) and
at most the KW inflation of the completed run above the norm; a useless probe changes
nothing."""

from __future__ import annotations

import math

import pytest
import torch

from lipbound import Analyzer, Guarantee
from lipbound.ops.conv import (
    CirculantHint,
    ConvOp,
    circulant_hint,
    circulant_norm_bound,
    circulant_probe,
)
from lipbound.spectral import SAFETY, kw_factor, spectral_upper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64


def _conv(c_in: int, c_out: int, k: int, h: int, padding: int, seed: int, stride: int = 1,
          groups: int = 1, smooth: bool = False) -> ConvOp:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=DT)
    if smooth:  # a low-pass kernel (one sign): the top of the spectrum sits at one frequency
        w = w.abs() + 0.5
    y = torch.nn.functional.conv2d(torch.zeros(1, c_in, h, h, dtype=DT), w, None, stride,
                                   padding, 1, groups)
    return ConvOp("conv", (c_in, h, h), tuple(y.shape[1:]), w, None, (stride, stride),
                  (padding, padding), (1, 1), groups)


def _matrix(op: ConvOp) -> torch.Tensor:
    eye = torch.eye(op.in_dim, dtype=DT).reshape(op.in_dim, *op.in_shape)
    return op.lin(eye).reshape(op.in_dim, op.out_dim).T


def _quotient(op: ConvOp, x: torch.Tensor) -> float:
    y = op.lin(x.reshape(1, *op.in_shape))
    return float(y.norm() / x.norm())


@pytest.mark.parametrize("c_in,c_out,k,h,padding,seed",
                         [(3, 8, 3, 12, 0, 0), (4, 4, 3, 10, 1, 1), (6, 5, 5, 11, 2, 2),
                          (8, 8, 3, 14, 1, 3), (2, 6, 3, 9, 0, 4)])
def test_probe_is_a_good_test_vector_and_the_bound_is_unchanged(c_in, c_out, k, h, padding,
                                                                 seed):
    op = _conv(c_in, c_out, k, h, padding, seed)
    bound, vec = circulant_probe(op)
    assert bound == circulant_norm_bound(op)  # the same certified number
    assert vec is not None and vec.shape == (op.in_dim,) and vec.dtype == DT
    exact = float(torch.linalg.matrix_norm(_matrix(op), ord=2))
    q = _quotient(op, vec)
    assert q <= exact * (1 + 1e-12) <= bound * (1 + 1e-12)
    # the plane wave of the top frequency keeps most of the circulant's gain (the border
    # costs a little on these small grids)
    assert q >= 0.8 * bound, (q, exact, bound)


def test_probe_on_a_large_grid_is_nearly_a_top_vector():
    """A smooth 16-channel kernel on a 28x28 grid: the windowed plane wave's quotient is within
    2 % of the circulant bound (which is within the border effect of the norm)."""
    op = _conv(16, 16, 3, 28, 1, 7, smooth=True)
    bound, vec = circulant_probe(op)
    assert vec is not None
    q = _quotient(op, vec)
    assert 0.98 * bound <= q <= bound


@pytest.mark.parametrize("stride,groups", [(2, 1), (1, 2)])
def test_no_probe_for_strided_or_grouped_convolutions(stride, groups):
    op = _conv(4, 4, 3, 12, 1, 5, stride=stride, groups=groups)
    bound, vec = circulant_probe(op)
    assert vec is None and bound == circulant_norm_bound(op)
    assert circulant_probe(_conv(4, 4, 3, 12, 1, 5), probe=False)[1] is None


def _upper(op: ConvOp, alts, probe=None, seed=0, steps=30, calls=None, probe_step=None):
    def mv(x):
        if calls is not None:
            calls.append(x.shape[0])
        return op.lin(x.reshape(-1, *op.in_shape)).reshape(x.shape[0], -1)
    return spectral_upper(mv,
                          lambda y: op.lin_t(y.reshape(-1, *op.out_shape)).reshape(y.shape[0],
                                                                                    -1),
                          n_in=op.in_dim, n_out=op.out_dim, cols=torch.arange(op.in_dim),
                          rows=torch.arange(op.out_dim), device="cpu", dense=None,
                          apply_flops=float(op.weight.numel() * op.out_dim), mode="lanczos",
                          steps=steps, failure_prob=1e-6,
                          generator=torch.Generator().manual_seed(seed),
                          certified_alternatives=alts, probe=probe, probe_step=probe_step)


def test_a_passing_probe_reports_the_certified_bound_within_the_kw_inflation():
    op = _conv(8, 8, 3, 12, 1, 3, smooth=True)
    bound, vec = circulant_probe(op)
    alt = bound * (1 + SAFETY)
    calls: list[int] = []
    res = _upper(op, ((alt, "fft-circulant"),), probe=vec, calls=calls)
    assert res.method == "fft-circulant" and res.value == alt
    assert len(calls) <= 2  # the probe's power steps only: no Lanczos run
    without: list[int] = []
    assert _upper(op, ((alt, "fft-circulant"),), calls=without).value == alt
    assert len(without) > len(calls)  # the run it replaces (stopped early, same value)
    assert res.guarantee == Guarantee.CERTIFIED and res.failure_prob == 0.0
    exact = float(torch.linalg.matrix_norm(_matrix(op), ord=2))
    n = min(op.in_dim, op.out_dim)
    f = kw_factor(n, 30, 1e-6 / 2)
    # sound, and within the completed run's KW inflation of the norm
    assert exact <= res.value <= exact * math.sqrt(f) * (1 + SAFETY) * (1 + 1e-12)
    assert res.estimate <= exact * (1 + 1e-12)  # a Rayleigh quotient
    assert res.vector is not None and res.vector.shape == (op.in_dim,)


@pytest.mark.parametrize("kind", ["random", "zero", "nan", "wrong-size"])
def test_a_useless_probe_changes_nothing(kind):
    """A probe that fails the test (or cannot be used) leaves the run exactly as without one
    (it draws no random numbers)."""
    op = _conv(8, 8, 3, 12, 1, 9)
    bound = circulant_norm_bound(op)
    alts = ((bound * (1 + SAFETY), "fft-circulant"), (1e9, "loose"))
    g = torch.Generator().manual_seed(3)
    probe = {"random": torch.randn(op.in_dim, generator=g, dtype=DT),
             "zero": torch.zeros(op.in_dim, dtype=DT),
             "nan": torch.full((op.in_dim,), math.nan, dtype=DT),
             "wrong-size": torch.ones(op.in_dim + 1, dtype=DT)}[kind]
    plain = _upper(op, alts, seed=4)
    probed = _upper(op, alts, probe=probe, seed=4)
    assert probed.value == plain.value and probed.method == plain.method
    assert probed.estimate == plain.estimate


def _low_pass_cnn() -> torch.nn.Module:
    """Two 3x3 convolutions with non-negative (low-pass) kernels on a 28x28 grid, padded:
    their circulant bounds are nearly tight."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 28 * 28, 10)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.abs_()
    return net.eval()


def test_global_bound_with_and_without_probes():
    """A small CNN with low-pass kernels on a 28x28 grid (the circulant bound nearly tight):
    the global factors of its convolutions are the certified circulant bounds, reported
    without Lanczos runs; without probes (threshold raised) the Lanczos runs stop early
    against the same bounds, or end at most the KW inflation below them. Every factor is at
    least a long Lanczos run's Ritz value (a lower bound of the norm)."""
    import lipbound.analyzer as az

    net = _low_pass_cnn()
    import lipbound.spectral as sp

    runs: list[int] = []
    real_run = sp.run_lanczos

    def spy(*a, **k):
        runs.append(a[2])  # the dimension of the run
        return real_run(*a, **k)

    an = Analyzer(net, (8, 28, 28))
    sp.run_lanczos = spy
    try:
        probed = an.global_bound()
    finally:
        sp.run_lanczos = real_run
    assert runs == []  # both convolutions: the circulant bound without a run
    old = az.PROBE_MIN_FLOPS
    try:
        az.PROBE_MIN_FLOPS = math.inf
        plain_an = Analyzer(net, (8, 28, 28))
        plain = plain_an.global_bound()
    finally:
        az.PROBE_MIN_FLOPS = old
    convs = 0
    for i, (lp, lq, b) in enumerate(zip(plain.layers, probed.layers, an.blocks, strict=True)):
        if not isinstance(getattr(b, "mixing", None), ConvOp):
            assert lp.global_factor == lq.global_factor
            continue
        convs += 1
        circ = circulant_norm_bound(b.mixing) * (1 + SAFETY)
        assert lq.spectral_method == "fft-circulant" and lq.global_factor == circ
        assert lq.guarantee == Guarantee.CERTIFIED
        sb = an._global[""][i]
        assert 0.98 * circ <= sb.estimate <= circ  # the probe's Rayleigh quotient
        f = kw_factor(min(b.in_dim, b.out_dim), an.lanczos_steps,
                      an.failure_prob / an._n_spectral(an.blocks) / 2)
        assert lp.global_factor <= lq.global_factor
        assert lq.global_factor <= lp.global_factor * math.sqrt(f) * (1 + 1e-9)
        ritz = _upper(b.mixing, (), steps=120, seed=11).estimate
        assert ritz <= lq.global_factor
    assert convs == 2


def _small_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 12, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(12, 12, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(12 * 6 * 6, 5)).double()
    return net.eval()


def _exact_block_norm(b) -> float:
    return float(torch.linalg.matrix_norm(b.lin(torch.eye(b.in_dim, dtype=DT)), ord=2))


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_lanczos_first_when_the_circulant_bound_is_predicted_to_lose(seed, monkeypatch):
    """Random 3x3 kernels on 10x10 and 8x8 grids without padding: the circulant bound is
    loose (border effects), the hint predicts it, Lanczos runs first and the circulant bound
    is not computed where the run ends below the hint's lower estimate of it. The factors are
    sound (>= exact norms) and never looser than in the usual order."""
    import lipbound.analyzer as az

    monkeypatch.setattr(az, "PROBE_MIN_FLOPS", 0.0)
    net = _small_cnn(seed)
    calls: list[int] = []
    real = az.circulant_probe

    def spy(op, *a, **k):
        calls.append(op.in_dim)
        return real(op, *a, **k)

    monkeypatch.setattr(az, "circulant_probe", spy)
    an = Analyzer(net, (6, 10, 10), spectral="lanczos")
    res = an.global_bound()
    computed = list(calls)
    monkeypatch.setattr(az.Analyzer, "_lanczos_first",
                        lambda self, *a, **k: (None, (None, None)))
    usual = Analyzer(net, (6, 10, 10), spectral="lanczos").global_bound()
    skipped = 0
    for lf, lu, b in zip(res.layers, usual.layers, an.blocks, strict=True):
        if not isinstance(getattr(b, "mixing", None), ConvOp):
            continue
        exact = _exact_block_norm(b)
        assert lf.global_factor >= exact
        assert lf.global_factor <= lu.global_factor * (1 + 1e-12)
        if lf.spectral_method == "lanczos":
            circ = circulant_norm_bound(b.mixing) * (1 + SAFETY)
            assert lf.global_factor <= circ  # the circulant bound could not have won
        skipped += b.in_dim not in computed
    assert skipped >= 1  # at least one circulant bound was never computed


def test_lanczos_first_computes_the_circulant_bound_when_it_may_win(monkeypatch):
    """A (deliberately wrong) hint that predicts a losing circulant bound while the run ends
    above its lower estimate: the circulant bound is computed after the run and the smaller
    of the two reported, with its own guarantee."""
    import lipbound.analyzer as az

    monkeypatch.setattr(az, "PROBE_MIN_FLOPS", 0.0)
    net = _small_cnn(3)
    an = Analyzer(net, (6, 10, 10), spectral="lanczos")
    conv = an.blocks[0]
    circ = circulant_norm_bound(conv.mixing) * (1 + SAFETY)
    g = torch.Generator().manual_seed(0)
    bad = torch.randn(conv.in_dim, generator=g, dtype=DT)  # a poor test vector: small ℓ

    def hint(op, *a, **k):
        if op is conv.mixing:
            return CirculantHint(circ * 0.5, bad, -1)
        return None

    monkeypatch.setattr(az, "circulant_hint", hint)
    res = an.global_bound()
    fac = an._global[""][0]
    assert fac.value <= circ
    assert fac.value >= _exact_block_norm(conv)
    if fac.method == "fft-circulant":
        assert fac.guarantee == Guarantee.CERTIFIED and fac.value == circ
    else:
        assert fac.method == "lanczos" and fac.value < circ
    assert res.layers[0].global_factor == fac.value
    # the run itself (Frobenius alternative only) is what the factor came from otherwise
    monkeypatch.setattr(az, "circulant_hint", lambda *a, **k: None)
    monkeypatch.setattr(az, "PROBE_MIN_FLOPS", math.inf)
    usual = Analyzer(net, (6, 10, 10), spectral="lanczos").global_bound().layers[0]
    assert fac.value <= usual.global_factor * (1 + 1e-12)


@pytest.mark.parametrize("c_in,c_out,k,h,padding,seed,smooth",
                         [(8, 8, 3, 12, 1, 3, True), (4, 6, 3, 10, 0, 1, False),
                          (6, 5, 5, 11, 2, 2, False), (3, 8, 3, 16, 1, 5, True)])
def test_the_hint_wave_is_the_probe_at_the_same_frequency(c_in, c_out, k, h, padding, seed,
                                                         smooth):
    """``circulant_probe(wave=...)`` hands back the hint's own plane wave when the hint's
    frequency is the one of the circulant's largest eigenvalue, builds its own otherwise
    (a frequency that cannot match); the bound is the same either way."""
    op = _conv(c_in, c_out, k, h, padding, seed, smooth=smooth)
    hint = circulant_hint(op)
    assert hint is not None
    bound, own = circulant_probe(op)
    same_b, same = circulant_probe(op, wave=(hint.frequency, hint.vector))
    other_b, other = circulant_probe(op, wave=(-1, hint.vector))
    assert bound == same_b == other_b
    assert other is not hint.vector and torch.equal(other, own)
    if same is hint.vector:
        # the hint's wave sits at the top frequency: a test vector as good as the probe's
        exact = float(torch.linalg.matrix_norm(_matrix(op), ord=2))
        assert _quotient(op, same) <= exact * (1 + 1e-12)
        assert _quotient(op, same) >= 0.9 * _quotient(op, own)
    else:
        assert torch.equal(same, own)


def test_a_first_probe_step_from_the_caller_gives_the_same_decision():
    """``spectral_upper(probe_step=(ℓ, z))`` continues from the caller's first power step:
    the same certified value as probing from scratch, the same estimate (to rounding), and
    one product pair fewer."""
    op = _conv(8, 8, 3, 12, 1, 3, smooth=True)
    bound, vec = circulant_probe(op)
    alt = ((bound * (1 + SAFETY), "fft-circulant"),)
    x = vec.reshape(1, *op.in_shape)
    y = op.lin(x)
    z = op.lin_t(y).reshape(-1)
    ell = float(z.norm() / y.norm())
    scratch: list[int] = []
    resumed: list[int] = []
    a = _upper(op, alt, probe=vec, calls=scratch)
    b = _upper(op, alt, probe=vec, calls=resumed, probe_step=(ell, z))
    assert a.method == b.method == "fft-circulant" and a.value == b.value
    assert b.estimate == pytest.approx(a.estimate, rel=1e-12)
    assert len(resumed) == len(scratch) - 1
    # a useless first step (wrong size, not finite) gives up probing: a plain run
    plain = _upper(op, alt, seed=4)
    for bad in ((math.nan, z), (ell, torch.ones(op.in_dim + 1, dtype=DT))):
        r = _upper(op, alt, probe=vec, probe_step=bad, seed=4)
        assert r.value == plain.value and r.estimate == plain.estimate


def test_global_bound_is_the_same_with_the_hint_as_probe(monkeypatch):
    """Global factors of a small CNN (low-pass kernels: the circulant bounds win through
    the probe) are the same whether the hint's wave and first step are reused or not."""
    import lipbound.analyzer as az
    import lipbound.spectral as sp

    net = _low_pass_cnn()
    firsts: list[bool] = []
    real_probe = sp._probe_dominates

    def spy(*a, **k):
        firsts.append(a[8] is not None if len(a) > 8 else k.get("first") is not None)
        return real_probe(*a, **k)

    monkeypatch.setattr(sp, "_probe_dominates", spy)
    reused = Analyzer(net, (8, 28, 28)).global_bound()
    assert any(firsts)  # the hint's first step was taken over at least once
    real = az.circulant_hint

    def no_match(op, *a, **k):  # the same hint, at a frequency no probe has
        h = real(op, *a, **k)
        return None if h is None else CirculantHint(h.c_lo, h.vector, -1)

    monkeypatch.setattr(az, "circulant_hint", no_match)
    firsts.clear()
    fresh = Analyzer(net, (8, 28, 28)).global_bound()
    assert not any(firsts)
    assert reused.value == fresh.value
    assert [lr.spectral_method for lr in reused.layers].count("fft-circulant") == 2
    for lr, lf in zip(reused.layers, fresh.layers, strict=True):
        assert lr.global_factor == lf.global_factor
        assert lr.spectral_method == lf.spectral_method


def test_a_first_probe_step_is_not_taken_over_on_masked_columns():
    """On a subset of the columns the caller's step (made on every column) would not be a
    step of the masked operator: spectral_upper ignores it and probes from scratch."""
    op = _conv(8, 8, 3, 12, 1, 3, smooth=True)
    bound, vec = circulant_probe(op)
    alt = ((bound * (1 + SAFETY), "fft-circulant"),)
    cols = torch.arange(0, op.in_dim, 2)
    mask = torch.zeros(op.in_dim, dtype=DT)
    mask[cols] = 1.0

    def mv(x):
        return op.lin((x * mask).reshape(-1, *op.in_shape)).reshape(x.shape[0], -1)

    def rmv(y):
        return op.lin_t(y.reshape(-1, *op.out_shape)).reshape(y.shape[0], -1) * mask

    def upper(step):
        return spectral_upper(mv, rmv, n_in=op.in_dim, n_out=op.out_dim, cols=cols,
                              rows=torch.arange(op.out_dim), device="cpu", dense=None,
                              apply_flops=float(op.weight.numel() * op.out_dim),
                              mode="lanczos", steps=30, failure_prob=1e-6,
                              generator=torch.Generator().manual_seed(0),
                              certified_alternatives=alt, probe=vec, probe_step=step)

    y = op.lin(vec.reshape(1, *op.in_shape))
    z = op.lin_t(y).reshape(-1)
    fake = (1e6 * float(z.norm() / y.norm()), z)  # would pass any test if it were used
    a, b = upper(None), upper(fake)
    assert a.value == b.value and a.method == b.method and a.estimate == b.estimate
