"""Time limits of the rival methods (lipbound.baselines.deadline) and of compare / the CLI.

A limit of 1e-9 s has always passed at a method's first check (the chain's extraction and
range check come before it), so these tests do not depend on the machine's speed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lipbound.baselines import (
    autolip,
    compare,
    eclipse_fast,
    fastlip,
    lipsdp,
    recurjac,
    seqlip,
)
from lipbound.baselines.deadline import Deadline, TimeLimitError, check_time_limit
from lipbound.errors import InputError, LipboundError
from lipbound.results import Guarantee

TINY = 1e-9


def net() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    dims = [4, 6, 5, 3]
    return [(rng.normal(size=(dims[i + 1], dims[i])), rng.normal(size=dims[i + 1]))
            for i in range(len(dims) - 1)]


X0 = np.array([0.2, -0.1, 0.4, 0.0])

RIVALS = {
    "autolip": (lambda **kw: autolip(net(), **kw), "autolip", "0 of 3 layers"),
    "seqlip": (lambda **kw: seqlip(net(), **kw), "seqlip", "the SVDs of 0 of 3 layers"),
    "eclipse": (lambda **kw: eclipse_fast(net(), **kw), "ECLipsE-Fast",
                "0 of 2 hidden layers (then a product)"),
    "fastlip": (lambda **kw: fastlip(net(), X0, 0.3, **kw), "Fast-Lip",
                "pre-activation bounds of 1 of 2 hidden layers"),
    "recurjac": (lambda **kw: recurjac(net(), X0, 0.3, **kw), "RecurJac",
                 "pre-activation bounds of 1 of 2 hidden layers"),
    "lipsdp": (lambda **kw: lipsdp(net(), **kw), "LipSDP-neuron", "0 of 2 SDP solves"),
}


@pytest.mark.parametrize("name", list(RIVALS))
def test_every_rival_stops_at_its_time_limit(name):
    run, what, done = RIVALS[name]
    with pytest.raises(TimeLimitError) as info:
        run(time_limit=TINY)
    msg = str(info.value)
    assert msg.startswith(f"{what}: time limit of 1e-09 s reached after {done} (")
    assert "no value" in msg and "--time-limit" in msg
    assert isinstance(info.value, LipboundError)


@pytest.mark.parametrize("name", list(RIVALS))
def test_a_generous_or_no_limit_changes_nothing(name):
    run, _, _ = RIVALS[name]
    free = run()
    for limit in (None, 3600.0, math.inf):
        res = run(time_limit=limit)
        assert res.guarantee is free.guarantee
        assert res.value == free.value or (math.isnan(res.value) and math.isnan(free.value))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "soon", "10", True, [1.0]])
def test_bad_time_limits_are_refused(bad):
    with pytest.raises(InputError, match="time_limit"):
        autolip(net(), time_limit=bad)
    with pytest.raises(InputError, match="time_limit"):
        compare(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(), torch.zeros(1, 4), 0.1,
                methods=["autolip"], time_limit=bad)


def test_deadline_bookkeeping():
    assert check_time_limit(None) is None and check_time_limit(math.inf) is None
    assert check_time_limit(2) == 2.0
    d = Deadline(None, "x")
    assert not d.expired() and d.remaining() == math.inf
    d.check("anything")  # never raises
    d = Deadline(1e6, "x")
    assert not d.expired() and 0 < d.remaining() <= 1e6
    d = Deadline(TINY, "thing")
    while d.elapsed() <= TINY:
        pass
    assert d.expired() and d.remaining() == 0.0
    with pytest.raises(TimeLimitError, match=r"^thing: time limit of 1e-09 s reached after "
                                             r"step 3 \("):
        d.check("step 3")


def test_lipsdp_hands_the_time_left_to_its_solver():
    from lipbound.baselines.lipsdp import _with_time_limit

    d = Deadline(100.0, "x")
    opts = _with_time_limit("CLARABEL", {"max_iter": 5}, d)
    assert opts["max_iter"] == 5 and 99.0 < opts["time_limit"] <= 100.0
    assert 99.0 < _with_time_limit("SCS", {}, d)["time_limit_secs"] <= 100.0
    assert _with_time_limit("SCS", {"time_limit_secs": 1.0}, d)["time_limit_secs"] == 1.0
    assert _with_time_limit("OTHER", {}, d) == {}
    assert _with_time_limit("CLARABEL", {}, Deadline(None, "x")) == {}


def _compnet() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                               torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()


def test_compare_time_limit_bounds_every_rival_but_not_lipbound():
    model, x0 = _compnet(), torch.zeros(1, 7)
    rows = {r.method: r for r in compare(model, x0, 0.2, time_limit=TINY)}
    for m in ("exact-l2", "recurjac", "fastlip", "autolip", "seqlip", "lipsdp-neuron",
              "lipsdp-layer", "eclipse-fast"):
        r = rows[m]
        if m == "exact-l2" and r.guarantee is not None:
            continue  # checked every 64 branch nodes: a tiny network may finish first
        assert r.guarantee is None and math.isnan(r.value), m
        assert r.note.startswith("not run: ") and "time limit of 1e-09 s" in r.note, m
    # lipMIP: HiGHS got the limit; it stops without a value (an estimate row saying so) or,
    # on a tiny MILP, finishes
    mip = rows["lipmip"]
    assert math.isnan(mip.value) or mip.guarantee.is_upper_bound
    for m in ("lower", "local", "global"):  # lipbound's own: not limited
        assert math.isfinite(rows[m].value) and rows[m].guarantee is not None, m


def test_compare_exact_time_limit_alone_keeps_its_old_meaning():
    model, x0 = _compnet(), torch.zeros(1, 7)
    rows = {r.method: r for r in compare(model, x0, 0.2, methods=["autolip", "exact-l2",
                                                                   "eclipse-fast"],
                                         exact_time_limit=30)}
    assert rows["autolip"].guarantee is Guarantee.CERTIFIED
    assert rows["eclipse-fast"].guarantee is Guarantee.CERTIFIED
    assert rows["exact-l2"].guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED)
    # and with both, the exact methods get exact_time_limit, the others time_limit
    rows = {r.method: r for r in compare(model, x0, 0.2, methods=["autolip", "exact-l2"],
                                         exact_time_limit=30, time_limit=TINY)}
    assert rows["exact-l2"].guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED)
    assert rows["autolip"].guarantee is None and "time limit" in rows["autolip"].note


def test_cli_time_limit_reaches_the_rivals(capsys):
    cli = pytest.importorskip("lipbound.cli")
    code = cli.main(["compare", "--model", "tiny", "--eps", "1", "--methods",
                     "autolip,recurjac,local", "--time-limit", "1e-9", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    by = {r["method"]: r for r in out["rows"]}
    for m in ("autolip", "recurjac"):
        assert by[m]["value"] is None and "time limit of 1e-09 s" in by[m]["note"]
    assert by["local"]["value"] is not None
    assert cli.main(["compare", "--model", "tiny", "--time-limit", "0"]) != 0
    assert "--time-limit must be" in capsys.readouterr().err



def test_lipmip_at_its_time_limit_reports_the_dual_bound_or_no_row_value(monkeypatch):
    """lipMIP stopped by its time limit (scipy's path, without highspy): with a MILP dual
    bound, that bound (mapped back from the rescaled MILP) is a certified upper bound, at least
    the exact constant; without one, a TimeLimitError (compare: a "not run" row), never a NaN
    "estimate"."""
    from scipy import optimize

    import lipbound.baselines.exact as exact_mod
    from lipbound.baselines import lipmip
    from lipbound.baselines.deadline import TimeLimitError

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6),
                              torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    c = torch.tensor([1.0, -1.0, 0.0])
    x0 = torch.randn(1, 5, generator=torch.Generator().manual_seed(1))
    exact = lipmip(net, x0, 0.7, c=c, time_limit=60, solver="scipy")
    assert exact.guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED)
    real = optimize.milp

    def stopped_with(dual):  # HiGHS's answer at a time limit, with the real dual bound
        def milp(*args, **kwargs):
            res = real(*args, **kwargs)
            return optimize.OptimizeResult(
                status=1, message="Time limit reached.", success=False, x=None, fun=None,
                mip_dual_bound=dual(res), mip_gap=None, mip_node_count=0)
        return milp

    # scipy's path, the one taken without highspy
    monkeypatch.setattr(exact_mod, "_highspy", lambda: None)
    monkeypatch.setattr(exact_mod.optimize, "milp", stopped_with(lambda r: r.mip_dual_bound))
    r = lipmip(net, x0, 0.7, c=c, time_limit=60)
    assert r.guarantee is Guarantee.CERTIFIED and "stopped at the time limit" in r.notes[-1]
    assert exact.value <= r.value <= exact.value * (1 + 1e-5)
    monkeypatch.setattr(exact_mod.optimize, "milp", stopped_with(lambda r: None))
    with pytest.raises(TimeLimitError, match="lipMIP: time limit of 60 s"):
        lipmip(net, x0, 0.7, c=c, time_limit=60)
    rows = {r.method: r for r in compare(net, x0, 0.7, methods=["lipmip"])}
    assert rows["lipmip"].note.startswith("not run: lipMIP: time limit")
    assert math.isnan(rows["lipmip"].value) and rows["lipmip"].guarantee is None
