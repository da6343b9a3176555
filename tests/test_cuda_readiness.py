"""CUDA-readiness audit (session 23), run on the CPU.

The analysed paths were checked with a device-taint TorchFunctionMode (tensors made on the
default device without ``device=`` tracked against the model's; mixed operations,
``.numpy()`` of model tensors and CPU generators drawing on the model's device flagged):
no site on the library's paths mixes devices. What CPU tests can hold on to:

* every tensor an analysed op holds moves with ``Op.to`` (checked by moving to ``meta``);
* the analysed paths make no factory tensor without ``device=`` that meets a model tensor,
  for one small network with batch norm, pooling and clamps;
* :func:`lipbound.lower.sample_ball` refuses a generator of another device than ``x0``
  (torch's RuntimeError on CUDA) or a non-generator with an InputError naming the fix.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from lipbound import Normalize
from lipbound.errors import InputError
from lipbound.graph import trace_model
from lipbound.lower import sample_ball


class _OtherDeviceGenerator(torch.Generator):
    """A CPU generator that reports the CUDA device: what ``torch.Generator("cuda")`` is on
    a machine with a GPU, for the checks made before any draw."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda")


def test_sample_ball_refuses_a_generator_on_another_device():
    # (was: on CUDA, torch's RuntimeError "Expected a 'cuda' device type for generator";
    # here the draw went ahead)
    with pytest.raises(InputError, match=r"generator is on cuda.*x0 is on cpu.*device="):
        sample_ball(torch.zeros(1, 3), 0.5, 4, generator=_OtherDeviceGenerator())


@pytest.mark.parametrize("bad", [0, "seed", torch.zeros(1)])
def test_sample_ball_refuses_a_non_generator(bad):
    # (was: torch's TypeError from randn, naming none of sample_ball's arguments)
    with pytest.raises(InputError, match=r"generator must be a torch.Generator"):
        sample_ball(torch.zeros(1, 3), 0.5, 4, generator=bad)


def test_sample_ball_same_device_generator_is_reproducible():
    a = sample_ball(torch.zeros(1, 3), 0.5, 4, generator=torch.Generator().manual_seed(3))
    b = sample_ball(torch.zeros(1, 3), 0.5, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and bool((a.double().norm(dim=1) <= 0.5).all())


# ------------------------------------------------------------------ every op tensor moves


class _AllLayers(nn.Module):
    """Every supported layer kind once (modules and functional forms)."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize((0.1, 0.2), (0.3, 0.4))
        self.c1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 3, 3, padding=2)
        self.c3 = nn.Conv2d(3, 4, 3, dilation=2, padding=2)
        self.mp = nn.MaxPool2d(3, stride=2, padding=1)
        self.ap = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.aap = nn.AdaptiveAvgPool2d((3, 3))
        self.ht, self.r6, self.dp = nn.Hardtanh(-0.5, 1.5), nn.ReLU6(), nn.Dropout(0.2)
        self.l1, self.bn1, self.l2 = nn.Linear(36, 20), nn.BatchNorm1d(20), nn.Linear(20, 6)
        self.fl, self.uf = nn.Flatten(), nn.Unflatten(1, (4, 9))

    def forward(self, x):
        x = F.relu(self.bn(self.c1(self.norm(x))))
        x = torch.clamp(self.c3(self.ht(self.c2(x))), min=-1.0)
        x = self.aap(self.ap(F.avg_pool2d(self.mp(x), 2, 1)))
        x = self.uf(self.fl(x)).reshape(x.shape[0], -1)
        x = self.r6(self.dp(x * 2.0 + 1.0 - 0.5)) / 3.0
        return self.l2(F.relu6(torch.clamp_max(self.bn1(self.l1(x)), 2.0)))


def _all_layers() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = _AllLayers().eval()
    for b in (m.bn, m.bn1):
        b.running_mean.uniform_(-0.1, 0.1)
        b.running_var.uniform_(0.5, 1.5)
    return m, torch.rand(1, 2, 8, 8)


def _tensors_in(obj, path: str, seen: set, out: list) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors_in(v, f"{path}[{i}]", seen, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors_in(v, f"{path}[{k!r}]", seen, out)
    elif type(obj).__module__.startswith("lipbound") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _tensors_in(v, f"{path}.{k}", seen, out)


def test_op_to_moves_every_tensor_an_op_holds():
    # the analyzer builds the ops on the CPU and moves them with Op.to: a tensor kept in a
    # container or a helper object would stay on the CPU beside CUDA inputs
    ops = trace_model(*_all_layers()[:1], (2, 8, 8))
    kinds = {type(o).__name__ for o in ops}
    assert {"ConvOp", "DiagOp", "LinearOp", "MaxPoolOp", "ReLUOp", "ReshapeOp"} <= kinds
    found: list = []
    for op in ops:
        op.to(torch.device("meta"))
        _tensors_in(op, op.name, set(), found)
    assert found, "no tensor found: the walk is broken"
    left = [p for p, t in found if not t.is_meta]
    assert not left, left


# --------------------------------------------- no default-device tensor meets a model one


class _DefaultDeviceTaint(TorchFunctionMode):
    """Tracks tensors made without ``device=`` (on CUDA: the CPU) and everything computed
    from them alone; an operation combining such a tensor (not 0-d, not an index) with one
    of the model's device is recorded with its lipbound call site. ``x.to(<torch.device>)``
    counts as a move to the model's device, ``.cpu()`` / ``.to("cpu")`` / ``from_numpy`` as
    CPU tensors."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor,
                 torch.as_tensor, torch.arange, torch.eye, torch.linspace, torch.rand,
                 torch.randn, torch.randint, torch.randperm, torch.empty_strided}

    def __init__(self):
        super().__init__()
        self.cpu = WeakIdKeyDictionary()
        self.mixed: list[str] = []

    def __enter__(self):
        self._from_numpy = torch.from_numpy

        def from_numpy(a):
            t = self._from_numpy(a)
            self.cpu[t] = True
            return t
        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    @staticmethod
    def _flat(obj, out: list) -> list:
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                _DefaultDeviceTaint._flat(o, out)
        elif isinstance(obj, dict):
            for o in obj.values():
                _DefaultDeviceTaint._flat(o, out)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        ins = self._flat(args, []) + self._flat(kwargs, [])
        out = func(*args, **kwargs)
        dev = kwargs.get("device")
        if func in self.FACTORIES:
            if ins and func in (torch.tensor, torch.as_tensor):
                on_cpu = ins[0] in self.cpu if dev is None else str(dev).startswith("cpu")
            else:
                on_cpu = dev is None or (isinstance(dev, str) and dev.startswith("cpu"))
        elif name.endswith("_like") or name.startswith("new_"):
            on_cpu = bool(ins) and ins[0] in self.cpu and dev is None
        elif name in ("cpu", "numpy"):
            on_cpu = True
        elif name == "to":
            target = dev
            for a in args[1:]:
                if isinstance(a, (str, torch.device, torch.Tensor)):
                    target = a
            if target is None:
                on_cpu = ins[0] in self.cpu
            elif isinstance(target, torch.Tensor):
                on_cpu = target in self.cpu
            else:
                on_cpu = isinstance(target, str) and target.startswith("cpu")
        else:
            cpu_in = [t for t in ins if t in self.cpu]
            model_in = [t for t in ins if t not in self.cpu]
            big = [t for t in cpu_in if t.dim() > 0 and not (
                name in ("__getitem__", "__setitem__", "index_put_", "index_select")
                and t.dtype in (torch.long, torch.int32, torch.bool))]
            if big and model_in:
                site = [f for f in traceback.extract_stack()[:-1] if "/lipbound/" in f.filename]
                if site:
                    self.mixed.append(f"{site[-1].filename.split('/src/')[-1]}:"
                                      f"{site[-1].lineno} {name}: {site[-1].line}")
            on_cpu = bool(cpu_in) and not model_in
        for t in self._flat(out, []):
            if on_cpu:
                self.cpu[t] = True
            else:
                self.cpu.pop(t, None)
        return out


