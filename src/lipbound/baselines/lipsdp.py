"""LipSDP: Lipschitz bounds from a semidefinite program.

Reference: M. Fazlyab, A. Robey, H. Hassani, M. Morari and G. J. Pappas, *Efficient and
Accurate Estimation of Lipschitz Constants for Deep Neural Networks*, NeurIPS 2019
(Theorem 2, the multi-layer form; variants LipSDP-Neuron and LipSDP-Layer).

Quantity: the **global** L2 Lipschitz constant of ``f`` (all pairs of inputs).

The SDP. Stack ``z = (x, h_1, ..., h_{K-1})`` (input and hidden post-activations), let
``A = [blkdiag(W_1, ..., W_{K-1}), 0]`` and ``B = [0, I]`` so that ``A z`` are the hidden
pre-activations (without biases) and ``B z`` the hidden outputs. ReLU is slope-restricted in
``[0, 1]``, so for every diagonal ``T >= 0`` the incremental quadratic constraint
``(Δp)^T T (Δh) - (Δh)^T T (Δh) >= 0`` holds for any two inputs. If

    M(rho, T) = A^T T B + B^T T A - 2 B^T T B + blkdiag(-rho I, 0, ..., 0, W_K^T W_K) <= 0

then ``||f(x) - f(y)|| <= sqrt(rho) ||x - y||`` for all ``x, y``. The program minimises rho
over ``T`` diagonal and non-negative: one multiplier per neuron (``variant="neuron"``) or
one per layer (``variant="layer"``). The paper's LipSDP-Network variant (coupling between
neurons) is omitted: Pauli et al. (IEEE L-CSS 2022, "Training robust neural networks using
Lipschitz bounds") showed that coupling is not valid for ReLU in general.

Guarantee -- soundness despite solver tolerance:

1. Only a solve with status ``optimal``, ``optimal_inaccurate`` or ``user_limit`` (the
   last two: stopped early, e.g. SCS or Clarabel at an iteration or time limit) and finite
   values is checked; any other status (infeasible, unbounded, solver error) is never
   reported as a bound: the value is NaN, the guarantee ESTIMATE, and a note gives the
   status. The solver's accuracy plays no part in the guarantee (the check below is the
   proof, whatever produced ``(rho, T)``); a solve stopped early and certified by it may
   only be looser than the SDP's optimum, and its notes say so.
2. After such a solve, the multipliers are clipped to ``T >= 0`` and the LMI is checked
   in float64 on the Jacobi-scaled matrix ``S M S`` (``S`` positive diagonal, so the
   signs of the eigenvalues are those of ``M``): its largest eigenvalue must be
   <= ``-margin``, where ``margin = 1e-12 * dim * (||S M_abs S||_F + rho max S_x^2)``
   exceeds the rounding error of forming it (bounded entrywise through ``M_abs``, the same
   expression in absolute values) and of the symmetric eigensolver. If it is violated, rho
   is raised until the check passes: the rho term is ``-rho * blkdiag(I, 0)``, so ``M``
   decreases monotonically in rho, and the first candidate is the exact Schur-complement
   value ``lambda_max(Q (-R)^{-1} Q^T)``. The margin is ~1e4 times the float64 error, so it
   also covers the rounding of the rescaled weights below. Only then is ``sqrt(rho)``
   (rounded up) reported, with guarantee CERTIFIED. If no rho passes (the hidden block is
   not negative definite at the solver's ``T``), the SDP is solved once more with a strict
   margin ``M <= -tau I`` and checked again.

Weights are rescaled to unit spectral norm before solving (ReLU is positively homogeneous,
so ``L(f) = prod_k ||W_k|| L(f_scaled)`` and the LMI is solved for the scaled network); the
bound is scaled back and rounded up.

Requires the optional dependencies ``cvxpy`` and a solver (Clarabel, else SCS):
``pip install lipbound[sdp]``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import nn

from lipbound.baselines.deadline import NO_LIMIT, Deadline
from lipbound.baselines.fc import (
    FCLayers,
    apply_output_map,
    as_fc,
    chain_caveats,
    chain_note,
    check_range,
    round_up,
    safe_spectral_norm,
)
from lipbound.errors import InputError, LipboundError
from lipbound.results import BoundResult, Guarantee

logger = logging.getLogger(__name__)

__all__ = ["lipsdp", "certify_lmi", "LMICertificate", "MissingDependencyError", "lmi_parts",
           "MAX_DIM"]

_QUANTITY = "global L2 Lipschitz constant (all pairs of inputs)"

#: default largest LMI dimension (input plus hidden units) :func:`lipsdp` attempts; measured
#: with cvxpy + Clarabel on 2 shared cores (networks n/3-n/3-n/3-10): dimension 57 (compnet)
#: ~1.5 s, 90 ~13 s, 120 ~44 s (1.3 GB), 150 ~140 s, 300 ran out of memory
MAX_DIM = 128


class MissingDependencyError(LipboundError, ImportError):
    """An optional dependency (cvxpy, an SDP solver) is not installed."""


def _import_cvxpy() -> Any:
    try:
        import cvxpy as cp
    except ImportError as exc:
        raise MissingDependencyError(
            "LipSDP needs the optional dependency cvxpy with an SDP solver (Clarabel or SCS); "
            "install them with: pip install lipbound[sdp]") from exc
    return cp


# --------------------------------------------------------------------------- the LMI


def lmi_parts(layers: FCLayers) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(A, B, F, P_x)`` of ``M(rho, T) = A^T T B + B^T T A - 2 B^T T B + F - rho P_x``."""
    n0 = layers[0][0].shape[1]
    widths = [w.shape[0] for w, _ in layers[:-1]]
    n = sum(widths)
    dim = n0 + n
    a = np.zeros((n, dim))
    b = np.zeros((n, dim))
    row, col = 0, 0
    for k, (w, _) in enumerate(layers[:-1]):
        nk, nin = w.shape
        a[row:row + nk, col:col + nin] = w
        b[row:row + nk, n0 + row:n0 + row + nk] = np.eye(nk)
        row += nk
        col += nin if k == 0 else widths[k - 1]
    f = np.zeros((dim, dim))
    wk = layers[-1][0]
    last = widths[-1] if widths else 0
    if last:
        f[dim - last:, dim - last:] = wk.T @ wk
    px = np.zeros((dim, dim))
    px[:n0, :n0] = np.eye(n0)
    return a, b, f, px


