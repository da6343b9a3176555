"""Shared helpers of the core test suite (tests/test_core_*.py, tests/test_spectral.py).

Everything here is written independently of lipbound's internals, so that it can serve as a
reference:

* random small networks (fully connected and convolutional) built from a hypothesis-drawn
  *spec*, in float64 and eval mode;
* :func:`diff_forward`, an accurate evaluation of ``f(x0 + dx) - f(x0)`` that propagates the
  perturbation ``dx`` through the layers without the cancellation of computing ``f(x0 + dx)``
  and ``f(x0)`` separately (so ratios at radii down to 1e-7 are accurate to ~1e-14 relative,
  far below the 1e-9 safety margin of the bounds);
* brute-force lower bounds on local/global Lipschitz constants: dense sampling in the ball,
  on the sphere and at tiny radii, a projected gradient ascent, and the Jacobian norm;
* materialisation of a layer's matrix from the torch module itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from lipbound import Normalize

DT = torch.float64
SCALE = float(os.environ.get("LIPBOUND_TEST_SCALE", "1"))
"""Multiplier of the hypothesis example counts (e.g. 10 for a thorough local run)."""


def n_examples(n: int) -> int:
    return max(1, int(round(n * SCALE)))


# --------------------------------------------------------------------------- shape modules
class View(nn.Module):
    """``x.view(x.size(0), -1)`` -- traced by torch.fx into size/view nodes."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1)


class TorchFlatten(nn.Module):
    """``torch.flatten(x, 1)`` as a module (traced into a call_function node)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(x, 1)


class Grid(nn.Module):
    """``x.view(-1, *shape)``: a flat vector as a feature map."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.view(-1, *self.shape)


# --------------------------------------------------------------------------- random weights
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def _rand(g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=g, dtype=DT)


def randomize_batchnorm_(m: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> None:
    """Random running mean, running variance (in [0.5, 1.5)) and scale of an existing batch
    norm, in place, drawn from ``g`` in that order."""
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
        m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
        m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=DT))


def random_batchnorm(c: int, g: torch.Generator, dims: int = 2,
                     dtype: torch.dtype = DT) -> nn.Module:
    """BatchNorm in eval mode with random running statistics and affine parameters (gamma may
    be negative or tiny)."""
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(c).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(_randn(g, c).to(dtype) * 0.5)
        bn.running_var.copy_(0.1 + 2.0 * _rand(g, c).to(dtype))
        bn.weight.copy_(_randn(g, c).to(dtype))
        bn.bias.copy_(_randn(g, c).to(dtype) * 0.5)
    return bn.eval()


def random_normalize(c: int, g: torch.Generator, spatial_dims: int) -> Normalize:
    mean = (_randn(g, c) * 0.5).tolist()
    std = (0.2 + 1.8 * _rand(g, c)).tolist()
    return Normalize(mean, std, spatial_dims=spatial_dims)


def _init_affine(m: nn.Module, g: torch.Generator, gain: float, bias_scale: float,
                 zero_rows: int) -> None:
    with torch.no_grad():
        w = m.weight
        fan_in = w[0].numel()
        w.copy_(_randn(g, *w.shape) * gain / math.sqrt(fan_in))
        if zero_rows and w.shape[0] > 1:
            idx = torch.randperm(w.shape[0], generator=g)[:min(zero_rows, w.shape[0] - 1)]
            w[idx] = 0.0
        if m.bias is not None:
            m.bias.copy_(_randn(g, m.bias.shape[0]) * bias_scale)


# --------------------------------------------------------------------------- FC networks
@st.composite
def fc_specs(draw, max_width: int = 40) -> dict:
    """A random fully connected ReLU network (with optional BatchNorm1d, Dropout,
    Normalize first, dead rows, layers without ReLU)."""
    depth = draw(st.integers(1, 4))
    layers = []
    for _ in range(depth - 1):
        layers.append(dict(
            width=draw(st.integers(1, max_width)),
            relu=draw(st.sampled_from([True, True, True, False])),
            bn=draw(st.sampled_from([None, None, "pre", "post"])),
            dropout=draw(st.booleans()),
            bias=draw(st.sampled_from([True, True, False])),
            zero_rows=draw(st.sampled_from([0, 0, 0, 1, 3])),
        ))
    return dict(
        kind="fc",
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        n_in=draw(st.integers(1, 12)),
        n_out=draw(st.integers(1, 6)),
        normalize=draw(st.booleans()),
        layers=layers,
        gain=draw(st.floats(0.5, 2.0)),
        bias_scale=draw(st.sampled_from([0.0, 0.1, 1.0, 1.0])),
        x_scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
        eps=10.0 ** draw(st.floats(-3.0, 1.0)),
        lanczos_steps=draw(st.sampled_from([8, 12, 16, 16, 24])),
    )