def test_the_taint_mode_sees_a_mix():
    # the checker itself: a default-device tensor added to a model tensor is recorded when
    # the call comes from lipbound (here: Analyzer.forward of a CPU x0 that it moves is fine)
    import lipbound.ops.base as base

    w = torch.ones(3)
    mode = _DefaultDeviceTaint()
    with mode:
        z = torch.zeros(3)
        w + z  # not from lipbound: not recorded
        base.ReshapeOp("r", (3,), (3,)).forward(torch.zeros(1, 3))
    assert not mode.mixed
    with mode:
        exec(compile("torch.zeros(3) + w", "/x/lipbound/fake.py", "exec"),
             {"torch": torch, "w": w})
    assert mode.mixed and "fake.py" in mode.mixed[0]


def test_analysed_paths_make_no_default_device_tensor_that_meets_the_model():
    # x0 and the output map as a user gives them on the CPU (moved by the library); the
    # model's tensors stand for CUDA ones
    from lipbound import Analyzer
    from lipbound.batch import bound_many
    from lipbound.lower import random_lower_bound
    from lipbound.radius import certified_radius

    m, x0 = _all_layers()
    c = torch.zeros(2, 6)
    c[0, 0], c[0, 1], c[1, 3] = 1.0, -1.0, 1.0
    mode = _DefaultDeviceTaint()
    mode.cpu[x0] = True
    mode.cpu[c] = True
    with mode:
        for spectral in ("auto", "exact", "lanczos"):
            an = Analyzer(m, (2, 8, 8), spectral=spectral)
            an.global_bound()
            an.global_bound(output_map=c)
            an.local_bound(x0, 0.1)
            an.local_bound(x0, 0.05, tight=True)
            an.local_bound_rows(x0, 0.05, c)
            an.local_bound_rows(x0, 0.05, c, tight=True)
        certified_radius(m, x0, method="margin", tight=True)
        certified_radius(m, x0, method="local")
        bound_many(m, torch.cat([x0, x0 + 0.01]), 0.05, tight=True)
        random_lower_bound(m, x0, 0.1, n_samples=16)
    assert not mode.mixed, "\n".join(dict.fromkeys(mode.mixed))
