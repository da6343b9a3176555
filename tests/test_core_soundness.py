"""Soundness of the core bounds by brute force on hundreds of random small float64 networks.

For every random network, input x0 and radius eps (log-uniform in [1e-3, 10]), and for each
spectral route ("exact", "lanczos", "auto"):

* local bound >= every ratio ||f(x)-f(x0)||/||x-x0|| found by dense sampling in the ball
  (volume-uniform, on the sphere, tiny radii, Jacobian directions) and by projected gradient
  ascent, and >= the Jacobian spectral norm at x0 (x0 is generic: random);
* global bound >= ratios of random pairs anywhere and Jacobian norms at random points, and
  >= the local lower bound;
* local <= global on the same Analyzer (when both are comparable), and the guarantees and
  failure probabilities are consistent.

No tolerance is ever given to a bound: the sampled ratios are computed by propagating the
perturbation (core_helpers.diff_forward), accurate to ~1e-14 relative, so the bounds' own
1e-9 safety margin is not eaten by the test's rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from core_helpers import (
    build,
    build_conv,
    conv_specs,
    fc_specs,
    jacobian,
    jacobian_jacrev,
    local_lower_bound,
    n_examples,
    pair_lower_bound,
    spectral_norm,
)
from lipbound import Analyzer, Guarantee

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BUDGET = 1e-6
MODES = ("exact", "lanczos", "auto")
PROBABILISTIC_METHODS = ("lanczos", "block-lanczos")


def _check_layers_metadata(res, mode: str) -> None:
    for lf in res.layers:
        if lf.guarantee == Guarantee.CERTIFIED:
            assert lf.failure_prob == 0.0, lf
            assert lf.spectral_method not in PROBABILISTIC_METHODS, lf
        else:
            assert lf.guarantee == Guarantee.PROBABILISTIC, lf
            assert lf.spectral_method in PROBABILISTIC_METHODS, lf
            assert 0.0 < lf.failure_prob <= BUDGET, lf
        if mode == "exact":
            assert lf.guarantee == Guarantee.CERTIFIED, lf
            assert lf.spectral_method not in PROBABILISTIC_METHODS, lf


def _check_metadata(res, mode: str, *, fresh: bool) -> None:
    """Guarantee and failure probability of a result are consistent with its layers.

    ``fresh``: the result is the plain layer-wise product (no global bound computed yet)."""
    assert res.guarantee in (Guarantee.CERTIFIED, Guarantee.PROBABILISTIC)
    assert res.guarantee.is_upper_bound
    assert math.isfinite(res.value) and res.value >= 0
    if res.guarantee == Guarantee.CERTIFIED:
        assert res.failure_prob == 0.0
    else:
        assert res.failure_prob > 0.0
    if mode in ("exact", "auto"):
        # every layer of these tiny networks is cheap enough for the exact SVD
        assert res.guarantee == Guarantee.CERTIFIED, res
    _check_layers_metadata(res, mode)
    if fresh:
        probs = [lf.failure_prob for lf in res.layers if lf.guarantee == Guarantee.PROBABILISTIC]
        if probs:
            assert res.guarantee == Guarantee.PROBABILISTIC
            assert res.failure_prob >= sum(probs) * (1 - 1e-12)
            assert res.failure_prob <= BUDGET * (1 + 1e-9)
        else:
            assert res.guarantee == Guarantee.CERTIFIED
        prod = math.prod(lf.local for lf in res.layers)
        assert res.value == pytest.approx(prod, rel=1e-12)


def _comparable(local, glob) -> bool:
    """local <= global is promised unless a certified local meets a probabilistic global."""
    return not (local.guarantee == Guarantee.CERTIFIED
                and glob.guarantee == Guarantee.PROBABILISTIC)


def check_network(spec: dict) -> None:
    model, shape, x0 = build(spec)
    eps = spec["eps"]
    eps2 = eps / 7.0
    seed = spec["seed"]
    heavy = spec["kind"] == "conv"
    lo, info = local_lower_bound(model, x0, eps, seed, n_samples=1200 if heavy else 1500,
                                 ascent_starts=6 if heavy else 8,
                                 ascent_steps=20 if heavy else 30)
    lo2, info2 = local_lower_bound(model, x0, eps2, seed + 1, n_samples=300, ascent_starts=3,
                                   ascent_steps=15)
    pair_lo = pair_lower_bound(model, shape, seed + 2)
    for mode in MODES:
        an = Analyzer(model, shape, spectral=mode, lanczos_steps=spec["lanczos_steps"],
                      failure_prob=BUDGET, seed=seed % 997)
        fresh = an.local_bound(x0, eps)
        glob = an.global_bound()
        loc = an.local_bound(x0, eps)
        loc2 = an.local_bound(x0, eps2)  # warm-started from the previous Lanczos vectors
        what = f"mode={mode} eps={eps:.3g}"
        # soundness: no tolerance
        assert fresh.value >= lo, (what, fresh.value, info)
        assert loc.value >= lo, (what, loc.value, info)
        assert loc2.value >= lo2, (what, "eps/7", loc2.value, info2)
        assert glob.value >= lo, (what, glob.value, info)
        assert glob.value >= pair_lo, (what, glob.value, pair_lo)
        # local <= global on the same analyzer
        for res in (loc, loc2):
            if _comparable(res, glob):
                assert res.value <= glob.value, (what, res.value, glob.value)
        if mode == "exact":
            for lf in loc.layers:
                assert lf.local <= lf.global_factor, (what, lf)
        # metadata
        _check_metadata(fresh, mode, fresh=True)
        _check_metadata(loc, mode, fresh=False)
        _check_metadata(loc2, mode, fresh=False)
        _check_metadata(glob, mode, fresh=False)
        assert glob.eps is None and loc.eps == eps and loc2.eps == eps2
        assert len(glob.layers) == len(an.blocks) == len(loc.layers)


@settings(max_examples=n_examples(150))
@given(spec=fc_specs())
def test_fully_connected_networks_are_bounded(spec):
    check_network(spec)


@settings(max_examples=n_examples(100))
@given(spec=conv_specs())
def test_convolutional_networks_are_bounded(spec):
    check_network(spec)


def test_tight_single_layer_examples():
    """Networks whose true local constant equals the bound (up to the safety margin): the
    sampled lower bound must still not exceed it (this is where a missing margin shows)."""
    g = torch.Generator().manual_seed(3)
    for n_in, n_out in [(1, 1), (1, 4), (5, 1), (6, 3), (3, 7)]:
        lin = nn.Linear(n_in, n_out).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=torch.float64))
        model = nn.Sequential(lin).eval()
        x0 = torch.randn(1, n_in, generator=g, dtype=torch.float64)
        norm = spectral_norm(lin.weight.detach())
        for eps in (1e-3, 0.3, 10.0):
            lo, info = local_lower_bound(model, x0, eps, seed=n_in * 10 + n_out)
            for mode in MODES:
                res = Analyzer(model, (n_in,), spectral=mode).local_bound(x0, eps)
                assert res.value >= lo, (mode, res.value, info)
                assert res.value >= norm
        # an always-active ReLU layer: Linear(n, 1) -> ReLU -> Linear(1, m) is tight
        a = nn.Linear(n_in, 1).double()
        b = nn.Linear(1, n_out).double()
        with torch.no_grad():
            a.bias.fill_(100.0)
        model = nn.Sequential(a, nn.ReLU(), b).eval()
        true = spectral_norm(a.weight.detach()) * spectral_norm(b.weight.detach())
        lo, info = local_lower_bound(model, x0, 0.5, seed=1)
        for mode in MODES:
            res = Analyzer(model, (n_in,), spectral=mode).local_bound(x0, 0.5)
            assert res.value >= lo, (mode, res.value, info)
            assert res.value >= true


def test_tight_max_pooling_factor():
    """A scalar 1x1 convolution followed by an overlapping max pool: the pool's constant
    sqrt(9) = 3 is attained (the Jacobian at x0 has norm 3 |a| when an interior element is the
    max of its 5x5 neighbourhood), so an underestimated pool constant is caught here."""
    conv = nn.Conv2d(1, 1, 1).double()
    with torch.no_grad():
        conv.weight.fill_(-1.7)
        conv.bias.fill_(0.25)
    model = nn.Sequential(conv, nn.MaxPool2d(3, 1, 1)).eval()
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x0[0, 0, 4, 4] = -10.0  # after the negative scaling: the max of all 9 windows holding it
    assert spectral_norm(jacobian(model, x0)) == pytest.approx(1.7 * 3, rel=1e-12)
    for eps in (1e-3, 0.1, 5.0):
        lo, info = local_lower_bound(model, x0, eps, seed=3, n_samples=600)
        for mode in MODES:
            an = Analyzer(model, (1, 8, 8), spectral=mode, lanczos_steps=16)
            res = an.local_bound(x0, eps)
            assert res.value >= lo, (mode, eps, res.value, info)
            assert an.global_bound().value >= lo


def test_failure_prob_budget_covers_every_probabilistic_layer():
    """The Analyzer's failure_prob is the total budget of a result: every layer that reports a
    probabilistic factor must be paid from it (here a ReLU right after a max pool forms a
    block without a mixing op, whose factor is also computed by Lanczos)."""
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    lin = nn.Linear(72, 3).double()
    with torch.no_grad():
        for p in (*conv.parameters(), *lin.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    model = nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), lin).eval()
    x0 = torch.randn(1, 1, 12, 12, generator=g, dtype=torch.float64)
    an = Analyzer(model, (1, 12, 12), spectral="lanczos", lanczos_steps=16,
                  failure_prob=BUDGET)
    for eps in (0.05, 0.5):
        res = an.local_bound(x0, eps)
        assert res.failure_prob >= sum(lf.failure_prob for lf in res.layers) * (1 - 1e-12)
        assert res.failure_prob <= BUDGET * (1 + 1e-9), [
            (lf.name, lf.spectral_method, lf.failure_prob) for lf in res.layers]


def test_auto_uses_lanczos_on_a_big_layer_and_stays_sound():
    """A layer too big for the exact SVD budget: "auto" falls back to Lanczos (probabilistic,
    failure probability reported) and the bound still holds."""
    g = torch.Generator().manual_seed(11)
    l1, l2 = nn.Linear(600, 1500).double(), nn.Linear(1500, 10).double()
    with torch.no_grad():
        l1.weight.copy_(torch.randn(1500, 600, generator=g, dtype=torch.float64) / 20)
        l1.bias.copy_(torch.randn(1500, generator=g, dtype=torch.float64) * 0.5)
        l2.weight.copy_(torch.randn(10, 1500, generator=g, dtype=torch.float64) / 30)
    model = nn.Sequential(l1, nn.ReLU(), l2).eval()
    x0 = torch.randn(1, 600, generator=g, dtype=torch.float64)
    an = Analyzer(model, (600,), spectral="auto", failure_prob=BUDGET)
    glob = an.global_bound()
    assert glob.layers[0].spectral_method in (*PROBABILISTIC_METHODS, "frobenius")
    true_global = spectral_norm(l1.weight.detach()) * spectral_norm(l2.weight.detach())
    assert glob.value >= true_global
    if glob.layers[0].spectral_method in PROBABILISTIC_METHODS:
        assert glob.guarantee == Guarantee.PROBABILISTIC
        assert 0 < glob.failure_prob <= BUDGET * (1 + 1e-9)
    for eps in (0.01, 1.0):
        fresh = Analyzer(model, (600,), spectral="auto").local_bound(x0, eps)
        loc = an.local_bound(x0, eps)
        lo, info = local_lower_bound(model, x0, eps, seed=5, n_samples=600, ascent_starts=4)
        assert fresh.value >= lo, info
        assert loc.value >= lo, info
        _check_metadata(fresh, "lanczos", fresh=True)


def test_failure_prob_of_local_min_global_counts_both():
    """A probabilistic local product replaced by a smaller probabilistic global bound (computed
    earlier on the same Analyzer): the reported number is min(local, global), which fails if
    *either* fails, so its failure probability is at most the sum of both -- and the reported
    one must be at least that sum (the selection depends on both random draws)."""
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(60, 50).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
    model = nn.Sequential(lin).eval()
    x0 = torch.randn(1, 60, generator=g, dtype=torch.float64)
    an = Analyzer(model, (60,), spectral="lanczos", lanczos_steps=16, failure_prob=BUDGET)
    glob = an.global_bound()
    loc = an.local_bound(x0, 0.1)
    assert loc.value >= spectral_norm(lin.weight)
    local_fp = sum(lf.failure_prob for lf in loc.layers)
    assert glob.guarantee == Guarantee.PROBABILISTIC and local_fp > 0
    if any("global bound was smaller" in n for n in loc.notes):
        assert loc.value == glob.value
        assert loc.failure_prob >= (local_fp + glob.failure_prob) * (1 - 1e-12), (
            loc.failure_prob, local_fp, glob.failure_prob)


def test_jacobian_helper_matches_jacrev():
    """The batched-autograd Jacobian used above agrees with torch.func.jacrev."""
    for seed in range(4):
        spec = dict(kind="conv", seed=seed, c_in=2, h=6, w=5, normalize=True,
                    convs=[dict(out=4, k=3, s=1, p=1, d=1, groups_idx=1, bias=True,
                                bn_before=False, bn_after=True, relu=True, dropout=True,
                                pool=("max", 2, None, 0, 1, True), relu_after_pool=False)],
                    flatten="view", hidden=5, n_out=3, gain=1.0, bias_scale=1.0,
                    x_scale=1.0, eps=0.1, lanczos_steps=8)
        model, _, x0 = build_conv(spec)
        a, b = jacobian(model, x0), jacobian_jacrev(model, x0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
