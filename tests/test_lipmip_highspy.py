"""lipMIP through highspy (the ``mip`` extra) and through scipy (the fallback).

highspy reports HiGHS's MILP dual bound at the time limit even before HiGHS has a feasible
point; scipy 1.17's ``milp`` returns none then, so on a network of a few hundred hidden units
lipMIP at its time limit was never run. Checked here: both paths give the same optimum, equal
to a brute-force enumeration of the patterns; the dual bound at a time limit is at least the
exact constant and every sampled gradient norm; the feasible start really is feasible (and is
not passed when it is not); without highspy the scipy path is taken.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import sparse

import lipbound.baselines.exact as exact_mod
from lipbound.baselines import lipmip
from lipbound.baselines.deadline import TimeLimitError
from lipbound.errors import InputError, LipboundError
from lipbound.results import Guarantee
from test_baselines import enumerate_box_gradients, random_layers

needs_highspy = pytest.mark.skipif(exact_mod._highspy() is None,
                                   reason="highspy (the mip extra) is not installed")


def _sampled(layers: list, c: np.ndarray, x0: np.ndarray, eps: float, dual: str,
             n: int = 2000, seed: int = 0) -> float:
    """Largest dual norm of the gradient of c^T f at random points of the box (a lower
    bound on lipMIP's quantity, from float64 forward passes)."""
    rng = np.random.default_rng(seed)
    xs = x0 + eps * (2 * rng.random((n, x0.size)) - 1)
    g = np.broadcast_to(c @ layers[-1][0], (n, layers[-1][0].shape[1])).copy()
    zs, h = [], xs
    for w, b in layers[:-1]:
        z = h @ w.T + b
        zs.append(z)
        h = np.maximum(z, 0.0)
    for (w, _), z in zip(reversed(layers[:-1]), reversed(zs), strict=True):
        g = (g * (z > 0)) @ w
    a = np.abs(g)
    return float((a.sum(axis=1) if dual == "l1" else a.max(axis=1)).max())


@needs_highspy
@pytest.mark.parametrize("input_norm", ["linf", "l1"])
def test_highspy_and_scipy_agree_with_pattern_enumeration(input_norm):
    dual = "l1" if input_norm == "linf" else "linf"
    rng = np.random.default_rng(11)
    nonzero = 0
    for _ in range(5):
        dims = [int(rng.integers(2, 4)), int(rng.integers(2, 5)), int(rng.integers(1, 4)),
                int(rng.integers(1, 4))]
        layers = random_layers(int(rng.integers(1 << 30)), dims)
        x0, c = rng.normal(size=dims[0]), rng.normal(size=dims[-1])
        eps = float(rng.choice([0.3, 1.0, 3.0]))
        rh = lipmip(layers, x0, eps, c=c, input_norm=input_norm, solver="highspy")
        rs = lipmip(layers, x0, eps, c=c, input_norm=input_norm, solver="scipy")
        assert "via highspy" in " ".join(rh.notes) and "via scipy" in " ".join(rs.notes)
        for r in (rh, rs):
            assert r.guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED)
        assert abs(rh.value - rs.value) <= 1e-7 * max(rs.value, 1e-12)
        want = enumerate_box_gradients(layers, c, x0, eps, dual)
        assert want <= rh.value <= want * (1 + 1e-5) + 1e-9
        assert _sampled(layers, c, x0, eps, dual) <= rh.value
        nonzero += want > 0
    assert nonzero >= 3  # the reference is not trivially zero


@needs_highspy
def test_tiny_matrix_entries_are_accepted():
    """Entries below HiGHS's 1e-9 (which it drops with a warning, not an error): the highspy
    path runs and agrees with scipy's (found on a converted conv net, where passModel's
    warning was first taken for a refusal)."""
    layers = random_layers(6, [3, 4, 3, 1])
    layers[1][0][0, :2] = [3e-12, -2e-11]
    x0 = np.array([0.1, 0.4, -0.3])
    rh = lipmip(layers, x0, 0.5, solver="highspy")
    rs = lipmip(layers, x0, 0.5, solver="scipy")
    assert abs(rh.value - rs.value) <= 1e-7 * rs.value
    want = enumerate_box_gradients(layers, np.ones(1), x0, 0.5, "l1")
    assert want <= rh.value <= want * (1 + 1e-5) + 1e-9


