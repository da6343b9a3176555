"""Audit of the sweep outputs (labels, flags, radius grids): what a reader of the CSV, the
JSON, the plots and the printed summaries is told must never understate a failure
probability or hide a soundness-check failure."""

from __future__ import annotations

import csv
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipbound import Guarantee, plotting
from lipbound.cli import main
from lipbound.cli.layers import describe
from lipbound.results import BoundResult
from lipbound.sweep import SweepPoint, SweepResult, SweepRow

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _result(global_fp: float = 1.4e-6, lower: float = 1.0) -> SweepResult:
    rows = []
    for eps, loc in ((0.01, 2.0), (0.1, 3.0)):
        rows.append(SweepRow(eps, (
            SweepPoint("local", loc, Guarantee.CERTIFIED, 0.1),
            SweepPoint("global", 5.0, Guarantee.PROBABILISTIC, 0.2, global_fp),
            SweepPoint("pgd", lower, Guarantee.LOWER, 0.3),
        )))
    return SweepResult("net", "x0", ("local", "global", "pgd"), tuple(rows), 1.0)


def _stated_probability(text: str) -> float:
    return float(text.split("≤")[1].strip(" )"))


@settings(max_examples=200, deadline=None)
@given(p=st.floats(1e-300, 1.0), digits=st.integers(1, 3))
def test_format_prob_up_never_understates(p, digits):
    s = plotting.format_prob_up(p, digits)
    assert float(s) >= p
    assert float(s) <= p * (1 + 10.0 ** (1 - digits)) * (1 + 1e-12)  # one unit of the last digit
    assert len(s.split("e")[0].replace(".", "")) == digits


