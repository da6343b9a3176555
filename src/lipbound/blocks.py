"""Grouping of the op chain into the layers the bounds are computed on.

An *affine block* is a run of affine ops (at most one coordinate-mixing op, plus diagonal
ops such as folded batch norm / normalisation, and reshapes), optionally followed by a ReLU:
the paper's affine-ReLU layer ``g(x) = relu(A x + b)`` (batch norm folded in). A *pool
block* is a max-pooling layer. Consecutive fully connected layers without a ReLU between
them are multiplied into one matrix; other runs with several mixing ops are formed densely
when small, and otherwise split into separate blocks (sound, slightly looser).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops.base import DiagOp, MixingOp, Op, ReshapeOp
from .ops.linear import LinearOp
from .ops.pooling import MaxPoolOp

DENSE_COMPOSE_LIMIT = 4_000_000


class AffineBlock:
    """``y = s_out ⊙ M(s_in ⊙ x) + b`` (flattened), optionally followed by ReLU."""

    def __init__(self, ops: list[Op], relu: bool, shape: tuple[int, ...] | None = None,
                 relu_name: str = ""):
        self.ops = list(ops)
        self.relu = relu
        self.relu_name = relu_name
        if ops:
            self.in_shape, self.out_shape = ops[0].in_shape, ops[-1].out_shape
        else:
            if shape is None:
                raise ValueError("an empty affine block needs its shape")
            self.in_shape = self.out_shape = tuple(shape)
        mixing = [op for op in ops if op.kind == "mixing"]
        if len(mixing) > 1:
            raise ValueError("an affine block holds at most one mixing op")
        self.mixing: MixingOp | None = mixing[0] if mixing else None  # type: ignore[assignment]
        self.in_dim = math.prod(self.in_shape)
        self.out_dim = math.prod(self.out_shape)
        s_in = None
        s_out = None
        seen_mixing = False
        for op in ops:
            if op.kind == "mixing":
                seen_mixing = True
            elif isinstance(op, DiagOp):
                s = op.scale.reshape(-1)
                if seen_mixing:
                    s_out = s if s_out is None else s_out * s
                else:
                    s_in = s if s_in is None else s_in * s
        if self.mixing is None and s_out is not None:
            s_in = s_out if s_in is None else s_in * s_out
            s_out = None
        self.s_in: Tensor | None = None if s_in is None or bool((s_in == 1).all()) else s_in
        self.s_out: Tensor | None = None if s_out is None or bool((s_out == 1).all()) else s_out

    @property
    def name(self) -> str:
        names = [op.name for op in self.ops if op.kind in ("mixing", "diag")]
        if self.relu:
            names.append(self.relu_name or "relu")
        return "+".join(names) if names else "identity"

    @property
    def kind(self) -> str:
        return "affine-relu" if self.relu else "affine"

    def forward(self, x: Tensor) -> Tensor:
        """Pre-activation (affine part only, with biases), batched in the block's in shape."""
        for op in self.ops:
            x = op.forward(x)
        return x

    def lin(self, v: Tensor) -> Tensor:
        """Flat (B, in_dim) -> (B, out_dim): the linear part A."""
        if self.s_in is not None:
            v = v * self.s_in
        if self.mixing is None:
            return v
        m = self.mixing
        y = m.lin(v.reshape(v.shape[0], *m.in_shape)).reshape(v.shape[0], -1)
        return y if self.s_out is None else y * self.s_out

    def fast_error(self) -> float | None:
        """Absolute error per unit input norm of :meth:`lin` / :meth:`lin_t` when the mixing
        op computes fast (Winograd) products, scales included; None when it never does."""
        err = getattr(self.mixing, "winograd_error", None)
        e = err() if err is not None else None
        if e is None:
            return None
        for s in (self.s_in, self.s_out):
            if s is not None:
                e *= float(s.abs().max())
        return e

    def lin_t(self, y: Tensor) -> Tensor:
        if self.mixing is None:
            return y if self.s_in is None else y * self.s_in
        if self.s_out is not None:
            y = y * self.s_out
        m = self.mixing
        v = m.lin_t(y.reshape(y.shape[0], *m.out_shape)).reshape(y.shape[0], -1)
        return v if self.s_in is None else v * self.s_in

    def sq_rows(self, w: Tensor) -> Tensor:
        """Flat (B, in_dim) non-negative weights -> (A ⊙ A) w, flat (B, out_dim)."""
        if self.s_in is not None:
            w = w * self.s_in ** 2
        if self.mixing is None:
            return w
        m = self.mixing
        y = m.sq_rows(w.reshape(w.shape[0], *m.in_shape)).reshape(w.shape[0], -1)
        return y if self.s_out is None else y * self.s_out ** 2

    def dense_fn(self):
        if self.mixing is None:
            return None
        dm = self.mixing.dense()
        if dm is None:
            return None

        def build() -> Tensor:
            return self.with_scales(dm)
        return build

    def with_scales(self, m: Tensor, rows: Tensor | None = None,
                    cols: Tensor | None = None) -> Tensor:
        """The block's matrix from the mixing op's matrix ``m`` (the diagonal scales applied);
        with ``rows`` / ``cols``, ``m`` is the mixing matrix's submatrix on those indices."""
        if self.s_in is not None:
            m = m * (self.s_in if cols is None else self.s_in[cols])[None, :]
        if self.s_out is not None:
            m = m * (self.s_out if rows is None else self.s_out[rows])[:, None]
        return m

    def apply_flops(self) -> float:
        return self.mixing.flops() if self.mixing is not None else float(self.in_dim)

    def channel_subset(self, in_ch: Tensor, out_ch: Tensor) -> AffineBlock:
        """The linear part of a convolution block restricted to input channels ``in_ch`` and
        output channels ``out_ch`` (sorted): ``lin`` / ``lin_t`` of the result are those of
        this block composed with the channel selections (scales included; no bias, so it is
        not meant for :meth:`forward`). Used where the other channels are masked out."""
        conv = self.mixing.channel_subset(in_ch, out_ch)  # type: ignore[union-attr]
        sub = AffineBlock([conv], self.relu, relu_name=self.relu_name)

        def pick(s: Tensor | None, shape, ch: Tensor) -> Tensor | None:
            return None if s is None else s.reshape(shape).index_select(0, ch).reshape(-1)
        sub.s_in = pick(self.s_in, self.in_shape, in_ch)
        sub.s_out = pick(self.s_out, self.out_shape, out_ch)
        return sub


