"""Per-layer soundness, checked layer by layer against independent float64 references.

Whole-network bounds are loose enough to hide a wrong layer factor, so every factor in
``BoundResult.layers`` is compared with the spectral norm of its own operator: ``R A D`` for
an affine(-ReLU) block (``A`` the Jacobian of the block's torch modules, built from basis
vectors with the biases removed; ``R``, ``D`` the slopes and the mask of movable inputs,
recomputed here from the rules of docs/method.md, and the library's own masks, which must
dominate them), ``sqrt(max windows per movable input)`` for max pooling; the references are
numpy SVDs. Certified factors may not be below the reference by more than 1e-12 relative;
probabilistic ones (failure probability 1e-6 over their own draws, fixed seeds here) may not
be below it at all on these networks. Also: the circulant bound of strided / dilated /
grouped convolutions against the dense SVD, the exact route against numpy, and the a
posteriori Lanczos bounds at the edge of their events.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipbound.analyzer import Analyzer
from lipbound.blocks import PoolBlock
from lipbound.lanczos import _start_block, run_lanczos
from lipbound.ops.conv import circulant_norm_bound, conv2d_rule
from lipbound.posterior import block_overlap_floor, overlap_floor
from lipbound.results import Guarantee
from lipbound.spectral import exact_norm

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F64 = torch.float64
TOL = 1e-12


# ----------------------------------------------------------------------------- references
def _segments(model: nn.Sequential) -> list[tuple[str, object, bool]]:
    """The model cut at its ReLUs and max pools: ``("aff", modules, relu)`` / ``("pool", m)``."""
    segs: list[tuple[str, object, bool]] = []
    cur: list[nn.Module] = []
    for m in model:
        if isinstance(m, nn.ReLU):
            segs.append(("aff", cur, True))
            cur = []
        elif isinstance(m, nn.MaxPool2d):
            if cur:
                segs.append(("aff", cur, False))
                cur = []
            segs.append(("pool", m, False))
        else:
            cur.append(m)
    if cur:
        segs.append(("aff", cur, False))
    return segs


def _block_groups(blocks) -> list[list]:
    """The analyzer's blocks grouped like :func:`_segments` (a segment may be split)."""
    groups, cur = [], []
    for b in blocks:
        if isinstance(b, PoolBlock):
            if cur:
                groups.append(cur)
                cur = []
            groups.append([b])
            continue
        cur.append(b)
        if b.relu:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


def _linear_part(mods: list[nn.Module], in_shape) -> torch.Tensor:
    """The (out, in) Jacobian of a run of affine torch modules (biases and batch-norm means
    removed, so nothing cancels)."""
    mods = [copy.deepcopy(m) for m in mods]
    with torch.no_grad():
        for m in mods:
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.zero_()
        n = math.prod(in_shape)
        eye = torch.eye(n, dtype=F64).reshape(n, *in_shape)
        y = nn.Sequential(*mods)(eye) if mods else eye
    return y.reshape(n, -1).T.contiguous()


def _block_matrix(b) -> torch.Tensor:
    with torch.no_grad():
        return b.lin(torch.eye(b.in_dim, dtype=F64)).T.contiguous()


