"""Bad input to the command line (and the attack / lower-bound API) gets a clear error naming
the problem and the fix, never a traceback or a silent wrong answer; result labels say what
each number is (audit of the CLI and the attack / lower-bound parameters)."""

from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_helpers import run_err, run_json
from lipbound.cli import main
from lipbound.errors import InputError, UnsupportedModelError

USER_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))

    def make():
        return {"model": net().eval(), "input_shape": (4,)}

    def make_image():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
        return {"model": m, "input_shape": (1, 8, 8)}

    def training():
        return {"model": net(), "input_shape": (4,)}  # nn.Module default: training mode

    def bn_training():
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
        m.eval()
        m[1].train()
        return {"model": m, "input_shape": (4,)}

    def raises():
        raise RuntimeError("boom in the factory")

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = self.fc(x)
            s = x.sum().item()
            return x * 1

    def scalar():
        return {"model": Scalar().eval(), "input_shape": (4,)}
""")


@pytest.fixture()
def files(tmp_path):
    src = tmp_path / "nets.py"
    src.write_text(USER_MODELS)
    x = tmp_path / "x.npy"
    np.save(x, np.linspace(-1, 1, 4, dtype=np.float32))
    return tmp_path, src, x


# ------------------------------------------------------------------- 1. empty input arrays
@pytest.mark.parametrize("argv, shape", [
    (["bound", "--model", "mnist"], (0,)),
    (["bound", "--model", "mnist"], (0, 1, 28, 28)),
    (["radius", "--model", "mnist"], (0, 1, 28, 28)),  # was an IndexError
    (["radius", "--model", "tiny"], (0, 3)),
    (["layers", "--model", "tiny"], (0, 3)),
])
def test_empty_input_array_is_a_clear_error(capsys, tmp_path, argv, shape):
    f = tmp_path / "e.npy"
    np.save(f, np.zeros(shape))
    err = run_err(capsys, argv + ["--input", str(f)])
    assert "empty array" in err and str(shape) in err


def test_empty_array_in_the_api(tmp_path):
    from lipbound.inputs import load_samples

    f = tmp_path / "e.npy"
    np.save(f, np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(InputError, match="empty array"):
        load_samples(f, input_shape=(3,))


# ------------------------------------------------------------------------ 2. --eps-list
@pytest.mark.parametrize("text, needle", [
    ("0.1,,0.2", "item 2 is empty"),
    ("0.1,abc", "'abc' is not a number"),
    (",0.1", "item 1 is empty"),
    ("0.1,-1", "item 2"),
])
def test_eps_list_names_the_bad_item(capsys, tmp_path, text, needle):
    err = run_err(capsys, ["bound", "--model", "tiny", "--eps-list", text])
    assert needle in err and "--eps-list" in err
    out = tmp_path / "b.csv"  # the many-input route (a CSV file) checks it too
    err = run_err(capsys, ["bound", "--model", "tiny", "--input", "tiny:x0", "--eps-list",
                           text, "--out", str(out)])
    assert needle in err and not out.exists()


def test_demo_eps_list(capsys):
    assert "item 2 is empty" in run_err(capsys, ["demo", "--eps-list", "0.1,"])


# --------------------------------------------------------------------- 3. --input-shape
@pytest.mark.parametrize("shape", ["a,b", "1,,4", "0,4", "-4", "4.5"])
def test_input_shape_must_be_positive_integers(capsys, files, shape):
    _, src, x = files
    err = run_err(capsys, ["bound", "--model", f"{src}:make", "--input", str(x),
                           "--input-shape", shape])
    assert "--input-shape must be comma-separated positive integers, e.g. 1,28,28" in err


# ----------------------------------------------------- 4. --out checked before computing
def _no_model_loading(monkeypatch):
    """Fail the test if a command loads its model (the --out check must come first)."""
    import lipbound.cli.bound_many as bm
    import lipbound.cli.layers as ly
    import lipbound.cli.radius as rd
    import lipbound.cli.sweep as sw

    def boom(*_a, **_k):
        raise AssertionError("the model was loaded before --out was checked")

    for mod in (bm, ly, rd, sw):
        monkeypatch.setattr(mod, "load_model", boom)


@pytest.mark.parametrize("cmd", [["radius", "--model", "tiny"],
                                 ["layers", "--model", "tiny"],
                                 ["sweep", "--model", "tiny", "--points", "2"]])
def test_out_folder_is_checked_before_computing(capsys, tmp_path, monkeypatch, cmd):
    _no_model_loading(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = run_err(capsys, cmd + ["--out", str(a_file)])
    assert "existing file" in err and "folder" in err
    err = run_err(capsys, cmd + ["--out", str(a_file / "sub")])  # a folder under a file
    assert "cannot create the folder" in err
    if Path("/proc/self").is_dir():
        assert "cannot create" in run_err(capsys, cmd + ["--out", "/proc/x/y"])


@pytest.mark.parametrize(("cmd", "name"), [(["radius", "--model", "tiny"], "radius.png"),
                                         (["layers", "--model", "tiny"], "layers.csv"),
                                         (["sweep", "--model", "tiny", "--points", "2"],
                                          "sweep.json")])
def test_out_files_in_the_folder_are_checked_before_computing(capsys, tmp_path, monkeypatch,
                                                               cmd, name):
    _no_model_loading(monkeypatch)
    (tmp_path / name).mkdir()  # a folder where the command writes a file
    err = run_err(capsys, cmd + ["--out", str(tmp_path)])
    assert f"{name} is a folder" in err and "give another folder" in err


@pytest.mark.parametrize("cmd", [["bound", "--model", "tiny"], ["radius", "--model", "tiny"],
                                 ["layers", "--model", "tiny"],
                                 ["sweep", "--model", "tiny", "--points", "2"]])
@pytest.mark.parametrize("value", ["2", "0", "nan"])
def test_failure_prob_is_checked_before_computing_and_named_as_the_option(
        capsys, monkeypatch, cmd, value):
    """``layers`` left --failure-prob to the Analyzer: the error named the Python parameter
    (``failure_prob must be ...``) and came after the model was loaded and traced."""
    import lipbound.cli.bound as bd

    _no_model_loading(monkeypatch)
    monkeypatch.setattr(bd, "load_model", lambda *_a, **_k: pytest.fail("model loaded"))
    err = run_err(capsys, cmd + ["--failure-prob", value])
    assert err.startswith("lipbound: error: --failure-prob must be a number in [1e-300, 1)"), err


def test_out_file_of_bound_is_checked_before_computing(capsys, tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["bound", "--model", "mnist", "--input", "mnist:test/0-2"]
    assert "is a folder" in run_err(capsys, base + ["--out", str(tmp_path)])
    assert "is a file, not a folder" in run_err(capsys, base + ["--out",
                                                                 str(a_file / "b.csv")])


def test_out_folder_is_created_and_a_single_input_csv_is_written(capsys, tmp_path):
    out = tmp_path / "new" / "deeper"
    assert main(["layers", "--model", "tiny", "--out", str(out)]) == 0
    assert (out / "layers.csv").is_file()
    one = tmp_path / "one.csv"  # --out of `bound` with one input: no longer ignored
    assert main(["bound", "--model", "tiny", "--out", str(one)]) == 0
    rows = list(csv.DictReader(one.open()))
    assert len(rows) == 1 and rows[0]["name"] == "tiny:x0"


# ------------------------------------------------------------ 5. failing user factories
def test_factory_that_raises_or_does_not_import(capsys, files, tmp_path):
    _, src, x = files
    err = run_err(capsys, ["bound", "--model", f"{src}:raises", "--input", str(x)])
    assert "raises()" in err and "RuntimeError: boom in the factory" in err
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def make(:\n    pass\n")
    err = run_err(capsys, ["bound", "--model", f"{bad}:make", "--input", str(x)])
    assert "importing" in err and "SyntaxError" in err
    broken = tmp_path / "broken_import.py"
    broken.write_text("import no_such_module_for_lipbound\n")
    err = run_err(capsys, ["bound", "--model", f"{broken}:make", "--input", str(x)])
    assert "ModuleNotFoundError" in err and "no_such_module_for_lipbound" in err


# ----------------------------------------------------------------- 6. training mode
@pytest.mark.parametrize("factory", ["training", "bn_training"])
def test_user_model_in_training_mode_is_refused(capsys, files, factory):
    _, src, x = files
    err = run_err(capsys, ["bound", "--model", f"{src}:{factory}", "--input", str(x)])
    assert "training mode" in err and "model.eval()" in err and f"{factory}()" in err


def test_user_model_in_eval_mode_is_accepted(capsys, files):
    _, src, x = files
    out = run_json(capsys, ["bound", "--model", f"{src}:make", "--input", str(x)])
    assert out["value"] > 0


# ---------------------------------------------------------- 7. compare --time-limit
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf"])
def test_compare_time_limit_must_be_positive_and_finite(capsys, value):
    err = run_err(capsys, ["compare", "--model", "tiny", "--methods", "local",
                           f"--time-limit={value}"])
    assert "--time-limit must be a finite number > 0" in err


# ------------------------------------------------------------- 8. --mean / --std / --scale
@pytest.mark.parametrize("flags", [["--mean", "0.5", "--std", "0.2"], ["--scale", "1"],
                                   ["--input-shape", "1,32,32"]])
def test_preprocessing_options_of_a_zoo_model_are_not_ignored(capsys, flags):
    for cmd in (["bound"], ["radius", "--methods", "global"], ["layers"]):
        err = run_err(capsys, cmd + ["--model", "mnist"] + flags)
        assert "zoo model mnist" in err and "user models" in err


def test_zoo_preprocessing_options_equal_to_its_own_are_accepted(capsys):
    out = run_json(capsys, ["bound", "--model", "mnist", "--mean", "0.1307", "--std",
                            "0.3081", "--input-shape", "1,28,28"])
    plain = run_json(capsys, ["bound", "--model", "mnist"])
    assert out["value"] == plain["value"]


def test_preprocessing_options_are_refused_for_array_inputs(capsys, files):
    _, src, x = files
    for flags in (["--mean", "0.5", "--std", "0.2"], ["--scale", "1"]):
        for cmd in ("bound", "radius"):
            err = run_err(capsys, [cmd, "--model", f"{src}:make", "--input", str(x), *flags])
            assert "would be ignored" in err and "array" in err


def test_preprocessing_options_apply_to_images(capsys, files, tmp_path):
    from PIL import Image

    _, src, _ = files
    img = tmp_path / "img.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).save(img)
    base = ["bound", "--model", f"{src}:make_image", "--input", str(img), "--eps", "0.1"]
    a = run_json(capsys, base)
    b = run_json(capsys, base + ["--mean", "0.5", "--std", "0.25"])
    assert a["value"] > 0 and b["value"] > 0
    # the options reach the image's preprocessing: the loader gives a different input
    from lipbound.inputs import load_sample

    x0 = load_sample(img, input_shape=(1, 8, 8)).x
    x1 = load_sample(img, input_shape=(1, 8, 8), mean=(0.5,), std=(0.25,)).x
    assert not torch.equal(x0, x1)


# ------------------------------------------------------------- 9. float64 beyond float32
def test_float64_input_beyond_float32_range_is_refused(capsys, tmp_path):
    from lipbound.inputs import load_sample

    big = tmp_path / "big.npy"
    arr = np.zeros((1, 28, 28))
    arr[0, 3, 4] = 1e300
    np.save(big, arr)
    err = run_err(capsys, ["bound", "--model", "mnist", "--input", str(big)])
    assert "out of float32 range" in err and "NaN" not in err
    with pytest.raises(InputError, match="out of float32 range"):
        load_sample(big, input_shape=(1, 28, 28))
    ok = tmp_path / "ok.npy"
    np.save(ok, np.full((1, 28, 28), 0.25, dtype=np.float64))
    s = load_sample(ok, input_shape=(1, 28, 28))
    assert s.x.dtype == torch.float32 and float(s.x.max()) == 0.25


# ------------------------------------------------- 10. --spectral exact beyond memory
def test_exact_global_bound_beyond_memory_is_refused_before_computing(capsys, monkeypatch,
                                                                      tmp_path):
    import lipbound.cli.exact_memory as em
    from lipbound.analyzer import Analyzer

    def no_global(*_a, **_k):
        raise AssertionError("the global bound was computed")

    monkeypatch.setattr(em, "physical_memory", lambda device=None: 1000)  # a tiny machine
    monkeypatch.setattr(Analyzer, "global_bound", no_global)
    for argv in (["bound", "--model", "mnist", "--method", "global"],
                 ["bound", "--model", "mnist", "--method", "both"],
                 ["bound", "--model", "mnist", "--input", "mnist:test/0-1"],
                 ["layers", "--model", "mnist"],
                 ["radius", "--model", "mnist", "--methods", "global"],
                 ["sweep", "--model", "mnist", "--points", "2", "--methods", "global",
                  "--out", str(tmp_path / "sw")],
                 ["bench", "--model", "mnist", "--what", "global"]):
        err = run_err(capsys, argv + ["--spectral", "exact"])
        assert "--spectral exact cannot compute the global bound" in err
        assert "--spectral auto" in err and "lanczos" in err and "conv1" in err
    assert not any((tmp_path / "sw").iterdir())  # nothing written


def test_exact_memory_estimate():
    from lipbound.cli.exact_memory import exact_bytes, physical_memory

    # AlexNet's first convolution (150528 inputs, 193600 outputs): hundreds of GB
    assert exact_bytes(193600, 150528) > 500e9
    assert exact_bytes(10, 4) == 8 * (2 * 40 + 16)
    mem = physical_memory()
    assert mem is None or mem > 0


def test_exact_global_bound_that_fits_is_not_refused(capsys):
    out = run_json(capsys, ["bound", "--model", "mnist", "--method", "global", "--spectral",
                            "exact"])
    assert out["guarantee"] == "certified upper bound"


# -------------------------------------------------- 11. sample references in CLI terms
def test_sample_reference_hints_use_cli_terms(capsys, tmp_path):
    err = run_err(capsys, ["bound", "--model", "mnist", "--input", "mnist:test/abc"])
    assert "load_samples" not in err and "mnist:test/3" in err and "mnist:8" in err
    err = run_err(capsys, ["layers", "--model", "mnist", "--input", "mnist:test/0-3"])
    assert "load_samples" not in err and "takes one" in err and "mnist:test/3" in err
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((2, 3), dtype=np.float32))
    err = run_err(capsys, ["layers", "--model", "tiny", "--input", str(batch)])
    assert "load_samples" not in err and "takes one" in err and ".npy" in err


# --------------------------------------------------------- 12. scalar-producing forward
def test_scalar_node_is_an_unsupported_operation(capsys, files):
    from lipbound.analyzer import Analyzer

    _, src, x = files
    ns: dict = {}
    exec(USER_MODELS, ns)
    with pytest.raises(UnsupportedModelError) as info:
        Analyzer(ns["scalar"]()["model"], (4,))
    kinds = " ".join(f"{w} {k} {d}" for w, k, d in info.value.nodes)
    assert "sum" in kinds and "scalar" in kinds
    err = run_err(capsys, ["bound", "--model", f"{src}:scalar", "--input", str(x)])
    assert "unsupported operation" in err and ".sum()" in err


# ----------------------------------------------------------- 13. labels and CSV columns
def test_radius_is_labelled_a_lower_bound(capsys):
    out = run_json(capsys, ["radius", "--model", "tiny", "--attacks", "fgsm"])
    assert out["certified_guarantee"] in ("certified lower bound", "probabilistic lower bound")
    assert out["certified_failure_prob"] is not None
    for c in out["certified"]:
        assert "upper" not in c["guarantee"] and c["guarantee"].endswith("lower bound")
    assert main(["radius", "--model", "tiny", "--spectral", "exact"]) == 0
    text = capsys.readouterr().out
    head = next(ln for ln in text.splitlines() if ln.startswith("certified radius"))
    assert "certified lower bound, deterministic" in head
    assert main(["radius", "--model", "mnist", "--spectral", "lanczos", "--methods",
                 "global"]) == 0
    text = capsys.readouterr().out
    head = next(ln for ln in text.splitlines() if ln.startswith("certified radius"))
    assert "probabilistic lower bound, failure prob <=" in head
    assert "upper bound" not in head


def test_radius_csv_has_guarantee_columns(capsys, tmp_path):
    batch = tmp_path / "b.npy"
    np.save(batch, np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32))
    assert main(["radius", "--model", "tiny", "--input", str(batch), "--out",
                 str(tmp_path / "o"), "--spectral", "exact"]) == 0
    capsys.readouterr()
    with (tmp_path / "o" / "radius.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        rows = list(reader)
    for c in ("guarantee", "failure_prob", "certified_radius", "certified_method",
              "local_guarantee", "local_failure_prob", "global_guarantee"):
        assert c in cols
    assert len(rows) == 2
    for r in rows:
        assert r["guarantee"] == "certified lower bound" and float(r["failure_prob"]) == 0.0
        assert float(r["certified_radius"]) == max(float(r[f"{m}_radius"])
                                                   for m in ("local", "margin", "global"))


def test_layers_csv_has_a_guarantee_per_factor(capsys, tmp_path):
    assert main(["layers", "--model", "mnist", "--spectral", "lanczos", "--out",
                 str(tmp_path)]) == 0
    capsys.readouterr()
    with (tmp_path / "layers.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    cols = reader.fieldnames or []
    assert "guarantee" not in cols and "failure_prob" not in cols
    for c in ("local_guarantee", "local_failure_prob", "global_guarantee",
              "global_failure_prob"):
        assert c in cols
    # the global factors of the convolutions run Lanczos: probabilistic with a budget
    assert any(r["global_guarantee"] == "probabilistic upper bound"
               and float(r["global_failure_prob"]) > 0 for r in rows)


def test_sweep_csv_has_failure_prob_columns(capsys, tmp_path):
    assert main(["sweep", "--model", "mnist", "--points", "2", "--methods", "local,global",
                 "--spectral", "lanczos", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    with (tmp_path / "sweep.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["global_failure_prob"]) > 0 for r in rows)
    assert all(r["global_guarantee"] == "probabilistic upper bound" for r in rows)
    assert "local_failure_prob" in rows[0]


# -------------------------------------------------- 14. attack / lower-bound parameters
def _attack_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize("name, options, needle", [
    ("pgd", {"restarts": math.nan}, "restarts"),
    ("pgd", {"steps": math.nan}, "steps"),
    ("pgd", {"steps": 2.5}, "steps"),
    ("pgd", {"targeted": 1.5}, "targeted"),
    ("pgd", {"gamma": math.nan}, "gamma"),
    ("pgd", {"step_factor": "big"}, "step_factor"),
    ("cw", {"steps": 2.5}, "steps"),
    ("cw", {"binary_steps": math.nan}, "binary_steps"),
    ("cw", {"kappa": math.inf}, "kappa"),
    ("cw", {"initial_c": "x"}, "initial_c"),
    ("ifgsm", {"steps": 2.5}, "steps"),
    ("ifgsm", {"step_factor": math.nan}, "step_factor"),
    ("ifgsm", {"rel_tol": "x"}, "rel_tol"),
    ("fgsm", {"points": 1.5}, "points"),
    ("fgsm", {"max_doublings": math.nan}, "max_doublings"),
    ("gradient", {"max_steps": 2.5}, "max_steps"),
    ("gradient", {"step_fractions": (0.1, math.nan)}, "step_fractions"),
    ("gradient", {"step_fractions": ("a",)}, "step_fractions"),
])
def test_attack_parameters_are_checked(name, options, needle):
    from lipbound.attacks import get_attack, run_attacks

    with pytest.raises(InputError, match=needle):
        get_attack(name, **options)
    with pytest.raises(InputError, match=needle):
        run_attacks(_attack_model(), torch.ones(1, 4, dtype=torch.float64), (name,),
                    options={name: options})


def test_whole_float_attack_parameters_are_accepted():
    from lipbound.attacks import PGD

    a = PGD(steps=20.0, restarts=2.0)
    assert a.steps == 20 and isinstance(a.steps, int) and a.restarts == 2
    r = a(_attack_model(), torch.ones(1, 4, dtype=torch.float64))
    assert r.success and r.radius > 0


def test_lower_bound_parameters_are_checked():
    from lipbound.lower import (
        best_lower_bound,
        gradient_lower_bound,
        jacobian_spectrum,
        pgd_lower_bound,
        random_lower_bound,
        sample_ball,
    )

    net, x0 = _attack_model(), torch.zeros(1, 4, dtype=torch.float64)
    cases = [
        (gradient_lower_bound, {"n_steps": 2.5}, "n_steps"),
        (gradient_lower_bound, {"n_restarts": math.nan}, "n_restarts"),
        (gradient_lower_bound, {"step_size": math.inf}, "step_size"),
        (gradient_lower_bound, {"step_size": "big"}, "step_size"),
        (gradient_lower_bound, {"start_radius": "x"}, "start_radius"),
        (pgd_lower_bound, {"n_restarts": math.nan}, "n_restarts"),
        (pgd_lower_bound, {"n_steps": 2.5}, "n_steps"),
        (pgd_lower_bound, {"lr": (0.3, math.nan, 0.01)}, "lr"),
        (pgd_lower_bound, {"lr": (0.3, 0.1)}, "lr"),
        (pgd_lower_bound, {"power_iterations": 2.5}, "power_iterations"),
        (random_lower_bound, {"n_samples": 10.5}, "n_samples"),
        (random_lower_bound, {"batch_size": math.nan}, "batch_size"),
        (best_lower_bound, {"n_random": 2.5}, "n_random"),
        (best_lower_bound, {"pgd_restarts": math.nan}, "pgd_restarts"),
    ]
    for fn, kw, needle in cases:
        with pytest.raises(InputError, match=needle):
            fn(net, x0, 0.5, **kw)
    with pytest.raises(InputError, match="tol"):
        jacobian_spectrum(net, x0, tol=math.nan)
    with pytest.raises(InputError, match="n_iter"):
        jacobian_spectrum(net, x0, n_iter=1.5)
    assert sample_ball(x0, 0.5, 3.0).shape == (3, 4)  # a whole float is fine
    r = gradient_lower_bound(net, x0, 0.5, n_steps=5.0, n_restarts=2.0)
    assert r.value >= 0 and r.details["n_steps"] == 5


# --------------------------------------------------- 15. a sample of another zoo network
def test_sample_of_another_zoo_network_is_refused(capsys):
    from lipbound.inputs import load_sample
    from lipbound.zoo import get_entry

    with pytest.raises(InputError, match="zoo network mnist"):
        load_sample("mnist:8", entry=get_entry("cifar10"))
    with pytest.raises(InputError, match="zoo network cifar10"):
        load_sample("cifar10:test/2", entry=get_entry("alexnet"))
    err = run_err(capsys, ["bound", "--model", "cifar10", "--input", "mnist:8"])
    assert "mnist" in err and "cifar10:dog" in err
    err = run_err(capsys, ["radius", "--model", "cifar10", "--input", "mnist:test/0-1"])
    assert "zoo network mnist" in err
    # its own samples are fine
    assert load_sample("mnist:8", entry=get_entry("mnist")).label == 8


# ------------------------------------------------- 9. the factory's mean / std / input_shape
FACTORY_PREPROCESSING = textwrap.dedent("""
    import torch
    from torch import nn

    def _net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()

    def scalars():
        return {"model": _net(), "input_shape": (1, 8, 8), "mean": 0.5, "std": 0.25}

    def lists():
        return {"model": _net(), "input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}

    def tensors():
        return {"model": _net(), "input_shape": (1, 8, 8), "mean": torch.tensor([0.5]),
                "std": torch.tensor(0.25)}

    def bad_std():
        return {"model": _net(), "input_shape": (1, 8, 8), "std": "wide"}

    def nan_mean():
        return {"model": _net(), "input_shape": (1, 8, 8), "mean": float("nan")}

    def bad_shape():
        return {"model": _net(), "input_shape": "1x8x8"}

    def float_shape():
        return {"model": _net(), "input_shape": (1, 8.5, 8)}

    def int_shape():
        torch.manual_seed(0)
        return {"model": nn.Sequential(nn.Linear(4, 3)).eval(), "input_shape": 4}
""")


@pytest.fixture()
def prep_files(tmp_path):
    from PIL import Image

    src = tmp_path / "prep.py"
    src.write_text(FACTORY_PREPROCESSING)
    img = tmp_path / "x.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).save(img)
    return src, img


def test_factory_mean_and_std_may_be_numbers_lists_or_tensors(capsys, prep_files):
    """One number means every channel (it crashed with "'float' object is not iterable")."""
    src, img = prep_files
    values = {f: run_json(capsys, ["bound", "--model", f"{src}:{f}", "--input", str(img)])
              for f in ("scalars", "lists", "tensors")}
    assert values["scalars"]["value"] == values["lists"]["value"] == values["tensors"]["value"]


@pytest.mark.parametrize("factory, words", [
    ("bad_std", ["'std'", "'wide'", "one per channel"]),
    ("nan_mean", ["'mean'", "finite"]),
    ("bad_shape", ["'input_shape'", "'1x8x8'", "(1, 28, 28)"]),
    ("float_shape", ["'input_shape'", "8.5"]),
])
def test_factory_preprocessing_of_the_wrong_kind_is_a_clear_error(capsys, prep_files, factory,
                                                                  words):
    src, img = prep_files
    err = run_err(capsys, ["bound", "--model", f"{src}:{factory}", "--input", str(img)])
    assert f"{src}:{factory}" in err
    for w in words:
        assert w in err, err


def test_factory_input_shape_may_be_one_int(capsys, prep_files, tmp_path):
    src, _ = prep_files
    x = tmp_path / "v.npy"
    np.save(x, np.linspace(-1, 1, 4))
    assert run_json(capsys, ["bound", "--model", f"{src}:int_shape", "--input", str(x)])[
        "value"] > 0


# --------------------------------------------------------------------- 10. a closed pipe
def test_reader_closing_the_pipe_gives_no_traceback():
    """`lipbound bound ... --json | head -c 0`: the reader is gone before the output is
    written; the command stops quietly (no BrokenPipeError traceback), status 141."""
    import subprocess
    import sys

    code = ("import sys; from lipbound.cli import main; "
            "sys.exit(main(['bound', '--model', 'tiny', '--json']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the process has written anything
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc == 141
