"""Adversarial review (session 22) of bound_many and the many-input ``bound`` table, the
``layers`` command, the Jacobian helpers of the lower bounds and the ``radius`` command's
output.

Each test names the defect it pins and fails on the code before its fix. The networks are
tiny float64 ones with exact constants: ``y = W x`` with a diagonal ``W`` (Lipschitz constant
``max |w_ii|``, exactly), and the identity on two coordinates, whose smallest class-changing
L2 perturbation at ``x0`` is ``|x0_0 - x0_1| / sqrt(2)`` exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from lipbound.batch import bound_many
from lipbound.cli import main
from lipbound.errors import InputError

NETS = textwrap.dedent("""
    import torch
    from torch import nn

    D = torch.float64

    def diag():
        # y = diag(1.23454, 0.5) x: every local and global constant is 1.23454 exactly
        m = nn.Sequential(nn.Linear(2, 2)).double().eval()
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor([[1.23454, 0.0], [0.0, 0.5]], dtype=D))
            m[0].bias.zero_()
        return {"model": m, "input_shape": (2,)}

    def diag6():
        # y = diag(1.23456, 0.5) x: every local constant is 1.23456 exactly
        m = nn.Sequential(nn.Linear(2, 2)).double().eval()
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor([[1.23456, 0.0], [0.0, 0.5]], dtype=D))
            m[0].bias.zero_()
        return {"model": m, "input_shape": (2,)}

    def identity():
        # y = x: the class changes first where x_0 = x_1, at distance |x_0 - x_1| / sqrt(2)
        m = nn.Sequential(nn.Linear(2, 2)).double().eval()
        with torch.no_grad():
            m[0].weight.copy_(torch.eye(2, dtype=D))
            m[0].bias.zero_()
        return {"model": m, "input_shape": (2,)}

    def overflow():
        # finite weights; the float64 forward pass overflows (inf * 0 = NaN in the last
        # layer) at an input whose first coordinate is large, and is fine elsewhere
        m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor([[1e300, 0], [0, 1.0], [1.0, 1.0]], dtype=D))
            m[0].bias.zero_()
            m[2].weight.copy_(torch.tensor([[0, 1.0, 0], [0, 0, 1.0]], dtype=D))
            m[2].bias.zero_()
        return {"model": m, "input_shape": (2,)}
