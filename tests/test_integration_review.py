"""How users hand models to lipbound: wrappers (DataParallel, torch.compile, TorchScript,
torch.export) and models made under torch.inference_mode(). A wrapper that computes its
module's function is analysed as that module (the same bound); one that cannot be read is
refused naming the fix; the lower bounds and attacks, which only run the model, accept what
they can run. Small float64 nets; bounds checked against the unwrapped model's and against
brute-force lower bounds."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lipbound
from lipbound import Analyzer
from lipbound.attacks import PGD
from lipbound.baselines.fc import fc_layers
from lipbound.errors import InputError, UnsupportedModelError
from lipbound.lower import best_lower_bound, gradient_lower_bound

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit

X0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
EPS = 0.5


def _net(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                      nn.Linear(8, 2)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


def _lower(model: nn.Module):
    return best_lower_bound(model, X0, EPS, n_random=64, gradient_steps=10, pgd_restarts=2,
                            pgd_steps=5, pgd_refine=1, pgd_refine_steps=5)


def test_dataparallel_is_analysed_as_its_module():
    # (was: "the model is in training mode" for the wrapper's own flag, and after
    # wrapper.eval() an untraceable forward)
    m = _net()
    ref_g, ref_l = lipbound.global_bound(m, (3,)).value, lipbound.local_bound(m, X0, EPS).value
    dp = nn.DataParallel(m)  # (its own training flag is True: its forward does not read it)
    assert lipbound.global_bound(dp, (3,)).value == ref_g
    assert lipbound.local_bound(dp, X0, EPS).value == ref_l
    assert lipbound.local_bound(nn.DataParallel(nn.DataParallel(m)).eval(), X0, EPS).value \
        == ref_l
    assert ref_l >= _lower(m).value
    assert _lower(dp).value == _lower(m).value
    from lipbound.lower import ratio_at

    assert ratio_at(dp, X0, 2 * X0) == ratio_at(m, X0, 2 * X0)
    # the analyzer watches the module's tensors: a change through the wrapper is refused
    an = Analyzer(dp, (3,))
    with torch.no_grad():
        dp.module[0].weight.mul_(10)
    with pytest.raises(InputError, match="changed"):
        an.local_bound(X0, EPS)
    # the rival methods' intake too
    assert len(fc_layers(nn.DataParallel(_net()))) == 3


def test_dataparallel_subclass_or_hooked_wrapper_is_not_unwrapped():
    m = _net()

    class Doubled(nn.DataParallel):
        def forward(self, *inputs, **kwargs):
            return 2 * super().forward(*inputs, **kwargs)

    lip = lipbound.global_bound(m, (3,)).value
    try:  # its forward is its own: refused, or bounded as what it computes (2 f)
        value = lipbound.global_bound(Doubled(m).eval(), (3,)).value
    except (InputError, UnsupportedModelError):
        pass
    else:
        assert value >= 2 * lip * (1 - 1e-12)
    dp = nn.DataParallel(m).eval()
    dp.register_forward_hook(lambda mod, i, o: 10 * o)
    with pytest.raises(UnsupportedModelError, match="hook"):
        lipbound.global_bound(dp, (3,))


def test_torch_compile_is_analysed_as_its_module():
    # (was: "forward replaced on the instance" from the bounds, and a RuntimeError of
    # torch.compile's backward from the lower bounds)
    m = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = torch.compile(m)
    assert lipbound.local_bound(c, X0, EPS).value == lipbound.local_bound(m, X0, EPS).value
    assert lipbound.global_bound(c, (3,)).value == lipbound.global_bound(m, (3,)).value
    res = gradient_lower_bound(c, X0, EPS, n_steps=5)
    assert res.value == gradient_lower_bound(m, X0, EPS, n_steps=5).value


def test_torchscript_is_refused_by_the_bounds_and_run_by_the_lower_bounds():
    # (was: "forward replaced on the instance ... wrap the model in a module" for a scripted
    # model, an fx assertion for a traced one, and a RuntimeError of register_forward_hook
    # from the lower bounds of a scripted model)
    m = _net()
    scripted, traced = torch.jit.script(m), torch.jit.trace(m, X0)
    for sm in (scripted, traced):
        with pytest.raises(InputError, match="TorchScript.*original nn.Module"):
            lipbound.local_bound(sm, X0, EPS)
        with pytest.raises(InputError, match="TorchScript"):
            Analyzer(sm, (3,))
        with pytest.raises(InputError, match="TorchScript"):
            fc_layers(sm)
    ref = _lower(m)
    for sm in (scripted, traced):
        r = _lower(sm)
        # the same witness; the value may differ in the last digits: a TorchScript module
        # has no forward hooks, so its rounding allowance lacks the running-error term
        # (lipbound.lower._common.running_error) and is the smaller, older estimate
        assert torch.equal(r.witness, ref.witness)
        assert ref.value <= r.value <= ref.value * (1 + 1e-12)


def test_torch_export_is_refused_naming_the_fix():
    # (was: "training mode; call model.eval()" for ep.module(), whose eval() raises
    # NotImplementedError, and "must be a torch.nn.Module" for the ExportedProgram)
    m = _net()
    ep = torch.export.export(m, (X0,))
    for obj in (ep, ep.module()):
        with pytest.raises(InputError, match="torch.export.*original nn.Module"):
            lipbound.global_bound(obj, (3,))
    with pytest.raises(InputError, match="torch.export"):
        _lower(ep.module())


def test_inference_mode_model_is_refused_naming_the_fix():
    # (was: a RuntimeError of abs() from the finite-weights check, and "Inference tensors
    # cannot be saved for backward" from the lower bounds)
    with torch.inference_mode():
        mi = _net()
    assert mi[0].weight.is_inference()
    for call in (lambda: lipbound.global_bound(mi, (3,)),
                 lambda: lipbound.local_bound(mi, X0, EPS),
                 lambda: _lower(mi),
                 lambda: PGD()(mi, X0.float().double())):
        with pytest.raises(InputError, match="inference_mode.*copy.deepcopy"):
            call()
    # the fix the message names works, with the same bound as the ordinary model
    assert lipbound.local_bound(copy.deepcopy(mi), X0, EPS).value \
        == lipbound.local_bound(_net(), X0, EPS).value
    # the rival methods do not watch the model: they run on it
    assert len(fc_layers(mi)) == 3


def _bn_net() -> nn.Sequential:
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
                      nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        m[5].running_var.uniform_(0.5, 2.0, generator=g)
    return m


def test_model_put_in_training_mode_after_the_analyzer_is_refused_and_left_unchanged():
    # (was: the radius ran the model in training mode, a ValueError of batch norm on a batch
    # of 1 after it had already counted a training batch in num_batches_tracked)
    from lipbound.radius import certified_radius

    m = _bn_net()
    an = Analyzer(m, (3,))
    r0 = certified_radius(an, X0)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    for call in (lambda: certified_radius(an, X0), lambda: an.local_bound(X0, EPS),
                 lambda: an.global_bound()):
        with pytest.raises(InputError, match=r"training mode \(model.train\(\)\).*model.eval"):
            call()
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    m.eval()  # back to the mode it was analysed in: the analyzer goes on
    assert certified_radius(an, X0).radius == r0.radius
    m[1].train()  # (a module's own forward may read its flag: any change counts)
    with pytest.raises(InputError, match="training mode"):
        an.local_bound(X0, EPS)


def test_radius_accepts_the_analyzer_of_a_wrapped_model():
    from lipbound.radius import certified_radius

    m = _bn_net()
    dp = nn.DataParallel(m)
    an = Analyzer(dp, (3,))
    assert certified_radius(dp, X0, analyzer=an).radius == certified_radius(m, X0).radius
    with pytest.raises(InputError, match="different model"):
        certified_radius(_bn_net(), X0, analyzer=an)


class _WithOptions(nn.Module):
    """A forward with optional arguments, as research code writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _net()

    def forward(self, x, mask=None, *, return_features: bool = False):
        if mask is not None:
            x = x * mask
        h = self.body[:4](x) if return_features else None
        return (self.body(x), h) if return_features else self.body(x)


