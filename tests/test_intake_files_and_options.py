"""Review of the intake paths (session 22): weight files, input files and sample references,
and the command line's options. Bad input gets a clear error naming the problem and the fix,
never a traceback nor a number computed from something other than what was given."""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cli_helpers import run_err
from lipbound import zoo
from lipbound.cli import main
from lipbound.errors import InputError, LipboundError, WeightsError
from lipbound.inputs import load_sample, load_samples
from lipbound.zoo.resources import data_path

MNIST = zoo.get_entry("mnist")
CIFAR = zoo.get_entry("cifar10")

USER = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
        return {"model": m, "input_shape": (4,)}
""")


@pytest.fixture(scope="module")
def mnist_sd():
    return {k: v.clone() for k, v in zoo.load_model("mnist").model.state_dict().items()}


@pytest.fixture()
def user(tmp_path):
    src = tmp_path / "nets.py"
    src.write_text(USER)
    ns: dict = {}
    exec(USER, ns)
    return src, ns["make"]()["model"]


def _digit() -> np.ndarray:
    with data_path("mnist/8.png") as p, Image.open(p) as img:
        return np.asarray(img).copy()


# ------------------------------------------------------------------ 1. seeds out of range
def test_random_sample_seed_beyond_64_bits_is_a_clear_error():
    # (was: ValueError "Overflow when unpacking long long", a traceback on the command line)
    with pytest.raises(LipboundError, match="alexnet:random"):
        load_sample("alexnet:random/99999999999999999999999")


def test_zoo_seed_beyond_64_bits_is_a_clear_error():
    with pytest.raises(InputError, match="seed"):
        zoo.load_model("compnet", seed=2**64)


@pytest.mark.parametrize("argv", [
    ["bound", "--model", "compnet", "--method", "global", "--weights-seed", str(2**64)],
    ["bound", "--model", "compnet", "--method", "global", "--seed", str(2**70)],
    ["radius", "--model", "tiny", "--attacks", "fgsm", "--seed", str(2**64)],
])
def test_cli_seed_beyond_64_bits_is_a_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "seed" in capsys.readouterr().err


def test_attack_seed_beyond_64_bits_is_a_clear_error():
    from lipbound.attacks import run_attacks

    m = zoo.load_model("tiny").model
    with pytest.raises(InputError, match="seed"):
        run_attacks(m, load_sample("tiny:x0").x, methods=["fgsm"], seed=2**64)


# ------------------------------------------------------------------ 2. image files
def test_16_bit_image_is_not_silently_clamped(tmp_path):
    # (was: converted to 8 bits by clamping every value above 255: the digit became a
    # saturated blob and the bound was computed there)
    path = tmp_path / "eight16.png"
    Image.fromarray(_digit().astype(np.uint16) * 257).save(path)
    with pytest.raises(InputError, match="8-bit"):
        load_sample(path, entry=MNIST)


def test_float_image_in_unit_range_is_not_silently_darkened(tmp_path):
    path = tmp_path / "eight.tif"
    Image.fromarray(_digit().astype(np.float32) / 255).save(path)
    with pytest.raises(InputError, match="8-bit"):
        load_sample(path, entry=MNIST)


def test_wide_image_mode_holding_8_bit_values_still_loads(tmp_path):
    path = tmp_path / "eight32.tif"
    Image.fromarray(_digit().astype(np.int32)).save(path)
    assert torch.equal(load_sample(path, entry=MNIST).x, load_sample("mnist:8").x)


def test_transparent_image_is_not_silently_flattened(tmp_path):
    # (was: the alpha channel dropped: a digit drawn in the alpha channel became a blank
    # image, and the bound was computed at it)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = _digit()
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    with pytest.raises(InputError, match="transparen"):
        load_sample(path, entry=MNIST)
    with pytest.raises(InputError, match="transparen"):
        load_samples(tmp_path, entry=MNIST)
    opaque = np.repeat(_digit()[..., None], 4, axis=2)
    opaque[..., 3] = 255
    Image.fromarray(opaque).save(path)
    assert torch.equal(load_sample(path, entry=MNIST).x, load_sample("mnist:8").x)


# ------------------------------------------------------------------ 3. array files
def test_sparse_tensor_file_is_a_clear_error(tmp_path):
    # (was: NotImplementedError from the sparse backend)
    path = tmp_path / "sparse.pt"
    torch.save(load_sample("mnist:8").x.to_sparse(), path)
    with pytest.raises(InputError, match="to_dense"):
        load_sample(path, entry=MNIST)


def test_uint8_pixel_array_is_not_taken_as_a_normalised_input(tmp_path):
    # (was: values 0-255 used as the network's normalised input, without scaling)
    path = tmp_path / "pixels.npy"
    np.save(path, _digit()[None])
    with pytest.raises(InputError, match="raw=True"):
        load_sample(path, entry=MNIST)
    assert torch.allclose(load_sample(path, entry=MNIST, raw=True).x, load_sample("mnist:8").x)


def test_torchscript_file_is_named_as_such_without_warnings(tmp_path, mnist_sd):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # (torch's own deprecation notice of jit.script)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Linear(2, 2)).save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match="TorchScript") as info:
            zoo.load_model("mnist", weights=path)
        assert "corrupt" not in str(info.value)
        with pytest.raises(InputError, match="TorchScript"):
            load_sample(path, entry=MNIST)


# ------------------------------------------------------------------ 4. weight files
def test_complex_weights_are_refused(tmp_path, mnist_sd, user, capsys):
    # (was: the imaginary part silently dropped, the result labelled "user weights file")
    path = tmp_path / "complex.pt"
    torch.save({k: v.to(torch.complex64) for k, v in mnist_sd.items()}, path)
    with pytest.raises(WeightsError, match="complex"):
        zoo.load_model("mnist", weights=path)
    src, model = user
    torch.save({k: v.to(torch.complex64) for k, v in model.state_dict().items()}, path)
    assert "complex" in run_err(capsys, ["bound", "--model", f"{src}:make", "--weights",
                                         str(path), "--method", "global"])


def test_integer_weights_are_refused(tmp_path, mnist_sd):
    path = tmp_path / "int.pt"
    torch.save({k: (v * 100).round().to(torch.int8) for k, v in mnist_sd.items()}, path)
    with pytest.raises(WeightsError, match="int8"):
        zoo.load_model("mnist", weights=path)


def test_sparse_weights_are_a_clear_error(tmp_path, mnist_sd):
    path = tmp_path / "sparse.pt"
    sd = dict(mnist_sd)
    sd["fc3.weight"] = sd["fc3.weight"].to_sparse()
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="to_dense"):
        zoo.load_model("mnist", weights=path)


def test_float64_weights_beyond_float32_range_are_refused_at_load(tmp_path, mnist_sd):
    # (was: loaded as inf; the model came back from load_model with an infinite bias)
    path = tmp_path / "big.pt"
    sd = {k: v.double() for k, v in mnist_sd.items()}
    sd["fc3.bias"][0] = 1e300
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="float32 range"):
        zoo.load_model("mnist", weights=path)


def test_state_dict_object_instead_of_a_path(mnist_sd):
    # (was: TypeError "expected str, bytes or os.PathLike object, not dict")
    with pytest.raises(WeightsError, match="path"):
        zoo.load_model("mnist", weights=mnist_sd)


def test_user_model_reads_the_same_checkpoint_layouts_as_the_zoo(tmp_path, user, capsys):
    # (was: a {'model_state_dict': ...} checkpoint, as PyTorch's tutorials save it, loaded
    # into zoo networks but was "missing keys: 0.weight ..." for a user's model)
    src, model = user
    sd = {k: v * 2 for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model_state_dict": sd}, path)
    from lipbound.cli.common import load_state_dict_file

    load_state_dict_file(model, str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_empty_weights_option_is_not_ignored_for_a_user_model(capsys, user):
    # (was: --weights "" silently dropped: the factory's own weights were analysed)
    src, _ = user
    err = run_err(capsys, ["bound", "--model", f"{src}:make", "--weights", "",
                           "--method", "global"])
    assert "--weights" in err


# ------------------------------------------------------------------ 5. labels
def test_csv_label_outside_the_networks_classes_is_refused(tmp_path):
    # (was: kept, and counted as a misclassification in the accuracy of the summary)
    row = ",".join(["12"] + ["0"] * 784)
    path = tmp_path / "bad_label.csv"
    path.write_text(row + "\n")
    with pytest.raises(InputError, match="label"):
        load_samples(path, entry=MNIST)
    path.write_text(",".join(["-1"] + ["0"] * 784) + "\n")
    with pytest.raises(InputError, match="label"):
        load_samples(path, entry=MNIST)
    path.write_text(",".join(["9"] + ["0"] * 784) + "\n")
    assert load_samples(path, entry=MNIST)[0].label == 9



# ------------------------------------------------------------------ 6. normalisation once
NORMED = textwrap.dedent("""
    import torch
    from torch import nn
    import lipbound

    def net():
        torch.manual_seed(0)
        return nn.Sequential(lipbound.Normalize((0.1307,), (0.3081,), spatial_dims=2),
                             nn.Flatten(), nn.ReLU(), nn.Linear(784, 10)).eval()

    def with_stats():
        return {"model": net(), "input_shape": (1, 28, 28), "mean": 0.1307, "std": 0.3081}

    def plain():
        return {"model": net(), "input_shape": (1, 28, 28)}