""")

#: the exact constant of ``diag`` and the exact smallest adversarial distance of ``identity``
DIAG_L = 1.23454
X_ID = np.array([[1.0, 0.5]], dtype=np.float32)
ID_DIST = 0.5 / math.sqrt(2)


@pytest.fixture()
def nets(tmp_path):
    src = tmp_path / "nets.py"
    src.write_text(NETS)
    return src


def _num(s: str) -> float:
    return float(s.strip())


# --------------------------------------------------- displayed numbers: rounding direction


def test_radius_text_never_shows_a_certified_radius_above_the_exact_distance(nets, tmp_path,
                                                                             capsys):
    """Defect (fails before the fix): ``lipbound radius`` printed the certified radius
    0.35355338917 of ``y = x`` at (1, 0.5) rounded to nearest, ``certified radius 0.3536``,
    above the exact smallest class-changing distance 0.35355339059 (and next to a verified
    attack at 0.3535534327, also shown as 0.3536). A certified radius is shown rounded down,
    an attack radius rounded up."""
    x = tmp_path / "x.npy"
    np.save(x, X_ID)
    argv = ["radius", "--model", f"{nets}:identity", "--input", str(x), "--attacks", "cw"]
    assert main(argv + ["--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    atk = obj["attacks"][0]["radius"]
    assert obj["certified_radius"] <= ID_DIST <= atk
    assert main(argv) == 0
    out = capsys.readouterr().out
    m = re.search(r"certified radius (\S+) ", out)
    assert m and _num(m.group(1)) <= ID_DIST, out
    m = re.search(r"smallest attack radius (\S+) ", out)
    assert m and _num(m.group(1)) >= atk, out
    table = [ln.split() for ln in out.splitlines()
             if ln.split()[:1] in (["local"], ["margin"], ["global"], ["cw"])]
    assert len(table) == 4
    for cells in table:
        if cells[1] == "certified":
            assert _num(cells[2]) <= ID_DIST, cells
        else:
            assert _num(cells[2]) >= atk, cells


def test_radius_many_text_rounds_each_radius_in_its_safe_direction(nets, tmp_path, capsys):
    """Defect (fails before the fix): the many-input table and its summary showed certified
    radii rounded to nearest (0.3536 > the exact 0.353553...)."""
    x = tmp_path / "xs.npy"
    np.save(x, np.vstack([X_ID, X_ID]))
    assert main(["radius", "--model", f"{nets}:identity", "--input", str(x), "--methods",
                 "global"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines()]
    per_input = [c for c in rows if len(c) >= 5 and c[0] in ("0", "1")]
    assert len(per_input) == 2
    for c in per_input:
        assert _num(c[4]) <= ID_DIST, c
    summary = [c for c in rows if len(c) == 5 and c[:2] == ["global", "certified"]]
    assert summary
    for v in summary[0][2:]:
        assert _num(v) <= ID_DIST, summary


def test_bound_many_table_never_shows_an_upper_bound_below_the_exact_constant(nets, tmp_path,
                                                                              capsys):
    """Defect (fails before the fix): the many-input table of ``lipbound bound`` showed the
    certified upper bound 1.23454000... of ``y = diag(1.23454, 0.5) x`` as ``1.2345``, below
    the exact constant 1.23454."""
    x = tmp_path / "xs.npy"
    np.save(x, np.array([[0.3, -0.2], [1.0, 2.0]], dtype=np.float32))
    assert main(["bound", "--model", f"{nets}:diag", "--input", str(x), "--method", "both",
                 "--eps", "0.1"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines()]
    table = [c for c in rows if len(c) >= 8 and c[5] in ("local", "global")]
    assert len(table) == 4
    for c in table:
        assert _num(c[6]) >= DIAG_L, c
    for m in re.finditer(r"bound min (\S+) / median (\S+) / max (\S+);", out):
        assert all(_num(v) >= DIAG_L for v in m.groups()), m.group(0)


def test_layers_table_never_shows_a_factor_below_the_exact_layer_constant(nets, tmp_path,
                                                                          capsys):
    """Defect (fails before the fix): ``lipbound layers`` showed the one layer's local and
    global factors (upper bounds on its constant 1.23454) as ``1.2345``."""
    x = tmp_path / "x.npy"
    np.save(x, np.array([[0.3, -0.2]], dtype=np.float32))
    assert main(["layers", "--model", f"{nets}:diag", "--input", str(x), "--eps",
                 "0.1"]) == 0
    out = capsys.readouterr().out
    row = [ln.split() for ln in out.splitlines() if ln.startswith("0 ")]
    assert len(row) == 1
    assert _num(row[0][4]) >= DIAG_L and _num(row[0][5]) >= DIAG_L, row
    for m in re.finditer(r"(?:local bound at eps 0.1|global bound|product of the local "
                         r"factors):\s+([0-9.e+-]+)", out):
        assert _num(m.group(1)) >= DIAG_L, m.group(0)


def test_radius_csv_holds_the_exact_radii(nets, tmp_path, capsys):
    """Defect (fails before the fix): radius.csv wrote radii with 10 significant digits,
    rounded to nearest: the C&W radius 0.35355343274012... became 0.3535534327, below the
    distance of the verified adversarial example it stands for, and the certified radii
    were not those of the JSON. The CSV holds the exact floats (as bound_many's CSV does)."""
    x = tmp_path / "xs.npy"
    np.save(x, np.vstack([X_ID, np.array([[0.25, 1.5]], dtype=np.float32)]))
    out_dir = tmp_path / "out"
    assert main(["radius", "--model", f"{nets}:identity", "--input", str(x), "--attacks",
                 "cw", "--out", str(out_dir), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    with (out_dir / "radius.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row, ref in zip(rows, obj["inputs"], strict=True):
        assert row["input"] == ref["input"]
        assert float(row["certified_radius"]) == ref["certified_radius"]
        for c in ref["certified"]:
            assert float(row[f"{c['method']}_radius"]) == c["radius"]
        assert float(row["cw_radius"]) == ref["attacks"][0]["radius"]
        assert float(row["margin"]) == ref["margin"]
    # and the attack radii bound the exact distance (the certified ones are below it)
    assert float(rows[0]["cw_radius"]) >= ID_DIST >= float(rows[0]["certified_radius"])


# ------------------------------------------------------- one bad input among many


def test_bound_many_refuses_a_prediction_from_a_non_finite_output(nets, tmp_path, capsys):
    """Defect (fails before the fix): with ``--method global`` an input at which the float64
    forward pass is NaN got the row ``predicted 0`` (argmax of NaN), counted in the accuracy
    like any other; the radius command refuses such an input. It is an InputError naming the
    input."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("s22_nets", nets)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.overflow()["model"]
    xs = torch.tensor([[1e-10, 0.5], [1e10, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert not torch.isfinite(model(xs[1:2])).all()
    with pytest.raises(InputError, match=r"\[1\].*not finite"):
        bound_many(model, xs, None, "global")
    x = tmp_path / "xs.npy"
    np.save(x, xs.numpy().astype(np.float32))
    rc = main(["bound", "--model", f"{nets}:overflow", "--input", str(x), "--method",
               "global"])
    err = capsys.readouterr().err
    assert rc == 2 and "xs.npy[1]" in err, err


@pytest.mark.parametrize("cmd", [["bound", "--eps", "0.1"], ["radius"]])
def test_a_failing_input_among_many_is_named(nets, tmp_path, capsys, cmd):
    """Defect (fails before the fix): when the bound or radius of one input of many failed
    (here the float64 forward pass overflows at the second of three), the error did not say
    which input: ``the float64 forward pass at x0 overflows ...`` for a run over a whole
    test set."""
    x = tmp_path / "xs.npy"
    np.save(x, np.array([[1e-10, 0.5], [1e10, 1.0], [0.0, 1.0]], dtype=np.float32))
    rc = main([*cmd, "--model", f"{nets}:overflow", "--input", str(x)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lipbound: error:")
    assert "xs.npy[1]" in err, err


def test_bound_many_local_failure_names_the_input():
    """The library call names the failing input too (its name and position)."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1e300, 0], [0, 1.0], [1.0, 1.0]],
                                           dtype=torch.float64))
        model[2].weight.copy_(torch.tensor([[0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64))
    xs = torch.tensor([[1e-10, 0.5], [0.0, 1.0], [1e10, 1.0]], dtype=torch.float64)
    with pytest.raises(InputError, match=r"input \[2\]"):
        bound_many(model, xs, 0.1, share_global=False)


# ------------------------------------------------------------------ Jacobian helpers


def test_power_iteration_jacobian_that_overflows_is_refused_like_the_svd_one():
    """Defect (fails before the fix): for a Jacobian that overflows float64 (a finite output
    whose derivative is 1e400), ``jacobian_spectrum`` raised an InputError on the SVD route
    but returned ``value = nan`` with NaN vectors on the power-iteration route
    (``exact_threshold=0``), and ``jacobian_norm_at`` a silent NaN."""
    from lipbound.lower import jacobian_norm_at, jacobian_spectrum, pgd_lower_bound

    m = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1)).double().eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1e200, -1e200]], dtype=torch.float64))
        m[0].bias.fill_(1.0)
        m[2].weight.fill_(1e200)
        m[2].bias.zero_()
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    assert torch.isfinite(m(x)).all()
    with pytest.raises(InputError, match="not finite"):
        jacobian_spectrum(m, x)
    with pytest.raises(InputError, match="not finite"):
        jacobian_spectrum(m, x, exact_threshold=0)
    with pytest.raises(InputError, match="not finite"):
        jacobian_norm_at(m, x, exact_threshold=0)
    # the PGD lower bound, which starts from these directions, still works (random starts),
    # and its value is attained at its witness (checked exactly: |f(w) - f(x)| / ||w - x||)
    r = pgd_lower_bound(m, x, 1e-3, exact_threshold=0)
    w = [Fraction(float(v)) for v in r.witness.reshape(-1).tolist()]
    x_ = [Fraction(1), Fraction(1)]

    def f(v):
        h = max(Fraction(1e200) * v[0] - Fraction(1e200) * v[1] + 1, Fraction(0))
        return Fraction(1e200) * h

    d2 = sum((a - b) ** 2 for a, b in zip(w, x_, strict=True))
    assert 0 < d2 <= Fraction(1e-3) ** 2
    assert Fraction(r.value) ** 2 * d2 <= (f(w) - f(x_)) ** 2


