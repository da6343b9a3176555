"""The figures a reader gets (sweep.png, layers.png, radius.png): every series is drawn with
the data's own numbers, named in the legend with its guarantee, and neither hidden by the
legend nor dropped silently where a log axis cannot show a value."""

from __future__ import annotations

import csv
import math

import matplotlib
import numpy as np
import pytest
from matplotlib.transforms import Bbox

from lipbound import Guarantee, plotting
from lipbound.cli import main
from lipbound.sweep import SweepPoint, SweepResult, SweepRow

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def figures(monkeypatch):
    """The figures handed to ``save_figure`` (drawn, so that extents are final), not
    written."""
    figs = []

    def capture(fig, path_png, path_pdf=None, **kw):
        fig.canvas.draw()
        figs.append(fig)
        return []

    monkeypatch.setattr(plotting, "save_figure", capture)
    return figs


def _labelled_lines(ax):
    return {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}


def _sweep(values: dict[str, list[float]], eps: list[float]) -> SweepResult:
    kinds = {"local": Guarantee.CERTIFIED, "global": Guarantee.PROBABILISTIC}
    rows = []
    for i, e in enumerate(eps):
        rows.append(SweepRow(e, tuple(
            SweepPoint(m, v[i], kinds.get(m, Guarantee.LOWER), 0.0,
                       1e-6 if m == "global" else 0.0)
            for m, v in values.items())))
    return SweepResult("net", "x0", tuple(values), tuple(rows), 1.0)


def test_sweep_plot_draws_the_data_and_a_lone_point_of_every_method(figures, tmp_path):
    """Old code: with one radius the global bound (a line style without markers) was an
    invisible one-point line, present only in the legend."""
    res = _sweep({"local": [3.0], "global": [9.0], "pgd": [1.5]}, [0.1])
    res.plot(tmp_path / "s.png")
    ax = figures[0].axes[0]
    lines = _labelled_lines(ax)
    assert len(lines) == 3
    for label, ln in lines.items():
        assert len(ln.get_xdata()) >= 2 or ln.get_marker() not in (None, "None", ""), label
    by_method = {m: next(ln for lb, ln in lines.items() if lb.startswith(
        plotting.METHOD_STYLES[m]["label"])) for m in res.methods}
    for m, ln in by_method.items():
        assert list(ln.get_xdata()) == res.eps and list(ln.get_ydata()) == res.values(m)


def test_sweep_plot_says_which_values_a_log_axis_cannot_show(figures, tmp_path):
    """Old code dropped zero or non-finite values without a word, and a method all of whose
    values were 0 vanished from the legend too."""
    eps = [0.01, 0.1, 1.0]
    res = _sweep({"local": [3.0, 4.0, 5.0], "global": [9.0, 9.0, 9.0],
                  "random": [0.0, 0.0, 0.0], "pgd": [1.0, 0.0, 1.2]}, eps)
    res.plot(tmp_path / "s.png")
    lines = _labelled_lines(figures[0].axes[0])
    rnd = [lb for lb in lines if lb.startswith("random sampling")]
    assert len(rnd) == 1 and "3 of 3" in rnd[0] and len(lines[rnd[0]].get_xdata()) == 0
    pgd = [lb for lb in lines if lb.startswith("PGD")]
    assert len(pgd) == 1 and "1 of 3" in pgd[0]
    assert list(lines[pgd[0]].get_xdata()) == [0.01, 1.0]
    assert list(lines[pgd[0]].get_ydata()) == [1.0, 1.2]
    loc = [lb for lb in lines if lb.startswith("local")]
    assert len(loc) == 1 and "not shown" not in loc[0]


