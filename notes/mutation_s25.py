"""Mutation testing of lipbound's soundness-critical code (session 25).

Standalone driver (not collected by pytest: it lives in notes/, and its name does not start
with ``test_``). Each mutation is a plausible one-line bug that would make a reported upper
bound too small, a certified radius too large, an empirical lower bound too large, or a
guarantee label wrong. For each one the runner applies the textual patch to the working
tree, runs the given pytest selection (``-x -q``), records whether it failed (killed) and
by which test, and writes the file's original text back.

Usage (from the repository root)::

    PYTHONPATH=src .venv/bin/python notes/mutation_s25.py            # every mutation
    PYTHONPATH=src .venv/bin/python notes/mutation_s25.py M07 M12    # some of them
    PYTHONPATH=src .venv/bin/python notes/mutation_s25.py --list

Options: ``--timeout S`` per mutation (default 400 s), ``--extra FILE`` to add a test file
to every selection (e.g. ``tests/test_mutation_kills.py`` to show the new kills).
Results are printed as a Markdown table (notes/mutation_s25.md holds the session's table).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    ident: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


M = Mutation
MUTATIONS: list[Mutation] = [
    M("M01", "src/lipbound/analyzer.py",
      "ybar = y_hi + er + SAFETY * (y0.abs() + er)",
      "ybar = y_hi + er",
      ("tests/test_core_soundness.py", "tests/test_core_rules.py",
       "tests/test_rules_edge_layers.py", "tests/test_float_range.py"),
      "rule 3: relative margin SAFETY of ȳ dropped"),
    M("M02", "src/lipbound/analyzer.py",
      "    up = ybar > 0\n",
      "    up = y_hi > 0\n",
      ("tests/test_core_soundness.py", "tests/test_core_rules.py"),
      "rule 2/3: output mask from the nominal pre-activation instead of ȳ"),
    M("M03", "src/lipbound/analyzer.py",
      "d_out = on.to(torch.float64)  # (0/1",
      "d_out = may_be_on.to(torch.float64)  # (0/1",
      ("tests/test_core_soundness.py", "tests/test_core_rules.py"),
      "rule 2: next mask D = units on at x0 (not those that can turn on)"),
    M("M04", "src/lipbound/analyzer.py",
      "rn = torch.sqrt(b.sq_rows(d.unsqueeze(0))[0].clamp_min(0))",
      "rn = b.sq_rows(d.unsqueeze(0))[0].clamp_min(0)",
      ("tests/test_core_soundness.py", "tests/test_core_rules.py"),
      "rule 3: sqrt dropped from the row norms (A ⊙ A) d"),
    M("M05", "src/lipbound/analyzer.py",
      "        er = er * fold + UNDERFLOW\n",
      "        er = er + UNDERFLOW\n",
      ("tests/test_fold_rounding.py", "tests/test_fold_limits.py"),
      "rule 3: fold_rel widening of the radius term dropped"),
    M("M06", "src/lipbound/analyzer.py",
      "    den = ybar - y_hi\n",
      "    den = ybar - y0\n",
      ("tests/test_core_soundness.py", "tests/test_core_rules.py",
       "tests/test_rules_edge_layers.py"),
      "rule 1: secant slope from the computed y0, not y0 + nominal error"),
    M("M07", "src/lipbound/ops/pooling.py",
      "m = mask.reshape(-1, *self.in_shape[-2:]).amax(dim=0) > 0",
      "m = mask.reshape(-1, *self.in_shape[-2:]).amin(dim=0) > 0",
      ("tests/test_core_rules.py", "tests/test_padpool_review.py",
       "tests/test_core_soundness.py", "tests/test_tight_rows_and_sweep_radii.py"),
      "max pooling: movable position = movable in every channel (not any)"),
    M("M08", "src/lipbound/ops/pooling.py",
      "rows = [r0 + a * self.dilation[0] for a in range(self.kernel[0])]",
      "rows = [r0 + a for a in range(self.kernel[0])]",
      ("tests/test_padpool_review.py", "tests/test_core_rules.py", "tests/test_layer_review.py"),
      "max pooling: overlap counts ignore the dilation (rows)"),
    M("M09", "src/lipbound/ops/pooling.py",
      "return math.sqrt(float(self.counts.max())) * (1 + 1e-12)",
      "return math.sqrt(float(self.counts.max())) * (1 - 1e-12)",
      ("tests/test_core_rules.py", "tests/test_padpool_review.py",
       "tests/test_core_soundness.py"),
      "max pooling: global sqrt(c) rounded down instead of up"),
    M("M10", "src/lipbound/spectral.py",
      "/ (2 * keff - 1)",
      "/ (2 * keff + 1)",
      ("tests/test_spectral.py", "tests/test_posterior.py"),
      "KW inflation: exponent 2k+1 instead of 2k-1 (too small a factor)"),
    M("M11", "src/lipbound/posterior.py",
      "return failure_prob * failure_prob * math.pi / (2.0 * (n - 1))",
      "return failure_prob * math.pi / (2.0 * (n - 1))",
      ("tests/test_posterior.py",),
      "Christoffel floor c = δ π / (2(n-1)) (square of δ dropped)"),
    M("M12", "src/lipbound/spectral.py",
      "res, fast_infl, delta_kw = attempt(1, failure_prob * (1.0 - BLOCK_SHARE))",
      "res, fast_infl, delta_kw = attempt(1, failure_prob)",
      ("tests/test_block_lanczos.py", "tests/test_review_fixes.py"),
      "block -> single-vector fallback: union bound term missing (δ reused)"),
    M("M13", "src/lipbound/analyzer.py",
      "return max(1, sum(isinstance(b, AffineBlock) and b.mixing is not None for b in blocks))",
      "return max(1, sum(isinstance(b, AffineBlock) and b.mixing is not None and b.relu "
      "for b in blocks))",
      ("tests/test_core_soundness.py", "tests/test_core_reuse.py",
       "tests/test_spectral_lanczos.py"),
      "failure budget split over affine-ReLU layers only (last layer uncounted)"),
    M("M14", "src/lipbound/spectral.py",
      "    if res.dim >= n_used:  # the Krylov basis",
      "    if res.dim >= n_used - 1:  # the Krylov basis",
      ("tests/test_spectral_lanczos.py", "tests/test_spectral.py", "tests/test_block_lanczos.py"),
      "Lanczos with n-1 steps labelled full (CERTIFIED, no inflation)"),
    M("M15", "src/lipbound/spectral.py",
      "            val *= (1 + SAFETY) * fast_infl\n",
      "            val *= (1 + SAFETY)\n",
      ("tests/test_winograd.py", "tests/test_lanczos_fast_products.py"),
      "Winograd inflation of a kept fast-product run dropped"),
    M("M16", "src/lipbound/ops/winograd.py",
      "cols = reads * (bt.T @ (u_cols * torch.outer(alpha, alpha)) @ bt).amax()",
      "cols = (bt.T @ (u_cols * torch.outer(alpha, alpha)) @ bt).amax()",
      ("tests/test_winograd.py", "tests/test_lanczos_fast_products.py"),
      "Winograd error bound: tiles reading one input (ceil(6/m)^2) dropped"),
    M("M17", "src/lipbound/spectral.py",
      "up = (mu + g_c * trace / ((1.0 - _gamma(n)) * (1.0 - n * g_c)) + _U * (mu + g_max)",
      "up = (mu + _U * (mu + g_max)",
      ("tests/test_exact_norm_cert.py", "tests/test_spectral.py"),
      "exact-norm Cholesky certificate: backward-error term γ_c trace dropped"),
    M("M18", "src/lipbound/ops/conv.py",
      "        val *= float(op.out_scale.abs().max())\n",
      "        val *= 1.0\n",
      ("tests/test_conv_bounds.py", "tests/test_circulant_probe.py",
       "tests/test_conv_pool_internals.py"),
      "circulant bound: out_scale (folded batch norm) forgotten"),
    M("M19", "src/lipbound/analyzer.py",
      "            if b.fold_factor > 1.0:  # the folded layers' (batch norm's) own rounding\n",
      "            if False:  # the folded layers' (batch norm's) own rounding\n",
      ("tests/test_fold_rounding.py", "tests/test_fold_limits.py"),
      "rule 4: fold_factor widening of the spectral factor skipped"),
    M("M20", "src/lipbound/radius.py",
      "t_local = float(t_rows.min()) / SQRT2 * (1 - _ROUND)",
      "t_local = float(t_rows.min()) * (1 - _ROUND)",
      ("tests/test_radius.py",),
      "certified radius: delta / sqrt(2) threshold without the sqrt(2)"),
    M("M21", "src/lipbound/radius.py",
      "final = replace(chk, failure_prob=min(1.0, twins + safe_fp))",
      "final = replace(chk, failure_prob=min(1.0, chk.failure_prob + safe_fp))",
      ("tests/test_radius_fallback.py", "tests/test_radius_review.py"),
      "certified radius: re-check twins' union bound replaced by one twin's δ"),
    M("M22", "src/lipbound/radius.py",
      "t = pb.t_local - nominal * (1 + 1e-9)",
      "t = pb.t_local + nominal * (1 + 1e-9)",
      ("tests/test_radius.py", "tests/test_radius_review.py", "tests/test_radius_fallback.py"),
      "certified radius: nominal-error allowance added with the wrong sign"),
    M("M23", "src/lipbound/lower/_common.py",
      "limit = eps * (1.0 - distance_slack(x0_flat.shape[1]))",
      "limit = eps",
      ("tests/test_lower.py", "tests/test_lower_audit.py", "tests/test_lower_attacks_review.py"),
      "lower bound: witness-in-ball check without the distance rounding slack"),
    M("M24", "src/lipbound/lower/_common.py",
      "return max(num - err, 0.0) / (den * slack), ",
      "return num / (den * slack), ",
      ("tests/test_lower_margin_rounding.py", "tests/test_lower.py", "tests/test_lower_audit.py"),
      "lower bound: output rounding allowance not subtracted"),
    M("M25", "src/lipbound/attacks/base.py",
      "return math.nextafter(r * (1.0 + 2.0 * (d + 4) * 2.0**-53) + 2.0**-1073, math.inf)",
      "return r",
      ("tests/test_attacks.py", "tests/test_attacks_audit.py",
       "tests/test_lower_attacks_review.py"),
      "attack radius: float64 distance not rounded up"),
    M("M26", "src/lipbound/attacks/base.py",
      "return torch.isfinite(z).all(dim=1) & (self.margin(z) < 0)",
      "return torch.isfinite(z).all(dim=1) & (self.margin(z) <= 0)",
      ("tests/test_attacks.py", "tests/test_attacks_audit.py",
       "tests/test_lower_attacks_review.py"),
      "attack verification: a tie counted as a class change"),
    M("M27", "src/lipbound/tight.py",
      "lo = torch.where(ylow > 0, 1.0, torch.where(y0_lo > 0,",
      "lo = torch.where(y_lo > 0, 1.0, torch.where(y0_lo > 0,",
      ("tests/test_tight.py", "tests/test_tight_review.py"),
      "tight: a unit on at x0 taken as on on the whole ball (lo = 1)"),
    M("M28", "src/lipbound/tight.py",
      "poss = hi[win] >= best_lo  # possible winners",
      "poss = lo[win] >= best_lo  # possible winners",
      ("tests/test_tight_padded_pool.py", "tests/test_tight.py"),
      "tight: max-pool possible winners from lower limits (winners dropped)"),
    M("M29", "src/lipbound/baselines/exact.py",
      "    res = _finish(solve(False))\n    if res.value < refuting:",
      "    res = _finish(solve(False))\n    if False:",
      ("tests/test_lipmip_highspy.py", "tests/test_baselines_rounding.py"),
      "lipMIP: HiGHS optimum not checked against sampled gradients"),
    M("M30", "src/lipbound/baselines/lipsdp.py",
      "        if lam <= -mg:\n",
      "        if lam <= mg:\n",
      ("tests/test_lipsdp_review.py", "tests/test_lipsdp_inaccurate.py"),
      "LipSDP certificate: margin with the wrong sign (lam <= +margin)"),
    M("M31", "src/lipbound/tight.py",
      "scale = torch.tensor([math.sqrt((q - 1.0) / q) / q * (1.0 + 1e-14)",
      "scale = torch.tensor([((q - 1.0) / q) / q * (1.0 + 1e-14)",
      ("tests/test_tight.py", "tests/test_tight_padded_pool.py"),
      "tight: pooling deviation factor sqrt(1 - 1/p) without the sqrt"),
    M("M32", "src/lipbound/ops/conv.py",
      "return y if self.out_scale is None else y * self.out_scale ** 2",
      "return y if self.out_scale is None else y * self.out_scale.abs()",
      ("tests/test_core_soundness.py", "tests/test_fold_rounding.py",
       "tests/test_conv_bounds.py"),
      "conv row norms: folded output scale not squared in (A ⊙ A) d"),
    M("M33", "src/lipbound/sweep.py",
      "order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])",
      "order = sorted(range(len(eps_list)), key=lambda i: -eps_list[i])",
      ("tests/test_sweep_running_max.py", "tests/test_sweep.py"),
      "sweep: lower bounds' running maximum taken in decreasing eps"),
    M("M34", "src/lipbound/analyzer.py",
      "fp = 0.0 if gg == Guarantee.CERTIFIED else min(1.0, fp + gfp)",
      "fp = 0.0 if gg == Guarantee.CERTIFIED else gfp",
      ("tests/test_bound_source.py", "tests/test_core_reuse.py", "tests/test_core_soundness.py"),
      "min(local, global): probabilistic global bound's δ without the local one's"),
    M("M35", "src/lipbound/analyzer.py",
      "    r = torch.where(~torch.isfinite(den) | torch.isnan(r), 1.0, r)\n",
      "",
      ("tests/test_float_range.py", "tests/test_core_rules.py"),
      "rule 1: slope of an overflowing ȳ (inf / inf) not set to its limit 1"),
    M("M36", "src/lipbound/lower/_common.py",
      "    e += (4.0 * u * max(lip, 0.0)) * x0n\n",
      "",
      ("tests/test_lower_margin_rounding.py", "tests/test_lower.py", "tests/test_lower_audit.py",
       "tests/test_lower_overflow.py"),
      "lower bound: rounding allowance without the first layer's 4 u L ||x0|| term"),
    M("M37", "src/lipbound/radius.py",
      "    t_rows = pb.t_rows - dev\n",
      "    t_rows = pb.t_rows + dev\n",
      ("tests/test_radius_review.py", "tests/test_radius.py"),
      "certified radius (margin test): nominal deviation added, not subtracted"),
    M("M38", "src/lipbound/analyzer.py",
      "            dl += math.sqrt(float(d.numel() - d.sum())) * eta\n",
      "            pass\n",
      ("tests/test_radius.py", "tests/test_core_soundness.py", "tests/test_compose_rounding.py"),
      "nominal error: the unmovable coordinates' part dropped"),
    M("M39", "src/lipbound/analyzer.py",
      "frob = top * math.sqrt(float(((rrn / top) ** 2).sum())) * (1 + SAFETY)",
      "frob = top * (1 + SAFETY)",
      ("tests/test_core_soundness.py", "tests/test_core_rules.py"),
      "certified alternative: largest row norm instead of the Frobenius norm"),
    M("M40", "src/lipbound/analyzer.py",
      "        value = product_up(f.value for f in facs)\n",
      "        value = product_up(f.value for f in facs if f.method != \"closed-form\")\n",
      ("tests/test_core_rules.py", "tests/test_core_soundness.py"),
      "global bound: closed-form (max-pooling, diagonal) factors left out of the product"),
]


def _run_one(mut: Mutation, timeout: float, extra: list[str]) -> tuple[str, str, float]:
    path = ROOT / mut.file
    text = path.read_text()
    n = text.count(mut.old)
    if n != 1:
        return "BAD-SITE", f"old text found {n} times", 0.0
    path.write_text(text.replace(mut.old, mut.new))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", *mut.tests, *extra]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout)
        log = out.stdout + out.stderr
        rc = out.returncode
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = -1
    finally:
        path.write_text(text)  # (the original text, whatever git holds)
    dt = time.perf_counter() - t0
    failed = re.findall(r"^FAILED (\S+)", log, flags=re.M)
    errors = re.findall(r"^ERROR (\S+)", log, flags=re.M)
    if rc == 0:
        return "survived", "", dt
    if rc == -1:
        return "timeout", "", dt
    if failed or errors:
        return "killed", (failed or errors)[0], dt
    return f"rc={rc}", log.strip().splitlines()[-1] if log.strip() else "", dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ids", nargs="*")
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--extra", action="append", default=[])
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    muts = [m for m in MUTATIONS if not args.ids or m.ident in args.ids]
    if args.list:
        for m in muts:
            print(f"{m.ident}  {m.file}: {m.what}")
        return 0
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print("src/ has uncommitted changes; commit them first (a mutant interrupted by a "
              "crash of this driver is left in its file: git diff shows it)", file=sys.stderr)
        return 2
    print("| id | site | mutation | result | first failing test | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in muts:
        status, by, dt = _run_one(m, args.timeout, args.extra)
        print(f"| {m.ident} | {m.file.removeprefix('src/lipbound/')} | {m.what} | {status} | "
              f"{by} | {dt:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