class _TwoInputs(_WithOptions):
    def forward(self, x, mask):
        return self.body(x * mask)


class _Kwargs(_WithOptions):
    def forward(self, x, **kwargs):
        return self.body(x)


def test_forward_with_optional_arguments_is_analysed_as_model_x():
    # (was: "2 inputs (forward takes x, mask ...)" and an fx control-flow error for
    # return_features: the model lipbound runs everywhere else is model(x), the defaults)
    m = _WithOptions().double().eval()
    ref = _net()
    assert lipbound.local_bound(m, X0, EPS).value == lipbound.local_bound(ref, X0, EPS).value
    assert lipbound.global_bound(m, (3,)).value == lipbound.global_bound(ref, (3,)).value
    assert lipbound.local_bound(m, X0, EPS).value >= _lower(m).value
    for other in (_TwoInputs(), _Kwargs()):
        with pytest.raises(UnsupportedModelError, match="2 inputs"):
            lipbound.global_bound(other.double().eval(), (3,))


def test_wrapper_copying_or_casting_its_input_is_analysed():
    # (was: "tensor method .clone() (no rule for this operation)", likewise .detach(),
    # torch.clone / torch.detach and .double() / .float())
    m = _net()
    ref_l, ref_g = lipbound.local_bound(m, X0, EPS).value, lipbound.global_bound(m, (3,)).value

    class Copying(nn.Module):
        def __init__(self, inner: nn.Module, fn) -> None:
            super().__init__()
            self.inner, self.fn = inner, fn

        def forward(self, x):
            return self.inner(self.fn(x))

    for fn in (lambda x: x.clone(), lambda x: x.detach(), torch.clone, torch.detach,
               lambda x: x.double(), lambda x: x.clone(memory_format=torch.contiguous_format)):
        w = Copying(m, fn).eval()
        # (an identity layer more in the chain: its float64 rounding margins, in the safe
        # direction)
        assert ref_l <= lipbound.local_bound(w, X0, EPS).value <= ref_l * (1 + 1e-12)
        assert ref_g <= lipbound.global_bound(w, (3,)).value <= ref_g * (1 + 1e-12)
    m32 = _net().float()
    x32 = X0.float()
    assert lipbound.local_bound(Copying(m32, lambda x: x.float()).eval(), x32, EPS).value \
        >= lipbound.local_bound(m32, x32, EPS).value
    # a cast that rounds inside a float64 model is not the identity of the model's forward
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        lipbound.local_bound(Copying(m, lambda x: x.float().double()).eval(), X0, EPS)


