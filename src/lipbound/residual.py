"""Local and global Lipschitz bounds of residual networks, composed stage by stage.

A residual network is a chain of stages (:mod:`lipbound.residual_graph`): chain segments and
blocks ``y = act(S(x) + F(x))`` (``act`` a ReLU or nothing; ``S`` and ``F`` chains or the
identity). Each chain segment and branch is analysed by an ordinary
:class:`~lipbound.analyzer.Analyzer`; this module composes their bounds, extending the
paper's composition (Avant & Morgansen, *Analytical Bounds on the Local Lipschitz Constants
of ReLU Networks*, IEEE TNNLS 2023, rules 1-8 of ``docs/method.md``) to a sum of two paths.

**Local bound.** Let ``p*`` be a stage's exact nominal input (the exact network at the exact
``x0``), ``p̂`` the computed one, ``||p* - p̂|| <= Δ`` and ``e`` the stage's radius: every
input the ball ``||x - x0|| <= eps`` reaches lies in ``||x - p*|| <= e`` (composition, rule
8). Each sub-analyzer starts from ``p̂`` with the nominal error ``(Δ, 0)`` (the chain
analyzer's own bookkeeping, ``Analyzer._propagate(nom0=...)``), so its bound holds relative
to ``p*`` on that ball, and it returns its output's computed value and nominal error.

* Chain segment: its local bound (the product of its layer factors) ``L``; the next radius
  is ``L e`` and the next ``Δ`` the analyzer's nominal error of its output.
* Block with ReLU: ``z(x) - z(p*) = (S(x) - S(p*)) + (F(x) - F(p*))``, so
  ``|z_i(x) - z_i(p*)| <= e (ℓS_i + ℓF_i)`` with ``ℓ_i`` a bound on the local constant of
  the branch's row ``i`` (the branch's prefix factors times the exact row norm of its last
  affine layer on the movable inputs, as in ``local_bound_rows``, all row norms in one pass;
  for the identity ``ℓ_i = 1``). The computed ``ẑ = fl(Ŝ + F̂)`` is within ``ε_i = eS_i +
  eF_i + 2^-52 |ẑ_i|`` of ``z*_i`` (the branches' per-row nominal errors, the addition's
  rounding; an identity branch's ``e_i = Δ``, every coordinate being at most the L2 norm).
  The secant slopes ``R`` of rule 1 from the upper limits ``ẑ + ε + e (ℓS + ℓF)`` (the
  chain's rule with its margins, ``analyzer._relu_slopes``) give ``|y_i(x) - y_i(p*)| <= r_i
  |z_i(x) - z_i(p*)|``, hence ``||y(x) - y(p*)|| <= ||R (S(x) - S(p*))|| + ||R (F(x) -
  F(p*))|| <= (L(R S) + L(R F)) ||x - p*||`` (triangle inequality). ``L(R F)`` is the chain
  bound of ``F`` followed by the elementwise scale ``R`` (``Analyzer._blocks_for_scale``:
  folded into the last layer like a batch norm, no ``n x n`` map); for the identity,
  ``L(R) = max r``. The output's nominal error: ReLU is 1-Lipschitz, so ``|ŷ_i - y*_i| <=
  ε_i``, and 0 where ``ẑ_i + ε_i < 0`` (both are 0 there).
* Block without activation: ``L(S) + L(F)``; nominal error ``||ε||``.
* With an output map ``C`` (the last stage only): a chain segment's bound of ``C f``; a last
  block without activation the maps ``C`` on each branch (an identity branch's ``||C||``);
  a last block with ReLU ``||C D|| (L(R S) + L(R F))``, ``D`` the units with ``r > 0``
  (``C`` after the actual slopes ``Λ <= R`` is not bounded by ``C R``, which may cancel what
  ``Λ`` keeps), the norms by the certified dense route (:func:`lipbound.spectral.exact_norm`).

The local bound is the product of the stage factors (rounded up, ``product_up``); sums of
two upper bounds are rounded up (``math.nextafter``).

**Global bound.** The product of the stages' global constants; a block's is ``G(S) + G(F)``
(ReLU is 1-Lipschitz), with ``G(identity) = 1``; with an output map after a last block with
ReLU, ``||C|| (G(S) + G(F))``.

**Guarantee.** Every sub-analyzer gets ``failure_prob / K`` (``K`` the number of its
computations over the whole network's bound: one per chain segment, one per branch of a
block without activation, two per branch with one: its rows and its scaled bound), so the
union bound over the parts stays within the user's budget; the reported ``failure_prob`` is
the sum of the probabilistic factors actually used, and the result is certified only when
every part is. (A branch's scaled bound takes the factors of its first layers from its rows'
run, the same operators: each is one computation, counted once, so the sum is below the
budget's share of the two.) Each part draws its start vectors from a seed of its own (derived from
``seed``): no part reuses another's draws, whose results chose its operator.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import _parallel
from ._modelinfo import (
    changed_contents,
    changed_tensor,
    content_snapshot,
    find_counters,
    model_dtype_device,
    mutable_attributes,
    tensor_state,
)
from ._precision import exact_float32
from ._rounding import g_up
from ._threads import torch_single_threaded
from .analyzer import GLOBAL_QUANTITY, LOCAL_QUANTITY, Analyzer, _relu_slopes, _settings
from .blocks import AffineBlock
from .errors import InputError, UnsupportedModelError
from .ops.base import MIN_NORMAL, UNDERFLOW, norm_up, product_up
from .residual_graph import BlockStage, ChainStage, Stage, split_stages
from .results import BoundResult, Guarantee, LayerFactor, combine_guarantees
from .spectral import SAFETY, SpectralBound, exact_norm
from .validation import (
    check_bool,
    check_eps,
    check_example_input,
    check_finite,
    check_input,
    check_input_shape,
    check_int,
    check_plain_tensor,
    check_tight,
)

if TYPE_CHECKING:
    from .radius import RadiusResult

_U = 2.0 ** -53

_SEED_STRIDE = 1_000_003
"""Seeds of the parts: ``seed * _SEED_STRIDE + j + 1`` for part ``j`` (distinct)."""

_REUSE_PREFIX = True
"""A branch's scaled bound continues from its rows' run after the branch's first layers
(:func:`_same_prefix`): those layers' factors are computed once per block, not twice (the same
operators; fewer probabilistic factors, so a smaller union bound). ``False``: the scaled bound
recomputes them (the straightforward path, kept for the tests)."""

_SINGLE_THREAD = True
"""Local bounds of networks with small layers on one torch thread (see
:meth:`ResidualAnalyzer._threads`)."""

_SMALL_INPUT = 3 * 64 * 64
"""The analyzer's intake (tracing and checking every part: many forward passes of one input)
runs on one torch thread for inputs of at most this many values (CIFAR's 32x32 and 64x64
images), whose layers are small (see :meth:`ResidualAnalyzer._threads`; ResNet-20's intake on
a machine whose other core was busy: 26 s on two threads, under 0.4 s on one)."""

_MIN_SLOPE = 1e-100
"""Positive secant slopes are raised to at least this (a larger slope is always sound): the
scaled branch's coefficients must stay above the analyzer's underflow limit (1e-150)."""


def _sum_up(*vals: float) -> float:
    """An upper bound on the exact sum of non-negative floats."""
    s = math.fsum(vals)
    return math.nextafter(s, math.inf) if math.isfinite(s) and s > 0 else s


class ResidualAnalyzer:
    """Sound Lipschitz bounds of a residual network, stage by stage (see the module
    docstring for the composition and why it is sound).

    Args: as :class:`~lipbound.analyzer.Analyzer` (``failure_prob`` is the whole network's
    budget, split over its parts).

    Raises:
        UnsupportedModelError: the model is not a chain of stages, or a part is not a chain
            lipbound supports (every problem listed at once).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int] | None = None, *,
                 x0: Tensor | None = None, device: str | torch.device | None = None,
                 spectral: str = "auto", lanczos_steps: int = 64, failure_prob: float = 1e-6,
                 seed: int = 0, name: str | None = None, notes: Sequence[str] = ()):
        with _intake_threads(input_shape, x0):
            self._setup(model, input_shape, x0=x0, device=device, spectral=spectral,
                        lanczos_steps=lanczos_steps, failure_prob=failure_prob, seed=seed,
                        name=name, notes=notes)

    def _setup(self, model: nn.Module, input_shape: Sequence[int] | None = None, *,
               x0: Tensor | None = None, device: str | torch.device | None = None,
               spectral: str = "auto", lanczos_steps: int = 64, failure_prob: float = 1e-6,
               seed: int = 0, name: str | None = None, notes: Sequence[str] = ()):
        st = _settings(model, input_shape, x0, spectral, lanczos_steps, failure_prob, seed,
                       name, notes)  # (the chain Analyzer's checks of the same arguments)
        model = st.model
        self.model = model
        self.input_shape = st.input_shape
        self.failure_prob = st.failure_prob
        self.lanczos_steps = st.lanczos_steps
        self.seed = st.seed
        self.spectral = st.spectral
        self.name = st.name
        mutable = mutable_attributes(model)
        stages = split_stages(model, self.input_shape)
        if stages is None:
            raise UnsupportedModelError([("model", "no residual block",
                                          "no addition of two branches found: analyse a "
                                          "chain with lipbound.Analyzer")])
        self.stages: list[Stage] = stages
        k = 0
        for s in stages:
            if isinstance(s, ChainStage):
                k += 1
            else:
                # (two computations per branch: rows and scaled bound with a ReLU; without,
                # the branch's bound and, in a last block, that of C times it)
                k += sum(2 for b in (s.main, s.shortcut) if b is not None)
        self.n_parts = max(1, k)
        share = self.failure_prob / self.n_parts
        problems: list[tuple[str, str, str]] = []
        found: list[str] = []
        self.parts: list[tuple[Analyzer | None, ...]] = []
        j = 0
        for s in stages:
            subs = [s.module] if isinstance(s, ChainStage) else [s.shortcut, s.main]
            what = ["chain"] if isinstance(s, ChainStage) else ["shortcut", "branch"]
            ans: list[Analyzer | None] = []
            for sub, w in zip(subs, what, strict=True):
                if sub is None:
                    ans.append(None)
                    continue
                j += 1
                try:
                    an = Analyzer(sub, s.in_shape, device=device, spectral=spectral,
                                  lanczos_steps=self.lanczos_steps, failure_prob=share,
                                  seed=self.seed * _SEED_STRIDE + j,
                                  name=f"{self.name} {s.name} {w}")
                except UnsupportedModelError as exc:
                    problems += [(f"{s.name}, {w}: {where}", kind, detail)
                                 for where, kind, detail in exc.nodes]
                    ans.append(None)
                    continue
                found += [n for n in an.notes if n not in found]
                ans.append(an)
            self.parts.append(tuple(ans))
        if problems:
            raise UnsupportedModelError(problems)
        self.notes = tuple(dict.fromkeys((*notes, *found)))
        first = next(a for p in self.parts for a in p if a is not None)
        self.device = first.device
        self.output_shape = stages[-1].out_shape
        self._counters = find_counters(model, self.input_shape, mutable)
        self._tensor_state = tensor_state(model, self._counters)
        self._contents = content_snapshot(model)
        self._global: BoundResult | None = None
        self._small: bool | None = None  # (see _threads)
        self._verify()

    # ------------------------------------------------------------------ helpers
    def _check_model(self) -> None:
        what = changed_tensor(self._tensor_state, self.model, self._counters) \
            or changed_contents(self._contents)
        if what is not None:
            raise InputError(f"the model changed after this analyzer was built ({what}): "
                             "build a new one after changing the model")

    def _stage_forward(self, i: int, x: Tensor) -> Tensor:
        s, p = self.stages[i], self.parts[i]
        if isinstance(s, ChainStage):
            return p[0].forward(x)  # type: ignore[union-attr]
        a = x if p[0] is None else p[0].forward(x)
        b = x if p[1] is None else p[1].forward(x)
        z = a.reshape(x.shape[0], *s.out_shape) + b.reshape(x.shape[0], *s.out_shape)
        return torch.relu(z) if s.relu else z

    def forward(self, x: Tensor) -> Tensor:
        """The network in float64, stage by stage (batched ``(N, *input_shape)``)."""
        self._check_model()
        x = x.to(device=self.device, dtype=torch.float64)
        for i in range(len(self.stages)):
            x = self._stage_forward(i, x)
        return x

    def _verify(self) -> None:
        """The stages must reproduce the model (at a standard-normal input and scaled copies
        of it, as the chain check does, ``±1e3`` both, and at a second, independent
        standard-normal input and its negative: points off one line, so that a unit which
        an in-place change or a misread split hides on that line still shows): guards the
        split into stages."""
        dtype, device = model_dtype_device(self.model)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        x = torch.randn((1, *self.input_shape), generator=gen, dtype=torch.float64)
        x2 = torch.randn((1, *self.input_shape), generator=gen, dtype=torch.float64)
        tol = 1e-3 if dtype != torch.float64 else 1e-8
        points = [(x * c, f"{c:g} times a random input") for c in (1.0, -1.0, 1e-3, 1e3, -1e3)]
        points += [(x2 * c, f"{c:g} times a second random input") for c in (1.0, -1.0)]
        for xc, what in points:
            with torch.no_grad(), exact_float32(device):
                ref = self.model(xc.to(device=device, dtype=dtype)).to(torch.float64).cpu()
                got = self.forward(xc).cpu()
            if not bool(torch.isfinite(ref).all()):
                continue
            err = float((ref.reshape(-1) - got.reshape(-1)).abs().max())
            if not err <= tol * (float(ref.abs().max()) + 1.0):
                hint = (" (a float32 model: its own rounding may exceed the check's float32 "
                        "tolerance; analyse model.double() with float64 inputs)"
                        if dtype == torch.float32 else "")
                raise UnsupportedModelError([("model", "residual stages", f"the stages do not "
                                              f"reproduce the model's output (max error "
                                              f"{err:.3g} at {what})"
                                              f"{hint}")])

    def _threads(self) -> contextlib.AbstractContextManager:
        """One torch thread (the calling thread's own count, restored after) for a local or
        global bound on the CPU of a network whose layers' products are all small (at most
        :data:`lipbound._parallel.MAX_FLOPS`, the size below which the chain's global bound
        already runs layers on one core each). A residual network's local bound is a long
        sequence of such products (ResNet-20 on 32x32: about 3000 convolutions of at most
        2.4 MFlop); split over intra-op threads on a machine whose other core is busy, every
        product waits for the busy core: 11.6 s instead of 0.9 s on one thread
        (benchmarks/README.md, session 26; the global bound then computes its layers one
        after another, not side by side). With :data:`_SINGLE_THREAD` false, or larger
        layers, the thread count is left as it is."""
        if not _SINGLE_THREAD or self.device.type != "cpu":
            return contextlib.nullcontext()
        if self._small is None:
            self._small = all(float(b.apply_flops()) <= _parallel.MAX_FLOPS
                              for p in self.parts for an in p if an is not None
                              for b in an.blocks
                              if isinstance(b, AffineBlock) and b.mixing is not None)
        return torch_single_threaded() if self._small else contextlib.nullcontext()

    def _output_map(self, output_map: Tensor | None) -> Tensor | None:
        if output_map is None:
            return None
        try:
            raw = torch.as_tensor(output_map)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"output_map must be a (m, n_out) matrix (a tensor), got "
                             f"{type(output_map).__name__}") from exc
        check_plain_tensor(raw, "output_map")
        c = raw.to(dtype=torch.float64, device=self.device)
        if c.dim() == 1:
            c = c.unsqueeze(0)
        n_out = math.prod(self.output_shape)
        if c.dim() != 2 or c.shape[1] != n_out or c.shape[0] == 0:
            raise InputError(f"output_map must have shape (m, {n_out}) with m >= 1 for this "
                             f"model's {n_out} outputs, got {tuple(c.shape)}")
        check_finite(c, "output_map", "pass a finite matrix")
        return c

    # ------------------------------------------------------------------ local
    @staticmethod
    def _chain(an: Analyzer, x: Tensor, e: float, dl: float, blocks_key, prefix=None
               ) -> tuple[float, list[SpectralBound], Tensor, float]:
        """A part's local bound relative to the exact nominal input (within ``dl`` of ``x``)
        on the ball of radius ``e``: (factor, its factors, computed output, output's nominal
        error in L2). ``prefix``: ``(k, bounds, state)`` from :meth:`_rows` on the same part
        at the same ``x``, ``e``, ``dl``; when ``blocks`` begin with the same ``k`` blocks
        (:func:`_same_prefix`), the run continues from that state and the factor includes
        those ``k`` bounds, which are not returned again (the caller has them)."""
        key, blocks = blocks_key
        if prefix is not None and _REUSE_PREFIX and _same_prefix(an.blocks, blocks,
                                                                 prefix[0]):
            k, first, state = prefix
            _layers, bounds, state = an._propagate(key, blocks, x, e, nom0=(dl, 0.0),
                                                   resume=(k, state))
            fac = product_up(sb.value for sb in (*first, *bounds))
            return fac, bounds, state[0], an._nominal_total(state[3], state[1])
        _layers, bounds, state = an._propagate(key, blocks, x, e, nom0=(dl, 0.0))
        fac = product_up(sb.value for sb in bounds)
        return fac, bounds, state[0], an._nominal_total(state[3], state[1])

    @staticmethod
    def _rows(an: Analyzer, x: Tensor, e: float, dl: float
              ) -> tuple[Tensor, Tensor, Tensor, list[SpectralBound], tuple | None]:
        """Per output unit ``i`` of a branch: a bound ``ℓ_i`` on the local constant of ``x ->
        F_i(x)`` relative to the exact nominal input, the computed ``F̂_i`` and a bound on
        ``|F̂_i - F_i(p*)|`` (as :meth:`Analyzer.local_bound_rows` with ``C = I``, with all row
        norms of the last layer in one pass). A branch that does not end in an affine layer:
        every row is bounded by the whole branch's bound and nominal error. The last item:
        ``(k, bounds, state)`` of the run over the first ``k`` blocks (``None`` without one),
        from which :meth:`_chain` continues the branch's scaled bound."""
        blocks = an.blocks
        last = blocks[-1] if blocks else None
        if not isinstance(last, AffineBlock) or last.relu:
            fac, bounds, y, tot = ResidualAnalyzer._chain(an, x, e, dl, ("", blocks))
            y = y.reshape(-1)
            return (torch.full_like(y, fac), y, torch.full_like(y, tot), bounds, None)
        _l, bounds, state = an._propagate("", blocks, x, e, stop_before_last=True,
                                          nom0=(dl, 0.0))
        xl, d, _ek, nom = state
        prefix = product_up(sb.value for sb in bounds)
        rn = torch.sqrt(last.sq_rows(d.unsqueeze(0))[0].clamp_min(0))
        rn = torch.where(torch.isnan(rn), math.inf, rn)
        err = last.err_rows(d)
        if err is not None:
            rn = rn + err
        rn = rn * ((1 + SAFETY) * last.fold_factor)
        y0, rho = last.forward_rounding(xl)
        dl2, eta = nom
        nominal = (rn * dl2 if dl2 > 0 else 0.0) + rho.reshape(-1) + 2 * UNDERFLOW
        if eta > 0:
            nominal = nominal + last.row_abs().to(nominal.device) * eta
        nominal = nominal * (1 + 1e-6)
        values = rn * (prefix * (1 + 4 * _U)) if prefix > 0 else torch.zeros_like(rn)
        values = torch.where(rn == 0, 0.0, values)
        low = (values < MIN_NORMAL) & (rn > 0)
        if prefix > 0 and bool(low.any()):
            for j in torch.nonzero(low).reshape(-1).tolist():
                values[j] = product_up((float(rn[j]), prefix))
        return values, y0.reshape(-1), nominal, bounds, (len(blocks) - 1, bounds, state)

    def _block(self, i: int, x: Tensor, e: float, dl: float, c: Tensor | None
               ) -> tuple[float, list[SpectralBound], Tensor, float, str]:
        """One block's local factor (see the module docstring): (factor, the factors used,
        computed output, its nominal error, a note with the two branches' factors)."""
        s: BlockStage = self.stages[i]  # type: ignore[assignment]
        parts = self.parts[i]
        bounds: list[SpectralBound] = []
        n = math.prod(s.out_shape)
        z = torch.zeros(n, dtype=torch.float64, device=self.device)
        ez = torch.zeros_like(z)
        facs: list[float] = []
        if not s.relu:
            y_parts = []
            for an in parts:
                if an is None:
                    fac = 1.0 if c is None else exact_norm(c)
                    y, ed = x.reshape(-1), torch.full_like(z, dl)
                else:
                    key = an._blocks_for(c) if c is not None else ("", an.blocks)
                    fac, bs, y, tot = self._chain(an, x, e, dl, ("", an.blocks))
                    if c is not None:  # (the map's bound; the values are those of the branch)
                        fac, bs2, _y, _t = self._chain(an, x, e, dl, key)
                        bs = bs + bs2
                    y, ed = y.reshape(-1), torch.full_like(z, tot)
                    bounds += bs
                facs.append(fac)
                y_parts.append((y, ed))
            z = y_parts[0][0] + y_parts[1][0]
            ez = (y_parts[0][1] + y_parts[1][1] + 2 * _U * z.abs()) * (1 + 1e-6)
            x_next = z.reshape(1, *s.out_shape)
            return (_sum_up(*facs), bounds, x_next, norm_up(ez) * (1 + 1e-6),
                    self._note(s, facs))
        # with ReLU: the pre-activations' limits from the branches' rows
        rows = torch.zeros_like(z)
        prefixes: list[tuple | None] = []
        for an in parts:
            if an is None:
                v, y, ed = torch.ones_like(z), x.reshape(-1), torch.full_like(z, dl)
                prefixes.append(None)
            else:
                v, y, ed, bs, pre = self._rows(an, x, e, dl)
                bounds += bs
                prefixes.append(pre)
            rows = rows + v
            z = z + y
            ez = ez + ed
        ez = (ez + 2 * _U * z.abs()) * (1 + 1e-6) + 2 * UNDERFLOW
        rows = rows * (1 + 4 * _U)
        r, _on, _may = _relu_slopes(z, ez, rows, e, rows > 0)
        r = torch.where((r > 0) & (r < _MIN_SLOPE), _MIN_SLOPE, r)
        for an, pre in zip(parts, prefixes, strict=True):
            if an is None:
                fac = float(r.max())
            else:
                # (the branch's first layers: the rows' factors, same operators)
                fac, bs, _y, _t = self._chain(an, x, e, dl, an._blocks_for_scale(r), pre)
                bounds += bs
            facs.append(fac)
        total = _sum_up(*facs)
        note = self._note(s, facs)
        if c is not None:
            # an output map after the ReLU: ||C Λ Δz|| <= ||C D|| ||R Δz|| (Λ the actual
            # slopes, 0 <= Λ <= R; D the units with r > 0). Not ||C R Δz||: C R may cancel
            # what Λ keeps (review, session 26: C = [1, 1] after units of slopes 1 and 0.5
            # on S = (1, -1) gave a certified 0.5 for a secant of 1)
            cn = exact_norm(c * (r > 0).to(c.dtype).unsqueeze(0))
            total = product_up((total, cn))
            note += f", times ||C D|| {g_up(cn, 6)}"
        x_next = torch.relu(z).reshape(1, *s.out_shape)
        dl_next = norm_up(torch.where(z + ez >= 0, ez, 0.0)) * (1 + 1e-6)
        return total, bounds, x_next, dl_next, note

    @staticmethod
    def _note(s: BlockStage, facs: list[float]) -> str:
        names = ("identity shortcut" if s.shortcut is None else "shortcut",
                 "identity" if s.main is None else "residual branch")
        act = "R " if s.relu else ""
        terms = " + ".join(f"{act}{n} {g_up(f, 6)}" for n, f in zip(names, facs, strict=True))
        return f"{s.name}: {terms}" + (" (R: the secant slopes of its ReLU)" if s.relu else "")

    def _local(self, x0: Tensor, eps: float, c: Tensor | None
               ) -> tuple[float, list[SpectralBound], list[LayerFactor], list[str], float,
                          Tensor]:
        """The composed local bound at a checked ``x0``: (value, every factor used, one
        layer entry per stage, the blocks' notes, the output's nominal error in L2, the
        computed output that error refers to, flat). (The error bounds *this* computation's
        output: another float64 forward pass, such as :meth:`forward`'s, rounds differently.)"""
        with torch.inference_mode():
            x = x0.to(device=self.device, dtype=torch.float64)
            dl, e = 0.0, eps
            layers: list[LayerFactor] = []
            all_bounds: list[SpectralBound] = []
            facs: list[float] = []
            notes: list[str] = []
            for i, (s, p) in enumerate(zip(self.stages, self.parts, strict=True)):
                cm = c if i == len(self.stages) - 1 else None
                if isinstance(s, ChainStage):
                    an = p[0]
                    key = an._blocks_for(cm) if cm is not None else ("", an.blocks)
                    fac, bounds, x, dl = self._chain(an, x, e, dl, key)
                    kind = "chain"
                else:
                    fac, bounds, x, dl, note = self._block(i, x, e, dl, cm)
                    notes.append(note)
                    kind = "residual-block" + ("-relu" if s.relu else "")
                g, fp = _guarantee(bounds)
                layers.append(LayerFactor(i, s.name, kind, fac, math.nan, e, g, fp,
                                          ",".join(sorted({b.method for b in bounds})),
                                          math.prod(s.in_shape), math.prod(s.out_shape)))
                all_bounds += bounds
                facs.append(fac)
                e = product_up((e, fac))
        return product_up(facs), all_bounds, layers, notes, dl, x.reshape(-1)

    def local_bound(self, x0: Tensor, eps: float, *, output_map: Tensor | None = None,
                    progress: bool = False, tight: bool = False,
                    tight_rows: int | None = None) -> BoundResult:
        """Upper bound on ``sup ||C (f(x) - f(x0))|| / ||x - x0||`` over ``0 < ||x - x0|| <=
        eps`` (``C``: ``output_map`` or the identity), the product of the stages' factors.

        ``tight=True`` is refused (the centre-plus-deviation bound takes chains only);
        ``progress`` is accepted and shows nothing."""
        t0 = time.perf_counter()
        check_bool(progress, "progress")
        check_tight(tight, tight_rows)
        if tight:
            raise InputError("tight=True is not available for residual networks (the tight "
                             "bound takes chains only); use tight=False: the paper's bound "
                             "composed over the residual blocks")
        self._check_model()
        eps = check_eps(eps)
        x0 = check_input(x0, self.input_shape)
        c = self._output_map(output_map)
        with self._threads():
            value, all_bounds, layers, notes, dl, _y = self._local(x0, eps, c)
        g, fp = _guarantee(all_bounds)
        nominal = dl if c is None else math.nan
        source = "product"
        glob = self._global if c is None else None
        out_notes = [*self.notes, f"residual network: {len(self.stages)} stages composed "
                     "(chain segments' local bounds, and per block the two branches' bounds "
                     "after the block's ReLU slopes, added)", *notes]
        if glob is not None and glob.value < value and (
                glob.guarantee == Guarantee.CERTIFIED or g != Guarantee.CERTIFIED):
            out_notes.append("the global bound was smaller than the composed local bound and "
                             "is reported instead")
            fp = 0.0 if glob.guarantee == Guarantee.CERTIFIED else min(1.0,
                                                                       fp + glob.failure_prob)
            value, g, source, nominal = glob.value, glob.guarantee, "global", math.nan
        return BoundResult(value=value, guarantee=g, method="local-residual",
                           quantity=LOCAL_QUANTITY, eps=eps, seconds=time.perf_counter() - t0,
                           layers=tuple(layers), failure_prob=fp, model=self.name,
                           notes=tuple(out_notes), nominal_error=nominal, source=source)

    def nominal_error(self, x0: Tensor) -> tuple[Tensor, float, Guarantee, float]:
        """The float64 output at ``x0`` (flat) and a bound on its L2 distance from the exact
        network's output there (the composition's nominal error, carried across the stages,
        :meth:`_local` at a tiny radius), with that bound's guarantee and failure probability:
        what :func:`lipbound.radius.exact_class_change` needs (as
        :meth:`lipbound.analyzer.Analyzer.nominal_error`)."""
        self._check_model()
        x0 = check_input(x0, self.input_shape)
        tiny = 1e-8 * (1.0 + float(x0.double().norm()))
        _v, bounds, _l, _n, delta, y = self._local(x0, tiny, None)
        g, fp = _guarantee(bounds)
        return y, delta, g, fp

    # ------------------------------------------------------------------ global
    def global_bound(self, *, output_map: Tensor | None = None,
                     progress: bool = False) -> BoundResult:
        """The product of the stages' global constants; a block's is ``G(S) + G(F)``."""
        t0 = time.perf_counter()
        check_bool(progress, "progress")
        self._check_model()
        c = self._output_map(output_map)
        if c is None and self._global is not None:
            return self._global
        with self._threads():
            return self._global_bound(c, t0)

    def _global_bound(self, c: Tensor | None, t0: float) -> BoundResult:
        layers: list[LayerFactor] = []
        facs: list[float] = []
        gs: list[Guarantee] = []
        fp = 0.0
        for i, (s, p) in enumerate(zip(self.stages, self.parts, strict=True)):
            cm = c if i == len(self.stages) - 1 else None
            if isinstance(s, ChainStage):
                r = p[0].global_bound(output_map=cm)  # type: ignore[union-attr]
                fac, g, f = r.value, r.guarantee, r.failure_prob
            else:
                vals, g_parts, f = [], [], 0.0
                inner = cm if (cm is not None and not s.relu) else None
                for an in p:
                    if an is None:
                        vals.append(exact_norm(inner) if inner is not None else 1.0)
                        continue
                    r = an.global_bound(output_map=inner)
                    vals.append(r.value)
                    g_parts.append(r.guarantee)
                    f += r.failure_prob
                fac = _sum_up(*vals)
                if cm is not None and s.relu:
                    fac = product_up((fac, exact_norm(cm)))
                g = combine_guarantees(g_parts) if g_parts else Guarantee.CERTIFIED
            layers.append(LayerFactor(i, s.name, "chain" if isinstance(s, ChainStage)
                                      else "residual-block", math.nan, fac, math.nan, g, f))
            facs.append(fac)
            gs.append(g)
            fp += f
        g = combine_guarantees(gs)
        fp = 0.0 if g == Guarantee.CERTIFIED else min(1.0, fp)
        res = BoundResult(value=product_up(facs), guarantee=g, method="global-residual",
                          quantity=GLOBAL_QUANTITY, eps=None,
                          seconds=time.perf_counter() - t0, layers=tuple(layers),
                          failure_prob=fp, model=self.name,
                          notes=(*self.notes, f"residual network: {len(self.stages)} stages; "
                                 "a block's global constant is G(S) + G(F)"),
                          source="global")
        if c is None:
            self._global = res
        return res


