"""Progress bars (lipbound._progress): on stderr, only when asked for and stderr is a terminal,
never on stdout, and the results are the same with and without them.

The bars normally appear only after ``DELAY`` seconds; the tests set it to 0 so that every
bar is drawn at once, and they replace stderr with a fake terminal that records it.
"""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from torch import nn

import lipbound._progress as progress_mod
from lipbound import Analyzer
from lipbound.analyzer import global_bound, local_bound


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class NotTerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def tty(monkeypatch):
    """Call it in the test (pytest's capture resets sys.stderr after the fixtures are set
    up): stderr becomes a (fake) terminal, returned, and bars appear at once."""

    def install() -> FakeTerminal:
        err = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(progress_mod, "DELAY", 0.0)
        return err
    return install


@pytest.fixture(scope="module")
def net() -> nn.Module:
    g = torch.Generator().manual_seed(5)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(27, 12), nn.ReLU(), nn.Linear(12, 4)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    return torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def _analyzer(net) -> Analyzer:
    # the Lanczos route: random draws, which the bar must not disturb
    return Analyzer(net, (1, 8, 8), spectral="lanczos", seed=3, name="toy")


def _same_bound(a, b) -> None:
    assert a.value == b.value  # bit-identical
    assert a.guarantee == b.guarantee and a.failure_prob == b.failure_prob
    assert [lf.local for lf in a.layers] == [lf.local for lf in b.layers]
    assert [lf.global_factor for lf in a.layers] == [lf.global_factor for lf in b.layers]
    assert [lf.spectral_method for lf in a.layers] == [lf.spectral_method for lf in b.layers]


def _cleared(text: str) -> None:
    """The bar was drawn (carriage returns) and removed at the end (the last write blanks
    the line and returns to its start)."""
    assert "\r" in text
    assert text.endswith("\r") and text.rstrip("\r").split("\r")[-1].strip() == ""


# ----------------------------------------------------------------------------- the bar itself


def test_bar_draws_labels_and_removes_itself(tty):
    tty = tty()
    with progress_mod.progress_bar(True, 3, "work", "item") as bar:
        bar.label("first")
        bar.update()
        bar.label("second")
    text = tty.getvalue()
    assert "work: first" in text and "work: second" in text and "item" in text
    assert "1/3" in text
    _cleared(text)


def test_bar_waits_for_its_delay(monkeypatch):
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress_mod, "DELAY", 3600.0)
    with progress_mod.progress_bar(True, 3, "work", "item") as bar:
        bar.label("first")
        bar.update()
    assert err.getvalue() == ""  # a short job prints nothing at all


def test_bar_off_when_not_asked_or_not_a_terminal(monkeypatch, tty):
    tty = tty()
    assert progress_mod.progress_bar(False, 3, "work", "item") is progress_mod.NULL_BAR
    with progress_mod.progress_bar(False, 3, "work", "item") as bar:
        bar.label("x")
        bar.update()
    assert tty.getvalue() == ""
    err = NotTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert progress_mod.progress_bar(True, 3, "work", "item") is progress_mod.NULL_BAR
    monkeypatch.setattr(sys, "stderr", None)  # no stderr at all (pythonw, daemons)
    assert progress_mod.progress_bar(True, 3, "work", "item") is progress_mod.NULL_BAR


def test_log_records_keep_the_delay(monkeypatch):
    """tqdm.write (how the CLI logs while a bar may be up) redraws open bars: one still within
    its delay stays hidden, and nothing is left behind."""
    import logging

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress_mod, "DELAY", 3600.0)
    log = logging.getLogger("lipbound.test_progress")
    with progress_mod.progress_bar(True, 3, "work", "item") as bar:
        bar.update()
        tqdm.write("a record", file=sys.stderr)
        handler = logging.StreamHandler(sys.stderr)
        monkeypatch.setattr(logging.root, "handlers", [handler])
        with logging_redirect_tqdm():
            log.warning("another record")
    assert err.getvalue() == "a record\nanother record\n"


def test_bar_drawn_by_a_log_record_is_cleared(tty):
    from tqdm import tqdm

    tty = tty()
    with progress_mod.progress_bar(True, 3, "work", "item"):
        tqdm.write("a record", file=sys.stderr)
    text = tty.getvalue()
    assert "a record\n" in text and "work" in text.split("a record")[1]
    _cleared(text)


