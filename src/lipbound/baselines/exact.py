"""Exact local Lipschitz constants of small fully connected ReLU networks.

Two methods, for two different quantities:

:func:`exact_local_l2` -- **L2, all pairs in the ball** (our design). The quantity is

    L_ball(x0, eps) = sup_{x != y, x, y in B} ||C (f(x) - f(y))||_2 / ||x - y||_2,
    B = {x : ||x - x0||_2 <= eps},

the local constant over *all pairs* in the ball. It is at least the constant *relative to
x0* of ``docs/method.md`` (one end of every pair is x0), which this module does **not**
compute and which can be smaller. For a piecewise-linear ``f``, ``L_ball`` equals the
largest spectral norm ``||C W_K D_{K-1} ... D_1 W_1||`` over the activation patterns
``(D_1, ..., D_{K-1})`` whose (full-dimensional) region meets the ball: every segment
between two points of the convex ball splits into finitely many pieces, each inside the
closure of one region where ``f`` is affine with that Jacobian (so the ratio is at most the
largest norm), and inside a region meeting the open ball the ratio of two points along the
top right singular vector attains the norm.

The regions are enumerated by branching over the hidden units in order. A unit whose
pre-activation cannot change sign on the whole ball (range ``a^T x0 + c +- eps ||a||``,
exact on a ball) is fixed; otherwise both signs are tried, each adding a half-space to the
region's polyhedron, and a branch is kept unless the polyhedron provably misses the ball.
The distance from x0 to a polyhedron is a least-distance program solved exactly by
Lawson & Hanson's reduction to NNLS; a branch is dropped only with a Farkas-type
certificate ``lambda >= 0`` with ``lambda^T (G x0 - h) - eps ||G^T lambda|| > margin``
(then ``lambda^T (G x - h) > 0`` on the whole ball, so no x in the ball satisfies
``G x <= h``); the margin covers float64 rounding, so rounding can only keep extra regions.
Every kept pattern's norm is an upper bound (exact SVD, inflated for rounding), so the
maximum is a CERTIFIED upper bound on ``L_ball``. The maximiser is then verified: a point
strictly inside its region and strictly inside the ball is found (least distance to the
polyhedron tightened by a small slack) and checked with a float64 forward pass (every
hidden pre-activation strictly of the pattern's sign). There ``f`` is differentiable with
exactly that Jacobian, so the value is attained and the guarantee is EXACT. If the check
fails (a degenerate region) the result stays CERTIFIED.

Cost grows with the number of regions meeting the ball; ``max_regions``, ``time_limit``
and ``max_hidden`` stop it with a :class:`~lipbound.errors.LipboundError`.

:func:`lipmip` -- **lipMIP's quantity** (M. Jordan and A. G. Dimakis, *Exactly Computing
the Local Lipschitz Constant of ReLU Networks*, NeurIPS 2020): for a scalar output
``g = c^T f`` and the l_inf box ``X = {x : ||x - x0||_inf <= eps}``,

    L(g, X, ||.||_inf) = sup_{x != y in X} |g(x) - g(y)| / ||x - y||_inf
                       = sup_{x in X, g differentiable at x} ||grad g(x)||_1

(input norm l_inf, so the gradient's dual norm l1; ``input_norm="l1"`` gives the dual
``||grad g||_inf``). As in lipMIP, this is a mixed-integer linear program solved with HiGHS
(through highspy, the ``mip`` extra, when it is installed, else
:func:`scipy.optimize.milp`): binaries ``a`` encode the ReLU pattern with big-M
constraints from interval bounds over the box; the gradient is propagated backwards
through the pattern (``v_k = a_k * g_k`` by big-M on interval bounds of ``g_k``); the
dual norm of the gradient is maximised with sign binaries. At a kink (pre-activation 0)
both values of the binary are allowed -- lipMIP's treatment of the generalised gradient,
which gives the exact constant under its general-position assumption and an upper bound
otherwise. We verify the optimum: the optimal pattern is re-evaluated in float64 and a
point strictly inside its region (in the box) is found by a linear program and checked by
a forward pass. EXACT when that succeeds and the MILP's dual bound matches the attained
value; CERTIFIED (the dual bound) if the maximiser's region is degenerate, or if HiGHS
stops at the time limit with a dual bound; a ``TimeLimitError`` if it stops there without
one. highspy returns HiGHS's dual bound at the time limit also when HiGHS has no feasible
point yet; scipy 1.17's ``milp`` returns none then, which on networks of a few hundred
hidden units is the rule. Measured with HiGHS 1.16 (highspy) and scipy 1.17.1 on the random
nets of ``tests/test_lipmip_highspy.py`` (``N(0, 1/fan_in)`` weights), l_inf box:
10-100-100-100-1, half-width 0.5, 5 s: scipy no value (``TimeLimitError``), highspy the dual
bound about 500-530, depending on how far HiGHS gets (after 0.1 s none yet, after 0.3 s
about 1000-1065; half-width 0.05, 5 s: 211-246), against 0.733 for the centre's pattern (a
verified lower bound), 1.62 for the largest gradient norm at 10^5 random points of the box,
and 1111 for the product of the absolute weight matrices -- certified, but loose; 8-16-16-1,
half-width 0.5, 0.05 s: scipy no value, highspy 2.2-2.4, exact 0.349 (under a second).
With highspy the MILP also gets a feasible start, the pattern at ``x0`` with its gradient,
checked in float64 first: HiGHS then has an incumbent (when its pattern is verified inside
its region, the notes give its value as a lower bound), but in these runs the start did
not tighten the dual bound or shorten the solves. HiGHS's ``threads`` option is left at
its default.

HiGHS uses absolute tolerances (feasibility 1e-7, integrality 1e-6), so the MILP is
posed on an exactly rescaled network (powers of two: input box of half-width in [0.5, 1),
every layer's largest weight in [0.5, 1), and the output layer then scaled up, by at most
2^20, until the objective at ``x0``'s pattern is about 1 while its interval bound stays
below 2^10), and the reported value is the larger of HiGHS's dual bound and the attained
value, times ``1 + 1e-6``, plus ``1e-6`` in the rescaled MILP's units. Without the last two
an optimum of a few 1e-7 there came back as 0 (a net whose constant is 3e-6; random nets
with weights of 1e-9 in a middle layer got -0.0 labelled exact). "exact" means that the
value is at most ``1 + 1e-5`` times the attained value of a pattern verified strictly inside
its region in the box; the value rests on HiGHS's optimum being right to those cushions
(not a proof with constants, unlike the other certified baselines). When every unit of a
hidden layer is inactive on the box (by the interval bounds) the value is 0, exact, without
HiGHS.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from scipy import optimize, sparse
from torch import nn

from lipbound.baselines.deadline import Deadline, TimeLimitError, check_time_limit
from lipbound.baselines.fc import (
    FCLayers,
    apply_output_map,
    as_fc,
    chain_caveats,
    chain_note,
    check_eps,
    check_range,
    check_x0,
    fc_preactivations,
    product_error,
    real_array,
    round_up,
    safe_spectral_norm,
)
from lipbound.errors import InputError, LipboundError
from lipbound.results import BoundResult, Guarantee

logger = logging.getLogger(__name__)

__all__ = ["exact_local_l2", "exact_local_l2_detailed", "ExactL2Result", "lipmip",
           "ball_meets_polyhedron"]


# --------------------------------------------------------------------------- geometry


def ball_meets_polyhedron(g: np.ndarray, h: np.ndarray, x0: np.ndarray, eps: float,
                          err: np.ndarray | None = None
                          ) -> tuple[bool, np.ndarray | None, float]:
    """Decide whether ``{x : G x <= h}`` meets the closed ball ``B(x0, eps)``.

    Solves the least-distance program ``min ||y|| s.t. G (x0 + y) <= h`` with Lawson &
    Hanson's NNLS reduction. Returns ``(meets, point, distance)``: ``meets`` is False only
    when a certificate ``lambda >= 0``, ``lambda^T (G x0 - h) - eps ||G^T lambda|| > margin``
    proves the two sets disjoint; ``point`` is a point of the polyhedron in the ball when
    one was found (else None); ``distance`` is the computed distance (``inf`` if empty).

    Args:
        g: constraint matrix ``(m, n)``; h: right-hand sides ``(m,)``.
        x0: ball centre; eps: radius.
        err: per-row scale of the rounding error in ``g``/``h`` (``|g| |x0| + |h|`` if None);
            the certificate must clear ``1e-11 * (m + n) * lambda^T err``.
    """
    m, n = g.shape
    if err is None:
        err = np.abs(g) @ np.abs(x0) + np.abs(h) + eps * np.linalg.norm(g, axis=1)
    if m == 0:
        return True, x0.copy(), 0.0
    norms = np.linalg.norm(g, axis=1)
    zero = norms == 0.0
    if np.any(zero & (h < -1e-11 * (m + n) * err)):
        return False, None, math.inf  # 0 <= h_i < 0 is impossible
    keep = ~zero
    gk, hk, nk, ek = g[keep], h[keep], norms[keep], err[keep]
    if gk.shape[0] == 0:
        return True, x0.copy(), 0.0
    gn = gk / nk[:, None]
    slack = hk / nk - gn @ x0  # constraint in y: gn y <= slack
    # LDP: min ||y|| s.t. G' y >= h' with G' = -gn, h' = -slack
    e_mat = np.vstack([(-gn).T, (-slack)[None, :]])
    f_vec = np.zeros(n + 1)
    f_vec[n] = 1.0
    try:
        u, _ = optimize.nnls(e_mat, f_vec, maxiter=50 * (gk.shape[0] + n + 1))
    except (RuntimeError, ValueError) as exc:  # pragma: no cover - NNLS failure: keep
        logger.debug("NNLS failed (%s); keeping the region", exc)
        return True, None, math.nan
    r = e_mat @ u - f_vec
    dist = math.inf
    if abs(r[n]) > 1e-13:
        y = -r[:n] / r[n]
        dist = float(np.linalg.norm(y))
        cand = x0 + y
        viol = float(np.max(gk @ cand - hk - 1e-9 * ek)) if gk.shape[0] else -1.0
        if dist <= eps * (1 + 1e-9) and viol <= 0.0:
            return True, cand, dist
        if dist <= eps * (1 + 1e-9):
            return True, None, dist
    # certificate with lambda_i = u_i / ||g_i|| (rows of the original g)
    lam = u / nk
    phi = float(lam @ (gk @ x0 - hk) - eps * np.linalg.norm(gk.T @ lam))
    margin = 1e-11 * (gk.shape[0] + n) * float(lam @ ek)
    if phi > margin:
        return False, None, dist
    logger.debug("ball/polyhedron: no certificate (phi=%g, margin=%g); keeping", phi, margin)
    return True, None, dist


# --------------------------------------------------------------------------- exact L2


class _Budget:
    def __init__(self, max_regions: int, time_limit: float, what: str):
        self.max_regions, self.time_limit, self.what = max_regions, time_limit, what
        self.t0 = time.perf_counter()
        self.regions = 0
        self.nodes = 0

    def tick(self, leaf: bool = False) -> None:
        self.nodes += 1
        if leaf:
            self.regions += 1
        if self.regions > self.max_regions:
            raise LipboundError(
                f"{self.what}: more than max_regions={self.max_regions} activation regions "
                "meet the ball; the exact computation would not finish. Use a certified "
                "bound (recurjac, lipsdp) or a smaller eps, or raise max_regions.")
        if self.nodes % 64 == 0 and time.perf_counter() - self.t0 > self.time_limit:
            raise TimeLimitError(
                f"{self.what}: time limit of {self.time_limit:g} s reached after "
                f"{self.regions} regions; the exact computation would not finish. Use a "
                "certified bound (recurjac, lipsdp) or a smaller eps, or raise time_limit.")


def _check_size(layers: FCLayers, max_hidden: int, what: str) -> None:
    n_hidden = sum(w.shape[0] for w, _ in layers[:-1])
    if n_hidden > max_hidden:
        raise LipboundError(
            f"{what}: the network has {n_hidden} hidden units, more than max_hidden="
            f"{max_hidden}; exact methods enumerate activation patterns and would not "
            "finish. Use a certified bound (recurjac, lipsdp, autolip) instead.")


@dataclass(frozen=True)
class ExactL2Result:
    """Detailed outcome of :func:`exact_local_l2_detailed`.

    Attributes:
        bound: the result (``value`` is the upper end ``hi`` of the enclosure).
        lower: the attained lower end ``lo`` (NaN when the maximiser was not verified): the
            true constant lies in ``[lo, bound.value]``.
        witness: a point strictly inside the maximising region and the open ball, where the
            Jacobian norm equals the constant (None when not verified).
        regions: number of activation regions that meet the ball.
    """

    bound: BoundResult
    lower: float
    witness: np.ndarray | None
    regions: int


def exact_local_l2(net: nn.Module | Sequence[tuple[Any, Any]], x0: Any, eps: float, *,
                   output_map: Any | None = None, max_regions: int = 20000,
                   time_limit: float | None = 60.0, max_hidden: int = 256,
                   input_shape: Sequence[int] | None = None,
                   model_name: str | None = None) -> BoundResult:
    """Exact local L2 Lipschitz constant over all pairs in the ball ``B(x0, eps)``.

    See the module docstring for the quantity, the algorithm and the guarantee.

    Args:
        net: a fully connected ReLU network (module) or its layers ``[(W, b), ...]``.
        x0: centre, shape ``(1, *input_shape)`` or flat.
        eps: L2 radius (> 0).
        output_map: optional ``(m, n_out)`` matrix ``C``; the constant is then for ``C f``.
        max_regions: stop (LipboundError) when more regions than this meet the ball.
        time_limit: stop (:class:`~lipbound.baselines.deadline.TimeLimitError`) after this
            many seconds (> 0; ``None`` or ``inf``: no limit).
        max_hidden: refuse networks with more hidden units than this.
        input_shape: input shape without batch (only needed for some Normalize layers).
        model_name: name stored in the result.

    Returns:
        A :class:`~lipbound.results.BoundResult`, EXACT when the maximiser was verified,
        else CERTIFIED; ``notes`` give the number of regions and the witness.

    Raises:
        LipboundError: the network or the number of regions exceeds the budget.
    """
    return exact_local_l2_detailed(
        net, x0, eps, output_map=output_map, max_regions=max_regions, time_limit=time_limit,
        max_hidden=max_hidden, input_shape=input_shape, model_name=model_name).bound


def exact_local_l2_detailed(net: nn.Module | Sequence[tuple[Any, Any]], x0: Any, eps: float,
                            *, output_map: Any | None = None, max_regions: int = 20000,
                            time_limit: float | None = 60.0, max_hidden: int = 256,
                            input_shape: Sequence[int] | None = None,
                            model_name: str | None = None) -> ExactL2Result:
    """As :func:`exact_local_l2`, also returning the attained lower end and the witness."""
    t0 = time.perf_counter()
    layers = apply_output_map(as_fc(net, input_shape=input_shape), output_map)
    n0 = layers[0][0].shape[1]
    xc = check_x0(x0, n0, net, input_shape)
    eps = check_eps(eps)
    what = "exact local L2"
    check_range(layers, xc, eps, what=what)
    _check_size(layers, max_hidden, what)
    hidden = layers[:-1]
    n_layers = len(hidden)
    n_tot = n0 + sum(w.shape[0] for w, _ in layers)
    # validated as the other rivals' limits are (None or inf: no limit); a None used to fail
    # with a TypeError on the 64th branch node, NaN never stopped, -1 stopped at once
    limit = check_time_limit(time_limit)
    budget = _Budget(max_regions, math.inf if limit is None else limit, what)
    xabs = np.abs(xc)

    pattern = [np.zeros(w.shape[0]) for w, _ in hidden]
    maps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None] = [None] * n_layers
    cons_g: list[np.ndarray] = []
    cons_h: list[float] = []
    cons_e: list[float] = []
    leaves: list[dict[str, Any]] = []

    def layer_map(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        w, b = layers[k]
        if k == 0:
            return w, b, np.abs(w), np.abs(b)
        a_p, c_p, aa_p, ca_p = maps[k - 1]  # type: ignore[misc]
        d = pattern[k - 1]
        return (w @ (d[:, None] * a_p), w @ (d * c_p) + b,
                np.abs(w) @ (d[:, None] * aa_p), np.abs(w) @ (d * ca_p) + np.abs(b))

    def leaf(witness: np.ndarray | None) -> None:
        budget.tick(leaf=True)
        a_m, c_m, aa_m, ca_m = layer_map(n_layers) if n_layers else (
            layers[0][0], layers[0][1], np.abs(layers[0][0]), np.abs(layers[0][1]))
        val = safe_spectral_norm(a_m, product_error(aa_m, n_tot))
        leaves.append(dict(value=val, jac=a_m, jac_abs=aa_m, pattern=[p.copy() for p in pattern],
                           g=np.array(cons_g).reshape(len(cons_g), n0), h=np.array(cons_h),
                           e=np.array(cons_e), witness=witness))

    def visit(k: int, j: int, witness: np.ndarray | None) -> None:
        if k == n_layers:
            leaf(witness)
            return
        if j == 0:
            maps[k] = layer_map(k)
        a_k, c_k, aa_k, ca_k = maps[k]  # type: ignore[misc]
        if j == a_k.shape[0]:
            visit(k + 1, 0, witness)
            return
        budget.tick()
        a = a_k[j]
        ci = float(c_k[j])
        centre = float(a @ xc) + ci
        rad = eps * float(np.linalg.norm(a))
        err = float(aa_k[j] @ xabs + ca_k[j] + eps * np.linalg.norm(aa_k[j]))
        tol = 1e-11 * n_tot * err
        if centre - rad > tol:
            pattern[k][j] = 1.0
            visit(k, j + 1, witness)
            return
        if centre + rad < -tol:
            pattern[k][j] = 0.0
            visit(k, j + 1, witness)
            return
        # both signs possible on the ball: branch (the witness's own side first)
        sides = (1, 0)
        if witness is not None and float(a @ witness) + ci < 0:
            sides = (0, 1)
        for s in sides:
            g_row, h_val = (-a, ci) if s == 1 else (a, -ci)
            if witness is not None and float(g_row @ witness) <= h_val:
                meets, new_w = True, witness
            else:
                g_all = np.vstack([*cons_g, g_row]) if cons_g else g_row[None, :]
                h_all = np.array([*cons_h, h_val])
                e_all = np.array([*cons_e, err])
                meets, new_w, _ = ball_meets_polyhedron(g_all, h_all, xc, eps, e_all)
            if not meets:
                continue
            cons_g.append(g_row)
            cons_h.append(h_val)
            cons_e.append(err)
            pattern[k][j] = float(s)
            visit(k, j + 1, new_w)
            cons_g.pop()
            cons_h.pop()
            cons_e.pop()

    visit(0, 0, xc.copy())
    leaves.sort(key=lambda lf: -lf["value"])
    upper = leaves[0]["value"]
    notes = [chain_note(layers),
             f"{budget.regions} activation region(s) meet the ball "
             f"({budget.nodes} branch nodes)", *chain_caveats(layers)]
    # the attained lower end: the largest region verified to have interior in the open ball
    verified, lower, witness = False, math.nan, None
    for lf in leaves[:max_verify]:
        verified, lower, witness = _verify_l2(layers, lf, xc, eps, n_tot)
        if verified:
            break
    # upper and lower differ only by the rounding margins of the same Jacobian's norm
    if verified and upper - lower <= 1e-6 * upper:
        guarantee = Guarantee.EXACT
        notes.append(f"maximiser verified at a point strictly inside its region and the "
                     f"ball: the true value lies in [{lower:.12g}, {upper:.12g}]; witness "
                     f"x = {np.round(witness, 6)}")
    elif verified:
        guarantee = Guarantee.CERTIFIED
        notes.append(f"the largest region(s) are degenerate (no interior in the open ball "
                     f"could be verified): the true value lies in [{lower:.12g}, "
                     f"{upper:.12g}]; the value is the upper end")
    else:
        guarantee = Guarantee.CERTIFIED
        notes.append("no region could be verified to have interior in the open ball "
                     "(degenerate network); the value is an upper bound")
    notes.append("quantity is over ALL pairs in the ball (>= the constant relative to x0)")
    bound = BoundResult(
        value=upper, guarantee=guarantee, method="exact-l2",
        quantity="local L2 Lipschitz constant over all pairs in the L2 ball B(x0, eps)",
        eps=eps, seconds=time.perf_counter() - t0, norm="l2", model=model_name,
        notes=tuple(notes))
    return ExactL2Result(bound, lower if verified else math.nan, witness, budget.regions)


#: how many of the largest regions :func:`exact_local_l2_detailed` tries to verify
max_verify = 64


def _pattern_maps(layers: FCLayers, pattern: Sequence[np.ndarray]
                  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Affine maps ``z_k = A_k x + c_k`` (and abs versions) of every hidden layer."""
    out = []
    w, b = layers[0]
    a, c, aa, ca = w, b, np.abs(w), np.abs(b)
    out.append((a, c, aa, ca))
    for k in range(1, len(layers) - 1):
        w, b = layers[k]
        d = pattern[k - 1]
        a, c = w @ (d[:, None] * a), w @ (d * c) + b
        aa, ca = np.abs(w) @ (d[:, None] * aa), np.abs(w) @ (d * ca) + np.abs(b)
        out.append((a, c, aa, ca))
    return out


