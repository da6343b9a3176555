"""Reuse of layer factors across bounds (Analyzer._reuse): sound by brute force, and a reused
factor of a dominating operator is never below what a fresh computation gives.

A layer factor bounds ``||R A D||``; the analyzer remembers the masks (r, d) it was computed
for. Reuse (a) of the very same operator must return the same value as a fresh computation;
(b) of a dominating operator (``r <= r'``, ``d <= d'``) is allowed when ``reuse_tol > 0``.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings

from core_helpers import build, conv_specs, fc_specs, local_lower_bound, n_examples
from lipbound import Analyzer, Guarantee

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _reused(res) -> list[str]:
    return [lf.spectral_method for lf in res.layers if lf.spectral_method.startswith("reused")]


def _check(spec: dict) -> None:
    model, shape, x0 = build(spec)
    eps = spec["eps"]
    radii = [eps * 4.0, eps, eps / 3.0, eps / 30.0]
    lows = {e: local_lower_bound(model, x0, e, spec["seed"] + k, n_samples=300,
                                 ascent_starts=3, ascent_steps=12)[0]
            for k, e in enumerate(radii)}
    for mode in ("exact", "lanczos"):
        fresh = {e: Analyzer(model, shape, spectral=mode, lanczos_steps=spec["lanczos_steps"],
                             seed=3).local_bound(x0, e) for e in radii}
        an = Analyzer(model, shape, spectral=mode, lanczos_steps=spec["lanczos_steps"], seed=3)
        an.reuse_tol = math.inf  # reuse any dominating factor
        for q, e in enumerate(radii, start=1):  # largest first: later operators are dominated
            res = an.local_bound(x0, e)
            assert res.value >= lows[e], (mode, e, res.value, lows[e])
            assert res.guarantee.is_upper_bound
            if res.guarantee == Guarantee.CERTIFIED:
                assert res.failure_prob == 0.0
            else:
                # a reused factor carries a union bound over the layer's q queries so far
                assert 0.0 < res.failure_prob <= q * an.failure_prob * (1 + 1e-9)
                for lf in res.layers:
                    if lf.spectral_method == "reused lanczos":
                        delta = an.failure_prob / an._n_spectral(an.blocks)
                        assert q >= 2 and lf.failure_prob >= q * delta * (1 - 1e-9), (q, lf)
            if mode == "exact":
                # exact factors are monotone in the masks: reusing a dominating one can only
                # give a larger (never a smaller) bound than a fresh computation
                assert res.value >= fresh[e].value * (1 - 1e-9), (e, res.value, fresh[e].value)
        # the same query again reuses every factor and returns the same value
        again = an.local_bound(x0, radii[-1])
        assert again.value == res.value


@settings(max_examples=n_examples(40), deadline=None)
@given(spec=fc_specs())
def test_reuse_is_sound_on_fully_connected_networks(spec):
    _check(spec)


@settings(max_examples=n_examples(20), deadline=None)
@given(spec=conv_specs())
def test_reuse_is_sound_on_convolutional_networks(spec):
    _check(spec)


def test_identical_operator_reuse_gives_the_fresh_value():
    spec = {"kind": "fc", "seed": 11, "eps": 0.3, "lanczos_steps": 8}
    model, shape, x0 = _small_model()
    for mode in ("exact", "lanczos"):
        an = Analyzer(model, shape, spectral=mode, lanczos_steps=8, seed=5)
        first = an.local_bound(x0, spec["eps"])
        second = an.local_bound(x0, spec["eps"])
        fresh = Analyzer(model, shape, spectral=mode, lanczos_steps=8,
                         seed=5).local_bound(x0, spec["eps"])
        assert second.value == first.value == fresh.value
        assert [lf.local for lf in second.layers] == [lf.local for lf in fresh.layers]
        assert not _reused(first) and not _reused(second)  # identical: no "reused" label


def test_dominating_reuse_is_labelled_and_off_by_default():
    model, shape, x0 = _small_model()
    an = Analyzer(model, shape, spectral="exact")
    big = an.local_bound(x0, 2.0)
    small = an.local_bound(x0, 0.05)
    assert not _reused(small)  # reuse_tol = 0 by default
    an2 = Analyzer(model, shape, spectral="exact")
    an2.reuse_tol = math.inf
    an2.local_bound(x0, 2.0)
    small2 = an2.local_bound(x0, 0.05)
    assert _reused(small2)
    assert small2.value >= small.value * (1 - 1e-9)
    assert big.value >= small.value * (1 - 1e-9)
    assert math.isfinite(small2.value)


def _small_model(widths=(6, 12, 9, 3)):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    mods = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        mods += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*mods[:-1]).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x0 = torch.randn(1, widths[0], generator=g, dtype=torch.float64)
    return model, (widths[0],), x0


def test_factors_of_other_settings_are_not_reused():
    model, shape, x0 = _small_model(widths=(60, 90, 80, 5))
    an = Analyzer(model, shape, spectral="lanczos", lanczos_steps=24, seed=1)
    first = an.local_bound(x0, 0.3)
    assert first.guarantee == Guarantee.PROBABILISTIC
    an.spectral = "exact"
    exact = an.local_bound(x0, 0.3)
    assert exact.guarantee == Guarantee.CERTIFIED
    fresh = Analyzer(model, shape, spectral="exact").local_bound(x0, 0.3)
    assert exact.value == fresh.value
    an.spectral = "lanczos"
    an.seed = 2
    other_seed = an.local_bound(x0, 0.3)
    assert other_seed.value == Analyzer(model, shape, spectral="lanczos", lanczos_steps=24,
                                        seed=2).local_bound(x0, 0.3).value
