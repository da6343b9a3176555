"""Handling gaps closed in session 23: operations that were refused (or taken wrongly at the
intake) although they have a sound reading.

* clamps (``torch.clamp``, ``x.clamp_min``, ``F.relu6``, ``nn.Hardtanh``, ...) as ReLUs
  between diagonal maps: ``clamp(min=0)`` is analysed exactly like ``nn.ReLU``;
* the isometric shape ops ``squeeze`` / ``unsqueeze`` / ``unflatten`` (like flatten);
* ``F.dropout(x, p, training=False)``: the identity (``training=True`` refused);
* ``x / x.size(1)``: arithmetic with a number (a size with the batch dimension refused);
* ``register_rule`` for built-in arithmetic: refused instead of silently never used;
* BatchNorm whose ``track_running_stats`` was set to False after training: torch still
  normalises with its running statistics in eval mode, an affine map;
* ``certified_radius`` reads a 1-D ``x0`` as ``local_bound`` does;
* intake: multi-frame images refused, EXIF orientation applied, float arrays of raw pixels
  and CSV pixels outside 0-255 refused.

References: float64 Jacobians of the torch model at x0 (a lower bound on the local constant
relative to x0), sampled difference quotients in the ball, and the same network written with
the plain layer (the bounds must be the same numbers).
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipbound
from lipbound import Analyzer
from lipbound.errors import InputError, UnsupportedModelError
from lipbound.inputs import load_sample, load_samples
from lipbound.ops.base import DiagOp
from lipbound.ops.registry import FUNCTION_RULES, METHOD_RULES
from lipbound.radius import certified_radius

DT = torch.float64


class Fn(nn.Module):
    """Linear -> f -> Linear, f any callable of the chain's tensor (traced by torch.fx)."""

    def __init__(self, f, n_in: int = 3, hidden: int = 5, n_out: int = 2, seed: int = 0,
                 bias: float = 0.0):
        super().__init__()
        self.a = nn.Linear(n_in, hidden)
        self.b = nn.Linear(hidden, n_out)
        self.f = f
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.a.bias.add_(bias)
        self.double().eval()

    def forward(self, x):
        return self.b(self.f(self.a(x)))


def _bounds(model: nn.Module, x0: torch.Tensor, eps: float) -> tuple[float, float]:
    an = Analyzer(model, tuple(x0.shape[1:]), spectral="exact")
    return an.local_bound(x0, eps).value, an.global_bound().value


def _jac_norm(model: nn.Module, x0: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).reshape(-1),
                                             x0[0])
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2))


