"""Tests of eps sweeps, the per-layer view and bounds for many inputs (library and CLI)."""

from __future__ import annotations

import csv
import json
import math

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import build, fc_specs, local_lower_bound, n_examples
from lipbound import Analyzer, Guarantee, zoo
from lipbound.batch import bound_many, summarize
from lipbound.cli import main
from lipbound.errors import InputError, ZooError
from lipbound.inputs import load_sample
from lipbound.lower import ratio_at
from lipbound.sweep import (
    DEFAULT_METHODS,
    DEFAULT_REUSE_TOL,
    SweepPoint,
    SweepResult,
    SweepRow,
    default_eps_range,
    eps_grid,
    parse_methods,
    sweep,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: small lower-bound budgets: the tests check orderings, not tightness
FAST = {"samples": 48, "steps": 15, "restarts": 3}
SWEEP_COLUMNS = ["eps"] + [f"{m}_{c}" for m in DEFAULT_METHODS
                           for c in ("value", "guarantee", "failure_prob", "seconds")] + \
    ["violation", "notes"]


@pytest.fixture(scope="module")
def mnist():
    lm = zoo.load_model("mnist")
    return lm, load_sample("mnist:8", entry=lm.entry)


@pytest.fixture(scope="module")
def cifar10():
    lm = zoo.load_model("cifar10")
    return lm, load_sample("cifar10:dog", entry=lm.entry)


# ----------------------------------------------------------------------- library: sweep
@pytest.mark.parametrize("net", ["mnist", "cifar10"])
def test_lower_le_local_le_global(net, request):
    lm, sample = request.getfixturevalue(net)
    eps = [0.001, 0.1, 1.0, lm.entry.eps_range[1]]  # up to the paper's largest radius
    lowers = ("random", "gradient", "pgd") + (("best",) if net == "mnist" else ())
    methods = ("local", "global") + lowers
    res = sweep(lm.model, sample.x, eps, methods, progress=False, name=net,
                input_name=sample.name, **FAST)
    assert res.eps == eps and res.methods == methods
    assert res.violations() == []
    glob = res.values("global")
    assert len(set(glob)) == 1  # computed once, valid for every radius
    for row in res.rows:
        local, g = row["local"], row["global"]
        assert local.guarantee.is_upper_bound and g.guarantee.is_upper_bound
        assert 0 < local.value <= g.value
        for m in lowers:
            p = row[m]
            assert p.guarantee == Guarantee.LOWER
            assert 0 <= p.value <= local.value
            assert 0 < p.details["witness_distance"] <= row.eps * (1 + 1e-12)
        if "best" in lowers:  # the maximum over the methods it runs, same budgets and seed
            assert row["best"].value >= row["random"].value
    # the local bound grows with the radius (the ball grows, rule 3)
    loc = res.values("local")
    assert loc[0] <= loc[1] <= loc[2]


def test_sweep_lower_bound_is_attained_ratio(mnist):
    """Recompute a lower bound independently: its value is a ratio reached by its witness,
    and it stays below the sweep's local bound. The sweep leaves the model float32."""
    from lipbound.lower import pgd_lower_bound

    lm, sample = mnist
    res = sweep(Analyzer(lm.model, lm.entry.input_shape), sample.x, [0.05], ("local", "pgd"),
                progress=False, **FAST)
    lb = pgd_lower_bound(lm.model, sample.x, 0.05, n_restarts=3, n_steps=15)
    assert ratio_at(lm.model, sample.x, lb.witness) == pytest.approx(lb.value, rel=1e-6)
    assert lb.value <= res.rows[0]["local"].value
    assert res.rows[0]["pgd"].value <= res.rows[0]["local"].value
    assert next(lm.model.parameters()).dtype == torch.float32


def _jacobian_norm(net: nn.Sequential, x: torch.Tensor, c: torch.Tensor | None = None) -> float:
    """||C W2 diag(W1 x + b1 > 0) W1||_2 of a two-layer ReLU net, in float64."""
    w1, b1 = net[0].weight.detach().double(), net[0].bias.detach().double()
    w2 = net[2].weight.detach().double()
    act = ((x.double().reshape(-1) @ w1.T + b1) > 0).double()
    j = w2 @ (act[:, None] * w1)
    if c is not None:
        j = c.double() @ j
    return float(torch.linalg.matrix_norm(j, 2))


def test_sweep_accepts_analyzer_and_output_map():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x0 = torch.randn(1, 4, dtype=torch.float64)
    c = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    res = sweep(Analyzer(net, (4,)), x0, [0.01, 1.0], ("local", "global", "pgd"),
                progress=False, output_map=c, **FAST)
    assert res.violations() == []
    assert res.settings["output_map"] is True
    # the x0-relative constant of C f is at least the Jacobian norm of C f at x0
    jn = _jacobian_norm(net, x0, c)
    for row in res.rows:
        assert row["local"].value >= jn
        assert row["pgd"].value <= row["local"].value


# ------------------------------------------------------- sharing work across radii
#: radii in no particular order, with a repeat: the result must keep this order
_EPS_ORDER = [0.3, 0.001, 3.0, 0.03, 0.3, 0.01, 1.0, 0.1]


@settings(max_examples=n_examples(12), deadline=None)
@given(spec=fc_specs(max_width=12), mode=st.sampled_from(["exact", "lanczos"]))
def test_sweep_with_reuse_is_sound_on_random_networks(spec, mode):
    """Random float64 networks, radii in a scrambled order with a repeat, a large reuse_tol
    (so that factors are reused): every local value is >= a brute-force lower bound of the
    local constant at its radius; with exact spectral norms it is >= the fresh single bound
    at that radius (a reused factor bounds a dominating operator); every point says how it
    was obtained and carries a consistent guarantee; the rows keep the user's order."""
    model, shape, x0 = build(spec)
    an = Analyzer(model, shape, spectral=mode, lanczos_steps=spec["lanczos_steps"])
    res = sweep(an, x0, _EPS_ORDER, ("local", "global"), progress=False, reuse_tol=0.2)
    assert res.eps == _EPS_ORDER
    assert res.violations() == []
    assert an.reuse_tol == 0.0 and an._memo == {}  # the caller's analyzer is untouched
    st_ = res.settings
    assert st_["reuse_tol"] == 0.2
    assert st_["local_computed"] + st_["local_reused"] + st_["local_from_global"] == \
        len(set(_EPS_ORDER))
    assert st_["local_evaluations"] == st_["local_computed"] + st_["local_reused"]
    g = res.rows[0]["global"]
    fresh_an = Analyzer(model, shape, spectral=mode, lanczos_steps=spec["lanczos_steps"])
    fresh_an.global_bound()  # as in the sweep: local bounds may report the global one
    for row in res.rows:
        p = row["local"]
        assert p.guarantee.is_upper_bound
        assert (p.failure_prob > 0) == (p.guarantee == Guarantee.PROBABILISTIC)
        assert 0 <= p.failure_prob <= 1
        src = p.details["source"]
        assert src in ("computed", "reused", "global")
        assert (src == "reused") == bool(p.details["reused_layers"])
        if src == "global":
            assert p.value == g.value and p.guarantee == g.guarantee
            assert row.eps >= p.details["crossover_eps"]
        lb, _ = local_lower_bound(model, x0, row.eps, seed=spec["seed"], n_samples=300,
                                  ascent_starts=3, ascent_steps=15)
        assert p.value >= lb * (1 - 1e-12)
        if mode == "exact":
            fresh = fresh_an.local_bound(x0, row.eps)
            assert p.value >= fresh.value * (1 - 1e-12)
    # a repeated radius is one point
    assert res.rows[0]["local"] is res.rows[4]["local"]


def test_sweep_crossover_takes_the_global_bound():
    """All hidden units strongly active: the local bound equals the global one at every
    radius, so after the first computed radius every larger one takes the global bound
    without computing (and says so)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    with torch.no_grad():
        net[0].bias.fill_(100.0)
    x0 = torch.zeros(1, 3, dtype=torch.float64)
    res = sweep(net, x0, [0.1, 1.0, 0.01, 10.0], ("local", "global"), progress=False)
    by = {r.eps: r["local"] for r in res.rows}
    # bisection order: 10 (largest), 0.01 (smallest), then the rest
    assert by[10.0].details["source"] == by[0.01].details["source"] == "computed"
    assert by[0.1].details["source"] == by[1.0].details["source"] == "global"
    assert by[1.0].details["crossover_eps"] == 0.01
    assert res.settings["local_from_global"] == 2
    g = res.rows[0]["global"].value
    for e, p in by.items():
        assert p.value == g
        assert p.value >= _jacobian_norm(net, x0)
        assert p.value == pytest.approx(Analyzer(net, (3,)).local_bound(x0, e).value,
                                        rel=1e-12)


def test_mnist_sweep_reuse_keeps_values_close_and_valid(mnist):
    """The default reuse_tol on a real network: reuse happens, the values stay within a few
    percent of fresh single bounds and above the PGD lower bound; with reuse_tol=0 nothing
    is reused and every value is a fresh computation (its own Lanczos draws, so within the
    draws' spread of a single bound, not equal to it)."""
    lm, sample = mnist
    eps = eps_grid(0.001, 7.0, 9)
    res = sweep(lm.model, sample.x, eps, ("local", "pgd"), progress=False, **FAST)
    exact = sweep(lm.model, sample.x, eps, ("local",), progress=False, reuse_tol=0)
    assert res.settings["reuse_tol"] == DEFAULT_REUSE_TOL
    assert res.settings["local_reused"] > 0 and exact.settings["local_reused"] == 0
    fresh = [Analyzer(lm.model, lm.entry.input_shape).local_bound(sample.x, e).value
             for e in eps]
    for row, e, f in zip(res.rows, exact.rows, fresh, strict=True):
        assert row["pgd"].value <= row["local"].value <= 1.05 * f
        assert row["pgd"].value <= e["local"].value <= 1.02 * f
        assert e["local"].details["source"] == "computed"
    assert res.violations() == []


@pytest.mark.parametrize("bad", [-0.01, math.nan, math.inf, "x", True])
def test_sweep_bad_reuse_tol(bad):
    net = nn.Sequential(nn.Linear(2, 2)).double().eval()
    with pytest.raises(InputError, match="reuse_tol"):
        sweep(net, torch.zeros(1, 2, dtype=torch.float64), [0.1], ("local",),
              progress=False, reuse_tol=bad)


def test_eps_grid_and_default_ranges():
    g = eps_grid(1e-3, 10.0, 5)
    assert g[0] == 1e-3 and g[-1] == 10.0 and len(g) == 5
    ratios = [b / a for a, b in zip(g, g[1:], strict=False)]
    assert all(r == pytest.approx(10.0) for r in ratios)
    assert eps_grid(0.5, 0.5, 7) == [0.5] and eps_grid(0.1, 1.0, 1) == [0.1]
    expected = {"tiny": (0.1, 10), "compnet": (0.0005, 0.1), "mnist": (0.001, 7),
                "cifar10": (0.001, 2), "alexnet": (0.001, 3), "vgg16": (0.001, 3)}
    for name, (lo, hi) in expected.items():
        r = default_eps_range(name, 30)
        assert len(r) == 30 and r[0] == pytest.approx(lo) and r[-1] == pytest.approx(hi)
        assert all(a < b for a, b in zip(r, r[1:], strict=False))
    with pytest.raises(InputError, match="eps_min"):
        eps_grid(1.0, 0.1, 3)
    with pytest.raises(InputError, match="points"):
        eps_grid(0.1, 1.0, 0)
    with pytest.raises(InputError):
        eps_grid(-1.0, 1.0, 3)
    with pytest.raises(ZooError):
        default_eps_range("resnet")


def test_bad_methods_and_radii(mnist):
    lm, sample = mnist
    assert parse_methods("local, pgd,local") == ("local", "pgd")
    with pytest.raises(InputError, match="unknown method"):
        parse_methods("local,fgsm")
    with pytest.raises(InputError):
        sweep(lm.model, sample.x, [0.1, -1.0], ("local",), progress=False)
    with pytest.raises(InputError, match="empty"):
        sweep(lm.model, sample.x, [], ("local",), progress=False)
    with pytest.raises(InputError, match="samples"):
        sweep(lm.model, sample.x, [0.1], ("random",), progress=False, samples=0)


def _synthetic(lower_value: float) -> SweepResult:
    rows = []
    for eps in (0.01, 0.1):
        rows.append(SweepRow(eps, (
            SweepPoint("local", 5.0, Guarantee.CERTIFIED, 0.1),
            SweepPoint("global", 9.0, Guarantee.PROBABILISTIC, 0.2, 1e-6),
            SweepPoint("random", 1.0, Guarantee.LOWER, 0.3),
            SweepPoint("gradient", 2.0, Guarantee.LOWER, 0.4),
            SweepPoint("pgd", lower_value, Guarantee.LOWER, 0.5),
        )))
    return SweepResult("net", "x0", DEFAULT_METHODS, tuple(rows), 1.0)


def test_csv_json_roundtrip_and_violations(tmp_path):
    res = _synthetic(3.0)
    assert res.violations() == []
    res.to_csv(tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == SWEEP_COLUMNS
        data = list(reader)
    assert [float(r["eps"]) for r in data] == [0.01, 0.1]
    assert float(data[0]["pgd_value"]) == 3.0
    assert data[0]["global_guarantee"] == "probabilistic upper bound"
    assert float(data[0]["global_failure_prob"]) == 1e-6
    assert float(data[0]["local_failure_prob"]) == 0.0
    d = json.loads(res.to_json(tmp_path / "s.json").read_text())
    assert d["rows"][1]["global"]["failure_prob"] == 1e-6 and d["methods"] == list(DEFAULT_METHODS)
    bad = _synthetic(6.0)  # a "lower bound" above the local upper bound: must be flagged
    v = bad.violations()
    assert len(v) == 2 and all("pgd" in s and "local" in s for s in v)


def test_plot_writes_files_without_global_matplotlib_changes(tmp_path):
    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    files = _synthetic(3.0).plot(tmp_path / "a.png", tmp_path / "a.pdf", title="t")
    assert [f.name for f in files] == ["a.png", "a.pdf"]
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a.pdf").read_bytes()[:4] == b"%PDF"
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc


# ----------------------------------------------------------------------- CLI: sweep, layers
def test_cli_sweep_writes_csv_json_and_plots(tmp_path, capsys):
    out = tmp_path / "sw"
    rc = main(["sweep", "--model", "mnist", "--input", "mnist:8", "--eps-min", "0.01",
               "--eps-max", "1", "--points", "2", "--samples", "64", "--steps", "5",
               "--restarts", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "local" in text
    for name in ("sweep.png", "sweep.pdf", "sweep.csv", "sweep.json"):
        assert (out / name).stat().st_size > 0
    with open(out / "sweep.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == SWEEP_COLUMNS
        rows = list(reader)
    assert [float(r["eps"]) for r in rows] == [0.01, 1.0]
    for r in rows:
        ups = [float(r["local_value"]), float(r["global_value"])]
        lows = [float(r[f"{m}_value"]) for m in ("random", "gradient", "pgd")]
        assert max(lows) <= ups[0] <= ups[1]
        assert r["pgd_guarantee"] == Guarantee.LOWER.value
    d = json.loads((out / "sweep.json").read_text())
    assert d["input"] == "mnist:8" and len(d["rows"]) == 2


def test_cli_sweep_methods_subset_and_json(tmp_path, capsys):
    rc = main(["sweep", "--model", "tiny", "--points", "3", "--methods", "local,global",
               "--out", str(tmp_path), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["methods"] == ["local", "global"] and d["violations"] == []
    assert [r["eps"] for r in d["rows"]] == pytest.approx([0.1, 1.0, 10.0])
    with open(tmp_path / "sweep.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["eps", "local_value", "local_guarantee",
                                         "local_failure_prob", "local_seconds",
                                         "global_value", "global_guarantee",
                                         "global_failure_prob", "global_seconds",
                                         "violation", "notes"]


def test_cli_sweep_bad_method_is_a_clear_error(tmp_path, capsys):
    rc = main(["sweep", "--model", "tiny", "--methods", "local,nope", "--out", str(tmp_path)])
    assert rc == 2
    assert "unknown method" in capsys.readouterr().err


def test_cli_layers_table_and_files(tmp_path, capsys):
    out = tmp_path / "ly"
    assert main(["layers", "--model", "mnist", "--input", "mnist:8", "--eps", "0.1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "conv1" in text and "global bound" in text
    for name in ("layers.png", "layers.pdf", "layers.csv"):
        assert (out / name).stat().st_size > 0
    with open(out / "layers.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7  # LeNet: conv, pool, conv, pool, fc, fc, fc
    assert float(rows[0]["radius_in"]) == 0.1
    # rule 8: each layer sees the previous radius times the previous local factor
    for a, b in zip(rows, rows[1:], strict=False):
        assert float(b["radius_in"]) == pytest.approx(
            float(a["radius_in"]) * float(a["local_factor"]), rel=1e-12)
    assert all(float(r["global_factor"]) > 0 for r in rows)
    prod_local = math.prod(float(r["local_factor"]) for r in rows)
    prod_global = math.prod(float(r["global_factor"]) for r in rows)
    assert prod_local <= prod_global * (1 + 1e-12)


def test_cli_layers_json(capsys):
    assert main(["layers", "--model", "tiny", "--eps", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["local"]["value"] <= d["global"]["value"]
    assert all(lf["global_factor"] is not None for lf in d["local"]["layers"])


# ----------------------------------------------------------------------- many inputs
MANY_COLUMNS = {"index", "label", "predicted", "eps", "bound", "guarantee", "seconds"}


def test_cli_bound_many_csv(tmp_path, capsys, mnist):
    f = tmp_path / "f.csv"
    assert main(["bound", "--model", "mnist", "--input", "mnist:test/0-4", "--eps", "0.1",
                 "--out", str(f)]) == 0
    assert "median" in capsys.readouterr().out
    with open(f, newline="") as fh:
        reader = csv.DictReader(fh)
        assert MANY_COLUMNS <= set(reader.fieldnames)
        rows = list(reader)
    assert len(rows) == 5 and [int(r["index"]) for r in rows] == list(range(5))
    lm, _ = mnist
    from lipbound.inputs import load_samples

    samples = load_samples("mnist:test/0-4", entry=lm.entry)
    from lipbound.lower import pgd_lower_bound

    for r, s in zip(rows, samples, strict=True):
        assert int(r["label"]) == s.label
        assert int(r["predicted"]) == int(lm.model(s.x).argmax())
        assert float(r["eps"]) == 0.1 and float(r["bound"]) > 0
    lb = pgd_lower_bound(lm.model, samples[0].x, 0.1, n_restarts=2, n_steps=10)
    assert lb.value <= float(rows[0]["bound"])


def test_cli_bound_many_eps_file_and_json(tmp_path, capsys):
    ef = tmp_path / "eps.csv"
    ef.write_text("index,eps\n0,0.01\n1,0.1\n2,1.0\n")
    out = json.loads(_run_ok(capsys, ["bound", "--model", "tiny", "--input",
                                      _tiny_batch(tmp_path, 3), "--eps-file", str(ef),
                                      "--method", "both", "--json"]))
    local = [r for r in out["rows"] if r["method"] == "local"]
    glob = [r for r in out["rows"] if r["method"] == "global"]
    assert [r["eps"] for r in local] == [0.01, 0.1, 1.0] and len(glob) == 3
    assert all(lr["bound"] <= gr["bound"] for lr, gr in zip(local, glob, strict=True))
    s = out["summary"]["methods"]["local"]
    assert s["n"] == 3 and s["bound"]["min"] <= s["bound"]["median"] <= s["bound"]["max"]
    # plain one-number-per-line file
    ef2 = tmp_path / "eps.txt"
    ef2.write_text("# radii\n0.5\n\n0.25\n")
    out = json.loads(_run_ok(capsys, ["bound", "--model", "tiny", "--input",
                                      _tiny_batch(tmp_path, 2), "--eps-file", str(ef2),
                                      "--json"]))
    assert [r["eps"] for r in out["rows"]] == [0.5, 0.25]


def _run_ok(capsys, argv):
    assert main(argv) == 0
    return capsys.readouterr().out


def _tiny_batch(tmp_path, n: int) -> str:
    p = tmp_path / f"batch{n}.pt"
    torch.save(torch.randn(n, 3, generator=torch.Generator().manual_seed(n)), p)
    return str(p)


@pytest.mark.parametrize("content,match", [
    ("0.1\n0.2\n0.3\n", "3 radii but --input names 5"),
    ("eps\n0.1\n", "1 radii but --input names 5"),
    ("radius\n0.1\n", "no column 'eps'"),
    ("0.1\nabc\n", "line 2"),
    ("0.1\n-2\n", "line 2"),
])
def test_cli_eps_file_errors(tmp_path, capsys, content, match):
    ef = tmp_path / "eps.txt"
    ef.write_text(content)
    rc = main(["bound", "--model", "mnist", "--input", "mnist:test/0-4", "--eps-file",
               str(ef)])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_bound_many_library_batch_tensor_and_global():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    xs = torch.randn(6, 3)
    an = Analyzer(net, (3,))
    timings: dict[str, float] = {}
    loc = bound_many(an, xs, [0.1 * (i + 1) for i in range(6)], "local", timings=timings)
    glob = bound_many(an, xs, None, "global")
    assert [r.index for r in loc] == list(range(6)) and "setup_seconds" in timings
    assert [r.predicted for r in loc] == net(xs).argmax(dim=1).tolist()
    assert len({r.bound for r in glob}) == 1
    assert all(r.bound <= g.bound for r, g in zip(loc, glob, strict=True))
    for i, r in enumerate(loc):
        assert r.bound >= _jacobian_norm(net, xs[i])
    s = summarize(loc + glob)
    assert s["local"]["n"] == 6 and s["global"]["bound"]["min"] == glob[0].bound
    with pytest.raises(InputError, match="2 radii for 6 inputs"):
        bound_many(an, xs, [0.1, 0.2])
    with pytest.raises(InputError, match="no inputs"):
        bound_many(an, [], 0.1)
    with pytest.raises(InputError, match="method"):
        bound_many(an, xs, 0.1, "both")


def test_settings_name_the_dtype_the_lower_bounds_really_used():
    """A float64 x0 that float32 cannot represent: the lower bounds run a float64 copy
    around the exact x0 (check_problem), so the settings must not say "float32" (they did)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, dtype=torch.float64)
    assert not torch.equal(x.float().double(), x)
    kw = dict(methods=("local", "random"), samples=20)
    assert sweep(net, x, [0.1], lower_dtype=torch.float64, **kw).settings[
        "lower_dtype"] == "float64"
    for dt in (torch.float32, None):
        used = sweep(net, x, [0.1], lower_dtype=dt, **kw).settings["lower_dtype"]
        assert used.startswith("float64 (x0 is not a point of") and "float32" in used
    x32 = x.float().double()  # a point of float32: the float32 network is what runs
    assert sweep(net, x32, [0.1], lower_dtype=torch.float32, **kw).settings[
        "lower_dtype"] == "float32"
    assert sweep(net, x32, [0.1], lower_dtype=None, **kw).settings[
        "lower_dtype"] == "model (float32)"
