"""--seed (start vectors and draws; 'fresh' from the operating system) and --weights-seed
(the zoo's random weights) on the command line: what each one seeds, reproducibility of a
fresh seed, and clear errors where a seed would be ignored."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from lipbound.cli import main


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_err(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit status {rc}, stderr: {err}"
    return err


def fresh_seed(notes: list[str]) -> int:
    found = [m.group(1) for n in notes for m in [re.search(r"repeat with --seed (\d+)", n)]
             if m]
    assert len(found) == 1, notes
    return int(found[0])


# MNIST's local bound runs Lanczos on its convolutions: its value depends on the seed
LANCZOS = ["bound", "--model", "mnist", "--method", "local", "--spectral", "lanczos",
           "--threads", "1"]


def test_fresh_seed_is_reported_and_reproduces_the_run(capsys):
    a = run_json(capsys, LANCZOS + ["--seed", "fresh"])
    b = run_json(capsys, LANCZOS + ["--seed", "fresh"])
    sa, sb = fresh_seed(a["notes"]), fresh_seed(b["notes"])
    assert sa != sb  # 62 random bits each
    assert a["guarantee"] == "probabilistic upper bound"
    again = run_json(capsys, LANCZOS + ["--seed", str(sa)])
    assert again["value"] == a["value"]
    assert again["failure_prob"] == a["failure_prob"]
    assert not any("fresh" in n for n in again["notes"])


def test_integer_seed_reaches_the_start_vectors(capsys):
    values = {run_json(capsys, LANCZOS + ["--seed", str(s)])["value"] for s in (0, 1, 2)}
    assert len(values) > 1  # Lanczos from different start vectors stops at different values


@pytest.mark.parametrize(("flags", "weights"), [
    ([], "torch.manual_seed(0)"),
    (["--seed", "3"], "torch.manual_seed(3)"),  # an integer --seed also seeds the weights
    (["--seed", "3", "--weights-seed", "0"], "torch.manual_seed(0)"),
    (["--weights-seed", "5"], "torch.manual_seed(5)"),
    (["--seed", "fresh"], "torch.manual_seed(0)"),  # a fresh draw keeps the weights
])
def test_weights_seed_of_a_seeded_zoo_network(capsys, flags, weights):
    out = run_json(capsys, ["bound", "--model", "compnet", *flags])
    assert any(n.startswith(f"compnet: {weights} ") for n in out["notes"]), out["notes"]


def test_weights_seed_changes_the_network_and_seed_alone_not(capsys):
    base = run_json(capsys, ["bound", "--model", "compnet", "--spectral", "exact"])["value"]
    same = run_json(capsys, ["bound", "--model", "compnet", "--spectral", "exact",
                             "--seed", "9", "--weights-seed", "0"])["value"]
    other = run_json(capsys, ["bound", "--model", "compnet", "--spectral", "exact",
                              "--weights-seed", "9"])["value"]
    assert same == base  # exact route: the start vectors do not enter
    assert other != base


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", ""])
def test_bad_seed_is_a_clear_error(capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["bound", "--model", "mnist", "--seed", value])
    assert exc.value.code == 2
    assert "expected an integer >= 0 or 'fresh'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "mnist"], "mnist has fixed weights"),
    (["--model", "tiny"], "tiny has fixed weights"),
    (["--model", "alexnet", "--weights", "w.pt"], "alexnet loads --weights"),
])
def test_weights_seed_that_would_be_ignored_is_refused(capsys, argv, needle):
    err = run_err(capsys, ["bound", *argv, "--weights-seed", "1"])
    assert needle in err and "drop --weights-seed" in err


def test_weights_seed_of_a_user_model_is_refused(capsys, tmp_path):
    f = tmp_path / "nets.py"
    f.write_text(textwrap.dedent("""
        from torch import nn
        def make():
            return {"model": nn.Sequential(nn.Linear(3, 2)).eval(), "input_shape": (3,)}
    """))
    err = run_err(capsys, ["bound", "--model", f"{f}:make", "--input-shape", "3",
                           "--weights-seed", "1"])
    assert "user model" in err and "drop --weights-seed" in err


def test_bench_uses_the_seed(capsys):
    argv = ["--model", "mnist", "--spectral", "lanczos", "--threads", "1", "--eps", "0.1"]
    bound = run_json(capsys, ["bound", *argv, "--method", "local", "--seed", "4"])
    bench = run_json(capsys, ["bench", *argv, "--what", "local", "--repeat", "1",
                              "--seed", "4"])
    assert bench["value"] == bound["value"]


def test_compare_uses_the_seed_and_reports_a_fresh_one(capsys):
    argv = ["--model", "mnist", "--threads", "1", "--eps", "0.1"]
    for seed in ("4", "7"):
        bound = run_json(capsys, ["bound", *argv, "--method", "local", "--seed", seed])
        rows = run_json(capsys, ["compare", *argv, "--methods", "local", "--seed", seed])
        assert rows["rows"][0]["value"] == bound["value"]
    fresh = run_json(capsys, ["compare", *argv, "--methods", "local", "--seed", "fresh"])
    again = run_json(capsys, ["compare", *argv, "--methods", "local", "--seed",
                              str(fresh_seed(fresh["notes"]))])
    assert again["rows"][0]["value"] == fresh["rows"][0]["value"]