def _pool_counts(m: nn.MaxPool2d, hw) -> torch.Tensor:
    """Windows holding each input element (flat), from torch's unfold."""
    h, w = hw
    idx = torch.arange(1, h * w + 1, dtype=F64).reshape(1, 1, h, w)
    u = F.unfold(idx, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return torch.bincount(u.reshape(-1).long(), minlength=h * w + 1)[1:].to(F64)


def _snorm(m: torch.Tensor) -> float:
    return float(np.linalg.norm(m.numpy(), 2)) if m.numel() else 0.0


def _check(factor: float, guarantee: Guarantee, exact: float, what: str) -> float:
    assert guarantee in (Guarantee.CERTIFIED, Guarantee.PROBABILISTIC, Guarantee.EXACT), what
    assert factor >= exact * (1 - TOL), (what, factor, exact, guarantee)
    return exact / factor if factor > 0 else 0.0


def _recording(an: Analyzer) -> dict:
    """Record the masks ``(r, d)`` each affine block's factor is computed for."""
    rec: dict = {}
    orig = an._affine_factor

    def wrapped(b, i, r, d, *args, **kwargs):
        out = orig(b, i, r, d, *args, **kwargs)
        rec[i] = (r.clone(), d.clone())
        return out
    an._affine_factor = wrapped
    return rec


def _check_global(model, in_shape, an: Analyzer, res) -> int:
    n = 0
    shape = tuple(in_shape)
    for (kind, mods, _), grp in zip(_segments(model), _block_groups(an.blocks), strict=True):
        lfs = [res.layers[an.blocks.index(b)] for b in grp]
        if kind == "pool":
            c = _pool_counts(mods, shape[-2:])
            _check(lfs[0].global_factor, lfs[0].guarantee, math.sqrt(float(c.max())), "pool")
            with torch.no_grad():
                shape = tuple(mods(torch.zeros(1, *shape, dtype=F64)).shape[1:])
            n += 1
            continue
        j = _linear_part(mods, shape)
        mats = [j] if len(grp) == 1 else [_block_matrix(b) for b in grp]
        if len(grp) > 1:  # a split segment: its blocks multiply to the segment
            prod = mats[0]
            for m in mats[1:]:
                prod = m @ prod
            assert torch.allclose(prod, j, rtol=1e-10, atol=1e-12 * float(j.abs().max()))
        for lf, m in zip(lfs, mats, strict=True):
            _check(lf.global_factor, lf.guarantee, _snorm(m), f"global {lf.name}")
            n += 1
        with torch.no_grad():
            shape = tuple(nn.Sequential(*mods)(torch.zeros(1, *shape, dtype=F64)).shape[1:]) \
                if mods else shape
    return n


def _check_local(model, in_shape, x0, an: Analyzer, res, rec) -> int:
    """Every local factor of ``res`` against ``||R A D||`` with the masks recomputed here
    (rules 1-4 at the radius the layer saw) and with the library's (which must dominate)."""
    n = 0
    shape = tuple(in_shape)
    x = x0.to(F64)
    d = torch.ones(math.prod(shape), dtype=F64)
    for (kind, mods, relu), grp in zip(_segments(model), _block_groups(an.blocks), strict=True):
        i0 = an.blocks.index(grp[0])
        if kind == "pool":
            lf = res.layers[i0]
            movable = d.reshape(shape).amax(0).reshape(-1) > 0
            c = _pool_counts(mods, shape[-2:])
            _check(lf.local, lf.guarantee,
                   math.sqrt(float(c[movable].max())) if bool(movable.any()) else 0.0, "pool")
            with torch.no_grad():
                d = (mods(d.reshape(1, *shape)) > 0).to(F64).reshape(-1)
                x = mods(x)
            shape = tuple(x.shape[1:])
            n += 1
            continue
        seq = nn.Sequential(*mods) if mods else nn.Identity()
        j = _linear_part(mods, shape)
        with torch.no_grad():
            y = seq(x)
        y0, out_shape = y.reshape(-1), tuple(y.shape[1:])
        rn = torch.sqrt((j * j) @ d)
        moving = rn > 0
        if relu:  # rule 1 with rule 3's upper limit, at the radius this layer saw
            ybar = y0 + res.layers[i0].radius_in * rn
            r = torch.where(y0 >= 0, 1.0, torch.where(ybar > 0, ybar / (ybar - y0), 0.0))
            r = torch.where(moving, r, 0.0)
            d_out = ((ybar > 0) & moving).to(F64)
        else:
            r = moving.to(F64)
            d_out = r.clone()
        if len(grp) == 1:
            lf = res.layers[i0]
            r_l, d_l = rec[i0]
            assert bool((d_l >= d).all()), f"mask D of {lf.name} misses a movable input"
            assert bool((r_l >= r * (1 - 1e-9)).all()), f"slopes of {lf.name} below rule 1"
            same = torch.equal(r, r_l) and torch.equal(d, d_l)
            for rr, dd in ((r, d),) if same else ((r, d), (r_l, d_l)):
                _check(lf.local, lf.guarantee, _snorm(rr[:, None] * j * dd[None, :]),
                       f"local {lf.name} {lf.spectral_method}")
                n += 1
        else:
            for b in grp:
                i = an.blocks.index(b)
                r_l, d_l = rec[i]
                lf = res.layers[i]
                _check(lf.local, lf.guarantee,
                       _snorm(r_l[:, None] * _block_matrix(b) * d_l[None, :]),
                       f"local {lf.name} {lf.spectral_method}")
                n += 1
            if relu:
                assert bool((rec[an.blocks.index(grp[-1])][0] >= r * (1 - 1e-9)).all())
        d = d_out
        x = (torch.relu(y0) if relu else y0).reshape(1, *out_shape)
        shape = out_shape
    return n


def _check_model(model, in_shape, x0, eps_list, *, spectral, steps=64, seed=0,
                 global_first=False, reuse=None) -> int:
    model = model.to(F64).eval()
    an = Analyzer(model, in_shape, spectral=spectral, lanczos_steps=steps, seed=seed)
    n = 0
    if global_first:  # the local factors may then use max(r) * the global factor
        n += _check_global(model, in_shape, an, an.global_bound())
    target = an.reuse_copy(reuse) if reuse is not None else an
    rec = _recording(target)
    for eps in eps_list:
        rec.clear()
        res = target.local_bound(x0.to(F64), eps)
        n += _check_local(model, in_shape, x0, target, res, rec)
    if not global_first:
        fresh = Analyzer(model, in_shape, spectral=spectral, lanczos_steps=steps, seed=seed)
        n += _check_global(model, in_shape, fresh, fresh.global_bound())
    return n


# ------------------------------------------------------------------------------ networks
def _fill(model: nn.Module, gen: torch.Generator, dead: float = 0.0) -> nn.Module:
    """Random float64 parameters; a fraction ``dead`` of the convolutions' output channels
    gets a bias of -50 (their ReLUs never turn on: masks that drop whole channels)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=F64)
                               / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=F64) * 0.3)
                    if isinstance(m, nn.Conv2d) and dead > 0:
                        m.bias[torch.rand(m.bias.shape, generator=gen) < dead] = -50.0
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=F64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=F64) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen,
                                                 dtype=F64) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen,
                                               dtype=F64) + 0.5)
    return model.to(F64).eval()


def _with_head(body: list[nn.Module], in_shape, n_out: int, tail=()) -> nn.Sequential:
    """``body``, then Flatten and a Linear layer sized to the body's output (and ``tail``)."""
    with torch.no_grad():
        n = nn.Sequential(*body).to(F64)(torch.zeros(1, *in_shape, dtype=F64)).numel()
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(n, n_out), *tail)