def _strict_signs(layers: FCLayers, pattern: Sequence[np.ndarray], x: np.ndarray,
                  n_tot: int) -> bool:
    """True if every hidden pre-activation at ``x`` has the pattern's sign, strictly.

    Units whose pre-activation is constant 0 on the region (zero row and zero offset) are
    skipped: they do not change the Jacobian and ``f`` stays differentiable.
    """
    zs = fc_preactivations(layers, x[None, :])
    for (a, c, aa, ca), d, z in zip(_pattern_maps(layers, pattern), pattern, zs, strict=True):
        tol = 1e-10 * n_tot * (aa @ np.abs(x) + ca)
        dead = (np.linalg.norm(a, axis=1) == 0) & (np.abs(c) <= tol)
        ok = np.where(d > 0.5, z[0] > tol, z[0] < -tol) | dead
        if not bool(np.all(ok)):
            return False
    return True


def _verify_l2(layers: FCLayers, leaf: dict[str, Any], x0: np.ndarray, eps: float,
               n_tot: int) -> tuple[bool, float, np.ndarray | None]:
    if len(layers) == 1:  # the Jacobian is W everywhere: attained at x0
        return True, _attained(leaf["jac"], leaf["jac_abs"], n_tot), x0
    g, h, e = leaf["g"], leaf["h"], leaf["e"]
    jac, jac_abs = leaf["jac"], leaf["jac_abs"]
    candidates: list[np.ndarray] = []
    if leaf.get("witness") is not None:
        candidates.append(leaf["witness"])
    norms = np.linalg.norm(g, axis=1) if g.size else np.zeros(0)
    for slack in (1e-6, 1e-8, 1e-4, 1e-3, 1e-2):
        if g.shape[0] == 0:
            candidates.append(x0)
            break
        meets, p, dist = ball_meets_polyhedron(g, h - slack * eps * norms, x0, eps, e)
        if meets and p is not None and dist < eps * (1 - 1e-9):
            candidates.append(p)
    for p in candidates:
        if np.linalg.norm(p - x0) < eps and _strict_signs(layers, leaf["pattern"], p, n_tot):
            return True, _attained(jac, jac_abs, n_tot), p
    return False, math.nan, None


