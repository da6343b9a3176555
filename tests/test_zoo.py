"""Tests of the model zoo (lipbound.zoo) and the Normalize layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lipbound.errors import InputError, LipboundError, WeightsError, ZooError
from lipbound.inputs import load_sample, load_samples
from lipbound.layers import Normalize
from lipbound.zoo import (
    LoadedModel,
    ZooEntry,
    get_entry,
    imagenet_class_names,
    list_models,
    load_model,
)
from lipbound.zoo.resources import data_file

SMALL = ["tiny", "compnet", "mnist", "cifar10"]


@pytest.fixture(scope="module")
def mnist() -> LoadedModel:
    return load_model("mnist")


@pytest.fixture(scope="module")
def cifar() -> LoadedModel:
    return load_model("cifar10")


@pytest.fixture(scope="module")
def alexnet() -> LoadedModel:
    return load_model("alexnet")


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


def test_list_models_names_and_fields():
    names = [e.name for e in list_models()]
    assert names == ["tiny", "compnet", "mnist", "cifar10", "alexnet", "vgg16"]
    for e in list_models():
        assert isinstance(e, ZooEntry)
        assert e.default_sample in e.samples
        lo, hi = e.eps_range
        assert 0 < lo < hi
        assert (e.mean is None) == (e.std is None)
        if e.mean is not None:
            assert len(e.mean) == len(e.std) == e.input_shape[0]
        if e.class_names is not None:
            assert len(e.class_names) == e.n_classes
    assert get_entry("mnist").eps_range == (0.001, 7.0)
    assert get_entry("cifar10").class_names[5] == "dog"


def test_get_entry_unknown_lists_known_names():
    with pytest.raises(ZooError) as info:
        get_entry("lenett")
    msg = str(info.value)
    for name in ("tiny", "compnet", "mnist", "cifar10", "alexnet", "vgg16"):
        assert name in msg
    with pytest.raises(ZooError):
        load_model("resnet50")
    assert get_entry("MNIST").name == "mnist"
    assert issubclass(ZooError, LipboundError)


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0].startswith("tench")
    assert get_entry("vgg16").class_names == names


def test_shipped_files_present():
    for rel in ("LICENSE.seed-data", "testsets/LICENSE.eran", "mnist/8.png", "cifar10/dog4.png",
                "testsets/mnist_test.csv", "imagenet/classes.txt"):
        assert data_file(rel).is_file()
    with pytest.raises(ZooError):
        data_file("mnist/does-not-exist.png")


# --------------------------------------------------------------------------------------
# building, shapes, weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_small_entries_build_and_shape(name):
    lm = load_model(name)
    e = lm.entry
    assert not lm.model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in lm.model.parameters())
    y = lm.model(torch.zeros(2, *e.input_shape))
    assert y.shape == (2, e.n_classes)
    x = load_sample(e.default_sample).x
    assert x.shape == (1, *e.input_shape)
    assert torch.isfinite(lm.model(x)).all()


def test_load_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    load_model("compnet", seed=3)
    load_model("mnist")
    load_model("tiny")
    assert torch.equal(state, torch.get_rng_state())


def test_tiny_weights_and_forward():
    lm = load_model("tiny")
    W = torch.tensor([[3.0, -1, 2], [-2, 7, 1], [5, -3, -1]])
    b = torch.tensor([3.0, 4, 2])
    assert torch.equal(lm.model.fc1.weight, W)
    assert torch.equal(lm.model.fc1.bias, b)
    assert torch.equal(lm.model.fc2.weight, torch.eye(3))
    assert torch.equal(lm.model.fc2.bias, torch.zeros(3))
    x0 = load_sample("tiny:x0").x
    expected = torch.relu(x0.double() @ W.double().T + b.double())
    assert torch.allclose(lm.model(x0).double(), expected, atol=1e-5)
    assert not lm.trained


def test_compnet_matches_paper_seeding():
    lm = load_model("compnet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = [nn.Linear(7, 20), nn.Linear(20, 30), nn.Linear(30, 10)]
    for ours, theirs in zip((lm.model.fc1, lm.model.fc2, lm.model.fc3), ref, strict=True):
        assert torch.equal(ours.weight, theirs.weight)
        assert torch.equal(ours.bias, theirs.bias)
    other = load_model("compnet", seed=1)
    assert not torch.equal(other.model.fc1.weight, lm.model.fc1.weight)
    assert "manual_seed(1)" in other.weights_source


def test_state_dict_keys_match_paper_checkpoints(mnist, cifar):
    assert list(mnist.model.state_dict()) == [
        f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2", "fc3")
        for p in ("weight", "bias")
    ]
    assert list(cifar.model.state_dict()) == [
        f"{layer}.{p}" for layer in ("conv1", "conv2", "conv3", "conv4", "fc1", "fc2")
        for p in ("weight", "bias")
    ]
    assert mnist.trained and "lenet_ckpt_99" in mnist.weights_source
    assert cifar.trained and "convnet_ckpt_499" in cifar.weights_source


def test_shipped_checkpoints_load_safely():
    for rel in ("mnist/lenet_ckpt_99.ckpt", "cifar10/convnet_ckpt_499.ckpt"):
        with data_file(rel).open("rb") as fh:
            ckpt = torch.load(fh, map_location="cpu", weights_only=True)
        assert set(ckpt) >= {"net"}


@pytest.mark.parametrize("ref, label", [("mnist:8", 8), ("mnist:2", 2), ("mnist:3", 3)])
def test_mnist_classifies_samples(mnist, ref, label):
    s = load_sample(ref)
    assert s.label == label
    assert int(mnist.model(s.x).argmax()) == label


def test_cifar_classifies_dog(cifar):
    s = load_sample("cifar10:dog")
    assert s.label == 5
    assert int(cifar.model(s.x).argmax()) == 5


def _accuracy(lm: LoadedModel, name: str, transform=None) -> float:
    samples = load_samples(f"{name}:test")
    assert len(samples) == 100
    x = torch.cat([s.x for s in samples])
    if transform is not None:
        x = transform(x)
    y = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        return float((lm.model(x).argmax(1) == y).float().mean())


def test_mnist_test_accuracy(mnist):
    assert _accuracy(mnist, "mnist") >= 0.98
    # the CSV's row-major layout is the one the network was trained on: transposing the
    # images breaks the classifier
    assert _accuracy(mnist, "mnist", lambda x: x.transpose(2, 3)) < 0.5


def test_cifar_test_accuracy(cifar):
    assert _accuracy(cifar, "cifar10") >= 0.80


ALEXNET_KEYS = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")] + [
    f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")
]
VGG16_CONV = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_KEYS = [f"features.{i}.{p}" for i in VGG16_CONV for p in ("weight", "bias")] + [
    f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")
]


def test_alexnet_layout_and_forward(alexnet):
    sd = alexnet.model.state_dict()
    assert list(sd) == ALEXNET_KEYS
    assert sd["features.0.weight"].shape == (64, 3, 11, 11)
    assert sd["classifier.1.weight"].shape == (4096, 9216)
    assert sd["classifier.6.weight"].shape == (1000, 4096)
    assert alexnet.weights_source == "seeded random weights (seed=0) — NOT trained"
    assert not alexnet.trained
    x = load_sample("alexnet:random").x
    y = alexnet.model(x)
    assert y.shape == (1, 1000)
    # He-like initialisation: the logits neither vanish nor explode
    assert 0.1 < float(y.std()) < 100


def test_alexnet_seeded_and_state_dict_round_trip(alexnet, tmp_path):
    again = load_model("alexnet")
    for (k, a), b in zip(alexnet.model.state_dict().items(), again.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    del again
    other = load_model("alexnet", seed=1)
    assert not torch.equal(other.model.features[0].weight, alexnet.model.features[0].weight)
    assert "seed=1" in other.weights_source
    del other
    # a training checkpoint with the weights under "state_dict" loads them back exactly
    path = tmp_path / "alexnet.pth"
    torch.save({"state_dict": alexnet.model.state_dict(), "epoch": 3}, path)
    loaded = load_model("alexnet", weights=path, seed=5)
    assert loaded.trained and str(path) in loaded.weights_source
    for (k, a), b in zip(alexnet.model.state_dict().items(), loaded.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_vgg16_layout_determinism_and_forward():
    def fingerprint(model: nn.Module) -> list[float]:
        return [float(p.sum()) for p in model.parameters()]

    first = load_model("vgg16")
    sd = first.model.state_dict()
    assert list(sd) == VGG16_KEYS
    assert sd["classifier.0.weight"].shape == (4096, 25088)
    assert sd["features.28.weight"].shape == (512, 512, 3, 3)
    assert "NOT trained" in first.weights_source
    fp = fingerprint(first.model)
    probes = {k: sd[k][:4].clone() for k in ("features.0.weight", "classifier.6.weight")}
    y = first.model(load_sample("vgg16:random").x)  # the one VGG-16 forward pass
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all() and float(y.std()) > 0.1
    del first, sd
    second = load_model("vgg16")
    assert fingerprint(second.model) == fp
    sd2 = second.model.state_dict()
    assert all(torch.equal(sd2[k][:4], v) for k, v in probes.items())


# --------------------------------------------------------------------------------------
# weights errors
# --------------------------------------------------------------------------------------


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth"):
        load_model("mnist", weights=path)
    with pytest.raises(WeightsError, match="directory"):
        load_model("mnist", weights=tmp_path)


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_model("cifar10", weights=path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError):
        load_model("cifar10", weights=empty)


def test_weights_file_without_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_model("mnist", weights=path)


def test_pickled_module_is_refused(tmp_path, mnist):
    path = tmp_path / "whole_model.pt"
    torch.save(mnist.model, path)
    with pytest.raises(WeightsError, match="state_dict"):
        load_model("mnist", weights=path)


def test_mismatched_state_dict_lists_keys(tmp_path, mnist):
    path = tmp_path / "mnist_weights.pt"
    torch.save(mnist.model.state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_model("cifar10", weights=path)
    msg = str(info.value)
    assert "missing keys" in msg and "conv3.weight" in msg
    assert "unexpected keys" in msg and "fc3.weight" in msg
    assert "shape mismatches" in msg and "conv1.weight" in msg


def test_user_weights_variants(tmp_path, mnist):
    sd = mnist.model.state_dict()
    # DataParallel prefix and the "net" checkpoint key are both understood
    path = tmp_path / "dp.pt"
    torch.save({"net": {f"module.{k}": v for k, v in sd.items()}}, path)
    lm = load_model("mnist", weights=path)
    assert torch.equal(lm.model.fc3.weight, mnist.model.fc3.weight)
    # float64 weights are converted to float32
    path64 = tmp_path / "f64.pt"
    torch.save({k: v.double() for k, v in sd.items()}, path64)
    assert load_model("mnist", weights=path64).model.fc1.weight.dtype == torch.float32
    # NaN weights are refused
    bad = dict(sd)
    bad["fc2.bias"] = torch.full_like(sd["fc2.bias"], float("nan"))
    path_nan = tmp_path / "nan.pt"
    torch.save(bad, path_nan)
    with pytest.raises(WeightsError, match="fc2.bias"):
        load_model("mnist", weights=path_nan)


def test_bad_device_and_seed():
    with pytest.raises(InputError):
        load_model("tiny", device="tpu-9000")
    with pytest.raises(InputError):
        load_model("tiny", seed=-1)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            load_model("tiny", device="cuda")


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:99"])
def test_zoo_devices_follow_the_analyzers_rules(device):
    """The zoo, the CLI and the analyzer share one device check: a device that holds no data
    or that lipbound does not compute on is refused by the zoo too, naming the choices."""
    from lipbound.cli.common import resolve_device as cli_resolve
    from lipbound.zoo import resolve_device

    for resolve in (lambda d: load_model("tiny", device=d), resolve_device, cli_resolve):
        with pytest.raises(InputError, match="'cpu', 'cuda'|CUDA is not available"):
            resolve(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_matches_cpu(mnist):
    lm = load_model("mnist", device="cuda")
    x = load_sample("mnist:8").x
    assert next(lm.model.parameters()).device.type == "cuda"
    assert torch.allclose(lm.model(x.cuda()).cpu(), mnist.model(x), atol=1e-4)


# --------------------------------------------------------------------------------------
# Normalize
# --------------------------------------------------------------------------------------


def test_normalize_matches_formula():
    norm = Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert norm.mean.shape == (3, 1, 1) and norm.std.shape == (3, 1, 1)
    assert {n for n, _ in norm.named_buffers()} == {"mean", "std"}
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    ref = x.numpy().copy()
    for c, (m, s) in enumerate(zip((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                                   strict=True)):
        ref[:, c] = (ref[:, c] - m) / s
    assert np.allclose(norm(x).numpy(), ref, atol=1e-6)
    assert math.isclose(norm.lipschitz, 1 / 0.2435, rel_tol=1e-6)
    vec = Normalize([1.0, 2.0], [2.0, 4.0], spatial_dims=0)
    assert vec.mean.shape == (2,)
    assert torch.allclose(vec(torch.tensor([[3.0, 6.0]])), torch.tensor([[1.0, 1.0]]))


def test_normalize_errors():
    with pytest.raises(InputError):
        Normalize((0.5,), (0.0,))
    with pytest.raises(InputError):
        Normalize((0.5, 0.5), (0.2,))
    with pytest.raises(InputError):
        Normalize((float("nan"),), (1.0,))
    with pytest.raises(InputError):
        Normalize((), ())


def test_entry_normalizer_maps_pixels_to_model_space():
    for name, ref in (("mnist", "mnist:8"), ("cifar10", "cifar10:dog")):
        entry = get_entry(name)
        k = entry.input_shape[0]
        pixels01 = load_sample(ref, mean=(0.0,) * k, std=(1.0,) * k).x
        assert 0.0 <= float(pixels01.min()) and float(pixels01.max()) <= 1.0
        assert torch.allclose(entry.normalizer()(pixels01), load_sample(ref).x, atol=1e-6)
    assert get_entry("tiny").normalizer() is None
