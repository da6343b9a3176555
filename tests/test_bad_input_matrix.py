"""The bad-input matrix (non-negotiable 3): every public entry point x every kind of bad input
raises a lipbound error whose message names the problem and the fix (or, on the command
line, exits with status 2 and a one-paragraph ``lipbound: error:`` message, no traceback).

Session 25 audit. Entry points: the core (``local_bound``, ``global_bound``, the
:class:`~lipbound.Analyzer` methods, radii, sweep, ``bound_many``), the lower bounds, the
attacks, the rival methods and ``compare``, the bench functions, the plotting functions, the
zoo and input loaders, and every CLI sub-command. Bad-input kinds: radii (0, negative, NaN,
inf, a string, a list, ``None``, a bool), inputs (NaN/inf, a wrong shape, a batch of 2, a
3-d tensor for a vector model, complex, meta, not a tensor), models (training mode, several
unsupported operations, NaN/inf weights, not a module), output maps (wrong shape, NaN, 3-d,
no rows, complex), weight and input files (missing, empty, truncated, corrupt, text, another
architecture, wrong shapes, a pickle that is no state dict) and option values.

Cells a method accepts by design (an integer or unbatched input of the right shape, a lower
bound or an attack on a model with operations the certified bounds do not support: they only
run the model) are not in the matrix; :func:`test_accepted_alternative_forms_give_the_same_
answer` checks that such forms give the same answer as the canonical one.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_helpers import run_err
from lipbound import (
    Analyzer,
    LipboundError,
    attacks,
    baselines,
    batch,
    bench,
    global_bound,
    local_bound,
    lower,
    plotting,
    radius,
    zoo,
)
from lipbound import inputs as lb_inputs
from lipbound import sweep as lb_sweep
from lipbound.cli import main
from lipbound.errors import UnsupportedModelError, WeightsError

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DT = torch.float64
FIX = re.compile(r"\b(must|expected|expects|need|needs|pass|use|give|call|load|clean|check|"
                 r"convert|rewrite|register|flatten|reshape|choose|drop|swap|save|add|"
                 r"build)\b|\be\.g\.", re.IGNORECASE)
"""A message states the fix: what the argument must be, or what to do."""


def _net() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return net


NET = _net()
X = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=DT)
C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=DT)


def assert_clear(exc: BaseException, problem: str) -> None:
    """A lipbound error naming the problem (regex ``problem``) and the fix."""
    msg = str(exc)
    assert isinstance(exc, LipboundError), f"{type(exc).__name__}: {msg}"
    assert re.search(problem, msg, re.IGNORECASE), f"problem {problem!r} not named: {msg}"
    assert FIX.search(msg), f"no fix in: {msg}"


def _raises(fn: Callable[[], object], problem: str) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is checked below
        fn()
    assert_clear(info.value, problem)


# ------------------------------------------------------------------------- entry points
GOOD = object()
"""An argument left at its good value (the net, X, 0.1, no output map)."""


# each: (model, x, eps, output_map) -> call
def _rv(f):
    return lambda m, x, e, c: f(NET if m is GOOD else m, X if x is GOOD else x,
                                0.1 if e is GOOD else e, None if c is GOOD else c)


ENTRIES: dict[str, Callable] = {
    "local_bound": _rv(lambda m, x, e, c: local_bound(m, x, e, output_map=c)),
    "global_bound": _rv(lambda m, x, e, c: global_bound(m, x, output_map=c)),
    "Analyzer.local_bound": _rv(
        lambda m, x, e, c: Analyzer(m, (4,)).local_bound(x, e, output_map=c)),
    "Analyzer.local_bound(tight)": _rv(
        lambda m, x, e, c: Analyzer(m, (4,)).local_bound(x, e, output_map=c, tight=True)),
    "Analyzer.local_bound_rows": _rv(
        lambda m, x, e, c: Analyzer(m, (4,)).local_bound_rows(x, e, C if c is None else c)),
    "Analyzer.global_bound": _rv(lambda m, x, e, c: Analyzer(m, (4,)).global_bound(
        output_map=c)),
    "Analyzer.forward": _rv(lambda m, x, e, c: Analyzer(m, (4,)).forward(x)),
    "certified_radius": _rv(lambda m, x, e, c: radius.certified_radius(m, x, max_eps=e)),
    "certified_radii": _rv(lambda m, x, e, c: radius.certified_radii(m, x, max_eps=e)),
    "sweep": _rv(lambda m, x, e, c: lb_sweep.sweep(
        m, x, [e], ("local", "global", "random"), samples=8, output_map=c)),
    "bound_many": _rv(lambda m, x, e, c: batch.bound_many(m, [x], e, input_shape=(4,))),
    "random_lower_bound": _rv(lambda m, x, e, c: lower.random_lower_bound(
        m, x, e, n_samples=16, output_map=c)),
    "gradient_lower_bound": _rv(lambda m, x, e, c: lower.gradient_lower_bound(
        m, x, e, n_steps=2, output_map=c)),
    "pgd_lower_bound": _rv(lambda m, x, e, c: lower.pgd_lower_bound(
        m, x, e, n_restarts=1, n_steps=2, n_refine=1, refine_steps=1, output_map=c)),
    "best_lower_bound": _rv(lambda m, x, e, c: lower.best_lower_bound(
        m, x, e, n_random=8, gradient_steps=2, pgd_restarts=1, pgd_steps=2, pgd_refine=1,
        pgd_refine_steps=1, output_map=c)),
    "sample_ball": _rv(lambda m, x, e, c: lower.sample_ball(x, e, 3)),
    "ratio_at": _rv(lambda m, x, e, c: lower.ratio_at(m, X, x if x is not X else X + 0.01,
                                                      output_map=c)),
    "jacobian_norm_at": _rv(lambda m, x, e, c: lower.jacobian_norm_at(m, x, output_map=c)),
    "jacobian_spectrum": _rv(lambda m, x, e, c: lower.jacobian_spectrum(m, x, output_map=c)),
    "jacobian_matrix": _rv(lambda m, x, e, c: lower.jacobian_matrix(m, x, output_map=c)),
    "run_attacks": _rv(lambda m, x, e, c: attacks.run_attacks(m, x, ("fgsm",))),
    "PGD": _rv(lambda m, x, e, c: attacks.PGD(steps=2, restarts=1)(m, x)),
    "compare": _rv(lambda m, x, e, c: baselines.compare(m, x, e, ["autolip", "fastlip"])),
    "autolip": _rv(lambda m, x, e, c: baselines.autolip(m, output_map=c, input_shape=(4,))),
    "seqlip": _rv(lambda m, x, e, c: baselines.seqlip(m, output_map=c, input_shape=(4,))),
    "eclipse_fast": _rv(lambda m, x, e, c: baselines.eclipse_fast(m, output_map=c,
                                                                   input_shape=(4,))),
    "lipsdp": _rv(lambda m, x, e, c: baselines.lipsdp(m, output_map=c, input_shape=(4,))),
    "fastlip": _rv(lambda m, x, e, c: baselines.fastlip(m, x, e, output_map=c)),
    "recurjac": _rv(lambda m, x, e, c: baselines.recurjac(m, x, e, output_map=c)),
    "exact_local_l2": _rv(lambda m, x, e, c: baselines.exact_local_l2(m, x, e, output_map=c)),
    "lipmip": _rv(lambda m, x, e, c: baselines.lipmip(
        m, x, e, c=torch.tensor([1.0, -1.0, 0.0], dtype=DT) if c is None else c)),
    "bench_model": _rv(lambda m, x, e, c: bench.bench_model(m, x, name="t", eps=e, repeat=1,
                                                            warmup=False)),
    "bench_sweep_model": _rv(lambda m, x, e, c: bench.bench_sweep_model(
        m, x, name="t", eps_range=(e, 1.0), n_points=2, local_repeat=1)),
}

GLOBAL_ONLY = {"global_bound", "Analyzer.global_bound", "autolip", "seqlip", "eclipse_fast",
               "lipsdp"}
NO_EPS = GLOBAL_ONLY | {"Analyzer.forward", "ratio_at", "jacobian_norm_at",
                        "jacobian_spectrum", "jacobian_matrix", "run_attacks", "PGD"}
NO_X = GLOBAL_ONLY - {"global_bound"}
NO_MODEL = {"sample_ball"}
WITH_MAP = {"local_bound", "global_bound", "Analyzer.local_bound", "Analyzer.local_bound(tight)",
            "Analyzer.local_bound_rows", "Analyzer.global_bound", "sweep",
            "random_lower_bound", "gradient_lower_bound", "pgd_lower_bound",
            "best_lower_bound", "ratio_at", "jacobian_norm_at", "jacobian_spectrum",
            "jacobian_matrix", "autolip", "seqlip", "eclipse_fast", "lipsdp", "fastlip",
            "recurjac", "exact_local_l2"}
ANY_MODEL = {"random_lower_bound", "gradient_lower_bound", "pgd_lower_bound",
             "best_lower_bound", "ratio_at", "jacobian_norm_at", "jacobian_spectrum",
             "jacobian_matrix", "run_attacks", "PGD", "compare"}
"""Entry points that only run the model (or, for compare, give the unsupported rows a note):
a model with operations the certified bounds lack a rule for is no error there."""

EPS_BAD = {"0": 0.0, "negative": -1.0, "nan": math.nan, "inf": math.inf, "string": "abc",
           "list": [0.1, 0.2], "None": None, "bool": True}
DEFAULT_NONE = {"certified_radius", "certified_radii", "bench_model"}
"""Entry points whose radius argument defaults to ``None`` (no largest radius / the default)."""


def _x_bad() -> dict[str, tuple[object, str]]:
    nan, inf = X.clone(), X.clone()
    nan[0, 1], inf[0, 2] = math.nan, -math.inf
    return {
        "nan": (nan, "NaN"), "inf": (inf, "inf"),
        "wrong features": (torch.zeros(1, 5, dtype=DT), "shape|elements"),
        "batch of 2": (torch.zeros(2, 4, dtype=DT), "batch|shape"),
        "3-d": (torch.zeros(1, 1, 4, dtype=DT), "shape|layout|flatten"),
        "complex": (X.to(torch.complex128), "complex"),
        "meta": (X.to("meta"), "meta"),
        "string": ("x", "tensor|array|shape"),
        "None": (None, "tensor|shape"),
    }


#: user-model factories for the CLI cells (a file given as --model), whose network with two
#: unsupported ops the API cells use too
USER_NETS = """
import torch
from torch import nn


class TwoUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.sigmoid(torch.tanh(self.a(x))))


def unsupported():
    return {"model": TwoUnsupported().eval(), "input_shape": (4,)}


def training():
    return {"model": nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), "input_shape": (4,)}


def not_a_module():
    return {"model": "net", "input_shape": (4,)}
"""


def _model_bad() -> dict[str, tuple[object, str]]:
    nets: dict = {}
    exec(USER_NETS, nets)  # (the CLI cells' file: one definition of the two-op network)
    TwoUnsupported = nets["TwoUnsupported"]  # noqa: N806 - a class
    training = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3))
    nan_w, inf_w = _net(), _net()
    with torch.no_grad():
        nan_w[0].weight[0, 0] = math.nan
        inf_w[2].bias[1] = math.inf
    return {
        "training mode": (training.to(DT).train(), "training mode"),
        "two unsupported ops": (TwoUnsupported().to(DT).eval(), "tanh(?s:.*)sigmoid"),
        "NaN weights": (nan_w, r"NaN"),
        "inf weights": (inf_w, r"inf"),
        "a function": (lambda x: x, "Module"),
        "a string": ("net", "Module"),
    }


def _map_bad(entry: str) -> dict[str, tuple[object, str]]:
    if entry == "lipmip":  # (a vector c)
        return {"wrong length": (torch.zeros(4, dtype=DT), r"\bc\b"),
                "nan": (torch.full((3,), math.nan, dtype=DT), r"\bc\b"),
                "3-d": (torch.zeros(1, 2, 3, dtype=DT), r"\bc\b"),
                "no rows": (torch.zeros(0, dtype=DT), r"\bc\b"),
                "complex": (torch.ones(3, dtype=torch.complex128), "complex")}
    return {"wrong columns": (torch.zeros(2, 4, dtype=DT), "output_map"),
            "nan": (torch.full((2, 3), math.nan, dtype=DT), "output_map.*NaN"),
            "3-d": (torch.zeros(1, 2, 3, dtype=DT), "output_map"),
            "no rows": (torch.zeros(0, 3, dtype=DT), "output_map.*rows"),
            "complex": (C.to(torch.complex128), "complex")}


def _cells() -> list:
    cells = []
    for name in ENTRIES:
        if name not in NO_EPS:
            for k, v in EPS_BAD.items():
                if not (k == "None" and name in DEFAULT_NONE):
                    cells.append(pytest.param(name, "eps", v, r"eps|radi", id=f"{name}-eps-{k}"))
        if name not in NO_X:
            for k, (v, word) in _x_bad().items():
                if name == "Analyzer.forward" and k == "batch of 2":
                    continue  # (forward takes a batch)
                if name == "sample_ball" and k in ("wrong features", "3-d"):
                    continue  # (a ball around any tensor)
                cells.append(pytest.param(name, "x", v, word, id=f"{name}-x-{k}"))
        if name not in NO_MODEL:
            for k, (v, word) in _model_bad().items():
                if k == "two unsupported ops" and name in ANY_MODEL:
                    continue
                cells.append(pytest.param(name, "model", v, word, id=f"{name}-model-{k}"))
        if name in WITH_MAP or name == "lipmip":
            for k, (v, word) in _map_bad(name).items():
                cells.append(pytest.param(name, "map", v, word, id=f"{name}-map-{k}"))
    return cells


@pytest.mark.parametrize("entry, kind, value, problem", _cells())
def test_api_matrix(entry, kind, value, problem):
    args = {"model": GOOD, "x": GOOD, "eps": GOOD, "map": GOOD}
    args[kind] = value
    _raises(lambda: ENTRIES[entry](args["model"], args["x"], args["eps"], args["map"]),
            problem)


OPTION_CELLS = {
    "Analyzer lanczos_steps=0": (lambda: Analyzer(NET, (4,), lanczos_steps=0), "lanczos_steps"),
    "Analyzer seed='a'": (lambda: Analyzer(NET, (4,), seed="a"), "seed"),
    "Analyzer seed=1.5": (lambda: Analyzer(NET, (4,), seed=1.5), "seed"),
    "Analyzer failure_prob=0": (lambda: Analyzer(NET, (4,), failure_prob=0), "failure_prob"),
    "Analyzer failure_prob=1": (lambda: Analyzer(NET, (4,), failure_prob=1), "failure_prob"),
    "Analyzer failure_prob=nan": (lambda: Analyzer(NET, (4,), failure_prob=math.nan),
                                  "failure_prob"),
    "Analyzer spectral='svd'": (lambda: Analyzer(NET, (4,), spectral="svd"), "spectral"),
    "Analyzer device='tpu'": (lambda: Analyzer(NET, (4,), device="tpu"), "device"),
    "Analyzer input_shape=(0,)": (lambda: Analyzer(NET, (0,)), "input_shape"),
    "Analyzer input_shape=(5,)": (lambda: Analyzer(NET, (5,)), "shape"),
    "local_bound unknown option": (lambda: local_bound(NET, X, 0.1, spectrall="exact"),
                                   "spectrall"),
    "local_bound tight='yes'": (lambda: local_bound(NET, X, 0.1, tight="yes"), "tight"),
    "local_bound tight_rows=0": (lambda: local_bound(NET, X, 0.1, tight=True, tight_rows=0),
                                 "tight_rows"),
    "certified_radius method": (lambda: radius.certified_radius(NET, X, method="foo"),
                                "method"),
    "certified_radius tol=0": (lambda: radius.certified_radius(NET, X, tol=0), "tol"),
    "certified_radius max_evaluations=0": (
        lambda: radius.certified_radius(NET, X, max_evaluations=0), "max_evaluations"),
    "certified_radius start=-1": (lambda: radius.certified_radius(NET, X, start=-1), "start"),
    "certified_radius reuse_tol=-1": (lambda: radius.certified_radius(NET, X, reuse_tol=-1),
                                      "reuse_tol"),
    "certified_radii methods": (lambda: radius.certified_radii(NET, X, methods=["x"]),
                                "methods"),
    "sweep eps_values=[]": (lambda: lb_sweep.sweep(NET, X, []), "eps_values"),
    "sweep eps_values nan item": (lambda: lb_sweep.sweep(NET, X, [0.1, math.nan]),
                                  r"eps_values\[1\]"),
    "sweep methods": (lambda: lb_sweep.sweep(NET, X, [0.1], ("bogus",)), "bogus"),
    "sweep samples=0": (lambda: lb_sweep.sweep(NET, X, [0.1], ("random",), samples=0),
                        "samples"),
    "sweep lower_dtype=int32": (lambda: lb_sweep.sweep(NET, X, [0.1], ("random",),
                                                       lower_dtype=torch.int32), "lower_dtype"),
    "eps_grid points=0": (lambda: lb_sweep.eps_grid(0.1, 1.0, 0), "points"),
    "eps_grid reversed": (lambda: lb_sweep.eps_grid(1.0, 0.1, 3), "eps_min"),
    "bound_many method": (lambda: batch.bound_many(NET, [X], 0.1, method="foo"), "method"),
    "bound_many batch_size=0": (lambda: batch.bound_many(NET, [X], 0.1, batch_size=0),
                                "batch_size"),
    "bound_many no inputs": (lambda: batch.bound_many(NET, [], 0.1), "no inputs"),
    "bound_many label out of range": (lambda: batch.bound_many(
        NET, [lb_inputs.Sample(x=X, label=3, name="s")], 0.1), "label 3"),
    "bound_many label -1": (lambda: batch.bound_many(
        NET, [lb_inputs.Sample(x=X, label=-1, name="s")], 0.1), "label -1"),
    "bound_many eps per input with nan": (
        lambda: batch.bound_many(NET, [X, X], [0.1, math.nan]), r"eps\[1\]"),
    "bound_many eps per input, wrong count": (
        lambda: batch.bound_many(NET, [X, X], [0.1, 0.2, 0.3]), "radii"),
    "sweep eps_values 2-d": (lambda: lb_sweep.sweep(NET, X, [[0.1, 0.2]]), "eps_values"),
    "sweep eps_values tensor with 0": (
        lambda: lb_sweep.sweep(NET, X, torch.tensor([0.1, 0.0])), r"eps_values\[1\]"),
    "bench repeat=-1": (lambda: bench.bench_model(NET, X, name="t", repeat=-1), "repeat"),
    "bench threads=0": (lambda: bench.bench_model(NET, X, name="t", repeat=1, threads=0),
                        "threads"),
    "bench what": (lambda: bench.bench_model(NET, X, name="t", what="foo"), "what"),
    "bench unknown model": (lambda: bench.bench("nope"), "unknown zoo model"),
    "bench_radius n_images=0": (lambda: bench.bench_radius("mnist", n_images=0), "n_images"),
    "random_lower_bound n_samples=0": (
        lambda: lower.random_lower_bound(NET, X, 0.1, n_samples=0), "n_samples"),
    "gradient_lower_bound objective": (
        lambda: lower.gradient_lower_bound(NET, X, 0.1, objective="foo"), "objective"),
    "pgd_lower_bound lr": (lambda: lower.pgd_lower_bound(NET, X, 0.1, lr=(0.1,)), "lr"),
    "pgd_lower_bound init shape": (
        lambda: lower.pgd_lower_bound(NET, X, 0.1, init=torch.zeros(1, 5)), "init"),
    "pgd_lower_bound seed=-1": (lambda: lower.pgd_lower_bound(NET, X, 0.1, seed=-1), "seed"),
    "jacobian_spectrum n_iter=0": (lambda: lower.jacobian_spectrum(NET, X, n_iter=0),
                                   "n_iter"),
    "get_attack unknown": (lambda: attacks.get_attack("nope"), "unknown attack"),
    "get_attack bad option": (lambda: attacks.get_attack("pgd", foo=1), "foo"),
    "PGD steps=0": (lambda: attacks.PGD(steps=0), "steps"),
    "CW kappa=nan": (lambda: attacks.CarliniWagnerL2(kappa=math.nan), "kappa"),
    "FGSM direction": (lambda: attacks.FGSM(direction="l3"), "direction"),
    "run_attacks seed='a'": (lambda: attacks.run_attacks(NET, X, ("fgsm",), seed="a"), "seed"),
    "run_attacks bounds lo>hi": (lambda: attacks.run_attacks(NET, X, ("fgsm",),
                                                             bounds=(1.0, 0.0)), "bounds"),
    "run_attacks options not a dict": (
        lambda: attacks.run_attacks(NET, X, ("fgsm",), options=[1]), "options"),
    "run_attacks options of an attack not a dict": (
        lambda: attacks.run_attacks(NET, X, ("fgsm",), options={"fgsm": "x"}), "options"),
    "run_attacks one output": (lambda: attacks.run_attacks(nn.Linear(4, 1).to(DT).eval(), X,
                                                           ("fgsm",)), "class"),
    "lipsdp variant": (lambda: baselines.lipsdp(NET, variant="foo", input_shape=(4,)),
                       "variant"),
    "lipmip input_norm": (lambda: baselines.lipmip(NET, X, 0.1, c=torch.ones(3),
                                                   input_norm="l2"), "input_norm"),
    "lipmip solver": (lambda: baselines.lipmip(NET, X, 0.1, c=torch.ones(3), solver="x"),
                      "solver"),
    "lipmip without c": (lambda: baselines.lipmip(NET, X, 0.1), r"\bc\b"),
    "compare time_limit=-1": (lambda: baselines.compare(NET, X, 0.1, time_limit=-1),
                              "time_limit"),
    "compare methods": (lambda: baselines.compare(NET, X, 0.1, ["nope"]), "nope"),
    "compare no methods": (lambda: baselines.compare(NET, X, 0.1, []), "no method"),
    "fastlip time_limit=nan": (lambda: baselines.fastlip(NET, X, 0.1, time_limit=math.nan),
                               "time_limit"),
    "autolip bad pairs": (lambda: baselines.autolip([(torch.zeros(3, 4), torch.zeros(2))]),
                          "shape"),
    "autolip NaN pairs": (lambda: baselines.autolip([(torch.full((3, 4), math.nan),
                                                      torch.zeros(3))]), "NaN"),
    "zoo.load_model unknown": (lambda: zoo.load_model("nope"), "unknown zoo model"),
    "zoo.load_model seed=-1": (lambda: zoo.load_model("tiny", seed=-1), "seed"),
    "zoo.load_model device": (lambda: zoo.load_model("tiny", device="gpu"), "device"),
    "zoo.load_testset tiny": (lambda: zoo.load_testset("tiny"), "test set"),
    "load_sample unknown": (lambda: lb_inputs.load_sample("mnist:99"), "unknown sample"),
    "load_sample index": (lambda: lb_inputs.load_sample("mnist:test/99999"), "out of range"),
    "load_sample None": (lambda: lb_inputs.load_sample(None), "reference"),
    # session 25 fixes
    "Analyzer name=5": (lambda: Analyzer(NET, (4,), name=5), "name"),
    "bound_many timings=[]": (lambda: batch.bound_many(NET, [X], 0.1, timings=[]), "timings"),
    "normalize_pixels std=0": (lambda: lb_inputs.normalize_pixels(
        torch.zeros(1, 1, 2, 2), mean=[0.0], std=[0.0]), "std"),
    "normalize_pixels mean=nan": (lambda: lb_inputs.normalize_pixels(
        torch.zeros(1, 1, 2, 2), mean=[math.nan], std=[1.0]), "mean"),
    "normalize_pixels 3 means, 1 channel": (lambda: lb_inputs.normalize_pixels(
        torch.zeros(1, 1, 2, 2), mean=[0.0] * 3, std=[1.0] * 3), "channels"),
    "normalize_pixels mean without std": (lambda: lb_inputs.normalize_pixels(
        torch.zeros(1, 1, 2, 2), mean=[0.5], std=None), "both"),
    "normalize_pixels scale=0": (lambda: lb_inputs.normalize_pixels(
        torch.zeros(1, 1, 2, 2), mean=None, std=None, scale=0), "scale"),
    "normalize_pixels list": (lambda: lb_inputs.normalize_pixels(
        [[0.0]], mean=None, std=None), "tensor"),
    "normalize_pixels no batch": (lambda: lb_inputs.normalize_pixels(
        torch.zeros(4), mean=None, std=None), "batch"),
    # session 26: boolean options take True / False (or numpy's) only; a string such as
    # 'no' was taken by its truth value (yes), 1 and None by theirs
    **{f"{where} {opt}={v!r}": (call, rf"{opt}\b.*{re.escape(repr(v))}")
       for where, opt, v, call in [
        ("local_bound", "progress", "yes", lambda: local_bound(NET, X, 0.1, progress="yes")),
        ("local_bound", "tight", 1, lambda: local_bound(NET, X, 0.1, tight=1)),
        ("global_bound", "progress", "no", lambda: global_bound(NET, X, progress="no")),
        ("Analyzer.local_bound", "progress", 1,
         lambda: Analyzer(NET, (4,)).local_bound(X, 0.1, progress=1)),
        ("Analyzer.global_bound", "progress", "yes",
         lambda: Analyzer(NET, (4,)).global_bound(progress="yes")),
        ("Analyzer.local_bound_rows", "tight", "no",
         lambda: Analyzer(NET, (4,)).local_bound_rows(X, 0.1, C, tight="no")),
        ("bound_many", "share_global", "no",
         lambda: batch.bound_many(NET, [X], 0.1, share_global="no")),
        ("bound_many", "progress", "yes", lambda: batch.bound_many(NET, [X], 0.1,
                                                                   progress="yes")),
        ("bound_many", "tight", "False", lambda: batch.bound_many(NET, [X], 0.1,
                                                                  tight="False")),
        ("certified_radius", "progress", "yes",
         lambda: radius.certified_radius(NET, X, progress="yes")),
        ("certified_radius", "tight", 0, lambda: radius.certified_radius(NET, X, tight=0)),
        ("certified_radii", "progress", 1, lambda: radius.certified_radii(NET, X, progress=1)),
        ("sweep", "progress", "no", lambda: lb_sweep.sweep(NET, X, [0.1], ("local",),
                                                           progress="no")),
        ("random_lower_bound", "progress", "yes", lambda: lower.random_lower_bound(
            NET, X, 0.1, n_samples=8, progress="yes")),
        ("best_lower_bound", "progress", "no", lambda: lower.best_lower_bound(
            NET, X, 0.1, n_random=8, gradient_steps=1, pgd_restarts=1, pgd_steps=1,
            pgd_refine=1, pgd_refine_steps=1, progress="no")),
        ("PGD", "refine", "no", lambda: attacks.PGD(refine="no")),
        ("CarliniWagnerL2", "refine", 0, lambda: attacks.CarliniWagnerL2(refine=0)),
        ("IterativeFGSM", "refine", "no", lambda: attacks.IterativeFGSM(refine="no")),
        ("GradientAscent", "refine", None, lambda: attacks.GradientAscent(refine=None)),
        ("get_attack", "refine", "no", lambda: attacks.get_attack("pgd", refine="no")),
        ("compare", "progress", "yes", lambda: baselines.compare(NET, X, 0.1, ["autolip"],
                                                                 progress="yes")),
        ("bench_model", "warmup", "no", lambda: bench.bench_model(
            NET, X, name="t", what="global", repeat=1, warmup="no")),
        ("bench_model", "progress", "yes", lambda: bench.bench_model(
            NET, X, name="t", what="global", repeat=1, progress="yes")),
        ("bench", "warmup", "no", lambda: bench.bench("mnist", what="global", repeat=1,
                                                      warmup="no")),
        ("bench_sweep", "raw", "no", lambda: bench.bench_sweep(
            "mnist", n_points=2, local_repeat=1, raw="no")),
        ("bench_sweep_model", "raw", "no", lambda: bench.bench_sweep_model(
            NET, X, name="t", eps_range=(0.1, 0.2), n_points=2, local_repeat=1, raw="no")),
        ("bench_sweep_model", "progress", 1, lambda: bench.bench_sweep_model(
            NET, X, name="t", eps_range=(0.1, 0.2), n_points=2, local_repeat=1, raw=False,
            progress=1)),
        ("bench_radius", "start_from_previous", "no", lambda: bench.bench_radius(
            "mnist", n_images=1, start_from_previous="no")),
        ("bench_radius", "progress", "yes", lambda: bench.bench_radius(
            "mnist", n_images=1, progress="yes")),
        ("load_sample", "raw", "no", lambda: lb_inputs.load_sample("mnist:8", raw="no")),
        ("load_samples", "raw", "yes", lambda: lb_inputs.load_samples("mnist:test/0-1",
                                                                      raw="yes")),
    ]},
}


@pytest.mark.parametrize("call, problem", OPTION_CELLS.values(), ids=OPTION_CELLS.keys())
def test_option_matrix(call, problem):
    _raises(call, problem)


def test_several_unsupported_operations_are_listed_in_one_error():
    model = _model_bad()["two unsupported ops"][0]
    for fn in (lambda: local_bound(model, X, 0.1), lambda: baselines.fastlip(model, X, 0.1)):
        with pytest.raises(LipboundError) as info:
            fn()
        assert "tanh" in str(info.value) and "sigmoid" in str(info.value)
    with pytest.raises(UnsupportedModelError) as info:
        global_bound(model, (4,))
    assert len(info.value.nodes) == 2


def test_accepted_alternative_forms_give_the_same_answer():
    """The forms accepted by design are the same input, not a silent reshape: an unbatched
    or integer x0 gives the bound of the batched float one, a list output map that of the
    tensor."""
    xi = torch.tensor([[1, 0, 2, -1]])
    base = local_bound(NET, xi.to(DT), 0.1).value
    assert local_bound(NET, xi, 0.1).value == base
    assert local_bound(NET, xi[0].to(DT), 0.1).value == base
    assert baselines.fastlip(NET, xi[0].to(DT), 0.1).value == \
        baselines.fastlip(NET, xi.to(DT), 0.1).value
    assert global_bound(NET, X, output_map=C.tolist()).value == \
        global_bound(NET, X, output_map=C).value


def test_numpy_bools_are_booleans():
    """numpy.bool_ (a mask's element, a config read with numpy) is a boolean like True and
    False: accepted by every boolean option, with the same answer (tight=np.True_ was refused
    before session 26, as not a bool)."""
    assert local_bound(NET, X, 0.1, tight=np.True_, progress=np.False_).value == \
        local_bound(NET, X, 0.1, tight=True).value
    an = Analyzer(NET, (4,))
    assert torch.equal(an.local_bound_rows(X, 0.1, C, tight=np.True_).values,
                       an.local_bound_rows(X, 0.1, C, tight=True).values)
    rows = batch.bound_many(NET, [X], 0.1, share_global=np.False_, progress=np.False_,
                            tight=np.bool_(False))
    assert rows[0].bound == batch.bound_many(NET, [X], 0.1, share_global=False)[0].bound
    assert radius.certified_radius(NET, X, tight=np.True_).radius == \
        radius.certified_radius(NET, X, tight=True).radius
    assert attacks.PGD(refine=np.False_).refine is False
    assert lower.random_lower_bound(NET, X, 0.1, n_samples=8, progress=np.False_).value == \
        lower.random_lower_bound(NET, X, 0.1, n_samples=8, progress=None).value


# --------------------------------------------- session 25 fixes, one API test for each
def test_forward_refuses_what_it_would_reshape_or_fail_on():
    an = Analyzer(NET, (4,))
    for bad, word in ((torch.zeros(1, 5, dtype=DT), "shape"), ([[0.0] * 4], "tensor"),
                      (torch.zeros(1, 1, 4, dtype=DT), "shape"), (X.to("meta"), "meta"),
                      (torch.full((2, 4), math.nan, dtype=DT), "NaN")):
        _raises(lambda bad=bad: an.forward(bad), word)
    assert an.forward(torch.zeros(2, 4, dtype=DT)).shape == (2, 3)
    assert torch.equal(an.forward(X[0]), an.forward(X))


def test_example_input_of_a_global_bound_must_hold_real_finite_values():
    nan = X.clone()
    nan[0, 0] = math.nan
    for bad, word in ((nan, "NaN"), (X.to(torch.complex128), "complex"), (X.to("meta"), "meta")):
        _raises(lambda bad=bad: global_bound(NET, bad), word)
        _raises(lambda bad=bad: Analyzer(NET, x0=bad), word)


def test_ratio_at_never_returns_nan():
    nan = X.clone()
    nan[0, 0] = math.nan
    _raises(lambda: lower.ratio_at(NET, nan, X), "x0.*NaN")
    _raises(lambda: lower.ratio_at(NET, X, nan), "NaN")
    _raises(lambda: lower.ratio_at(NET, X, X + 0.1, output_map=torch.full((1, 3), math.nan,
                                                                         dtype=DT)), "NaN")
    _raises(lambda: lower.ratio_at(NET, X, X + 0.1, output_map=torch.ones(1, 4, dtype=DT)),
            "output_map")
    _raises(lambda: lower.ratio_at(NET, X, [[0.0] * 4]), "tensor")
    _raises(lambda: lower.ratio_at(lambda x: x, X, X + 0.1), "Module")
    _raises(lambda: lower.ratio_at(_model_bad()["NaN weights"][0], X, X + 0.1), "NaN")
    big = _net()
    with torch.no_grad():
        big[0].weight.fill_(1e200)
        big[2].weight.fill_(1e200)
    _raises(lambda: lower.ratio_at(big, X, X + 0.1), "overflow|infinite")
    # good input still works, also float64 points of a float32 model with an output map (the
    # map's check runs the float64 copy there)
    f32 = _net().float()
    c32 = torch.tensor([[1.0, -1.0, 0.0]])
    x64 = torch.tensor([[0.1, 0.2, 0.3, 0.4 + 2.0 ** -40]], dtype=DT)
    r = lower.ratio_at(f32, x64, x64 + 0.01, output_map=c32)
    assert math.isfinite(r) and r > 0


def test_nonfinite_model_output_names_the_weights_or_the_overflow():
    nan_w = _model_bad()["NaN weights"][0]
    for fn in (lambda: lower.random_lower_bound(nan_w, X, 0.1, n_samples=4),
               lambda: attacks.run_attacks(nan_w, X, ("fgsm",))):
        with pytest.raises(WeightsError, match=r"0\.weight"):
            fn()
    big = _net()
    with torch.no_grad():
        big[0].weight.fill_(1e200)
        big[2].weight.fill_(1e200)
    _raises(lambda: lower.random_lower_bound(big, X, 0.1, n_samples=4), "overflow")
    _raises(lambda: attacks.run_attacks(big, X, ("fgsm",)), "overflow")


def test_rivals_refuse_an_input_in_another_layout_than_the_models():
    x3 = X.reshape(1, 1, 4)
    for fn in (baselines.fastlip, baselines.recurjac, baselines.exact_local_l2):
        _raises(lambda fn=fn: fn(NET, x3, 0.1), "layout")
        _raises(lambda fn=fn: fn(NET, X.reshape(1, 2, 2), 0.1, input_shape=(4,)),
                "input_shape")
    _raises(lambda: baselines.lipmip(NET, x3, 0.1, c=torch.tensor([1.0, -1.0, 0.0])),
            "layout")
    _raises(lambda: baselines.fastlip(NET, None, 0.1), "None")
    flat_image = nn.Sequential(nn.Flatten(), NET[0], nn.ReLU(), NET[2]).eval()
    assert baselines.fastlip(flat_image, X.reshape(1, 1, 2, 2), 0.1).value == \
        baselines.fastlip(NET, X, 0.1).value  # (the model's own layout is accepted)


def test_compare_refuses_an_input_the_model_cannot_take():
    _raises(lambda: baselines.compare(NET, torch.zeros(1, 5, dtype=DT), 0.1), "shape")
    _raises(lambda: baselines.compare(NET, X.reshape(1, 1, 4), 0.1), "layout")


def test_lipsdp_refuses_an_unknown_solver_instead_of_a_nan_estimate():
    pytest.importorskip("cvxpy")
    _raises(lambda: baselines.lipsdp(NET, solver="NOPE", input_shape=(4,)), "solver")


def test_bench_options_are_checked():
    _raises(lambda: bench.bench_model(NET, X, name="t", repeat=1,
                                      analyzer_options={"spectrall": "exact"}),
            "analyzer_options")
    _raises(lambda: bench.bench_model(NET, X, name="t", repeat=1, analyzer_options=[1]),
            "analyzer_options")
    for bad in ((0.1,), 0.1, "0.1,1", (1.0, 0.1)):
        _raises(lambda bad=bad: bench.bench_sweep_model(NET, X, name="t", eps_range=bad,
                                                        n_points=2), "eps_range")


def test_exact_class_change_checks_the_class_index():
    an = Analyzer(NET, (4,))
    for bad in (3, -1, 1.5, "0"):
        _raises(lambda bad=bad: radius.exact_class_change(an, X, bad), "cls")


def test_run_attacks_refuses_an_empty_list():
    _raises(lambda: attacks.run_attacks(NET, X, []), "no attack")


def test_plotting_checks_its_data_and_path(tmp_path):
    png = tmp_path / "a.png"
    _raises(lambda: plotting.plot_sweep([0.1, 0.2], {"local": [1.0]}, path_png=png), "values")
    _raises(lambda: plotting.plot_sweep([0.1, 0.2], {"local": ["a", "b"]}, path_png=png),
            "numbers")
    _raises(lambda: plotting.plot_sweep([0.1, math.nan], {"local": [1.0, 2.0]}, path_png=png),
            "eps")
    _raises(lambda: plotting.plot_sweep([-0.1, 0.2], {"local": [1.0, 2.0]}, path_png=png),
            "eps")
    _raises(lambda: plotting.plot_layer_factors(["a", "b"], [1.0], [1.0, 2.0], [0.1, 0.2],
                                                path_png=png), "values")
    _raises(lambda: plotting.plot_radii({"local": [0.1, 0.2]}, {"pgd": [0.3]}, path_png=png),
            "values")
    _raises(lambda: plotting.plot_radii({"local": [-0.1]}, {"pgd": [0.3]}, path_png=png),
            ">= 0")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _raises(lambda: plotting.plot_sweep([0.1, 0.2], {"local": [1.0, 2.0]},
                                        path_png=blocker / "a.png"), "cannot write")


def test_settings_given_with_an_analyzer_are_refused_not_ignored():
    an = Analyzer(NET, (4,))
    _raises(lambda: radius.certified_radius(an, X, spectral="exact"), "spectral")
    _raises(lambda: radius.certified_radii(an, X, seed=3), "seed")
    _raises(lambda: radius.certified_radius(an, X, device="cuda:1"), "device")
    _raises(lambda: lb_sweep.sweep(an, X, [0.1], ("local",), spectral="exact"), "spectral")
    _raises(lambda: lb_sweep.sweep(an, X, [0.1], ("local",), failure_prob=1e-3),
            "failure_prob")
    _raises(lambda: lb_sweep.sweep(an, X, [0.1], ("local",), input_shape=(2, 2)),
            "input_shape")
    _raises(lambda: batch.bound_many(an, [X], 0.1, spectral="lanczos"), "spectral")
    _raises(lambda: batch.bound_many(an, [X], 0.1, seed=7), "seed")
    # the analyzer's own settings, or the defaults, are no conflict
    same = lb_sweep.sweep(an, X, [0.1], ("local",), spectral="auto", input_shape=(4,),
                          device="cpu")
    assert same.values("local") == [local_bound(an, X, 0.1).value]
    assert batch.bound_many(an, [X], 0.1, seed=0, failure_prob=1e-6)[0].bound == \
        local_bound(an, X, 0.1).value


def test_sweep_files_that_cannot_be_written(tmp_path):
    res = lb_sweep.sweep(NET, X, [0.1, 0.2], ("local",))
    blocker = tmp_path / "file"
    blocker.write_text("")
    _raises(lambda: res.to_csv(blocker / "sweep.csv"), "cannot write")
    _raises(lambda: res.to_json(blocker / "sweep.json"), "cannot write")
    assert res.to_csv(tmp_path / "ok" / "sweep.csv").read_text().startswith("eps")
    _raises(lambda: res.values("pgd"), "pgd.*not in this sweep")


def test_sample_ball_refuses_a_meta_tensor():
    _raises(lambda: lower.sample_ball(X.to("meta"), 0.1, 3), "meta")


# ----------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_files")
    sd = zoo.load_model("tiny").model.state_dict()
    torch.save(sd, d / "good.pt")
    (d / "empty.pt").write_bytes(b"")
    raw = (d / "good.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(400))
    (d / "text.pt").write_text("not a checkpoint\n")
    torch.save({k + "_x": v for k, v in sd.items()}, d / "other_keys.pt")
    torch.save({k: torch.zeros(7, 7) for k in sd}, d / "wrong_shapes.pt")
    torch.save([1, 2, 3], d / "list.pt")
    with open(d / "pickle.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    torch.save(nn.Linear(3, 3), d / "whole_module.pt")
    bad = {k: v.clone() for k, v in sd.items()}
    bad["fc1.weight"][0, 0] = math.nan
    torch.save(bad, d / "nan.pt")
    (d / "folder").mkdir()
    np.save(d / "x_wrong.npy", np.zeros(5, dtype=np.float32))
    np.save(d / "x_nan.npy", np.array([0.1, np.nan, 0.3]))
    np.save(d / "x_complex.npy", np.ones(3, dtype=np.complex64))
    np.save(d / "x_bool.npy", np.ones(3, dtype=bool))
    (d / "x_empty.npy").write_bytes(b"")
    (d / "x_random.npy").write_bytes(np.random.default_rng(1).bytes(300))
    torch.save(torch.zeros(5), d / "x_wrong.pt")
    torch.save({"x": torch.zeros(3)}, d / "x_dict.pt")
    (d / "x_random.pt").write_bytes(np.random.default_rng(2).bytes(300))
    (d / "image.png").write_bytes(np.random.default_rng(3).bytes(300))
    return d


WEIGHT_FILES = {"missing.pt": "not found", "empty.pt": "cannot read", "truncated.pt":
                "cannot read", "random.pt": "cannot read", "text.pt": "cannot read",
                "other_keys.pt": "does not match", "wrong_shapes.pt": "shape",
                "list.pt": "not a state dict", "pickle.pkl": "cannot read",
                "whole_module.pt": "cannot read", "nan.pt": "NaN", "folder": "directory"}
INPUT_FILES = {"missing.npy": "not found", "x_wrong.npy": "shape", "x_nan.npy": "NaN",
               "x_complex.npy": "complex", "x_bool.npy": "dtype", "x_empty.npy": "cannot read",
               "x_random.npy": "cannot read", "x_wrong.pt": "shape", "x_dict.pt": "dict",
               "x_random.pt": "cannot read", "image.png": "cannot read"}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name, problem", WEIGHT_FILES.items())
def test_weight_files(files, capsys, name, problem):
    path = str(files / name)
    _raises(lambda: zoo.load_model("tiny", weights=path), problem)
    err = run_err(capsys, ["bound", "--model", "tiny", "--weights", path])
    assert_clear(WeightsError(err), problem)


@pytest.mark.parametrize("name, problem", INPUT_FILES.items())
def test_input_files(files, capsys, name, problem):
    path = str(files / name)
    _raises(lambda: lb_inputs.load_sample(path, entry=zoo.get_entry("tiny")), problem)
    err = run_err(capsys, ["bound", "--model", "tiny", "--input", path])
    assert_clear(LipboundError(err), problem)


# ------------------------------------------------------------------------------- CLI
CLI_CELLS = [
    *[([c, "--model", "tiny", "--eps", v], w) for c in ("bound", "layers", "compare", "bench")
      for v, w in (("0", "> 0"), ("-1", "> 0"), ("nan", "finite"), ("inf", "finite"))],
    *[([*c, "--threads", v], "threads") for c in (["bound", "--model", "tiny"], ["models"],
                                                   ["demo"], ["radius", "--model", "tiny"],
                                                   ["sweep", "--model", "tiny"])
      for v in ("0", "abc")],
    *[([c, "--model", "nope"], "unknown zoo model") for c in ("bound", "radius", "sweep",
                                                              "layers", "compare", "bench")],
    (["bound", "--model", "tiny", "--eps-list", ""], "empty"),
    (["bound", "--model", "tiny", "--eps-list", "0.1,-1"], "> 0"),
    (["bench", "--model", "tiny", "--repeat", "-1"], "repeat"),
    (["bench", "--model", "tiny", "--lanczos-steps", "0"], "lanczos_steps"),
    (["radius", "--model", "tiny", "--tol", "2"], "tol"),
    (["radius", "--model", "tiny", "--methods", "bogus"], "bogus"),
    (["sweep", "--model", "tiny", "--failure-prob", "1"], "failure-prob"),
    (["sweep", "--model", "tiny", "--eps-min", "1", "--eps-max", "0.1"], "swap"),
    (["compare", "--model", "tiny", "--time-limit", "0"], "time"),
    (["bound", "--model", "tiny", "--tight", "--tight-rows", "0"], "tight-rows"),
    (["bound", "--model", "tiny", "--input", "mnist:8"], "shape"),
]


@pytest.mark.parametrize("argv, problem", CLI_CELLS, ids=[" ".join(a) for a, _ in CLI_CELLS])
def test_cli_matrix(capsys, argv, problem):
    err = run_err(capsys, argv)
    assert "Traceback" not in err
    assert_clear(LipboundError(err), re.escape(problem) if problem == "> 0" else problem)



@pytest.mark.parametrize("cmd", ["bound", "radius", "layers", "sweep", "bench"])
@pytest.mark.parametrize("factory, problem", [("unsupported", "tanh(?s:.*)sigmoid"),
                                              ("training", "training mode"),
                                              ("not_a_module", "Module")])
def test_cli_user_models(capsys, tmp_path, cmd, factory, problem):
    (tmp_path / "nets.py").write_text(USER_NETS)
    np.save(tmp_path / "x.npy", np.zeros(4, dtype=np.float32))
    argv = [cmd, "--model", f"{tmp_path / 'nets.py'}:{factory}", "--input",
            str(tmp_path / "x.npy")]
    if cmd == "sweep":
        argv += ["--eps-min", "0.1", "--eps-max", "1", "--out", str(tmp_path / "out")]
    err = run_err(capsys, argv)
    assert "Traceback" not in err
    assert_clear(LipboundError(err), problem)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("cmd", [["models"], ["bound", "--model", "tiny"],
                                 ["radius", "--model", "tiny"], ["demo"]])
def test_cli_cuda_without_cuda(capsys, cmd):
    err = run_err(capsys, [*cmd, "--device", "cuda"])
    assert_clear(LipboundError(err), "CUDA is not available")


@pytest.mark.parametrize("argv, problem", [
    (["bound", "--model", "tiny", "--weights", "random.pt"], "cannot read"),
    (["bound", "--model", "tiny", "--input", "x_nan.npy"], "NaN"),
    (["models", "--threads", "abc"], "threads"),
])
def test_cli_in_a_subprocess_exits_2_without_traceback(files, argv, problem):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-m", "lipbound", *argv], cwd=files, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lipbound: error:")
    assert proc.stderr.count("\n") == 1  # one paragraph
    assert_clear(LipboundError(proc.stderr), problem)


def test_cli_json_output_is_unchanged_by_the_checks(capsys):
    """The added checks leave good input alone: ``models`` with an explicit thread count."""
    assert main(["models", "--threads", "1", "--json"]) == 0
    assert "tiny" in capsys.readouterr().out