def test_sweep_plot_keeps_a_tight_upper_bound_visible(figures, tmp_path):
    """Old code drew the lower bounds over the upper bounds with the same filled markers: on
    the 3-D example, where the local bound equals the PGD lower bound for eps < 2, the local
    upper bound was invisible (and gradient ascent hid under PGD on MNIST)."""
    eps = [0.01, 0.1, 1.0]
    res = _sweep({"local": [7.5, 7.5, 8.0], "global": [9.1] * 3, "gradient": [7.5, 7.5, 7.6],
                  "pgd": [7.5, 7.5, 7.7]}, eps)
    res.plot(tmp_path / "s.png")
    lines = _labelled_lines(figures[0].axes[0])
    upper = [ln for lb, ln in lines.items() if "upper bound" in lb]
    lower = [ln for lb, ln in lines.items() if "upper bound" not in lb]
    assert len(upper) == 2 and len(lower) == 2
    assert min(ln.get_zorder() for ln in upper) > max(ln.get_zorder() for ln in lower)
    for ln in lower:  # hollow, and larger than the upper bounds' filled markers
        assert ln.get_markerfacecolor() == "none" and ln.get_linestyle() == "--"
        assert ln.get_markersize() > max(u.get_markersize() for u in upper)
    for ln in upper:
        assert ln.get_linestyle() == "-"


# MNIST LeNet at digit 8, eps 0.1 (lipbound layers): tall global bars at the top right,
# where the legend used to sit
_LAYERS = dict(
    names=["0: conv1+relu1", "1: pool1", "2: conv2+relu2", "3: pool2", "4: fc1+relu3",
           "5: fc2+relu4", "6: fc3"],
    local=[3.516, 1.0, 7.016, 1.0, 6.423, 2.586, 2.570],
    global_=[5.271, 1.0, 22.51, 1.0, 15.12, 11.31, 5.201],
    radius_in=[0.1, 0.3516, 0.3516, 2.467, 2.467, 15.84, 40.98],
)


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)
            and p.get_height() > 0 and math.isfinite(p.get_height())]


def test_layers_plot_legend_never_covers_a_bar_and_hatches_probabilistic_factors(figures,
                                                                                  tmp_path):
    loc_p = [True, False, False, False, False, False, False]
    glob_p = [False, False, True, False, False, False, False]
    plotting.plot_layer_factors(**_LAYERS, path_png=tmp_path / "l.png", title="t",
                                local_probabilistic=loc_p, global_probabilistic=glob_p,
                                probabilistic_label="hatched: probabilistic")
    fig = figures[0]
    ax1 = fig.axes[0]
    bars = _bars(ax1)
    assert len(bars) == 14
    local_bars, global_bars = bars[:7], bars[7:]
    assert [b.get_height() for b in local_bars] == _LAYERS["local"]
    assert [b.get_height() for b in global_bars] == _LAYERS["global_"]
    assert [bool(b.get_hatch()) for b in local_bars] == loc_p
    assert [bool(b.get_hatch()) for b in global_bars] == glob_p
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert len(legends) == 1
    texts = [t.get_text() for t in legends[0].get_texts()]
    assert texts == ["local factor", "global factor", "hatched: probabilistic"]
    box = legends[0].get_window_extent()
    renderer = fig.canvas.get_renderer()
    for b in bars:  # the visible part (a bar on a log axis starts at 0, far below it)
        shown = Bbox.intersection(b.get_window_extent(renderer), ax1.bbox)
        assert shown is not None and not box.overlaps(shown), b
    radius = fig.axes[1].lines[0]
    assert list(radius.get_ydata()) == _LAYERS["radius_in"]