def test_plot_legend_states_the_failure_probability_rounded_up(monkeypatch, tmp_path):
    """Old code: ``f"{1.4e-6:.0e}"`` = "1e-06", below the failure probability of the global
    bound it labels."""
    seen = {}

    def fake(eps, curves, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(plotting, "plot_sweep", fake)
    for fp in (1.4e-6, 1.25e-6, 3.3e-7, 0.4, 1e-6):
        _result(fp).plot(tmp_path / "a.png")
        assert _stated_probability(seen["label_suffix"]["global"]) >= fp, (fp, seen)
    assert "local" not in seen["label_suffix"]  # certified: no failure probability


def test_layers_summary_states_the_failure_probability_rounded_up():
    r = BoundResult(value=2.0, guarantee=Guarantee.PROBABILISTIC, method="local",
                    quantity="q", eps=0.1, seconds=0.0, failure_prob=1.33e-6)
    text = describe(r)
    assert float(text.split("<=")[1].strip(" )")) >= 1.33e-6, text
    c = BoundResult(value=2.0, guarantee=Guarantee.CERTIFIED, method="local", quantity="q",
                    eps=0.1, seconds=0.0)
    assert "p_fail" not in describe(c)


def test_violations_are_flagged_in_csv_json_and_plot(monkeypatch, tmp_path):
    """A lower bound above an upper bound must not reach a file unflagged (old code: only
    the printed summary said so; sweep.csv, sweep.json and the figure did not)."""
    bad = _result(lower=2.5)  # above the local bound 2.0 at eps=0.01
    assert len(bad.violations()) == 1
    d = json.loads(bad.to_json(tmp_path / "s.json").read_text())
    assert d["violations"] == bad.violations()
    bad.to_csv(tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert "pgd lower bound 2.5 > local upper bound 2" in rows[0]["violation"]
    assert rows[1]["violation"] == ""

    figs = []

    def capture(fig, path_png, path_pdf=None, **kw):
        figs.append(fig)
        return []

    monkeypatch.setattr(plotting, "save_figure", capture)
    bad.plot(tmp_path / "b.png")
    texts = [t.get_text() for ax in figs[0].axes for t in ax.texts]
    assert any("SOUNDNESS CHECK FAILED" in t and "pgd" in t for t in texts), texts
    circled = [ln for ln in figs[0].axes[0].lines if ln.get_label() == "soundness check failed"]
    assert len(circled) == 1 and list(circled[0].get_xdata()) == [0.01]
    assert list(circled[0].get_ydata()) == [2.5]

    figs.clear()
    good = _result()
    assert good.violations() == [] and json.loads(
        good.to_json(tmp_path / "g.json").read_text())["violations"] == []
    good.plot(tmp_path / "g.png")
    assert not any(ax.texts for ax in figs[0].axes)
    assert math.isfinite(good.rows[0]["global"].failure_prob)


@pytest.mark.parametrize("argv, match", [
    (["--eps-min", "0.5", "--eps-max", "0.5"], "eps-min"),
    (["--points", "1"], "points"),
    (["--points", "0"], "points"),
    (["--eps-min", "1", "--eps-max", "0.1"], "eps-min"),
    (["--eps-min", "nan", "--eps-max", "1"], "eps-min"),
    (["--eps-min", "0", "--eps-max", "1"], "eps-min"),
])
def test_cli_sweep_refuses_degenerate_grids(argv, match, capsys, tmp_path):
    """Old code: equal --eps-min/--eps-max (or --points 1) silently made a one-radius
    "sweep" whatever --points said."""
    rc = main(["sweep", "--model", "tiny", "--methods", "local", "--out", str(tmp_path),
               *argv])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "sweep.csv").exists()


def _small_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    return net, torch.randn(3, 4, dtype=torch.float64)


@pytest.mark.parametrize("eps", ["scalar-np32", "0d-array", "0d-tensor"])
def test_bound_many_takes_one_radius_of_any_numeric_type(eps):
    """Old code: a NumPy float32 or a 0-d array raised a bare TypeError ('not iterable'),
    a 0-d tensor was "1 radii for 3 inputs"."""
    import numpy as np
    import torch

    from lipbound.batch import bound_many

    value = {"scalar-np32": np.float32(0.25), "0d-array": np.array(0.25),
             "0d-tensor": torch.tensor(0.25)}[eps]
    net, xs = _small_net()
    rows = bound_many(net, xs, value)
    assert [r.eps for r in rows] == [0.25] * 3
    ref = bound_many(net, xs, 0.25)
    assert [r.bound for r in rows] == [r.bound for r in ref]


@pytest.mark.parametrize("bad, match", [("0.1", "string"), (None, "sequence"),
                                        (0.1, "single number")])
def test_sweep_and_bound_many_refuse_radii_that_are_not_a_sequence(bad, match):
    """Old code: a string's characters were read as radii ("eps must be > 0, got 0.0" for
    "0.1"), and a single float or None gave a bare TypeError."""
    from lipbound.batch import bound_many
    from lipbound.errors import InputError
    from lipbound.sweep import sweep

    net, xs = _small_net()
    with pytest.raises(InputError, match=match):
        sweep(net, xs[:1], bad, ("local",), progress=False)
    if bad == "0.1":
        with pytest.raises(InputError, match="string"):
            bound_many(net, xs, bad)


def test_certified_local_above_probabilistic_global_is_not_a_violation():
    """Analyzer.local_bound keeps a certified local value rather than a smaller probabilistic
    global one; old code reported that as "SOUNDNESS CHECK FAILED" (exit status 1). A
    probabilistic local value above the global one is still flagged."""
    def res(local_g: Guarantee) -> SweepResult:
        row = SweepRow(0.1, (SweepPoint("local", 5.5, local_g, 0.1,
                                        1e-6 if local_g == Guarantee.PROBABILISTIC else 0.0),
                             SweepPoint("global", 5.0, Guarantee.PROBABILISTIC, 0.1, 1e-6)))
        return SweepResult("net", "x0", ("local", "global"), (row,), 1.0)

    assert res(Guarantee.CERTIFIED).violations() == []
    assert len(res(Guarantee.PROBABILISTIC).violations()) == 1


def test_bound_many_shape_error_names_the_inferred_shape_and_the_fix():
    """A list of unbatched inputs (4,) without input_shape: old code said only that the model
    failed on "an input of shape (N, )"; the error now says where that shape came from and
    how to give it. With input_shape the same inputs work."""
    import torch

    from lipbound.batch import bound_many
    from lipbound.errors import InputError

    net, xs = _small_net()
    rows = [x for x in xs]  # each of shape (4,)
    with pytest.raises(InputError, match=r"input_shape=.*") as ei:
        bound_many(net, rows, 0.1)
    assert "(4,)" in str(ei.value) and "first axis" in str(ei.value)
    ok = bound_many(net, rows, 0.1, input_shape=(4,))
    assert [r.bound for r in ok] == [r.bound for r in bound_many(net, xs, 0.1)]
    assert torch.equal(rows[0], xs[0])


def test_layers_figure_legend_says_which_factors_are_probabilistic(monkeypatch, tmp_path,
                                                                   capsys):
    """Old code: the layers figure labelled Lanczos factors plainly "local factor" and
    "global factor", with no guarantee or failure probability (layers.csv has them)."""
    figs = []

    def capture(fig, path_png, path_pdf=None, **kw):
        figs.append(fig)
        return []

    monkeypatch.setattr(plotting, "save_figure", capture)
    rc = main(["layers", "--model", "mnist", "--spectral", "lanczos", "--eps", "0.5",
               "--out", str(tmp_path), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    # the figure's legend (below the panels): one entry per kind of bar, and the hatching
    # that marks probabilistic factors with their largest failure probability
    labels = [t.get_text() for t in figs[0].legends[0].get_texts()]
    all_fps = []
    for kind, label in zip(("local", "global"), labels[:2], strict=True):
        fps = [lf["failure_prob"] for lf in d[kind]["layers"]
               if lf["guarantee"] == Guarantee.PROBABILISTIC.value]
        assert ("(all certified)" in label) == (not fps), label
        all_fps += fps
    assert all_fps and len(labels) == 3 and "probabilistic" in labels[2]
    assert float(labels[2].split("≤")[1].split()[0]) >= max(all_fps)


@pytest.mark.parametrize("p", [5e-324, 1.5e-323, 2.2e-310, 1e-308])
@pytest.mark.parametrize("digits", [1, 2, 3])
def test_format_prob_up_never_understates_on_the_subnormal_grid(p, digits):
    """Compared exactly (a float parse rounds back onto the grid): the old formatting stated
    4.9e-324 for 5e-324 = 4.94e-324."""
    from decimal import Decimal

    assert Decimal(plotting.format_prob_up(p, digits)) >= Decimal(p)
