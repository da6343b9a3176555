"""Common contract of the L2 minimal-perturbation attacks.

An attack looks for the *smallest* L2 perturbation ``delta`` such that the classifier's
predicted class at ``x0 + delta`` differs from the class at ``x0``. Whatever an attack's
inner workings, the number it reports is checked here, in one place:

* :class:`Attack.__call__` validates the model and the input once (eval mode, finite
  ``x0`` with a batch dimension of 1, a ``(1, n_classes)`` score output with at least two
  classes, valid ``bounds``), computes the original class, and calls the subclass's
  :meth:`Attack.run`, which only proposes candidate points;
* every candidate is then re-checked with a *fresh* forward pass: it must be finite, lie in
  the box when ``bounds`` are given, and some class must score strictly higher than the
  original class (a tie is not a class change); for a model that does not compute in
  float64, a float64 forward pass of its own weights must confirm that class change too
  (a point within float32 rounding of the boundary can change the float32 model's class
  while the network in exact arithmetic, the one certified radii are about, keeps it);
  only when no candidate passes it is a point confirmed in the model's dtype alone
  returned, with ``details["class_change_in_float64"] = False``;
* the radius of the smallest verified candidate is recomputed in float64 from the returned
  tensor, ``||x_adv - x0||_2``, and rounded up by a bound on the rounding of that norm, so it
  is never below the exact distance (a certified radius compared with it must not see a
  distance smaller than the true one).

So ``AttackResult.radius`` is the L2 size of a concrete, verified class-changing
perturbation: an upper bound on the minimal adversarial perturbation
(:attr:`lipbound.results.Guarantee.ATTACK`), never a certificate.

Conventions: the distance is the Euclidean (L2) norm over all input coordinates, measured
in the model's own input space (for the paper's networks: the normalised space, with no
pixel clipping unless ``bounds`` are given). Forward passes run in the model's dtype
(usually float32) on the model's device, the float64 confirmation on a float64 copy of the
model; reported radii are float64.

Training mode: an attack on a model in training mode raises :class:`InputError`, because
dropout makes the class of a point random and batch-norm layers would update their running
statistics (i.e. the attack would modify the model). Call ``model.eval()`` first.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lipbound._modelinfo import (
    guard_input_writes,
    model_device,
    model_dtype_device,
    unwrap_model,
    wrapper_problem,
)
from lipbound._precision import exact_float32
from lipbound.errors import InputError
from lipbound.graph import (
    check_finite_parameters,
    check_inference_tensors,
    modules_in_training,
)
from lipbound.lower._common import check_input_gradients, float64_model
from lipbound.ops.base import safe_norm
from lipbound.results import Guarantee, _jsonable
from lipbound.validation import check_finite, check_plain_tensor, check_seed

logger = logging.getLogger(__name__)

Bounds = tuple[float | Tensor, float | Tensor]
LossName = Literal["margin", "ce"]

#: largest number of points sent through the model in one forward pass
CHUNK = 64


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one attack on one input.

    Attributes:
        method: the attack's registry name (``"fgsm"``, ``"cw"``, ...).
        success: whether a verified class-changing point was found.
        radius: ``||x_adv - x0||_2`` recomputed in float64 from ``x_adv`` and rounded up (at
            least the exact distance, larger by at most ``(d + 5) 2^-52`` relative, plus
            ``2^-1072`` for a subnormal distance);
            ``None`` on failure. An upper bound on the minimal adversarial L2 perturbation.
        x_adv: the verified adversarial input, shape ``(1, *input_shape)``, in the model's
            dtype and on the model's device; ``None`` on failure.
        original_class: the class predicted at ``x0``.
        adversarial_class: the class predicted at ``x_adv`` (``None`` on failure).
        seconds: wall-clock time, checks and verification included.
        guarantee: always :attr:`Guarantee.ATTACK`.
        details: method-specific facts (chosen step sizes, iterations, model calls, ...);
            on success ``"class_change_in_float64"``: ``True`` when float64 forward passes
            of the model's weights confirmed the class change as well (the class at
            ``x_adv`` differs from the float64 class at ``x0`` as given; always ``True``
            for a float64 model), ``False`` when no point the attack found is confirmed so
            (float32 rounding at the boundary, or a float64 ``x0`` whose rounding to the
            model's dtype has another class: the network in exact arithmetic may keep its
            class there), ``None`` when the model cannot be run in float64.
    """

    method: str
    success: bool
    radius: float | None
    x_adv: Tensor | None
    original_class: int
    adversarial_class: int | None
    seconds: float
    guarantee: Guarantee = Guarantee.ATTACK
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of everything except the ``x_adv`` tensor."""
        return _jsonable({
            "method": self.method,
            "success": self.success,
            "radius": self.radius,
            "original_class": self.original_class,
            "adversarial_class": self.adversarial_class,
            "seconds": self.seconds,
            "guarantee": self.guarantee,
            "norm": "l2",
            "details": self.details,
        })


class AttackContext:
    """What a running attack sees: the model, ``x0``, its class, the box and the RNG.

    Built by :meth:`Attack.__call__` after validation; subclasses use its helpers so that
    every forward pass is batched, gradient-only-on-the-input and counted.

    Attributes:
        model: the classifier (eval mode).
        x0: the nominal input, shape ``(1, *input_shape)``, model dtype and device.
        label: the class predicted at ``x0``.
        n_classes: number of output classes.
        lo, hi: box bounds as tensors broadcastable to ``x0`` (``None`` without a box).
        generator: seeded random generator on the model's device.
        calls: number of batched model evaluations so far (forward or forward+backward).
    """

    def __init__(self, model: nn.Module, x0: Tensor, label: int, n_classes: int,
                 lo: Tensor | None, hi: Tensor | None, generator: torch.Generator):
        self.model = model
        self.x0 = x0
        self.label = label
        self.n_classes = n_classes
        self.lo = lo
        self.hi = hi
        self.generator = generator
        self.calls = 0
        self.shape = tuple(x0.shape[1:])
        self.dim = int(x0[0].numel())

    # -- geometry ---------------------------------------------------------------------
    def clip(self, x: Tensor) -> Tensor:
        """Clamp a batch into the box (identity without ``bounds``)."""
        if self.lo is None or self.hi is None:
            return x
        return torch.maximum(torch.minimum(x, self.hi), self.lo)

    @staticmethod
    def norms(v: Tensor) -> Tensor:
        """Per-sample L2 norms of a batch, shape ``(B,)``."""
        return v.flatten(1).norm(dim=1)

    @staticmethod
    def bview(t: Tensor, like: Tensor) -> Tensor:
        """Reshape a per-sample vector ``(B,)`` to broadcast against a batch ``like``."""
        return t.reshape(-1, *([1] * (like.dim() - 1)))

    def normalize(self, g: Tensor) -> Tensor:
        """Per-sample unit-L2 directions; samples with a zero or non-finite norm give 0.

        The vector is first divided by its largest entry, so that subnormal or huge
        gradients normalise without underflow or overflow.
        """
        flat = g.flatten(1)
        big = flat.abs().amax(dim=1)
        ok = torch.isfinite(big) & (big > 0)
        safe = torch.where(ok, big, torch.ones_like(big))
        g1 = g / self.bview(safe, g)
        n = self.norms(g1)
        ok &= torch.isfinite(n) & (n > 0)
        scale = torch.where(ok, 1.0 / torch.where(ok, n, torch.ones_like(n)), torch.zeros_like(n))
        return torch.where(self.bview(ok, g), g1 * self.bview(scale, g), torch.zeros_like(g))

    def project_ball(self, x: Tensor, eps: Tensor) -> Tensor:
        """Project each sample onto the L2 ball of radius ``eps[i]`` around ``x0``, then the box.

        Clamping after the ball projection keeps the point in the ball, because ``x0`` lies in
        the box, so clamping only moves coordinates towards ``x0``.
        """
        d = x - self.x0
        n = self.norms(d)
        factor = torch.clamp(eps / torch.clamp(n, min=torch.finfo(n.dtype).tiny), max=1.0)
        return self.clip(self.x0 + d * self.bview(factor, d))

    # -- model evaluations ----------------------------------------------------------
    def margin(self, z: Tensor) -> Tensor:
        """``z_c - max_{j != c} z_j`` per sample; negative exactly when the class changed."""
        other = z.clone()
        other[:, self.label] = -torch.inf
        return z[:, self.label] - other.max(dim=1).values

    def is_adv(self, z: Tensor) -> Tensor:
        """Boolean ``(B,)``: finite scores and some class strictly above the original class."""
        return torch.isfinite(z).all(dim=1) & (self.margin(z) < 0)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Scores of a batch, without gradients, in chunks of :data:`CHUNK`."""
        outs = []
        for i in range(0, x.shape[0], CHUNK):
            self.calls += 1
            outs.append(self.model(x[i:i + CHUNK]))
        return torch.cat(outs)

    def loss_grad(self, x: Tensor, loss: LossName | Tensor = "margin",
                  target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scores and the per-sample ascent direction of the loss, w.r.t. the input.

        ``loss="margin"``: the gradient of ``-(z_c - max_{j!=c} z_j)``. ``loss="ce"``: the
        direction of the gradient of the cross-entropy w.r.t. the original class ``c``
        (Goodfellow et al.'s choice), computed as ``sum_{j!=c} q_j (grad z_j - grad z_c)``
        with ``q_j = p_j / max_{k!=c} p_k`` (``p`` the softmax). This equals the
        cross-entropy gradient up to a positive factor, but stays accurate for confident
        predictions, where the usual ``softmax - onehot`` form has ``p_c`` rounded to 1 and
        loses the ``grad z_c`` term entirely. A boolean tensor ``(B,)`` selects the
        cross-entropy where true and the margin elsewhere. ``target`` (a ``(B,)`` integer
        tensor) replaces the loss by the targeted margin ``z_t - z_c`` wherever its entry
        ``t`` is ``>= 0``. Callers use directions only
        (they normalise), never the magnitude. Only the input requires a gradient; the
        model's parameters are untouched.

        Returns:
            ``(z, g)`` with ``z`` of shape ``(B, n_classes)`` (detached) and ``g`` like ``x``.
        """
        if isinstance(loss, Tensor):
            use_ce = loss.to(device=x.device, dtype=torch.bool).reshape(-1)
        else:
            use_ce = torch.full((x.shape[0],), loss == "ce", dtype=torch.bool, device=x.device)
        zs, gs = [], []
        for i in range(0, x.shape[0], CHUNK):
            xi = x[i:i + CHUNK].detach().requires_grad_(True)
            ce_i = use_ce[i:i + CHUNK]
            with torch.enable_grad():
                self.calls += 1
                z = self.model(xi)
                obj = -self.margin(z)
                if bool(ce_i.any()):
                    with torch.no_grad():
                        logp = torch.log_softmax(z, dim=1)
                        logp[:, self.label] = -torch.inf
                        q = torch.exp(logp - logp.amax(dim=1, keepdim=True))
                    ce = (q * (z - z[:, self.label:self.label + 1])).sum(dim=1)
                    obj = torch.where(ce_i, ce, obj)
                if target is not None:
                    t_i = target[i:i + CHUNK].to(z.device)
                    zt = z.gather(1, t_i.clamp(min=0).reshape(-1, 1))[:, 0]
                    obj = torch.where(t_i >= 0, zt - z[:, self.label], obj)
                (g,) = torch.autograd.grad(obj.sum(), xi)
            zs.append(z.detach())
            gs.append(g.detach())
        return torch.cat(zs), torch.cat(gs)

    def linear_estimate(self) -> float:
        """First-order distance to the decision boundary, ``m(x0) / ||grad m(x0)||``.

        Used as the natural length scale for step sizes (no per-network constants). Falls
        back to ``1e-3 * max(||x0||, 1)`` when the margin gradient vanishes.
        """
        z, g = self.loss_grad(self.x0, "margin")
        m = float(self.margin(z)[0])
        gn = float(self.norms(g)[0])
        if gn > 0 and math.isfinite(gn) and m > 0:
            return m / gn
        return 1e-3 * max(float(self.x0.norm()), 1.0)

    def class_estimates(self, candidates: int = 10) -> tuple[list[int], list[float]]:
        """First-order distances ``(z_c - z_j) / ||grad (z_c - z_j)||`` at ``x0`` to the
        boundaries of the ``candidates`` highest-scoring other classes ``j`` (DeepFool's
        linearisation), in increasing order. One batched backward pass."""
        z0 = self.logits(self.x0)[0]
        order = [j for j in torch.argsort(z0, descending=True).tolist() if j != self.label]
        cls = order[:max(1, candidates)]
        t = torch.tensor(cls, device=self.x0.device)
        z, g = self.loss_grad(self.x0.expand(len(cls), *self.shape), "margin", target=t)
        gap = (z[:, self.label] - z.gather(1, t.reshape(-1, 1))[:, 0]).to(torch.float64)
        n = self.norms(g.to(torch.float64))
        est = torch.where(n > 0, gap / torch.where(n > 0, n, torch.ones_like(n)),
                          torch.full_like(n, math.inf))
        pairs = sorted(zip(est.tolist(), cls, strict=True))
        return [c for _, c in pairs], [e for e, _ in pairs]

    # -- line searches ----------------------------------------------------------------
    def search_path(self, path: Callable[[Tensor], Tensor], t_lo: float, t_hi: float, *,
                    points: int = 15, rounds: int = 4) -> tuple[Tensor, float] | None:
        """Smallest ``t`` in ``(t_lo, t_hi]`` at which ``path(t)`` is adversarial (to grid
        resolution), by multisection: each round evaluates ``points`` interior values of the
        current bracket in one batch and keeps the bracket around the *first* adversarial
        point (so a flip region earlier on the path is not skipped as plain bisection
        could).

        Args:
            path: maps a vector of ``t`` values ``(K,)`` to a batch of points ``(K, *shape)``.
            t_lo: a value whose point is taken as not adversarial (e.g. 0 for ``x0``).
            t_hi: a value whose point is adversarial (checked here first, alone: a point
                that a batched forward pass found adversarial can sit within rounding of
                the boundary and keep its class alone; then the first of ``t_hi (1 + f)``,
                ``f`` = 1e-6 ... 1e-3, that is adversarial alone replaces it).

        Returns:
            ``(points, t)`` for the smallest adversarial ``t`` found, or ``None`` if
            neither ``path(t_hi)`` nor those points a little farther are adversarial.
            ``points[0]`` is ``path(t)``; it is followed by up to four points a relative
            1e-6 ... 1e-3 farther along the path, as fallbacks for the final single-sample
            verification.
        """
        dev = self.x0.device
        p_hi = None
        for f in (0.0, 1e-6, 1e-5, 1e-4, 1e-3):
            if f and not t_hi > 0:
                break
            p = path(torch.tensor([t_hi * (1 + f)], dtype=torch.float64, device=dev))
            if bool(self.is_adv(self.logits(p))[0]):
                p_hi, t_hi = p, t_hi * (1 + f)
                break
        if p_hi is None:
            return None
        lo, hi = t_lo, t_hi
        for _ in range(rounds):
            ts = torch.linspace(lo, hi, points + 2, dtype=torch.float64, device=dev)[1:-1]
            pts = path(ts)
            adv = self.is_adv(self.logits(pts))
            if bool(adv.any()):
                i = int(torch.nonzero(adv)[0, 0])
                hi_new = float(ts[i])
                lo = float(ts[i - 1]) if i > 0 else lo
                hi, p_hi = hi_new, pts[i:i + 1]
            else:
                lo = float(ts[-1])
        if hi < t_hi:
            # a short ladder just above the boundary point: if rounding makes the point
            # itself fail verification on its own, a slightly larger one still passes
            ladder = torch.tensor([hi * (1 + f) for f in (1e-6, 1e-5, 1e-4, 1e-3)],
                                  dtype=torch.float64, device=dev)
            ladder = ladder[ladder < t_hi]
            if ladder.numel():
                p_hi = torch.cat([p_hi, path(ladder)])
        return p_hi, hi

    def segment(self, a: Tensor, b: Tensor) -> Callable[[Tensor], Tensor]:
        """Path ``t -> clip(a + t (b - a))`` for use with :meth:`search_path`."""
        d = b - a

        def path(t: Tensor) -> Tensor:
            t = t.to(a.dtype).reshape(-1, *([1] * (a.dim() - 1)))
            return self.clip(a + t * d)

        return path

    def shrink(self, x_adv: Tensor, *, points: int = 15, rounds: int = 4) -> Tensor:
        """Pull an adversarial point back towards ``x0`` along the straight segment: the
        point ``x0 + t (x_adv - x0)`` with the smallest adversarial ``t`` in ``(0, 1]``.
        Returns a batch (the point and its fallbacks, see :meth:`search_path`), never
        farther from ``x0`` than ``x_adv`` unless ``x_adv`` keeps its class alone (then up to
        a relative 1e-3 farther along the segment: see :meth:`search_path`), or ``x_adv``
        itself if no such point is adversarial."""
        found = self.search_path(self.segment(self.x0, x_adv), 0.0, 1.0,
                                 points=points, rounds=rounds)
        return x_adv if found is None else found[0]


Proposal = tuple[Tensor | None, dict[str, Any]]


class Attack(ABC):
    """Base class: validation, the original class and verification live here.

    Subclasses set :attr:`name` and implement :meth:`run`, which receives a validated
    :class:`AttackContext` and returns a batch of candidate points ``(K, *input_shape)`` (or
    ``None``) plus a dict of details. The base keeps the smallest candidate that a fresh
    forward pass confirms as a class change.
    """

    name: ClassVar[str] = "attack"

    def __call__(self, model: nn.Module, x0: Tensor, *, bounds: Bounds | None = None,
                 seed: int = 0) -> AttackResult:
        """Attack ``model`` at ``x0``.

        Args:
            model: classifier in eval mode mapping ``(N, *input_shape)`` to ``(N, n_classes)``.
            x0: nominal input of shape ``(1, *input_shape)`` (finite, floating point).
            bounds: optional box ``(lo, hi)`` (floats or tensors broadcastable to ``x0``)
                that every candidate is clipped to, after rounding it inward to the model's
                dtype (every returned coordinate lies in ``[lo, hi]`` exactly, or keeps
                ``x0``'s own value); ``x0`` must lie inside it. ``None``
                (default): no box, as in the paper's normalised-space measurements.
            seed: seed of the attack's own random draws (``torch.Generator`` on the model's
                device); equal seeds give equal results.

        Returns:
            An :class:`AttackResult`; ``radius`` is the verified L2 size of ``x_adv - x0``.

        Raises:
            InputError: on an invalid model, input, bounds or seed.
        """
        t0 = time.perf_counter()
        # IEEE float32 on CUDA (no TF32): the original class and the verification of a
        # class change are the model's float32 arithmetic, as on the CPU
        with exact_float32(model_device(model)):
            ctx, x0_ref = _prepare(model, x0, bounds, seed)
            cands, details = self.run(ctx)
            best = _verify(ctx, x0_ref, cands)
        details = dict(details)
        details["model_calls"] = ctx.calls
        seconds = time.perf_counter() - t0
        if best is None:
            logger.info("%s: no verified adversarial found (%.3f s)", self.name, seconds)
            return AttackResult(self.name, False, None, None, ctx.label, None, seconds,
                                details=details)
        x_adv, radius, cls, in64 = best
        details["class_change_in_float64"] = in64
        if in64 is False:
            logger.info("%s: the class change at x_adv holds in the model's %s only, not in "
                        "float64", self.name, str(ctx.x0.dtype).replace("torch.", ""))
        logger.info("%s: class %d -> %d at L2 radius %.6g (%.3f s)", self.name, ctx.label,
                    cls, radius, seconds)
        return AttackResult(self.name, True, radius, x_adv, ctx.label, cls, seconds,
                            details=details)

    @abstractmethod
    def run(self, ctx: AttackContext) -> Proposal:
        """Propose candidate adversarial points ``(K, *input_shape)`` and details."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


# ---------------------------------------------------------------------------------------
# validation and verification


def _prepare(model: nn.Module, x0: Tensor, bounds: Bounds | None,
             seed: int) -> tuple[AttackContext, Tensor]:
    problem = wrapper_problem(model)
    if problem is not None and not isinstance(model, torch.jit.ScriptModule):
        raise InputError(problem)  # (a TorchScript module is only run, which works)
    if not isinstance(model, nn.Module):
        raise InputError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # DataParallel / torch.compile: the module they run
    check_inference_tensors(model)
    training = modules_in_training(model)
    if training:
        raise InputError(
            f"the model is in training mode ({len(training)} module(s), e.g. {training[0]!r}); "
            "dropout would make its class random and batch norm would update its statistics. "
            "Call model.eval() before attacking it.")
    if torch.is_inference_mode_enabled():
        raise InputError("attacks need input gradients, which torch.inference_mode() disables; "
                         "call the attack outside inference mode.")
    if not isinstance(x0, Tensor):
        raise InputError(f"expected x0 to be a torch.Tensor, got {type(x0).__name__}")
    check_plain_tensor(x0)
    if not x0.is_floating_point():
        raise InputError(f"expected a floating-point x0, got dtype {x0.dtype}; convert it "
                         "with x0.float()")
    if x0.dim() < 2 or x0.shape[0] != 1:
        raise InputError(f"expected x0 with a batch dimension of 1, shape (1, *input_shape), "
                         f"got shape {tuple(x0.shape)}; use x0.unsqueeze(0) for one sample")
    if x0.numel() == 0:
        raise InputError(f"x0 of shape {tuple(x0.shape)} has no coordinates: no perturbation "
                         "can change its class; pass an input with at least one coordinate")
    check_finite(x0, "x0", "attacks need a finite input: clean the input first")
    check_seed(seed, negative=True)  # (torch's generators take [-2**63, 2**64))
    dtype, device = model_dtype_device(model, default=x0)
    x0_ref = x0.detach().to(device=device, dtype=torch.float64)
    xm = x0.detach().to(device=device, dtype=dtype)
    if not bool(torch.isfinite(xm).all()):
        raise InputError(f"x0 overflows the model's dtype {dtype}")
    with torch.no_grad():
        try:
            # (on a copy: a model writing into its input is wrapped to get copies from now on)
            model, z = guard_input_writes(model, xm)
        except Exception as exc:  # report shape mismatches etc. as input errors
            raise InputError(f"the model failed on x0 of shape {tuple(xm.shape)} "
                             f"({type(exc).__name__}: {exc}); check the input shape the model "
                             "expects, (1, *input_shape)") from exc
    if not isinstance(z, Tensor):
        raise InputError(f"expected the model to return a tensor of class scores, got "
                         f"{type(z).__name__}")
    if z.dim() != 2 or z.shape[0] != 1:
        raise InputError(f"expected the model output to be 2-D class scores of shape "
                         f"(1, n_classes) for x0, got shape {tuple(z.shape)}; flatten or "
                         "select the logits")
    if z.shape[1] < 2:
        raise InputError(f"the model has {z.shape[1]} output class(es); a class change needs "
                         "at least 2 classes (for a single-logit binary classifier, output "
                         "the two scores [0, z])")
    if not bool(torch.isfinite(z).all()):
        check_finite_parameters(model)  # (NaN/inf weights: named, as a WeightsError)
        raise InputError("the model's output at x0 is NaN or infinite although x0 and the "
                         "weights are finite (the forward pass overflows there); check that "
                         "x0 is on the scale the model expects (e.g. normalised)")
    label = int(z[0].argmax())
    lo_t = hi_t = None
    if bounds is not None:
        lo_t, hi_t = _check_bounds(bounds, xm)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    check_input_gradients(model, xm)  # (every attack follows the input gradient)
    ctx = AttackContext(model, xm, label, int(z.shape[1]), lo_t, hi_t, gen)
    return ctx, x0_ref


def _check_bounds(bounds: Bounds, xm: Tensor) -> tuple[Tensor, Tensor]:
    """The box in the model's dtype, rounded *inward*: ``lo`` up and ``hi`` down to values of
    that dtype, so that every candidate clipped to it lies in the user's box exactly (the
    nearest float32 to 0.1 is above 0.1). ``x0`` is accepted if it lies in the box rounded to
    nearest (as given in float32 it may sit one rounding outside the exact box); the box is
    then widened to contain ``x0``, so a coordinate lies outside the user's box only where it
    keeps ``x0``'s own value."""
    if not isinstance(bounds, Sequence) or len(bounds) != 2:
        raise InputError(f"expected bounds=(lo, hi), got {bounds!r}")
    out = []
    for name, b in zip(("lo", "hi"), bounds, strict=True):
        try:
            t = torch.as_tensor(b, dtype=torch.float64, device=xm.device)
            joint = torch.broadcast_shapes(t.shape, xm.shape)
        except (TypeError, RuntimeError, ValueError) as exc:
            raise InputError(f"bounds {name} must be a float or a tensor broadcastable to "
                             f"x0's shape {tuple(xm.shape)}: {exc}") from exc
        if joint != xm.shape:  # (e.g. a batch of boxes: x0 would be broadcast to it)
            raise InputError(f"bounds {name} of shape {tuple(t.shape)} must broadcast to x0's "
                             f"shape {tuple(xm.shape)}, not enlarge it; give one box")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"bounds {name} must be finite; use bounds=None for no box")
        out.append(t)
    lo64, hi64 = out
    if not bool((lo64 < hi64).all()):
        raise InputError("bounds must satisfy lo < hi everywhere")
    lo, hi = lo64.to(xm.dtype), hi64.to(xm.dtype)
    if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
        raise InputError(f"bounds overflow the model's dtype {xm.dtype}; use bounds=None or "
                         "smaller bounds")
    if not bool(((xm >= lo) & (xm <= hi)).all()):
        raise InputError("x0 lies outside bounds=(lo, hi); clip x0 or widen the bounds")
    up, down = torch.full_like(lo, math.inf), torch.full_like(hi, -math.inf)
    lo = torch.where(lo.to(torch.float64) < lo64, torch.nextafter(lo, up), lo)
    hi = torch.where(hi.to(torch.float64) > hi64, torch.nextafter(hi, down), hi)
    return torch.minimum(lo, xm), torch.maximum(hi, xm)


def _distances(cands: Tensor, x0_ref: Tensor) -> Tensor:
    """Float64 distances of a batch of candidates from ``x0``, without the underflow of the
    squares (:func:`~lipbound.ops.base.safe_norm`: a plain norm squared differences of
    3e-160 to a subnormal and reported 2.99998e-160 for a point at 3.0000005e-160)."""
    return safe_norm((cands.to(torch.float64) - x0_ref).flatten(1), dim=1)


def _distance_upper(r: float, d: int) -> float:
    """An upper bound on the exact distance whose float64 computation by :func:`_distances`
    over ``d`` coordinates gave ``r``: the differences, squares and square root are rounded
    once each (relative ``u``) and the sum of ``d`` non-negative terms by at most
    ``(d - 1) u``, so the computed norm is within ``(d/2 + 3) u`` of the exact one; ``r``
    is raised by twice that. The scaling by a power of two is exact except where the
    distance is subnormal (an absolute error of at most ``2^-1075``): ``2^-1073`` more."""
    if not r > 0:
        return r
    return math.nextafter(r * (1.0 + 2.0 * (d + 4) * 2.0**-53) + 2.0**-1073, math.inf)


class _Float64Check:
    """Whether the network in float64 changes class between ``x0`` and a point the model's
    own dtype classified differently: ``True``/``False``, or ``None`` where no float64
    evaluation exists (the model cannot be copied or run in float64, or casts to another
    dtype inside). The float64 class at ``x0`` is that of ``x0`` as given (a float64 ``x0``
    that the model's dtype rounds onto a tie or across the boundary can have another class
    there than the model's). The float64 copy of the model
    (:func:`lipbound.lower._common.float64_model`: its own weights) is made on first use;
    a model whose own scores are float64 is its own check (``True`` without a second pass)."""

    def __init__(self, ctx: AttackContext, x0_ref: Tensor):
        self.ctx = ctx
        self.x0_ref = x0_ref
        self.made = False
        self.model64: nn.Module | None = None
        self.label64 = -1

    def _scores(self, x: Tensor) -> Tensor | None:
        """Float64 scores of one point, or ``None`` (then no check exists from now on)."""
        if self.model64 is None:
            return None
        try:
            z = self.model64(x.to(torch.float64, copy=True))
        except Exception as exc:  # noqa: BLE001 - e.g. a module with float32 constants
            logger.info("no float64 confirmation of the class change (%s: %s)",
                        type(exc).__name__, exc)
            self.model64 = None
            return None
        if not isinstance(z, Tensor) or z.dtype != torch.float64 or z.shape[0] != 1:
            self.model64 = None  # (a model that casts to its own dtype inside)
            return None
        return z

    def __call__(self, x_adv: Tensor, z: Tensor) -> bool | None:
        if z.dtype == torch.float64:
            return True
        if not self.made:
            self.made = True
            self.model64 = float64_model(self.ctx.model)
            z0 = None if self.model64 is None else self._scores(self.x0_ref)
            if z0 is not None and not bool(torch.isfinite(z0).all()):
                self.model64 = None
            elif z0 is not None:
                self.label64 = int(z0[0].argmax())
        if self.model64 is None:
            return None
        z = self._scores(x_adv)
        if z is None:
            return None
        rival = torch.cat([z[0, :self.label64], z[0, self.label64 + 1:]])
        return bool(torch.isfinite(z).all()) and bool((rival > z[0, self.label64]).any())


Verified = tuple[Tensor, float, int, "bool | None"]


@torch.no_grad()
def _verify(ctx: AttackContext, x0_ref: Tensor, cands: Tensor | None) -> Verified | None:
    """Smallest candidate confirmed by a fresh forward pass of that tensor alone, in the
    model's dtype and, where that is not float64, in float64 too.

    Candidates are tried in increasing float64 radius; the first that is finite, in the
    box and classified differently wins. (Each is evaluated on its own because some
    backends compute a batch with slightly different rounding, and a point found by a
    line search sits within rounding of the decision boundary.) A point within float32
    rounding of the boundary can change the float32 model's class while the network in
    exact arithmetic -- the one certified radii are about -- keeps it (on float32 linear
    models gradient ascent and I-FGSM reported radii up to 2.5e-7 below the exact minimal
    adversarial distance, under a sound certificate), so the class change is confirmed by a
    float64 forward pass of the same weights as well (:class:`_Float64Check`). When no
    candidate passes both, points a relative 1e-6 ... 1e-2 farther from ``x0`` along the ray
    through the smallest candidate are tried (clipped to the box): an attack whose points
    all converged to within rounding of the boundary (PGD on CIFAR-10 test image 12: all
    eight runs, class changes in the batched pass but not alone) still reports a verified
    class change. Only if none of those passes in float64 either is the smallest point
    that the model's dtype alone confirms returned, marked ``False``.

    Returns:
        ``(x_adv, radius, class, float64)``, ``float64`` the float64 confirmation
        (``True``/``False``, ``None`` where the network cannot be run in float64), or
        ``None`` when no point is confirmed in the model's dtype.
    """
    check = _Float64Check(ctx, x0_ref)
    found, only = _verify_points(ctx, x0_ref, cands, check)
    if found is not None or cands is None or cands.numel() == 0:
        return found
    c = cands.detach().to(device=ctx.x0.device, dtype=ctx.x0.dtype)
    ok = torch.isfinite(c.flatten(1)).all(dim=1)
    if not bool(ok.any()):
        return None
    radii = _distances(c, x0_ref)
    radii = torch.where(ok, radii, torch.full_like(radii, math.inf))
    d = c[int(radii.argmin())].to(torch.float64) - x0_ref[0]
    ladder = [ctx.clip((x0_ref[0] + (1 + f) * d).to(ctx.x0.dtype).unsqueeze(0))
              for f in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)]
    found, only_ladder = _verify_points(ctx, x0_ref, torch.cat(ladder), check)
    if found is not None:
        return found
    if only is None or (only_ladder is not None and only_ladder[1] < only[1]):
        return only_ladder
    return only