def test_tiny_matrix_entries_are_relaxed_not_dropped():
    """HiGHS ignores constraint entries below 1e-9, solving a different MILP whose maximum
    need not bound the true one. lipbound drops them itself and widens each such row by the
    most the dropped terms can contribute (a relaxation): every row of the model's MILP holds
    on every point of the posed one's bounds that satisfies the posed row."""
    layers = random_layers(6, [3, 4, 3, 1])
    layers[1][0][0, :2] = [3e-12, -2e-11]
    milp = exact_mod._LipMip(layers, np.array([0.1, 0.4, -0.3]), 0.5, "l1")
    cons = milp.constraints()
    mat = sparse.csr_array(cons.A)
    assert not np.any((mat.data != 0) & (np.abs(mat.data) <= exact_mod._MIP_SMALL))
    lb, ub = np.array(milp.lb), np.array(milp.ub)
    widened = 0
    for i, (coef, lo_i, hi_i) in enumerate(milp.rows):
        small = {j: v for j, v in coef.items() if 0 < abs(v) <= exact_mod._MIP_SMALL}
        most = sum(abs(v) * max(abs(lb[j]), abs(ub[j])) for j, v in small.items())
        assert cons.lb[i] <= lo_i - most and cons.ub[i] >= hi_i + most
        widened += bool(small)
    assert widened >= 1


def _stopped(layers, x0, eps, limits, **kw):
    """lipmip at the first of ``limits`` (s) at which HiGHS stops on its time limit with a
    dual bound (an earlier one may end before the root LP: a TimeLimitError)."""
    for tl in limits:
        try:
            r = lipmip(layers, x0, eps, time_limit=tl, **kw)
        except TimeLimitError:
            continue
        if any("stopped at the time limit" in n for n in r.notes):
            return r
    pytest.fail(f"HiGHS never stopped at a time limit with a dual bound: {limits}")


def _abs_product(layers: list) -> float:
    """``|| |W_1|^T ... |W_{K-1}|^T |w_K| ||_1``: an upper bound on every gradient's l1 norm
    that the MILP's relaxation never exceeds (its variable bounds are interval bounds)."""
    g = np.abs(layers[-1][0][0])
    for w, _ in reversed(layers[:-1]):
        g = np.abs(w).T @ g
    return float(g.sum())


@needs_highspy
@pytest.mark.parametrize("scaled", [False, True])
def test_time_limit_dual_bound_is_at_least_the_exact_constant(scaled):
    """A net HiGHS solves in about a second, stopped early: the dual bound is a certified
    upper bound, at least the optimal run's value (and the sampled gradients), and at most
    the |W| product. Scaled: layers times 2^12, 2^-7, 2^-9 (biases to match), so the
    function is 2^-4 f and the MILP's rescaling shift differs from the plain net's."""
    layers = random_layers(1, [8, 16, 16, 1])
    x0 = np.random.default_rng(101).normal(size=8)
    exact = lipmip(layers, x0, 0.5, solver="scipy", time_limit=120)
    assert exact.guarantee is Guarantee.EXACT
    assert _sampled(layers, np.ones(1), x0, 0.5, "l1") <= exact.value
    want, cap = exact.value, _abs_product(layers)
    if scaled:
        layers = [(np.ldexp(w, e), np.ldexp(b, cum)) for (w, b), e, cum
                  in zip(layers, (12, -7, -9), (12, 5, -4), strict=True)]
        want, cap = math.ldexp(want, -4), math.ldexp(cap, -4)
    r = _stopped(layers, x0, 0.5, (0.02, 0.1, 0.3), solver="highspy")
    assert r.guarantee is Guarantee.CERTIFIED
    assert want <= r.value <= cap * (1 + 1e-5)


