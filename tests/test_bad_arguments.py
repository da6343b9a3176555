"""User audit at commit 60a2f2d: a batch file given to `lipbound bound` without --out, global
bounds of user models without an input, and bad arguments (shapes, devices, output maps,
failure probabilities, half-precision or unmaterialised models, unsafe weights files) get a
clear lipbound error naming the problem and the fix, never a raw torch error or a false one."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from cli_helpers import run_err, run_json
from lipbound import Analyzer, global_bound, local_bound
from lipbound.cli import main
from lipbound.errors import InputError, UnsupportedModelError, WeightsError

FX_NOISE = ("Original traceback", "tlparse", "While executing")


def fc_net(seed: int = 0, widths: tuple[int, ...] = (4, 5, 3)) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / math.sqrt(a))
            lin.bias.copy_(torch.randn(b, generator=g) * 0.1)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 6 * 6, 3)).eval()


USER_NETS = textwrap.dedent("""
    import torch
    from torch import nn

    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU(),
                             nn.Linear(10, 3)).eval()

    def factory_dict():
        return {"model": factory(), "input_shape": (1, 8, 8)}
""")


@pytest.fixture()
def user(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(USER_NETS)
    batch = tmp_path / "x_batch5.npy"
    np.save(batch, np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32))
    return src, batch


# ----------------------------------------------------- W1. batch files without --out
def test_bound_batch_file_zoo_model(capsys, tmp_path):
    f = tmp_path / "x3.npy"
    np.save(f, np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32))
    d = run_json(capsys, ["bound", "--model", "mnist", "--input", str(f)])
    assert [r["index"] for r in d["rows"]] == [0, 1, 2]
    # with --weights: the same network, from a state-dict file
    w = tmp_path / "mnist.pt"
    torch.save(lipbound.zoo.load_model("mnist").model.state_dict(), w)
    d2 = run_json(capsys, ["bound", "--model", "mnist", "--weights", str(w), "--input", str(f)])
    assert [r["bound"] for r in d2["rows"]] == [r["bound"] for r in d["rows"]]


def test_bound_batch_file_user_model(capsys, user):
    src, batch = user
    d = run_json(capsys, ["bound", "--model", f"{src}:factory", "--input-shape", "1,8,8",
                          "--input", str(batch)])
    assert len(d["rows"]) == 5
    d = run_json(capsys, ["bound", "--model", f"{src}:factory_dict", "--input", str(batch)])
    assert len(d["rows"]) == 5


def test_bound_batch_file_keeps_the_fresh_seed_note(capsys, tmp_path):
    f = tmp_path / "c2.npy"
    np.save(f, np.zeros((2, 7), dtype=np.float32))
    d = run_json(capsys, ["bound", "--model", "compnet", "--seed", "fresh", "--input", str(f)])
    assert len(d["rows"]) == 2
    assert any("fresh seed" in n and "--seed" in n for n in d["notes"])
    # a given --weights-seed is still honoured (and refused where it does not apply)
    d = run_json(capsys, ["bound", "--model", "compnet", "--weights-seed", "3", "--input",
                          str(f)])
    assert any("manual_seed(3)" in n for n in d["notes"])
    x3 = tmp_path / "x3.npy"
    np.save(x3, np.zeros((3, 1, 28, 28), dtype=np.float32))
    err = run_err(capsys, ["bound", "--model", "mnist", "--weights-seed", "3", "--input",
                           str(x3)])
    assert "--weights-seed" in err


def test_resolve_seeds_is_idempotent():
    import argparse

    from lipbound.cli.common import resolve_seeds

    args = argparse.Namespace(seed="fresh", weights_seed=None)
    notes = resolve_seeds(args)
    seed = args.seed
    assert resolve_seeds(args) == notes and args.seed == seed and args.weights_seed == 0
    assert args._weights_seed_given is False


# ------------------------------------------------------------- C1, C6. input shapes
def test_int_input_shape_is_one_dimensional():
    net = fc_net()
    assert global_bound(net, 4).value == global_bound(net, (4,)).value
    assert Analyzer(net, 4).input_shape == (4,)
    # other valid spellings still work
    assert Analyzer(net, torch.Size([4])).input_shape == (4,)
    assert Analyzer(net, [np.int64(4)]).input_shape == (4,)


@pytest.mark.parametrize("shape, needle", [
    (None, "None"),
    ("abc", "per-sample input shape"),
    ((-4,), "dimension <= 0"),
    ((0,), "dimension <= 0"),
    ((4.5,), "per-sample input shape"),
    ((True,), "per-sample input shape"),
])
def test_bad_input_shape_is_an_input_error(shape, needle):
    with pytest.raises(InputError, match=needle):
        global_bound(fc_net(), shape)
    if shape is not None:
        with pytest.raises(InputError, match=needle):
            Analyzer(fc_net(), shape)


def test_zero_size_image_dimension():
    with pytest.raises(InputError, match=r"\(1, 0, 8\) has a dimension <= 0"):
        Analyzer(conv_net(), (1, 0, 8))


# ---------------------------------------------------------------------- C2, C3. devices
@pytest.mark.parametrize("device", ["tpu", "bogus", "mps", "cuda:99"])
def test_unknown_device_lists_the_accepted_ones(device):
    with pytest.raises(InputError) as info:
        local_bound(fc_net(), torch.zeros(1, 4), 0.1, device=device)
    msg = str(info.value)
    assert "cuda" in msg and ("'cpu'" in msg or "CUDA" in msg)


def test_meta_device_is_refused():
    with pytest.raises(InputError, match="meta.*'cpu'"):
        local_bound(fc_net(), torch.zeros(1, 4), 0.1, device="meta")
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    for f in (lambda: local_bound(net, torch.zeros(1, 4), 0.1), lambda: global_bound(net, 4)):
        with pytest.raises(InputError, match=r"meta device.*to_empty.*load_state_dict"):
            f()


# -------------------------------------------------------------- C4, C5. empty output_map
def test_empty_output_map():
    net, x0, c = fc_net(), torch.zeros(1, 4), torch.zeros(0, 3)
    with pytest.raises(InputError, match="at least one row"):
        local_bound(net, x0, 0.1, output_map=c)
    an = Analyzer(net, (4,))
    with pytest.raises(InputError, match="at least one row"):
        an.global_bound(output_map=c)
    with pytest.raises(InputError, match="at least one row"):
        an.local_bound_rows(x0, 0.1, c)


# --------------------------------------------------------------------- C7. failure_prob
@pytest.mark.parametrize("fp", [5e-324, 1e-301, 0.0, 1.0, float("nan"), "1e-6", True])
def test_failure_prob_out_of_range(fp):
    with pytest.raises(InputError, match=r"failure_prob must be a number in \[1e-300, 1\)"):
        Analyzer(fc_net(), (4,), failure_prob=fp)


def test_failure_prob_cli(capsys):
    for cmd in (["bound"], ["radius"], ["sweep", "--points", "3"]):
        err = run_err(capsys, [*cmd, "--model", "tiny", "--failure-prob", "5e-324"])
        assert "--failure-prob must be a number in [1e-300, 1)" in err


def test_smallest_failure_prob_works_end_to_end():
    """1e-300, split over the layers and between a run's bounds, stays a normal float: the
    Lanczos route gives a finite bound, never below the exact (SVD) one."""
    from lipbound.validation import MIN_FAILURE_PROB

    net = fc_net(1, (100, 120, 90, 10))
    x0 = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    exact = Analyzer(net, (100,), spectral="exact")
    an = Analyzer(net, (100,), spectral="lanczos", failure_prob=MIN_FAILURE_PROB)
    g, loc = an.global_bound(), an.local_bound(x0, 0.5)
    assert any("lanczos" in lf.spectral_method for lf in g.layers + loc.layers)
    assert math.isfinite(g.value) and g.value >= exact.global_bound().value
    assert math.isfinite(loc.value) and loc.value >= exact.local_bound(x0, 0.5).value
    assert g.failure_prob <= MIN_FAILURE_PROB and loc.failure_prob <= MIN_FAILURE_PROB


# --------------------------------------------------------------- C8. unwritable --out
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_in_proc_is_refused_before_the_work(capsys):
    err = run_err(capsys, ["bound", "--model", "tiny", "--out", "/proc/lipbound_x.csv"])
    assert "--out /proc/lipbound_x.csv" in err and "writable" in err


def test_out_precheck_leaves_files_as_they_were(tmp_path):
    from lipbound.cli.common import prepare_out_dir, prepare_out_file

    kept = tmp_path / "kept.csv"
    kept.write_text("old,content\n")
    assert prepare_out_file(kept) == kept and kept.read_text() == "old,content\n"
    new = tmp_path / "sub" / "new.csv"
    prepare_out_file(new)
    assert not new.exists() and new.parent.is_dir()
    prepare_out_dir(tmp_path / "d", files=("a.csv",))
    assert list((tmp_path / "d").iterdir()) == []


# ----------------------------------------------- U1. global bounds need no input
def test_user_model_global_bound_without_input(capsys, user):
    src, _ = user
    from lipbound.cli.common import load_user_factory

    model = load_user_factory(f"{src}:factory")[0]
    want = global_bound(model, (1, 8, 8)).value
    d = run_json(capsys, ["bound", "--model", f"{src}:factory_dict", "--method", "global"])
    assert d["value"] == want and d["input"] is None
    d = run_json(capsys, ["bound", "--model", f"{src}:factory", "--input-shape", "1,8,8",
                          "--method", "global"])
    assert d["value"] == want
    assert main(["bound", "--model", f"{src}:factory_dict", "--method", "global"]) == 0
    assert "no input (global bound)" in capsys.readouterr().out
    # a local bound does need one, and says so
    err = run_err(capsys, ["bound", "--model", f"{src}:factory_dict"])
    assert "--input" in err and "--method global needs none" in err


def test_user_model_bench_global_without_input(capsys, user):
    src, _ = user
    d = run_json(capsys, ["bench", "--model", f"{src}:factory_dict", "--what", "global",
                          "--repeat", "1", "--no-warmup"])
    assert d["what"] == "global" and math.isfinite(d["value"])
    assert d["input"] is None  # as in bound --json: no input, not a made-up name
    err = run_err(capsys, ["bench", "--model", f"{src}:factory_dict", "--repeat", "1"])
    assert "--input" in err and "--what global needs none" in err


# ------------------------------------------------------ U2. batch and shape messages
def test_batched_x0_is_named():
    with pytest.raises(InputError, match=r"x0 holds a batch of 2 inputs.*x\[:1\]"):
        local_bound(fc_net(), torch.randn(2, 4), 0.1)


def test_x0_without_batch_dimension():
    net, x = conv_net(), torch.rand(1, 8, 8)
    with pytest.raises(InputError, match=r"without its batch dimension.*x0\.unsqueeze\(0\)"):
        local_bound(net, x, 0.1)
    assert local_bound(net, x.unsqueeze(0), 0.1).value > 0


def test_input_shape_with_batch_dimension():
    with pytest.raises(InputError) as info:
        global_bound(conv_net(), (1, 1, 8, 8))
    msg = str(info.value)
    assert "input_shape is per sample, without the batch dimension: (1, 8, 8)" in msg
    assert not any(n in msg for n in FX_NOISE)
    # a valid shape with a leading 1 is left alone
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    assert global_bound(net, (1, 4)).value == global_bound(net, (1, 2, 2)).value


class _ViewOne(nn.Module):
    def __init__(self, flat: bool):
        super().__init__()
        self.fc, self.flat = nn.Linear(64, 3), flat

    def forward(self, x):
        return self.fc(torch.flatten(x) if self.flat else x.view(1, -1))


@pytest.mark.parametrize("flat", [False, True])
def test_forward_that_drops_the_batch_dimension(flat):
    with pytest.raises(InputError) as info:
        global_bound(_ViewOne(flat).eval(), (1, 8, 8))
    msg = str(info.value)
    assert "batch of 2" in msg and "x.flatten(1)" in msg and "x.view(x.size(0), -1)" in msg
    assert not any(n in msg for n in FX_NOISE)


# ----------------------------------------------------------------- U3. batch norm var
@pytest.mark.parametrize("var, eps", [(-1.0, 1e-5), (0.0, 0.0)])
def test_batchnorm_with_nonpositive_running_var(var, eps):
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        net[1].running_var[2] = var
    net[1].eps = eps
    with pytest.raises(WeightsError, match=r"module '1' \(BatchNorm1d\), channel\(s\) 2.*"
                                           r"running_var must be > -eps"):
        global_bound(net, 4)


# --------------------------------------------------------------- U4. half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_refused_up_front(dtype):
    net = conv_net().to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(InputError, match=rf"{name} models are not supported.*model\.float\(\)"):
        global_bound(net, (1, 8, 8))


# ------------------------------------------------- U5. MaxPool2d(return_indices=True)
def test_maxpool_return_indices_listed_with_the_others():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, return_indices=True), nn.Flatten(),
                        nn.Linear(2 * 3 * 3, 3), nn.Tanh()).eval()
    with pytest.raises(UnsupportedModelError) as info:
        global_bound(net, (1, 8, 8))
    kinds = {(where, detail) for where, _, detail in info.value.nodes}
    assert ("module '1'", "unsupported configuration: return_indices=True") in kinds
    assert any(where == "module '4'" for where, _ in kinds)  # the Tanh, in the same error


def test_maxpool_windows_entirely_in_the_padding_are_refused_by_name():
    """Session 13's fuzzing: dilation and padding can leave a pooling window without any
    input element; torch outputs -inf there (then NaN further on), which lipbound refused
    naming the wrong cause (weights overflowing). The layer is now listed with the reason,
    in both the module and the functional form."""
    import torch.nn.functional as F

    pool = nn.MaxPool2d(2, 2, padding=1, dilation=2, ceil_mode=True)
    net = nn.Sequential(nn.Conv2d(2, 2, 1), pool, nn.Flatten()).eval()
    assert torch.isinf(net(torch.randn(1, 2, 4, 1))).all()
    with pytest.raises(UnsupportedModelError, match=r"entirely in the padding.*-inf"):
        global_bound(net, (2, 4, 1))

    class Functional(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 2, 2, padding=1, dilation=2, ceil_mode=True).flatten(1)

    with pytest.raises(UnsupportedModelError, match=r"entirely in the padding"):
        global_bound(Functional().eval(), (2, 4, 1))
    # the same pooling on an input large enough has no such window: analysed as before
    ok = nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(2, 2, padding=1, dilation=2),
                       nn.Flatten()).eval()
    assert math.isfinite(global_bound(ok, (2, 6, 6)).value)


# ----------------------------------------------------------- U6. a .py without :factory
def test_model_file_without_factory(capsys, user):
    src, _ = user
    err = run_err(capsys, ["bound", "--model", str(src)])
    assert "path/to/file.py:factory_name" in err and "unknown zoo model" not in err


# ---------------------------------------------------------- U7. unreadable weights files
@pytest.fixture()
def bad_files(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(conv_net(), whole)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage" * 10)
    return whole, garbage


def _short_and_safe(msg: str) -> None:
    assert "state_dict" in msg and len(msg) < 400, msg
    assert "weights_only=False" not in msg and "set to `False`" not in msg, msg


def test_whole_model_or_garbage_weights(capsys, user, bad_files):
    src, _ = user
    for f in bad_files:
        _short_and_safe(run_err(capsys, ["bound", "--model", "mnist", "--weights", str(f)]))
        _short_and_safe(run_err(capsys, ["bound", "--model", f"{src}:factory_dict",
                                         "--weights", str(f), "--method", "global"]))
        with pytest.raises(WeightsError) as info:
            lipbound.zoo.load_model("mnist", weights=f)
        _short_and_safe(str(info.value))
        assert info.value.__cause__ is not None  # PyTorch's own error, for whoever needs it
        from lipbound.cli.common import load_state_dict_file

        with pytest.raises(WeightsError) as info:
            load_state_dict_file(conv_net(), str(f))
        _short_and_safe(str(info.value))
        assert info.value.__cause__ is not None


def test_unreadable_array_file_is_short(bad_files):
    from lipbound.inputs import load_sample

    with pytest.raises(InputError) as info:
        load_sample(bad_files[0], input_shape=(1, 8, 8))
    msg = str(info.value)
    assert "torch.save(x, path)" in msg and "weights_only=False" not in msg and len(msg) < 400


# ------------------------------------------------------------------------ cosmetics
def test_python_dash_m_lipbound():
    src = Path(lipbound.__file__).parent.parent
    r = subprocess.run([sys.executable, "-m", "lipbound", "bound", "--model", "nope"],
                       capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "unknown zoo model 'nope'" in r.stderr


@pytest.mark.parametrize("argv, needle", [
    (["bound", "--model", "tiny", "--eps-list", "0.1", "--eps", "1"],
     "give either --eps or --eps-list, not both"),
    (["bench", "--model", "tiny", "--sweep", "3", "--sweep-range", "1,0.1"],
     "--sweep-range 1,0.1: LO must be smaller than HI"),
    (["bench", "--model", "tiny", "--what", "foo"], "--what must be local, global"),
    (["radius", "--model", "tiny", "--max-eps", "-1"], "--max-eps must be > 0"),
    (["compare", "--model", "tiny", "--methods", "bogus"],
     "--methods: unknown method(s) bogus; choose from lower, local"),
    (["sweep", "--model", "tiny", "--points", "20000"], "--points must be at most 10000"),
])
def test_cli_messages_name_the_option(capsys, argv, needle):
    err = run_err(capsys, argv)
    assert needle in err and "[" not in err.split("error:", 1)[1], err


def test_help_texts(capsys):
    from lipbound.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    bound_help = sub.choices["bound"].format_help()
    assert "(default)" in bound_help.split("--method", 2)[2].split("--spectral")[0]
    demo = next(a for a in sub.choices["demo"]._actions if "--eps-list" in a.option_strings)
    assert demo.help and "radii" in demo.help


def test_function_forms_take_output_map_and_refuse_unknown_options():
    """global_bound(model, shape, output_map=C) works like Analyzer.global_bound; an unknown
    option, or options given together with a ready Analyzer (which has its own), is an
    InputError instead of a raw TypeError or a silently ignored setting."""
    import lipbound
    from lipbound import Analyzer
    from lipbound.errors import InputError

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                            torch.nn.Linear(6, 3)).eval()
    c = torch.tensor([[1.0, -1.0, 0.0]])
    x0 = torch.randn(1, 4)
    want = Analyzer(m, (4,)).global_bound(output_map=c).value
    assert lipbound.global_bound(m, (4,), output_map=c).value == want
    assert lipbound.global_bound(m, (4,)).value > want
    with pytest.raises(InputError, match="unknown option.*spectrl"):
        lipbound.global_bound(m, (4,), spectrl="exact")
    with pytest.raises(InputError, match="unknown option"):
        lipbound.local_bound(m, x0, 0.1, foo=1)
    an = Analyzer(m, (4,))
    with pytest.raises(InputError, match="spectral='exact' given with an Analyzer built "
                       "with spectral='auto'"):
        lipbound.local_bound(an, x0, 0.1, spectral="exact")
    with pytest.raises(InputError, match="seed=1 given with an Analyzer built with seed=0"):
        lipbound.global_bound(an, (4,), seed=1)
    assert lipbound.local_bound(an, x0, 0.1).value == an.local_bound(x0, 0.1).value
    # (session 25) the analyzer's own settings pass, as in sweep / bound_many / radius
    assert lipbound.global_bound(an, (4,), device="cpu", seed=an.seed,
                                 spectral="auto").value == an.global_bound().value


@pytest.mark.parametrize("radius", [["--eps", "0.1"], ["--eps-list", "0.1,1"]])
def test_global_method_refuses_a_radius(capsys, radius):
    """--method global ignored --eps silently; it takes no radius."""
    err = run_err(capsys, ["bound", "--model", "tiny", "--method", "global", *radius])
    assert "--method global takes no radius" in err and "--method both" in err
    d = run_json(capsys, ["bound", "--model", "tiny", "--method", "both", *radius])
    assert d
