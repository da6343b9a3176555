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


def _record_start_seeds(monkeypatch) -> list[int]:
    """The seeds of the generators every local-factor computation passes to
    ``spectral_upper``, appended as the analyzer runs."""
    import lipbound.analyzer as az

    seeds: list[int] = []
    real = az.spectral_upper

    def spy(*args, **kwargs):
        seeds.append(kwargs["generator"].initial_seed())
        return real(*args, **kwargs)

    monkeypatch.setattr(az, "spectral_upper", spy)
    return seeds


def test_each_computation_of_a_layer_draws_its_own_start_vector(monkeypatch):
    """A layer's later computations on one analyzer (another radius, another input) draw
    start vectors of their own, so a computation's failure probability holds whatever
    earlier results chose its operator (an adaptive radius search, a sweep that skips);
    the first computation draws what a fresh analyzer draws."""
    seeds = _record_start_seeds(monkeypatch)
    model, shape, x0 = _small_model(widths=(60, 90, 80, 5))
    Analyzer(model, shape, spectral="lanczos", lanczos_steps=24).local_bound(x0, 0.3)
    fresh = list(seeds)
    seeds.clear()
    an = Analyzer(model, shape, spectral="lanczos", lanczos_steps=24)
    for eps in (0.3, 0.2, 0.25):
        an.local_bound(x0, eps)
    per_bound = len(fresh)
    assert len(seeds) == 3 * per_bound
    assert seeds[:per_bound] == fresh
    assert len(set(seeds)) == len(seeds)  # no start vector drawn twice
    # the same with another seed: other streams, none shared with seed 0's
    seeds.clear()
    Analyzer(model, shape, spectral="lanczos", lanczos_steps=24, seed=5).local_bound(x0, 0.3)
    assert not set(seeds) & set(fresh)


def test_a_repeated_operator_reports_the_union_bound_over_the_layer_computations():
    model, shape, x0 = _small_model(widths=(60, 90, 80, 5))
    an = Analyzer(model, shape, spectral="lanczos", lanczos_steps=24)
    first = an.local_bound(x0, 0.3)
    assert first.guarantee == Guarantee.PROBABILISTIC
    an.local_bound(x0, 0.1)
    an.local_bound(x0, 0.2)
    again = an.local_bound(x0, 0.3)  # the same masks as the first: nothing recomputed
    for a, b in zip(first.layers, again.layers, strict=True):
        assert b.local == a.local
        # which of the layer's 3 computations matches depends on earlier results
        assert b.failure_prob == (min(1.0, 3 * a.failure_prob) if a.failure_prob > 0 else 0.0)
    assert again.failure_prob >= 3 * first.failure_prob * (1 - 1e-12)


def test_a_reuse_copy_continues_the_draws_of_its_analyzer(monkeypatch):
    seeds = _record_start_seeds(monkeypatch)
    model, shape, x0 = _small_model(widths=(60, 90, 80, 5))
    an = Analyzer(model, shape, spectral="lanczos", lanczos_steps=24)
    an.local_bound(x0, 0.3)
    n = len(seeds)
    an.reuse_copy(0.02).local_bound(x0, 0.3)  # its own memory: computed again
    assert len(seeds) == 2 * n
    assert not set(seeds[:n]) & set(seeds[n:])