def test_bar_removed_on_an_exception(tty):
    tty = tty()
    with pytest.raises(RuntimeError), progress_mod.progress_bar(True, 2, "work", "item"):
        raise RuntimeError("boom")
    _cleared(tty.getvalue())


# ----------------------------------------------------------------------------- the analyzer


def test_local_bound_bar_over_layers_same_value(tty, net, x0):
    tty = tty()
    an = _analyzer(net)
    with_bar = an.local_bound(x0, 0.1, progress=True)
    text = tty.getvalue()
    assert "local bound toy" in text and "layer" in text
    assert f"0/{len(an.blocks)}" in text and an.blocks[0].name in text
    _cleared(text)
    _same_bound(with_bar, _analyzer(net).local_bound(x0, 0.1))


def test_global_bound_bar_over_layers_same_value(tty, net):
    tty = tty()
    with_bar = _analyzer(net).global_bound(progress=True)
    text = tty.getvalue()
    assert "global bound toy" in text and "layer" in text
    _cleared(text)
    _same_bound(with_bar, _analyzer(net).global_bound())
    # a cached global bound computes nothing, and shows nothing
    an = _analyzer(net)
    an.global_bound()
    tty.seek(0)
    tty.truncate()
    an.global_bound(progress=True)
    assert tty.getvalue() == ""


def test_module_functions_pass_progress(tty, net, x0):
    tty = tty()
    loc = local_bound(net, x0, 0.1, spectral="lanczos", seed=3, progress=True)
    glob = global_bound(net, x0, spectral="lanczos", seed=3, progress=True)
    text = tty.getvalue()
    assert "local bound" in text and "global bound" in text
    _same_bound(loc, local_bound(net, x0, 0.1, spectral="lanczos", seed=3))
    _same_bound(glob, global_bound(net, x0, spectral="lanczos", seed=3))


def test_no_output_without_progress_or_terminal(monkeypatch, tty, net, x0):
    tty = tty()
    _analyzer(net).local_bound(x0, 0.1)
    _analyzer(net).global_bound()
    assert tty.getvalue() == ""
    err = NotTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    _analyzer(net).local_bound(x0, 0.1, progress=True)
    _analyzer(net).global_bound(progress=True)
    assert err.getvalue() == ""


# ----------------------------------------------------------------------------- library loops


def test_bound_many_bar_over_inputs(tty, net, x0):
    tty = tty()
    from lipbound.batch import bound_many

    xs = torch.cat([x0, 0.5 * x0])
    rows = bound_many(_analyzer(net), xs, 0.1, progress=True)
    text = tty.getvalue()
    assert "local bounds" in text and "input" in text and "global bound toy" in text
    _cleared(text)
    assert [r.bound for r in rows] == [r.bound for r in bound_many(_analyzer(net), xs, 0.1)]


def test_sweep_bar(tty, net, x0):
    tty = tty()
    from lipbound.sweep import sweep

    res = sweep(_analyzer(net), x0, [0.05, 0.5], ("local", "global"), progress=True)
    text = tty.getvalue()
    assert "sweep toy" in text and "bound" in text and "eps=" in text
    _cleared(text)
    again = sweep(_analyzer(net), x0, [0.05, 0.5], ("local", "global"), progress=False)
    assert res.values("local") == again.values("local")
    assert res.values("global") == again.values("global")


def test_random_lower_bound_bar(tty, net, x0):
    tty = tty()
    from lipbound.lower import random_lower_bound

    res = random_lower_bound(net, x0, 0.1, n_samples=300, batch_size=100, progress=True)
    text = tty.getvalue()
    assert "random lower bound" in text and "/300" in text
    _cleared(text)
    tty.truncate(0)
    tty.seek(0)
    again = random_lower_bound(net, x0, 0.1, n_samples=300, batch_size=100)  # None: small
    assert tty.getvalue() == ""
    assert res.value == again.value and torch.equal(res.witness, again.witness)


