"""Bad input to the core gives a clear lipbound error naming the problem and the fix (never a
bare assert, never a bound computed from garbage)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lipbound
from core_helpers import DT, random_batchnorm
from lipbound import Analyzer, InputError, LipboundError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _model() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), random_batchnorm(2, g), nn.ReLU(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(DT).eval()


SHAPE = (1, 6, 6)


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(_model(), SHAPE)


@pytest.fixture
def x0() -> torch.Tensor:
    return torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=DT)


@pytest.mark.parametrize("eps", [0.0, -1.0, -1e-12, math.nan, math.inf, -math.inf, "abc", None,
                                 [0.1]])
def test_bad_eps(analyzer, x0, eps):
    with pytest.raises(InputError, match="eps") as info:
        analyzer.local_bound(x0, eps)
    assert isinstance(info.value, LipboundError) and isinstance(info.value, ValueError)
    with pytest.raises(InputError, match="eps"):
        lipbound.local_bound(_model(), x0, eps)


def test_eps_messages_say_what_is_wrong(analyzer, x0):
    with pytest.raises(InputError, match="> 0"):
        analyzer.local_bound(x0, -0.5)
    with pytest.raises(InputError, match="finite"):
        analyzer.local_bound(x0, math.nan)
    with pytest.raises(InputError, match="finite"):
        analyzer.local_bound(x0, math.inf)


@pytest.mark.parametrize("shape", [(1, 1, 6, 5), (1, 2, 6, 6), (1, 36), (36,), (6, 6),
                                   (1, 1, 1, 6, 6), ()])
def test_input_of_the_wrong_shape(analyzer, shape):
    x = torch.zeros(shape, dtype=DT)
    with pytest.raises(InputError, match="shape"):
        analyzer.local_bound(x, 0.1)


def test_batch_of_inputs_is_refused(analyzer):
    x = torch.zeros(2, *SHAPE, dtype=DT)
    with pytest.raises(InputError, match="batch"):
        analyzer.local_bound(x, 0.1)


def test_input_without_batch_dimension_is_accepted(analyzer, x0):
    assert analyzer.local_bound(x0[0], 0.1).value == analyzer.local_bound(x0, 0.1).value


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input(analyzer, x0, bad):
    x = x0.clone()
    x[0, 0, 2, 3] = bad
    with pytest.raises(InputError, match="NaN/inf"):
        analyzer.local_bound(x, 0.1)
    with pytest.raises(InputError, match="NaN/inf"):
        lipbound.local_bound(_model(), x, 0.1)


def test_x0_not_a_tensor():
    with pytest.raises(InputError, match="Tensor"):
        lipbound.local_bound(_model(), [[0.0] * 6] * 6, 0.1)


def test_model_in_training_mode():
    model = _model().train()
    for call in (lambda: Analyzer(model, SHAPE),
                 lambda: lipbound.global_bound(model, SHAPE),
                 lambda: lipbound.local_bound(model, torch.zeros(1, *SHAPE), 0.1)):
        with pytest.raises(InputError) as info:
            call()
        msg = str(info.value)
        assert "training mode" in msg and "model.eval()" in msg
    # the model is left as it was: lipbound never switches modes itself
    assert model.training


@pytest.mark.parametrize("index,kind", [(1, "BatchNorm2d"), (3, "Dropout")])
def test_one_submodule_in_training_mode(index, kind):
    model = _model()
    model[index].train()
    with pytest.raises(InputError) as info:
        Analyzer(model, SHAPE)
    msg = str(info.value)
    assert "model.eval()" in msg
    assert str(index) in msg  # names the module that is in training mode
    assert model[index].training


def test_pure_relu_network_in_training_mode_is_also_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)).train()
    with pytest.raises(InputError, match=r"model\.eval\(\)"):
        Analyzer(model, (3,))


@pytest.mark.parametrize("c", [torch.zeros(2, 4), torch.zeros(4), torch.zeros(1, 2, 3),
                               torch.zeros(0), torch.tensor([[1.0, math.nan, 0.0]]),
                               torch.tensor([[1.0, math.inf, 0.0]])],
                         ids=["cols", "vector", "3d", "empty", "nan", "inf"])
def test_bad_output_map(analyzer, x0, c):
    with pytest.raises(InputError, match="output_map"):
        analyzer.local_bound(x0, 0.1, output_map=c)
    with pytest.raises(InputError, match="output_map"):
        analyzer.global_bound(output_map=c)


def test_output_map_shape_is_named_in_the_message(analyzer, x0):
    with pytest.raises(InputError, match=r"\(m, 3\)"):
        analyzer.local_bound(x0, 0.1, output_map=torch.zeros(2, 4))


@pytest.mark.parametrize("kwargs,word", [
    (dict(spectral="svd"), "spectral"),
    (dict(failure_prob=0.0), "failure_prob"),
    (dict(failure_prob=1.0), "failure_prob"),
    (dict(failure_prob=-0.1), "failure_prob"),
    (dict(lanczos_steps=3), "lanczos_steps"),
    (dict(lanczos_steps=math.nan), "lanczos_steps"),
    (dict(lanczos_steps=8.5), "lanczos_steps"),
    (dict(failure_prob=math.nan), "failure_prob"),
    (dict(failure_prob="x"), "failure_prob"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
])
def test_bad_analyzer_options(kwargs, word):
    with pytest.raises(InputError, match=word):
        Analyzer(_model(), SHAPE, **kwargs)


def test_not_a_module_and_no_shape():
    with pytest.raises(InputError, match="Module"):
        Analyzer(lambda x: x, SHAPE)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="input_shape"):
        Analyzer(_model())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda():
    with pytest.raises(InputError, match="CUDA"):
        Analyzer(_model(), SHAPE, device="cuda")


def test_cuda_error_of_the_library_names_its_argument(monkeypatch):
    """The library's message named the command line's option (``--device cpu``) to a Python
    caller; it now gives the argument's values, and the option for the command line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"device='cpu' or 'auto' \(command line: --device"):
        Analyzer(_model(), SHAPE, device="cuda")