def certified_radius(model: nn.Module | ResidualAnalyzer, x0: Tensor, *, tol: float = 1e-3,
                     max_evaluations: int = 40, device: str | torch.device | None = None,
                     **analyzer_kwargs) -> RadiusResult:
    """Certified L2 radius of a residual network around ``x0`` by the margin test (Avant &
    Morgansen 2023, "adversarial radius", per rival as in
    :func:`lipbound.radius.certified_radius`'s ``"margin"``): for each rival ``j`` of the top
    class ``c``, ``g_j = (e_c - e_j)^T f`` stays positive on the ball if ``eps L_j(eps) <
    δ_j``, with ``L_j`` the composed local bound of ``g_j`` (:meth:`ResidualAnalyzer.
    local_bound` with that output row) and ``δ_j`` the exact margin at the exact ``x0``,
    bounded below by the computed one minus ``sqrt(2) Δ`` (``Δ`` the composed nominal error of
    the float64 output) and its rounding. Every ``eps`` that passes is certified, whatever
    the search; the largest one found is reported (bracketing by doubling or halving, then
    bisection in ``log eps`` until the failing ``eps`` is within ``1 + tol``). Its failure
    probability is the sum over every bound computed (a union bound: the search chose which
    ones).

    Args:
        model: the network (eval mode) or a :class:`ResidualAnalyzer`.
        x0: the input, shape ``(1, *input_shape)``.
        tol: relative tolerance of the search (> 0).
        max_evaluations: most radii tested.
        device: as for :class:`ResidualAnalyzer`; ``**analyzer_kwargs`` likewise (not with
            an analyzer).
    """
    from .radius import RadiusResult

    t0 = time.perf_counter()
    if isinstance(model, ResidualAnalyzer):
        if analyzer_kwargs or device is not None:
            raise InputError("options given with a ResidualAnalyzer: it has its own; build "
                             "the analyzer with them, or leave them out")
        ra = model
    else:
        ra = ResidualAnalyzer(model, x0=check_example_input(x0), device=device,
                              **analyzer_kwargs)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive number, got {tol!r}")
    max_evaluations = check_int(max_evaluations, "max_evaluations", 2)
    ra._check_model()
    x0 = check_input(x0, ra.input_shape)
    n = math.prod(ra.output_shape)
    if n < 2:
        raise InputError("a certified radius needs at least two class scores")
    used: list[SpectralBound] = []
    evaluations: list[list] = []
    scale = 1.0 + float(x0.double().norm())
    # the margins from the computed output whose distance from the exact one the composition
    # bounds (delta): not from another forward pass (forward's), which rounds differently
    with ra._threads():
        first, bs, _l, _n, delta, y = ra._local(x0, 1e-8 * scale, None)
    y = y.cpu()
    used += bs
    c = int(y.argmax())
    rivals = [j for j in range(n) if j != c]
    order = sorted(rivals, key=lambda j: float(y[c] - y[j]))  # the closest rival first

    # the exact margins, bounded below: the computed difference (rounded once: 2^-52 of it)
    # minus the rows' nominal error ||e_c - e_j|| Δ = sqrt(2) Δ, with margins for this
    # arithmetic
    rhs = {j: (float(y[c] - y[j]) * (1 - 2.0 ** -52) - math.sqrt(2) * delta * (1 + 2.0 ** -50))
           * (1 - 2.0 ** -50) for j in rivals}
    runner = order[0]
    margin = float(y[c] - y[runner])

    def result(radius: float, upper: float | None, reason: str | None = None) -> RadiusResult:
        g, fp = _guarantee(used)
        details: dict = {"evaluations": evaluations, "nominal_error": delta}
        if reason:
            details["reason"] = reason
        return RadiusResult(
            method="margin", radius=radius,
            guarantee=Guarantee.CERTIFIED_LOWER if g == Guarantee.CERTIFIED
            else Guarantee.PROBABILISTIC_LOWER, predicted_class=c, margin=margin, tol=tol,
            n_bound_evaluations=len(evaluations) + 1, seconds=time.perf_counter() - t0,
            failure_prob=fp if g != Guarantee.CERTIFIED else 0.0, runner_up=runner,
            upper=upper, model=ra.name,
            notes=(*ra.notes, "residual network: margin test with the composed local bound "
                   "of each rival's margin row"), details=details)

    if min(rhs.values()) <= 0:
        return result(0.0, None, "the margin at x0 is within the float64 forward pass's "
                      "rounding (or the classes tie): nothing can be certified")

    def passes(eps: float) -> bool:
        for j in order:
            m = torch.zeros(1, n, dtype=torch.float64)
            m[0, c], m[0, j] = 1.0, -1.0
            with ra._threads():
                lj, bs, _l, _n, _d, _y = ra._local(x0, eps, m.to(ra.device))
            used.extend(bs)
            ok = product_up((eps, lj)) < rhs[j]
            if not ok:
                evaluations.append([eps, j, False])
                return False
        evaluations.append([eps, None, True])
        return True

    lo, hi = 0.0, None
    eps = min(rhs.values()) / (math.sqrt(2) * first) if first > 0 else scale
    if not (math.isfinite(eps) and eps > 0):
        eps = scale
    while len(evaluations) < max_evaluations:
        if passes(eps):
            lo = eps
            eps = eps * 2 if hi is None else math.sqrt(eps * hi)
        else:
            hi = eps
            eps = eps / 4 if lo == 0.0 else math.sqrt(lo * eps)
        if hi is not None and lo > 0 and hi <= lo * (1 + tol):
            break
    return result(lo, hi, None if lo > 0 else "no radius passed the test within "
                  "max_evaluations")