def test_radius_bar_over_evaluations(tty, net, x0):
    tty = tty()
    from lipbound.radius import certified_radii, certified_radius

    def exact() -> Analyzer:  # certified factors: no re-checks, a short test
        return Analyzer(net, (1, 8, 8), spectral="exact", name="toy")

    rs = certified_radii(exact(), x0, methods=("local", "margin", "global"), progress=True)
    text = tty.getvalue()
    assert "radius toy" in text and "local eps=" in text and "margin eps=" in text
    _cleared(text)
    plain = certified_radii(exact(), x0, methods=("local", "margin", "global"))
    assert [r.radius for r in rs] == [r.radius for r in plain]
    one = certified_radius(exact(), x0, method="margin", progress=True)
    assert one.radius == certified_radius(exact(), x0, method="margin").radius


def test_compare_bar_names_the_method(tty):
    tty = tty()
    from lipbound.baselines.compare import compare
    from lipbound.zoo import load_model

    lm = load_model("compnet")
    x = torch.zeros(1, *lm.entry.input_shape)
    methods = ["local", "global", "autolip", "seqlip"]
    rows = compare(lm.model, x, 0.1, methods, model_name="compnet", progress=True)
    text = tty.getvalue()
    assert "compare compnet" in text and "method" in text
    for m in methods:
        assert f"compare compnet: {m}" in text
    _cleared(text)
    plain = compare(lm.model, x, 0.1, methods, model_name="compnet")
    assert [r.value for r in rows] == [r.value for r in plain]


def test_bench_bar_over_runs(tty, net, x0):
    tty = tty()
    from lipbound.bench import bench_model

    res = bench_model(net, x0, name="toy", what=("local", "global"), repeat=2,
                      analyzer_options={"spectral": "lanczos", "seed": 3}, progress=True)
    text = tty.getvalue()
    assert "bench toy" in text and "run" in text
    assert "local cold run" in text and "global run 2/2" in text
    _cleared(text)
    assert res.value == _analyzer(net).local_bound(x0, 0.1).value


def test_bench_sweep_and_radius_bars(tty, net, x0):
    tty = tty()
    from lipbound.bench import bench_radius, bench_sweep_model

    bench_sweep_model(net, x0, name="toy", eps_range=(0.01, 1.0), n_points=2,
                      local_repeat=1, progress=True)
    text = tty.getvalue()
    assert "bench sweep toy" in text and "plain loop eps=" in text and "sweep 1/1" in text
    assert bench_radius("mnist", n_images=1, progress=True) is not None
    assert "bench radius mnist" in tty.getvalue() and "image" in tty.getvalue()


# ----------------------------------------------------------------------------- the CLI


def _shape(text: str) -> list[str]:
    """The output's words with every number replaced, and table rules shortened (timings
    differ between runs, and with them the column widths)."""
    text = re.sub(r"-{2,}", "--", text)
    return re.sub(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?", "N", text).split()


CLI_RUNS = [
    ["bound", "--model", "tiny", "--input", "tiny:x0", "--eps-list", "0.1,1", "--method",
     "both"],
    ["bound", "--model", "mnist", "--input", "mnist:test/0-1", "--eps", "0.1"],
    ["layers", "--model", "tiny", "--eps", "1"],
    ["radius", "--model", "tiny", "--attacks", "fgsm"],
    ["compare", "--model", "tiny", "--eps", "1", "--methods", "local,autolip"],
    ["bench", "--model", "tiny", "--repeat", "1", "--threads", "1"],
]


@pytest.mark.parametrize("argv", CLI_RUNS, ids=lambda a: a[0] + "-" + a[2])
def test_cli_bar_on_terminal_stdout_unchanged(argv, capsys, monkeypatch):
    from lipbound.cli import main

    assert main(argv) == 0
    plain = capsys.readouterr()
    assert "\r" not in plain.err  # pytest's stderr is no terminal: no bar
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress_mod, "DELAY", 0.0)
    assert main(argv) == 0
    out = capsys.readouterr().out
    text = err.getvalue()
    assert "\r" in text, f"no bar on stderr for {argv[0]}"
    _cleared(text)
    assert "\r" not in out and "%|" not in out
    assert _shape(out) == _shape(plain.out)


@pytest.mark.parametrize("argv", [CLI_RUNS[0], CLI_RUNS[3]], ids=["bound", "radius"])
def test_cli_json_has_no_bar(argv, capsys, monkeypatch):
    from lipbound.cli import main

    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress_mod, "DELAY", 0.0)
    assert main(argv + ["--json"]) == 0
    assert err.getvalue() == ""
    capsys.readouterr()
