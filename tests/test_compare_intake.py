"""Session 25: ``compare`` (and ``lipbound compare``) on a model or input that lipbound's own
intake refuses and that no method can run raises that one error, with the class and message
of :func:`lipbound.local_bound`, instead of a table whose rows all say "not run: ..."; methods
that cannot run for reasons of their own stay rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from lipbound.baselines import compare
from lipbound.cli import main
from lipbound.errors import InputError, LipboundError, UnsupportedModelError, WeightsError

pytestmark = pytest.mark.usefixtures("torch_one_thread")

X0 = torch.tensor([[0.5, -1.0, 0.25, 2.0]])


def _mlp(n_in: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 3), nn.ReLU(), nn.Linear(3, 2)).eval()


def _wrong_shape() -> nn.Module:
    return _mlp(5)  # (x0 has 4 features)


def _overflowing() -> nn.Module:
    net = _mlp()
    with torch.no_grad():  # finite weights whose products overflow float32
        net[0].weight.mul_(1e30)
        net[2].weight.mul_(1e30)
    return net


def _nan_weights() -> nn.Module:
    net = _mlp()
    with torch.no_grad():
        net[2].bias[0] = float("nan")
    return net


def _tanh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()


def _local_bound_error(model: nn.Module) -> LipboundError:
    with pytest.raises(LipboundError) as exc:
        lipbound.local_bound(model, X0, 0.1)
    return exc.value


@pytest.mark.parametrize("make, methods, cls", [
    (_overflowing, None, InputError),
    (_nan_weights, ["lower", "local", "local-tight", "global"], WeightsError),
    (_tanh, ["local", "global", "exact-l2", "autolip"], UnsupportedModelError),
])
def test_a_model_no_method_can_run_raises_the_intake_error(make, methods, cls):
    want = _local_bound_error(make())
    assert type(want) is cls
    with pytest.raises(cls) as exc:
        compare(make(), X0, 0.1, methods, exact_time_limit=5)
    assert type(exc.value) is type(want) and str(exc.value) == str(want)


def test_an_input_the_model_cannot_take_is_refused_up_front():
    """An ``x0`` of 4 features for a model of 5: refused before any method runs (the bad-input
    matrix's check, ``baselines.fc.check_runs_on``), naming x0's shape and the fix, as
    ``local_bound`` refuses it (with its own wording)."""
    assert type(_local_bound_error(_wrong_shape())) is InputError
    with pytest.raises(InputError, match=r"x0 of shape \(1, 4\).*pass x0 of the shape"):
        compare(_wrong_shape(), X0, 0.1, exact_time_limit=5)


def test_rows_stay_rows_when_some_method_runs():
    """The tanh net: lipbound and the rivals refuse it, the empirical lower bound runs."""
    rows = {r.method: r for r in compare(_tanh(), X0, 0.1, ["lower", "local", "autolip"])}
    assert rows["lower"].guarantee == lipbound.Guarantee.LOWER
    assert np.isnan(rows["local"].value) and "Tanh" in rows["local"].note
    assert np.isnan(rows["autolip"].value) and rows["autolip"].note.startswith("not supported")


def test_methods_that_cannot_run_on_their_own_stay_rows():
    """A conv net with max pooling that lipbound accepts: the exact method cannot take it
    (not convertible to a fully connected chain), and is the only one asked for: its row is
    returned, not an error."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8, 3)).eval()
    x0 = torch.randn(1, 1, 6, 6)
    (row,) = compare(net, x0, 0.1, ["exact-l2"], exact_time_limit=5)
    assert row.guarantee is None and np.isnan(row.value) and row.note.startswith("not ")


USER_MODEL = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        net[0].weight.mul_(1e30)
        net[2].weight.mul_(1e30)
    return net


def make_tanh():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
"""


def test_cli_compare_on_a_model_no_method_can_run(tmp_path, capsys):
    src = tmp_path / "net.py"
    src.write_text(USER_MODEL)
    xfile = tmp_path / "x.npy"
    np.save(xfile, X0[0].numpy())
    base = ["compare", "--input", str(xfile), "--input-shape", "4", "--eps", "0.1"]
    assert main(base + ["--model", f"{src}:make"]) == 2
    out, err = capsys.readouterr()
    want = _local_bound_error(_overflowing())
    assert err.startswith("lipbound: error:") and str(want) in err
    assert "Traceback" not in err and "not run" not in out + err
    # the tanh net: the lower bound runs, so the table is printed
    assert main(base + ["--model", f"{src}:make_tanh", "--methods", "lower,local,autolip"]) == 0
    out, err = capsys.readouterr()
    assert "Tanh" in out and "lower" in out