def _intake_threads(input_shape, x0) -> contextlib.AbstractContextManager:
    """One torch thread for the intake of a network with a small input (:data:`_SMALL_INPUT`;
    the arguments as given, unchecked: anything unreadable leaves the count as it is, and the
    intake reports it)."""
    if not _SINGLE_THREAD:
        return contextlib.nullcontext()
    try:
        if input_shape is not None:
            n = math.prod(int(v) for v in input_shape)
        elif isinstance(x0, Tensor):
            n = x0[0].numel() if x0.dim() > 1 else x0.numel()
        else:
            return contextlib.nullcontext()
    except (TypeError, ValueError, IndexError, RuntimeError):
        return contextlib.nullcontext()
    return torch_single_threaded() if 0 < n <= _SMALL_INPUT else contextlib.nullcontext()


def _same_prefix(blocks: list, other: list, k: int) -> bool:
    """Whether ``other`` (a variant of ``blocks`` with a map or scale after the network, as
    :meth:`Analyzer._blocks_for` / :meth:`Analyzer._blocks_for_scale` build it) begins with
    the first ``k`` blocks of ``blocks``: the same layers (op objects), the same ReLUs, and
    something after them in both (the variant's map folded into its later blocks)."""
    if not 0 <= k < min(len(blocks), len(other)):
        return False
    for a, b in zip(blocks[:k], other[:k], strict=True):
        if type(a) is not type(b) or a.relu != b.relu:
            return False
        if isinstance(a, AffineBlock):
            if len(a.ops) != len(b.ops) or any(p is not q for p, q in zip(a.ops, b.ops,
                                                                          strict=True)):
                return False
        elif getattr(a, "op", None) is not getattr(b, "op", None):
            return False
    return True


def _guarantee(bounds: list[SpectralBound]) -> tuple[Guarantee, float]:
    g = combine_guarantees([b.guarantee for b in bounds]) if bounds else Guarantee.CERTIFIED
    return g, 0.0 if g == Guarantee.CERTIFIED else min(1.0, sum(b.failure_prob
                                                                for b in bounds))


def residual_analyzer(model: nn.Module, x0_or_shape, exc: UnsupportedModelError,
                      device, **kw) -> ResidualAnalyzer | None:
    """The :class:`ResidualAnalyzer` of ``model`` when the chain analyzer refused it as a
    residual network it splits into stages (``exc.residual``, set from
    :func:`lipbound.residual_graph.residual_note`), else ``None``."""
    if not getattr(exc, "residual", False):
        return None
    if isinstance(x0_or_shape, Tensor):
        x0 = check_example_input(x0_or_shape)
        shape = tuple(x0.shape[1:]) if x0.dim() > 1 and x0.shape[0] == 1 else tuple(x0.shape)
    else:
        shape = check_input_shape(x0_or_shape, "x0_or_input_shape")
    return ResidualAnalyzer(model, shape, device=device, **kw)


__all__ = ["ResidualAnalyzer", "certified_radius", "residual_analyzer"]