@torch.no_grad()
def _verify_points(ctx: AttackContext, x0_ref: Tensor, cands: Tensor | None,
                   check: _Float64Check) -> tuple[Verified | None, Verified | None]:
    """The smallest of ``cands`` confirmed alone in the model's dtype and by ``check`` (see
    :func:`_verify`), without a ladder, and the smallest confirmed in the model's dtype
    only (``None`` when it is the former or there is none)."""
    if cands is None or cands.numel() == 0:
        return None, None
    if tuple(cands.shape[1:]) != ctx.shape:
        raise RuntimeError(f"attack proposed candidates of shape {tuple(cands.shape)}, "
                           f"expected (K, {ctx.shape})")  # a bug in the attack, not the user
    cands = cands.detach().to(device=ctx.x0.device, dtype=ctx.x0.dtype)
    ok = torch.isfinite(cands.flatten(1)).all(dim=1)
    if ctx.lo is not None and ctx.hi is not None:
        ok &= ((cands >= ctx.lo) & (cands <= ctx.hi)).flatten(1).all(dim=1)
    radii = _distances(cands, x0_ref)
    ok &= radii > 0
    rejected = 0
    only: Verified | None = None
    for i in torch.argsort(radii).tolist():
        if not bool(ok[i]):
            continue
        x_adv = cands[i:i + 1].clone()
        z = ctx.logits(x_adv)
        if bool(ctx.is_adv(z)[0]):
            radius = _distance_upper(float(_distances(x_adv, x0_ref)[0]), ctx.dim)
            in64 = check(x_adv, z)
            if in64 is False:
                if only is None:
                    only = (x_adv, radius, int(z[0].argmax()), False)
                rejected += 1
                continue
            if rejected:
                logger.debug("%d smaller candidate(s) failed verification", rejected)
            return (x_adv, radius, int(z[0].argmax()), in64), None
        rejected += 1
    return None, only