def _attained(jac: np.ndarray, jac_abs: np.ndarray, n_tot: int) -> float:
    """A lower bound on the norm of the exact Jacobian whose float64 product is ``jac``: its
    SVD value less the SVD's error (``p(n) u ||J||``, taken as ``1e-12 n``) and less the
    product's rounding (:func:`~lipbound.baselines.fc.product_error`)."""
    s = float(np.linalg.svd(jac, compute_uv=False)[0])
    return max(s * (1 - 1e-12 * max(jac.shape)) - product_error(jac_abs, n_tot), 0.0)


# --------------------------------------------------------------------------- lipMIP


def _box_bounds(layers: FCLayers, x0: np.ndarray, eps: float
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interval bounds of every hidden pre-activation over the l_inf box, widened for rounding."""
    lo, hi = x0 - eps, x0 + eps
    out = []
    for w, b in layers[:-1]:
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        zc = w @ mid + b
        zr = np.abs(w) @ rad
        tol = 1e-10 * (np.abs(w) @ np.maximum(np.abs(lo), np.abs(hi)) + np.abs(b))
        zl, zu = zc - zr - tol, zc + zr + tol
        out.append((zl, zu))
        lo, hi = np.maximum(zl, 0.0), np.maximum(zu, 0.0)
    return out


def lipmip(net: nn.Module | Sequence[tuple[Any, Any]], x0: Any, eps: float, *,
           c: Any | None = None, input_norm: Literal["linf", "l1"] = "linf",
           time_limit: float = 60.0, max_hidden: int = 256,
           input_shape: Sequence[int] | None = None,
           model_name: str | None = None,
           solver: Literal["auto", "highspy", "scipy"] = "auto") -> BoundResult:
    """lipMIP: the exact local Lipschitz constant of ``c^T f`` on an l_inf box, by MILP.

    Args:
        net: a fully connected ReLU network (module) or its layers ``[(W, b), ...]``.
        x0: centre of the box, shape ``(1, *input_shape)`` or flat.
        eps: half-width of the box ``||x - x0||_inf <= eps`` (> 0).
        c: output weights ``(n_out,)`` of the scalar function ``c^T f`` (e.g.
            ``e_i - e_j`` for a logit margin); may be omitted for one output.
        input_norm: ``"linf"`` (constant w.r.t. ``||.||_inf``: maximise ``||grad||_1``) or
            ``"l1"`` (maximise ``||grad||_inf``).
        time_limit: HiGHS time limit in seconds.
        max_hidden: refuse networks with more hidden units than this.
        input_shape: input shape without batch (only needed for some Normalize layers).
        model_name: name stored in the result.
        solver: how HiGHS is called: ``"highspy"`` (the ``mip`` extra; reports the dual
            bound at the time limit also before HiGHS has a feasible point, and gets a
            feasible start from the pattern at ``x0``), ``"scipy"``
            (:func:`scipy.optimize.milp`, which returns no dual bound without a feasible
            point), or ``"auto"``: highspy when it is installed, else scipy.

    Returns:
        A :class:`~lipbound.results.BoundResult` (``norm`` ``"linf->abs"`` or
        ``"l1->abs"``); EXACT when verified, CERTIFIED if the maximiser is degenerate or
        HiGHS stopped at ``time_limit`` with a dual bound (then the value is that bound,
        times ``1 + 1e-6``, plus ``1e-6`` in the rescaled MILP's units). A note names the
        solver.

    Raises:
        TimeLimitError: HiGHS reached ``time_limit`` before it had a dual bound (the retry
            without presolve after a solver error gets what is left of the limit).
        InputError: bad arguments, or ``solver="highspy"`` without highspy installed.
        LipboundError: HiGHS failed otherwise.
    """
    if input_norm not in ("linf", "l1"):
        raise InputError(f"input_norm must be 'linf' or 'l1', got {input_norm!r}")
    if solver not in ("auto", "highspy", "scipy"):
        raise InputError(f"solver must be 'auto', 'highspy' or 'scipy', got {solver!r}")
    t0 = time.perf_counter()
    layers = as_fc(net, input_shape=input_shape)
    n_out = layers[-1][0].shape[0]
    if c is None:
        if n_out != 1:
            raise InputError(f"the network has {n_out} outputs: pass c (shape ({n_out},)), "
                             "e.g. e_i - e_j for the margin between classes i and j")
        cvec = np.ones(1)
    else:
        # real_array (review s22): a complex c lost its imaginary part silently
        cvec = real_array(c, "c").reshape(-1)
        if cvec.shape != (n_out,) or not np.isfinite(cvec).all():
            raise InputError(f"c must be a finite vector of shape ({n_out},), got {cvec.shape}")
    layers = apply_output_map(layers, cvec[None, :])
    n0 = layers[0][0].shape[1]
    xc = check_x0(x0, n0, net, input_shape)
    eps = check_eps(eps)
    check_range(layers, xc, eps, what="lipMIP")
    _check_size(layers, max_hidden, "lipMIP")
    n_tot = n0 + sum(w.shape[0] for w, _ in layers)
    dual = "l1" if input_norm == "linf" else "linf"
    quantity = (f"local Lipschitz constant of c^T f w.r.t. ||.||_{input_norm[1:]} over all "
                f"pairs in the l_inf box ||x - x0||_inf <= eps (max ||grad||_{dual[1:]})")
    notes = [chain_note(layers) + " (scalar output c^T f)", *chain_caveats(layers)]

    def result(value: float, guarantee: Guarantee, more: list[str]) -> BoundResult:
        return BoundResult(value=value, guarantee=guarantee, method="lipmip", quantity=quantity,
                           eps=eps, seconds=time.perf_counter() - t0,
                           norm=f"{input_norm}->abs", model=model_name,
                           notes=tuple(notes + more))

    def dual_norm(v: np.ndarray) -> float:
        return float(np.sum(np.abs(v)) if dual == "l1" else np.max(np.abs(v)))

    if len(layers) == 1:
        g = layers[0][0][0]
        return result(round_up(dual_norm(g) * (1 + 1e-15 * n0)), Guarantee.EXACT,
                      ["affine network: constant gradient"])
    # HiGHS works with absolute tolerances (feasibility 1e-7, matrix entries below 1e-9
    # dropped): on a box of half-width 3e-10 it returned a quarter of the true constant,
    # labelled EXACT. So the MILP is posed on an exactly rescaled copy: x = 2^s x' with
    # eps' = eps / 2^s in [0.5, 1), and every W_k times 2^-e_k (largest entry in [0.5, 1))
    # with b_k times 2^-(e_1 + ... + e_k). ReLU is positively homogeneous, so the patterns
    # are the same and the gradient scales by 2^(sum e_k - s); the pattern found is then
    # re-evaluated and verified on the original network.
    s_in = int(np.frexp(eps)[1])
    sc_layers: FCLayers = []
    shift, cum = -s_in, 0
    for k, (w, b) in enumerate(layers):
        w_k = np.ldexp(w, s_in) if k == 0 else w
        e_k = int(np.frexp(float(np.max(np.abs(w_k))))[1]) if np.any(w_k) else 0
        cum += e_k
        shift += e_k
        sc_layers.append((np.ldexp(w_k, -e_k), np.ldexp(b, -cum)))
    xs0, eps_s = np.ldexp(xc, -s_in), math.ldexp(eps, -s_in)
    milp = _LipMip(sc_layers, xs0, eps_s, dual)
    # HiGHS's tolerances are absolute, so a small optimum is solved only roughly (one of a
    # few 1e-7 came back as 0): the output layer is scaled up by a power of two (exact, as
    # above) until the interval bound of the objective is about 1 (at most 2^_MIP_UP, which
    # keeps the gradient variables' bounds moderate); what is left is the absolute
    # cushion _MIP_ABS
    bound = dual_norm(np.maximum(np.abs(milp.gl), np.abs(milp.gu)))
    if any(not np.any(f) for f in milp.fixed):
        # a layer whose units are all inactive on the box (by the interval bounds the MILP
        # rests on): f is constant there (a zero bound by cancellation would not show this)
        return result(0.0, Guarantee.EXACT, ["every unit of a hidden layer is inactive on "
                                             "the box (interval bounds): f is constant there"])
    # the objective at x0's pattern (a lower end of the optimum, in the MILP's units): scaled
    # up to about 1 as well, while the interval bound stays below 2^10
    start = milp.start(xs0)
    at_x0 = float(milp.objective() @ start)
    target = max(at_x0, math.ldexp(bound, -10)) if at_x0 > 0.0 else bound
    up = max(0, min(-int(np.frexp(target)[1]), _MIP_UP))
    if up > 0:
        w_k, b_k = sc_layers[-1]
        sc_layers[-1] = (np.ldexp(w_k, up), np.ldexp(b_k, up))
        shift -= up
        milp = _LipMip(sc_layers, xs0, eps_s, dual)
        start = milp.start(xs0)  # (the objective's scale changed)
    deadline = Deadline(time_limit, "lipMIP")
    hs = _highspy() if solver != "scipy" else None
    if solver == "highspy" and hs is None:
        raise InputError("solver='highspy' needs the highspy package (pip install "
                         "'lipbound[mip]'); solver='auto' uses scipy's HiGHS without it")

    def witness(sol: np.ndarray) -> tuple[float, bool, np.ndarray | None]:
        """The pattern of a MILP point: its gradient's dual norm on the original network, and
        whether it is realised strictly inside its region in the box (with the point)."""
        pattern = milp.pattern(sol)
        attained = dual_norm(_pattern_gradient(layers, pattern))
        # the witness LP on the well-scaled copy; the point maps back exactly (x = 2^s x')
        # and is checked on the original network: inside the box, every unit strictly of
        # its sign
        ok, xs = _verify_box(sc_layers, pattern, xs0, eps_s, n_tot)
        if ok and xs is not None:
            # one ulp inwards of the rounded box ends: inside the exact box
            xs = np.clip(np.ldexp(xs, s_in), np.nextafter(xc - eps, xc),
                         np.nextafter(xc + eps, xc))
            ok = _strict_signs(layers, pattern, xs, n_tot)
        return attained, bool(ok and xs is not None), xs

    def _finish(out: _MipOutcome) -> BoundResult:
        """The result of one HiGHS run (exact, certified at a time limit, or an error)."""
        notes_run: list[str] = []
        if out.status != "optimal" or out.x is None:
            if out.status == "time_limit" and out.dual_bound is not None:
                # stopped at the time limit with a dual bound: an upper bound on the maximum
                # (to HiGHS's tolerances, the same cushion as an optimal run's), not exact
                upper = round_up(math.ldexp(max(-out.dual_bound, 0.0), shift) * (1 + _MIP_MARGIN)
                                 + math.ldexp(_MIP_ABS, shift))
                more = [f"HiGHS ({out.solver}) stopped at the time limit of "
                        f"{deadline.time_limit:g} s: the value is the MILP dual bound, not the "
                        "exact constant (raise time_limit to close the gap)"]
                if out.x is not None:
                    attained, ok, _ = witness(out.x)
                    if ok:
                        more.append(f"the best pattern HiGHS found is realised strictly inside "
                                    f"its region in the box: the constant is at least "
                                    f"{attained:.12g} (that pattern's gradient norm, float64)")
                return result(upper, Guarantee.CERTIFIED, more)
            if out.status == "time_limit":
                raise deadline.error("the MILP had no dual bound yet")
            raise LipboundError(f"lipMIP: HiGHS stopped: {out.message}; no value"
                                + _far_hint(xc, eps))
        attained, ok, xs = witness(out.x)
        fun = -float(out.fun)  # type: ignore[arg-type]
        solver_upper = math.ldexp(max(-out.dual_bound if out.dual_bound is not None else fun,
                                      fun), shift)
        # HiGHS's dual bound is computed to its tolerances, not exactly: a relative cushion of
        # 1e-6 and an absolute one of 1e-6 on the rescaled, unit-sized problem (ten times the
        # feasibility tolerance; HiGHS's tolerances are absolute, so an optimum below a few
        # 1e-7 there came back as 0)
        upper = round_up(max(solver_upper, attained, 0.0) * (1 + _MIP_MARGIN)
                         + math.ldexp(_MIP_ABS, shift))
        if ok:
            notes_run.append(f"HiGHS optimal ({out.solver}): the constant lies in "
                             f"[{attained:.12g}, {upper:.12g}] (value of the optimal pattern, "
                             "realised in the box; MILP dual bound)")
        else:  # a pattern not shown to occur in the box bounds nothing from below
            notes_run.append(f"HiGHS optimal ({out.solver}): the constant is at most "
                             f"{upper:.12g} (MILP dual bound); the optimal pattern's gradient "
                             f"norm is {attained:.12g}, but the pattern was not verified to "
                             "occur in the box")
        # the gap is HiGHS's tolerance (integrality 1e-6 times a big-M coefficient)
        if ok and upper <= attained * (1 + 1e-5):
            notes_run.append(f"maximiser verified strictly inside its region; witness x = "
                             f"{np.round(xs, 6)}")
            return result(upper, Guarantee.EXACT, notes_run)
        notes_run.append("maximiser not verified (degenerate region or gap): value is the "
                         "MILP's upper bound")
        return result(upper, Guarantee.CERTIFIED, notes_run)

    # gradients at random points of the box (their patterns are strict there almost surely):
    # each one's dual norm is a value the constant attains; an optimum below one of them is
    # wrong (HiGHS 1.16's presolve returned 0.00107 as optimal for a constant of at least
    # 0.00245, labelled EXACT; session 24's fuzz, tests/test_fuzz_random_models.py)
    refuting = _sampled_gradient_norm(layers, xc, eps, dual_norm)

    def solve(strict: bool) -> _MipOutcome:
        return (_solve_highspy(hs, milp, start, deadline, strict) if hs is not None
                else _solve_scipy(milp, deadline, strict))

    res = _finish(solve(False))
    if res.value < refuting:
        logger.info("lipMIP: HiGHS's value %.12g is below the gradient norm %.12g found in "
                    "the box; solving again without presolve", res.value, refuting)
        res = _finish(solve(True))
        if res.value < refuting:
            raise LipboundError(
                f"lipMIP: HiGHS returned {res.value:.12g}, below the gradient norm "
                f"{refuting:.12g} attained in the box, also without presolve and with a "
                "feasibility tolerance of 1e-9: no value (a numerical failure of the MILP "
                "solver; try solver='scipy' or 'highspy', or rescale the network)")
        res = replace(res, notes=res.notes + (
            f"solved again without presolve: the first optimum was below the gradient norm "
            f"{refuting:.12g} attained at a sampled point of the box",))
    return res


#: random points of the box at which :func:`lipmip` checks HiGHS's optimum
_MIP_SAMPLES = 256


def _sampled_gradient_norm(layers: FCLayers, x0: np.ndarray, eps: float, dual_norm: Any
                           ) -> float:
    """The largest dual norm of the gradient of the (scalar) chain at ``x0`` and at
    :data:`_MIP_SAMPLES` uniform random points of the box ``||x - x0||_inf <= eps`` (a fixed
    seed), over the points where no pre-activation is 0 (there the gradient is the chain's
    derivative, and its dual norm a value the local constant attains); lowered by
    ``1e-9`` relative for its float64 rounding (and ``0.0`` when no point qualifies)."""
    gen = np.random.default_rng(0)
    pts = x0[None, :] + eps * gen.uniform(-1.0, 1.0, size=(_MIP_SAMPLES, x0.size))
    pts = np.concatenate([x0[None, :], np.clip(pts, x0 - eps, x0 + eps)])
    zs = fc_preactivations(layers, pts)
    best = 0.0
    for i in range(pts.shape[0]):
        if any(bool(np.any(z[i] == 0.0)) for z in zs):
            continue
        pattern = [(z[i] > 0.0).astype(np.float64) for z in zs]
        best = max(best, dual_norm(_pattern_gradient(layers, pattern)))
    return best * (1.0 - 1e-9) if math.isfinite(best) else 0.0


@dataclass
class _MipOutcome:
    """What a HiGHS run on the MILP ``min -objective`` gave: ``status`` ``"optimal"``,
    ``"time_limit"`` or ``"error"``; ``x`` the best point (None without one); ``fun`` its
    value; ``dual_bound`` HiGHS's lower bound on the minimum (finite, or None); ``solver``
    how HiGHS was called, for the notes."""

    status: str
    x: np.ndarray | None
    fun: float | None
    dual_bound: float | None
    message: str
    solver: str


def _solve_scipy(milp: _LipMip, deadline: Deadline, strict: bool = False) -> _MipOutcome:
    """The MILP through :func:`scipy.optimize.milp` (HiGHS bundled with scipy). scipy 1.17
    returns no dual bound while HiGHS has no feasible point, which at a time limit on a
    network of a few hundred hidden units is always the case (a ``TimeLimitError``).
    ``strict``: without presolve (the retry of :func:`lipmip` after a refuted optimum)."""
    for presolve in ((False,) if strict else (True, False)):
        # HiGHS's presolve occasionally ends in "solve error"
        # the retry gets what is left of the limit, not a second one
        res = optimize.milp(c=-milp.objective(), constraints=milp.constraints(),
                            integrality=milp.integrality(), bounds=milp.bounds(),
                            options={"time_limit": max(deadline.remaining(), 1e-3),
                                     "mip_rel_gap": 1e-9, "disp": False,
                                     "presolve": presolve})
        if res.status != 4 or deadline.expired():
            break
    dual_bound = getattr(res, "mip_dual_bound", None)
    if dual_bound is not None and not math.isfinite(dual_bound):
        dual_bound = None
    status = {0: "optimal", 1: "time_limit"}.get(res.status, "error")
    x = None if res.x is None else np.asarray(res.x, dtype=np.float64)
    return _MipOutcome(status, x, None if res.fun is None else float(res.fun),
                       None if dual_bound is None else float(dual_bound),
                       f"status {res.status} ({res.message})", "via scipy.optimize.milp")


_MIP_SMALL = 1e-8
"""Constraint coefficients at most this large are dropped from the MILP, the row's bounds
widened by their largest contribution (HiGHS ignores entries below 1e-9 itself, silently
changing the problem; ``_LipMip.constraints``)."""

#: a start point of the MILP is passed to HiGHS only when its float64 violation of every
#: bound, constraint (relative) and integrality is at most this
_START_TOL = 1e-9


def _highspy() -> Any | None:
    """The highspy module (the ``mip`` extra), or None when it is not installed."""
    try:
        import highspy
    except ImportError:
        return None
    return highspy


_banner_done = False
#: serialises the redirection of file descriptor 1 in :func:`_new_highs`: two threads doing
#: it at once left the second one's saved copy (of /dev/null) restored, stdout lost for good
_banner_lock = threading.Lock()


def _new_highs(hs: Any) -> Any:
    """A silent ``highspy.Highs``. Its first construction in a process prints HiGHS's banner
    on the C stdout (no option reaches it), which would corrupt ``--json`` output, so that
    one is built with file descriptor 1 pointed at /dev/null (and C's stdio flushed)."""
    with _banner_lock:
        h = _first_highs(hs)
    h.setOptionValue("output_flag", False)
    return h


def _far_hint(x0: np.ndarray, eps: float) -> str:
    """What to try when HiGHS fails on a box far from the origin for its width (its
    tolerances are absolute and it counts values from 1e20 as infinite); empty otherwise."""
    far = float(np.max(np.abs(x0))) / eps if x0.size else 0.0
    if not far >= 1e8:
        return ""
    return (f" (the box's centre lies {far:.3g} half-widths from the origin, beyond what "
            "HiGHS's tolerances resolve: shift the input so that x0 is near 0, by moving "
            "W_1 x0 into the first layer's bias, or use a larger eps)")


def _first_highs(hs: Any) -> Any:
    """``hs.Highs()``, the first one of the process with fd 1 at /dev/null (under
    ``_banner_lock``)."""
    global _banner_done
    if _banner_done:
        return hs.Highs()
    from lipbound._stdout import fd1_redirected

    with fd1_redirected(None):  # without a usable fd 1: the banner it is
        h = hs.Highs()
    _banner_done = True
    return h


def _solve_highspy(hs: Any, milp: _LipMip, start: np.ndarray | None, deadline: Deadline,
                   strict: bool = False) -> _MipOutcome:
    """The same MILP (``min -objective``, as scipy's) through highspy, which reports HiGHS's
    dual bound at a time limit also when no feasible point is known. A feasible start, the
    pattern of the box's centre (``start``: :meth:`_LipMip.start`), is passed when it passes the
    float64 check; HiGHS's ``threads`` option is left at its default (a different count than
    the one HiGHS's process-wide scheduler started with makes the run fail). ``strict`` (the
    retry of :func:`lipmip` after a refuted optimum): without presolve, and with the MIP
    feasibility tolerance 1e-9 instead of 1e-6."""
    cons = milp.constraints()
    a = sparse.csc_array(cons.A)
    lp = hs.HighsLp()
    lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
    lp.col_cost_ = -milp.objective()
    lp.col_lower_, lp.col_upper_ = np.array(milp.lb), np.array(milp.ub)
    lp.row_lower_, lp.row_upper_ = np.asarray(cons.lb, float), np.asarray(cons.ub, float)
    lp.sense_ = hs.ObjSense.kMinimize
    mat = lp.a_matrix_
    mat.format_ = hs.MatrixFormat.kColwise
    mat.num_col_, mat.num_row_ = a.shape[1], a.shape[0]
    mat.start_, mat.index_, mat.value_ = a.indptr, a.indices, a.data
    lp.integrality_ = [hs.HighsVarType.kInteger if i else hs.HighsVarType.kContinuous
                       for i in milp.integer]
    viol = milp.violation(start) if start is not None else math.inf
    if start is not None and not viol <= _START_TOL:
        logger.debug("lipMIP: the start point violates the MILP by %g; not passed", viol)
        start = None
    ok_status = (hs.HighsModelStatus.kOptimal, hs.HighsModelStatus.kTimeLimit)
    for presolve in (("off",) if strict else ("on", "off")):
        # (as with scipy: retry without presolve after an error)
        h = _new_highs(hs)
        h.setOptionValue("time_limit", float(max(deadline.remaining(), 1e-3)))
        h.setOptionValue("mip_rel_gap", 1e-9)
        h.setOptionValue("presolve", presolve)
        if strict:
            h.setOptionValue("mip_feasibility_tolerance", 1e-9)
        # a warning (kWarning) is not a refusal (HiGHS dropping tiny entries, were any left)
        if h.passModel(lp) == hs.HighsStatus.kError:
            raise LipboundError("lipMIP: highspy refused the MILP (passModel)"
                                + _far_hint(milp.x0, milp.eps))
        if start is not None:
            sol = hs.HighsSolution()
            sol.col_value = start.tolist()
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        status = h.getModelStatus()
        if status in ok_status or deadline.expired():
            break
    info = h.getInfo()
    x = None
    fun = None
    if info.primal_solution_status == hs.SolutionStatus.kSolutionStatusFeasible:
        x = np.array(h.getSolution().col_value, dtype=np.float64)
        fun = float(info.objective_function_value)
    dual_bound = float(info.mip_dual_bound)
    kind = ("optimal" if status == hs.HighsModelStatus.kOptimal else
            "time_limit" if status == hs.HighsModelStatus.kTimeLimit else "error")
    version = ".".join(str(getattr(hs, f"HIGHS_VERSION_{p}", "?"))
                       for p in ("MAJOR", "MINOR", "PATCH"))
    return _MipOutcome(kind, x, fun, dual_bound if math.isfinite(dual_bound) else None,
                       f"status {h.modelStatusToString(status)}",
                       f"via highspy, HiGHS {version}")


#: relative cushion on HiGHS's optimum in :func:`lipmip` (covers its tolerances)
_MIP_MARGIN = 1e-6

#: absolute cushion on HiGHS's optimum, in the units of the rescaled MILP (unit-sized box
#: and weights), where its absolute tolerances act: an optimum of 4e-7 there (a net whose
#: constant is 3e-6) came back as 0 with dual bound 0
_MIP_ABS = 1e-6

#: the most the output layer is scaled up in :func:`lipmip` (a power of two)
_MIP_UP = 20


def _pattern_gradient(layers: FCLayers, pattern: Sequence[np.ndarray]) -> np.ndarray:
    g = layers[-1][0][0]
    for k in range(len(layers) - 2, -1, -1):
        g = layers[k][0].T @ (pattern[k] * g)
    return g


def _verify_box(layers: FCLayers, pattern: Sequence[np.ndarray], x0: np.ndarray, eps: float,
                n_tot: int) -> tuple[bool, np.ndarray | None]:
    """Find x in the box with every hidden unit strictly of the pattern's sign (LP)."""
    n0 = x0.size
    rows, rhs = [], []
    for (a, c, _, _), d in zip(_pattern_maps(layers, pattern), pattern, strict=True):
        nrm = np.linalg.norm(a, axis=1)
        for i in range(a.shape[0]):
            if nrm[i] == 0.0:
                continue
            s = 1.0 if d[i] > 0.5 else -1.0
            # s (a x + c) >= t ||a||   <=>   -s a x + t ||a|| <= s c
            rows.append(np.concatenate([-s * a[i], [nrm[i]]]))
            rhs.append(s * c[i])
    obj = np.zeros(n0 + 1)
    obj[-1] = -1.0
    bnds = [(x0[i] - eps, x0[i] + eps) for i in range(n0)] + [(None, eps)]
    if rows:
        lp = optimize.linprog(obj, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bnds,
                              method="highs")
        if lp.status != 0 or lp.x is None or lp.x[-1] <= 0:
            return False, None
        x = np.clip(lp.x[:n0], x0 - eps, x0 + eps)
    else:
        x = x0.copy()
    return _strict_signs(layers, pattern, x, n_tot), x


class _LipMip:
    """Builds the MILP of :func:`lipmip` (variables, constraints, bounds, integrality)."""

    def __init__(self, layers: FCLayers, x0: np.ndarray, eps: float, dual: str):
        self.layers, self.dual = layers, dual
        self.n0 = x0.size
        self.x0, self.eps = x0, eps
        self.zb = _box_bounds(layers, x0, eps)
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []
        self._cons: optimize.LinearConstraint | None = None
        self.x = self._vars(x0 - eps, x0 + eps)
        self.h: list[np.ndarray] = []
        self.a: list[np.ndarray] = []
        self.fixed: list[np.ndarray] = []
        prev = self.x
        for (w, b), (zl, zu) in zip(layers[:-1], self.zb, strict=True):
            n = w.shape[0]
            act = np.where(zl >= 0, 1, np.where(zu <= 0, 0, -1))
            self.fixed.append(act)
            h = self._vars(np.zeros(n), np.maximum(zu, 0.0))
            a = self._vars(np.where(act == 1, 1.0, 0.0), np.where(act == 0, 0.0, 1.0), True)
            for i in range(n):
                lin = {int(j): -float(w[i, jj]) for jj, j in enumerate(prev) if w[i, jj] != 0}
                if act[i] == 1:  # h = z
                    self._row({**lin, int(h[i]): 1.0}, float(b[i]), float(b[i]))
                elif act[i] == -1:
                    self._row({**lin, int(h[i]): 1.0}, float(b[i]), math.inf)  # h >= z
                    self._row({**lin, int(h[i]): 1.0, int(a[i]): -float(zl[i])}, -math.inf,
                              float(b[i] - zl[i]))  # h <= z - l (1 - a)
                    self._row({int(h[i]): 1.0, int(a[i]): -float(zu[i])}, -math.inf, 0.0)
            self.h.append(h)
            self.a.append(a)
            prev = h
        # backward pass: v_k = a_k * g_k, g_{k-1} = W_k^T v_k, g_{K-1} = w_K (constant)
        g_const: np.ndarray | None = layers[-1][0][0].copy()
        g_lin: tuple[np.ndarray, np.ndarray] | None = None  # (matrix, vars) for g = M v
        gl = gu = g_const
        v_next = None
        self.v: list[np.ndarray] = [np.zeros(0, dtype=int)] * (len(layers) - 1)
        for k in range(len(layers) - 2, -1, -1):
            n = layers[k][0].shape[0]
            act = self.fixed[k]
            vl = np.where(act == 1, gl, np.where(act == 0, 0.0, np.minimum(gl, 0.0)))
            vu = np.where(act == 1, gu, np.where(act == 0, 0.0, np.maximum(gu, 0.0)))
            # widen relatively (a zero bound stays exact: HiGHS dislikes tiny bounds)
            v = self._vars(vl - 1e-10 * np.abs(vl), vu + 1e-10 * np.abs(vu))
            self.v[k] = v
            for i in range(n):
                if act[i] == 0:
                    continue
                if g_const is not None:
                    gexpr: dict[int, float] = {}
                    gconst = float(g_const[i])
                else:
                    mat, vars_ = g_lin  # type: ignore[misc]
                    gexpr = {int(j): float(mat[i, jj]) for jj, j in enumerate(vars_)
                             if mat[i, jj] != 0}
                    gconst = 0.0
                neg = {j: -val for j, val in gexpr.items()}
                ai = int(self.a[k][i])
                if act[i] == 1:  # v = g
                    self._row({**neg, int(v[i]): 1.0}, gconst, gconst)
                    continue
                lo_i, hi_i = float(gl[i]), float(gu[i])
                self._row({int(v[i]): 1.0, ai: -hi_i}, -math.inf, 0.0)  # v <= gu a
                self._row({int(v[i]): 1.0, ai: -lo_i}, 0.0, math.inf)  # v >= gl a
                # v - g - gl a <= -gl   and   v - g - gu a >= -gu
                self._row({**neg, int(v[i]): 1.0, ai: -lo_i}, -math.inf, gconst - lo_i)
                self._row({**neg, int(v[i]): 1.0, ai: -hi_i}, gconst - hi_i, math.inf)
            w = layers[k][0]
            g_lin = (w.T, v)
            g_const = None
            wp, wn = np.maximum(w.T, 0), np.minimum(w.T, 0)
            gl, gu = wp @ vl + wn @ vu, wp @ vu + wn @ vl
            v_next = v
        self.grad_vars = v_next  # gradient = W_1^T v_1
        self.gl, self.gu = gl, gu
        self.obj: dict[int, float] = {}
        # the objective's own variables, for :meth:`start`: (input, p, q, s) of each input
        # whose gradient entry can take both signs (l1), and (input, sign, e) with t (linf)
        self.l1_split: list[tuple[int, int, int, int]] = []
        self.linf_sel: list[tuple[int, float, int]] = []
        self.t_var = -1
        w1t = layers[0][0].T
        big = float(np.max(np.maximum(np.abs(gl), np.abs(gu)))) * 2.0 + 1.0
        if dual == "l1":
            for i in range(self.n0):
                grad = {int(j): float(w1t[i, jj]) for jj, j in enumerate(v_next)}
                if gl[i] >= 0:
                    for j, val in grad.items():
                        self.obj[j] = self.obj.get(j, 0.0) + val
                elif gu[i] <= 0:
                    for j, val in grad.items():
                        self.obj[j] = self.obj.get(j, 0.0) - val
                else:
                    p, q = self._vars(np.zeros(1), np.array([gu[i]])), self._vars(
                        np.zeros(1), np.array([-gl[i]]))
                    s = self._vars(np.zeros(1), np.ones(1), True)
                    negg = {j: -val for j, val in grad.items()}
                    self._row({**negg, int(p[0]): 1.0, int(q[0]): -1.0}, 0.0, 0.0)
                    self._row({int(p[0]): 1.0, int(s[0]): -float(gu[i])}, -math.inf, 0.0)
                    self._row({int(q[0]): 1.0, int(s[0]): -float(gl[i])}, -math.inf,
                              -float(gl[i]))
                    self.obj[int(p[0])] = 1.0
                    self.obj[int(q[0])] = 1.0
                    self.l1_split.append((i, int(p[0]), int(q[0]), int(s[0])))
        else:
            t = self._vars(np.zeros(1), np.array([big]))
            sel = []
            for i in range(self.n0):
                grad = {int(j): float(w1t[i, jj]) for jj, j in enumerate(v_next)}
                for sign in (1.0, -1.0):
                    e = self._vars(np.zeros(1), np.ones(1), True)
                    sel.append(int(e[0]))
                    self.linf_sel.append((i, sign, int(e[0])))
                    # t <= sign * grad + big (1 - e)
                    row = {j: -sign * val for j, val in grad.items()}
                    row[int(t[0])] = 1.0
                    row[int(e[0])] = big
                    self._row(row, -math.inf, big)
            self._row({j: 1.0 for j in sel}, 1.0, 1.0)
            self.obj[int(t[0])] = 1.0
            self.t_var = int(t[0])
        self.big = big

    def _vars(self, lo: np.ndarray, hi: np.ndarray, integer: bool = False) -> np.ndarray:
        start = len(self.lb)
        self.lb.extend(float(v) for v in lo)
        self.ub.extend(float(v) for v in hi)
        self.integer.extend([1 if integer else 0] * len(lo))
        return np.arange(start, start + len(lo))

    def _row(self, coef: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append((coef, lo, hi))

    def objective(self) -> np.ndarray:
        c = np.zeros(len(self.lb))
        for j, v in self.obj.items():
            c[j] = v
        return c

    def constraints(self) -> optimize.LinearConstraint:
        if self._cons is not None:  # built once (the model is complete by then)
            return self._cons
        r, cidx, vals, lo, hi = [], [], [], [], []
        for i, (coef, lo_i, hi_i) in enumerate(self.rows):
            slack = 0.0
            for j, v in coef.items():
                if v != 0.0 and abs(v) <= _MIP_SMALL:
                    # HiGHS drops such entries, which changes the MILP; dropped here instead,
                    # with the row widened by the most the term can contribute: a relaxation,
                    # so the maximum (and every dual bound) can only grow
                    slack += abs(v) * max(abs(self.lb[j]), abs(self.ub[j]))
                    continue
                r.append(i)
                cidx.append(j)
                vals.append(v)
            if slack > 0.0:
                slack *= 1.0 + 1e-12  # the sum's rounding
                lo_i = float(np.nextafter(lo_i - slack, -np.inf))
                hi_i = float(np.nextafter(hi_i + slack, np.inf))
            lo.append(lo_i)
            hi.append(hi_i)
        mat = sparse.csr_array((vals, (r, cidx)), shape=(len(self.rows), len(self.lb)))
        self._cons = optimize.LinearConstraint(mat, np.array(lo), np.array(hi))
        return self._cons

    def bounds(self) -> optimize.Bounds:
        return optimize.Bounds(np.array(self.lb), np.array(self.ub))

    def integrality(self) -> np.ndarray:
        return np.array(self.integer)

    def pattern(self, sol: np.ndarray) -> list[np.ndarray]:
        return [np.round(sol[a]).clip(0, 1) for a in self.a]

    def start(self, x: np.ndarray) -> np.ndarray:
        """A point of the MILP built from the input ``x`` (in the box): the forward pass's
        pre-activations and ReLU pattern (units fixed by the interval bounds keep their fixed
        value), the gradient propagated back through that pattern, and the objective's sign
        variables set from that gradient. Feasible in exact arithmetic; check it in float64
        with :meth:`violation` before use."""
        sol = np.zeros(len(self.lb))
        sol[self.x] = x
        h = x
        pattern = []
        for (w, b), fixed, hv, av in zip(self.layers[:-1], self.fixed, self.h, self.a,
                                         strict=True):
            z = w @ h + b
            a = np.where(fixed == 1, 1.0, np.where(fixed == 0, 0.0, (z > 0).astype(float)))
            h = np.where(fixed == 1, z, np.where(fixed == 0, 0.0, np.maximum(z, 0.0)))
            sol[hv], sol[av] = h, a
            pattern.append(a)
        g = self.layers[-1][0][0]
        for k in range(len(self.layers) - 2, -1, -1):
            v = pattern[k] * g
            sol[self.v[k]] = v
            g = self.layers[k][0].T @ v
        for i, p, q, s in self.l1_split:
            sol[p], sol[q], sol[s] = max(g[i], 0.0), max(-g[i], 0.0), float(g[i] > 0)
        if self.t_var >= 0:
            best = max(self.linf_sel, key=lambda t: t[1] * g[t[0]])
            sol[best[2]] = 1.0
            sol[self.t_var] = best[1] * g[best[0]]
        return sol

    def violation(self, sol: np.ndarray) -> float:
        """The largest violation of a bound, a constraint or integrality by ``sol``, in float64
        (each constraint's relative to ``1 +`` the magnitude of its terms)."""
        lb, ub = np.array(self.lb), np.array(self.ub)
        worst = max(float(np.max(lb - sol, initial=0.0)), float(np.max(sol - ub, initial=0.0)))
        ints = np.array(self.integer, dtype=bool)
        worst = max(worst, float(np.max(np.abs(sol[ints] - np.round(sol[ints])), initial=0.0)))
        cons = self.constraints()
        act = cons.A @ sol
        scale = 1.0 + abs(cons.A) @ np.abs(sol)
        over = np.maximum(cons.lb - act, act - cons.ub) / scale
        return max(worst, float(np.max(over, initial=0.0)))
