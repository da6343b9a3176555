"""CUDA smoke test: the same computations on the CPU and on CUDA, compared (same seeds).

For the MNIST LeNet and the CIFAR-10 net (zoo weights, default samples) it runs the global
and the local bound, a certified radius ("local" and "margin"), the five attacks, the lower
bounds, a short sweep, the exact spectral route and an output map (MNIST), the float64
convolutions of the analysed layers against their rounding model, the model's float32
forward pass under lipbound's IEEE-float32 guard, the benchmark's CUDA peak memory and the
``lipbound`` command line with ``--device cuda``; the rival methods run on the comparison
network (compnet) with its model on the device. It prints PASS/FAIL per item (INFO lines
are facts, not checks). Exits 1 on any failure; exits 0 with "no CUDA: skipped" when CUDA
is not available.

A small conv net with the layers the zoo's nets lack (batch norm, average pooling, Hardtanh
and ReLU6 clamps), in float32 and float64, adds every spectral route, the tight and per-row
bounds, a tight margin radius, bound_many, a sweep with the tight and PGD methods and
compare's conv-to-FC rivals; MNIST also the forced Lanczos route and bound_many.

Usage (from the repository root, a few minutes on one GPU)::

    PYTHONPATH=src .venv/bin/python benchmarks/cuda_smoke.py [--models mnist,cifar10]
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FAILURES: list[str] = []
DEV = torch.device("cuda")  # --device cpu: the script's own self-check, CPU against CPU

# Lanczos runs on the two devices start from the same vectors (drawn on the CPU) but their
# float64 products round differently, and the CPU may take Winograd products (inflation
# <= 4e-8); early exits may then pick another certified alternative. Same guarantee, values
# within REL_BOUND.
REL_BOUND = 1e-3
REL_RADIUS = 1e-2  # the radius search's own tolerance is 1e-3


def report(ok: bool, item: str, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {item}" + (f"  ({detail})" if detail else ""),
          flush=True)
    if not ok:
        FAILURES.append(item)


def info(item: str, detail: str) -> None:
    print(f"INFO  {item}  ({detail})", flush=True)


def rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def guarded(item: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # a crash is a failure of the item, the others still run
        report(False, item, f"{type(exc).__name__}: {exc}")
    else:
        print(f"      {item}: {time.perf_counter() - t0:.2f} s", flush=True)


def check_model(name: str, seed: int) -> None:
    from lipbound import Analyzer, zoo
    from lipbound._precision import exact_float32
    from lipbound.attacks import run_attacks
    from lipbound.inputs import load_sample
    from lipbound.ops.base import gamma
    from lipbound.ops.conv import ConvOp
    from lipbound.radius import certified_radius

    cpu, gpu = torch.device("cpu"), DEV
    lm_c = zoo.load_model(name, device=cpu)
    lm_g = zoo.load_model(name, device=gpu)
    x0 = load_sample(lm_c.entry.default_sample, entry=lm_c.entry).x  # CPU, as the CLI has it
    shape = tuple(x0.shape[1:])
    an_c = Analyzer(lm_c.model, shape, seed=seed, name=name)
    an_g = Analyzer(lm_g.model, shape, seed=seed, name=name)
    report(an_g.device.type == DEV.type, f"{name}: analyzer on the model's device",
           str(an_g.device))

    def bounds() -> None:
        for what, fc, fg in (("global", an_c.global_bound, an_g.global_bound),
                             ("local eps=0.1", lambda: an_c.local_bound(x0, 0.1),
                              lambda: an_g.local_bound(x0, 0.1))):
            rc, rg = fc(), fg()
            ok = rc.guarantee == rg.guarantee and rel(rc.value, rg.value) <= REL_BOUND
            report(ok, f"{name}: {what} bound CPU vs CUDA",
                   f"{rc.value!r} {rc.guarantee.value} vs {rg.value!r} {rg.guarantee.value}, "
                   f"rel {rel(rc.value, rg.value):.2e}")
            if not ok:
                for lc, lg in zip(rc.layers, rg.layers, strict=False):
                    info(f"{name}: {what} layer {lc.name}",
                         f"{lc.local!r}/{lc.global_factor!r} {lc.spectral_method} vs "
                         f"{lg.local!r}/{lg.global_factor!r} {lg.spectral_method}")
        # a model on the CPU analysed on CUDA (device override)
        rx = Analyzer(lm_c.model, shape, seed=seed, device=DEV).local_bound(x0, 0.1)
        rc = an_c.local_bound(x0, 0.1)
        report(rel(rc.value, rx.value) <= REL_BOUND, f"{name}: CPU model, device={DEV}",
               f"{rx.value!r}")
    guarded(f"{name}: bounds", bounds)

    radii: dict[str, float] = {}

    def radius() -> None:
        for method in ("local", "margin"):
            rc = certified_radius(an_c, x0, method=method)
            rg = certified_radius(an_g, x0, method=method)
            radii[method] = rg.radius
            ok = (rc.predicted_class == rg.predicted_class and rc.guarantee == rg.guarantee
                  and rel(rc.radius, rg.radius) <= REL_RADIUS)
            report(ok, f"{name}: certified radius ({method}) CPU vs CUDA",
                   f"{rc.radius!r} vs {rg.radius!r}, class {rc.predicted_class}/"
                   f"{rg.predicted_class}")
    guarded(f"{name}: radius", radius)

    def attack() -> None:
        ac = run_attacks(lm_c.model, x0, ("pgd",), seed=seed)[0]
        ag = run_attacks(lm_g.model, x0, ("pgd",), seed=seed)[0]
        report(ac.success == ag.success, f"{name}: PGD attack succeeds on both devices",
               f"{ac.radius} vs {ag.radius} (device generators: different draws)")
        if ac.success and ag.success:
            report(0.5 <= ag.radius / ac.radius <= 2.0, f"{name}: PGD radius comparable",
                   f"ratio {ag.radius / ac.radius:.3f}")
            report(ag.x_adv is not None and ag.x_adv.device.type == DEV.type,
                   f"{name}: x_adv on the model's device")
            top = max(radii.values(), default=0.0)
            report(top <= ag.radius, f"{name}: certified radius <= CUDA attack radius",
                   f"{top!r} <= {ag.radius!r}")
            with torch.no_grad():
                z = lm_c.model(ag.x_adv.cpu())
            info(f"{name}: CUDA x_adv on the CPU model",
                 f"class {int(z.argmax())} (original {ag.original_class}; may differ within "
                 "float32 rounding of the boundary)")
    guarded(f"{name}: attack", attack)

    def precision() -> None:
        xg = x0.to(gpu)
        with torch.no_grad():
            yc = lm_c.model(x0).double()
            y_default = lm_g.model(xg).double().cpu()
            with exact_float32(gpu):
                y_ieee = lm_g.model(xg).double().cpu()
        scale = float(yc.abs().max()) + 1.0
        d_ieee = float((y_ieee - yc).abs().max()) / scale
        d_def = float((y_default - yc).abs().max()) / scale
        report(d_ieee <= 1e-5, f"{name}: float32 forward under exact_float32 matches CPU",
               f"max rel diff {d_ieee:.2e}")
        info(f"{name}: float32 forward with torch's default CUDA flags",
             f"max rel diff {d_def:.2e} (TF32 convolutions: cudnn.allow_tf32="
             f"{torch.backends.cudnn.allow_tf32})")
    guarded(f"{name}: float32 precision", precision)

    def conv64() -> None:
        # cuDNN's float64 algorithms must stay within the componentwise rounding model of
        # Op.forward_error: |ŷ - y| <= γ_(n+2) |W| |x| (here twice: both sides round)
        gen = torch.Generator().manual_seed(seed)
        for oc, og in zip(an_c.ops, an_g.ops, strict=True):
            if not isinstance(oc, ConvOp):
                continue
            x = torch.randn((4, *oc.in_shape), generator=gen, dtype=torch.float64)
            y = torch.randn((4, *oc.out_shape), generator=gen, dtype=torch.float64)
            g = 2.0 * gamma(oc.inner_length() + 2)
            fwd = oc.lin(x)
            err_f = (og.lin(x.to(gpu)).cpu() - fwd).abs()
            lim_f = g * oc.abs_lin(x.abs()) + 1e-300
            bwd = oc.lin_t(y)
            err_b = (og.lin_t(y.to(gpu)).cpu() - bwd).abs()
            # |A^T| |y| computed as the transpose of the absolute kernel
            lim_b = g * torch.nn.functional.conv_transpose2d(
                y.abs() * (1 if oc.out_scale is None else oc.out_scale.abs()),
                oc.weight.abs(), None, oc.stride, oc.padding, oc.output_padding, oc.groups,
                oc.dilation) + 1e-300
            ok = bool((err_f <= lim_f).all()) and bool((err_b <= lim_b).all())
            report(ok, f"{name}: float64 conv {oc.name} within its rounding model on CUDA",
                   f"worst ratio fwd {float((err_f / lim_f).max()):.2e}, "
                   f"transpose {float((err_b / lim_b).max()):.2e}")
    guarded(f"{name}: float64 convolutions", conv64)

    def lower() -> None:
        from lipbound.lower import best_lower_bound

        up = an_g.local_bound(x0, 0.1).value
        lb = best_lower_bound(lm_g.model, x0.to(DEV), 0.1, seed=seed, n_random=256,
                              gradient_steps=20, pgd_restarts=4, pgd_steps=10, pgd_refine=2,
                              pgd_refine_steps=10)
        report(lb.witness.device.type == DEV.type and 0 < lb.value <= up,
               f"{name}: lower bounds on {DEV.type} (witness on the device, <= upper bound)",
               f"{lb.value!r} ({lb.method}) <= {up!r}")
    guarded(f"{name}: lower bounds", lower)

    def attacks() -> None:
        top = max(radii.values(), default=0.0)
        for a in run_attacks(lm_g.model, x0, ("fgsm", "ifgsm", "gradient", "cw"), seed=seed):
            ok = not a.success or (a.x_adv is not None and a.x_adv.device.type == DEV.type
                                   and top <= a.radius)
            report(ok, f"{name}: {a.method} attack on {DEV.type} (x_adv on the device, "
                       "radius >= certified)", f"success {a.success}, radius {a.radius}")
    guarded(f"{name}: attacks", attacks)

    def sweep_short() -> None:
        from lipbound.sweep import sweep

        res = sweep(lm_g.model, x0, [0.01, 0.1, 1.0], ("local", "global", "random"),
                    name=name, samples=256, seed=seed)
        loc, glo = res.values("local"), res.values("global")
        ok = (not res.violations() and all(a <= b for a, b in zip(loc, glo, strict=True))
              and loc == sorted(loc))
        report(ok, f"{name}: sweep of 3 radii on {DEV.type} (no violation, local <= global, "
                   "nondecreasing)", f"local {loc}, violations {res.violations()}")
    guarded(f"{name}: sweep", sweep_short)

    def exact_and_map() -> None:
        if name != "mnist":
            return  # the exact route of the bigger nets' masked matrices is slow
        rc = Analyzer(lm_c.model, shape, seed=seed, spectral="exact").local_bound(x0, 0.1)
        rg = Analyzer(lm_g.model, shape, seed=seed, spectral="exact").local_bound(x0, 0.1)
        report(rg.guarantee == rc.guarantee and rel(rc.value, rg.value) <= REL_BOUND,
               f"{name}: --spectral exact CPU vs CUDA", f"{rc.value!r} vs {rg.value!r}")
        c = torch.zeros(1, 10)
        c[0, 8], c[0, 5] = 1.0, -1.0
        gc_, gg = an_c.global_bound(output_map=c), an_g.global_bound(output_map=c.to(DEV))
        report(rel(gc_.value, gg.value) <= REL_BOUND, f"{name}: global bound with an "
               "output map CPU vs CUDA", f"{gc_.value!r} vs {gg.value!r}")
    guarded(f"{name}: exact route and output map", exact_and_map)

    def lanczos_and_many() -> None:
        # the Lanczos route forced on every layer (auto takes the exact route where small),
        # and bound_many over three test inputs given on the CPU (the CLI's batch path)
        rc = Analyzer(lm_c.model, shape, seed=seed, spectral="lanczos").local_bound(x0, 0.1)
        rg = Analyzer(lm_g.model, shape, seed=seed, spectral="lanczos").local_bound(x0, 0.1)
        report(rg.guarantee == rc.guarantee and rel(rc.value, rg.value) <= REL_BOUND,
               f"{name}: --spectral lanczos CPU vs CUDA", f"{rc.value!r} vs {rg.value!r}")
        from lipbound.batch import bound_many
        from lipbound.inputs import load_samples

        xs = torch.cat([s.x for s in load_samples(f"{name}:test/0-2", entry=lm_c.entry)])
        bc = bound_many(lm_c.model, xs, 0.05, seed=seed)
        bg = bound_many(lm_g.model, xs, 0.05, seed=seed)
        worst = max(rel(a.bound, b.bound) for a, b in zip(bc, bg, strict=True))
        report(worst <= REL_BOUND, f"{name}: bound_many of 3 inputs CPU vs CUDA",
               f"worst rel {worst:.2e}")
    guarded(f"{name}: lanczos route and bound_many", lanczos_and_many)

    def tight() -> None:
        # the tight bound (VJP rows with their rounding carried on the device) and its
        # per-row form: the same values up to the devices' rounding, and below the paper's
        if name != "mnist":
            return  # (the CIFAR-10 net's 1077 rows through its convolutions: ~10 s a bound)
        eps = 1e-3
        rc = an_c.local_bound(x0, eps, tight=True)
        rg = an_g.local_bound(x0, eps, tight=True)
        pc = an_c.local_bound(x0, eps)
        ok = (rg.guarantee == rc.guarantee and rel(rc.value, rg.value) <= REL_BOUND
              and rg.value <= pc.value * (1 + REL_BOUND))
        report(ok, f"{name}: tight local bound CPU vs CUDA", f"{rc.value!r} vs {rg.value!r} "
               f"(paper {pc.value!r}); {rg.notes[-1] if rg.notes else ''}")
        c = torch.zeros(2, 10, dtype=torch.float64)
        c[0, 8], c[0, 5], c[1, 8], c[1, 3] = 1.0, -1.0, 1.0, -1.0
        vc = an_c.local_bound_rows(x0, eps, c, tight=True).values
        vg = an_g.local_bound_rows(x0, eps, c.to(DEV), tight=True).values
        worst = max(rel(float(a), float(b)) for a, b in zip(vc, vg, strict=True))
        report(worst <= REL_BOUND, f"{name}: tight per-row bounds CPU vs CUDA",
               f"{vc.tolist()} vs {vg.tolist()}")
    guarded(f"{name}: tight bound", tight)

    def memory() -> None:
        from lipbound.bench import bench_model

        res = bench_model(lm_g.model, x0, name=name, what="local", repeat=1, device=DEV)
        ok = (res.device.startswith(DEV.type) and 0 < res.peak_memory_mb < math.inf
              and res.memory_source.startswith("torch.cuda") == (DEV.type == "cuda"))
        report(ok, f"{name}: bench on {DEV.type} reports that device's peak memory",
               f"{res.peak_memory_mb:.1f} MiB, {res.median_seconds * 1e3:.1f} ms")
    guarded(f"{name}: bench", memory)


def _small_net(seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small conv net with the layers the zoo's nets lack (batch norm, average pooling,
    clamps: Hardtanh, ReLU6), weights and three inputs from a CPU generator."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.Hardtanh(-1.0, 2.0),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24, 16), nn.ReLU6(),
                        nn.Linear(16, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        net[1].running_mean.copy_(0.1 * torch.randn(4, generator=g))
        net[1].running_var.copy_(0.5 + torch.rand(4, generator=g))
    return net.eval(), torch.rand((3, 1, 12, 12), generator=g)


def _four_bounds(an, x0: torch.Tensor, c: torch.Tensor) -> dict[str, list[float]]:
    return {"global": [an.global_bound().value],
            "tight": [an.local_bound(x0, 0.05, tight=True).value],
            "rows": an.local_bound_rows(x0, 0.05, c).values.tolist(),
            "tight rows": an.local_bound_rows(x0, 0.05, c, tight=True).values.tolist()}


def check_small(seed: int) -> None:
    """Batch norm, average pooling and clamps, in float32 and float64, CPU vs the device:
    the bounds (every spectral route, tight, per-row), a tight margin radius, bound_many,
    a sweep with the tight and PGD methods and compare on the conv-to-FC route."""
    from lipbound import Analyzer
    from lipbound.baselines import compare
    from lipbound.batch import bound_many
    from lipbound.radius import certified_radius
    from lipbound.sweep import sweep

    net_c, xs = _small_net(seed)
    x0, shape = xs[:1], tuple(xs.shape[1:])
    c = torch.zeros(2, 5, dtype=torch.float64)
    c[0, 0], c[0, 1], c[1, 2] = 1.0, -1.0, 1.0
    for dt in (torch.float32, torch.float64):
        tag = f"small net ({str(dt).removeprefix('torch.')})"
        mc = copy.deepcopy(net_c).to(dt)
        mg = copy.deepcopy(net_c).to(device=DEV, dtype=dt)
        xc = x0.to(dt)  # (given on the CPU to the device's model too, as the CLI does)
        for spectral in ("auto", "exact", "lanczos"):
            rc = Analyzer(mc, shape, seed=seed, spectral=spectral).local_bound(xc, 0.1)
            rg = Analyzer(mg, shape, seed=seed, spectral=spectral).local_bound(xc, 0.1)
            report(rg.guarantee == rc.guarantee and rel(rc.value, rg.value) <= REL_BOUND,
                   f"{tag}: local bound ({spectral}) CPU vs {DEV.type}",
                   f"{rc.value!r} vs {rg.value!r}")
        vals_c = _four_bounds(Analyzer(mc, shape, seed=seed), xc, c)
        vals_g = _four_bounds(Analyzer(mg, shape, seed=seed), xc, c.to(DEV))
        for what, vc in vals_c.items():
            vg = vals_g[what]
            worst = max(rel(p, q) for p, q in zip(vc, vg, strict=True))
            report(worst <= REL_BOUND, f"{tag}: {what} bound CPU vs {DEV.type}",
                   f"{vc!r} vs {vg!r}")
        rc = certified_radius(mc, xc, method="margin", tight=True, seed=seed)
        rg = certified_radius(mg, xc, method="margin", tight=True, seed=seed)
        report(rc.predicted_class == rg.predicted_class and rel(rc.radius, rg.radius)
               <= REL_RADIUS, f"{tag}: tight margin radius CPU vs {DEV.type}",
               f"{rc.radius!r} vs {rg.radius!r}")
        bc = bound_many(mc, xs.to(dt), 0.05, tight=True, seed=seed)
        bg = bound_many(mg, xs.to(dt), 0.05, tight=True, seed=seed)
        worst = max(rel(a.bound, b.bound) for a, b in zip(bc, bg, strict=True))
        report(worst <= REL_BOUND, f"{tag}: bound_many (tight) CPU vs {DEV.type}",
               f"worst rel {worst:.2e}")
    mg = copy.deepcopy(net_c).to(DEV)
    res = sweep(mg, x0, [0.01, 0.1], ("local", "tight", "global", "pgd"), samples=64,
                steps=5, restarts=2, seed=seed)
    report(not res.violations(), f"small net: sweep with tight and pgd on {DEV.type}",
           f"tight {res.values('tight')}, pgd {res.values('pgd')}")
    rows = compare(mg, x0.to(DEV), 0.05, ("local", "local-tight", "global", "fastlip",
                                          "autolip"), seed=seed)
    by = {r.method: r for r in rows}
    ok = all(math.isfinite(r.value) for r in rows) and by["local-tight"].value <= \
        by["local"].value * (1 + REL_BOUND) and by["fastlip"].value <= by["autolip"].value
    report(ok, f"small net: compare (conv-to-FC rivals) with a model on {DEV.type}",
           ", ".join(f"{r.method} {r.value:.6g}" for r in rows))


def check_rivals(seed: int) -> None:
    """The rival methods with a model on the device (they convert it to float64 numpy on the
    CPU): every upper bound >= the exact constant on the comparison network."""
    from lipbound import zoo
    from lipbound.baselines import compare
    from lipbound.inputs import load_sample

    lm = zoo.load_model("compnet", device=DEV)
    x0 = load_sample(lm.entry.default_sample, entry=lm.entry).x.to(DEV)
    rows = compare(lm.model, x0, 0.1, ("lower", "local", "exact-l2", "recurjac", "fastlip",
                                        "global", "autolip"), seed=seed)
    by = {r.method: r for r in rows}
    ran = all(math.isfinite(r.value) for r in rows)
    exact = by["exact-l2"].value
    ok = ran and by["lower"].value <= by["local"].value and all(
        by[m].value >= exact for m in ("recurjac", "fastlip", "global", "autolip"))
    report(ok, f"compnet: rival methods with a model on {DEV.type}",
           ", ".join(f"{r.method} {r.value:.6g}" for r in rows))


def check_cli(name: str) -> None:
    env_py = sys.executable
    for args in (["bound", "--model", name, "--device", DEV.type, "--json"],
                 ["radius", "--model", name, "--device", DEV.type, "--json"]):
        cmd = [env_py, "-c", "import sys; from lipbound.cli import main; sys.exit(main())",
               *args]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                           check=False)
        report(p.returncode == 0, f"cli: lipbound {' '.join(args)}",
               f"exit {p.returncode}, {time.perf_counter() - t0:.1f} s"
               + (f"; {p.stderr.strip().splitlines()[-1]}" if p.returncode and p.stderr.strip()
                  else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mnist,cifar10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: run the script against itself on the CPU (a self-check)")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    if DEV.type == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cudnn "
              f"{torch.backends.cudnn.version()}", flush=True)
    guarded("compnet: rivals", lambda: check_rivals(args.seed))
    guarded("small net: batch norm, pooling, clamps", lambda: check_small(args.seed))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        check_model(name, args.seed)
        if not args.no_cli:
            guarded(f"{name}: cli", lambda n=name: check_cli(n))
    print(f"\n{len(FAILURES)} failure(s)" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