@needs_highspy
def test_time_limit_on_a_300_unit_net_gives_a_certified_bound_not_an_error():
    """10-100-100-100-1 at eps 0.5: scipy's milp has no dual bound at 1 s (no feasible point:
    TimeLimitError, the old behaviour); highspy reports one, with the incumbent from the
    start point as a verified lower-bound witness below it."""
    layers = random_layers(0, [10, 100, 100, 100, 1])
    x0 = np.random.default_rng(1).normal(size=10)
    r = _stopped(layers, x0, 0.5, (1.0, 3.0), max_hidden=300)
    assert r.guarantee is Guarantee.CERTIFIED and "via highspy" in " ".join(r.notes)
    low = _sampled(layers, np.ones(1), x0, 0.5, "l1", n=4000)
    assert 0 < low <= r.value <= _abs_product(layers) * (1 + 1e-5)
    witness = [n for n in r.notes if "is at least" in n]
    assert witness, r.notes
    at_least = float(witness[0].split("is at least ")[1].split(" ")[0])
    assert at_least <= r.value
    # the x0 pattern's gradient is one of the witnesses HiGHS had: its value is at most the
    # incumbent's
    start_grad = _sampled(layers, np.ones(1), x0, 1e-300, "l1", n=1)
    assert start_grad <= at_least * (1 + 1e-9)


def test_without_highspy_the_scipy_path_is_taken(monkeypatch):
    """``import highspy`` failing: "auto" uses scipy (same value as before), "highspy" is an
    InputError that says what to install."""
    monkeypatch.setitem(sys.modules, "highspy", None)  # import highspy -> ImportError
    assert exact_mod._highspy() is None
    layers = random_layers(3, [3, 4, 3, 2])
    x0, c = np.array([0.2, -0.1, 0.4]), np.array([1.0, -1.0])
    r = lipmip(layers, x0, 0.5, c=c)
    assert "via scipy" in " ".join(r.notes)
    assert r.guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED)
    want = enumerate_box_gradients(layers, c, x0, 0.5, "l1")
    assert want <= r.value <= want * (1 + 1e-5) + 1e-9
    with pytest.raises(InputError, match="highspy"):
        lipmip(layers, x0, 0.5, c=c, solver="highspy")
    with pytest.raises(InputError, match="solver must be"):
        lipmip(layers, x0, 0.5, c=c, solver="gurobi")  # type: ignore[arg-type]


def _milp(layers, x0, eps, dual):
    """The MILP lipmip builds (on the unscaled network: feasibility does not need the
    scaling) and its start point at x0."""
    m = exact_mod._LipMip(layers, x0, eps, dual)
    return m, m.start(x0)


@pytest.mark.parametrize("dual", ["l1", "linf"])
def test_start_point_is_feasible_and_has_the_gradient_at_x0(dual):
    """Checked here without _LipMip.violation: every bound, every row of the constraint
    matrix and integrality, in float64, and the objective equals the dual norm of the
    gradient at x0 computed by a separate backward pass."""
    rng = np.random.default_rng(5)
    for trial in range(8):
        dims = [int(rng.integers(2, 6)), int(rng.integers(2, 9)), int(rng.integers(2, 9)), 1]
        layers = random_layers(int(rng.integers(1 << 30)), dims)
        x0 = rng.normal(size=dims[0])
        eps = float(rng.choice([0.01, 0.3, 2.0]))  # small eps: many units fixed
        m, sol = _milp(layers, x0, eps, dual)
        lb, ub = np.array(m.lb), np.array(m.ub)
        assert np.all(sol >= lb - 1e-12) and np.all(sol <= ub + 1e-12), trial
        ints = np.array(m.integer, dtype=bool)
        assert np.array_equal(sol[ints], np.round(sol[ints]))
        con = m.constraints()
        act = sparse.csr_array(con.A) @ sol
        assert np.all(act >= con.lb - 1e-12) and np.all(act <= con.ub + 1e-12), trial
        assert m.violation(sol) <= 1e-12
        value = _sampled(layers, np.ones(1), x0, 1e-300, dual, n=1)  # gradient at x0
        assert math.isclose(float(m.objective() @ sol), value, rel_tol=1e-12, abs_tol=1e-14)


@needs_highspy
def test_an_infeasible_start_is_not_passed(monkeypatch):
    highspy = exact_mod._highspy()
    calls = []
    real = highspy.Highs.setSolution

    def spy(self, *args):
        calls.append(args)
        return real(self, *args)

    monkeypatch.setattr(highspy.Highs, "setSolution", spy)
    layers = random_layers(4, [3, 5, 4, 1])
    x0 = np.array([0.3, -0.2, 0.1])
    good = lipmip(layers, x0, 0.4, solver="highspy")
    assert len(calls) == 1  # the start was feasible and passed
    calls.clear()
    monkeypatch.setattr(exact_mod._LipMip, "violation", lambda self, sol: 1e-3)
    bad = lipmip(layers, x0, 0.4, solver="highspy")
    assert calls == []  # refused by the float64 check
    assert bad.value == pytest.approx(good.value, rel=1e-7)
    assert bad.guarantee is good.guarantee


