"""The chain check (``lipbound.graph._verify``): the float64 chain of layer rules must
reproduce the model at a standard-normal input ``x`` and, for chains of moderate size, at
``-x``, ``1e-3 x`` and ``±1e3 x`` (batches of two).

Session 26: (a) at a scaled point where a float32 model's own output overflows, its float64
copy is compared with the chain (before, the point was skipped, and a misread layer behind
ReLUs off at ``x`` went unseen); a float64 model that overflows there is skipped as before.
(b) a float64 model that fails the 1e-8 tolerance through its own rounding (values summed
with cancellation) stays refused: a first-order bound on the float64 rounding of the two
forward passes explains such gaps, but also hides misread layers (measured; see
:func:`lipbound.graph.float64_rounding_ratio`), so it only names the cause in the refusal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lipbound
from lipbound import graph
from lipbound.errors import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class _Times10(nn.Module):
    """Scales by 10; a test registers a wrong rule for it (identity: a misread layer)."""

    def forward(self, x):
        return 10.0 * x


@pytest.fixture
def misread(monkeypatch):
    """``_Times10`` read as the identity (the rule of ``nn.Dropout``)."""
    from lipbound.ops import registry

    monkeypatch.setitem(registry.MODULE_RULES, _Times10, registry.MODULE_RULES[nn.Dropout])


def _check_points(shape: tuple[int, ...]) -> list[tuple[float, torch.Tensor]]:
    """The chain check's inputs (its generator and scales)."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn((2, *shape), generator=gen, dtype=torch.float64)
    return [(c, c * x) for c in (1.0, -1.0, 1e-3, 1e3, -1e3)]


def _chain_unchecked(model: nn.Module, shape: tuple[int, ...]) -> list:
    """The model's chain of ops, traced without the chain check."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph, "_verify", lambda *a, **k: None)
        return graph.trace_model(model, shape)


def _overflow_net(times10: bool) -> nn.Sequential:
    """2-6-1 float32 net. Units 0-3 are two pairs of equal units, relu(±1e36 x_1), whose
    difference (output weights 1, -1) is exactly 0: at ``±1e3 x`` one pair overflows float32
    (inf - inf: the output is NaN), its float64 copy gives 0. Units 4-5, relu(±x_2 - 100),
    are off at ``x``, ``-x`` and ``1e-3 x`` and one of them is on at ``±1e3 x``. With
    ``times10`` a ``_Times10`` follows the hidden layer: read as the identity, it changes
    only units 4-5 (the pairs still cancel exactly), so the misread is seen only where the
    float32 model overflows."""
    first = nn.Linear(2, 6)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1e36, 0.0], [1e36, 0.0], [-1e36, 0.0],
                                         [-1e36, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        first.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -100.0, -100.0]))
    last = nn.Linear(6, 1)
    with torch.no_grad():
        last.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, 1.0]]))
        last.bias.fill_(0.5)
    mid = [_Times10()] if times10 else []
    return nn.Sequential(first, nn.ReLU(), *mid, last).eval()


def test_the_overflow_net_hides_the_misread_from_the_other_points(misread):
    """The premise: with the misread, the float32 model equals the chain (the identity for
    ``_Times10``) at ``x``, ``-x`` and ``1e-3 x``; at ``±1e3 x`` its output is NaN, while its
    float64 copy is finite and differs from the chain by far more than any tolerance."""
    net = _overflow_net(True)
    right = _overflow_net(False)  # (the chain of the misread model: the same layers)
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        for c, x in _check_points((2,)):
            out, chain = net(x.float()).double(), right.double()(x)
            if abs(c) < 1e3:
                assert torch.equal(out, chain), c
            else:
                assert bool(out.isnan().any()), c
                gap = float((net64(x) - chain).abs().max())
                assert torch.isfinite(net64(x)).all() and gap > 1e3, c


def test_a_misread_layer_behind_float32_overflow_is_refused(misread):
    """Accepted before session 26 (the ``±1e3 x`` points were skipped); refused now, naming
    the overflow and the float64 copy's gap."""
    with pytest.raises(UnsupportedModelError, match="overflows") as exc:
        lipbound.Analyzer(_overflow_net(True), (2,))
    msg = str(exc.value)
    assert "float64 copy" in msg and "does not reproduce" in msg