def _nets():
    """Small networks that reach the fast paths: strided / dilated / grouped convolutions,
    kernels larger than the input, folded batch norm and average pooling, products of
    layers without a ReLU between them, max pooling, whole channels masked out, 1 x N
    inputs, thin and wide dense layers."""
    gen = torch.Generator().manual_seed(7)
    shape = (3, 9, 8)
    yield "strided-dilated", shape, _fill(_with_head([
        nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, (2, 3), stride=(1, 2), padding=1, groups=3), nn.ReLU()], shape, 4),
        gen, dead=0.3)
    shape = (2, 3, 2)
    yield "kernel>input", shape, _fill(_with_head([
        nn.Conv2d(2, 4, 5, padding=3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False), nn.ReLU()], shape, 3),
        gen)
    shape = (1, 1, 17)
    yield "1xN", shape, _fill(_with_head([
        nn.Conv2d(1, 5, (1, 4), stride=(1, 3), padding=(0, 2)), nn.ReLU(),
        nn.MaxPool2d((1, 3), stride=(1, 2), padding=(0, 1)), nn.Conv2d(5, 4, 1), nn.ReLU()],
        shape, 2), gen, dead=0.3)
    shape = (3, 6, 6)
    yield "live-channels", shape, _fill(_with_head([
        nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 10, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(10, 6, 3), nn.ReLU()], shape, 5), gen, dead=0.4)
    shape = (2, 6, 6)
    yield "conv-pool-linear product", shape, _fill(_with_head([
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
        nn.AvgPool2d(2)], shape, 5, (nn.ReLU(), nn.Linear(5, 3))), gen)
    yield "thin-wide", (300,), _fill(nn.Sequential(
        nn.Linear(300, 1), nn.ReLU(), nn.Linear(1, 400), nn.ReLU(), nn.Linear(400, 2),
        nn.Linear(2, 3)), gen)