def _run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python process (a process's first Highs() prints the banner),
    with this one's import path; its stdout and stderr captured."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=True)


@needs_highspy
def test_highspy_prints_no_banner_on_stdout():
    """HiGHS prints a banner on the C stdout at the first Highs() of a process; it would
    corrupt ``lipbound compare --json``."""
    code = ("import numpy as np\nfrom lipbound.baselines import lipmip\n"
            "r = lipmip([(np.eye(2), np.zeros(2)), (np.ones((1, 2)), np.zeros(1))], "
            "np.ones(2), 0.5, solver='highspy')\nprint(r.guarantee.name)\n")
    out = _run_python(code)
    assert out.stdout == "EXACT\n", out.stdout


def _tiny_gradient_net(t: float) -> list:
    """f(x) = relu(t relu(x) + 1/2) on x in [-1, 1] (a dead second unit keeps each layer's
    largest weight 1): the constant is t, attained for x > 0, and the interval bounds
    know it (no unit of layer 2 is undecided)."""
    return [(np.array([[1.0], [-1.0]]), np.zeros(2)),
            (np.array([[t, 0.0], [0.0, 1.0]]), np.array([0.5, -5.0])),
            (np.array([[1.0, 0.0]]), np.zeros(1))]


@pytest.mark.parametrize("solver", ["highspy", "scipy"])
@pytest.mark.parametrize("input_norm", ["linf", "l1"])
def test_a_constant_below_highs_absolute_tolerances_is_not_reported_as_zero(solver,
                                                                            input_norm):
    """HiGHS's tolerances are absolute (feasibility 1e-7, integrality 1e-6): with weights
    of order 1, an optimum of a few 1e-7 came back as 0 with dual bound 0 (the value -0.0,
    for t = 3e-6 and below; EXACT on random nets with tiny weights). The value is now at
    least the true constant: the output layer is scaled up (by at most 2^20) until the
    objective's interval bound is about 1, and an absolute cushion of 1e-6 on the rescaled
    MILP covers the rest (then CERTIFIED, not EXACT)."""
    if solver == "highspy" and exact_mod._highspy() is None:
        pytest.skip("highspy (the mip extra) is not installed")
    x0 = np.zeros(1)
    for t in (3e-6, 1e-6, 1e-9, 1e-13):
        layers = _tiny_gradient_net(t)
        assert _sampled(layers, np.ones(1), x0, 1.0, "l1") == t  # the true constant
        r = lipmip(layers, x0, 1.0, input_norm=input_norm, solver=solver)
        assert r.value >= t, (t, r.value, r.notes)
        assert math.copysign(1.0, r.value) == 1.0  # not -0.0
        assert r.guarantee in (Guarantee.EXACT, Guarantee.CERTIFIED)
        if t >= 1e-6 or r.guarantee is Guarantee.EXACT:  # scaled up 2^20: solved closely
            assert r.value <= t * (1 + 1e-5), (t, r.value)
        assert r.value <= 1e-5  # the cushion is absolute but small (1e-6 on the MILP)


@pytest.mark.parametrize("solver", ["highspy", "scipy"])
def test_random_net_with_tiny_weights_is_not_exact_zero(solver):
    """Found by random testing: a 2-3-3-3-1 net whose third layer has entries of 1e-9..1e-8
    (the only paths to the output through units active together): both solvers returned
    -0.0 labelled EXACT, while gradients of 1.4e-10 occur strictly inside the box."""
    if solver == "highspy" and exact_mod._highspy() is None:
        pytest.skip("highspy (the mip extra) is not installed")
    layers = [
        (np.array([[-0.1977017906266141, 0.28332295135822794],
                   [-0.18123173056670203, -0.3077470288277483],
                   [-0.5515164799824137, -0.1921630684317923]]),
         np.array([0.013011236371904022, -0.1631276507446735, -0.04074607018540469])),
        (np.array([[-1.1312298030050356, 0.2480063455272228, -0.11065480867778536],
                   [0.7279179056275674, 0.4058919999590003, -0.11176901941503664],
                   [0.6952228613311797, 0.2414113230750537, 1.060643752393242]]),
         np.array([-0.2210614022690002, 0.3872162390429223, 0.6816950482111745])),
        (np.array([[0.004935855946187597, -6.256121659817726e-09, -3.0028076191715976e-10],
                   [0.10802457318661475, -1.098371267282261, -0.08080507542792054],
                   [-4.22641931660049e-09, 1.0125150207216809, -0.5376022675087223]]),
         np.array([0.3990323693101314, -0.1190746409010613, -0.12373723855886656])),
        (np.array([[-0.05765003815741332, 1.1360421673846683, 0.19240744938922544]]),
         np.array([0.19488451107500995]))]
    x0, c = np.array([0.8098404060668424, 0.3398969196630097]), np.array([1.7791917853316335])
    low = _sampled(layers, c, x0, 0.3, "l1", n=20000)
    assert low > 1e-10  # a float64 forward/backward pass at a point of the box
    want = enumerate_box_gradients(layers, c, x0, 0.3, "l1")
    r = lipmip(layers, x0, 0.3, c=c, solver=solver)
    assert r.value >= max(want, low), (r.value, want, low, r.guarantee)
    if r.guarantee is Guarantee.EXACT:
        assert r.value <= want * (1 + 1e-5)


def test_banner_silencing_from_two_threads_keeps_stdout():
    """Two threads building their first Highs at once (lipmip from a thread pool): the
    second saved fd 1 while it pointed at /dev/null and restored that, so the process's
    stdout stayed at /dev/null. Run in a subprocess with a slow stand-in for highspy."""
    code = ("import os, threading, time, types\n"
            "import lipbound.baselines.exact as E\n"
            "class H:\n"
            "    def __init__(self):\n"
            "        time.sleep(0.3)\n"
            "    def setOptionValue(self, *a):\n"
            "        pass\n"
            "hs = types.SimpleNamespace(Highs=H)\n"
            "ts = [threading.Thread(target=E._new_highs, args=(hs,)) for _ in range(2)]\n"
            "for t in ts:\n"
            "    t.start()\n"
            "    time.sleep(0.05)\n"
            "for t in ts:\n"
            "    t.join()\n"
            "os.write(1, b'still visible\\n')\n")
    out = _run_python(code)
    assert out.stdout == "still visible\n", out.stdout


def test_zero_only_exact_when_a_layer_is_dead_not_by_cancellation():
    """A hidden layer all inactive on the box: 0, exact, without HiGHS. A gradient that is 0
    in float64 only by cancellation (2^-104 in exact arithmetic: (1 + 2^-52)^2 rounds to
    1 + 2^-51) is not reported as 0."""
    dead = [(np.array([[1.0], [-1.0]]), np.array([-5.0, -5.0])),
            (np.array([[1.0, 1.0]]), np.zeros(1))]
    r = lipmip(dead, np.zeros(1), 1.0)
    assert r.value == 0.0 and r.guarantee is Guarantee.EXACT
    a = 1 + 2.0 ** -52
    layers = [(np.array([[a], [-(1 + 2.0 ** -51)]]), np.array([10.0, 10.0])),
              (np.array([[a, 1.0]]), np.zeros(1))]
    assert (layers[1][0] @ layers[0][0])[0, 0] == 0.0  # float64 says constant
    for solver in ("auto", "scipy"):
        r = lipmip(layers, np.zeros(1), 1.0, solver=solver)
        assert r.value >= 2.0 ** -104 and r.guarantee is Guarantee.CERTIFIED


@pytest.mark.parametrize("solver", [pytest.param("highspy", marks=needs_highspy), "scipy"])
def test_a_box_far_from_the_origin_fails_with_the_way_out(solver):
    """HiGHS cannot pose a box 1e21 half-widths from the origin (bounds from 1e20 count as
    infinite): the error says why and what to do, on both solver paths."""
    layers = random_layers(3, [3, 5, 1])
    with pytest.raises(LipboundError, match="half-widths from the origin") as err:
        lipmip(layers, np.full(3, 1e21), 1.0, solver=solver, time_limit=10)
    assert "1e+21" in str(err.value)