def test_errors_survive_python_O():
    """Input checks are not asserts: they still fire under ``python -O``."""
    code = textwrap.dedent("""
        import math, torch
        from torch import nn
        from lipbound import Analyzer, InputError
        m = nn.Sequential(nn.Linear(3, 2))
        for call in (lambda: Analyzer(m.train(), (3,)),
                     lambda: Analyzer(m.eval(), (3,)).local_bound(torch.zeros(1, 3), -1.0),
                     lambda: Analyzer(m.eval(), (3,)).local_bound(torch.zeros(1, 4), 1.0),
                     lambda: Analyzer(m.eval(), (3,)).local_bound(
                         torch.full((1, 3), math.nan), 1.0)):
            try:
                call()
            except InputError:
                continue
            raise SystemExit("no InputError under -O")
        print("ok")
    """)
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(__file__), os.pardir, "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_tiny_weights_are_refused_with_the_layer_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        model[2].weight.mul_(1e-170)  # squares underflow: row norms would read 0
    with pytest.raises(InputError, match=r"1e-150.*rescale") as info:
        Analyzer(model, (3,))
    assert "2" in str(info.value)


class _ClampedReLU(nn.ReLU):
    """A ReLU subclass that computes something else (a ReLU6): not a ReLU to the analysis."""

    def forward(self, x):
        return torch.clamp(x, 0.0, 6.0)


class _PlainLinear(nn.Linear):
    """A subclass that only adds a name: still a Linear."""


class _TanhReLU(nn.ReLU):
    """A ReLU subclass computing a function lipbound has no rule for."""

    def forward(self, x):
        return torch.tanh(x)


def test_subclass_with_its_own_forward_is_not_taken_for_its_parent():
    m = nn.Sequential(_PlainLinear(3, 4), _TanhReLU(), nn.Linear(4, 2)).to(DT).eval()
    with pytest.raises(lipbound.UnsupportedModelError, match="tanh"):
        Analyzer(m, (3,))
    # (since session 23 a clamp has a rule: the subclass's own clamp is analysed, not the
    # parent's ReLU; a ReLU would not reproduce the model above 6, where the check of the
    # chain against the model, and this comparison, would see it)
    m = nn.Sequential(_PlainLinear(3, 4), _ClampedReLU(), nn.Linear(4, 2)).to(DT).eval()
    an = Analyzer(m, (3,))
    assert any(op.name.endswith("relu_max") for op in an.ops)
    x = torch.randn(16, 3, dtype=DT) * 100
    torch.testing.assert_close(an.forward(x), m(x), rtol=1e-12, atol=1e-10)
    assert not torch.allclose(m[2](torch.relu(m[0](x))), m(x))
    plain = nn.Sequential(_PlainLinear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT).eval()
    assert Analyzer(plain, (3,)).global_bound().value > 0
