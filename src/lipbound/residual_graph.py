"""Intake of residual networks: a model whose forward is a chain of *stages*, each either a
plain chain segment (what :func:`lipbound.graph.trace_model` analyses) or a residual block
``y = act(S(x) + F(x))``: two branches that start from the same tensor ``x`` and are joined
by one addition (``a + b``, ``torch.add``, ``+=``, ``x.add(y)``), ``act`` a ReLU or nothing,
each branch a chain or the identity.

The model's ``torch.fx`` graph (:func:`lipbound.graph.traced_graph`, the same tracing and
checks as a chain's) is cut where a single tensor carries everything that depends on the
input; a piece between two cuts holding one addition of two tensors is a block, the pieces
without one are chain pieces. Every branch and chain piece becomes a
:class:`torch.fx.GraphModule` of its own nodes (sharing the model's layers), which the
ordinary :class:`~lipbound.analyzer.Analyzer` traces and checks as a chain. Anything else
(an addition of three branches, concatenation, a branch that does not start at the fork, a
block nested in a branch) is refused with every problem listed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import UnsupportedModelError
from .graph import _describe, _input_dependence, traced_graph

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__", "__radd__")
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, getattr(F, "relu_", F.relu))
_RELU_METHODS = ("relu", "relu_")
_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.setitem, torch.relu_)
_VIEW_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
                 "t", "contiguous", "expand", "narrow", "view_as", "reshape_as", "detach",
                 "__getitem__")
_VIEW_FUNCTIONS = (operator.getitem, torch.flatten, torch.reshape, torch.squeeze,
                   torch.unsqueeze, torch.permute, torch.transpose, torch.narrow)


@dataclass
class ChainStage:
    """A plain chain segment: ``module`` maps ``(N, *in_shape)`` to ``(N, *out_shape)``."""

    module: fx.GraphModule
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    name: str


@dataclass
class BlockStage:
    """A residual block ``y = act(shortcut(x) + main(x))`` (``act``: ReLU when ``relu``); a
    branch that is ``None`` is the identity."""

    main: fx.GraphModule | None
    shortcut: fx.GraphModule | None
    relu: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    name: str


Stage = ChainStage | BlockStage


def _is_add(node: fx.Node) -> bool:
    # (alpha=1 is the plain sum; alpha=0 is not: before session 26's review `not alpha`
    # read torch.add(a, b, alpha=0) as a + b)
    plain = node.kwargs.get("alpha", 1) == 1 and "out" not in node.kwargs \
        and len(node.args) <= 2
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return plain
    if node.op == "call_method" and node.target in _ADD_METHODS:
        return plain
    return False


def _is_scaled_add(node: fx.Node) -> bool:
    """An addition with a factor: ``torch.add(a, b, alpha=2)``, ``a.add(b, alpha=2)``."""
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS)) \
        and node.kwargs.get("alpha") is not None and not _is_add(node)


def _is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))) is nn.ReLU
    return False


def _mutated(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """The tensor an in-place operation changes (``None`` for any other node): ``+=``,
    ``x.add_(y)``, ``torch.relu_``, ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``,
    ``x[i] = v``, ``out=x``. (An augmented assignment ``x += y`` is traced as ``x + y``: its
    change to an alias of ``x`` is not in the graph; the stage check's numbers are the guard
    there.)"""
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):  # (torch.clamp(h, min=0, out=h))
        return out
    arg = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if arg is None:
        return None
    if node.op == "call_function":
        t = node.target
        if t in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return arg
        # (F.relu(x, True), F.hardtanh(x, -1, 1, True): the functional forms' positional
        # flag)
        if getattr(t, "__module__", "") == "torch.nn.functional" and any(
                a is True for a in node.args[1:]):
            return arg
        return None
    if node.op == "call_method":
        t = str(node.target)
        dunder_inplace = t.startswith("__i") and t.endswith("__")
        return arg if dunder_inplace or (t.endswith("_") and not t.startswith("__")) else None
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        return arg if getattr(mod, "inplace", False) is True else None
    return None


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS)


def _alias_problems(g: _Graph) -> list[tuple[str, str, str]]:
    """In-place operations whose tensor (or a view of it) is read again after them: the
    traced graph gives that later reader the value from *before* the change, the model the
    changed one (``identity = x; out = conv(relu_(x)); out + identity`` adds ``relu(x)`` in
    the model, ``x`` in the graph), so stages cut from it would analyse another function
    (session 26 review: a certified local bound of 0 for a model of local constant 0.22,
    the check of the stages at its random inputs passing)."""
    problems = []
    for m in g.nodes:
        v = _mutated(m, g.gm)
        if v is None:
            continue
        root = v  # the tensor the view chain starts from, then every view of it
        while _is_view(root) and root.args and isinstance(root.args[0], fx.Node):
            root = root.args[0]
        aliases, todo = set(), [root]
        while todo:
            a = todo.pop()
            if a in aliases:
                continue
            aliases.add(a)
            todo += [u for u in a.users if _is_view(u) and u.args and u.args[0] is a]
        late = sorted({u for a in aliases for u in a.users
                       if u is not m and u not in aliases and g.pos[u] > g.pos[m]},
                      key=g.pos.__getitem__)
        if late:
            where, kind = _describe(m, g.gm)
            problems.append((where, kind, f"an in-place operation on '{v.name}', which is "
                             f"read again after it (by '{late[0].name}'): the traced graph "
                             "gives that reader the value before the change, the model the "
                             "changed one, so the stages would compute another function; use "
                             "the out-of-place form (nn.ReLU(), F.relu(x), out = out + y, "
                             "inplace=False)"))
    return problems


def _owner(node: fx.Node) -> str:
    """The module path a node comes from (``layers.0``), for names of blocks."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    return paths[-1] if paths else ""


