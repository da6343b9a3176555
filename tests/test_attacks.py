"""Tests of the minimal-L2 adversarial attacks (lipbound.attacks).

What is checked, independently of the attacks' internals:

* every successful attack returns a point that a fresh forward pass classifies differently,
  and its radius is ``||x_adv - x0||`` recomputed in float64 (> 0);
* no attack beats the true minimal adversarial distance: closed forms for linear
  classifiers (``min_j (z_c - z_j) / ||w_c - w_j||``), and for random ReLU networks the
  global-Lipschitz lower bound ``margin / (sqrt 2 * prod ||W_k||_2)``;
* on linear classifiers every attack is within 2 % of the closed form;
* with ``bounds`` every result stays in the box, and when the box holds no adversarial point
  every attack reports failure;
* bad inputs raise InputError; equal seeds give equal results; the model is untouched.

The only tolerance is float64 rounding (1e-9 relative) in the direction "radius >= true
minimum"; the accuracy checks are one-sided (radius <= 1.02 * minimum).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipbound.attacks import (
    ATTACKS,
    DEFAULT_METHODS,
    FGSM,
    PGD,
    Attack,
    AttackResult,
    CarliniWagnerL2,
    GradientAscent,
    IterativeFGSM,
    get_attack,
    run_attacks,
)
from lipbound.errors import InputError
from lipbound.results import Guarantee

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64
METHODS = list(DEFAULT_METHODS)
DATA = Path(__file__).resolve().parents[1] / "src" / "lipbound" / "zoo" / "data"  # shipped copy

# cheaper settings for the hypothesis tests (many examples); defaults elsewhere
FAST = {
    "fgsm": {},
    "ifgsm": {"rounds": 3},
    "gradient": {"step_fractions": (1 / 8, 1 / 32), "max_steps": 300},
    "cw": {"binary_steps": 6, "steps": 60},
    "pgd": {"steps": 60, "restarts": 4},
}


# ---------------------------------------------------------------------------------------
# reference models


def mlp(seed: int, sizes=(6, 16, 12, 4), dtype=DT) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        lin = nn.Linear(a, b).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=dtype) / math.sqrt(a))
            lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def small_conv(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    ).eval()


def linear(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0]).to(w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return nn.Sequential(lin).eval()


def linear_min_distance(w: torch.Tensor, b: torch.Tensor, x0: torch.Tensor) -> float:
    """Exact minimal L2 distance to a class change of the classifier x -> W x + b."""
    z = (w @ x0.reshape(-1) + b).to(DT)
    c = int(z.argmax())
    best = math.inf
    for j in range(w.shape[0]):
        if j != c:
            best = min(best, float((z[c] - z[j]) / (w[c] - w[j]).to(DT).norm()))
    return best


def lipschitz_lower_radius(model: nn.Sequential, x0: torch.Tensor) -> float:
    """margin / (sqrt 2 * prod ||W||_2): no perturbation smaller than this changes the class
    of a Linear/ReLU chain (the ReLU is 1-Lipschitz)."""
    lip = 1.0
    for m in model:
        if isinstance(m, nn.Linear):
            lip *= float(torch.linalg.matrix_norm(m.weight.detach().to(DT), ord=2))
    with torch.no_grad():
        z = model(x0)[0].to(DT)
    top = torch.topk(z, 2).values
    return float(top[0] - top[1]) / (math.sqrt(2.0) * lip)


def assert_verified(model: nn.Module, x0: torch.Tensor, res: AttackResult) -> None:
    """The independent check of a successful result."""
    assert res.success, res.details
    assert res.guarantee is Guarantee.ATTACK
    assert res.x_adv is not None and res.x_adv.shape == x0.shape
    with torch.no_grad():
        c0 = int(model(x0).argmax(dim=1))
        z = model(res.x_adv.to(x0.dtype))[0]
    assert res.original_class == c0
    others = torch.cat([z[:c0], z[c0 + 1:]])
    assert bool(others.max() > z[c0]), "the returned point does not change the class"
    assert res.adversarial_class == int(z.argmax()) != c0
    r = float((res.x_adv.to(DT) - x0.to(DT)).norm())
    assert res.radius is not None and res.radius > 0
    assert res.radius == pytest.approx(r, rel=1e-12, abs=0.0)
    json.dumps(res.to_dict())


# ---------------------------------------------------------------------------------------
# verification on random networks


@pytest.mark.parametrize("method", METHODS)
def test_verified_on_random_mlp_and_conv(method: str) -> None:
    for seed in range(2):
        model = mlp(seed)
        x0 = torch.randn(1, 6, generator=torch.Generator().manual_seed(10 + seed), dtype=DT)
        assert_verified(model, x0, get_attack(method, **FAST[method])(model, x0, seed=seed))
    conv = small_conv(3)
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    res = get_attack(method)(conv, x0)  # defaults
    assert_verified(conv, x0, res)
    assert res.x_adv is not None and res.x_adv.dtype == torch.float32


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_never_below_lipschitz_lower_bound(seed: int, scale: float) -> None:
    model = mlp(seed, sizes=(5, 10, 8, 3))
    x0 = scale * torch.randn(1, 5, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    lower = lipschitz_lower_radius(model, x0)
    for method in METHODS:
        res = get_attack(method, **FAST[method])(model, x0, seed=seed)
        if res.success:
            assert_verified(model, x0, res)
            assert res.radius is not None and res.radius >= lower * (1 - 1e-9)
    # the strongest attack should not fail on an unbounded ReLU network with a gradient
    assert get_attack("pgd", **FAST["pgd"])(model, x0, seed=seed).success


# ---------------------------------------------------------------------------------------
# closed form: linear classifiers


@settings(max_examples=12)
@given(n_in=st.integers(1, 12), n_cls=st.integers(2, 5), seed=st.integers(0, 10_000),
       log_scale=st.floats(-3.0, 3.0))
def test_linear_closed_form(n_in: int, n_cls: int, seed: int, log_scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale  # from barely confident to saturated cross-entropy
    w = scale * torch.randn(n_cls, n_in, generator=g, dtype=DT)
    b = scale * torch.randn(n_cls, generator=g, dtype=DT)
    x0 = torch.randn(1, n_in, generator=g, dtype=DT)
    model = linear(w, b)
    r_star = linear_min_distance(w, b, x0)
    for method in METHODS:
        res = get_attack(method, **FAST[method])(model, x0, seed=seed)
        if method in ("fgsm", "ifgsm", "gradient") and not res.success:
            # the single-direction attacks may miss (saturated cross-entropy, > 2 classes):
            # a miss is reported as such, never as a radius
            assert res.radius is None and res.x_adv is None
            continue
        assert_verified(model, x0, res)
        assert res.radius is not None
        assert res.radius >= r_star * (1 - 1e-9), method  # never below the true minimum
        if method == "pgd" or (n_cls == 2 and method == "cw"):
            # the strong attacks find the nearest boundary (PGD's targeted runs cover the
            # case where it is not the runner-up's)
            assert res.radius <= 1.02 * r_star, (method, res.radius, r_star)


def test_linear_two_class_defaults_are_tight() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 30, generator=g, dtype=DT)
    b = torch.randn(2, generator=g, dtype=DT)
    x0 = torch.randn(1, 30, generator=g, dtype=DT)
    model = linear(w, b)
    r_star = abs(float((w[1] - w[0]) @ x0[0] + b[1] - b[0])) / float((w[1] - w[0]).norm())
    assert r_star == pytest.approx(linear_min_distance(w, b, x0), rel=1e-12)
    for res in run_attacks(model, x0):
        assert_verified(model, x0, res)
        assert r_star * (1 - 1e-9) <= res.radius <= 1.02 * r_star, res.method
    # the sign direction of FGSM is not the optimal one: only the lower side holds
    res = FGSM(direction="sign")(model, x0)
    assert_verified(model, x0, res)
    assert res.radius >= r_star * (1 - 1e-9)


def test_parameter_free_model() -> None:
    """nn.Identity on R^2 with x0 = (a, b), a > b: the class changes at (a - b) / sqrt 2."""

    class Scores(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    x0 = torch.tensor([[[1.5, -0.5]]], dtype=DT)
    model = Scores().eval()
    for res in run_attacks(model, x0):
        assert_verified(model, x0, res)
        assert 2 / math.sqrt(2) * (1 - 1e-9) <= res.radius <= 2 / math.sqrt(2) * 1.02


# ---------------------------------------------------------------------------------------
# bounds


@pytest.mark.parametrize("method", METHODS)
def test_bounds_respected(method: str) -> None:
    model = small_conv(1)
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    res = get_attack(method, **FAST[method])(model, x0, bounds=(0.0, 1.0))
    if res.success:
        assert_verified(model, x0, res)
        assert res.x_adv is not None
        assert bool((res.x_adv >= 0).all() and (res.x_adv <= 1).all())
    # tensor bounds, elementwise, tight around x0
    lo, hi = x0 - 0.3, x0 + 0.3
    res = get_attack(method, **FAST[method])(model, x0, bounds=(lo, hi))
    if res.success:
        assert_verified(model, x0, res)
        assert res.x_adv is not None
        assert bool((res.x_adv >= lo).all() and (res.x_adv <= hi).all())


@pytest.mark.parametrize("method", METHODS)
def test_no_adversarial_in_box_means_failure(method: str) -> None:
    # z1 - z0 = x_1 + x_2 - 3 < 0 on the whole box [0, 1]^2: class 0 everywhere
    model = linear(torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT),
                   torch.tensor([0.0, -3.0], dtype=DT))
    x0 = torch.tensor([[0.5, 0.5]], dtype=DT)
    res = get_attack(method, **FAST[method])(model, x0, bounds=(0.0, 1.0))
    assert not res.success and res.radius is None and res.x_adv is None
    assert res.adversarial_class is None
    # without the box the same attack succeeds, at the closed-form distance 2 / sqrt 2
    res = get_attack(method, **FAST[method])(model, x0)
    assert_verified(model, x0, res)
    assert math.sqrt(2) * (1 - 1e-9) <= res.radius <= math.sqrt(2) * 1.02


def test_box_binding_linear() -> None:
    """A box that binds: z1 - z0 = x_1 + x_2 - 1.6 on [0, 1]^2 from x0 = (0.9, 0.1).

    Without the box the nearest flip is x0 + (0.3, 0.3), outside the box (x_1 = 1.2), at
    distance 0.6 / sqrt 2. With the box, min ||d|| s.t. d_1 + d_2 >= 0.6, d_1 <= 0.1 is
    d = (0.1, 0.5) (KKT), at distance sqrt(0.26). No attack may beat that, and all stay in
    the box."""
    w = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    b = torch.tensor([0.0, -1.6], dtype=DT)
    x0 = torch.tensor([[0.9, 0.1]], dtype=DT)
    model = linear(w, b)
    r_box = math.sqrt(0.26)
    for res in run_attacks(model, x0, bounds=(0.0, 1.0)):
        assert_verified(model, x0, res)
        assert res.x_adv is not None and bool(((res.x_adv >= 0) & (res.x_adv <= 1)).all())
        assert r_box * (1 - 1e-9) <= res.radius, res.method
        assert res.radius <= 1.02 * r_box, (res.method, res.radius)


# ---------------------------------------------------------------------------------------
# bad input


@pytest.fixture()
def model_and_x():
    return mlp(0), torch.randn(1, 6, generator=torch.Generator().manual_seed(0), dtype=DT)


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs(method: str, model_and_x) -> None:
    model, x0 = model_and_x
    attack = get_attack(method)
    bad = x0.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        attack(model, bad)
    with pytest.raises(InputError, match="batch dimension"):
        attack(model, x0[0])
    with pytest.raises(InputError, match="batch dimension"):
        attack(model, x0.repeat(2, 1))
    with pytest.raises(InputError, match="floating"):
        attack(model, torch.ones(1, 6, dtype=torch.long))
    model.train()
    try:
        with pytest.raises(InputError, match="eval"):
            attack(model, x0)
    finally:
        model.eval()


def test_bad_model_outputs() -> None:
    x0 = torch.randn(1, 4, dtype=DT)

    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=1)

    class ThreeD(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(-1)

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor):
            return x, x

    for model, msg in ((Flat(), "2-D"), (ThreeD(), "2-D"), (nn.Linear(4, 1).to(DT), "class"),
                       (Pair(), "tensor"), (nn.Linear(3, 2).to(DT), "failed on x0")):
        for method in METHODS:
            with pytest.raises(InputError, match=msg):
                get_attack(method)(model.eval(), x0)
    with pytest.raises(InputError, match="Module"):
        FGSM()(lambda x: x, x0)  # type: ignore[arg-type]


def test_bad_bounds_and_options(model_and_x) -> None:
    model, x0 = model_and_x
    with pytest.raises(InputError, match="outside"):
        PGD()(model, x0, bounds=(x0.max().item() + 1, x0.max().item() + 2))
    with pytest.raises(InputError, match="lo < hi"):
        PGD()(model, x0, bounds=(1.0, -1.0))
    with pytest.raises(InputError, match="finite"):
        PGD()(model, x0, bounds=(-math.inf, math.inf))
    with pytest.raises(InputError, match="bounds"):
        PGD()(model, x0, bounds=(0.0,))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="broadcastable"):
        PGD()(model, x0, bounds=(torch.zeros(3), torch.ones(3)))
    with pytest.raises(InputError, match="seed"):
        PGD()(model, x0, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown attack"):
        run_attacks(model, x0, ("fgsm", "deepfool"))
    with pytest.raises(InputError, match="invalid options"):
        get_attack("cw", learning_rate=1.0)
    with pytest.raises(InputError, match="not being run"):
        run_attacks(model, x0, ("fgsm",), options={"cw": {"steps": 5}})
    for make in (lambda: FGSM(direction="linf"), lambda: FGSM(loss="hinge"),
                 lambda: IterativeFGSM(steps=0), lambda: IterativeFGSM(step_factor=-1),
                 lambda: GradientAscent(step_fractions=(0.1, -1.0)),
                 lambda: CarliniWagnerL2(kappa=-1.0), lambda: CarliniWagnerL2(steps=0),
                 lambda: PGD(restarts=0), lambda: PGD(gamma=1.5)):
        with pytest.raises(InputError):
            make()


def test_inference_mode_is_rejected(model_and_x) -> None:
    model, x0 = model_and_x
    with torch.inference_mode(), pytest.raises(InputError, match="inference"):
        PGD()(model, x0)


# ---------------------------------------------------------------------------------------
# determinism, side effects, API


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_given_seed(method: str) -> None:
    model = small_conv(5)
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    a = get_attack(method, **FAST[method])(model, x0, seed=7)
    b = get_attack(method, **FAST[method])(model, x0, seed=7)
    assert a.success == b.success
    assert a.radius == b.radius
    if a.x_adv is not None and b.x_adv is not None:
        assert torch.equal(a.x_adv, b.x_adv)
    assert {k: v for k, v in a.to_dict()["details"].items()} == b.to_dict()["details"]


def test_model_untouched_and_works_under_no_grad() -> None:
    model = small_conv(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    x_copy = x0.clone()
    with torch.no_grad():
        results = run_attacks(model, x0, seed=1, options=FAST)
    for res in results:
        assert_verified(model, x0, res)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(x0, x_copy) and not x0.requires_grad


def test_run_attacks_and_registry(model_and_x) -> None:
    model, x0 = model_and_x
    res = run_attacks(model, x0, ("pgd", "fgsm"), options={"pgd": {"steps": 40}})
    assert [r.method for r in res] == ["pgd", "fgsm"]
    assert set(ATTACKS) == set(METHODS)
    for name, cls in ATTACKS.items():
        assert issubclass(cls, Attack) and cls.name == name
        assert cls.__doc__ and cls.__module__.endswith(name)
    d = res[0].to_dict()
    assert "x_adv" not in d and d["guarantee"] == Guarantee.ATTACK.value and d["norm"] == "l2"
    with pytest.raises(AttributeError):
        res[0].radius = 0.0  # type: ignore[misc]  # frozen


def test_saturated_cross_entropy_falls_back_to_margin() -> None:
    """Logit gap 1e4: the cross-entropy gradient underflows to 0 in float32."""
    w = torch.tensor([[1e3, 0.0], [-1e3, 0.0]])
    b = torch.tensor([0.0, 0.0])
    model = linear(w, b).float()
    x0 = torch.tensor([[5.0, 1.0]])
    for method in ("fgsm", "ifgsm"):
        res = get_attack(method)(model, x0)
        assert_verified(model, x0, res)
        assert 5.0 * (1 - 1e-6) <= res.radius <= 5.0 * 1.02


def test_constant_model_fails_cleanly() -> None:
    """No input changes the class: every attack must report failure, not a bogus point."""

    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0, -1.0]], dtype=x.dtype) + 0.0 * x.sum(dim=1,
                                                                                keepdim=True)

    x0 = torch.randn(1, 4, dtype=DT)
    for res in run_attacks(Constant().eval(), x0, options=FAST):
        assert not res.success and res.radius is None and res.x_adv is None, res.method
        json.dumps(res.to_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:  # pragma: no cover - depends on hardware
    model = small_conv(0).cuda()
    x0 = torch.randn(1, 1, 8, 8, device="cuda")
    for res in run_attacks(model, x0):
        assert res.x_adv is not None and res.x_adv.is_cuda
        assert_verified(model, x0, res)


# ---------------------------------------------------------------------------------------
# the paper's MNIST LeNet (weights read directly from the shared data, not via the zoo)


@pytest.mark.skipif(not (DATA / "mnist" / "lenet_ckpt_99.ckpt").exists(),
                    reason="shared MNIST data not present")
def test_mnist_lenet_digit_8() -> None:
    from PIL import Image

    class LeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
            self.fc1, self.fc2 = nn.Linear(256, 120), nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    model = LeNet()
    ckpt = torch.load(DATA / "mnist" / "lenet_ckpt_99.ckpt", map_location="cpu")
    model.load_state_dict(ckpt["net"])
    model.eval()
    img = torch.tensor(np.asarray(Image.open(DATA / "mnist" / "8.png")), dtype=torch.float32)
    x0 = ((img / 255 - 0.1307) / 0.3081).reshape(1, 1, 28, 28)
    results = {r.method: r for r in run_attacks(model, x0, ("cw", "pgd"))}
    for res in results.values():
        assert_verified(model, x0, res)
        assert res.original_class == 8
        # the paper reports class changes at L2 ~3.4 (C&W) to ~5.4 (I-FGSM)
        assert 1.0 < res.radius < 6.0, (res.method, res.radius)