def build_fc(spec: dict) -> tuple[nn.Sequential, tuple[int, ...], Tensor]:
    """Build the network of an :func:`fc_specs` spec: (model, input_shape, x0)."""
    g = _gen(spec["seed"])
    n = spec["n_in"]
    mods: list[nn.Module] = []
    if spec["normalize"]:
        mods.append(random_normalize(n, g, spatial_dims=0))
    for lay in spec["layers"]:
        lin = nn.Linear(n, lay["width"], bias=lay["bias"]).to(DT)
        _init_affine(lin, g, spec["gain"], spec["bias_scale"], lay["zero_rows"])
        n = lay["width"]
        mods.append(lin)
        if lay["bn"] == "pre":
            mods.append(random_batchnorm(n, g, dims=1))
        if lay["relu"]:
            mods.append(nn.ReLU())
        if lay["bn"] == "post":
            mods.append(random_batchnorm(n, g, dims=1))
        if lay["dropout"]:
            mods.append(nn.Dropout(0.3))
    last = nn.Linear(n, spec["n_out"]).to(DT)
    _init_affine(last, g, spec["gain"], spec["bias_scale"], 0)
    mods.append(last)
    model = nn.Sequential(*mods).to(DT).eval()
    x0 = _randn(g, 1, spec["n_in"]) * spec["x_scale"]
    return model, (spec["n_in"],), x0


# --------------------------------------------------------------------------- conv networks
_POOLS = st.one_of(
    st.none(),
    st.tuples(st.just("max"), st.integers(2, 3), st.sampled_from([None, 1, 2, 3]),
              st.integers(0, 1), st.integers(1, 2), st.booleans()),
    st.tuples(st.just("avg"), st.integers(2, 3), st.sampled_from([None, 1, 2]),
              st.integers(0, 1), st.booleans(), st.sampled_from([None, None, 3])),
    st.tuples(st.just("adaptive"), st.integers(1, 4), st.integers(1, 4)),
)


@st.composite
def conv_specs(draw) -> dict:
    """A random convolutional network: Conv2d with stride/padding/dilation/groups
    variations, BatchNorm2d before/after, max/avg/adaptive pooling, Dropout, Normalize first,
    flatten / view / torch.flatten, optional hidden Linear."""
    convs = []
    for _ in range(draw(st.integers(1, 2))):
        convs.append(dict(
            out=draw(st.sampled_from([1, 2, 3, 4])),
            k=draw(st.integers(1, 3)),
            s=draw(st.integers(1, 2)),
            p=draw(st.sampled_from([0, 1, 2, "same"])),
            d=draw(st.integers(1, 2)),
            groups_idx=draw(st.integers(0, 3)),
            bias=draw(st.sampled_from([True, True, False])),
            bn_before=draw(st.sampled_from([False, False, False, True])),
            bn_after=draw(st.booleans()),
            relu=draw(st.sampled_from([True, True, True, False])),
            dropout=draw(st.sampled_from([False, False, True])),
            pool=draw(_POOLS),
            relu_after_pool=draw(st.sampled_from([False, False, False, True])),
        ))
    return dict(
        kind="conv",
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        c_in=draw(st.integers(1, 3)),
        h=draw(st.integers(4, 9)),
        w=draw(st.integers(4, 9)),
        normalize=draw(st.booleans()),
        convs=convs,
        flatten=draw(st.sampled_from(["Flatten", "view", "torch.flatten"])),
        hidden=draw(st.sampled_from([0, 0, 5, 12])),
        head=draw(st.sampled_from(["linear", "linear", "linear", "none"])),
        n_out=draw(st.integers(1, 5)),
        gain=draw(st.floats(0.5, 2.0)),
        bias_scale=draw(st.sampled_from([0.0, 0.1, 1.0, 1.0])),
        x_scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
        eps=10.0 ** draw(st.floats(-3.0, 1.0)),
        lanczos_steps=draw(st.sampled_from([8, 12, 16, 16, 24])),
    )