def test_the_overflow_net_read_right_is_accepted():
    """Without the misread the float64 copy matches the chain at ``±1e3 x``: accepted, with
    the bounds of the float64 copy (the same weights) and no rounding note."""
    net = _overflow_net(False)
    an = lipbound.Analyzer(net, (2,))
    assert not an.notes
    an64 = lipbound.Analyzer(copy.deepcopy(net).double(), (2,))
    assert an.global_bound().value == pytest.approx(an64.global_bound().value, rel=1e-12)
    assert an.global_bound().value >= 1e36  # (the pairs' slopes)


def test_a_float64_model_that_overflows_at_the_scaled_points_is_accepted():
    """A float64 model (weights of 1e306: finite at ``x``, overflowing float64 at ``±1e3 x``)
    is its own float64 copy: there is no finite reference there, and the point is skipped
    as before session 26."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e306, 0.0], [-1e306, 0.0]], dtype=torch.float64))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    with torch.no_grad():
        outs = [net(x) for _, x in _check_points((2,))]
    assert all(bool(torch.isfinite(o).all()) for o in outs[:3])
    assert not any(bool(torch.isfinite(o).all()) for o in outs[3:])
    an = lipbound.Analyzer(net, (2,))
    assert an.global_bound().value >= 1e306


class _NoCopy(nn.Module):
    """A float32 model whose float64 copy cannot be made (deepcopy refused)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def __deepcopy__(self, memo):
        raise TypeError("not copyable")


def test_no_float64_copy_at_an_overflowing_point_is_skipped():
    """Where no float64 copy can be made, an overflowing scaled point is skipped as before
    (the overflow net read right is accepted)."""
    an = lipbound.Analyzer(_NoCopy(_overflow_net(False)).eval(), (2,))
    assert an.global_bound().value >= 1e36


class _Cancel(nn.Module):
    """A float64 layer whose outputs are computed as ``(y - 1e17) / 3 + 1e17 / 3``: the chain
    reads ``/ 3`` and ``- 1e17`` as one scale-and-shift (``y / 3 - 1e17 / 3``), rounded
    otherwise than the model, and float64 rounding of 1e17-sized values (ulp 16) is far
    beyond 1e-8 of outputs near 1e2 at ``1e3 x``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2).double()

    def forward(self, x):
        return (self.fc(x) - 1e17) / 3.0 + 1e17 / 3.0


def test_float64_cancellation_is_refused_naming_its_rounding():
    """Refused before and after session 26; the refusal now says that the gap is within a
    bound on the float64 rounding and why that is not accepted, naming the fix."""
    with pytest.raises(UnsupportedModelError) as exc:
        lipbound.Analyzer(_Cancel().eval(), (3,))
    msg = str(exc.value)
    assert "within a first-order bound on the float64 rounding" in msg
    assert "cannot tell that rounding from a misread layer" in msg
    assert "less cancellation" in msg


def test_the_rounding_bound_would_hide_a_misread_layer(misread):
    """Why (b) is not accepted: the overflow net in float64, with its layer misread by a
    factor of 10, passes the 1e-8 check at ``x``, ``-x`` and ``1e-3 x`` (the misread units are
    off) and at ``±1e3 x`` its gap (about 1e4) is within the float64 rounding bound (the
    pairs of 1e39 cancel: the bound is about 1e24): a rule accepting gaps within that bound
    would accept this model. It is refused."""
    model = _overflow_net(True).double()
    ops = _chain_unchecked(model, (2,))
    within = 0
    for c, x in _check_points((2,)):
        with torch.no_grad():
            ref = model(x.clone())
            scale = float(ref.abs().max()) + 1.0
            gap = float((ref - graph.chain_forward(ops, x)).abs().max())
        if abs(c) < 1e3:
            assert gap <= 1e-8 * scale
        else:
            assert gap > 1e3
            _, ratio = graph.float64_rounding_ratio(model, x, ref, ops, 1e-8 * scale)
            within += ratio <= 1.0
    assert within == 2
    with pytest.raises(UnsupportedModelError, match="cannot tell"):
        lipbound.Analyzer(model, (2,))


def test_a_misread_float64_layer_without_cancellation_gets_the_plain_refusal(misread):
    """No cancellation: the gap is far beyond the rounding bound, and the refusal is the
    usual one (no rounding detail)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), _Times10(), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedModelError, match="does not reproduce") as exc:
        lipbound.Analyzer(net.eval(), (3,))
    assert "first-order bound" not in str(exc.value)