class _Gated(nn.Module):
    """A module of the user's own that branches on flags (torch.fx traces the branch taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.big, self.o = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.use_big, self.mode, self.extra = False, "plain", None
        self.calls = 0  # (a count: numbers are not watched)

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.a(x))
        if self.use_big:
            h = torch.relu(self.big(h))
        if self.mode == "doubled":
            h = torch.relu(self.big(h))
        if self.extra is not None:
            h = self.extra(h)
        return self.o(h)


def test_flag_of_a_users_module_changed_after_the_analyzer_is_refused():
    # (was: the bound of the network without the gated layer, certified 0.33 for a model of
    # local constant >= 2.2 after model.use_big = True)
    from lipbound.radius import certified_radius

    def gated() -> _Gated:
        m = _Gated().double().eval()
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            m.big.weight.mul_(100)
        return m

    for change in (lambda m: setattr(m, "use_big", True),
                   lambda m: setattr(m, "mode", "doubled"),
                   lambda m: setattr(m, "extra", lambda h: 100 * h)):
        m = gated()
        an = Analyzer(m, (3,))
        small = an.local_bound(X0, EPS).value
        change(m)
        assert _lower(m).value > small  # the bound of the old branch is below the truth now
        with pytest.raises(InputError, match="changed.*flag of a module"):
            an.local_bound(X0, EPS)
    # lipbound's own runs of the model (which count in self.calls) do not trip it
    m = gated()
    an = Analyzer(m, (3,))
    calls = m.calls
    certified_radius(an, X0, method="local")
    _lower(m)
    assert m.calls > calls
    an.local_bound(X0, EPS)


def test_wrapper_inside_the_model_is_traced_as_its_module():
    # (was: "module '1': DataParallel (no rule)", and torch.fx refusing to trace a
    # dynamo-optimized function)
    m = _net()
    ref = lipbound.local_bound(m, X0, EPS).value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = (nn.DataParallel(m), torch.compile(m))
    for w in wrapped:
        outer = nn.Sequential(nn.Identity(), w).eval()
        an = Analyzer(outer, (3,))
        assert ref <= an.local_bound(X0, EPS).value <= ref * (1 + 1e-12)
        with torch.no_grad():
            m[0].weight.mul_(2)
        with pytest.raises(InputError, match="changed"):
            an.local_bound(X0, EPS)
        with torch.no_grad():
            m[0].weight.div_(2)
    hooked = nn.DataParallel(m)
    hooked.register_forward_hook(lambda mod, i, o: 10 * o)
    with pytest.raises(UnsupportedModelError, match="hook"):
        lipbound.local_bound(nn.Sequential(nn.Identity(), hooked).eval(), X0, EPS)


def test_x0_complex_meta_or_sparse_is_refused_naming_the_fix():
    # (was: a complex x0 silently cast to its real part for the bounds, and a RuntimeError /
    # NotImplementedError of torch for a meta or sparse x0)
    m = _net()
    an = Analyzer(m, (3,))
    cases = {"complex": X0.to(torch.complex128) + 1j, "meta device": X0.to("meta"),
             "sparse_coo layout": X0.to_sparse()}
    for what, x in cases.items():
        for call, args in ((an.local_bound, (x, EPS)), (lipbound.local_bound, (m, x, EPS)),
                           (best_lower_bound, (m, x, EPS)), (PGD(), (m, x))):
            with pytest.raises(InputError, match=what):
                call(*args)
    # integer and boolean inputs (pixel values, a binary image) are read as numbers
    xi = torch.tensor([[1, 0, 2]])
    assert an.local_bound(xi, EPS).value == an.local_bound(xi.double(), EPS).value


def test_model_returning_logits_and_features_names_the_wrapper_that_works():
    class LogitsAndFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _net()

        def forward(self, x):
            h = self.body[1](self.body[0](x))
            return self.body[4](self.body[3](self.body[2](h))), h

    class First(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    m = LogitsAndFeatures().eval()
    with pytest.raises(UnsupportedModelError, match=r"model\(x\)\[0\]"):
        lipbound.local_bound(m, X0, EPS)
    assert lipbound.local_bound(First(m).eval(), X0, EPS).value \
        == lipbound.local_bound(_net(), X0, EPS).value


def test_output_map_complex_meta_or_sparse_is_refused():
    # (was: a complex map cast silently to its real part, a bound of Re(C) f reported for
    # C f; torch's errors for a meta or sparse map)
    m = _net()
    an = Analyzer(m, (3,))
    c = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    for what, bad in {"complex": c + 1j * c, "meta device": c.to("meta"),
                      "sparse_coo layout": c.to_sparse()}.items():
        for call, args in ((an.local_bound, (X0, EPS)), (an.global_bound, ())):
            with pytest.raises(InputError, match=f"output_map .*{what}"):
                call(*args, output_map=bad)
        with pytest.raises(InputError, match=f"output_map .*{what}"):
            an.local_bound_rows(X0, EPS, bad)
        with pytest.raises(InputError, match=f"output_map .*{what}"):
            gradient_lower_bound(m, X0, EPS, n_steps=2, output_map=bad)
    # numbers given otherwise are fine: the same bound
    ref = an.local_bound(X0, EPS, output_map=c).value
    for ok in (c.numpy(), [[1, -1]], c.float(), c.clone().requires_grad_(), c[0]):
        assert an.local_bound(X0, EPS, output_map=ok).value == ref


def test_forward_without_input_gradients_is_refused_by_the_lower_bounds_and_attacks():
    # (was: "RuntimeError: element 0 of tensors does not require grad" from inside autograd)
    m = _net()

    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = m

        @torch.no_grad()
        def forward(self, x):
            return self.inner(x)

    class Detaching(NoGrad):
        def forward(self, x):
            return self.inner(x.detach())

    for w in (NoGrad().eval(), Detaching().eval()):
        # the bounds are about the function, which is the same (an identity layer more in
        # the chain for the detach: its rounding margin)
        ref = lipbound.local_bound(m, X0, EPS).value
        assert ref <= lipbound.local_bound(w, X0, EPS).value <= ref * (1 + 1e-12)
        for call in (lambda: best_lower_bound(w, X0, EPS, n_random=4),  # noqa: B023
                     lambda: gradient_lower_bound(w, X0, EPS, n_steps=2),  # noqa: B023
                     lambda: PGD()(w, X0)):  # noqa: B023
            with pytest.raises(InputError, match="no gradient with respect to its input"):
                call()
    with torch.inference_mode(), pytest.raises(InputError, match="inference_mode"):
        gradient_lower_bound(m, X0, EPS, n_steps=2)



def test_other_failures_of_the_gradient_probe_are_not_disguised():
    """Only autograd's complaints mean "no input gradient"; another failure of the probing
    pass (out of memory, a shape error) is reported as it is."""
    from lipbound.lower._common import check_input_gradients

    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(RuntimeError, match="allocate memory"):
        check_input_gradients(Fails(), X0)

def test_input_moved_to_the_models_device_is_analysed():
    # (was: "tensor method .to() (no rule for this operation)" for x.to(self.device))
    m = _net()
    ref = lipbound.local_bound(m, X0, EPS).value

    class Moving(nn.Module):
        def __init__(self, how) -> None:
            super().__init__()
            self.inner, self.how = m, how

        @property
        def device(self) -> torch.device:
            return next(self.parameters()).device

        def forward(self, x):
            return self.inner(self.how(self, x))

    for how in (lambda s, x: x.to(s.device), lambda s, x: x.to("cpu"),
                lambda s, x: x.to(torch.float64),
                lambda s, x: x.to(device=s.device, dtype=torch.float64, non_blocking=True)):
        assert ref <= lipbound.local_bound(Moving(how).eval(), X0, EPS).value <= ref * (1 + 1e-12)
    # a cast to an integer type truncates: refused
    with pytest.raises(UnsupportedModelError, match=r"\.to\(\)"):
        lipbound.local_bound(Moving(lambda s, x: x.to(torch.int64).to(torch.float64)).eval(),
                             X0, EPS)


def test_eps_given_as_any_real_number_type():
    # (a meta-device tensor was a RuntimeError of torch)
    from decimal import Decimal
    from fractions import Fraction

    import numpy as np

    an = Analyzer(_net(), (3,))
    ref = an.local_bound(X0, 0.5).value
    for eps in (torch.tensor(0.5), torch.tensor([0.5]), np.float64(0.5), np.array(0.5),
                Fraction(1, 2), Decimal("0.5"), torch.tensor(0.5, requires_grad=True)):
        assert an.local_bound(X0, eps).value == ref
    for bad in (True, torch.tensor([0.5, 0.6]), torch.tensor(0.5, device="meta"), None):
        with pytest.raises(InputError, match="eps must be"):
            an.local_bound(X0, bad)
    with pytest.raises(InputError, match="n_steps must be"):
        gradient_lower_bound(_net(), X0, EPS, n_steps=torch.tensor(5, device="meta"))


def test_weight_held_as_a_plain_tensor_attribute_is_watched():
    # (was: a layer whose weight is a plain tensor (del lin.weight; lin.weight = w, as
    # functional-call and meta-learning code does) changed in place or replaced after the
    # analyzer was built: the old bound, certified 0.32 for a network of bound 3.1)
    def plain() -> tuple[nn.Sequential, torch.Tensor]:
        m = _net()
        w = m[0].weight.detach().clone()
        del m[0].weight
        m[0].weight = w
        return m, w

    m, w = plain()
    an = Analyzer(m, (3,))
    assert an.local_bound(X0, EPS).value == lipbound.local_bound(_net(), X0, EPS).value
    for change in (lambda m, w: w.mul_(10), lambda m, w: w.data.mul_(10),
                   lambda m, w: setattr(m[0], "weight", w * 10)):
        m, w = plain()
        an = Analyzer(m, (3,))
        old = an.local_bound(X0, EPS).value
        with torch.no_grad():
            change(m, w)
        assert _lower(m).value > old
        with pytest.raises(InputError, match="tensor attribute 0.weight"):
            an.local_bound(X0, EPS)


def test_module_storing_its_activations_is_not_a_change():
    # a module traced through may keep its last output (for visualisation): lipbound's own
    # runs of the model replace it, which must not trip the analyzer's check
    from lipbound.radius import certified_radius

    class Storing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _bn_net()
            self.last = None

        def forward(self, x):
            y = self.body(x)
            self.last = y
            return y

    m = Storing().eval()
    an = Analyzer(m, (3,))
    certified_radius(an, X0, method="local")
    assert isinstance(m.last, torch.Tensor)
    assert an.local_bound(X0, EPS).value == lipbound.local_bound(_bn_net(), X0, EPS).value


def test_state_dict_saved_from_a_wrapped_model_loads(tmp_path):
    # (was: "missing keys: 0.weight, ... unexpected keys: module.0.weight, ..." for the
    # checkpoint of a model trained under nn.DataParallel or torch.compile)
    from lipbound import zoo
    from lipbound.cli.common import load_state_dict_file
    from lipbound.errors import WeightsError

    src = zoo.load_model("mnist", seed=3).model
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / f"w{len(prefix)}.pt"
        torch.save({prefix + k: v for k, v in ref.items()}, path)
        got = zoo.load_model("mnist", weights=path).model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.items())
        m = _net()
        torch.save({prefix + k: v for k, v in _net(5).state_dict().items()}, path)
        load_state_dict_file(m, str(path))
        assert all(torch.equal(m.state_dict()[k], v) for k, v in _net(5).state_dict().items())
    # a prefix that is not a wrapper's, or on some keys only, is still a mismatch
    path = tmp_path / "bad.pt"
    torch.save({("module." if i else "") + k: v for i, (k, v) in enumerate(ref.items())}, path)
    with pytest.raises(WeightsError, match="unexpected keys"):
        zoo.load_model("mnist", weights=path)
    torch.save({"net." + k: v for k, v in _net().state_dict().items()}, path)
    with pytest.raises(WeightsError, match="does not match"):
        load_state_dict_file(_net(), str(path))


def test_cli_factory_returning_a_dataparallel_model(capsys, tmp_path):
    # (was: "the model is in training mode" for the wrapper's own flag; its --weights then
    # had to carry the module. prefix)
    import json

    import numpy as np

    from lipbound.cli import main

    src = tmp_path / "nets.py"
    src.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()\n\n"
        "def wrapped():\n"
        "    return {'model': nn.DataParallel(net()), 'input_shape': (4,)}\n\n"
        "def plain():\n"
        "    return {'model': net(), 'input_shape': (4,)}\n")
    x = tmp_path / "x.npy"
    np.save(x, np.linspace(-1, 1, 4, dtype=np.float32))
    torch.manual_seed(1)
    dp = nn.DataParallel(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    w = tmp_path / "w.pt"
    torch.save(dp.state_dict(), w)  # keys module.0.weight, ...
    values = []
    for factory in ("wrapped", "plain"):
        rc = main(["bound", "--model", f"{src}:{factory}", "--input", str(x), "--weights",
                   str(w), "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        values.append(json.loads(out)["value"])
    assert values[0] == values[1]


def test_wrapper_changed_after_the_analyzer_is_refused():
    # the analyzer analyses the wrapper's module; a wrapper that later runs another module
    # (a new .module), or gets a forward hook, computes another function: refused, not the
    # old module's bound (was: 0.7 certified for a wrapper of bound 66)
    inner = _net(0)
    dp = nn.DataParallel(inner).eval()
    an = Analyzer(dp, (3,))
    bound = an.global_bound().value
    assert bound >= _lower(inner).value
    big = _net(1)
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(10)
    dp.module = big
    with pytest.raises(InputError, match="DataParallel it was built for now runs"):
        an.global_bound()
    dp.module = inner  # back to the module it was built for: answers again
    assert an.global_bound().value == bound
    handle = dp.register_forward_hook(lambda m, i, o: o * 100)
    with pytest.raises(InputError, match="got a forward hook"):
        an.local_bound(X0, EPS)
    handle.remove()
    assert an.global_bound().value == bound
    twin = copy.deepcopy(an)  # (a copy holds no wrapper: its model is the module)
    assert twin.global_bound().value == bound
    reuse = an.reuse_copy(0.02)  # a twin of the same model (radius searches) watches it too
    dp.module = big
    with pytest.raises(InputError, match="DataParallel it was built for now runs"):
        reuse.global_bound()
    dp.module = inner


def test_compiled_module_with_a_forward_of_its_own_is_not_unwrapped():
    inner = _net(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(inner)
    an = Analyzer(compiled, (3,))
    assert an.model is inner
    scaled = lambda x: inner(x) * 100  # noqa: E731
    compiled.forward = scaled  # computes 100 f: no longer the module's function
    with pytest.raises(InputError, match="OptimizedModule it was built for now runs"):
        an.global_bound()
    with pytest.raises(UnsupportedModelError, match="forward replaced"):
        Analyzer(compiled, (3,))
    # the lower bounds run what the wrapper computes: 100 times the module's
    plain = gradient_lower_bound(inner, X0, EPS, n_steps=5).value
    assert gradient_lower_bound(compiled, X0, EPS, n_steps=5).value > 50 * plain


def test_a_float32_cast_inside_a_float64_model_is_named_in_the_refusal():
    """``.float()`` is the identity in exact arithmetic, but in a float64 model its rounding
    exceeds the chain check's float64 tolerance: the refusal says so (it said only "a layer
    has behaviour lipbound does not model")."""
    from lipbound.errors import UnsupportedModelError

    class Casting(nn.Module):
        def __init__(self, back: torch.dtype) -> None:
            super().__init__()
            self.a, self.b, self.back = nn.Linear(3, 8), nn.Linear(8, 2), back

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).float().to(self.back))

    m = Casting(torch.float64).double().eval()
    with pytest.raises(UnsupportedModelError, match="casts to float32"):
        Analyzer(m, (3,))
    m32 = Casting(torch.float32).eval()  # in a float32 model the casts do nothing: analysed
    assert Analyzer(m32, (3,)).global_bound().value > 0
