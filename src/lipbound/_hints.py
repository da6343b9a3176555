"""What a user can do about a layer lipbound has no rule for: the detail of its line in
:class:`~lipbound.errors.UnsupportedModelError` for the layers researchers' models often hold
(a softmax head, another activation, 1-D layers, other padding, an input permutation)."""

from __future__ import annotations

from torch import fx, nn

_SOFTMAX_NAMES = {"softmax", "log_softmax", "softmin"}
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)

_ACTIVATION_NAMES = {
    "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish", "softplus",
    "tanh", "sigmoid", "hardswish", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink",
    "softshrink", "hardshrink", "threshold", "glu",
}
_ACTIVATION_MODULES = (
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.GLU,
)
_SIGMOID = (nn.Sigmoid,)

_ONE_D = {
    nn.Conv1d: "nn.Conv2d(C_in, C_out, (1, k), stride=(1, s), padding=(0, p)) with weight "
               "conv.weight.unsqueeze(2)",
    nn.MaxPool1d: "nn.MaxPool2d((1, k), stride=(1, s))",
    nn.AvgPool1d: "nn.AvgPool2d((1, k), stride=(1, s))",
    nn.AdaptiveAvgPool1d: "nn.AdaptiveAvgPool2d((1, n))",
}

_OTHER_PADDING = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
                  nn.ReplicationPad2d, nn.CircularPad1d, nn.CircularPad2d)

_PERMUTE_NAMES = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims"}


def _name(node: fx.Node) -> str:
    """The bare name of a function or method node's target (``softmax`` for ``F.softmax``,
    ``torch.softmax`` and ``x.softmax``)."""
    t = node.target
    return t if isinstance(t, str) else str(getattr(t, "__name__", ""))


def _feeds_output(node: fx.Node) -> bool:
    return bool(node.users) and all(u.op == "output" for u in node.users)


def unsupported_hint(node: fx.Node, module: nn.Module | None, chain_input: bool) -> str | None:
    """The detail for ``node``, which has no rule, or None for the generic one.

    Args:
        node: the traced node.
        module: its module (``call_module``), else None.
        chain_input: whether the node's tensor operand is the model's input.
    """
    name = "" if node.op == "call_module" else _name(node)
    at_output = _feeds_output(node)
    if isinstance(module, _SOFTMAX_MODULES) or name in _SOFTMAX_NAMES:
        if at_output:
            return ("a softmax / log-softmax at the output has no rule: lipbound bounds the "
                    "logits. A softmax keeps the predicted class, so the certified radii of "
                    "the model without it hold for this model; analyse that model: "
                    "model[:-1].eval() for an nn.Sequential, the attribute set to nn.Identity() "
                    "(model.softmax = nn.Identity()), or a forward that returns the logits")
        return "a softmax inside the network has no rule (only ReLU networks are supported)"
    if (isinstance(module, _SIGMOID) or name == "sigmoid") and at_output:
        return ("a sigmoid at the output has no rule: lipbound bounds the logits. It keeps the "
                "sign of each logit (the class of a binary classifier), so the certified radii "
                "of the model without it hold for this model; analyse that model "
                "(model[:-1].eval() for an nn.Sequential, or a forward that returns the logits)")
    if isinstance(module, _ACTIVATION_MODULES) or (
            node.op != "call_module" and name in _ACTIVATION_NAMES):
        return ("lipbound bounds ReLU networks: this activation has no rule (supported: ReLU, "
                "and clamps such as ReLU6 / Hardtanh); a network trained with it cannot be "
                "analysed as it is (lipbound.register_rule adds a rule whose soundness you "
                "prove)")
    for cls, fix in _ONE_D.items():
        if type(module) is cls:
            return ("1-D layers have no rule; the same layer in 2-D on a per-sample input of "
                    "shape (C, 1, L) (input_shape (C, 1, L), or x.unsqueeze(2) at the start "
                    f"of forward) is supported: {fix}")
    if isinstance(module, _OTHER_PADDING):
        return ("only zero padding is supported (a Conv2d's padding_mode='zeros', the default, "
                "or nn.ZeroPad2d / F.pad with zeros right before a convolution)")
    if name in _PERMUTE_NAMES:
        if chain_input:
            return ("a permutation of the input's axes has no rule; it keeps L2 distances, so "
                    "the model without it, given the permuted input (e.g. x.permute(0, 3, 1, "
                    "2) for NHWC images, input_shape (C, H, W)), has the same Lipschitz "
                    "constants and radii: analyse that model")
        return "a permutation of axes inside the network has no rule"
    return None