def test_float64_rounding_ratio_on_a_model_read_right():
    """The diagnostic itself: 0 where no entry is beyond the limit, a ratio below 1 for the
    cancelling model's own gap, and ``inf`` when the gap is not finite."""
    model = _Cancel().eval()
    ops = _chain_unchecked(model, (3,))
    (_, x), = [p for p in _check_points((3,)) if p[0] == 1e3]
    with torch.no_grad():
        ref = model(x.clone())
    gap, ratio = graph.float64_rounding_ratio(model, x, ref, ops, 1e-8)
    assert gap > 1e-8 and 0.0 < ratio <= 1.0
    assert graph.float64_rounding_ratio(model, x, ref, ops, 2 * gap)[1] == 0.0
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert graph.float64_rounding_ratio(model, x, bad, ops, 1e-8)[1] == float("inf")


class _Gain(nn.Module):
    """Scales by ``1 + 5e-4``; a test reads it as the identity (a misread below float32's
    1e-3 tolerance)."""

    def forward(self, x):
        return 1.0005 * x


def test_a_misread_below_the_float32_tolerance_is_refused(monkeypatch):
    """Session 26 (item 3): a float32 model whose layer is misread by 5e-4 relative passes
    the float32 tolerance (1e-3 of its outputs) at every check point, and its certified
    global bound (a single linear layer: its exact spectral norm) was below the model's
    Lipschitz constant. Now its float64 copy is compared with the chain at 1e-8 and, where
    they differ, the float32 model's gap must be within its float32 rounding: refused."""
    from lipbound.ops import registry

    monkeypatch.setitem(registry.MODULE_RULES, _Gain, registry.MODULE_RULES[nn.Dropout])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), _Gain()).eval()
    true = 1.0005 * float(torch.linalg.matrix_norm(net[0].weight.detach().double(), 2))
    with torch.no_grad():  # (the premise: the float32 check alone passes)
        for _, x in _check_points((3,)):
            out = net(x.float()).double()
            assert float((out - out / 1.0005).abs().max()) <= 1e-3 * (out.abs().max() + 1)
    with pytest.raises(UnsupportedModelError, match="float64 copy") as exc:
        an = lipbound.Analyzer(net, (3,))
        # (before session 26: accepted, the bound below the true constant)
        assert an.global_bound().value < true
    msg = str(exc.value)
    assert "within this check's float32 tolerance" in msg
    assert "times a bound on its float32 rounding" in msg


def test_float32_models_read_right_match_their_float64_copy():
    """The float64 copy's comparison refuses none of the fuzz's float32 models (session 26
    measured 1967 float32 models of seeds 0-8000, as generated and with weights scaled by
    1e2-1e6: the copy matched the chain to 1e-8 at every check point of every one); a few
    here, mixed and adversarial."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fuzz_models import make_case

    n = 0
    for seed in range(200):
        case = make_case(seed, adversarial=seed % 2 == 1)
        if next(case.model.parameters()).dtype != torch.float32:
            continue
        lipbound.Analyzer(case.model, case.input_shape)
        n += 1
    assert n >= 30


def test_weights_computed_in_forward_pass_at_float32_resolution():
    """A float32 model whose weights its forward computes (``spectral_norm``): the chain reads
    the float32 values, the float64 copy recomputes them in float64, so the copy differs from
    the chain by more than 1e-8; the float32 model's own gap is within its float32 rounding,
    and it is accepted (with the bounds of the weights the chain read). (Refused by this
    session's first version, which asked the copy alone to match.)"""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    net = nn.Sequential(spectral_norm(nn.Linear(16, 32)), nn.ReLU(), nn.Linear(32, 3)).eval()
    ops = _chain_unchecked(net, (16,))
    net64 = copy.deepcopy(net).double()
    rel = []
    with torch.no_grad():
        for _, x in _check_points((16,)):
            out = net64(x)
            rel.append(float((out - graph.chain_forward(ops, x)).abs().max())
                       / (float(out.abs().max()) + 1.0))
    assert max(rel) > 1e-8  # (the premise: the copy is not the chain's function)
    an = lipbound.Analyzer(net, (16,))
    assert not an.notes and an.global_bound().value > 0
