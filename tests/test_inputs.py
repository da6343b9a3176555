"""Tests of input loading (lipbound.inputs) and the shipped test sets."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lipbound.errors import InputError, ZooError
from lipbound.inputs import Sample, load_sample, load_samples, normalize_pixels
from lipbound.zoo import get_entry, load_testset
from lipbound.zoo.resources import data_file, data_path
from lipbound.zoo.testsets import parse_image_csv

MNIST = get_entry("mnist")
CIFAR = get_entry("cifar10")
ALEX = get_entry("alexnet")


def _png_pixels(relpath: str) -> np.ndarray:
    """Independent reading of a shipped PNG: HxW or HxWx3 uint8 values."""
    with data_path(relpath) as p, Image.open(p) as img:
        return np.asarray(img).astype(np.float64)


# --------------------------------------------------------------------------------------
# shipped samples
# --------------------------------------------------------------------------------------


def test_mnist_sample_values():
    s = load_sample("mnist:8")
    assert isinstance(s, Sample) and s.name == "mnist:8" and s.label == 8
    assert s.x.shape == (1, 1, 28, 28) and s.x.dtype == torch.float32
    ref = (_png_pixels("mnist/8.png") / 255 - 0.1307) / 0.3081
    assert np.allclose(s.x[0, 0].numpy(), ref, atol=1e-6)
    assert np.isclose(float(s.x.min()), -0.1307 / 0.3081, atol=1e-6)


def test_cifar_sample_values():
    s = load_sample("cifar10:dog")
    assert s.x.shape == (1, 3, 32, 32) and s.label == 5
    px = _png_pixels("cifar10/dog4.png")  # (32, 32, 3)
    for c, (m, sd) in enumerate(zip((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                                    strict=True)):
        assert np.allclose(s.x[0, c].numpy(), (px[:, :, c] / 255 - m) / sd, atol=1e-5)


def test_vector_samples():
    x0 = load_sample("tiny:x0").x
    # the paper's nominal input: torch.rand(1, 3) after torch.manual_seed(0), plus [-1, 2, 2]
    assert torch.allclose(x0, torch.tensor([[-0.5037, 2.7682, 2.0885]]), atol=1e-4)
    z = load_sample("compnet:zeros")
    assert torch.equal(z.x, torch.zeros(1, 7)) and z.label is None


def test_random_imagenet_sample():
    a = load_sample("alexnet:random")
    b = load_sample("vgg16:random")
    c = load_sample("alexnet:random/1")
    assert a.x.shape == (1, 3, 224, 224)
    assert torch.equal(a.x, b.x) and torch.equal(a.x, load_sample("alexnet:random").x)
    assert not torch.equal(a.x, c.x)
    mean = torch.tensor(ALEX.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(ALEX.std).reshape(1, 3, 1, 1)
    pixels = a.x * std + mean
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6


def test_unknown_references():
    with pytest.raises(ZooError, match="mnist:8"):
        load_sample("mnist:9")
    with pytest.raises(ZooError, match="models"):
        load_sample("resnet:1")
    with pytest.raises(ZooError, match="no shipped test set"):
        load_samples("alexnet:test/0")
    with pytest.raises(ZooError, match="bad test-set index"):
        load_samples("mnist:test/abc")
    with pytest.raises(InputError):
        load_sample("")


def test_sample_for_other_network_checked():
    with pytest.raises(InputError, match="shape"):
        load_sample("tiny:x0", entry=get_entry("compnet"))
    with pytest.raises(InputError, match="shape"):
        load_sample("mnist:test/0", entry=CIFAR)
    # a shipped image is refused for a network with another input shape or normalisation
    # (it would be silently resized and renormalised)
    with pytest.raises(InputError, match="zoo network mnist.*alexnet"):
        load_sample("mnist:8", entry=ALEX)
    with pytest.raises(InputError, match="shape"):
        load_sample("mnist:test/3", input_shape=(1, 32, 32))
    # same shape and normalisation: accepted, without the other network's label
    vgg = get_entry("vgg16")
    assert (vgg.input_shape, vgg.mean, vgg.std) == (ALEX.input_shape, ALEX.mean, ALEX.std)
    s = load_sample("alexnet:random", entry=vgg)
    assert s.x.shape == (1, 3, 224, 224) and s.label is None


# --------------------------------------------------------------------------------------
# test sets
# --------------------------------------------------------------------------------------


def test_testset_refs():
    all_mnist = load_samples("mnist:test")
    assert len(all_mnist) == 100
    assert [s.label for s in all_mnist[:5]] == [7, 2, 1, 0, 4]
    one = load_sample("mnist:test/17")
    assert one.name == "mnist:test/17" and one.label == all_mnist[17].label
    assert torch.equal(one.x, all_mnist[17].x)
    part = load_samples("mnist:test/0-9,20")
    assert [s.name for s in part][-2:] == ["mnist:test/9", "mnist:test/20"] and len(part) == 11
    assert len(load_samples("cifar10:test/0-99")) == 100
    assert load_sample("cifar10:test/3").label == 0  # the fourth CIFAR-10 test image: airplane


def test_testset_index_errors():
    with pytest.raises(InputError, match="out of range"):
        load_sample("mnist:test/100")
    with pytest.raises(InputError, match="out of range"):
        load_samples("cifar10:test/90-120")
    with pytest.raises(InputError, match="load_samples"):
        load_sample("mnist:test")


def test_cifar_csv_is_hwc():
    images, labels = load_testset("cifar10")
    assert images.shape == (100, 3, 32, 32) and labels.shape == (100,)
    # independent re-reading of the first row with the csv module
    with data_file("testsets/cifar10_test.csv").open("r") as fh:
        row = [int(v) for v in next(csv.reader(fh))]
    assert row[0] == labels[0]
    for c, h, w in [(0, 0, 0), (1, 0, 0), (2, 0, 0), (2, 5, 17), (0, 31, 31), (1, 12, 3)]:
        assert images[0, c, h, w] == row[1 + (h * 32 + w) * 3 + c]
    # per-channel means of the first 100 test images are close to the CIFAR-10 means; the
    # channels-first misreading would give nearly equal means for all three channels
    means = images.mean(axis=(0, 2, 3)) / 255
    assert np.all(np.abs(means - np.array([0.4914, 0.4822, 0.4465])) < 0.015)
    assert means[0] - means[2] > 0.02


def test_mnist_csv_matches_png_statistics():
    images, labels = load_testset("mnist")
    assert images.shape == (100, 1, 28, 28)
    assert images.min() == 0 and images.max() == 255
    # digits are light on a dark background in both the CSV and the shipped PNGs
    png = _png_pixels("mnist/8.png")
    assert png[0, 0] == 0 and np.all(images[:, 0, 0, 0] == 0)
    # CSV sample goes through the same preprocessing as the PNG samples
    s = load_sample("mnist:test/0")
    assert np.allclose(s.x[0].numpy(), (images[0] / 255 - 0.1307) / 0.3081, atol=1e-6)


def test_testset_cache_is_read_only():
    images, _ = load_testset("mnist")
    assert load_testset("mnist")[0] is images
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1


@settings(max_examples=30, deadline=None)
@given(
    c=st.sampled_from([1, 3]),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    n=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_parse_image_csv_round_trip(c, h, w, n, seed):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, c, h, w))
    labels = rng.integers(0, 10, size=n)
    rows = []
    for img, lab in zip(imgs, labels, strict=True):
        flat = img.transpose(1, 2, 0).reshape(-1)  # H, W, C order (C = 1: row-major)
        rows.append(",".join(str(v) for v in [lab, *flat]))
    got, got_labels = parse_image_csv("\n".join(rows), (c, h, w), source="t")
    assert np.array_equal(got, imgs.astype(np.float32))
    assert np.array_equal(got_labels, labels)


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


def test_png_file_equals_shipped_sample(tmp_path):
    path = tmp_path / "eight.png"
    with data_path("mnist/8.png") as src:
        path.write_bytes(src.read_bytes())
    s = load_sample(path, entry=MNIST)
    assert torch.equal(s.x, load_sample("mnist:8").x) and s.label is None
    # as a string, and without an entry (shape taken from the image, no normalisation)
    bare = load_sample(str(path))
    assert bare.x.shape == (1, 1, 28, 28)
    assert torch.allclose(bare.x[0, 0], torch.tensor(_png_pixels("mnist/8.png") / 255,
                                                     dtype=torch.float32))


def test_image_conversion_and_resize(tmp_path):
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red, wider than tall
    path = tmp_path / "red.jpg"
    Image.fromarray(rgb).save(path, quality=100)
    s = load_sample(path, entry=ALEX)
    assert s.x.shape == (1, 3, 224, 224)
    pixels = s.x[0] * torch.tensor(ALEX.std).reshape(3, 1, 1) + torch.tensor(ALEX.mean).reshape(
        3, 1, 1)
    assert float(pixels[0].mean()) > 0.95 and float(pixels[1:].abs().max()) < 0.05
    gray = load_sample(path, entry=MNIST)  # RGB -> one channel, resized to 28x28
    assert gray.x.shape == (1, 1, 28, 28)


def test_array_files(tmp_path):
    x = load_sample("mnist:8").x
    p1 = tmp_path / "x.npy"
    np.save(p1, x[0].numpy())  # (1, 28, 28): taken as is (already normalised)
    assert torch.equal(load_sample(p1, entry=MNIST).x, x)
    p2 = tmp_path / "x.pt"
    torch.save(x.clone(), p2)  # (1, 1, 28, 28)
    assert torch.equal(load_sample(p2, entry=MNIST).x, x)
    # raw pixels are scaled and normalised when raw=True
    p3 = tmp_path / "raw.npy"
    np.save(p3, _png_pixels("mnist/8.png")[None].astype(np.float32))
    assert torch.allclose(load_sample(p3, entry=MNIST, raw=True).x, x, atol=1e-6)
    # a batch
    batch = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    p4 = tmp_path / "batch.pt"
    torch.save(batch, p4)
    samples = load_samples(p4, entry=MNIST)
    assert len(samples) == 5 and torch.equal(samples[3].x[0], batch[3])
    with pytest.raises(InputError, match="load_samples"):
        load_sample(p4, entry=MNIST)


def test_array_errors(tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((28, 27), dtype=np.float32))
    with pytest.raises(InputError, match="shape"):
        load_sample(wrong, entry=MNIST)
    nan = tmp_path / "nan.npy"
    arr = np.zeros((1, 28, 28), dtype=np.float32)
    arr[0, 3, 4] = np.nan
    np.save(nan, arr)
    with pytest.raises(InputError, match="NaN"):
        load_sample(nan, entry=MNIST)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a tensor at all")
    with pytest.raises(InputError, match="garbage.pt"):
        load_sample(garbage, entry=MNIST)
    notensor = tmp_path / "dict.pt"
    torch.save({"a": 1}, notensor)
    with pytest.raises(InputError, match="not a tensor"):
        load_sample(notensor, entry=MNIST)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_sample(tmp_path / "missing.png", entry=MNIST)
    with pytest.raises(InputError, match="not found"):
        load_samples(str(tmp_path / "missing_dir"))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(InputError, match="unsupported"):
        load_sample(other, entry=MNIST)
    with pytest.raises(InputError, match="no image files"):
        load_samples(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="broken.png"):
        load_sample(broken, entry=MNIST)


def test_folder_of_images(tmp_path):
    for name, digit in (("b.png", "8"), ("a.png", "2")):
        with data_path(f"mnist/{digit}.png") as src:
            (tmp_path / name).write_bytes(src.read_bytes())
    (tmp_path / "ignored.txt").write_text("x")
    samples = load_samples(tmp_path, entry=MNIST)
    assert [s.name.rsplit("/", 1)[-1] for s in samples] == ["a.png", "b.png"]
    assert torch.equal(samples[0].x, load_sample("mnist:2").x)


def test_csv_file(tmp_path):
    with data_file("testsets/cifar10_test.csv").open("r") as fh:
        lines = fh.read().splitlines()[:3]
    path = tmp_path / "three.csv"
    path.write_text("label,pixels...\n" + "\n".join(lines) + "\n")
    samples = load_samples(path, entry=CIFAR)
    shipped = load_samples("cifar10:test/0-2")
    assert [s.label for s in samples] == [s.label for s in shipped]
    for a, b in zip(samples, shipped, strict=True):
        assert torch.equal(a.x, b.x)
    with pytest.raises(InputError, match="needs the image shape"):
        load_samples(path)
    with pytest.raises(InputError, match="3073"):
        load_samples(path, input_shape=(3, 32, 31))


def test_explicit_normalisation_overrides():
    s = load_sample("cifar10:dog", mean=(0.5,), std=(0.5,))
    px = _png_pixels("cifar10/dog4.png")
    assert np.allclose(s.x[0, 1].numpy(), (px[:, :, 1] / 255 - 0.5) / 0.5, atol=1e-5)
    with pytest.raises(InputError):
        load_sample("mnist:8", mean=(0.1,))
    with pytest.raises(InputError):
        load_sample("mnist:8", mean=(0.1,), std=(-1.0,))
    with pytest.raises(InputError, match="channels"):
        load_sample("mnist:8", mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(InputError):
        load_sample("mnist:8", scale=0)


def test_normalize_pixels_vectors():
    x = normalize_pixels(torch.tensor([[2.0, 4.0]]), mean=(1.0, 1.0), std=(1.0, 3.0), scale=1.0)
    assert torch.equal(x, torch.tensor([[1.0, 1.0]]))


def test_normalize_pixels_keeps_the_pixels_device():
    # the per-channel mean/std are made on the pixels' device: CUDA pixels (here the meta
    # device, which raises the same device-mismatch error) were combined with CPU tensors
    for shape in ((2, 3, 4, 4), (2, 3)):
        x = normalize_pixels(torch.zeros(shape, device="meta"), mean=(0.1, 0.2, 0.3),
                             std=(0.5, 0.5, 0.5))
        assert x.device.type == "meta" and tuple(x.shape) == shape
