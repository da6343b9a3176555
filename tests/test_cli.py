"""End-to-end tests of the core CLI commands (models, bound, demo) and user-model intake."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from lipbound.cli import main


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_models_lists_the_zoo(capsys):
    rows = run_json(capsys, ["models"])
    names = {r["name"] for r in rows}
    assert {"tiny", "compnet", "mnist", "cifar10", "alexnet", "vgg16"} <= names
    shapes = {r["name"]: r["input_shape"] for r in rows}
    assert shapes["mnist"] == [1, 28, 28] and shapes["vgg16"] == [3, 224, 224]


def test_bound_json_keys_and_order(capsys):
    loc = run_json(capsys, ["bound", "--model", "mnist", "--input", "mnist:8", "--eps", "0.1"])
    for key in ("value", "guarantee", "method", "eps", "seconds", "layers"):
        assert key in loc
    assert loc["method"] == "local" and loc["eps"] == 0.1
    assert loc["guarantee"] in ("certified upper bound", "probabilistic upper bound")
    glob = run_json(capsys, ["bound", "--model", "mnist", "--input", "mnist:8",
                             "--method", "global"])
    assert 0 < loc["value"] <= glob["value"]
    # the product of the per-layer factors is the reported value (or the global one)
    prod = float(np.prod([lf["local"] for lf in loc["layers"]]))
    assert loc["value"] <= prod * (1 + 1e-12)


def test_bound_table_output(capsys):
    assert main(["bound", "--model", "tiny", "--input", "tiny:x0", "--eps-list", "0.1,1",
                 "--method", "both"]) == 0
    out = capsys.readouterr().out
    assert "global" in out and "local" in out and "guarantee" in out


def test_demo_runs(capsys):
    assert main(["demo", "--eps-list", "0.01,0.1"]) == 0
    out = capsys.readouterr().out
    assert "global" in out and "local" in out and "mnist:8" in out
    assert "tight" in out and "(margin, tight," in out


def test_demo_json_tight_rows_and_radius(capsys):
    """The demo's tight rows are below its local rows (the same analyzer, exact route), and
    the tight margin radius is at least the plain one."""
    assert main(["demo", "--eps-list", "0.001,1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    local = {r["eps"]: r["value"] for r in doc["local"]}
    assert [r["eps"] for r in doc["tight"]] == [0.001, 1]
    small, big = doc["tight"]
    assert small["value"] < local[0.001] / 4  # (361.5 -> 70.2)
    # at eps 1 the rows exceed the budget: the hybrid (38333 -> about 31000)
    assert big["value"] < local[1] / 1.1 and big["source"] == "tight"
    assert any("tail from block" in n for n in big["notes"])
    for r in doc["tight"]:
        assert r["guarantee"] == "certified upper bound"
    margins = [r for r in doc["radius"] if r["method"] == "margin"]
    assert len(margins) == 2 and margins[1]["radius"] >= margins[0]["radius"]


USER_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 3)).eval()

    def make_with_info():
        return {"model": make(), "input_shape": (1, 8, 8)}

    def not_a_model():
        return 42
""")


