"""The figures a reader gets (sweep.png, layers.png, radius.png): every series is drawn with
the data's own numbers, named in the legend with its guarantee, and neither hidden by the
legend nor dropped silently where a log axis cannot show a value."""

from __future__ import annotations

import pytest

from lipbound import Guarantee, plotting
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
