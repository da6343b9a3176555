"""Independent references for the session-24 fuzz (see ``tests/test_fuzz_random_models.py``).

Every check compares a lipbound result with a value computed here from float64 forward
passes (a float64 copy of a float32 model: lipbound certifies the network in exact arithmetic
on its weights) or with a concrete class change found here; a reference that must lie below
an upper bound is lowered by a float64 rounding allowance, never the bound raised.

The local constant is the paper's, relative to ``x0``: ``sup ||f(x) - f(x0)|| / ||x - x0||``
over the ball. Pairs of points inside the ball and Jacobian norms at interior points bound
the (larger) all-pairs local constant, not this one, so they are used only against the global
bound (``relu`` at ``x0 = -1``, ``eps = 1.5``: relative constant 1/3, all pairs 1).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

import lipbound
from fuzz_models import Case, abs_twin, float64_copy, rounds
from lipbound.attacks import run_attacks
from lipbound.errors import LipboundError
from lipbound.lower import best_lower_bound, ratio_at
from lipbound.radius import certified_radius
from lipbound.results import Guarantee

UPPER = (Guarantee.EXACT, Guarantee.CERTIFIED, Guarantee.PROBABILISTIC)


@dataclass
class Report:
    """Outcome of :func:`check_case`: violations found and how many checks of each kind ran."""

    seed: int
    kinds: list[str]
    violations: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    refusals: list[str] = field(default_factory=list)
    info: Counter = field(default_factory=Counter)

    def fail(self, msg: str) -> None:
        self.violations.append(msg)

    def le(self, what: str, lower: float, upper: float) -> None:
        """Record the check ``lower <= upper`` (no slack: allowances are in ``lower``)."""
        self.counts[what] += 1
        if not lower <= upper:
            self.fail(f"{what}: {lower!r} > {upper!r}")


class _Ref:
    """Float64 reference evaluations of one case."""

    def __init__(self, case: Case) -> None:
        self.f = float64_copy(case.model)
        self.twin = abs_twin(self.f)
        self.x0 = case.x0.double()
        self.d = self.x0.numel()
        with torch.no_grad():
            self.y0 = self.f(self.x0)[0]
            # rounding noise of a float64 output, measured: x0 evaluated inside batches of
            # several sizes (other algorithms and summation orders) against the single pass;
            # the outputs of networks with large internal values cancel, so a relative
            # allowance on the outputs alone is too small (seeds 300009 and 300014)
            spread = 0.0
            gen = torch.Generator().manual_seed(0)
            for n in (2, 7, 64):
                xs = self.x0 + torch.randn((n, *self.x0.shape[1:]), generator=gen,
                                           dtype=torch.float64)
                xs[n // 2] = self.x0[0]
                spread = max(spread, float((self.f(xs)[n // 2] - self.y0).norm()))
        self.ynorm = float(self.y0.abs().max())
        self.noise = 16 * spread

    def outputs(self, xs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.f(xs[i:i + 256]) for i in range(0, len(xs), 256)])

    def ratios(self, xs: torch.Tensor, center: torch.Tensor | None = None,
               yc: torch.Tensor | None = None) -> torch.Tensor:
        """Lowered ratios ``(||f(x) - f(c)|| - allowance) / ||x - c||`` (c = x0 by default)."""
        c = self.x0 if center is None else center
        yc = self.y0 if yc is None else yc
        ys = self.outputs(xs)
        dist = (xs - c).flatten(1).norm(dim=1)
        num = (ys - yc).norm(dim=1)
        scale = ys.abs().amax(dim=1) + yc.abs().max()
        allow = 1e-10 * scale + 1e-9 * num + self.noise
        r = (num - allow).clamp(min=0) / dist
        r[dist == 0] = 0
        return r

    def rounding(self, x: torch.Tensor) -> float:
        """First-order estimate (times 8) of the float64 rounding error of ``f(x)``: every op
        that rounds sums terms of magnitude ``T_k`` (the op applied to ``|h_{k-1}|`` with
        ``|weights|``, :func:`abs_twin`), so its output errs by about ``n_k u T_k`` (``n_k``
        its input size, a bound on its sums' lengths); carried to the outputs by
        ``|df/dh_k|``."""
        rec: list = []
        x = x.clone().requires_grad_(True)
        y = self.f.run(x, rec)[0]
        u = 2.0 ** -53
        items = []
        with torch.no_grad():
            for k, op in enumerate(self.f.ops):
                h_in, h_out = rec[k], rec[k + 1]
                if rounds(self.f, op) and h_out.requires_grad:
                    t = self.twin.apply(op, h_in.detach().abs())
                    items.append((h_out, t.abs() + h_out.detach().abs(), h_in[0].numel() + 2))
        err = torch.zeros(len(y), dtype=torch.float64)
        for j in range(len(y)):
            gs = torch.autograd.grad(y[j], [h for h, _, _ in items], retain_graph=True,
                                     allow_unused=True)
            tot = 0.0
            for (_, t, n), g in zip(items, gs, strict=True):
                if g is not None:
                    tot += float((g.abs() * t).sum()) * n * u
            err[j] = tot
        return 8 * float(err.norm())

    def ratio_checked(self, x: torch.Tensor, center: torch.Tensor | None = None, *,
                      upper: bool = False) -> float:
        """The ratio ``||f(x) - f(c)|| / ||x - c||`` (c = x0 by default) at one point, lowered
        (``upper``: raised) by :meth:`rounding` at both points, or by the coarse allowance
        where that is larger."""
        c = self.x0 if center is None else center
        ys, yc = self.outputs(torch.cat([x, c]))
        num = float((ys - yc).norm())
        allow = max(self.rounding(x) + self.rounding(c), 1e-10 * (
            float(ys.abs().max()) + float(yc.abs().max())) + 1e-9 * num + self.noise)
        dist = float((x - c).norm())
        if upper:
            return (num + allow) / dist
        return max(num - allow, 0.0) / dist

    def jacobian_norm(self, x: torch.Tensor) -> float:
        jac = torch.autograd.functional.jacobian(lambda z: self.f(z.view_as(x))[0],
                                                 x.flatten().clone())
        return float(torch.linalg.svdvals(jac)[0])


def _ball_points(rng: np.random.Generator, x0: torch.Tensor, eps: float, n: int
                 ) -> torch.Tensor:
    d = x0.numel()
    v = torch.tensor(rng.standard_normal((n, d)))
    v = v / v.norm(dim=1, keepdim=True)
    u = rng.random(n)
    radii = np.where(u < 0.3, 1.0, np.where(u < 0.5, 10.0 ** -rng.uniform(0, 4, n),
                                               rng.random(n) ** (1 / d)))
    radii = eps * radii * (1 - 1e-12)
    pts = x0.flatten()[None] + torch.tensor(radii)[:, None] * v
    # exact membership (float64 rounding of the sum): keep points inside
    inside = (pts - x0.flatten()[None]).norm(dim=1) <= eps
    return pts[inside].view(-1, *x0.shape[1:])


def _ascent(ref: _Ref, x0: torch.Tensor, eps: float, starts: torch.Tensor,
            steps: int = 25) -> torch.Tensor:
    """Projected gradient ascent on the ratio relative to x0; returns the end points."""
    x = starts.clone().flatten(1)
    c = x0.flatten()[None]
    lr = 0.2 * eps
    for _ in range(steps):
        x.requires_grad_(True)
        y = ref.f(x.view(-1, *x0.shape[1:]))
        dist = (x - c).norm(dim=1).clamp(min=1e-300)
        obj = ((y - ref.y0).norm(dim=1) / dist).sum()
        (g,) = torch.autograd.grad(obj, x)
        with torch.no_grad():
            g = g / g.norm(dim=1, keepdim=True).clamp(min=1e-300)
            x = x + lr * g
            delta = x - c
            n = delta.norm(dim=1, keepdim=True)
            x = torch.where(n > eps, c + delta * (eps * (1 - 1e-12) / n), x)
        lr *= 0.9
    return x.detach().view(-1, *x0.shape[1:])


def _check_upper(rep: Report, res: lipbound.BoundResult, what: str) -> None:
    rep.counts["guarantee:" + what] += 1
    if res.guarantee not in UPPER:
        rep.fail(f"{what}: guarantee {res.guarantee} is not an upper bound")
    if res.guarantee == Guarantee.PROBABILISTIC:
        if not 0 < res.failure_prob <= 1e-5:
            rep.fail(f"{what}: probabilistic with failure_prob {res.failure_prob}")
    elif res.failure_prob != 0:
        rep.fail(f"{what}: {res.guarantee} with failure_prob {res.failure_prob}")
    if not (res.value >= 0 and not math.isnan(res.value)):
        rep.fail(f"{what}: value {res.value}")


def _class_change(ref: _Ref, x: torch.Tensor, cls: int) -> bool:
    """``x`` has another top class than ``cls`` in float64, by more than rounding."""
    y = ref.outputs(x)[0]
    others = torch.cat([y[:cls], y[cls + 1:]])
    gap = float(others.max() - y[cls])
    return gap > 1e-9 * (float(y.abs().max()) + ref.ynorm) + 2 * ref.noise + 1e-300


def _line_search(ref: _Ref, cls: int, dirs: torch.Tensor, t_max: float) -> float:
    """Smallest verified class-change distance along the rays ``x0 + t v`` (``|v| = 1``)."""
    best = math.inf
    x0 = ref.x0
    for v in dirs:
        v = v.view_as(x0)
        ts = t_max * np.logspace(-9, 0, 46)
        ts = ts[ts < best]
        if not len(ts):
            continue
        xs = x0 + torch.tensor(ts).view(-1, *([1] * (x0.dim() - 1))) * v
        ys = ref.outputs(xs)
        changed = (ys.argmax(dim=1) != cls).nonzero()
        if not len(changed):
            continue
        i = int(changed[0])
        lo, hi = (0.0 if i == 0 else float(ts[i - 1])), float(ts[i])
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if _class_change(ref, x0 + mid * v, cls):
                hi = mid
            else:
                lo = mid
        if _class_change(ref, x0 + hi * v, cls):
            dist = float((x0 + hi * v - x0).norm()) * (1 + 1e-12)
            best = min(best, dist)
    return best


def check_case(case: Case, *, radii: list[float], seed: int = 0, n_samples: int = 400,
               local_variants: tuple[str, ...] = ("default", "exact", "lanczos", "tight"),
               radius_variants: tuple[str, ...] = ("local", "margin", "local_tight",
                                                   "margin_tight"),
               lower_kw: dict | None = None,
               attacks: tuple[str, ...] | None = ("fgsm", "ifgsm", "gradient", "cw", "pgd"),
               exact_fc: bool = True) -> Report:
    """Run every check of the fuzz on one case (see the module docstring)."""
    rng = np.random.default_rng([case.seed, seed, 7])
    rep = Report(case.seed, case.kinds)
    ref = _Ref(case)
    x0 = ref.x0
    shape = case.input_shape
    # ------------------------------------------------------------------ global bound
    analyzers = {}
    try:
        analyzers = {
            "default": lipbound.Analyzer(case.model, shape),
            "exact": lipbound.Analyzer(case.model, shape, spectral="exact"),
            "lanczos": lipbound.Analyzer(case.model, shape, spectral="lanczos", seed=seed),
        }
        glob = {k: an.global_bound() for k, an in analyzers.items()}
    except LipboundError as e:
        rep.refusals.append(f"{type(e).__name__}: {e}")
        return rep
    for k, g in glob.items():
        _check_upper(rep, g, f"global[{k}]")
    g_min = min(g.value for g in glob.values())
    # Jacobian norms at random points (around x0 at several scales, and far away)
    scale = float(x0.abs().max()) + 1.0
    jac_lb = 0.0
    for s in (1e-3, 0.1, 1.0, 10.0):
        for _ in range(2):
            x = x0 + s * scale * torch.tensor(rng.standard_normal(x0.shape))
            jac_lb = max(jac_lb, ref.jacobian_norm(x) * (1 - 1e-9))
    rep.le("global>=jacobian(random points)", jac_lb, g_min)
    # random pairs anywhere
    n = 64
    a = x0 + scale * torch.tensor(rng.standard_normal((n, *x0.shape[1:])))
    steps = torch.tensor(10.0 ** rng.uniform(-6, 1, size=(n,) + (1,) * (x0.dim() - 1)))
    b = a + steps * torch.tensor(rng.standard_normal(tuple(a.shape)))
    ya = ref.outputs(a)
    pr = [float(ref.ratios(b[i:i + 1], a[i:i + 1], ya[i])[0]) for i in range(n)]
    best_pairs = np.argsort(pr)[-3:]
    pr_lb = max(ref.ratio_checked(b[i:i + 1], a[i:i + 1]) for i in best_pairs)
    rep.le("global>=pair ratios", pr_lb, g_min)

    # ------------------------------------------------------------------ local bounds
    for eps in radii:
        pts = _ball_points(rng, x0, eps, n_samples)
        samp = ref.ratios(pts) if len(pts) else torch.zeros(1)
        top = pts[samp.argsort(descending=True)[:6]] if len(pts) else x0
        asc = _ascent(ref, x0, eps, torch.cat([top, _ball_points(rng, x0, eps, 6)]))
        asc_r = ref.ratios(asc)
        # the best candidates, lowered by the finer rounding estimate
        cand = torch.cat([pts, asc])
        cand_r = torch.cat([samp if len(pts) else torch.zeros(0, dtype=torch.float64), asc_r])
        ref_lb = max(ref.ratio_checked(cand[i:i + 1])
                     for i in cand_r.argsort(descending=True)[:4].tolist())
        # interior Jacobians: lower bounds on the global constant only
        jx = pts[:3] if len(pts) else x0
        jl = max(ref.jacobian_norm(x[None]) for x in jx) * (1 - 1e-9)
        rep.le("global>=jacobian(in ball)", jl, g_min)
        rep.le("global>=sampled ratio", ref_lb, g_min)
        # lipbound's own lower bound: witness in the ball, reproducing its value
        try:
            lb = best_lower_bound(case.model, case.x0, eps, seed=seed, **(lower_kw or {}))
        except LipboundError as e:
            rep.refusals.append(f"lower eps={eps}: {type(e).__name__}: {e}")
            lb = None
        if lb is not None:
            rep.counts["lower:label+witness"] += 1
            if lb.guarantee != Guarantee.LOWER or lb.witness is None:
                rep.fail(f"lower eps={eps}: guarantee {lb.guarantee}, witness {lb.witness}")
            else:
                w = lb.witness.double()
                dist = float((w - x0).norm())
                if not 0 < dist <= eps:
                    rep.fail(f"lower eps={eps}: witness at distance {dist} (eps {eps})")
                # the true ratio at the witness (raised by a rounding allowance: this side
                # is the upper one here)
                mine = ref.ratio_checked(w, upper=True)
                rep.le("lower<=own ratio at witness", lb.value, mine)
                rep.le("lower<=ratio_at(witness)", lb.value,
                       ratio_at(case.model, case.x0, lb.witness))
                rep.le("global>=lower", lb.value, g_min)
        for var in local_variants:
            try:
                if var == "tight":
                    res = analyzers["default"].local_bound(case.x0, eps, tight=True)
                elif var == "tight_exact":
                    res = analyzers["exact"].local_bound(case.x0, eps, tight=True)
                else:
                    res = analyzers[var].local_bound(case.x0, eps)
            except LipboundError as e:
                rep.refusals.append(f"local[{var}] eps={eps}: {type(e).__name__}: {e}")
                continue
            what = f"local[{var}]"
            _check_upper(rep, res, what)
            if var == "exact" and res.guarantee == Guarantee.PROBABILISTIC:
                rep.fail(f"{what}: spectral='exact' gave a probabilistic bound")
            rep.le(f"{what}>=sampled ratio", ref_lb, res.value)
            if lb is not None:
                rep.le(f"{what}>=lower", lb.value, res.value)
            if res.value < jl:
                rep.info["local below an interior Jacobian norm (allowed)"] += 1
        if exact_fc and case.fc_only:
            _check_exact(rep, case, eps, g_min, lb)
    # ------------------------------------------------------------------ radii
    if radius_variants:
        _check_radii(rep, case, ref, rng, radius_variants, attacks, seed)
    return rep


def _check_exact(rep: Report, case: Case, eps: float, g_min: float, lb) -> None:
    from lipbound.baselines.exact import exact_local_l2

    try:
        ex = exact_local_l2(case.model, case.x0, eps, time_limit=5.0, max_regions=3000,
                            input_shape=case.input_shape)
    except Exception as e:  # noqa: BLE001 - refusals (not fully connected, budget) recorded
        rep.info["exact-l2 not run: " + type(e).__name__] += 1
        return
    rep.counts["exact-l2 run"] += 1
    if ex.guarantee == Guarantee.EXACT:
        # all-pairs constant: at most the global constant, at least the relative one
        rep.le("global>=exact-l2", ex.value * (1 - 1e-9), g_min)
    if lb is not None:
        rep.le("exact-l2>=lower", lb.value, ex.value)


def _check_radii(rep: Report, case: Case, ref: _Ref, rng: np.random.Generator,
                 variants: tuple[str, ...], attacks: tuple[str, ...] | None, seed: int) -> None:
    y0 = ref.y0
    cls = int(y0.argmax())
    radii = {}
    for var in variants:
        method = var.split("_")[0]
        tight = var.endswith("tight")
        try:
            r = certified_radius(case.model, case.x0, method=method, tight=tight)
        except LipboundError as e:
            rep.refusals.append(f"radius[{var}]: {type(e).__name__}: {e}")
            continue
        rep.counts["radius:label"] += 1
        if r.guarantee == Guarantee.CERTIFIED_LOWER:
            if r.failure_prob != 0:
                rep.fail(f"radius[{var}]: certified with failure_prob {r.failure_prob}")
        elif r.guarantee == Guarantee.PROBABILISTIC_LOWER:
            if not 0 < r.failure_prob <= 1e-4:
                rep.fail(f"radius[{var}]: probabilistic with failure_prob {r.failure_prob}")
        else:
            rep.fail(f"radius[{var}]: guarantee {r.guarantee}")
        if not r.radius >= 0:
            rep.fail(f"radius[{var}]: {r.radius}")
        if r.radius > 0 and r.predicted_class != cls:
            rep.fail(f"radius[{var}]: class {r.predicted_class}, float64 class {cls}")
        radii[var] = r.radius
    if not radii or max(radii.values()) == 0:
        return
    best = math.inf
    if attacks:
        try:
            for a in run_attacks(case.model, case.x0, attacks, seed=seed):
                if a.success and a.details.get("class_change_in_float64") is True:
                    x = a.x_adv.double()
                    if _class_change(ref, x, cls):
                        best = min(best, float((x - ref.x0).norm()) * (1 + 1e-12))
        except LipboundError as e:
            rep.refusals.append(f"attacks: {type(e).__name__}: {e}")
    # own rays: random directions and the margin gradients of every rival
    d = ref.d
    dirs = [torch.tensor(rng.standard_normal(d)) for _ in range(8)]
    x = ref.x0.clone().requires_grad_(True)
    y = ref.f(x)[0]
    for j in range(len(y)):
        if j != cls:
            (g,) = torch.autograd.grad(y[j] - y[cls], x, retain_graph=True)
            dirs.append(g.flatten())
    dirs = [v / v.norm() for v in dirs if float(v.norm()) > 0 and torch.isfinite(v).all()]
    r_max = max(radii.values())
    t_max = 10 * r_max if math.isfinite(r_max) else 1e6
    t_max = min(max(t_max, 10 * (float(ref.x0.norm()) + 1.0)), 1e8)
    if dirs:
        best = min(best, _line_search(ref, cls, torch.stack(dirs), t_max))
    if math.isfinite(best):
        rep.info["radius: class change found"] += 1
    for var, r in radii.items():
        rep.le(f"radius[{var}]<=class change", r, best)
