"""A probabilistic radius whose re-checks fail (or confirm less) falls back on a pass of the
search that needs no re-check (a deterministic bound), instead of 0 or a smaller radius.

The tests replace the local test by a fake whose outcome depends only on ``eps`` and on which
analyzer runs it (the search's, or the k-th independent twin of a re-check), so the trace is
known: deterministic (``CERTIFIED``) passes below ``det``, probabilistic passes below ``root``
for the search, and the twins' own thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipbound import Analyzer
from lipbound import radius as rad
from lipbound.results import Guarantee


def _fake(an: Analyzer, det: float, root: float, twin_root: float | None, seen: list):
    def test(a, pb, eps):
        k = (a.seed - an.seed) // 1_000_003  # 0: the search, k >= 1: the k-th twin
        seen.append((k, eps))
        if k == 0:
            ratio = eps / root
            g = Guarantee.CERTIFIED if eps < det else Guarantee.PROBABILISTIC
            fp = 0.0 if g == Guarantee.CERTIFIED else 1e-6
        else:
            # a twin whose fresh draws give a larger bound: its root is twin_root (None:
            # every twin fails, by a finite ratio, so the backoff lowers eps each time)
            ratio = eps / twin_root if twin_root is not None else 50.0
            g, fp = Guarantee.PROBABILISTIC, 1e-6
        return rad._Eval(eps, ratio < 1, ratio, ratio, g, fp, 0)
    return test


def _setup(monkeypatch, det, root, twin_root):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    an = Analyzer(net, (3,), seed=11)
    seen: list = []
    monkeypatch.setitem(rad._TESTS, "local", _fake(an, det, root, twin_root, seen))
    return an, seen


def test_failed_rechecks_fall_back_on_the_largest_deterministic_pass(monkeypatch):
    """Fails before the change: the radius was 0 ("re-checks ... did not confirm")."""
    det, root = 0.004, 0.01
    an, seen = _setup(monkeypatch, det, root, None)
    r = rad.certified_radius(an, torch.zeros(1, 3, dtype=torch.float64), method="local")
    checks = r.details["rechecks"]
    assert checks and not any(c["passed"] for c in checks)
    search_passes = [e for k, e in seen if k == 0 and e < root]
    det_passes = [e for e in search_passes if e < det]
    assert det_passes and max(search_passes) > det  # the search's final was probabilistic
    assert r.radius == max(det_passes) > 0
    assert r.radius < det
    assert r.guarantee == Guarantee.CERTIFIED_LOWER
    assert r.failure_prob == 0.0
    assert "deterministic" in r.details["fallback"]
    assert "reason" not in r.details


def test_a_larger_deterministic_pass_beats_a_smaller_confirmed_radius(monkeypatch):
    """Fails before the change: the twin's confirmation at about half the root was reported
    (probabilistic) although the search had passed at 0.8 root with a deterministic bound."""
    det, root = 0.0085, 0.01
    an, seen = _setup(monkeypatch, det, root, 0.5 * root)
    r = rad.certified_radius(an, torch.zeros(1, 3, dtype=torch.float64), method="local",
                             start=0.8 * root)
    checks = r.details["rechecks"]
    assert checks[-1]["passed"] and checks[-1]["eps"] < 0.5 * root
    assert r.radius == max(e for k, e in seen if k == 0 and e < det) >= 0.8 * root
    assert r.guarantee == Guarantee.CERTIFIED_LOWER and r.failure_prob == 0.0
    assert "confirmed" in r.details["fallback"]


def test_a_confirmed_radius_above_every_deterministic_pass_is_kept(monkeypatch):
    """The rule does not lower a confirmed radius: deterministic passes only at the start."""
    det, root = 1e-5, 0.01
    an, seen = _setup(monkeypatch, det, root, 0.9 * root)
    r = rad.certified_radius(an, torch.zeros(1, 3, dtype=torch.float64), method="local")
    checks = r.details["rechecks"]
    assert checks[-1]["passed"]
    assert r.radius == checks[-1]["eps"] > det
    assert r.guarantee == Guarantee.PROBABILISTIC_LOWER
    assert r.failure_prob == pytest.approx(math.fsum(c["failure_prob"] for c in checks))
    assert "fallback" not in r.details


def test_no_deterministic_pass_and_no_confirmation_is_still_zero(monkeypatch):
    det, root = 0.0, 0.01  # every pass of the search is probabilistic
    an, _ = _setup(monkeypatch, det, root, None)
    r = rad.certified_radius(an, torch.zeros(1, 3, dtype=torch.float64), method="local")
    assert r.radius == 0.0
    assert "did not confirm" in r.details["reason"]
