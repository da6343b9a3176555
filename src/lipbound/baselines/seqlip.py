"""SeqLip: the sequential bound over activation patterns of pairs of layers.

Reference: K. Scaman and A. Virmaux, *Lipschitz regularity of deep neural networks:
analysis and efficient estimation*, NeurIPS 2018 (Section 5, "SeqLip", and its greedy
algorithm).

Quantity: the **global** L2 Lipschitz constant of ``f`` (all pairs of inputs).

With compact SVDs ``W_i = U_i S_i V_i^T`` and ``S~_1 = S_1``, ``S~_K = S_K``,
``S~_i = S_i^(1/2)`` otherwise, SeqLip is

    prod_{i=1}^{K-1} max_{sigma in {0,1}^{n_i}} || S~_{i+1} V_{i+1}^T diag(sigma) U_i S~_i ||_2.

Guarantee -- it depends on how each maximum is computed:

* **exact** (every hidden width <= ``max_exact_width``, all ``2^{n_i}`` patterns
  enumerated): a CERTIFIED upper bound. Proof: at every point where ``f`` is differentiable
  its Jacobian is ``W_K D_{K-1} ... D_1 W_1`` with 0/1 diagonal ``D_i``; the Lipschitz
  constant of a piecewise-linear map is the largest norm of these Jacobians. Writing each
  ``W_i`` by its SVD, dropping the outer orthonormal factors ``U_K`` and ``V_1^T`` (norm
  preserving), splitting each middle ``S_i = S_i^(1/2) S_i^(1/2)`` and using
  submultiplicativity bounds the norm by the product of the pair norms above, each at most
  its maximum over sigma. (Maximising over ``[0,1]^{n_i}`` instead gives the same value:
  a norm is convex in sigma, so its maximum is at a vertex.) The bound is tight only when
  every combination of patterns can occur, which is the "assumption" under which the paper
  calls SeqLip tight; it is an upper bound without it. Float64 rounding of the SVD factors
  and products is covered by adding ``1e-12 * n * K * prod_k ||W_k||`` (the rounding of the
  factored chain is at most ~``K n u`` times the product of the layer norms).
* **greedy** (some width above the cap): the paper's heuristic for wide layers, here an
  alternating maximisation (top singular pair <-> best sigma for it) polished by single
  flips. It can miss the maximum, so the result is an ESTIMATE: neither an upper bound nor
  a lower bound on ``L(f)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from lipbound.baselines.deadline import NO_LIMIT, Deadline
from lipbound.baselines.fc import (
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
from lipbound.validation import check_int

logger = logging.getLogger(__name__)

__all__ = ["seqlip", "pair_factors"]

_CHUNK = 2048


def _svd_parts(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u, s, vt.T


def pair_factors(layers: list[tuple[np.ndarray, np.ndarray]]
                 ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """For each hidden layer ``i``: ``(A_i, B_i, scale_i)`` with pair matrix ``A_i diag(s) B_i``.

    ``A_i = S~_{i+1} V_{i+1}^T`` (shape ``r_{i+1} x n_i``), ``B_i = U_i S~_i``
    (``n_i x r_i``) and ``scale_i = ||S~_{i+1}|| ||S~_i||`` (the pair norm with sigma = 1
    is at most this).
    """
    return _pair_factors(layers, NO_LIMIT)[0]


def _pair_factors(layers: list[tuple[np.ndarray, np.ndarray]], deadline: Deadline
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray, float]], list[float]]:
    """:func:`pair_factors` and the layers' largest singular values (float64 SVDs);
    ``deadline`` is checked before each SVD."""
    k = len(layers)
    parts = []
    for i, (w, _) in enumerate(layers):
        deadline.check(f"the SVDs of {i} of {k} layers")
        parts.append(_svd_parts(w))
    out = []
    for i in range(k - 1):  # hidden layer i+1 sits between W_{i+1} and W_{i+2} (1-based)
        u_i, s_i, _ = parts[i]
        _, s_n, v_n = parts[i + 1]
        st_i = s_i if i == 0 else np.sqrt(s_i)
        st_n = s_n if i + 1 == k - 1 else np.sqrt(s_n)
        a = st_n[:, None] * v_n.T
        b = u_i * st_i[None, :]
        scale = float((st_n.max() if st_n.size else 0.0) * (st_i.max() if st_i.size else 0.0))
        out.append((a, b, scale))
    return out, [float(s_[0]) if s_.size else 0.0 for _, s_, _ in parts]


def _norms(a: np.ndarray, b: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Spectral norms of ``A diag(sigma) B`` for a batch of 0/1 vectors ``sigmas`` (m, n)."""
    mats = np.einsum("rn,mn,ns->mrs", a, sigmas, b, optimize=True)
    if mats.shape[1] == 0 or mats.shape[2] == 0:
        return np.zeros(len(sigmas))
    return np.linalg.svd(mats, compute_uv=False)[:, 0]


