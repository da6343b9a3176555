"""Adversarial review of the probabilistic upper bounds (session 22): Lanczos with the
Kuczyński–Woźniakowski bound, the a posteriori Christoffel bound, block runs, and how their
failure probabilities are combined into what a result reports.

Each test names the defect it pins and failed on the code before its fix. Statistical tests
use fixed seeds (deterministic) and state their false-alarm probability.
"""

from __future__ import annotations

import math

import pytest

from cli_helpers import run_json
from lipbound import Guarantee
from lipbound.radius import RadiusResult, best

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------ the headline radius
def _radius(method: str, radius: float, fp: float) -> RadiusResult:
    g = Guarantee.PROBABILISTIC_LOWER if fp > 0 else Guarantee.CERTIFIED_LOWER
    return RadiusResult(method, radius, g, 0, 1.0, 1e-3, 1, 0.0, failure_prob=fp)


def test_best_radius_counts_every_probabilistic_candidate():
    """Defect: ``best`` (the headline certificate of ``lipbound radius``: certified_radius,
    certified_failure_prob, the text line and radius.csv) reported the largest radius of
    the methods with *that method's* failure probability. Which method gives the largest
    radius depends on the random draws: a local radius that failed (too large) is the one
    most likely to be the largest, so ``P[headline invalid] <= sum over the probabilistic
    methods`` (a union bound), not the winner's own."""
    cands = [_radius("local", 0.05, 4e-4), _radius("margin", 0.10, 4e-4),
             _radius("global", 3e-4, 8e-4)]
    top = best(cands)
    assert top.method == "margin" and top.radius == 0.10
    assert top.guarantee == Guarantee.PROBABILISTIC_LOWER
    assert top.failure_prob >= 1.6e-3 * (1 - 1e-12)
    # the per-method results are left as they are
    assert [c.failure_prob for c in cands] == [4e-4, 4e-4, 8e-4]
    # a certified winner fails never, whatever the others
    cert = [_radius("local", 0.2, 0.0), _radius("margin", 0.1, 4e-4)]
    assert best(cert).failure_prob == 0.0
    assert best(cert).guarantee == Guarantee.CERTIFIED_LOWER
    assert best([]) is None


def test_cli_radius_headline_failure_prob_is_the_union(capsys):
    """The same defect end to end: MNIST with Lanczos forced gives three probabilistic radii
    (local and margin 4e-4 each, global 8e-4 at --failure-prob 1e-3); the headline reported
    the margin radius with 4e-4."""
    d = run_json(capsys, ["radius", "--model", "mnist", "--spectral", "lanczos",
                          "--failure-prob", "1e-3"])
    probs = [c["failure_prob"] for c in d["certified"]
             if c["guarantee"] == "probabilistic lower bound"]
    assert len(probs) >= 2
    assert d["certified_guarantee"] == "probabilistic lower bound"
    assert d["certified_failure_prob"] >= math.fsum(probs) * (1 - 1e-12)