@pytest.fixture()
def user_files(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(USER_MODEL)
    ns: dict = {}
    exec(USER_MODEL, ns)
    model = ns["make"]()
    wfile = tmp_path / "w.pt"
    torch.save(model.state_dict(), wfile)
    x = np.random.default_rng(0).normal(size=(1, 8, 8)).astype(np.float32)
    xfile = tmp_path / "x.npy"
    np.save(xfile, x)
    return src, wfile, xfile, model, x


def test_user_model_from_file(capsys, user_files):
    src, wfile, xfile, model, x = user_files
    out = run_json(capsys, ["bound", "--model", f"{src}:make", "--weights", str(wfile),
                            "--input", str(xfile), "--input-shape", "1,8,8", "--eps", "0.5"])
    import lipbound

    direct = lipbound.local_bound(model.eval(), torch.from_numpy(x)[None], 0.5)
    assert out["value"] == pytest.approx(direct.value, rel=1e-12)
    out2 = run_json(capsys, ["bound", "--model", f"{src}:make_with_info", "--input",
                             str(xfile), "--eps", "0.5"])
    assert out2["value"] == pytest.approx(direct.value, rel=1e-12)


@pytest.mark.parametrize("argv, needle", [
    (["bound", "--model", "mnist", "--eps", "0"], "eps"),
    (["bound", "--model", "mnist", "--eps", "-1"], "eps"),
    (["bound", "--model", "mnist", "--eps", "nan"], "eps"),
    (["bound", "--model", "mnist", "--eps", "inf"], "eps"),
    (["bound", "--model", "nosuchnet"], "nosuchnet"),
    (["bound", "--model", "mnist", "--input", "mnist:9"], "mnist:9"),
    (["bound", "--model", "mnist", "--input", "mnist:test/100"], "100"),
    (["bound", "--model", "mnist", "--weights", "/nonexistent/w.pt"], "/nonexistent/w.pt"),
])
def test_cli_errors_are_clear(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipbound: error:") and needle in err


def test_cli_user_model_errors(capsys, user_files, tmp_path):
    src, wfile, xfile, model, x = user_files
    assert main(["bound", "--model", f"{src}:not_a_model", "--input", str(xfile)]) == 2
    assert "nn.Module" in capsys.readouterr().err
    assert main(["bound", "--model", f"{src}:make", "--input", str(xfile)]) == 2
    assert "--input-shape" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    assert main(["bound", "--model", f"{src}:make", "--weights", str(bad), "--input",
                 str(xfile), "--input-shape", "1,8,8"]) == 2
    assert "corrupt" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 9, 9), dtype=np.float32))
    assert main(["bound", "--model", f"{src}:make", "--input", str(wrong),
                 "--input-shape", "1,8,8"]) == 2
    assert "shape" in capsys.readouterr().err
    nan = tmp_path / "nan.npy"
    arr = np.zeros((1, 8, 8), dtype=np.float32)
    arr[0, 0, 0] = np.nan
    np.save(nan, arr)
    assert main(["bound", "--model", f"{src}:make", "--input", str(nan),
                 "--input-shape", "1,8,8"]) == 2
    assert "NaN" in capsys.readouterr().err


def test_reuse_tol_option_of_radius_and_sweep(capsys, tmp_path):
    fresh = run_json(capsys, ["radius", "--model", "tiny", "--methods", "local",
                              "--reuse-tol", "0"])
    default = run_json(capsys, ["radius", "--model", "tiny", "--methods", "local"])
    # reuse can only make the certified radius smaller (looser factors), never larger
    assert 0 < default["certified_radius"] <= fresh["certified_radius"] * (1 + 1e-12)
    assert main(["radius", "--model", "tiny", "--reuse-tol", "-1"]) == 2
    assert "reuse_tol" in capsys.readouterr().err
    out = run_json(capsys, ["sweep", "--model", "tiny", "--points", "4", "--methods",
                            "local,global", "--reuse-tol", "0", "--out", str(tmp_path)])
    assert out["settings"]["reuse_tol"] == 0


def test_idle_cores_is_within_the_cpu_set():
    import os

    from lipbound.cli.common import idle_cores

    n = idle_cores(window=0.05)
    assert isinstance(n, int) and 1 <= n <= len(os.sched_getaffinity(0))


def test_global_bound_without_input_names_no_sample(capsys):
    """A global bound needs no input: without ``--input`` the header said ``input mnist:8``
    (the zoo's default sample, loaded for nothing) as if it had been asked for."""
    assert main(["bound", "--model", "mnist", "--method", "global"]) == 0
    out = capsys.readouterr().out
    assert "no input (global bound)" in out and "mnist:8" not in out
    assert run_json(capsys, ["bound", "--model", "mnist", "--method", "global"])["input"] is None
    named = run_json(capsys, ["bound", "--model", "mnist", "--method", "global",
                              "--input", "mnist:2"])
    assert named["input"] == "mnist:2"
