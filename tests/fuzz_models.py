"""Random small models mixing every supported layer kind, for the session-24 soundness fuzz.

:func:`make_case` builds, from one integer seed, a model in eval mode (float64, sometimes
float32) written as the README says models may be written: modules (``nn.Conv2d``,
``nn.ReLU6``, ``nn.MaxPool2d(..., ceil_mode=True)``, ``nn.BatchNorm2d`` with
``track_running_stats`` set to False after training, ``lipbound.Normalize``, dropouts, ...)
and functional forms inside one custom ``forward`` (``F.conv2d`` / ``F.linear`` with the
model's parameters, possibly through ``.view``; clamps; ``F.max_pool2d``;
``F.adaptive_avg_pool2d``; arithmetic with numbers and per-channel buffers; ``F.dropout`` with
``training=self.training``; ``.unsqueeze`` / ``.squeeze(dim)``, ``.unflatten``,
``.to(x.dtype)``), together with a nominal input ``x0``.

Weights are drawn adversarially as well as at random: tiny and huge layer scales, zero rows,
duplicated rows, dead units, and (on a dyadic grid, where every sum is exact in float32 and
float64) biases and clamp limits that put pre-activations exactly on ReLU kinks and clamp
corners at ``x0``, and ties inside max-pooling windows at ``x0``.

The forward interprets ``self.ops``, a tuple of tuples of strings and numbers (torch.fx traces
the loop away; the tuple never changes).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lipbound


class FuzzNet(nn.Module):
    """A model whose forward is the program ``self.ops`` (see :func:`make_case`)."""

    def __init__(self) -> None:
        super().__init__()
        self.mods = nn.ModuleDict()
        self.ops: tuple = ()
        self._n = 0

    def new_name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def run(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """The forward pass; ``record`` (references only) collects every op's input and the
        output."""
        for op in self.ops:
            if record is not None:
                record.append(x)
            x = self.apply(op, x)
        if record is not None:
            record.append(x)
        return x

    def apply(self, op: tuple, x: torch.Tensor) -> torch.Tensor:  # noqa: C901 - interpreter
        """One op of the program."""
        if True:
            k = op[0]
            if k == "mod":
                x = self.mods[op[1]](x)
            elif k == "fconv":
                _, w, b, stride, pad, dil, groups, wview = op
                weight = getattr(self, w)
                if wview:
                    weight = weight.view(wview)
                x = F.conv2d(x, weight, getattr(self, b) if b else None, stride, pad, dil, groups)
            elif k == "flinear":
                _, w, b, wview = op
                weight = getattr(self, w)
                if wview:
                    weight = weight.reshape(wview)
                x = F.linear(x, weight, getattr(self, b) if b else None)
            elif k == "relu":
                form = op[1]
                if form == "F":
                    x = F.relu(x)
                elif form == "torch":
                    x = torch.relu(x)
                elif form == "method":
                    x = x.relu()
                else:
                    x = x.clamp(min=0)
            elif k == "clamp":
                _, form, lo, hi = op
                if form == "torch.clamp":
                    x = torch.clamp(x, lo, hi)
                elif form == "torch.clip":
                    x = torch.clip(x, min=lo, max=hi)
                elif form == "method":
                    x = x.clamp(lo, hi)
                elif form == "clamp_min":
                    x = x.clamp_min(lo)
                elif form == "clamp_max":
                    x = x.clamp_max(hi)
                elif form == "min_only":
                    x = torch.clamp(x, min=lo)
                elif form == "max_only":
                    x = x.clamp(max=hi)
                elif form == "F.hardtanh":
                    x = F.hardtanh(x, lo, hi)
                elif form == "F.relu6":
                    x = F.relu6(x)
                else:
                    raise ValueError(form)
            elif k == "fmaxpool":
                _, kern, stride, pad, dil, ceil = op
                x = F.max_pool2d(x, kern, stride, pad, dil, ceil_mode=ceil)
            elif k == "favgpool":
                _, kern, stride, pad, ceil, cip = op
                x = F.avg_pool2d(x, kern, stride, pad, ceil_mode=ceil, count_include_pad=cip)
            elif k == "fadaptive":
                x = F.adaptive_avg_pool2d(x, op[1])
            elif k == "arith":
                x = _arith(self, x, op)
            elif k == "drop":
                _, form, p = op
                if form == "F.dropout":
                    x = F.dropout(x, p, training=self.training)
                elif form == "F.dropout_false":
                    x = F.dropout(x, p, training=False)
                elif form == "F.dropout2d":
                    x = F.dropout2d(x, p, training=False)
                elif form == "F.alpha_dropout":
                    x = F.alpha_dropout(x, p, training=False)
                else:
                    x = torch.dropout(x, p, False)
            elif k == "noop":
                form = op[1]
                if form == "contiguous":
                    x = x.contiguous()
                elif form == "clone":
                    x = x.clone()
                elif form == "detach":
                    x = x.detach()
                elif form == "to_dtype":
                    x = x.to(x.dtype)
                elif form == "to_device":
                    x = x.to(x.device)
                elif form == "torch.clone":
                    x = torch.clone(x)
                else:
                    raise ValueError(form)
            elif k == "shape":
                x = _shape(x, op)
            else:
                raise ValueError(k)
        return x


def _arith(net: FuzzNet, x: torch.Tensor, op: tuple) -> torch.Tensor:
    form, a, b = op[1], op[2], op[3]
    if form == "div_num":
        return x / a
    if form == "affine_num":
        return x * a - b
    if form == "rmul":
        return a * x
    if form == "neg":
        return -x
    if form == "torch.neg":
        return torch.neg(x)
    if form == "method_add":
        return x.add(a)
    if form == "method_sub":
        return x.sub(a)
    if form == "method_mul":
        return x.mul(a)
    if form == "method_div":
        return x.div(a)
    if form == "torch_add":
        return torch.add(x, a)
    if form == "torch_sub":
        return torch.sub(x, a)
    if form == "torch_mul":
        return torch.mul(x, a)
    if form == "torch_div":
        return torch.div(x, a)
    if form == "buffers":  # (x - self.mean) / self.std with registered buffers
        return (x - getattr(net, a)) / getattr(net, b)
    if form == "buffers_view":  # per-channel buffers stored flat, viewed in forward
        shape = op[4]
        return (x - getattr(net, a).view(shape)) * getattr(net, b).view(shape)
    if form == "param_scale":  # a parameter per channel, through .unsqueeze
        v = getattr(net, a)
        for _ in range(b):
            v = v.unsqueeze(-1)
        return x * v
    if form == "size_div":  # a per-sample size: a number
        return x / x.size(1)
    if form == "shape_mul":
        return x * x.shape[-1] ** 0.5
    raise ValueError(form)


def _shape(x: torch.Tensor, op: tuple) -> torch.Tensor:
    form = op[1]
    if form == "flatten_method":
        return x.flatten(1)
    if form == "torch.flatten":
        return torch.flatten(x, 1)
    if form == "view":
        return x.view(x.size(0), -1)
    if form == "reshape":
        return x.reshape(x.shape[0], -1)
    if form == "torch.reshape":
        return torch.reshape(x, (-1, op[2]))
    if form == "unflatten":
        return x.unflatten(1, op[2])
    if form == "view_to":
        return x.view(-1, *op[2])
    if form == "unsq_sq":
        return x.unsqueeze(op[2]).squeeze(op[2])
    if form == "torch_unsq_sq":
        return torch.squeeze(torch.unsqueeze(x, op[2]), op[2])
    raise ValueError(form)


@dataclass
class Case:
    """A generated model with its nominal input and what the generator put into it."""

    model: nn.Module
    x0: torch.Tensor
    seed: int
    kinds: list[str] = field(default_factory=list)
    fc_only: bool = False
    dyadic: bool = False
    plain: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:])


class _Builder:
    def __init__(self, seed: int, dtype: torch.dtype, dyadic: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.dyadic = dyadic
        self.net = FuzzNet()
        self.ops: list[tuple] = []
        self.kinds: list[str] = []
        self.x0: torch.Tensor | None = None
        self.plain = False
        self.adversarial = False

    # ------------------------------------------------------------------ helpers
    def r(self) -> float:
        return float(self.rng.random())

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(a, dtype=np.float64), dtype=self.dtype)

    def current(self) -> torch.Tensor:
        self.net.ops = tuple(self.ops)
        self.net.eval()
        with torch.no_grad():
            return self.net(self.x0.clone())

    def add(self, op: tuple, kind: str) -> None:
        self.ops.append(op)
        self.kinds.append(kind)

    def add_mod(self, m: nn.Module, kind: str) -> None:
        name = self.net.new_name("m")
        self.net.mods[name] = m.to(self.dtype)
        self.add(("mod", name), kind)

    def param(self, value: np.ndarray, buffer: bool = False) -> str:
        name = self.net.new_name("p")
        t = self.tensor(value)
        if buffer:
            self.net.register_buffer(name, t)
        else:
            self.net.register_parameter(name, nn.Parameter(t, requires_grad=self.r() < 0.5))
        return name

    def weights(self, shape: tuple[int, ...], fan_in: int) -> tuple[np.ndarray, str]:
        """Random weights of ``shape`` (rows = dim 0), with an adversarial twist."""
        mode = self.choice(["normal"] * 4 + ["tiny", "huge", "zero_rows", "dup_rows",
                                             "sparse", "dyadic"])
        if self.dyadic:
            w = self.rng.integers(-4, 5, size=shape) / 4.0
        else:
            w = self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))
        if mode == "tiny":
            w = w * 10.0 ** -self.rng.integers(2, 7)
        elif mode == "huge":
            w = w * 10.0 ** self.rng.integers(2, 5)
        elif mode == "zero_rows" and shape[0] > 1:
            rows = self.rng.random(shape[0]) < 0.4
            w[rows] = 0.0
        elif mode == "dup_rows" and shape[0] > 1:
            i, j = self.rng.integers(shape[0], size=2)
            w[j] = w[i]
            if self.r() < 0.5:
                w[j] = -w[i]
        elif mode == "sparse":
            w = w * (self.rng.random(shape) < 0.4)
        elif mode == "dyadic":
            w = self.rng.integers(-4, 5, size=shape) / 4.0
        return w, mode

    def bias(self, n: int, pre: np.ndarray | None) -> tuple[np.ndarray, str]:
        """A bias; ``pre`` is the pre-activation at ``x0`` without bias, shape (n, ...)."""
        mode = self.choice(["normal"] * 3 + ["zero", "dead", "kink", "kink"]
                           + ["kink"] * (12 if self.adversarial else 0))
        if self.dyadic:
            b = self.rng.integers(-4, 5, size=n) / 4.0
        else:
            b = 0.5 * self.rng.standard_normal(n)
        if mode == "zero":
            b[:] = 0.0
        elif mode == "dead":
            b[self.rng.random(n) < 0.5] = -1e3
        elif mode == "kink" and pre is not None:
            # units whose pre-activation at x0 is exactly 0 (exact with dyadic values; one
            # spatial position per channel for a convolution)
            flat = pre.reshape(n, -1)
            pos = self.rng.integers(flat.shape[1], size=n)
            sel = self.rng.random(n) < 0.6
            b[sel] = -flat[np.arange(n), pos][sel]
        return b, mode

    # ------------------------------------------------------------------ blocks
    def conv(self, x: torch.Tensor) -> None:
        c_in, h, w_ = x.shape[1:]
        for _ in range(30):
            k = int(self.rng.integers(1, 4))
            dil = int(self.choice([1, 1, 1, 2]))
            stride = int(self.choice([1, 1, 1, 2]))
            eff = dil * (k - 1) + 1
            pad: int | str = int(self.rng.integers(0, eff // 2 + 2))
            if stride == 1 and eff % 2 == 1 and self.r() < 0.3:
                pad = "same"
            groups = int(self.choice([1, 1, 1, c_in])) if c_in > 1 else 1
            c_out = int(self.rng.integers(1, 5))
            if groups > 1:
                c_out = groups * int(self.rng.integers(1, 3))
            hp = h + 2 * (pad if isinstance(pad, int) else 0) - eff
            wp = w_ + 2 * (pad if isinstance(pad, int) else 0) - eff
            if pad == "same" or (hp >= 0 and wp >= 0):
                break
        else:
            return
        wt, mode = self.weights((c_out, c_in // groups, k, k), (c_in // groups) * k * k)
        has_bias = self.r() < 0.8
        functional = self.r() < 0.4
        conv = nn.Conv2d(c_in, c_out, k, stride, pad, dil, groups, bias=has_bias)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(wt))
            if has_bias:
                conv.bias.zero_()
        conv = conv.to(self.dtype)
        pre = None
        if has_bias:
            with torch.no_grad():
                pre = conv(self.current()).numpy()[0]
            b, bmode = self.bias(c_out, pre)
            with torch.no_grad():
                conv.bias.copy_(self.tensor(b))
            mode += "/" + bmode
        desc = f"conv(k{k},s{stride},p{pad},d{dil},g{groups},{mode})"
        if functional:
            if pad == "same":
                pad = "same"
            wview = None
            if self.r() < 0.3:
                wname = self.param(wt.reshape(-1))
                wview = tuple(wt.shape)
            else:
                wname = self.param(wt)
            bname = self.param(conv.bias.detach().double().numpy(),
                               buffer=self.r() < 0.3) if has_bias else None
            self.add(("fconv", wname, bname, stride, pad, dil, groups, wview), "F." + desc)
        else:
            self.add_mod(conv, "nn." + desc)

    def linear(self, x: torch.Tensor, n_out: int | None = None) -> None:
        n_in = x.shape[1]
        if n_out is None:
            n_out = int(self.rng.integers(1, 7))
        wt, mode = self.weights((n_out, n_in), n_in)
        has_bias = self.r() < 0.85
        pre = (self.tensor(wt).double() @ self.current().double()[0]).numpy()
        b, bmode = self.bias(n_out, pre) if has_bias else (None, "none")
        desc = f"linear({n_in}->{n_out},{mode}/{bmode})"
        if self.r() < 0.4:
            wview = None
            if self.r() < 0.3:
                wname = self.param(wt.reshape(-1))
                wview = (n_out, n_in)
            else:
                wname = self.param(wt)
            bname = self.param(b, buffer=self.r() < 0.3) if has_bias else None
            self.add(("flinear", wname, bname, wview), "F." + desc)
        else:
            lin = nn.Linear(n_in, n_out, bias=has_bias)
            with torch.no_grad():
                lin.weight.copy_(torch.tensor(wt))
                if has_bias:
                    lin.bias.copy_(torch.tensor(b))
            self.add_mod(lin, "nn." + desc)

    def batchnorm(self, x: torch.Tensor) -> None:
        c = x.shape[1]
        two_d = x.dim() == 4
        bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(c, eps=float(self.choice(
            [1e-5, 1e-3, 0.1])), affine=self.r() < 0.8)
        bn = bn.to(self.dtype)
        how = self.choice(["stats", "stats", "trained_untracked"])
        if how == "trained_untracked":
            bn.train()
            shape = (8, c, 3, 3) if two_d else (8, c)
            gen = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
            with torch.no_grad():
                for _ in range(3):
                    bn(torch.randn(shape, dtype=self.dtype, generator=gen) * 2 + 1)
            bn.track_running_stats = False
        else:
            with torch.no_grad():
                bn.running_mean.copy_(self.tensor(self.rng.standard_normal(c)))
                var = 10.0 ** self.rng.uniform(-4, 2, size=c)
                bn.running_var.copy_(self.tensor(var))
        if bn.affine:
            with torch.no_grad():
                g = self.rng.standard_normal(c)
                if self.r() < 0.2:
                    g[0] = 0.0
                bn.weight.copy_(self.tensor(g))
                bn.bias.copy_(self.tensor(self.rng.standard_normal(c)))
        self.add_mod(bn, f"nn.BatchNorm{'2d' if two_d else '1d'}({how})")

    def activation(self, x: torch.Tensor) -> None:
        cur = self.current().double().numpy().ravel()
        kind = self.choice(["relu"] * 5 + ["clamp"] * 3 + ["none"])
        if self.plain:
            kind = "relu"
        if kind == "none":
            return
        if kind == "relu":
            form = self.choice(["nn", "nn_inplace", "F", "torch", "method", "clamp0"])
            if form == "nn":
                self.add_mod(nn.ReLU(), "nn.ReLU")
            elif form == "nn_inplace":
                self.add_mod(nn.ReLU(inplace=True), "nn.ReLU(inplace)")
            else:
                self.add(("relu", form), f"relu:{form}")
            return
        # clamps: limits random, or values attained at x0 (corners exactly at x0)
        if self.r() < (0.9 if self.adversarial else 0.5) and cur.size:
            a, b = sorted(float(v) for v in self.rng.choice(cur, size=2))
            if a == b:
                b = a + 0.5
            lo, hi = a, b
        else:
            lo = float(self.rng.normal(-0.5, 0.5))
            hi = lo + float(10.0 ** self.rng.uniform(-2, 1))
        if self.dyadic:
            lo, hi = round(lo * 4) / 4, round(hi * 4) / 4
            if hi <= lo:
                hi = lo + 0.25
        form = self.choice(["torch.clamp", "torch.clip", "method", "clamp_min", "clamp_max",
                            "min_only", "max_only", "F.hardtanh", "F.relu6", "nn.ReLU6",
                            "nn.Hardtanh"])
        if form == "nn.ReLU6":
            self.add_mod(nn.ReLU6(), "nn.ReLU6")
        elif form == "nn.Hardtanh":
            self.add_mod(nn.Hardtanh(lo, hi), f"nn.Hardtanh({lo:.3g},{hi:.3g})")
        else:
            self.add(("clamp", form, lo, hi), f"clamp:{form}({lo:.3g},{hi:.3g})")

    def maxpool(self, x: torch.Tensor) -> None:
        h, w_ = x.shape[2:]
        for _ in range(30):
            k = int(self.rng.integers(1, 4))
            stride = int(self.rng.integers(1, 4))
            dil = int(self.choice([1, 1, 2]))
            pad = int(self.rng.integers(0, k // 2 + 1))
            ceil = self.r() < 0.4
            eff = dil * (k - 1) + 1
            if h + 2 * pad >= eff and w_ + 2 * pad >= eff:
                break
        else:
            return
        if self.r() < 0.5:
            m = nn.MaxPool2d(k, stride, pad, dil, ceil_mode=ceil)
            self.add_mod(m, f"nn.MaxPool2d(k{k},s{stride},p{pad},d{dil},ceil{int(ceil)})")
        else:
            self.add(("fmaxpool", k, stride, pad, dil, ceil),
                     f"F.max_pool2d(k{k},s{stride},p{pad},d{dil},ceil{int(ceil)})")
        if not torch.isfinite(self.current()).all():
            # a window entirely in the padding (torch outputs -inf): refused by lipbound
            # (README), not a model of the fuzz
            self.ops.pop()
            self.kinds.pop()

    def avgpool(self, x: torch.Tensor) -> None:
        h, w_ = x.shape[2:]
        kind = self.choice(["avg", "favg", "adaptive", "fadaptive"])
        if kind in ("adaptive", "fadaptive"):
            out = (int(self.rng.integers(1, h + 3)), int(self.rng.integers(1, w_ + 3)))
            if kind == "adaptive":
                self.add_mod(nn.AdaptiveAvgPool2d(out), f"nn.AdaptiveAvgPool2d{out}")
            else:
                self.add(("fadaptive", out), f"F.adaptive_avg_pool2d{out}")
            return
        for _ in range(30):
            k = int(self.rng.integers(1, 4))
            stride = int(self.rng.integers(1, 3))
            pad = int(self.rng.integers(0, k // 2 + 1))
            if h + 2 * pad >= k and w_ + 2 * pad >= k:
                break
        else:
            return
        cip = self.r() < 0.5
        if kind == "avg":
            self.add_mod(nn.AvgPool2d(k, stride, pad, count_include_pad=cip),
                         f"nn.AvgPool2d(k{k},s{stride},p{pad},cip{int(cip)})")
        else:
            self.add(("favgpool", k, stride, pad, False, cip),
                     f"F.avg_pool2d(k{k},s{stride},p{pad},cip{int(cip)})")

    def arith(self, x: torch.Tensor) -> None:
        c = x.shape[1]
        spatial = x.dim() - 2
        form = self.choice(["div_num", "affine_num", "rmul", "neg", "torch.neg", "method_add",
                            "method_sub", "method_mul", "method_div", "torch_add", "torch_sub",
                            "torch_mul", "torch_div", "buffers", "buffers", "buffers_view",
                            "param_scale", "size_div", "shape_mul", "normalize"])
        a = float(self.choice([255.0, 2.0, 0.5, -3.0, 0.1, 7.0]))
        b = float(self.choice([1.0, 0.25, -2.0]))
        if form == "normalize":
            mean = self.rng.standard_normal(c)
            std = 10.0 ** self.rng.uniform(-2, 1, size=c)
            self.add_mod(lipbound.Normalize(mean.tolist(), std.tolist(), spatial_dims=spatial),
                         "lipbound.Normalize")
            return
        if form == "buffers":
            shape = (c,) + (1,) * spatial if self.r() < 0.5 else (1, c) + (1,) * spatial
            mean = self.param(self.rng.standard_normal(c).reshape(shape), buffer=True)
            std = self.param((10.0 ** self.rng.uniform(-2, 1, size=c)).reshape(shape),
                             buffer=True)
            self.add(("arith", form, mean, std), "arith:buffers")
            return
        if form == "buffers_view":
            mean = self.param(self.rng.standard_normal(c), buffer=True)
            scale = self.param(self.rng.standard_normal(c), buffer=self.r() < 0.5)
            self.add(("arith", form, mean, scale, (1, c) + (1,) * spatial),
                     "arith:buffers_view")
            return
        if form == "param_scale":
            name = self.param(self.rng.standard_normal(c))
            self.add(("arith", form, name, spatial), "arith:param_scale")
            return
        if form == "size_div" and c == 0:
            return
        self.add(("arith", form, a, b), f"arith:{form}")

    def dropout(self, x: torch.Tensor) -> None:
        p = float(self.choice([0.1, 0.5]))
        form = self.choice(["nn.Dropout", "nn.Dropout2d" if x.dim() == 4 else "nn.Dropout1d",
                            "nn.AlphaDropout", "nn.FeatureAlphaDropout", "F.dropout",
                            "F.dropout_false", "F.dropout2d" if x.dim() == 4 else "torch.dropout",
                            "F.alpha_dropout", "torch.dropout", "nn.Identity"])
        if form.startswith("nn."):
            cls = getattr(nn, form[3:])
            m = cls() if form == "nn.Identity" else cls(p)
            if form == "nn.Dropout1d" and x.dim() != 3:
                m = nn.Dropout(p)
            self.add_mod(m, form)
        else:
            self.add(("drop", form, p), form)

    def noop(self, x: torch.Tensor) -> None:
        form = self.choice(["contiguous", "clone", "detach", "to_dtype", "to_device",
                            "torch.clone"])
        self.add(("noop", form), f"noop:{form}")

    def reshape_conv(self, x: torch.Tensor) -> None:
        shp = tuple(x.shape[1:])
        form = self.choice(["unflatten", "nn.Unflatten", "view_to", "unsq_sq", "torch_unsq_sq"])
        if form in ("unsq_sq", "torch_unsq_sq"):
            d = int(self.choice([1, 2, -1]))
            self.add(("shape", form, d), f"shape:{form}({d})")
            return
        self.add(("shape", "flatten_method"), "shape:flatten")
        if form == "unflatten":
            self.add(("shape", "unflatten", shp), "shape:unflatten")
        elif form == "nn.Unflatten":
            self.add_mod(nn.Unflatten(1, shp), "nn.Unflatten")
        else:
            self.add(("shape", "view_to", shp), "shape:view(-1,C,H,W)")

    def flatten(self, x: torch.Tensor) -> None:
        n = int(np.prod(x.shape[1:]))
        form = self.choice(["nn.Flatten", "flatten_method", "torch.flatten", "view", "reshape",
                            "torch.reshape"])
        if form == "nn.Flatten":
            self.add_mod(nn.Flatten(), "nn.Flatten")
        elif form == "torch.reshape":
            self.add(("shape", form, n), "shape:torch.reshape")
        else:
            self.add(("shape", form), f"shape:{form}")


def make_case(seed: int, *, fc_only: bool | None = None, max_blocks: int = 3,
              adversarial: bool = False, n_in: int | None = None) -> Case:
    """One random model and nominal input from ``seed`` (see the module docstring).

    ``adversarial``: dyadic values throughout, and most biases put units exactly on their
    kinks at ``x0`` (and clamp limits on attained values), with up to four conv blocks.
    ``n_in``: the input size of a fully connected model (``fc_only=True``).
    """
    rng = np.random.default_rng([seed, 24])
    dtype = torch.float32 if rng.random() < 0.25 else torch.float64
    dyadic = bool(rng.random() < 0.35) or adversarial
    if adversarial:
        max_blocks = 4
    if fc_only is None:
        fc_only = bool(rng.random() < 0.35)
    bld = _Builder(seed, dtype, dyadic)
    plain = bool(fc_only and rng.random() < 0.5)  # Linear + ReLU only (exact-l2 applies)
    bld.plain = plain
    bld.adversarial = adversarial
    if fc_only:
        shape: tuple[int, ...] = (int(rng.integers(1, 6)) if n_in is None else n_in,)
    else:
        shape = (int(rng.integers(1, 4)), int(rng.integers(3, 8)), int(rng.integers(3, 8)))
    x0_mode = bld.choice(["normal", "normal", "dyadic", "zeros", "big", "small"])
    if dyadic or x0_mode == "dyadic":
        x0 = rng.integers(-4, 5, size=shape) / 2.0
    elif x0_mode == "zeros":
        x0 = np.zeros(shape)
    elif x0_mode == "big":
        x0 = rng.standard_normal(shape) * 100
    elif x0_mode == "small":
        x0 = rng.standard_normal(shape) * 1e-4
    else:
        x0 = rng.standard_normal(shape)
    bld.x0 = torch.tensor(x0[None], dtype=dtype)
    if rng.random() < 0.3 and not plain:
        bld.arith(bld.current())  # input preprocessing first
    if not fc_only:
        for _ in range(int(rng.integers(1, max_blocks + 1))):
            x = bld.current()
            r = bld.r()
            if r < 0.6:
                bld.conv(x)
            elif r < 0.8:
                bld.avgpool(x)
            else:
                bld.arith(x)
            if bld.r() < 0.3:
                bld.batchnorm(bld.current())
            bld.activation(bld.current())
            if bld.r() < 0.4:
                bld.maxpool(bld.current())
            for extra in (bld.dropout, bld.noop, bld.reshape_conv, bld.arith):
                if bld.r() < 0.15:
                    extra(bld.current())
        bld.flatten(bld.current())
    for _ in range(int(rng.integers(0, 3))):
        bld.linear(bld.current())
        if bld.r() < 0.25 and not plain:
            bld.batchnorm(bld.current())
        bld.activation(bld.current())
        for extra in (bld.dropout, bld.noop) if plain else (bld.dropout, bld.noop, bld.arith):
            if bld.r() < 0.15:
                extra(bld.current())
        if bld.r() < 0.1 and not plain:
            d = int(bld.choice([1, -1]))
            bld.add(("shape", "unsq_sq", d), f"shape:unsq_sq({d})")
    n_classes = int(rng.integers(2, 5))
    bld.linear(bld.current(), n_out=n_classes)
    if rng.random() < 0.15 and not plain:
        bld.arith(bld.current())
    bld.net.ops = tuple(bld.ops)
    model = bld.net.eval()
    for p in model.parameters():
        p.requires_grad_(bool(rng.random() < 0.5))
    return Case(model=model, x0=bld.x0.clone(), seed=seed, kinds=list(bld.kinds),
                fc_only=fc_only, dyadic=dyadic, plain=plain)


ROUNDING_KINDS = ("fconv", "flinear", "favgpool", "fadaptive", "arith")
ROUNDING_MODULES = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.AvgPool2d,
                    nn.AdaptiveAvgPool2d, lipbound.Normalize)


def rounds(net: FuzzNet, op: tuple) -> bool:
    """Whether ``op`` rounds (sums or arithmetic), rather than selecting or reshaping."""
    return op[0] in ROUNDING_KINDS or (op[0] == "mod"
                                       and isinstance(net.mods[op[1]], ROUNDING_MODULES))


def abs_twin(net: FuzzNet) -> FuzzNet:
    """A float64 copy whose op ``k`` applied to ``|h|`` gives the magnitudes of the terms the
    real op sums at ``h``: weights and scales ``|.|``, subtracted constants ``-|.|`` (batch
    norm's and Normalize's means, ``x - mean`` buffers and numbers), negations dropped."""
    twin = copy.deepcopy(net).double().eval()
    means = set()
    ops = []
    for op in twin.ops:
        if op[0] == "arith":
            form = op[1]
            if form in ("buffers", "buffers_view"):
                means.add(op[2])
            elif form in ("method_sub", "torch_sub"):
                op = (op[0], form, -abs(op[2])) + op[3:]
            elif form == "affine_num":
                op = (op[0], form, abs(op[2]), -abs(op[3]))
            elif form in ("neg", "torch.neg"):
                op = ("noop", "clone")
            elif isinstance(op[2], float):
                op = (op[0], form, abs(op[2])) + op[3:]
        ops.append(op)
    twin.ops = tuple(ops)
    with torch.no_grad():
        for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
            short = name.rsplit(".", 1)[-1]
            neg = name in means or short in ("running_mean", "mean")
            t.copy_(-t.abs() if neg else t.abs())
    return twin


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (its own weights), for reference computations; a
    ``.detach()`` in its forward becomes a ``.clone()`` (the same values, with gradients for
    the references' own ascent and Jacobians)."""
    m = copy.deepcopy(model).double().eval()
    if isinstance(m, FuzzNet):
        m.ops = tuple(("noop", "clone") if op == ("noop", "detach") else op for op in m.ops)
    return m