# ------------------------------------------------------------------ --eps-file


def test_eps_file_with_a_byte_order_mark(tmp_path):
    """Defect (fails before the fix): a radius file saved with a UTF-8 byte order mark (as
    spreadsheet programs write CSV) was refused with a message that names the very column it
    has: "the header has no column 'eps' (columns: eps)"; a file of bare numbers was read as
    a header ("columns: 0.1")."""
    from lipbound.cli.bound_many import read_eps_file

    a = tmp_path / "a.csv"
    a.write_bytes("eps\n0.1\n0.2\n".encode("utf-8-sig"))
    assert read_eps_file(a) == [0.1, 0.2]
    b = tmp_path / "b.txt"
    b.write_bytes("0.1\n0.3\n".encode("utf-8-sig"))
    assert read_eps_file(b) == [0.1, 0.3]


def test_bound_many_text_rows_match_the_json_rows(nets, tmp_path, capsys):
    """(Held before the fix.) Each row of the many-input table is its own input's: names,
    predictions and labels in input order, the same as the JSON."""
    x = tmp_path / "xs.npy"
    xs = np.array([[0.3, -0.2], [-1.0, 2.0], [4.0, 1.0]], dtype=np.float32)
    np.save(x, xs)
    assert main(["bound", "--model", f"{nets}:identity", "--input", str(x), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert [r["predicted"] for r in obj["rows"]] == [int(np.argmax(v)) for v in xs]
    assert [r["name"] for r in obj["rows"]] == [f"{x}[{i}]" for i in range(3)]
    assert all(r["bound"] >= 1.0 for r in obj["rows"])
    buf = io.StringIO()
    json.dump(obj, buf, allow_nan=False)  # strict JSON


def test_eps_file_that_is_not_text_is_an_input_error(nets, tmp_path, capsys):
    """Defect (fails before the fix): ``--eps-file`` naming a binary file (an .npy array of
    radii, a natural mistake) died with a UnicodeDecodeError traceback."""
    x = tmp_path / "xs.npy"
    np.save(x, np.array([[0.3, -0.2], [1.0, 2.0]], dtype=np.float32))
    radii = tmp_path / "radii.npy"
    np.save(radii, np.array([0.1, 0.2]))
    rc = main(["bound", "--model", f"{nets}:diag", "--input", str(x), "--eps-file",
               str(radii)])
    err = capsys.readouterr().err
    assert rc == 2 and "radii.npy" in err and "text" in err, err


def test_single_bound_table_never_shows_a_bound_below_the_exact_constant(nets, tmp_path,
                                                                         capsys):
    """Defect (fails before the fix): the one-input table of ``lipbound bound`` (and its layer
    table) showed the upper bound 1.23454000... as ``1.2345``, below the exact 1.23454."""
    x = tmp_path / "x.npy"
    np.save(x, np.array([[0.3, -0.2]], dtype=np.float32))
    assert main(["bound", "--model", f"{nets}:diag", "--input", str(x), "--eps", "0.1"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines()]
    bound = [c for c in rows if c[:1] == ["local"]]
    layer = [c for c in rows if c[:1] == ["0"]]
    assert len(bound) == 1 and len(layer) == 1, out
    assert _num(bound[0][2]) >= DIAG_L, bound
    assert _num(layer[0][3]) == 0.1  # the radius given, as given
    assert _num(layer[0][4]) >= DIAG_L, layer


def test_eps_file_rows_in_another_order_than_the_inputs_are_refused(nets, tmp_path, capsys):
    """Defect (fails before the fix): radii are matched to inputs by position, and a radius
    file with the inputs' ``index`` (or ``name``) column in another order -- the CSV that
    ``lipbound bound --out`` writes, sorted by bound in a spreadsheet and fed back -- was
    silently read in file order: each input got another input's radius. It is refused; the
    same file in input order is read."""
    x = tmp_path / "xs.npy"
    np.save(x, np.array([[0.3, -0.2], [1.0, 2.0], [-1.0, 0.5]], dtype=np.float32))
    argv = ["bound", "--model", f"{nets}:diag", "--input", str(x), "--json"]
    ok = tmp_path / "ok.csv"
    ok.write_text("index,name,eps\n0,a,0.1\n1,b,0.2\n2,c,0.3\n")
    assert main([*argv, "--eps-file", str(ok)]) == 0
    assert [r["eps"] for r in json.loads(capsys.readouterr().out)["rows"]] == [0.1, 0.2, 0.3]
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("index,eps\n2,0.3\n0,0.1\n1,0.2\n")
    assert main([*argv, "--eps-file", str(shuffled)]) == 2
    err = capsys.readouterr().err
    assert "index" in err and "order" in err, err
    names = tmp_path / "names.csv"
    names.write_text(f"name,eps\n{x}[1],0.2\n{x}[0],0.1\n{x}[2],0.3\n")
    assert main([*argv, "--eps-file", str(names)]) == 2
    err = capsys.readouterr().err
    assert "name" in err and "order" in err, err


def test_sweep_table_shows_lower_bounds_rounded_down_and_upper_bounds_up(nets, tmp_path,
                                                                         capsys):
    """Defect (fails before the fix): ``lipbound sweep`` showed the PGD lower bound
    1.2345599999... of ``y = diag(1.23456, 0.5) x`` as ``1.2346``, above the exact constant
    1.23456 it is a lower bound of (on the zoo's tiny net: 7.538264019 shown as 7.5383, above
    the certified upper bound 7.538264034)."""
    x = tmp_path / "x.npy"
    np.save(x, np.array([[0.3, -0.2]], dtype=np.float32))
    assert main(["sweep", "--model", f"{nets}:diag6", "--input", str(x), "--eps-min", "0.1",
                 "--eps-max", "1", "--points", "2", "--methods", "local,global,pgd,random",
                 "--samples", "200", "--steps", "20", "--restarts", "2", "--out",
                 str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if re.match(r"\d", ln)]
    assert len(rows) == 2, out
    exact = 1.23456
    for c in rows:
        assert _num(c[1]) >= exact and _num(c[2]) >= exact, c
        assert _num(c[3]) <= exact and _num(c[4]) <= exact, c


def test_single_bound_header_gives_no_class_for_a_non_finite_output(nets, tmp_path, capsys):
    """Defect (fails before the fix): ``lipbound bound --method global`` at one input where the
    float64 output is NaN named ``predicted class 0`` (argmax of NaN) in its header."""
    x = tmp_path / "x.npy"
    np.save(x, np.array([[1e10, 1.0]], dtype=np.float32))
    assert main(["bound", "--model", f"{nets}:overflow", "--input", str(x), "--method",
                 "global"]) == 0
    out = capsys.readouterr().out
    assert "predicted class 0" not in out and "not finite" in out, out


def test_directed_formatting_never_crosses_the_value():
    """The table helpers: ``fmt_up``/``g_up`` never show less than the float, ``fmt_down``/
    ``g_down`` never more (random magnitudes from 1e-300 to 1e300, both signs, and the
    layouts' switch points)."""
    from lipbound.cli.rounding import fmt_down, fmt_up, g_down, g_up

    rng = np.random.default_rng(0)
    vals = list(rng.standard_normal(300) * 10.0 ** rng.integers(-300, 300, 300))
    vals += [0.0, 1e-3, 1e5, 100.0, 99.99999, 0.1, 1.23454, 1.23456, 2e-7, 0.35355338917]
    vals += [math.nextafter(v, math.inf) for v in (1e-3, 1e5, 100.0)]
    for v in map(float, vals):
        assert float(fmt_up(v)) >= v and float(fmt_down(v)) <= v, v
        for d in (4, 6):
            assert float(g_up(v, d)) >= v and float(g_down(v, d)) <= v, (v, d)
    assert fmt_up(math.inf) == "inf" and fmt_down(None) == "-"
    assert fmt_up(1.0) == "1.0000" and g_up(105515.47745866473, 6) == "105516"