@dataclass(frozen=True)
class LMICertificate:
    """Outcome of the float64 check of ``M(rho, T) <= 0``.

    Attributes:
        ok: the check passed for ``rho``.
        rho: the smallest checked rho that passed (NaN when ``ok`` is False).
        rho_in: the rho that was given (e.g. by the solver).
        lambda_max: the largest eigenvalue of ``M(rho, T)`` at the returned rho.
        margin: the rounding margin the eigenvalue had to clear.
        reason: why the check failed, if it did.
    """

    ok: bool
    rho: float
    rho_in: float
    lambda_max: float
    margin: float
    reason: str = ""


def certify_lmi(layers: FCLayers, t_diag: np.ndarray, rho: float) -> LMICertificate:
    """Check ``M(rho, T) <= 0`` in float64 with a rounding margin, raising rho if needed.

    Args:
        layers: the network (the LMI ignores biases).
        t_diag: the diagonal of ``T`` (one entry per hidden neuron); negative entries are
            clipped to 0 (``T >= 0`` is part of the theorem's hypothesis).
        rho: the candidate ``L^2``.

    Returns:
        An :class:`LMICertificate`; when ``ok``, ``sqrt(rho)`` is a certified global L2 bound.
    """
    a, b, f, _ = lmi_parts(layers)
    t = np.maximum(np.asarray(t_diag, dtype=np.float64), 0.0)
    dim = a.shape[1]
    n0 = layers[0][0].shape[1]
    if not bool(np.all(np.isfinite(t))):
        return LMICertificate(False, math.nan, float(rho), math.nan, math.nan,
                              "a multiplier of T is not finite")
    s = b.T @ (t[:, None] * a)
    m0 = s + s.T - 2.0 * (b.T @ (t[:, None] * b)) + f
    m0 = 0.5 * (m0 + m0.T)
    # the same expression in absolute values bounds the rounding error of every entry
    wk = layers[-1][0]
    s_abs = np.abs(b).T @ (t[:, None] * np.abs(a))
    m_abs = s_abs + s_abs.T + 2.0 * (np.abs(b).T @ (t[:, None] * np.abs(b)))
    n_last = layers[-2][0].shape[0] if len(layers) > 1 else 0
    if n_last:
        m_abs[dim - n_last:, dim - n_last:] += np.abs(wk).T @ np.abs(wk)
    rho_in = float(rho)
    rho = max(rho_in, 0.0) if math.isfinite(rho_in) else 0.0
    # Jacobi scaling S M S (S diagonal, positive): same sign pattern of eigenvalues, but a
    # huge multiplier on one neuron no longer inflates the margin of all the others
    diag = np.abs(np.diag(m0)).copy()
    diag[:n0] = rho if rho > 0 else 1.0
    sc = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    ms0 = sc[:, None] * m0 * sc[None, :]
    if not bool(np.all(np.isfinite(ms0))):  # (an overflow: 2 T beyond float64's range)
        return LMICertificate(False, math.nan, rho_in, math.nan, math.nan,
                              "M(rho, T) overflows float64")
    abs_norm = float(np.linalg.norm(sc[:, None] * m_abs * sc[None, :]))
    with np.errstate(over="ignore"):  # (inf for a subnormal rho: refused below)
        pxs = sc[:n0] ** 2  # the rho term of S M S is -rho * diag(pxs) on the x block
    idx = np.arange(n0)

    # below the normal range a product's rounding is absolute (up to 2^-1075), not relative:
    # an entry of M (at most n_out + 3 products and halvings) is off by up to
    # (n_out + 3) 2^-1074 more, i.e. sc_i sc_j times that in S M S, whose norm is at most
    # (n_out + 3) 2^-1074 ||sc||^2 (inf, so no rho passes, when ||sc||^2 overflows: multipliers
    # in the subnormal range; before, 1-D nets with T ~ 1e-320 passed at rho below L^2)
    with np.errstate(over="ignore"):
        tiny = 2.0 * (wk.shape[0] + 3) * 2.0 ** -1074 * float(np.sum(sc * sc))
    if not tiny <= 1.0:
        return LMICertificate(False, math.nan, rho_in, math.nan, math.nan,
                              "entries of M(rho, T) below float64's normal range (multipliers, "
                              "weights or rho too small): its rounding is not bounded")

    def margin_at(r: float) -> float:
        return 1e-12 * dim * (abs_norm + r * float(np.max(pxs, initial=0.0))) + tiny

    def lam_at(r: float) -> float:
        m = ms0.copy()
        m[idx, idx] -= r * pxs
        return float(np.linalg.eigvalsh(m)[-1])

    # Schur complement: M <= 0  iff  R <= 0 and rho diag(pxs) >= Q (-R)^{-1} Q^T
    r_blk = ms0[n0:, n0:]
    q_blk = ms0[:n0, n0:]
    if r_blk.size:
        er, vr = np.linalg.eigh(r_blk)
        if er[-1] >= -margin_at(rho):
            return LMICertificate(False, math.nan, rho_in, float(er[-1]), margin_at(rho),
                                  "the hidden block of M(rho, T) is not negative definite")
        qv = (q_blk / np.sqrt(pxs)[:, None]) @ vr
        schur = float(np.max(np.linalg.eigvalsh((qv / (-er)[None, :]) @ qv.T))) if n0 else 0.0
        rho = max(rho, schur * (1 + 1e-9))
    lam = lam_at(rho)
    step_scale = 1.0 / float(np.min(pxs)) if n0 else 1.0
    for it in range(80):
        mg = margin_at(rho)
        if lam <= -mg:
            return LMICertificate(True, rho, rho_in, lam, mg)
        rho = rho + (lam + mg) * step_scale * (2.0 ** it) + 1e-15 * (1.0 + rho)
        lam = lam_at(rho)
    return LMICertificate(False, math.nan, rho_in, lam, margin_at(rho),
                          "no rho passed the float64 check")