@pytest.mark.parametrize("spectral", ["auto", "exact", "lanczos"])
def test_every_layer_factor_bounds_its_own_operator(spectral):
    """Each factor (local, local after the global factors, reused in a sweep, global) is at
    least the SVD norm of its layer's masked operator, built from the torch modules."""
    checked = 0
    for k, (_name, shape, model) in enumerate(_nets()):
        x0 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(k), dtype=F64)
        steps = 16 if spectral == "lanczos" else 64  # short runs: probabilistic factors
        eps = [1e-3, 0.3, 3.0]
        checked += _check_model(model, shape, x0, eps, spectral=spectral, steps=steps,
                                global_first=k % 2 == 1)
        checked += _check_model(model, shape, x0, [3.0, 0.3, 1e-3, 0.3], spectral=spectral,
                                steps=steps, reuse=0.02)
    assert checked > 150


def test_block_lanczos_factor_of_a_big_dense_layer_bounds_its_operator():
    """A dense layer of >= 2M entries takes block Lanczos (b = 8), masked and unmasked,
    including a top singular value repeated eight times."""
    gen = torch.Generator().manual_seed(3)
    model = _fill(nn.Sequential(nn.Linear(400, 5200), nn.ReLU(), nn.Linear(5200, 3)), gen)
    with torch.no_grad():
        model[0].bias.add_(20.0)  # every row on: the whole 2.08M-entry matrix
        u, s, vh = torch.linalg.svd(model[0].weight, full_matrices=False)
        s[:8] = s[0]
        model[0].weight.copy_((u * s) @ vh)
    x0 = torch.randn(1, 400, generator=gen, dtype=F64)
    an = Analyzer(model, (400,), spectral="lanczos")
    rec = _recording(an)
    res = an.local_bound(x0, 0.5)
    assert res.layers[0].spectral_method == "block-lanczos"
    _check_local(model, (400,), x0, an, res, rec)
    _check_global(model, (400,), an, an.global_bound())


def test_circulant_bound_bounds_strided_dilated_grouped_convolutions():
    """The polyphase circulant bound against the SVD of the convolution's matrix (formed by
    torch's conv2d on basis vectors), over strides, dilations, groups, paddings, kernels
    larger than the input and 1 x N inputs."""
    gen = torch.Generator().manual_seed(11)

    def draw(a: int, b: int) -> int:
        return int(torch.randint(a, b + 1, (1,), generator=gen))
    done = 0
    while done < 60:
        groups = [1, 1, 2, 3][draw(0, 3)]
        c_in, c_out = groups * draw(1, 2), groups * draw(1, 3)
        k, s = (draw(1, 6), draw(1, 6)), (draw(1, 3), draw(1, 3))
        dil, pad = (draw(1, 3), draw(1, 3)), (draw(0, 3), draw(0, 3))
        h, w = (1 if done % 4 == 0 else draw(1, 9)), draw(1, 9)
        conv = nn.Conv2d(c_in, c_out, k, s, pad, dil, groups=groups).to(F64)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=F64))
        try:
            out = conv(torch.zeros(1, c_in, h, w, dtype=F64))
        except RuntimeError:  # the kernel does not fit the padded input
            continue
        if out.numel() == 0:
            continue
        op = conv2d_rule(conv, "c", (c_in, h, w), tuple(out.shape[1:]))
        n = c_in * h * w
        with torch.no_grad():
            m = F.conv2d(torch.eye(n, dtype=F64).reshape(n, c_in, h, w), conv.weight, None,
                         s, pad, dil, groups).reshape(n, -1).T
        bound = circulant_norm_bound(op)
        assert bound is not None and bound >= _snorm(m) * (1 - TOL), (k, s, dil, pad, h, w)
        done += 1