def _exact_max(a: np.ndarray, b: np.ndarray, deadline: Deadline = NO_LIMIT,
               where: str = "") -> tuple[float, np.ndarray]:
    n = a.shape[1]
    best, best_sigma = -1.0, np.ones(n)
    total = 1 << n
    bits = np.arange(n)
    for start in range(0, total, _CHUNK):
        deadline.check(f"{start} of {total} activation patterns of {where}")
        idx = np.arange(start, min(total, start + _CHUNK))
        sig = ((idx[:, None] >> bits[None, :]) & 1).astype(np.float64)
        vals = _norms(a, b, sig)
        j = int(np.argmax(vals))
        if vals[j] > best:
            best, best_sigma = float(vals[j]), sig[j]
    return best, best_sigma


def _greedy_max(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, restarts: int,
                max_passes: int, deadline: Deadline = NO_LIMIT, where: str = ""
                ) -> tuple[float, np.ndarray]:
    n = a.shape[1]

    def check(start: int) -> None:
        deadline.check(f"greedy start {start + 1} of {restarts + 1} of {where}")

    def value(sig: np.ndarray) -> float:
        return float(_norms(a, b, sig[None, :])[0])

    starts = [np.ones(n)] + [rng.integers(0, 2, n).astype(np.float64) for _ in range(restarts)]
    best, best_sigma = -1.0, np.ones(n)
    for i_start, sig in enumerate(starts):
        check(i_start)
        cur = value(sig)
        for _ in range(50):  # alternating maximisation: sigma -> (u, v) -> sigma
            check(i_start)
            m = a @ (sig[:, None] * b)
            if m.size == 0:
                break
            uu, _, vvt = np.linalg.svd(m)
            new = ((a.T @ uu[:, 0]) * (b @ vvt[0]) > 0).astype(np.float64)
            val = value(new)
            if val <= cur * (1 + 1e-15):
                break
            sig, cur = new, val
        for _ in range(max_passes):  # single-flip polishing
            check(i_start)
            cand = np.repeat(sig[None, :], n, axis=0)
            cand[np.arange(n), np.arange(n)] = 1.0 - cand[np.arange(n), np.arange(n)]
            vals = _norms(a, b, cand)
            j = int(np.argmax(vals))
            if vals[j] <= cur * (1 + 1e-15):
                break
            sig, cur = cand[j], float(vals[j])
        if cur > best:
            best, best_sigma = cur, sig
    return best, best_sigma