# --------------------------------------------------------------------------- solving


#: solver statuses whose multipliers are checked (any other: no bound)
_CHECKED_STATUSES = ("optimal", "optimal_inaccurate", "user_limit")

#: each solver's own time-limit option (seconds)
_TIME_OPTION = {"CLARABEL": "time_limit", "SCS": "time_limit_secs"}


def _with_time_limit(solver: str, opts: Mapping[str, Any], deadline: Deadline
                     ) -> dict[str, Any]:
    """``opts`` with the time left as ``solver``'s own limit (:data:`_TIME_OPTION`) unless
    already set; unchanged without a limit or for another solver."""
    out = dict(opts)
    key = _TIME_OPTION.get(solver)
    left = deadline.remaining()
    if key is not None and math.isfinite(left):
        out.setdefault(key, max(left, 1e-3))
    return out


def _solve(cp: Any, layers: FCLayers, variant: str, solver: str | None,
           solver_options: Mapping[str, Any], tau: float, deadline: Deadline = NO_LIMIT
           ) -> tuple[str, str, float, np.ndarray]:
    """Solve the SDP; return ``(solver, status, rho, t_diag)``. The solver gets the time
    ``deadline`` leaves as its own limit."""
    a, b, f, px = lmi_parts(layers)
    widths = [w.shape[0] for w, _ in layers[:-1]]
    n = sum(widths)
    dim = a.shape[1]
    if variant == "neuron":
        lam = cp.Variable(n, nonneg=True)
        t_expr = lam
    else:
        lam = cp.Variable(len(widths), nonneg=True)
        expand = np.zeros((n, len(widths)))
        row = 0
        for k, nk in enumerate(widths):
            expand[row:row + nk, k] = 1.0
            row += nk
        t_expr = expand @ lam
    rho = cp.Variable(nonneg=True)
    tmat = cp.diag(t_expr)
    s = a.T @ tmat @ b
    m = s + s.T - 2.0 * (b.T @ tmat @ b) + f - rho * px
    cons = [m << -tau * np.eye(dim)]
    prob = cp.Problem(cp.Minimize(rho), cons)
    installed = set(cp.installed_solvers())
    if solver is not None:
        order = [solver.upper()]
    else:
        order = [s_ for s_ in ("CLARABEL", "SCS") if s_ in installed]
    if not order:
        raise MissingDependencyError("no SDP solver found for cvxpy (Clarabel or SCS); "
                                     "install them with: pip install lipbound[sdp]")
    last_err = ""
    for name in order:
        if name not in installed:
            last_err = f"solver {name} is not installed (installed: {sorted(installed)})"
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prob.solve(solver=name, **_with_time_limit(name, solver_options, deadline))
            for w in caught:
                logger.info("LipSDP solver %s: %s", name, w.message)
        except cp.error.SolverError as exc:
            last_err = f"solver {name} failed: {exc}"
            logger.warning("LipSDP: %s", last_err)
            continue
        t_val = (np.asarray(t_expr.value, dtype=np.float64).reshape(-1)
                 if t_expr.value is not None else np.full(n, np.nan))
        rho_val = float(rho.value) if rho.value is not None else math.nan
        return name, str(prob.status), rho_val, t_val
    return order[-1], f"error ({last_err})", math.nan, np.full(n, np.nan)