def test_exact_route_bounds_adversarial_matrices():
    """:func:`exact_norm` (torch and numpy) against numpy's SVD: repeated and clustered top
    singular values, rank one, 1 x N and N x 1, entries over 1e300 in dynamic range."""
    gen = torch.Generator().manual_seed(5)
    cases = []
    for m, n in ((1, 50), (50, 1), (40, 40), (7, 300), (300, 9)):
        r = min(m, n)
        u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=F64))[0]
        v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=F64))[0]
        for s in (torch.ones(r, dtype=F64), torch.linspace(1, 1 - 1e-12, r, dtype=F64),
                  torch.cat([torch.tensor([3.0], dtype=F64), torch.zeros(r - 1, dtype=F64)])):
            cases.append((u * s) @ v.T)
        cases.append(torch.randn(m, n, generator=gen, dtype=F64)
                     * torch.pow(10.0, torch.randint(-150, 150, (m, n), generator=gen).to(F64)))
    cases.append(torch.full((3, 4), 5e-324, dtype=F64))
    for c in cases:
        ref = float(np.linalg.norm(c.numpy(), 2))
        assert exact_norm(c) >= ref * (1 - TOL)
        assert exact_norm(c.numpy()) >= ref * (1 - TOL)


@pytest.mark.parametrize("block", [1, 8])
def test_a_posteriori_bound_holds_at_the_edge_of_its_event(block):
    """Operators built around the very start vector of the run, with the start's overlap
    with the top eigenvector exactly at (and just above) the floor the bound assumes: the a
    posteriori bound must still be >= lambda_max (it is a deterministic implication on that
    event), with and without the early stop."""
    n, delta = 200, 1e-6
    floor = overlap_floor(n, delta / 2) if block == 1 else \
        block_overlap_floor(n, block, delta * 0.875)
    for seed in range(2):
        start = _start_block(n, block, torch.Generator().manual_seed(seed), "cpu")
        gen = torch.Generator().manual_seed(100 + seed)
        for factor in (1.0, 4.0, 1e4):
            s2 = min(factor * floor, 0.99)
            a = torch.randn(block, generator=gen, dtype=F64)
            inside = (a / a.norm()) @ start
            out = torch.randn(n, generator=gen, dtype=F64)
            out -= start.T @ (start @ out)
            x1 = math.sqrt(s2) * inside + math.sqrt(1 - s2) * out / out.norm()
            basis = torch.randn(n, n, generator=gen, dtype=F64)
            basis[:, 0] = x1
            q = torch.linalg.qr(basis)[0]
            q[:, 0] = x1
            for rest in (torch.rand(n - 1, generator=gen, dtype=F64),  # continuous top
                         1 - 1e-6 * torch.rand(n - 1, generator=gen, dtype=F64) ** 0.01,
                         torch.full((n - 1,), 0.5, dtype=F64)):
                lam = torch.cat([torch.ones(1, dtype=F64), rest.clamp(max=1.0)])
                m = (q * lam.sqrt()) @ q.T
                for stop in (None, 1.001):
                    res = run_lanczos(lambda v, m=m: v @ m.T, lambda y, m=m: y @ m, n, 64,
                                      torch.Generator().manual_seed(seed), "cpu", block=block,
                                      post_c=floor, post_stop=stop)
                    assert res.post_sqrt >= 1.0 * (1 - TOL), (seed, factor, stop)
