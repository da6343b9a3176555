"""Tests of the proof of the eigvalsh values in the circulant bound of convolutions.

The frequencies whose value comes from ``eigvalsh`` (those whose Cholesky certificate at the
group's level fails, or all of them without Cholesky certification) must not rest on an assumed
backward error of the eigensolver: an eigensolver that lies (returns its top eigenvalue 1e-6
too low, or 0) must still give a bound >= the exact value, max over the frequencies ω of the
top singular value of the kernel's DFT K(ω), computed here independently (fft2 of the
zero-padded kernel, ``torch.linalg.svdvals`` in complex128). No tolerance in the unsafe
direction. Where the certificate proves the former value (every Gram size up to 15, and the
default path of the zoo's layers), the bound keeps its bits: checked against the previous
formula, kept here as the reference.
"""

from __future__ import annotations

import pytest
import torch

from lipbound import zoo
from lipbound.ops import conv as conv_mod
from lipbound.ops.conv import ConvOp, circulant_norm_bound, conv2d_rule

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


# --- bits: the previous formula as the reference ---------------------------------------------

def _old_eig(gram, gf, fro_up, cnu):
    """The previous value of an eigvalsh frequency: (λ̂ + c n u gf) / (1 - c n u) + gf, which
    assumed the eigensolver's backward error."""
    lam = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0)
    return lam, (lam + cnu * gf) / (1.0 - cnu) + gf


def _new_and_old(op: ConvOp, use_cholesky: bool | None) -> tuple[float, float]:
    with pytest.MonkeyPatch.context() as mp:
        if use_cholesky is False:
            mp.setattr(conv_mod, "_CHOL_MIN_N", 10 ** 9)
        new = circulant_norm_bound(op)
        mp.setattr(conv_mod, "_eig_certified", _old_eig)
        old = circulant_norm_bound(op)
    assert new is not None and old is not None
    return new, old


def _zoo_convs(name: str) -> list[ConvOp]:
    """The ops of a zoo model's convolutions, with the shapes seen on a forward pass."""
    model = zoo.load_model(name).model
    ops: list[ConvOp] = []
    hooks = [m.register_forward_hook(
        lambda mod, i, o, nm=nm: ops.append(conv2d_rule(mod, nm, tuple(i[0].shape[1:]),
                                                        tuple(o.shape[1:]))))
        for nm, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    shape = zoo.load_model(name).entry.input_shape
    with torch.no_grad():
        model(torch.zeros(1, *shape, dtype=next(model.parameters()).dtype))
    for h in hooks:
        h.remove()
    return ops


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_zoo_layers_keep_their_bits(name):
    ops = _zoo_convs(name)
    assert ops
    for op in ops:
        exact = _exact_circulant(op)
        new, old = _new_and_old(op, None)
        assert new == old, op.name  # the default path: bit for bit
        assert new >= exact
        n = min(op.weight.shape[:2])  # the Gram size (stride 1, one group)
        new, old = _new_and_old(op, False)
        assert new >= exact
        if n <= 15:
            assert new == old, op.name
        else:  # the room c n u is smaller than the certificate's overhead (~4 n^2 u)
            assert new <= old * (1 + 1e-9), op.name


def _random_conv(seed: int) -> ConvOp:
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = (int(v) for v in torch.randint(1, 17, (2,), generator=gen))
    kh, kw = (int(v) for v in torch.randint(1, 6, (2,), generator=gen))
    h, w = (int(v) for v in torch.randint(4, 17, (2,), generator=gen))
    pad = int(torch.randint(0, 3, (1,), generator=gen))
    return _make(c_in, c_out, kh, kw, pad, max(h, kh), max(w, kw), seed=seed)


@pytest.mark.parametrize("use_cholesky", [None, False])
def test_random_convolutions_keep_their_bits(use_cholesky):
    for seed in range(40):
        op = _random_conv(seed)
        new, old = _new_and_old(op, use_cholesky)
        assert new >= _exact_circulant(op)
        n = min(op.weight.shape[:2])
        if n <= 15 or use_cholesky is None:
            assert new == old, seed
        else:
            assert new <= old * (1 + 1e-9), seed


# --- the higher levels ---------------------------------------------------------------------

def _rounds_spy(fail_first: int = 0):
    """A wrapper of ``_cholesky_upper_neg`` that records (batch, failures) per call and makes
    the first ``fail_first`` calls fail."""
    calls: list[tuple[int, int]] = []
    real = conv_mod._cholesky_upper_neg

    def spy(neg, level):
        out = real(neg, level)
        if len(calls) < fail_first:
            out = torch.full_like(out, torch.inf)
        calls.append((neg.shape[0], int((~torch.isfinite(out)).sum())))
        return out

    return spy, calls


@pytest.mark.parametrize("case", _CASES[2:7])  # (not _CASES[1]: one input channel, below)
def test_a_failed_first_factorisation_is_retried_at_a_higher_level(case, monkeypatch):
    """Without Cholesky levels, the first call of the factorisation is _eig_certified's first
    level: made to fail, the next levels (2 n u above λ̂, then 16 times farther) certify,
    within the Cholesky rounding terms of the former value."""
    *shape, groups = case
    op = _make(*shape, seed=sum(case) + 2, groups=groups)
    _, old = _new_and_old(op, False)
    monkeypatch.setattr(conv_mod, "_CHOL_MIN_N", 10 ** 9)
    spy, calls = _rounds_spy(fail_first=1)
    monkeypatch.setattr(conv_mod, "_cholesky_upper_neg", spy)
    new = circulant_norm_bound(op)
    assert len(calls) >= 2 and calls[-1][1] == 0  # retry rounds, the last certifies all
    assert _exact_circulant(op) <= new <= old * (1 + 1e-9)


@pytest.mark.parametrize("n", [16, 20])
def test_rank_one_spectrum_beyond_the_room(n, monkeypatch):
    """K(ω) of rank one at every frequency (W[o, c] = p_o q_c r): at n >= 16 the room
    c n u cannot hold the certificate's overhead; the value comes from a higher level, sound
    and within the Cholesky rounding terms of the former value."""
    gen = torch.Generator().manual_seed(n)
    op = _make(n, n, 3, 3, 1, 6, 6, seed=n)
    p, q = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2))
    r = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    op.weight.copy_(p[:, None, None, None] * q[None, :, None, None] * r)
    new, old = _new_and_old(op, False)
    assert _exact_circulant(op) <= new <= old * (1 + 1e-9)
    assert new != old  # (the former value is not proven here)


@pytest.mark.parametrize("case", [c for c in _CASES if min(c[0], c[1]) == 1])
def test_one_by_one_grams_are_proven_without_a_factorisation(case, monkeypatch):
    """A Gram size of 1 (one input or output channel): λmax(Ĝ) is the entry itself, so the
    former value is proven with no factorisation and no eigensolver (same bits, sound)."""
    *shape, groups = case
    op = _make(*shape, seed=sum(case) + 5, groups=groups)
    new, old = _new_and_old(op, False)
    assert new == old and _exact_circulant(op) <= new
    monkeypatch.setattr(conv_mod, "_CHOL_MIN_N", 10 ** 9)
    spy, calls = _rounds_spy(fail_first=10 ** 9)  # every factorisation would fail
    monkeypatch.setattr(conv_mod, "_cholesky_upper_neg", spy)
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: 1 / 0)  # never called
    assert circulant_norm_bound(op) == old and calls == []