def lipsdp(net: nn.Module | Sequence[tuple[Any, Any]], *,
           variant: Literal["neuron", "layer"] = "neuron", solver: str | None = None,
           solver_options: Mapping[str, Any] | None = None, output_map: Any | None = None,
           input_shape: Sequence[int] | None = None, model_name: str | None = None,
           max_dim: int = MAX_DIM, time_limit: float | None = None) -> BoundResult:
    """LipSDP-Neuron or LipSDP-Layer bound on the global L2 Lipschitz constant.

    Args:
        net: a fully connected ReLU network (module) or its layers ``[(W, b), ...]``.
        variant: ``"neuron"`` (one multiplier per neuron, tighter) or ``"layer"``.
        solver: cvxpy solver name; default Clarabel, falling back to SCS.
        solver_options: keyword arguments for ``Problem.solve`` (e.g. ``{"max_iters": 1}``
            for SCS).
        output_map: optional ``(m, n_out)`` matrix ``C``; the bound is then for ``C f``.
        input_shape: input shape without batch (only needed for some Normalize layers).
        model_name: name stored in the result.
        max_dim: refuse (``LipboundError``) when the LMI's dimension ``n_0 + sum(n_k)``
            (input plus hidden units) exceeds this: cvxpy's dense formulation grows so fast
            that a few hundred would take hours and tens of gigabytes (default
            :data:`MAX_DIM`).
        time_limit: seconds (``None``: no limit), checked before and after each SDP solve;
            the solver itself gets the time left as its own limit (Clarabel ``time_limit``,
            SCS ``time_limit_secs``, unless ``solver_options`` sets it); a solve it stops
            is still checked (a certified value, possibly looser than the optimum, when
            the check passes), otherwise :class:`~lipbound.baselines.deadline.TimeLimitError`
            is raised.

    Returns:
        A :class:`~lipbound.results.BoundResult`: CERTIFIED after the float64 LMI check
        passed, otherwise value NaN and guarantee ESTIMATE with the reason in ``notes``.
        ``notes`` always holds the solver, its status and the check.

    Raises:
        MissingDependencyError: cvxpy (or every solver) is missing.
        InputError: unknown ``variant``.
        LipboundError: the LMI is larger than ``max_dim``.
        TimeLimitError: ``time_limit`` passed before a certified value was found.
    """
    if variant not in ("neuron", "layer"):
        raise InputError(f"variant must be 'neuron' or 'layer', got {variant!r}")
    cp = _import_cvxpy()
    if solver is not None:  # (a solver that is not installed gave a NaN "estimate")
        installed = sorted(cp.installed_solvers())
        if not isinstance(solver, str) or solver.upper() not in installed:
            raise InputError(f"solver {solver!r} is not an installed cvxpy solver; use one of "
                             f"{', '.join(installed)}, or None for Clarabel (else SCS)")
    t0 = time.perf_counter()
    deadline = Deadline(time_limit, f"LipSDP-{variant}")
    layers = apply_output_map(as_fc(net, input_shape=input_shape), output_map)
    check_range(layers, what="LipSDP")
    dim = layers[0][0].shape[1] + sum(w.shape[0] for w, _ in layers[:-1])
    if dim > max_dim and len(layers) > 1:
        raise LipboundError(
            f"LipSDP: the LMI has dimension {dim} (input plus hidden units of the "
            f"{chain_note(layers)}), more than max_dim={max_dim}; the SDP would take hours and "
            "tens of GB (raise max_dim to try anyway)")
    method = f"lipsdp-{variant}"
    base_notes = [chain_note(layers), *chain_caveats(layers)]

    def result(value: float, guarantee: Guarantee, notes: list[str]) -> BoundResult:
        return BoundResult(value=value, guarantee=guarantee, method=method, quantity=_QUANTITY,
                           eps=None, seconds=time.perf_counter() - t0, norm="l2",
                           model=model_name, notes=tuple(base_notes + notes))

    norms = [safe_spectral_norm(w) for w, _ in layers]
    if len(layers) == 1 or any(not np.any(w) for w, _ in layers):
        v = round_up(math.prod(norms) * (1 + 4e-16 * len(layers)))
        why = "no hidden layer: the bound is ||W||" if len(layers) == 1 else "a zero layer"
        return result(v, Guarantee.CERTIFIED, [why])
    # rescale every W_k to unit spectral norm (ReLU is positively homogeneous)
    scales = [float(np.linalg.svd(w, compute_uv=False)[0]) for w, _ in layers]
    scaled = [(w / s, b / s) for (w, b), s in zip(layers, scales, strict=True)]
    opts = dict(solver_options or {})
    notes: list[str] = []
    for attempt, tau in enumerate((0.0, 1e-7)):
        deadline.check(f"{attempt} of 2 SDP solves")
        name, status, rho, t_diag = _solve(cp, scaled, variant, solver, opts, tau, deadline)
        checkable = (status in _CHECKED_STATUSES and math.isfinite(rho)
                     and bool(np.all(np.isfinite(t_diag))))
        if not checkable and deadline.expired():
            raise deadline.error(f"{attempt} of 2 SDP solves (solver {name}: status {status})")
        notes.append(f"solver {name}, status {status}, rho (rescaled network) {rho:.9g}" +
                     (f" (strict margin tau={tau:g})" if tau else ""))
        if not checkable:
            why = (f"solver status '{status}' is not one whose multipliers are checked "
                   f"({', '.join(_CHECKED_STATUSES)})"
                   if status not in _CHECKED_STATUSES else
                   f"solver status '{status}' without finite multipliers")
            notes.append(f"{why}: no bound reported")
            logger.warning("LipSDP-%s: solver status %s; not a bound", variant, status)
            return result(math.nan, Guarantee.ESTIMATE, notes)
        try:
            cert = certify_lmi(scaled, t_diag, rho)
        except np.linalg.LinAlgError as exc:  # (an eigensolver that did not converge)
            cert = LMICertificate(False, math.nan, rho, math.nan, math.nan,
                                  f"the eigensolver failed ({exc})")
        if cert.ok:
            notes.append(f"float64 LMI check passed: lambda_max {cert.lambda_max:.3g} <= "
                         f"-{cert.margin:.3g} at rho {cert.rho:.12g} (solver {rho:.12g})")
            if status != "optimal":
                notes.append(f"the solver stopped before its tolerance (status '{status}'): "
                             "the float64 check certifies the value, which may be looser "
                             "than the SDP's optimum")
            # sqrt and the product of scales: rounded up with a relative cushion
            value = math.sqrt(cert.rho) * math.prod(scales)
            value = round_up(value * (1 + 1e-15 * (len(layers) + 4))
                             * (1 + 1e-12 * max(max(w.shape) for w, _ in layers)))
            return result(value, Guarantee.CERTIFIED, notes)
        notes.append(f"float64 LMI check failed: {cert.reason}")
        if deadline.expired():
            raise deadline.error(f"{attempt + 1} of 2 SDP solves (solver {name}: status "
                                 f"{status}; the float64 check failed)")
        logger.info("LipSDP-%s: check failed (%s); resolving with a strict margin",
                    variant, cert.reason)
    notes.append("no certified value: the LMI could not be verified in float64")
    return result(math.nan, Guarantee.ESTIMATE, notes)