""")


def test_normalisation_inside_the_model_and_in_the_options_is_refused(capsys, tmp_path):
    # (was: the image normalised by --mean/--std (or the factory's), then again by the
    # model's own lipbound.Normalize layer; the bound was computed at that input)
    src = tmp_path / "normed.py"
    src.write_text(NORMED)
    img = tmp_path / "eight.png"
    Image.fromarray(_digit()).save(img)
    for argv in (["--model", f"{src}:with_stats"],
                 ["--model", f"{src}:plain", "--mean", "0.1307", "--std", "0.3081"]):
        err = run_err(capsys, ["bound", *argv, "--input", str(img)])
        assert "Normalize" in err and "twice" in err
    # the model's own normalisation alone: pixels in [0, 1] go in
    assert main(["bound", "--model", f"{src}:plain", "--input", str(img)]) == 0


# ------------------------------------------------------------------ 7. --threads
def test_thread_count_beyond_the_limit_is_refused(monkeypatch, caplog):
    # (was: --threads 100000 handed to torch and the BLAS pools: the process ran out of
    # memory starting threads, a MemoryError/ImportError traceback); above the cores but
    # within MAX_THREADS: a warning, and the count is used (a run's thread count repeated)
    import argparse

    from lipbound.cli import common

    asked = []
    monkeypatch.setattr(common, "set_threads", asked.append)  # never start them here
    monkeypatch.setattr(common, "usable_cores", lambda: 2)
    with pytest.raises(InputError, match="--threads 100000.*1024"):
        common.apply_threads(argparse.Namespace(threads="100000"), None)
    assert asked == []
    common.apply_threads(argparse.Namespace(threads="1"), None)
    assert asked == [1] and "more than" not in caplog.text
    with caplog.at_level("WARNING", logger="lipbound"):
        common.apply_threads(argparse.Namespace(threads="8"), None)
    assert asked == [1, 8] and "--threads 8 is more than the 2 CPU core(s)" in caplog.text


# ------------------------------------------------------------------ 8. bench options
@pytest.mark.parametrize("argv, needle", [
    # (were: refused only after the timed runs, which take minutes on VGG-16)
    (["--model", "mnist", "--radius-images", "-3"], "--radius-images"),
    (["--model", "mnist", "--radius-images", "101"], "--radius-images"),
    (["--model", "tiny", "--radius-images", "2"], "--radius-images"),
    # (was: the radii timed on the shipped weights, next to timings of the given ones)
    (["--model", "mnist", "--weights", "mine.pt", "--radius-images", "2"], "--weights"),
    # (was: silently ignored)
    (["--model", "tiny", "--sweep-range", "1,0.1"], "--sweep-range"),
])
def test_bench_options_are_checked_before_the_work(capsys, monkeypatch, argv, needle):
    import lipbound.bench

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark ran before the options were checked")

    monkeypatch.setattr(lipbound.bench, "bench_model", no_work)
    assert needle in run_err(capsys, ["bench", "--repeat", "1", *argv])


def test_bench_eps_with_global_only_is_named_as_unused(capsys, caplog):
    # (was: --eps with --what global was ignored without a word)
    from lipbound.cli import main

    with caplog.at_level("WARNING", logger="lipbound"):
        assert main(["bench", "--model", "tiny", "--what", "global", "--eps", "0.3",
                     "--repeat", "1", "--threads", "1"]) == 0
    assert "--eps 0.3 has no effect with --what global" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lipbound"):
        assert main(["bench", "--model", "tiny", "--what", "local,global", "--eps", "0.3",
                     "--repeat", "1", "--threads", "1"]) == 0
    assert "no effect" not in caplog.text
    capsys.readouterr()


# ------------------------------------------------------------------ 9. weights named
def test_compare_names_the_weights_it_ran_on(capsys, tmp_path, mnist_sd):
    # (was: neither its table nor its JSON said which weights the numbers are for: a user
    # file looked like the shipped checkpoint)
    from cli_helpers import run_json

    path = tmp_path / "mine.pt"
    torch.save({k: v * 0.5 for k, v in mnist_sd.items()}, path)
    argv = ["compare", "--model", "mnist", "--weights", str(path), "--methods", "local"]
    assert run_json(capsys, argv)["weights"] == f"user weights file {path}"
    assert main(argv) == 0
    assert f"user weights file {path}" in capsys.readouterr().out


def test_compare_without_methods_is_refused(capsys):
    # (was: an empty table, exit status 0)
    assert "--methods" in run_err(capsys, ["compare", "--model", "tiny", "--methods", ","])


def test_user_weights_file_named_random_is_not_labelled_random_weights():
    from lipbound.cli.sweep import random_weights

    assert not random_weights("user weights file /data/random_init.pt")
    assert random_weights(zoo.load_model("alexnet").weights_source)


# ------------------------------------------------------------------ 10. resized images
def test_resizing_an_image_file_is_a_warning(tmp_path, caplog):
    # (was: logged at INFO level only: the bound was reported for "photo.png" while it was
    # computed at a resized and cropped copy, with nothing said)
    import logging

    path = tmp_path / "photo.png"
    Image.fromarray(_digit()).resize((56, 40)).save(path)
    with caplog.at_level(logging.WARNING, logger="lipbound"):
        assert load_sample(path, entry=MNIST).x.shape == (1, 1, 28, 28)
    assert any("56x40" in r.getMessage() and "28x28" in r.getMessage()
               for r in caplog.records if r.levelno >= logging.WARNING)
    caplog.clear()
    same = tmp_path / "same.png"
    Image.fromarray(_digit()).save(same)
    with caplog.at_level(logging.WARNING, logger="lipbound"):
        load_sample(same, entry=MNIST)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ 11. shipped samples
def test_shipped_sample_for_a_user_model_without_normalisation(capsys, tmp_path):
    # (was: a user model declaring no --mean/--std got image files as pixels in [0, 1] but
    # the shipped 'mnist:8' normalised with MNIST's mean/std: the same digit, two inputs;
    # with a Normalize layer in the model, 'mnist:8' was normalised twice)
    from cli_helpers import run_json

    src = tmp_path / "normed.py"
    src.write_text(NORMED)
    img = tmp_path / "eight.png"
    Image.fromarray(_digit()).save(img)
    model = ["bound", "--model", f"{src}:plain"]
    err = run_err(capsys, [*model, "--input", "mnist:8"])
    assert "--mean 0 --std 1" in err and "--mean 0.1307 --std 0.3081" in err
    assert "--mean" in run_err(capsys, ["radius", "--model", f"{src}:plain",
                                        "--input", "mnist:test/0-1"])
    # said explicitly, the shipped digit is the same input as the image file
    pixels = run_json(capsys, [*model, "--input", "mnist:8", "--mean", "0", "--std", "1"])
    assert pixels["value"] == run_json(capsys, [*model, "--input", str(img)])["value"]


def test_user_model_whose_own_keys_start_with_module_loads(tmp_path):
    # (the wrapper prefix is removed only when the model's own keys do not have it)
    from lipbound.cli.common import load_state_dict_file

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(3, 2)

        def forward(self, x):
            return self.module(x)

    sd = {k: v + 1 for k, v in Holder().state_dict().items()}
    path = tmp_path / "holder.pt"
    torch.save(sd, path)
    m = Holder()
    load_state_dict_file(m, str(path))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


# ------------------------------------------------------------------ 12. file names
def test_image_file_named_like_a_test_range_is_one_input(capsys, tmp_path, monkeypatch):
    # (was: 'test-1.png' taken for a range of test images: `layers` refused it as "several
    # inputs", `bound` switched to its many-input table)
    from cli_helpers import run_json

    monkeypatch.chdir(tmp_path)
    Image.fromarray(_digit()).save("test-1.png")
    Image.fromarray(_digit()).save("test_3,4.png")
    for name in ("test-1.png", "test_3,4.png"):
        assert main(["layers", "--model", "mnist", "--input", name, "--json"]) == 0
        capsys.readouterr()
        d = run_json(capsys, ["bound", "--model", "mnist", "--input", name])
        assert d["input"] == name and d["value"] > 0


def test_oversized_image_is_a_clear_error(tmp_path, monkeypatch):
    # (was: PIL's DecompressionBombError, a traceback; here PIL's limit is lowered instead of
    # writing a 180-megapixel image)
    import PIL.Image

    path = tmp_path / "eight.png"
    Image.fromarray(_digit()).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError, match="eight.png"):
        load_sample(path, entry=MNIST)


def test_image_with_a_corrupt_header_is_a_clear_error(tmp_path):
    # (was: ValueError "invalid literal for int() with base 10" from PIL's PPM reader)
    path = tmp_path / "broken.ppm"
    path.write_bytes(b"P6\n2P5 32\n255\n" + bytes(32 * 32 * 3))
    with pytest.raises(InputError, match="broken.ppm"):
        load_sample(path, entry=CIFAR)


def test_image_mode_pil_cannot_convert_is_a_clear_error(tmp_path):
    # (was: ValueError "conversion from LAB to RGB not supported", a traceback)
    path = tmp_path / "lab.tif"
    Image.fromarray(np.repeat(_digit()[..., None], 3, axis=2)).convert("LAB").save(path)
    with pytest.raises(InputError, match="LAB"):
        load_sample(path, entry=MNIST)


def test_user_model_on_the_meta_device_is_a_clear_error(capsys, tmp_path, user):
    # (was: NotImplementedError "Cannot copy out of meta tensor" from model.to(device), also
    # with --weights, whose copy into meta tensors keeps no values)
    src = tmp_path / "meta_net.py"
    src.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            with torch.device("meta"):
                m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
            return {"model": m, "input_shape": (4,)}
    """))
    _, model = user
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    for extra in ([], ["--weights", str(weights)]):
        err = run_err(capsys, ["bound", "--model", f"{src}:make", "--method", "global",
                               *extra])
        assert "meta device" in err


