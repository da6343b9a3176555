"""Session 26 audit: every public result and output format states its guarantee (with the
failure probability where probabilistic) and the notes of the analysis that produced it.
Each test here is a gap the audit found (they fail before the session's fixes):

* a certified radius carried only the analyzer's notes, not those of the bound that
  certified it (with ``tight=True``: whether the tight bound or the paper's product was
  used), and ``radius.csv`` had no notes at all (a float32 model's rounding note included);
* the sweep's CSV had no notes (its JSON had them);
* compare's ``lower`` row dropped the lower bound's own caveat (no finite ratio found: the
  value is 0);
* the bench's sweep and radius results (``lipbound bench --json``: ``sweep``, ``radius``)
  stated no guarantee of their values and no notes; its table showed a probabilistic bound
  without its failure probability;
* ``layers.csv`` had no notes;
* the rival methods called on a float32 model directly (not through ``compare``) did not say
  that their values are of its weights in exact arithmetic;
* ``lipbound demo`` printed no notes; ``lipbound bound`` with several radii printed the
  results' notes as a set (in an order that changed between runs), not saying which result a
  note was of.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import lipbound
from lipbound import batch, bench, radius
from lipbound import sweep as lb_sweep
from lipbound.cli import main
from lipbound.results import Guarantee

sys.path.insert(0, str(Path(__file__).parent))

from test_float32_acceptance import X0, _big_net  # noqa: E402
from test_row_notes import _f32, _net  # noqa: E402  (one definition each)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SEP = " | "  # lipbound.batch.NOTE_SEPARATOR


# ------------------------------------------------------------------------------ radius
def test_radius_carries_the_notes_of_the_bound_that_certified_it():
    net, x = _net(), X0.double()
    an = lipbound.Analyzer(net, (4,), notes=["mine"])
    for method in ("local", "margin"):
        r = radius.certified_radius(an, x, method=method, tight=True)
        assert r.notes[0] == "mine", r.notes  # the analyzer's first
        assert any("tight bound" in n for n in r.notes), (method, r.notes)
        assert r.to_dict()["notes"] == list(r.notes)
    # without tight: the analyzer's notes (no note of the local product)
    plain = radius.certified_radius(an, x)
    assert plain.notes == ("mine",)


def _user_model(tmp_path: Path) -> list[str]:
    src = tmp_path / "net.py"
    src.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                   "from test_float32_acceptance import _big_net\n"
                   "def make():\n    return _big_net()\n")
    np.save(tmp_path / "two.npy", torch.cat([X0, -X0]).numpy())
    return ["--model", f"{src}:make", "--input-shape", "4", "--input",
            str(tmp_path / "two.npy")]


def test_radius_csv_has_a_notes_column(tmp_path, capsys):
    args = _user_model(tmp_path)
    assert main(["radius", *args, "--attacks", "fgsm", "--tight", "--out",
                 str(tmp_path / "o")]) == 0
    capsys.readouterr()
    with (tmp_path / "o" / "radius.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames[-1] == "notes"
        rows = list(reader)
    assert len(rows) == 2
    for r in rows:
        notes = r["notes"].split(SEP)
        assert _f32(notes), notes  # the analyzer's, once
        assert any(n.startswith(("local: ", "margin: ")) and "tight bound" in n
                   for n in notes), notes


def test_radius_text_shows_the_certifying_bounds_notes(tmp_path, capsys):
    np.save(tmp_path / "a.npy", X0[0].double().numpy())
    src = tmp_path / "net.py"
    src.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                   "from test_result_notes import _net\n"
                   "def make():\n    return _net()\n")
    assert main(["radius", "--model", f"{src}:make", "--input-shape", "4", "--input",
                 str(tmp_path / "a.npy"), "--attacks", "fgsm", "--tight"]) == 0
    out = capsys.readouterr().out
    assert "note (local): " in out and "tight bound" in out


# ------------------------------------------------------------------------------- sweep
def test_sweep_csv_has_the_notes():
    res = lb_sweep.sweep(_big_net(), X0, [0.1, 0.2], ("local", "global"), notes=["mine"])
    assert _f32(res.notes) and "mine" in res.notes
    assert res.columns()[-1] == "notes"


def test_sweep_csv_file_rows_carry_the_notes(tmp_path):
    res = lb_sweep.sweep(_big_net(), X0, [0.1, 0.2], ("local", "global"), notes=["mine"])
    path = res.to_csv(tmp_path / "s.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for r in rows:
        notes = r["notes"].split(SEP)
        assert notes == list(res.notes) and _f32(notes)
    # (the JSON had them already)
    assert json.loads(json.dumps(res.to_dict()))["notes"] == list(res.notes)


# ----------------------------------------------------------------------------- compare
def test_compare_lower_row_keeps_the_lower_bounds_note(monkeypatch):
    import lipbound.lower as lower

    real = lower.best_lower_bound
    note = "no point found with a finite ratio (test): the value is 0"

    def with_note(*a, **kw):
        res = real(*a, **kw)
        return replace(res, details={**res.details, "note": note})

    monkeypatch.setattr(lower, "best_lower_bound", with_note)
    from lipbound.baselines import compare

    (row,) = compare(_net(), X0.double(), 0.1, ["lower"])
    assert row.guarantee == Guarantee.LOWER
    assert note in row.note


# ------------------------------------------------------------------------------- bench
def test_bench_sweep_states_guarantees_and_notes():
    sb = bench.bench_sweep_model(_big_net(), X0, name="big", eps_range=(0.05, 0.2),
                                 n_points=2, local_repeat=1, raw=False, notes=["mine"])
    d = sb.to_dict()
    assert d["guarantees"] and set(d["guarantees"]) <= {
        Guarantee.CERTIFIED.value, Guarantee.PROBABILISTIC.value, Guarantee.EXACT.value}
    assert (sb.failure_prob_max > 0) == (Guarantee.PROBABILISTIC.value in sb.guarantees)
    assert "mine" in d["notes"] and _f32(d["notes"])


def test_bench_radius_states_each_radius_guarantee():
    rb = bench.bench_radius("mnist", n_images=2)
    d = rb.to_dict()
    assert len(d["guarantees"]) == len(d["failure_probs"]) == 2
    for g, fp in zip(rb.guarantees, rb.failure_probs, strict=True):
        assert g in (Guarantee.CERTIFIED_LOWER.value, Guarantee.PROBABILISTIC_LOWER.value)
        assert (fp > 0) == (g == Guarantee.PROBABILISTIC_LOWER.value)
    assert isinstance(d["notes"], list)


def test_bench_table_shows_the_failure_probability(capsys):
    assert main(["bench", "--model", "mnist", "--what", "local", "--repeat", "1",
                 "--spectral", "lanczos"]) == 0
    out = capsys.readouterr().out
    assert "probabilistic upper bound (p_fail<=" in out


def test_batch_separator_is_the_documented_one():
    assert batch.NOTE_SEPARATOR == SEP


# ------------------------------------------------------------------------------ layers
def test_layers_csv_has_the_analysis_notes(tmp_path, capsys):
    args = _user_model(tmp_path)
    np.save(tmp_path / "a.npy", X0[0].numpy())
    args[-1] = str(tmp_path / "a.npy")
    assert main(["layers", *args, "--eps", "0.1", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    with (tmp_path / "o" / "layers.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames[-1] == "notes"
        rows = list(reader)
    assert len(rows) == 2
    assert all(_f32(r["notes"].split(SEP)) for r in rows)


# ------------------------------------------------------------------------------ rivals
def test_rivals_called_directly_carry_the_float32_note():
    """Each rival method given the float32 model itself (not through compare) says that its
    value is of the weights in exact arithmetic, as compare's rows and lipbound's own
    results do; with an output map too; not for the float64 copy."""
    from lipbound import baselines

    c = torch.tensor([[1.0, -1.0, 0.0]])
    runs = {
        "autolip": lambda m, x: baselines.autolip(m, input_shape=(4,)),
        "seqlip": lambda m, x: baselines.seqlip(m, input_shape=(4,)),
        "eclipse_fast": lambda m, x: baselines.eclipse_fast(m, input_shape=(4,)),
        "lipsdp": lambda m, x: baselines.lipsdp(m, input_shape=(4,)),
        "fastlip": lambda m, x: baselines.fastlip(m, x, 0.1, output_map=c.to(x.dtype)),
        "recurjac": lambda m, x: baselines.recurjac(m, x, 0.1),
        "exact_local_l2": lambda m, x: baselines.exact_local_l2(m, x, 0.1),
        "lipmip": lambda m, x: baselines.lipmip(m, x, 0.1, c=c[0].to(x.dtype)),
    }
    for name, run in runs.items():
        r = run(_big_net(), X0)
        assert _f32(r.notes), (name, r.notes)
        r64 = run(_big_net().double(), X0.double())
        assert not _f32(r64.notes), (name, r64.notes)
        assert r.value == pytest.approx(r64.value, rel=1e-9), name


# ------------------------------------------------------------------------------- bound
def test_bound_text_says_which_result_a_note_is_of(tmp_path, capsys):
    """Several radii at one input: the notes all results share once (in a fixed order; a
    set printed them in an order that changed between runs), each result's own with its
    method and radius (the tight notes of two radii were printed side by side, unnamed)."""
    args = _user_model(tmp_path)
    np.save(tmp_path / "a.npy", X0[0].numpy())
    args[-1] = str(tmp_path / "a.npy")
    assert main(["bound", *args, "--eps-list", "0.05,0.1", "--tight"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: float32 rounding") == 1
    for e in ("0.05", "0.1"):
        assert f"note (local, eps {e}): " in out and "tight bound" in out


def test_demo_text_shows_the_notes(capsys):
    """The demo's table has tight rows: the text says which bound each one is (it printed no
    note at all)."""
    assert main(["demo", "--eps-list", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "note (tight, eps 0.01): " in out and "tight bound" in out