def test_layers_plot_marks_a_zero_factor_and_no_hatch_legend_when_all_certified(figures,
                                                                                tmp_path):
    """A factor of 0 (no output can move) cannot be a bar on the log axis: it is written."""
    plotting.plot_layer_factors(["a", "b", "c"], [2.0, 0.0, 3.0], [3.0, 4.0, 5.0],
                                [0.1, 0.2, 0.0], path_png=tmp_path / "l.png")
    fig = figures[0]
    assert [(t.get_text(), t.get_position()[0]) for t in fig.axes[0].texts] == [
        ("0", pytest.approx(1 - 0.19))]  # the local bar's slot of layer b
    assert [(t.get_text(), t.get_position()[0]) for t in fig.axes[1].texts] == [("0", 2)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["local factor",
                                                                 "global factor"]


def test_cli_layers_legend_and_hatching_follow_the_csv(figures, tmp_path):
    assert main(["layers", "--model", "mnist", "--input", "mnist:8", "--eps", "0.1",
                 "--out", str(tmp_path)]) == 0
    with open(tmp_path / "layers.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    fig = figures[0]
    bars = _bars(fig.axes[0])
    n = len(rows)
    assert [b.get_height() for b in bars[:n]] == [float(r["local_factor"]) for r in rows]
    assert [b.get_height() for b in bars[n:]] == [float(r["global_factor"]) for r in rows]
    prob = Guarantee.PROBABILISTIC.value
    assert [bool(b.get_hatch()) for b in bars[:n]] == [r["local_guarantee"] == prob
                                                       for r in rows]
    assert [bool(b.get_hatch()) for b in bars[n:]] == [r["global_guarantee"] == prob
                                                       for r in rows]
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    fps = [float(r[f"{k}_failure_prob"]) for r in rows for k in ("local", "global")
           if r[f"{k}_guarantee"] == prob]
    assert fps, "this network has probabilistic factors at eps 0.1"
    stated = float(texts[-1].split("≤")[1].split()[0])
    assert texts[-1].startswith("hatched: probabilistic") and stated >= max(fps)


def test_cli_radius_plot_draws_the_csv_with_each_guarantee(figures, tmp_path, capsys):
    """Old code labelled probabilistic radii "certified: local", gave attacks no guarantee,
    and switched matplotlib's global backend."""
    backend = matplotlib.get_backend()
    batch = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    np.save(tmp_path / "b.npy", batch)
    assert main(["radius", "--model", "compnet", "--input", str(tmp_path / "b.npy"),
                 "--attacks", "fgsm", "--spectral", "lanczos",
                 "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert matplotlib.get_backend() == backend
    with open(tmp_path / "o" / "radius.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: float(r["certified_radius"]))
    lines = _labelled_lines(figures[0].axes[0])
    for m in ("local", "margin", "global"):
        (label,) = [lb for lb in lines if lb.startswith(f"certified radius: {m} ")]
        ys = [float(r[f"{m}_radius"]) for r in rows]
        # radius.csv holds 10 significant digits
        assert list(lines[label].get_ydata()) == pytest.approx([y for y in ys if y > 0],
                                                               rel=1e-9)
        gs = {r[f"{m}_guarantee"] for r in rows}
        if Guarantee.PROBABILISTIC_LOWER.value in gs:
            stated = float(label.split("≤")[1].split(")")[0])
            assert "probabilistic lower bound" in label
            assert stated >= max(float(r[f"{m}_failure_prob"]) for r in rows)
        else:
            assert gs == {Guarantee.CERTIFIED_LOWER.value} and "certified lower bound" in label
    (label,) = [lb for lb in lines if lb.startswith("attack radius: fgsm")]
    assert "upper bound" in label
    found = [float(r["fgsm_radius"]) for r in rows if r["fgsm_radius"]]
    assert list(lines[label].get_ydata()) == pytest.approx(found, rel=1e-9)
    assert ("no class change" in label) == (len(found) < len(rows))
    for ln in lines.values():
        assert all(float(x).is_integer() for x in ln.get_xdata())


def test_radius_plot_flags_a_certificate_above_an_attack(figures, tmp_path):
    plotting.plot_radii({"local": [0.1, 0.5]}, {"pgd": [1.0, 0.3]},
                        path_png=tmp_path / "r.png", violations=[False, True])
    ax = figures[0].axes[0]
    assert any("SOUNDNESS CHECK FAILED" in t.get_text() for t in ax.texts)
    circled = _labelled_lines(ax)["soundness check failed"]
    assert list(circled.get_xdata()) == [1] and list(circled.get_ydata()) == [0.5]
    ticks = list(ax.get_xticks())
    assert ticks == [0, 1]
    figures.clear()
    plotting.plot_radii({"local": [0.1]}, {"pgd": [1.0]}, path_png=tmp_path / "r.png")
    assert list(figures[0].axes[0].get_xticks()) == [0]  # one input: one tick, no -0.45
    figures.clear()
    plotting.plot_radii({"local": [0.1, 0.0]}, {"pgd": [1.0, None]},
                        path_png=tmp_path / "r.png", violations=[False, False])
    ax = figures[0].axes[0]
    assert not ax.texts
    labels = list(_labelled_lines(ax))
    assert any("nothing certified" in lb and "1 of 2" in lb for lb in labels)
    assert any("no class change found at 1 of 2" in lb for lb in labels)