def _out_shape(mods: list[nn.Module], in_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        with torch.no_grad():
            y = nn.Sequential(*mods)(torch.zeros(1, *in_shape, dtype=DT))
    except (RuntimeError, ValueError):
        return None
    if y.numel() == 0 or not bool(torch.isfinite(y).all()):
        return None  # e.g. a dilated, padded max pool with a window of padding only
    return tuple(y.shape[1:])


def _make_pool(p) -> nn.Module:
    if p[0] == "max":
        _, k, s, pad, d, ceil = p
        pad = min(pad, (d * (k - 1) + 1) // 2)
        return nn.MaxPool2d(k, s, pad, d, ceil_mode=ceil)
    if p[0] == "avg":
        _, k, s, pad, cip, div = p
        return nn.AvgPool2d(k, s, min(pad, k // 2), ceil_mode=False, count_include_pad=cip,
                            divisor_override=div)
    return nn.AdaptiveAvgPool2d((p[1], p[2]))


def build_conv(spec: dict) -> tuple[nn.Sequential, tuple[int, ...], Tensor]:
    """Build the network of a :func:`conv_specs` spec: (model, input_shape, x0). Parameters
    that would give an empty feature map are replaced by valid ones (pooling is dropped)."""
    g = _gen(spec["seed"])
    in_shape = (spec["c_in"], spec["h"], spec["w"])
    mods: list[nn.Module] = []
    c = spec["c_in"]
    if spec["normalize"]:
        mods.append(random_normalize(c, g, spatial_dims=2))
    shape = in_shape
    for L in spec["convs"]:
        c = shape[0]
        if L["bn_before"]:
            mods.append(random_batchnorm(c, g))
        out = L["out"]
        divs = [q for q in range(1, min(c, out) + 1) if c % q == 0 and out % q == 0]
        groups = divs[L["groups_idx"] % len(divs)]
        k, s, p, d = L["k"], L["s"], L["p"], L["d"]
        if p == "same" and (s != 1 or (d * (k - 1)) % 2):
            p = 1
        conv = nn.Conv2d(c, out, k, s, p, d, groups, bias=L["bias"]).to(DT)
        if _out_shape(mods + [conv], in_shape) is None:
            conv = nn.Conv2d(c, out, 1, s, 0, 1, groups, bias=L["bias"]).to(DT)
        _init_affine(conv, g, spec["gain"], spec["bias_scale"], 0)
        mods.append(conv)
        if L["bn_after"]:
            mods.append(random_batchnorm(out, g))
        if L["relu"]:
            mods.append(nn.ReLU())
        if L["dropout"]:
            mods.append(nn.Dropout(0.2))
        if L["pool"] is not None:
            pool = _make_pool(L["pool"])
            if _out_shape(mods + [pool], in_shape) is not None:
                mods.append(pool)
                if L["relu_after_pool"]:
                    mods.append(nn.ReLU())
        shape = _out_shape(mods, in_shape)
        assert shape is not None
    mods.append({"Flatten": nn.Flatten(), "view": View(),
                 "torch.flatten": TorchFlatten()}[spec["flatten"]])
    n = math.prod(shape)
    if spec.get("head", "linear") == "none":
        # the output is the flattened feature map: max pooling's constant can be the tight
        # factor here (e.g. 1x1 conv -> max pool), so an underestimated pool constant shows
        model = nn.Sequential(*mods).to(DT).eval()
        return model, in_shape, _randn(g, 1, *in_shape) * spec["x_scale"]
    if spec["hidden"]:
        lin = nn.Linear(n, spec["hidden"]).to(DT)
        _init_affine(lin, g, spec["gain"], spec["bias_scale"], 0)
        mods += [lin, nn.ReLU()]
        n = spec["hidden"]
    last = nn.Linear(n, spec["n_out"]).to(DT)
    _init_affine(last, g, spec["gain"], spec["bias_scale"], 0)
    mods.append(last)
    model = nn.Sequential(*mods).to(DT).eval()
    x0 = _randn(g, 1, *in_shape) * spec["x_scale"]
    return model, in_shape, x0


def build(spec: dict) -> tuple[nn.Sequential, tuple[int, ...], Tensor]:
    return build_fc(spec) if spec["kind"] == "fc" else build_conv(spec)


# --------------------------------------------------------------------------- accurate diffs
def _linear_part(m: nn.Module, dy: Tensor) -> Tensor:
    """The linear part (no bias) of an affine module, applied to dy."""
    if isinstance(m, nn.Linear):
        return dy @ m.weight.T
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise TypeError("only zero padding")
        return F.conv2d(dy, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        scale = 1.0 / torch.sqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        return dy * scale.view(-1, *([1] * (dy.dim() - 2)))
    if isinstance(m, Normalize):
        return dy / m.std
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, View, TorchFlatten)):
        return m(dy)  # linear, no bias
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return dy
    raise TypeError(f"no linear part for {type(m).__name__}")


def _relu_diff(y0: Tensor, dy: Tensor) -> Tensor:
    """relu(y0 + dy) - relu(y0), accurate relative to |dy|."""
    y1 = y0 + dy
    return torch.where(y0 >= 0, torch.where(y1 >= 0, dy, -y0),
                       torch.where(y1 >= 0, y1, torch.zeros_like(y1)))


def _maxpool_diff(m: nn.MaxPool2d, y0: Tensor, dy: Tensor) -> Tensor:
    """maxpool(y0 + dy) - maxpool(y0) as (y0[i*] - y0[j*]) + dy[i*]."""
    def pool(t):
        return F.max_pool2d(t, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                            return_indices=True)
    _, i1 = pool(y0 + dy)
    _, i0 = pool(y0)
    y0f, dyf = y0.flatten(2), dy.flatten(2)
    a = y0f.gather(2, i1.flatten(2))
    b = y0f.gather(2, i0.flatten(2))
    d = dyf.gather(2, i1.flatten(2))
    return ((a - b) + d).reshape(i1.shape)


def _leaves(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        out = []
        for m in model:
            out += _leaves(m)
        return out
    return [model]


def diff_forward(model: nn.Module, x0: Tensor, dx: Tensor) -> Tensor:
    """``f(x0 + dx) - f(x0)`` for a (nested) nn.Sequential, batched over dx, computed by
    propagating the perturbation (x0 broadcasts over the batch of dx)."""
    y0 = x0.to(DT).expand(dx.shape[0], *x0.shape[1:])
    dy = dx.to(DT)
    with torch.no_grad():
        for m in _leaves(model):
            if isinstance(m, nn.ReLU):
                dy, y0 = _relu_diff(y0, dy), torch.relu(y0)
            elif isinstance(m, nn.MaxPool2d):
                dy, y0 = _maxpool_diff(m, y0, dy), m(y0)
            else:
                dy, y0 = _linear_part(m, dy), m(y0)
    return dy


def ratios(model: nn.Module, x0: Tensor, dx: Tensor, chunk: int = 1024) -> Tensor:
    """||f(x0+dx) - f(x0)|| / ||dx|| for each row of the batch dx."""
    out = []
    for s in range(0, dx.shape[0], chunk):
        d = dx[s:s + chunk]
        df = diff_forward(model, x0, d)
        den = d.flatten(1).norm(dim=1)
        r = df.flatten(1).norm(dim=1) / torch.where(den > 0, den, torch.ones_like(den))
        out.append(torch.where(den > 0, r, torch.zeros_like(r)))
    return torch.cat(out)


# --------------------------------------------------------------------------- brute force
def jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """Jacobian (n_out, n_in) of the model at x (shape (1, *in_shape)), float64, by one
    batched reverse pass (the model must treat batch elements independently: eval mode)."""
    x = x.detach().to(DT)
    with torch.no_grad():
        n_out = model(x).numel()
    xb = x.expand(n_out, *x.shape[1:]).clone().requires_grad_(True)
    y = model(xb).reshape(n_out, -1)
    (g,) = torch.autograd.grad(y, xb, torch.eye(n_out, dtype=DT))
    return g.detach().reshape(n_out, -1)


def jacobian_jacrev(model: nn.Module, x: Tensor) -> Tensor:
    """The same Jacobian through torch.func.jacrev (slower; used to check :func:`jacobian`)."""
    def f(v: Tensor) -> Tensor:
        return model(v.unsqueeze(0)).reshape(-1)
    j = torch.func.jacrev(f)(x[0].detach().to(DT)).detach()
    return j.reshape(j.shape[0], -1)


def spectral_norm(m: Tensor) -> float:
    m = m.detach().to(DT)
    return float(torch.linalg.matrix_norm(m, ord=2)) if m.numel() else 0.0


def random_directions(g: torch.Generator, n: int, shape: tuple[int, ...]) -> Tensor:
    """Unit directions: Gaussian ones, and (a quarter) signed coordinate directions."""
    dim = math.prod(shape)
    u = _randn(g, n, dim)
    n_coord = n // 4
    if n_coord:
        idx = torch.randint(0, dim, (n_coord,), generator=g)
        sign = torch.where(_rand(g, n_coord) < 0.5, -1.0, 1.0).to(DT)
        u[:n_coord] = 0.0
        u[torch.arange(n_coord), idx] = sign
    u = u / u.norm(dim=1, keepdim=True)
    return u.reshape(n, *shape)


def ball_samples(g: torch.Generator, shape: tuple[int, ...], eps: float, n: int,
                 extra_dirs: Tensor | None = None) -> Tensor:
    """Perturbations dx with 0 < ||dx|| <= eps: volume-uniform in the ball, on the sphere,
    and at log-uniform tiny radii in [1e-4 eps, eps]; ``extra_dirs`` (unit, batch) are used
    at all three kinds of radii."""
    dim = math.prod(shape)
    k = n // 3
    u = random_directions(g, 3 * k, shape)
    r_vol = eps * _rand(g, k).clamp_min(1e-12) ** (1.0 / dim)
    r_sph = torch.full((k,), eps, dtype=DT)
    r_tiny = eps * 10.0 ** (-4.0 * _rand(g, k))
    r = torch.cat([r_vol, r_sph, r_tiny])
    dx = u * r.view(-1, *([1] * len(shape)))
    if extra_dirs is not None and extra_dirs.shape[0]:
        e = extra_dirs.reshape(-1, *shape)
        radii = torch.tensor([eps, eps * 0.3, eps * 1e-2, eps * 1e-4], dtype=DT)
        ext = (e[None] * radii.view(-1, 1, *([1] * len(shape)))).reshape(-1, *shape)
        dx = torch.cat([dx, ext, -ext])
    return dx


def gradient_ascent(model: nn.Module, x0: Tensor, eps: float, starts: Tensor,
                    steps: int = 30) -> Tensor:
    """Projected gradient ascent of ||f(x0+dx)-f(x0)|| / ||dx|| over the ball ||dx|| <= eps
    from the perturbations ``starts`` (batch). Returns the best dx of every start."""
    x0 = x0.to(DT)
    with torch.no_grad():
        f0 = model(x0)
    dx = starts.clone().to(DT)
    best = dx.clone()
    best_val = torch.full((dx.shape[0],), -1.0, dtype=DT)
    view = (-1,) + (1,) * (dx.dim() - 1)
    for t in range(steps):
        dx.requires_grad_(True)
        num = (model(x0 + dx) - f0).flatten(1).norm(dim=1)
        den = dx.flatten(1).norm(dim=1)
        val = num / den
        (grad,) = torch.autograd.grad(val.sum(), dx)
        with torch.no_grad():
            improved = val > best_val
            best[improved] = dx[improved]
            best_val = torch.where(improved, val, best_val)
            gn = grad.flatten(1).norm(dim=1).clamp_min(1e-300)
            lr = eps * 0.3 * (0.85 ** t)
            dx = dx + lr * grad / gn.view(view)
            nrm = dx.flatten(1).norm(dim=1)
            dx = dx * torch.clamp(eps / nrm.clamp_min(1e-300), max=1.0).view(view)
            tiny = nrm < 1e-6 * eps
            if bool(tiny.any()):
                dx[tiny] = starts[tiny]
    return best.detach()


def local_lower_bound(model: nn.Module, x0: Tensor, eps: float, seed: int,
                      n_samples: int = 1500, ascent_starts: int = 8,
                      ascent_steps: int = 30) -> tuple[float, dict]:
    """The largest ratio ||f(x)-f(x0)||/||x-x0|| over 0 < ||x-x0|| <= eps found by sampling
    and gradient ascent (a lower bound on the local Lipschitz constant), with the
    Jacobian norm at x0 and per-method maxima in the info dict."""
    g = _gen(seed)
    shape = tuple(x0.shape[1:])
    jac = jacobian(model, x0)
    jn = spectral_norm(jac)
    extra = []
    if jac.numel() and jn > 0:
        _, _, vh = torch.linalg.svd(jac, full_matrices=False)
        extra.append(vh[: min(3, vh.shape[0])])
    extra_dirs = torch.cat(extra) if extra else None
    dx = ball_samples(g, shape, eps, n_samples, extra_dirs)
    r_samp = ratios(model, x0, dx)
    starts = random_directions(g, ascent_starts, shape) * eps
    if extra_dirs is not None:
        starts = torch.cat([starts, extra_dirs[:1].reshape(1, *shape) * eps])
    dx_ga = gradient_ascent(model, x0, eps, starts, ascent_steps)
    r_ga = ratios(model, x0, dx_ga)
    info = dict(sampled=float(r_samp.max()), ascent=float(r_ga.max()), jacobian=jn)
    return max(info.values()), info


def pair_lower_bound(model: nn.Module, shape: tuple[int, ...], seed: int,
                     n_pairs: int = 900) -> float:
    """Largest ||f(x)-f(y)||/||x-y|| over random pairs anywhere (a lower bound on the global
    constant): x at several scales, y - x at radii log-uniform in [1e-4, 10], and Jacobian
    norms at a few random points."""
    g = _gen(seed)
    best = 0.0
    for scale in (0.1, 1.0, 10.0):
        x = _randn(g, 1, *shape) * scale
        u = random_directions(g, n_pairs // 3, shape)
        r = 10.0 ** (-4.0 + 5.0 * _rand(g, n_pairs // 3))
        dx = u * r.view(-1, *([1] * len(shape)))
        best = max(best, float(ratios(model, x, dx).max()))
        best = max(best, spectral_norm(jacobian(model, x)))
    return best


# --------------------------------------------------------------------------- matrices
def linear_part(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The linear part (biases dropped) of an affine (nested) nn.Sequential, batched."""
    leaves = _leaves(model)

    def apply(x: Tensor) -> Tensor:
        with torch.no_grad():
            for m in leaves:
                x = _linear_part(m, x)
        return x
    return apply


def matrix_of(fn: Callable[[Tensor], Tensor], in_shape: tuple[int, ...]) -> Tensor:
    """The matrix (n_out, n_in) of a batched linear map, from its images of basis vectors."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=DT).reshape(n, *in_shape)
    with torch.no_grad():
        cols = fn(eye).reshape(n, -1)
    return cols.T.contiguous()


def exact_distance_sq(a: Tensor, b: Tensor) -> Fraction:
    """``||a - b||^2`` in exact rational arithmetic (every float is a rational)."""
    xs = a.detach().double().flatten().tolist()
    ys = b.detach().double().flatten().tolist()
    return sum(((Fraction(x) - Fraction(y)) ** 2 for x, y in zip(xs, ys, strict=True)),
               Fraction(0))


def all_active_net() -> tuple[nn.Sequential, Tensor]:
    """A float64 2-200-200-3 ReLU net whose units are all active on small balls (biases 1e3,
    1e5), and an input: its local operators are the global ones, so with Lanczos the
    (probabilistic) global bound comes out below the layer-wise local product."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                        nn.Linear(200, 3)).to(torch.float64).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        net[0].bias.fill_(1e3)
        net[2].bias.fill_(1e5)
    return net, torch.randn(1, 2, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- 2-input pool nets
def tied_pool_net(pools: list[nn.Module], seed: int) -> nn.Module:
    """2 inputs -> a (2, 5, 5) grid of units tied in groups of 3 (their pooling windows tie
    at x0 = 0) -> ``pools`` -> a linear layer and a ReLU as last layer. Odd seeds: the
    pooling right after the affine map (no ReLU before it)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(2, 50)
    pre = [] if seed % 2 else [nn.ReLU()]
    body = nn.Sequential(lin, *pre, Grid((2, 5, 5)), *pools, nn.Flatten()).to(DT)
    with torch.no_grad():
        n = body(torch.zeros(1, 2, dtype=DT)).numel()
    net = nn.Sequential(*body, nn.Linear(n, 3), nn.ReLU()).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
        for i in range(50):
            lin.weight[i] = lin.weight[i % 3]
        lin.bias.zero_()
    return net.eval()


def ray_lower(net: nn.Module, x0: Tensor, eps: float, n_angles: int = 2000) -> float:
    """A lower bound on the local constant of a 2-input net from rays at 30 radii (each
    ratio less a float64 rounding allowance)."""
    th = torch.arange(n_angles, dtype=DT) * (2 * math.pi / n_angles)
    u = torch.stack([th.cos(), th.sin()], 1)
    best = 0.0
    with torch.no_grad():
        f0 = net(x0)
        rnd = 1e-12 * (1 + float(f0.abs().sum()))
        for t in (eps * torch.logspace(-3, 0, 30, dtype=DT)).tolist():
            r = ((net(x0 + t * u) - f0).norm(dim=1) - rnd).clamp_min(0) / t
            best = max(best, float(r.max()))
    return best


def mlp(layers) -> nn.Sequential:
    """A float64 ReLU chain from ``[(W, b), ...]`` numpy arrays (ReLU between layers)."""
    mods: list[nn.Module] = []
    for k, (w, b) in enumerate(layers):
        lin = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if k < len(layers) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()