def test_integer_pixel_array_of_any_width_is_not_taken_as_normalised(tmp_path):
    # (np.array(img, dtype=int) saves int64 pixels; only uint8 was refused)
    for dtype in (np.int64, np.int32, np.int16):
        path = tmp_path / f"pixels_{np.dtype(dtype).name}.npy"
        np.save(path, _digit()[None].astype(dtype))
        with pytest.raises(InputError, match="raw=True"):
            load_sample(path, entry=MNIST)
        assert torch.allclose(load_sample(path, entry=MNIST, raw=True).x,
                              load_sample("mnist:8").x)
    ints = tmp_path / "vector.npy"  # a network without normalisation takes integers as given
    np.save(ints, np.array([1, 2, 3], dtype=np.int64))
    assert load_sample(ints, entry=zoo.get_entry("tiny")).x.tolist() == [[1.0, 2.0, 3.0]]


def test_user_model_weights_path_with_a_tilde(tmp_path, monkeypatch, user):
    # (the zoo's weights and the inputs expand '~'; a user model's --weights did not)
    from lipbound.cli.common import load_state_dict_file

    monkeypatch.setenv("HOME", str(tmp_path))
    _, model = user
    sd = {k: v * 3 for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    load_state_dict_file(model, "~/w.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_a_checkpoint_with_several_state_dicts_names_the_one_used(tmp_path, mnist_sd, caplog):
    # (was: the first of state_dict / model_state_dict / net / model taken without a word)
    from lipbound.zoo.weights import read_checkpoint

    half = {k: v * 0.5 for k, v in mnist_sd.items()}
    path = tmp_path / "two.pt"
    torch.save({"model": half, "state_dict": mnist_sd, "epoch": 3}, path)
    with caplog.at_level("WARNING", logger="lipbound"):
        state, extras = read_checkpoint(path)
    assert "several keys ['state_dict', 'model']; using 'state_dict'" in caplog.text
    assert all(torch.equal(state[k], mnist_sd[k]) for k in mnist_sd)
    assert set(extras) == {"model", "epoch"}
    caplog.clear()
    torch.save({"model": half, "epoch": 3}, path)
    with caplog.at_level("WARNING", logger="lipbound"):
        state, _ = read_checkpoint(path)
    assert "several" not in caplog.text and all(torch.equal(state[k], half[k]) for k in half)