def _sampled_ratio(model: nn.Module, x0: torch.Tensor, eps: float, n: int = 3000,
                   seed: int = 1) -> float:
    """The largest ``||f(x) - f(x0)|| / ||x - x0||`` over ``n`` points of the ball (on spheres
    of radii up to ``eps``): a lower bound on the local constant relative to ``x0``."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, x0.shape[1], generator=g, dtype=DT)
    d = d / d.norm(dim=1, keepdim=True)
    r = eps * torch.rand(n, 1, generator=g, dtype=DT).clamp_min(1e-3)
    with torch.no_grad():  # (x0 in the same batch: a batch of one rounds differently)
        y = model(torch.cat([x0, x0 + r * d]))
    return float(((y[1:] - y[:1]).norm(dim=1) / r[:, 0]).max())


# ---------------------------------------------------------------------------------------
# 1. clamps
# ---------------------------------------------------------------------------------------

CLAMPS = {
    "torch.clamp(min=-0.3, max=0.5)": lambda x: torch.clamp(x, min=-0.3, max=0.5),
    "x.clamp(-0.3, 0.5)": lambda x: x.clamp(-0.3, 0.5),
    "torch.clip(max=0.2)": lambda x: torch.clip(x, max=0.2),
    "x.clamp_max(0.1)": lambda x: x.clamp_max(0.1),
    "torch.clamp_min(x, 0.25)": lambda x: torch.clamp_min(x, 0.25),
    "x.clamp(min=-0.5)": lambda x: x.clamp(min=-0.5),
    "F.relu6": F.relu6,
    "F.hardtanh": F.hardtanh,
    "F.hardtanh(-0.2, 0.4)": lambda x: F.hardtanh(x, min_val=-0.2, max_val=0.4),
    "nn.ReLU6": nn.ReLU6(),
    "nn.Hardtanh(-0.5, 0.7)": nn.Hardtanh(-0.5, 0.7),
    "x.clamp(0.3, 0.3)": lambda x: x.clamp(0.3, 0.3),
}


@pytest.mark.parametrize("name", list(CLAMPS))
def test_clamps_are_analysed_soundly(name):
    # refused before (no rule: "unsupported operation"); now ReLUs between diagonal maps.
    # Soundness against the Jacobian at x0 and sampled quotients, at radii where units
    # switch and where they do not
    for seed in range(3):
        net = Fn(CLAMPS[name], seed=seed)
        x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed + 10), dtype=DT)
        an = Analyzer(net, (3,), spectral="exact")
        x = torch.randn(64, 3, dtype=DT) * 3  # many units on both sides of the kinks
        torch.testing.assert_close(an.forward(x), net(x), rtol=0, atol=1e-12)
        glob = an.global_bound().value
        for eps in (1e-3, 0.1, 1.0, 10.0):
            loc = an.local_bound(x0, eps).value
            assert loc >= _sampled_ratio(net, x0, eps)
            assert glob >= _sampled_ratio(net, x0, eps)
            if eps == 1e-3:
                assert loc >= _jac_norm(net, x0) * (1 - 1e-12)
            if eps in (0.1, 1.0):  # the centre-plus-deviation bound walks the same chain
                assert an.local_bound(x0, eps, tight=True).value >= _sampled_ratio(net, x0, eps)
        # no sampled point inside a certified radius changes the class
        for method in ("local", "margin"):
            rad = certified_radius(an, x0, method=method).radius
            g = torch.Generator().manual_seed(seed)
            d = torch.randn(2000, 3, generator=g, dtype=DT)
            d = d / d.norm(dim=1, keepdim=True) * rad * torch.rand(2000, 1, generator=g,
                                                                   dtype=DT)
            with torch.no_grad():
                cls = net(torch.cat([x0, x0 + d])).argmax(dim=1)
            assert bool((cls == cls[0]).all())


@given(lo=st.one_of(st.none(), st.floats(-2, 1)), width=st.floats(0, 2),
       upper=st.booleans(), seed=st.integers(0, 10_000),
       eps=st.sampled_from([1e-4, 0.05, 0.5, 3.0]))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_clamp_bounds_hold_on_random_networks(lo, width, upper, seed, eps):
    hi = (lo if lo is not None else 0.0) + width if upper or lo is None else None
    net = Fn(lambda x: torch.clamp(x, min=lo, max=hi), n_in=3, hidden=4, seed=seed)
    x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    loc, glob = _bounds(net, x0, eps)
    ratio = _sampled_ratio(net, x0, eps, n=800, seed=seed)
    assert loc >= ratio
    assert glob >= ratio
    assert loc >= _jac_norm(net, x0) * (1 - 1e-9) or eps > 1e-4  # (at x0's own pattern)


def test_clamp_min_zero_is_exactly_relu():
    # "clamp(min=0) must work like ReLU": the same op chain, so the same numbers
    x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    ref = [_bounds(Fn(nn.ReLU(), seed=s), x0, e) for s in range(3) for e in (0.05, 2.0)]
    for f in (lambda x: torch.clamp(x, min=0), lambda x: x.clamp(min=0),
              lambda x: x.clamp_min(0), lambda x: torch.clamp_min(x, 0.0),
              lambda x: torch.clip(x, 0)):
        got = [_bounds(Fn(f, seed=s), x0, e) for s in range(3) for e in (0.05, 2.0)]
        assert got == ref
        kinds = [op.kind for op in Analyzer(Fn(f), (3,)).ops]
        assert kinds == ["mixing", "relu", "mixing"]


def test_saturated_clamp_gives_a_zero_local_bound():
    # every unit above the upper threshold at every point of the ball: the output is constant
    # there and the local bound is 0 (the upper kink's mask, like a ReLU's inactive units)
    net = Fn(lambda x: F.hardtanh(x), seed=4, bias=50.0)
    x0 = torch.zeros(1, 3, dtype=DT)
    an = Analyzer(net, (3,), spectral="exact")
    assert an.local_bound(x0, 0.5).value == 0.0
    assert _sampled_ratio(net, x0, 0.5) == 0.0
    # a ball reaching below the threshold: no longer constant, and the bound covers it
    big = 60.0
    assert an.local_bound(x0, big).value >= _sampled_ratio(net, x0, big) > 0.0


def test_clamp_inside_its_range_is_the_linear_map():
    # all units strictly inside (lo, hi) over the ball: the local bound is the norm of the
    # product of the two linear layers (within rounding, never below)
    net = Fn(lambda x: x.clamp(-100.0, 100.0), seed=5)
    x0 = torch.zeros(1, 3, dtype=DT)
    with torch.no_grad():
        w1, w2 = net.a.weight, net.b.weight
        exact = float(torch.linalg.matrix_norm(w2 @ w1, 2))
        product = float(torch.linalg.matrix_norm(w1, 2) * torch.linalg.matrix_norm(w2, 2))
    loc = Analyzer(net, (3,), spectral="exact").local_bound(x0, 0.1).value
    # (the paper's product of layer factors: ||W2|| ||W1||, the factors of the two kinks 1)
    assert exact <= loc <= product * (1 + 1e-6)


def test_clamp_in_a_conv_net_and_as_the_whole_model():
    g = torch.Generator().manual_seed(6)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 2)
    net.eval()
    x0 = torch.randn(1, 1, 4, 4, generator=g, dtype=DT)
    an = Analyzer(net, (1, 4, 4), spectral="exact")
    for eps in (0.01, 0.5):
        flat = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), net).eval()
        assert an.local_bound(x0, eps).value >= _sampled_ratio(flat, x0.reshape(1, 16), eps)
    # a clamp alone: 1-Lipschitz, 0 inside a saturated ball
    alone = nn.Hardtanh(-1.0, 1.0).eval()
    a1 = Analyzer(alone, (4,), spectral="exact")
    assert a1.global_bound().value >= 1.0
    assert a1.local_bound(torch.full((1, 4), 5.0, dtype=DT), 1.0).value == 0.0


def test_clamp_thresholds_cover_their_float32_rounding():
    # torch uses the threshold rounded to the tensor's type: 0.1 in a float32 model is
    # float32(0.1); the shift of each diagonal map carries the difference as shift_err
    net = Fn(lambda x: x.clamp(min=0.1, max=0.7)).float()
    ops = Analyzer(net, (3,)).ops
    d = abs(0.1 - float(np.float32(0.1)))
    diags = [op for op in ops if isinstance(op, DiagOp)]
    assert len(diags) == 3
    assert all(op.shift_err is not None and float(op.shift_err.min()) >= d for op in diags)
    exact = Analyzer(Fn(lambda x: x.clamp(min=0.5, max=0.75)).float(), (3,)).ops
    ends = [op for op in exact if isinstance(op, DiagOp)]
    assert ends[0].shift_err is None and ends[-1].shift_err is None  # (0.5: exact)


def test_unsupported_clamps_are_refused_naming_the_problem():
    class TensorBound(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.register_buffer("lo", torch.zeros(4))

        def forward(self, x):
            return self.a(x).clamp(min=self.lo)

    with pytest.raises(UnsupportedModelError, match="tensor bounds"):
        Analyzer(TensorBound().eval(), (3,))
    with pytest.raises(UnsupportedModelError, match="min 1.0 > max 0.0"):
        Analyzer(Fn(lambda x: x.clamp(1.0, 0.0)), (3,))


# ---------------------------------------------------------------------------------------
# 2. shape ops
# ---------------------------------------------------------------------------------------


SHAPES = {
    "unsqueeze/squeeze(1)": lambda x: F.relu(x.unsqueeze(1)).squeeze(1),
    "torch.unsqueeze/squeeze(-1)": lambda x: torch.squeeze(F.relu(torch.unsqueeze(x, -1)), -1),
    "squeeze(dim=2)": lambda x: F.relu(x.unsqueeze(2)).squeeze(dim=2),
    "unflatten/flatten": lambda x: F.relu(x.unflatten(1, (2, 2))).flatten(1),
    "torch.unflatten": lambda x: torch.flatten(F.relu(torch.unflatten(x, 1, (4, 1))), 1),
    "nn.Unflatten": nn.Sequential(nn.Unflatten(1, (2, 2)), nn.ReLU(), nn.Flatten()),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_isometric_shape_ops_are_analysed_like_flatten(name):
    # refused before ("no rule for this operation"); the same bounds as without them
    x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(7), dtype=DT)
    for seed in range(2):
        ref = [_bounds(Fn(nn.ReLU(), hidden=4, seed=seed), x0, e) for e in (0.05, 2.0)]
        got = [_bounds(Fn(SHAPES[name], hidden=4, seed=seed), x0, e) for e in (0.05, 2.0)]
        assert got == ref


@pytest.mark.parametrize("f", [lambda x: x.unsqueeze(1).squeeze(),
                               lambda x: torch.squeeze(x.unsqueeze(1)),
                               lambda x: x.squeeze(0), lambda x: x.squeeze((0, 1))])
def test_squeezing_the_batch_dimension_is_refused(f):
    # at the batch of 2 the tracer runs, squeeze() keeps the batch; at one input it drops it
    with pytest.raises(UnsupportedModelError, match="batch dimension"):
        Analyzer(Fn(f), (3,))


# ---------------------------------------------------------------------------------------
# 3. functional dropout
# ---------------------------------------------------------------------------------------


class SelfTraining(Fn):
    def __init__(self):
        super().__init__(nn.ReLU(), seed=8)

    def forward(self, x):
        return self.b(F.dropout(F.relu(self.a(x)), 0.4, self.training))


@pytest.mark.parametrize("f", [lambda x: F.dropout(F.relu(x), 0.3, False),
                               lambda x: F.dropout(F.relu(x), p=0.3, training=False),
                               lambda x: F.alpha_dropout(F.relu(x), 0.2),
                               lambda x: F.dropout1d(F.relu(x).unsqueeze(-1), 0.2,
                                                     False).squeeze(-1),
                               lambda x: torch.dropout(F.relu(x), 0.5, False)])
def test_functional_dropout_in_inference_is_the_identity(f):
    x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(9), dtype=DT)
    ref = [_bounds(Fn(nn.ReLU(), seed=8), x0, e) for e in (0.05, 2.0)]
    assert [_bounds(Fn(f, seed=8), x0, e) for e in (0.05, 2.0)] == ref
    assert [_bounds(SelfTraining().eval(), x0, e) for e in (0.05, 2.0)] == ref


@pytest.mark.parametrize("f", [lambda x: F.dropout(x, 0.3), lambda x: F.dropout(x, 0.3, True),
                               lambda x: F.alpha_dropout(x, 0.2, True),
                               lambda x: torch.dropout(x, 0.5, True)])
def test_functional_dropout_in_training_is_refused(f):
    with pytest.raises(UnsupportedModelError, match="training=True"):
        Analyzer(Fn(f), (3,))


# ---------------------------------------------------------------------------------------
# 4. sizes in arithmetic
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("f,c", [(lambda x: F.relu(x) / x.size(1), 1 / 5),
                                 (lambda x: F.relu(x) * x.shape[-1], 5.0),
                                 (lambda x: F.relu(x) / x.size(-1) ** 0.5, 5 ** -0.5),
                                 (lambda x: F.relu(x) * (x.size(1) - x.dim()), 3.0)])
def test_arithmetic_with_a_per_sample_size_is_arithmetic_with_a_number(f, c):
    # was refused as "not a chain ... residual or multi-input connections"
    x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(11), dtype=DT)
    net = Fn(f, seed=12)
    loc, glob = _bounds(net, x0, 0.5)
    ref = _bounds(Fn(lambda x: F.relu(x) * c, seed=12), x0, 0.5)
    assert loc == pytest.approx(ref[0], rel=1e-12) and glob == pytest.approx(ref[1], rel=1e-12)
    assert loc >= _sampled_ratio(net, x0, 0.5)


@pytest.mark.parametrize("f", [lambda x: x / x.size(0), lambda x: x * x.shape[0],
                               lambda x: x / x.numel()])
def test_arithmetic_with_the_batch_size_is_refused_naming_it(f):
    with pytest.raises(UnsupportedModelError, match="batch dimension") as err:
        Analyzer(Fn(f), (3,))
    assert "residual" not in str(err.value)


def test_a_size_of_a_constant_is_not_taken_for_a_batch_size():
    # (the sizes followed are those of tensors computed from the input; a weight's dim 0 is
    # no batch dimension: refused as before, as an operand lipbound does not read)
    class WeightSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)

        def forward(self, x):
            return self.a(x) / self.a.weight.size(0)

    with pytest.raises(UnsupportedModelError, match="neither the chain's tensor") as err:
        Analyzer(WeightSize().eval(), (3,))
    assert "batch dimension" not in str(err.value)

# ---------------------------------------------------------------------------------------
# 5. register_rule for built-in arithmetic
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [operator.add, operator.mul, operator.truediv, torch.add,
                                    torch.mul, "add", "div", "neg"])
def test_register_rule_refuses_built_in_arithmetic(target):
    # such a rule was stored and never used (the tracer reads these calls as arithmetic)
    before = (dict(FUNCTION_RULES), dict(METHOD_RULES))
    with pytest.raises(InputError, match="arithmetic"):
        lipbound.register_rule(target, lambda m, name, i, o: None)
    assert (dict(FUNCTION_RULES), dict(METHOD_RULES)) == before


# ---------------------------------------------------------------------------------------
# 6. batch norm whose flag was switched off after training
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (4,)), (nn.BatchNorm2d, (4, 3, 3))])
def test_batchnorm_with_running_stats_and_the_flag_off_is_its_affine_map(cls, shape):
    # torch's _BatchNorm.forward in eval mode normalises with running_mean / running_var
    # whenever both exist, whatever track_running_stats says: an affine map (was refused)
    g = torch.Generator().manual_seed(13)

    def make(flag: bool) -> nn.Module:
        bn = cls(4).double()
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(4, generator=g, dtype=DT))
            bn.running_var.copy_(torch.rand(4, generator=g, dtype=DT) + 0.5)
            bn.weight.copy_(torch.randn(4, generator=g, dtype=DT))
            bn.bias.copy_(torch.randn(4, generator=g, dtype=DT))
        bn.track_running_stats = flag
        return nn.Sequential(bn, nn.ReLU(), nn.Flatten(),
                             nn.Linear(int(np.prod(shape)), 2).double()).eval()

    off = make(False)
    on = make(True)
    on.load_state_dict(off.state_dict())
    x = torch.randn(5, *shape, generator=g, dtype=DT)
    # the premise: torch computes the affine map of the running statistics in eval mode
    torch.testing.assert_close(off(x), on(x), rtol=0, atol=0)
    x0 = x[:1]
    assert _bounds(off, x0, 0.3) == _bounds(on, x0, 0.3)


def test_batchnorm_without_running_stats_is_refused_saying_why():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(UnsupportedModelError, match="statistics of the batch"):
        Analyzer(net, (3,))


# ---------------------------------------------------------------------------------------
# 7. certified_radius and local_bound read x0 alike
# ---------------------------------------------------------------------------------------


def test_certified_radius_reads_a_1d_x0_like_local_bound():
    # local_bound(model, x0 of shape (n,)) analyses it as one input; certified_radius
    # refused it ("x0 must have a batch dimension of 1")
    net = Fn(nn.ReLU(), n_out=3, seed=14)
    x0 = torch.randn(3, generator=torch.Generator().manual_seed(15), dtype=DT)
    assert lipbound.local_bound(net, x0, 0.1).value == \
        lipbound.local_bound(net, x0[None], 0.1).value
    for method in ("local", "global"):
        a = certified_radius(net, x0, method=method, spectral="exact")
        b = certified_radius(net, x0[None], method=method, spectral="exact")
        assert a.radius == b.radius > 0
    with pytest.raises(InputError, match="batch dimension of 1"):
        certified_radius(net, torch.randn(2, 3, dtype=DT))


# ---------------------------------------------------------------------------------------
# 8. intake
# ---------------------------------------------------------------------------------------


def test_multi_frame_image_is_refused_naming_the_frame_count(tmp_path):
    from PIL import Image

    a = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 15)
    frames = [Image.fromarray(a), Image.fromarray(255 - a), Image.fromarray(a // 2)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="3 frames"):
        load_sample(path, input_shape=(1, 4, 4))
    one = tmp_path / "one.gif"
    frames[0].save(one)
    assert load_sample(one, input_shape=(1, 4, 4)).x.shape == (1, 1, 4, 4)
    # a camera's MPO JPEG (a photo and its previews / depth maps): the photo is the first
    mpo = tmp_path / "photo.jpg"
    rgb = [f.convert("RGB") for f in frames]
    rgb[0].save(mpo, format="MPO", save_all=True, append_images=rgb[1:])
    with Image.open(mpo) as im:
        assert im.format == "MPO" and im.n_frames == 3
        first = np.asarray(im.convert("L"), dtype=np.float32)
    x = load_sample(mpo, input_shape=(1, 4, 4)).x
    torch.testing.assert_close(x[0, 0], torch.from_numpy(first) / 255, rtol=0, atol=1e-7)


def test_exif_orientation_is_applied(tmp_path, caplog):
    from PIL import Image, ImageOps

    a = (np.arange(6, dtype=np.uint8).reshape(2, 3) * 40)  # 3 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "photo.png"
    Image.fromarray(a).save(path, exif=exif)
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im), dtype=np.float32)
    assert upright.shape == (3, 2)
    with caplog.at_level("WARNING", logger="lipbound.inputs"):
        x = load_sample(path, input_shape=(1, 3, 2)).x
    torch.testing.assert_close(x[0, 0], torch.from_numpy(upright) / 255, rtol=0, atol=1e-7)
    assert "orientation" in caplog.text and "resized" not in caplog.text


def test_float_array_of_raw_pixels_is_refused_when_a_normalisation_is_known(tmp_path):
    g = np.random.default_rng(16)
    pixels = g.integers(0, 256, size=(1, 1, 4, 4)).astype(np.float32)
    path = tmp_path / "raw.npy"
    np.save(path, pixels)
    kw = {"input_shape": (1, 4, 4), "mean": (0.1307,), "std": (0.3081,)}
    with pytest.raises(InputError, match="raw 0-255 pixels"):
        load_sample(path, **kw)
    with pytest.raises(InputError, match="raw=True"):
        load_samples(path, **kw)
    # the same pixels with raw=True, and normalised inputs (standard normal values), load
    x = load_sample(path, raw=True, **kw).x
    torch.testing.assert_close(x, (torch.from_numpy(pixels) / 255 - 0.1307) / 0.3081)
    np.save(path, g.standard_normal((1, 1, 4, 4)).astype(np.float32) * 3)
    assert load_sample(path, **kw).x.shape == (1, 1, 4, 4)
    # without a normalisation an array is taken as it is
    np.save(path, pixels)
    assert float(load_sample(path, input_shape=(1, 4, 4)).x.max()) == float(pixels.max())


@pytest.mark.parametrize("bad", ["300", "-1", "255.5"])
def test_csv_pixels_outside_0_255_are_refused(tmp_path, bad):
    path = tmp_path / "rows.csv"
    path.write_text("label," + ",".join(f"p{i}" for i in range(4)) + "\n"
                    "1,0,10,20,255\n"
                    f"0,5,{bad},7,8\n")
    with pytest.raises(InputError, match="row 1 .*0-255"):
        load_samples(path, input_shape=(1, 2, 2))
    path.write_text("1,0,10,20,255\n0,5,6,7,8\n")
    assert len(load_samples(path, input_shape=(1, 2, 2))) == 2

