"""Every row of ``bound_many`` (and of its CSV / JSON, and of ``lipbound bound`` on many
inputs) carries the notes that qualify its bound, as the :class:`~lipbound.results.BoundResult`
it comes from does: the analyzer's (the user's, a float32 model's rounding) and the bound's
own (which of the tight bound and the paper's product was reported; the global bound reported
because it was smaller). Before session 26 the rows had no notes field: a float32 model's
rows said nothing of its rounding.

The field is added backward-compatibly: ``notes`` is the last CSV column and a new JSON key,
``InputBound`` built from the ten earlier fields still works, and a CSV written by
``lipbound bound --out`` still serves as an ``--eps-file``."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from lipbound import batch
from lipbound.batch import COLUMNS, InputBound, bound_many
from lipbound.cli import main
from lipbound.results import Guarantee

sys.path.insert(0, str(Path(__file__).parent))

from test_float32_acceptance import X0, _big_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F32 = "float32 rounding"


def _f32(notes) -> list[str]:
    return [n for n in notes if n.startswith(F32)]


def test_rows_carry_the_float32_note_and_the_users_notes():
    an = lipbound.Analyzer(_big_net(), (4,), notes=["mine"])
    assert _f32(an.notes)
    xs = torch.cat([X0, -X0])
    for method in ("local", "global"):
        rows = bound_many(an, xs, 0.1, method)
        for r in rows:
            assert "mine" in r.notes and _f32(r.notes), (method, r.notes)
            assert r.to_dict()["notes"] == list(r.notes)
    # exactly the notes of the bound itself
    direct = an.local_bound(X0, 0.1)
    (row, _) = bound_many(an, xs, 0.1)
    assert row.notes == direct.notes
    # a float64 copy has no rounding note (and the same bounds)
    an64 = lipbound.Analyzer(copy.deepcopy(_big_net()).double(), (4,))
    rows64 = bound_many(an64, xs.double(), 0.1)
    assert not any(_f32(r.notes) for r in rows64)
    assert [r.bound for r in rows64] == pytest.approx([r.bound for r in
                                                       bound_many(an, xs, 0.1)], rel=1e-12)


def _net() -> nn.Sequential:
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def test_tight_rows_say_which_bound_was_reported():
    """The tight bound's note (tight or paper's product reported, both values) is on each
    row, as on the local bound with tight=True."""
    net, x = _net(), X0.double()
    rows = bound_many(net, [x, -x], 0.05, tight=True)
    for r, xi in zip(rows, (x, -x), strict=True):
        direct = lipbound.local_bound(net, xi, 0.05, tight=True)
        assert r.notes == direct.notes
        assert any("tight bound" in n for n in r.notes), r.notes


def test_global_bound_reported_instead_is_noted():
    """A network whose global bound is below the layer-wise product (tests/core_helpers'
    all-active net, Lanczos): the row says the global bound was reported instead (the
    BoundResult's note)."""
    from core_helpers import all_active_net

    net, x0 = all_active_net()
    an = lipbound.Analyzer(net, (2,), spectral="lanczos")
    (r,) = bound_many(an, [x0], 0.3)
    direct = an.local_bound(x0, 0.3)
    assert direct.source == "global"
    assert r.notes == direct.notes
    assert any(n.startswith("the global bound was smaller") for n in r.notes)


def test_input_bound_keeps_its_ten_field_constructor():
    r = InputBound(0, "[0]", None, 1, 0.1, "local", 2.0, Guarantee.CERTIFIED, 0.0, 0.5)
    assert r.notes == ()
    d = r.to_dict()
    assert d["notes"] == [] and list(d)[:10] == list(COLUMNS[:10])
    assert COLUMNS[-1] == "notes" and len(COLUMNS) == 11


def _user_model(tmp_path: Path) -> list[str]:
    src = tmp_path / "net.py"
    src.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                   "from test_float32_acceptance import _big_net\n"
                   "def make():\n    return _big_net()\n")
    np.save(tmp_path / "two.npy", torch.cat([X0, -X0]).numpy())  # a batch of 2
    return ["--model", f"{src}:make", "--input-shape", "4", "--input",
            str(tmp_path / "two.npy")]


def test_cli_json_csv_and_text_rows_carry_their_notes(tmp_path, capsys):
    args = _user_model(tmp_path)
    assert main(["bound", *args, "--eps", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 2
    assert all(_f32(r["notes"]) for r in out["rows"])
    # CSV: the notes column is the last one, the earlier columns as before
    csv_path = tmp_path / "rows.csv"
    assert main(["bound", *args, "--eps", "0.1", "--tight", "--out", str(csv_path)]) == 0
    text = capsys.readouterr().out
    assert "note: float32 rounding" in text
    assert "column 'notes'" in text  # the rows' own (tight) notes are in the file
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert len(rows) == 2
    for r in rows:
        notes = r["notes"].split(batch.NOTE_SEPARATOR)
        assert _f32(notes) and any(n.startswith("tight bound") or "tight bound" in n
                                   for n in notes), notes
    # the table shows each row's own notes below it (the shared ones once)
    assert main(["bound", *args, "--eps", "0.1", "--tight"]) == 0
    text = capsys.readouterr().out
    assert text.count("note: float32 rounding") == 1
    own = [ln for ln in text.splitlines() if ln.startswith("note (input ")]
    assert len(own) == 2, text
    assert all(", eps 0.1, tight): tight bound" in ln for ln in own), own


def test_the_rows_csv_still_serves_as_an_eps_file(tmp_path, capsys):
    """A CSV written by ``--out`` (now with a notes column holding commas and semicolons)
    still gives its radii back to ``--eps-file``."""
    args = _user_model(tmp_path)
    csv_path = tmp_path / "rows.csv"
    assert main(["bound", *args, "--eps-list", "0.1", "--tight", "--out", str(csv_path)]) == 0
    capsys.readouterr()
    assert main(["bound", *args, "--eps-file", str(csv_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["eps"] for r in out["rows"]] == [0.1, 0.1]
    assert all(math.isfinite(r["bound"]) for r in out["rows"])