class PoolBlock:
    kind = "maxpool"

    def __init__(self, op: MaxPoolOp):
        self.op = op
        self.in_shape, self.out_shape = op.in_shape, op.out_shape
        self.in_dim, self.out_dim = op.in_dim, op.out_dim
        self.relu = False

    @property
    def name(self) -> str:
        return self.op.name

    def forward(self, x: Tensor) -> Tensor:
        return self.op.forward(x)


Block = AffineBlock | PoolBlock


def _compose_linear_run(ops: list[Op]) -> list[Op]:
    """Multiply consecutive fully connected layers (and the 1-D diagonal ops between them)."""
    out: list[Op] = []
    for op in ops:
        if isinstance(op, LinearOp):
            j = len(out) - 1
            while j >= 0 and isinstance(out[j], (DiagOp, ReshapeOp)) \
                    and len(out[j].in_shape) == 1 and len(out[j].out_shape) == 1:
                j -= 1
            if j >= 0 and isinstance(out[j], LinearOp):
                first: LinearOp = out[j]  # type: ignore[assignment]
                w1, b1 = first.weight, first.bias
                for d in out[j + 1:]:
                    if isinstance(d, DiagOp):
                        s, t = d.scale.reshape(-1), d.shift.reshape(-1)
                        w1 = w1 * s[:, None]
                        b1 = b1 * s + t
                merged = LinearOp(f"{first.name}*{op.name}", op.weight @ w1,
                                  op.weight @ b1 + op.bias)
                del out[j:]
                out.append(merged)
                continue
        out.append(op)
    return out


def _dense_compose(ops: list[Op]) -> list[Op] | None:
    in_shape, out_shape = ops[0].in_shape, ops[-1].out_shape
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if n_in * n_out > DENSE_COMPOSE_LIMIT:
        return None
    dev = None
    for op in ops:
        for v in vars(op).values():
            if isinstance(v, Tensor):
                dev = v.device
                break
        if dev is not None:
            break

    def run(x: Tensor) -> Tensor:
        for op in ops:
            x = op.forward(x)
        return x
    eye = torch.eye(n_in, dtype=torch.float64, device=dev).reshape(n_in, *in_shape)
    zero = torch.zeros(1, *in_shape, dtype=torch.float64, device=dev)
    b = run(zero).reshape(-1)
    w = (run(eye).reshape(n_in, -1) - b).T.contiguous()
    name = "*".join(op.name for op in ops if op.kind == "mixing")
    seq: list[Op] = []
    if len(in_shape) != 1:
        seq.append(ReshapeOp(name + ".flatten", in_shape, (n_in,)))
    seq.append(LinearOp(name, w, b))
    if len(out_shape) != 1:
        seq.append(ReshapeOp(name + ".unflatten", (n_out,), out_shape))
    return seq


def _segment_blocks(seg: list[Op], relu: bool, relu_name: str) -> list[AffineBlock]:
    seg = _compose_linear_run(seg)
    n_mix = sum(op.kind == "mixing" for op in seg)
    if n_mix <= 1:
        return [AffineBlock(seg, relu, relu_name=relu_name)]
    dense = _dense_compose(seg)
    if dense is not None:
        return [AffineBlock(dense, relu, relu_name=relu_name)]
    parts: list[list[Op]] = [[]]
    count = 0
    for op in seg:
        if op.kind == "mixing":
            count += 1
            if count > 1:
                parts.append([])
        parts[-1].append(op)
    return [AffineBlock(p, relu and i == len(parts) - 1, relu_name=relu_name)
            for i, p in enumerate(parts)]


def build_blocks(ops: list[Op]) -> list[Block]:
    """Group the op chain into affine(-ReLU) blocks and max-pool blocks."""
    blocks: list[Block] = []
    seg: list[Op] = []
    for op in ops:
        if op.kind == "relu":
            if seg:
                blocks.extend(_segment_blocks(seg, True, op.name))
            else:
                blocks.append(AffineBlock([], True, shape=op.in_shape, relu_name=op.name))
            seg = []
        elif op.kind == "maxpool":
            if seg:
                blocks.extend(_segment_blocks(seg, False, ""))
                seg = []
            blocks.append(PoolBlock(op))  # type: ignore[arg-type]
        else:
            seg.append(op)
    if seg:
        blocks.extend(_segment_blocks(seg, False, ""))
    return blocks