class _Graph:
    """The traced model and what the cut needs of it."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        gm, root, rec, _example, shape = traced_graph(model, input_shape)
        self.gm, self.rec, self.input_shape = gm, rec, shape
        self.dep, self.consts = _input_dependence(gm, root, rec.values)
        self.nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}

    def tensor(self, n: fx.Node) -> bool:
        return n.name in self.dep and n.name not in self.consts \
            and isinstance(self.rec.values.get(n.name), Tensor)

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        v = self.rec.values[n.name]
        return tuple(v.shape[1:])  # type: ignore[union-attr]

    def cuts(self) -> list[fx.Node]:
        """The tensors that alone carry everything computed from the input (in order)."""
        last = {n: max((self.pos[u] for u in n.users), default=-1) for n in self.nodes}
        live: set[fx.Node] = set()
        out = []
        for i, n in enumerate(self.nodes):
            if n.op == "output":
                break
            if self.tensor(n):
                live.add(n)
            live = {m for m in live if last[m] > i}
            if self.tensor(n) and live == {n}:
                out.append(n)
        return out

    def members(self, fork: fx.Node, end: fx.Node, problems: list) -> list[fx.Node] | None:
        """The nodes computing ``end`` from ``fork`` (constants included), in graph order;
        ``None`` (and a problem) when ``end`` also needs a tensor computed before ``fork``."""
        seen: set[fx.Node] = set()
        todo = [end]
        bad = None
        while todo:
            n = todo.pop()
            if n in seen or n is fork:
                continue
            if n.name in self.dep and self.pos[n] <= self.pos[fork]:
                bad = n
                continue
            seen.add(n)
            todo.extend(n.all_input_nodes)
        if bad is not None:
            where, kind = _describe(end, self.gm)
            val = self.rec.values.get(bad.name)
            if isinstance(val, (int, torch.Size)) or (
                    isinstance(val, tuple) and all(isinstance(v, int) for v in val)):
                # (a size or shape of an earlier tensor, e.g. the model input's x.size(0))
                problems.append((where, kind, f"uses '{bad.name}', read from a tensor "
                                 f"computed before its stage's input '{fork.name}' (a size or "
                                 "shape, e.g. x.size(0) of the model's input): each stage of "
                                 "a residual network is analysed from its own input alone; "
                                 "read it from the tensor at hand (out.size(0), "
                                 "out.flatten(1), torch.flatten(out, 1))"))
            else:
                problems.append((where, kind, f"a branch that does not start at the fork "
                                 f"'{fork.name}': it also uses '{bad.name}', computed before; "
                                 "both branches of a residual block must start from the "
                                 "block's input"))
            return None
        return sorted(seen, key=self.pos.__getitem__)

    def module(self, fork: fx.Node, end: fx.Node, members: list[fx.Node]) -> fx.GraphModule:
        """The nodes ``members`` as a module of one input (``fork``'s value)."""
        g = fx.Graph()
        env = {fork: g.placeholder("x")}
        for n in members:
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(env[end])
        sub = fx.GraphModule(self.gm, g)
        # the new module and the containers fx made for the paths of the model's layers are
        # in eval mode like the model (the layers themselves are the model's own)
        own = {id(m) for m in self.gm.modules()}
        for m in sub.modules():
            if id(m) not in own:
                m.training = False
        return sub


def _join_problem(node: fx.Node, g: _Graph) -> tuple[str, str, str]:
    where, kind = _describe(node, g.gm)
    if _is_scaled_add(node):
        return (where, kind, f"an addition with a factor (alpha={node.kwargs['alpha']!r}): "
                "lipbound analyses residual blocks joined by a plain addition; write the "
                "factor into the branch (a + alpha * b, or scale b's last layer)")
    what = "concatenation (torch.cat / torch.stack)" if node.target in (
        torch.cat, torch.stack, torch.concat) else "an operation on two branches"
    return (where, kind, f"joins two branches by {what}: lipbound analyses residual blocks "
            "joined by one addition (a + b, torch.add, +=) only")


def split_stages(model: nn.Module, input_shape: tuple[int, ...], graph: _Graph | None = None
                 ) -> list[Stage] | None:
    """The stages of a residual network, or ``None`` when the model has no addition of two
    branches (it is not a residual network: its chain error stands).

    Raises:
        UnsupportedModelError: listing every part of a residual network lipbound cannot
            split into stages (the branches themselves are checked by the analyzers that
            take them).
    """
    g = graph if graph is not None else _Graph(model, input_shape)
    cuts = g.cuts()
    joins = [n for n in g.nodes if g.tensor(n)
             and sum(g.tensor(a) for a in n.all_input_nodes) >= 2]
    if not any(_is_add(n) or _is_scaled_add(n) for n in joins):
        return None
    problems = _alias_problems(g)
    output = g.nodes[-1]
    if problems or not cuts or output.op != "output" or output.args[0] is not cuts[-1]:
        if problems:
            raise UnsupportedModelError(problems)
        problems.append(("model output", "output", "the output must be the last tensor of "
                         "the chain of stages (one tensor)"))
        raise UnsupportedModelError(problems)
    stages: list[Stage] = []
    chain_from: fx.Node | None = cuts[0]  # start of the current chain piece
    i = 0
    while i + 1 < len(cuts):
        fork, end = cuts[i], cuts[i + 1]
        inner = [n for n in g.nodes[g.pos[fork] + 1:g.pos[end] + 1] if g.tensor(n)]
        inner_joins = [n for n in inner if n in joins]
        if not inner_joins:
            i += 1
            continue
        # a block from fork to end: close the chain piece before it
        if chain_from is not None and chain_from is not fork:
            mem = g.members(chain_from, fork, problems)
            if mem is not None:
                stages.append(ChainStage(g.module(chain_from, fork, mem), g.shape(chain_from),
                                         g.shape(fork), f"chain {chain_from.name}..{fork.name}"))
        if len(inner_joins) > 1 or inner_joins[0] is not end:
            for n in inner_joins:
                if _is_add(n):
                    where, kind = _describe(n, g.gm)
                    problems.append((where, kind, "a residual block whose branches hold "
                                     "another join (nested blocks, or more than two "
                                     "branches): lipbound analyses blocks whose two branches "
                                     "are chains"))
                else:
                    problems.append(_join_problem(n, g))
            chain_from = None
            i += 1
            continue
        if not _is_add(end):
            problems.append(_join_problem(end, g))
            chain_from = None
            i += 1
            continue
        a, b = [x for x in end.args if isinstance(x, fx.Node)][:2]
        branches: list[fx.GraphModule | None] = []
        sizes = []
        ok = True
        for x in (a, b):
            if x is fork:
                branches.append(None)
                sizes.append(0)
                continue
            mem = g.members(fork, x, problems)
            if mem is None:
                ok = False
                continue
            branches.append(g.module(fork, x, mem))
            sizes.append(len(mem))
        if ok:
            mem_a = set(g.members(fork, a, []) or []) if a is not fork else set()
            mem_b = set(g.members(fork, b, []) or []) if b is not fork else set()
            shared = [n for n in mem_a & mem_b if n.name in g.dep]
            if shared:
                where, kind = _describe(end, g.gm)
                problems.append((where, kind, "the two branches of this addition share "
                                 f"layers ({', '.join(sorted(n.name for n in shared))}): a "
                                 "branch that does not start at the fork"))
                ok = False
        last = end
        relu = False
        # a ReLU right after the addition is the block's activation
        if i + 2 < len(cuts):
            nxt = cuts[i + 2]
            if len(end.users) == 1 and nxt in end.users and _is_relu(nxt, g.gm) \
                    and not [n for n in g.nodes[g.pos[end] + 1:g.pos[nxt]] if g.tensor(n)]:
                relu, last = True, nxt
        broadcast = any(g.shape(x) != g.shape(end) for x in (a, b))
        if ok and broadcast:
            where, kind = _describe(end, g.gm)
            problems.append((where, kind, "an addition that broadcasts (its two branches' "
                             "shapes differ from its result's): both branches of a residual "
                             "block must have the block's output shape"))
            ok = False
        if ok:
            main, short = branches
            if sizes[0] < sizes[1]:  # the longer branch is the residual branch F
                main, short = short, main
            owner = _owner(end)
            name = f"block {owner!r} ({end.name})" if owner else f"block {end.name}"
            stages.append(BlockStage(main, short, relu, g.shape(fork), g.shape(last), name))
        i += 2 if relu else 1
        chain_from = cuts[i] if ok else None
    if chain_from is not None and chain_from is not cuts[-1]:
        mem = g.members(chain_from, cuts[-1], problems)
        if mem is not None:
            stages.append(ChainStage(g.module(chain_from, cuts[-1], mem), g.shape(chain_from),
                                     g.shape(cuts[-1]), f"chain {chain_from.name}.."
                                     f"{cuts[-1].name}"))
    if problems:
        raise UnsupportedModelError(problems)
    if not any(isinstance(s, BlockStage) for s in stages):
        return None
    return stages


def residual_note(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, bool] | None:
    """A paragraph for the chain analyzer's error on a model with residual additions, and
    whether lipbound splits it into stages: for one it splits, what analyses it; for one it
    cannot split, the intake's problems (nested blocks, three branches, concatenation, ...).
    ``None`` for a model without an addition of two branches (or that cannot be traced): the
    chain error stands alone."""
    try:
        g = _Graph(model, input_shape)
    except Exception:  # noqa: BLE001 - the chain error stands
        return None
    try:
        stages = split_stages(model, input_shape, g)
    except UnsupportedModelError as exc:
        lines = [f"  - {where}: {kind}" + (f" ({detail})" if detail else "")
                 for where, kind, detail in exc.nodes]
        return ("It adds branches, but not as residual blocks lipbound analyses (blocks y = "
                "act(S x + F(x)), two chains from one tensor joined by one addition):\n"
                + "\n".join(lines), False)
    if stages is None:
        return None
    blocks = [s.name for s in stages if isinstance(s, BlockStage)]
    shown = ", ".join(blocks[:4]) + (", ..." if len(blocks) > 4 else "")
    return (f"It is a residual network: {len(blocks)} residual block(s) y = act(S x + F(x)) "
            f"({shown}). lipbound.local_bound and lipbound.global_bound analyse it stage by "
            "stage (lipbound.residual.ResidualAnalyzer; also the command line's lipbound "
            "bound); the Analyzer class and what needs it (the tight bound, sweeps, "
            "bound_many, the radius functions, rival methods) take chains only.", True)