def seqlip(net: nn.Module | Sequence[tuple[Any, Any]], *, max_exact_width: int = 16,
           greedy_restarts: int = 4, greedy_passes: int = 20, seed: int = 0,
           max_greedy_entries: int = 50_000_000,
           output_map: Any | None = None, input_shape: Sequence[int] | None = None,
           model_name: str | None = None, time_limit: float | None = None) -> BoundResult:
    """SeqLip on the global L2 Lipschitz constant (exact for narrow layers, greedy otherwise).

    Args:
        net: a fully connected ReLU network (module) or its layers ``[(W, b), ...]``.
        max_exact_width: enumerate all ``2^n`` patterns of a hidden layer of width
            ``n <= max_exact_width`` (at most 20); wider layers use the greedy heuristic.
        greedy_restarts: random restarts of the greedy search (besides all-ones).
        greedy_passes: maximum single-flip passes per start.
        max_greedy_entries: refuse (``LipboundError``) when a greedy single-flip pass over
            a hidden layer of width ``n`` would form more than this many entries (``n``
            candidate pair matrices of up to ``r_{i+1} x r_i``, ``r`` the ranks): such a
            layer would need gigabytes and hours (e.g. a converted conv net).
        seed: seed of the greedy restarts.
        output_map: optional ``(m, n_out)`` matrix ``C``; the value is then for ``C f``.
        input_shape: input shape without batch (only needed for some Normalize layers).
        model_name: name stored in the result.
        time_limit: seconds (``None``: no limit), checked before each layer's SVD, each
            chunk of 2048 patterns and each greedy pass (:mod:`lipbound.baselines.deadline`).

    Returns:
        A :class:`~lipbound.results.BoundResult`: CERTIFIED when every hidden layer was
        enumerated exactly, ESTIMATE when the greedy heuristic was used for any layer.

    Raises:
        LipboundError: a hidden layer too wide for the greedy search (``max_greedy_entries``).
        TimeLimitError: ``time_limit`` passed before the value was computed.
    """
    if not isinstance(max_exact_width, int) or not 0 <= max_exact_width <= 20:
        raise InputError(f"max_exact_width must be an integer in [0, 20], got {max_exact_width!r}"
                         " (2^n spectral norms are computed per layer)")
    # (review s22) checked here: a float greedy_restarts / a text greedy_passes raised Python's
    # TypeError, seed=-1 numpy's ValueError, a text max_greedy_entries a TypeError
    greedy_restarts = check_int(greedy_restarts, "greedy_restarts", 0)
    greedy_passes = check_int(greedy_passes, "greedy_passes", 0)
    seed = check_int(seed, "seed", 0)
    max_greedy_entries = check_int(max_greedy_entries, "max_greedy_entries", 1)
    t0 = time.perf_counter()
    deadline = Deadline(time_limit, "seqlip")
    layers = apply_output_map(as_fc(net, input_shape=input_shape), output_map)
    check_range(layers, what="seqlip")
    for i in range(len(layers) - 1):  # sizes known before any SVD: refuse early
        n = layers[i][0].shape[0]
        r_in, r_out = min(layers[i][0].shape), min(layers[i + 1][0].shape)
        if n > max_exact_width and n * r_in * r_out > max_greedy_entries:
            raise LipboundError(
                f"seqlip: hidden layer {i + 1} has width {n}; its greedy single-flip search "
                f"would form {n} pair matrices of up to {r_out} x {r_in} ("
                f"{n * r_in * r_out:.3g} entries > max_greedy_entries={max_greedy_entries}) "
                f"per pass; network {chain_note(layers)} is too wide for SeqLip, use autolip "
                "or recurjac")
    rng = np.random.default_rng(seed)
    value = 1.0
    modes = []
    if len(layers) == 1:
        value = safe_spectral_norm(layers[0][0])
    pairs, norms = _pair_factors(layers, deadline)
    for i, (a, b, _) in enumerate(pairs):
        n = a.shape[1]
        where = f"hidden layer {i + 1} of {len(pairs)}"
        if n <= max_exact_width:
            v, _ = _exact_max(a, b, deadline, where)
            v = v * (1 + 1e-12 * max(a.shape + b.shape))
            modes.append(f"layer {i + 1} (width {n}): exact over 2^{n} patterns")
        else:
            v, _ = _greedy_max(a, b, rng, greedy_restarts, greedy_passes, deadline, where)
            modes.append(f"layer {i + 1} (width {n}): greedy (heuristic)")
        value *= v
    exact = all("exact" in m for m in modes)
    # rounding of the SVD factors and of the pair products: each perturbs the chain by at
    # most ~n u times the product of the layer norms (AutoLip's value), covered with a
    # factor ~1e4 to spare
    n_max = max(max(w.shape) for w, _ in layers)
    autolip_scale = math.prod(norms)  # the SVDs' largest singular values
    value = round_up(value * (1 + 4e-16 * len(layers))
                     + 1e-12 * n_max * len(layers) * autolip_scale)
    guarantee = Guarantee.CERTIFIED if exact else Guarantee.ESTIMATE
    notes = [chain_note(layers), *modes, *chain_caveats(layers)]
    if not exact:
        notes.append("greedy maximisation may miss the maximum: not a certified bound")
    return BoundResult(
        value=value, guarantee=guarantee, method="seqlip" if exact else "seqlip-greedy",
        quantity="global L2 Lipschitz constant (all pairs of inputs)", eps=None,
        seconds=time.perf_counter() - t0, norm="l2", model=model_name, notes=tuple(notes),
    )
