"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2017, 2019) at every call.

Module hooks (Captum's ``LRP``, zennit) see modules, so a functional call, a reused module or a
residual addition needs a rule written for that architecture (a canonizer) or is missed.
:class:`LrpMode` is a ``TorchFunctionMode`` instead, like :mod:`saliencycheck.relu_rules`:
while it is active, every convolution and linear layer *call* on the input's path gets its
rule's backward, whatever module (or none) made the call; the model is never touched.

What flows backward is not the relevance ``R`` but ``g = R / activation``: at every tensor
``t`` of the forward, ``R_t = t ⊙ g_t``. In that form the plain gradient *is* LRP-0 at every
linear operation without a rule of its own, so these come out right without being named:

* residual additions and concatenations: each operand gets its share in proportion to its
  contribution (``R_a = a / (a + b) · R``, zennit's ``Norm`` on its ``Sum`` modules);
* average and adaptive pooling, padding, reshapes, dropout in eval mode: proportional;
* max pooling: all to the winner;
* ReLU: relevance passed through (``R_in = R_out``).

What does need a rule is intercepted:

* ``conv1d/2d/3d`` and ``linear``: the layer's rule (:class:`LrpRule`), chosen by kind
  (convolution or dense) and for the *first* layer, the one that reads the input itself;
* eval-mode ``batch_norm`` right after such a layer is merged into it for the rule (its
  weights scaled, its shift in the bias: zennit's ``MergeBatchNorm``, computed per call without
  changing the model); elsewhere (DenseNet's BN-ReLU-conv) it passes relevance through;
* element-wise activations other than ReLU (ReLU6, GELU, SiLU, Hardswish, ELU, ...): relevance
  passed through, ``g_in = g · y / x`` (zennit's ``Pass``), counted so the caller can say so;
* operations without a rule here (LayerNorm, softmax, attention, a product or quotient of two
  input-dependent tensors such as squeeze-and-excitation's gating, sigmoid or tanh on the
  input's path) raise :class:`~saliencycheck.errors.MethodError` naming the operation: never a
  silently wrong map.

Rules, with ``s = R_out / stab(z)``, ``stab(t) = t + ε·sign(t)`` (``sign(0) = +1``), ``x⁺ / x⁻``
and ``W⁺ / W⁻`` the positive and negative parts, and the stabiliser ε = 1e-6 unless stated:

* ``epsilon``: ``z = Wx + b``; ``R_in = x ⊙ Wᵀ s``.
* ``zplus``: ``z = W⁺x⁺ + b⁺ + W⁻x⁻``; ``R_in = x⁺ ⊙ W⁺ᵀs + x⁻ ⊙ W⁻ᵀs``.
* ``alpha_beta``: ``α`` times the z⁺ share minus ``β`` times the same for the negative
  contributions (``W⁻x⁺ + b⁻ + W⁺x⁻``).
* ``gamma``: the generalised γ rule (Andéol et al. 2021, as zennit's ``Gamma``): where
  ``z > 0`` the positive contributions are boosted, ``(W + γW⁺)x⁺ + (W + γW⁻)x⁻``, where
  ``z < 0`` the negative ones.
* ``box`` (zᴮ, Montavon et al. 2017), on the first layer only: with the lowest and highest
  normalised pixel values ``l, h``, ``z = Wx − W⁺l − W⁻h`` and
  ``R_in = x ⊙ Wᵀs − l ⊙ W⁺ᵀs − h ⊙ W⁻ᵀs``. Not of the form ``x ⊙ g``, so the first layer
  hands back the relevance itself (``relevance_at_input``) and the map is the input's gradient.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from saliencycheck.calls import input_product, on_path, out_of_place
from saliencycheck.errors import MethodError

RuleName = Literal["epsilon", "zplus", "alpha_beta", "gamma", "box"]
STABILIZER = 1e-6


@dataclass(frozen=True)
class LrpRule:
    """One rule and its parameters (see the module docstring)."""

    name: RuleName
    epsilon: float = STABILIZER  # the ε of `epsilon`; the stabiliser of the others
    gamma: float = 0.25
    alpha: float = 1.0
    beta: float = 0.0
    low: tuple[float, ...] = ()  # `box`: per channel, in normalised units
    high: tuple[float, ...] = ()

    def __str__(self) -> str:
        extra = {"epsilon": f"ε={self.epsilon:g}", "gamma": f"γ={self.gamma:g}",
                 "alpha_beta": f"α={self.alpha:g}, β={self.beta:g}"}.get(self.name, "")
        return f"{self.name}({extra})" if extra else self.name


@dataclass(frozen=True)
class LrpRules:
    """Which rule each layer gets: ``conv`` for convolutions, ``dense`` for linear layers,
    ``first`` (if set) for the first layer, the one that reads the input itself."""

    conv: LrpRule
    dense: LrpRule
    first: LrpRule | None = None

    @property
    def relevance_at_input(self) -> bool:
        """Whether the first layer hands back relevance (the box rule) rather than ``g``."""
        return self.first is not None and self.first.name == "box"


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (autocast's bf16/fp16 activations are widened for the rules)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _stab(t: Tensor, epsilon: float) -> Tensor:
    """``t + ε·sign(t)`` with ``sign(0) = +1`` (zennit's stabiliser)."""
    return t + epsilon * ((t >= 0).to(t.dtype) * 2 - 1)


Linear = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x, weight, bias) -> z
Transpose = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, weight, s) -> Wᵀ s


def _probe_transpose(op: Linear) -> Transpose:
    """``Wᵀ s`` as the input gradient of ``op`` on a probe: a forward, then its backward."""
    def transpose(x: Tensor, weight: Tensor, s: Tensor) -> Tensor:
        with torch.enable_grad():
            probe = torch.zeros_like(x, requires_grad=True)
            (grad,) = torch.autograd.grad(op(probe, weight, None), probe, s)
        return grad
    return transpose


def transpose_of(func: Callable, rest: tuple, options: dict, op: Linear) -> Transpose:
    """``Wᵀ s`` of a linear layer or convolution call without its forward (the rules take
    two to six of these per layer; a probe's forward was a third of LRP's time on VGG-16);
    a convolution with string padding ('same') goes through a probe."""
    if func is F.linear:
        return lambda x, weight, s: s @ weight
    given = dict(zip(("stride", "padding", "dilation", "groups"), rest)) | options
    padding = given.get("padding", 0)
    if isinstance(padding, str):
        return _probe_transpose(op)

    def transpose(x: Tensor, weight: Tensor, s: Tensor) -> Tensor:
        n = x.ndim - 2

        def tuple_of(value: object) -> list[int]:
            return list(value) if isinstance(value, (tuple, list)) else [int(value)] * n

        return torch.ops.aten.convolution_backward(
            s, x, weight, None, tuple_of(given.get("stride", 1)), tuple_of(padding),
            tuple_of(given.get("dilation", 1)), False, [0] * n, int(given.get("groups", 1)),
            [True, False, False])[0]
    return transpose


def _rule_backward(rule: LrpRule, op: Linear, transpose: Transpose, x: Tensor, weight: Tensor,
                   bias: Tensor | None, z: Tensor, g_out: Tensor, *, relevance: bool) -> Tensor:
    """``g_in`` of one rule layer from ``g_out``, or ``R_in = x ⊙ g_in`` when ``relevance``
    (the box rule, whose ``R_in`` is not of that form, only so); in at least fp32.

    Each rule is a sum of terms ``mask ⊙ Wₖᵀ sₖ`` whose masks select the inputs' signs: the
    relevance form multiplies by ``x`` (``x⁺ = x ⊙ [x > 0]``)."""
    x, weight, z, g_out = _wide(x), _wide(weight), _wide(z), _wide(g_out)
    bias = _wide(bias) if bias is not None else None
    r_out = z * g_out
    eps = rule.epsilon
    pos, neg = weight.clamp(min=0), weight.clamp(max=0)
    bias_pos = bias.clamp(min=0) if bias is not None else None
    bias_neg = bias.clamp(max=0) if bias is not None else None
    if rule.name == "box":
        if not relevance:
            raise MethodError("lrp: the box rule applies only to the layer that reads the "
                              "input itself")
        shape = (1, -1, *([1] * (x.ndim - 2)))
        low = torch.as_tensor(rule.low, dtype=x.dtype, device=x.device).reshape(shape)
        high = torch.as_tensor(rule.high, dtype=x.dtype, device=x.device).reshape(shape)
        low, high = low.expand_as(x), high.expand_as(x)
        s = r_out / _stab(op(x, weight, bias) - op(low, pos, bias_pos) - op(high, neg, bias_neg),
                          eps)
        return x * transpose(x, weight, s) - low * transpose(x, pos, s) \
            - high * transpose(x, neg, s)
    if rule.name == "epsilon":
        g_in = transpose(x, weight, r_out / _stab(op(x, weight, bias), eps))
        return x * g_in if relevance else g_in
    # The sign-split rules: positive inputs meet one weight, negative inputs another. Behind
    # a ReLU no input is negative, and those terms (half the work) are skipped.
    signed = bool((x < 0).any())
    x_pos, on_pos = x.clamp(min=0), (x > 0).to(x.dtype)
    x_neg, on_neg = (x.clamp(max=0), (x < 0).to(x.dtype)) if signed else (None, None)

    def split(for_pos: Tensor, for_neg: Tensor, b: Tensor | None) -> Tensor:
        """``for_pos·x⁺ + b + for_neg·x⁻``."""
        out = op(x_pos, for_pos, b)
        return out + op(x_neg, for_neg, None) if signed else out

    def split_back(for_pos: Tensor, for_neg: Tensor, s: Tensor) -> Tensor:
        """``[x > 0] ⊙ for_posᵀs + [x < 0] ⊙ for_negᵀs``."""
        out = on_pos * transpose(x, for_pos, s)
        return out + on_neg * transpose(x, for_neg, s) if signed else out

    if rule.name in ("zplus", "alpha_beta"):
        g_in = split_back(pos, neg, r_out / _stab(split(pos, neg, bias_pos), eps))
        if rule.name == "alpha_beta":
            s_neg = r_out / _stab(split(neg, pos, bias_neg), eps)
            g_in = rule.alpha * g_in - rule.beta * split_back(neg, pos, s_neg)
    elif rule.name == "gamma":
        up_pos, up_neg = weight + rule.gamma * pos, weight + rule.gamma * neg
        b_up = bias + rule.gamma * bias_pos if bias is not None else None
        b_down = bias + rule.gamma * bias_neg if bias is not None else None
        s_up = (z > 0) * r_out / _stab(split(up_pos, up_neg, b_up), eps)
        s_down = (z < 0) * r_out / _stab(split(up_neg, up_pos, b_down), eps)
        g_in = split_back(up_pos, up_neg, s_up) + split_back(up_neg, up_pos, s_down)
    else:  # pragma: no cover - LrpRule.name is validated by the method's parameters
        raise ValueError(f"unknown LRP rule {rule.name!r}")
    return x * g_in if relevance else g_in


class _RuleLayer(torch.autograd.Function):
    """A convolution or linear layer whose backward is an LRP rule. ``value`` is the forward
    output already computed (the model's own, bit for bit); ``weight``/``bias`` are those the
    rule uses (merged with a following batch norm where there is one)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, value: Tensor, weight: Tensor, bias: Tensor | None,
                op: Linear, transpose: Transpose, rule: LrpRule, relevance: bool) -> Tensor:
        ctx.save_for_backward(x, weight, bias, value)
        ctx.op, ctx.transpose, ctx.rule, ctx.relevance = op, transpose, rule, relevance
        return value.clone()

    @staticmethod
    def backward(ctx: Any, g_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, value = ctx.saved_tensors
        g_in = _rule_backward(ctx.rule, ctx.op, ctx.transpose, x.detach(), weight.detach(),
                              None if bias is None else bias.detach(), value, g_out,
                              relevance=ctx.relevance)
        return g_in.to(x.dtype), None, None, None, None, None, None, None


class _PassRelevance(torch.autograd.Function):
    """An element-wise map ``y = f(x)`` that passes relevance through: ``g_in = g · y / x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(x, value)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, g_out: Tensor) -> tuple[Tensor, None]:
        x, value = ctx.saved_tensors
        ratio = _wide(value) / _stab(_wide(x), STABILIZER)
        return (_wide(g_out) * ratio).to(x.dtype), None


_CONV = {F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}
_RELU = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_PASSED = {F.relu6: "relu6", F.hardtanh: "hardtanh", F.gelu: "gelu", F.silu: "silu",
           F.hardswish: "hardswish", F.mish: "mish", F.elu: "elu", F.selu: "selu",
           F.celu: "celu", F.leaky_relu: "leaky_relu"}
_NO_RULE = {
    F.layer_norm: "layer_norm (LayerNorm)", F.group_norm: "group_norm (GroupNorm)",
    F.instance_norm: "instance_norm", F.local_response_norm: "local_response_norm",
    F.softmax: "softmax", F.log_softmax: "log_softmax",
    F.scaled_dot_product_attention: "scaled_dot_product_attention (attention)",
    F.multi_head_attention_forward: "multi_head_attention_forward (nn.MultiheadAttention)",
    F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", Tensor.sigmoid: "sigmoid",
    F.hardsigmoid: "hardsigmoid", F.tanh: "tanh", torch.tanh: "tanh", Tensor.tanh: "tanh",
    F.softplus: "softplus", F.glu: "glu", F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d", F.conv_transpose3d: "conv_transpose3d",
    F.bilinear: "bilinear",
}
def _is_input(t: object) -> bool:
    """Whether ``t`` is the input itself: a leaf on the path (no parameter)."""
    return on_path(t) and t.grad_fn is None


@dataclass
class LrpReport:
    """What an :class:`LrpMode` met: rule layers, merged batch norms, activations passed."""

    rule_layers: int = 0
    merged_batch_norms: int = 0
    passed: Counter = field(default_factory=Counter)  # non-ReLU activations (and lone BNs)
    first_layer_direct: bool = False  # a rule layer read the input itself
    input_uses: int = 0  # calls that read the input itself (per forward, the most seen)


@dataclass
class _Layer:
    """A rule layer's call, kept so a batch norm right after it can be merged into it."""

    out: Tensor
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    op: Linear
    transpose: Transpose
    kind: str
    direct: bool


class LrpMode(TorchFunctionMode):
    """While active, LRP ``rules`` apply at every rule-layer call on the input's path; see the
    module docstring. Counts accumulate over every entry (:meth:`report`)."""

    def __init__(self, rules: LrpRules) -> None:
        super().__init__()
        self.rules = rules
        self._report = LrpReport()
        self._layers: dict[int, _Layer] = {}  # id(output) -> the call, within one forward

    def __enter__(self) -> LrpMode:
        self._layers.clear()
        self._uses = 0
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._layers.clear()  # no tensor outlives the forward here
        super().__exit__(*exc)

    def report(self) -> LrpReport:
        return self._report

    def _rule(self, kind: str, direct: bool) -> LrpRule:
        if direct and self.rules.first is not None:
            return self.rules.first
        return self.rules.conv if kind == "conv" else self.rules.dense

    def _layer(self, func: Callable, kind: str, args: tuple, kwargs: dict) -> Tensor:
        x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        rest, options = args[3:], {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}

        def op(inputs: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return func(inputs, w, b, *rest, **options)

        with torch.no_grad():
            value = func(*args, **kwargs)
        direct = _is_input(x)
        self._report.rule_layers += 1
        self._report.first_layer_direct |= direct
        transpose = transpose_of(func, rest, options, op)
        out = _RuleLayer.apply(x, value.detach(), weight, bias, op, transpose,
                               self._rule(kind, direct), direct and self.rules.relevance_at_input)
        self._layers[id(out)] = _Layer(out, x, weight, bias, op, transpose, kind, direct)
        return out

    def _batch_norm(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                 "momentum", "eps")
        call = {"weight": None, "bias": None, "training": False, "eps": 1e-5,
                **dict(zip(names, args)), **kwargs}
        with torch.no_grad():
            value = func(*args, **kwargs)
        if call["training"] or call["running_mean"] is None:
            raise MethodError("lrp: batch norm in training mode (batch statistics) on the "
                              "input's path has no rule; put the model in eval mode")
        x = call["input"]
        layer = self._layers.get(id(x))
        if layer is None or layer.out is not x:  # no rule layer right before: pass through
            self._report.passed["batch_norm"] += 1
            return _PassRelevance.apply(x, value.detach())
        std = torch.sqrt(call["running_var"] + call["eps"])
        scale = (call["weight"] if call["weight"] is not None else 1.0) / std
        shift = call["bias"] if call["bias"] is not None else 0.0
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        axis = (slice(None), *([None] * (layer.weight.ndim - 1)))
        weight = layer.weight * scale[axis]
        bias = (bias - call["running_mean"]) * scale + shift
        self._report.merged_batch_norms += 1
        return _RuleLayer.apply(layer.x, value.detach(), weight.detach(), bias.detach(),
                                layer.op, layer.transpose, self._rule(layer.kind, layer.direct),
                                layer.direct and self.rules.relevance_at_input)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__" and any(_is_input(a) for a in args):
            self._uses += 1  # (reading an attribute such as .shape is no use)
            self._report.input_uses = max(self._report.input_uses, self._uses)
        if func in _CONV or func is F.linear:
            if on_path(args[0]):
                return self._layer(func, _CONV.get(func, "dense"), args, kwargs)
        elif func is F.batch_norm:
            if on_path(args[0]):
                return self._batch_norm(func, args, kwargs)
        elif func is Tensor.clone and id(args[0]) in self._layers:
            # a forward hook's copy of a rule layer's output (CSC's injection points): a batch
            # norm after it is still merged into the layer
            copy = func(*args, **kwargs)
            layer = self._layers[id(args[0])]
            if layer.out is args[0]:
                self._layers[id(copy)] = _Layer(copy, layer.x, layer.weight, layer.bias,
                                                layer.op, layer.transpose, layer.kind,
                                                layer.direct)
            return copy
        elif func in _RELU:
            pass  # its gradient passes relevance through exactly
        elif func in _PASSED:
            if on_path(args[0]):
                plain, call, options = out_of_place(func, args, kwargs)
                with torch.no_grad():
                    value = plain(*call, **options)
                bounds = (*call[1:3], options.get("min_val"), options.get("max_val"))
                relu6 = func is F.hardtanh and [b for b in bounds if b is not None] == [0, 6]
                self._report.passed["relu6" if relu6 else _PASSED[func]] += 1
                return _PassRelevance.apply(args[0], value.detach())
        elif func in _NO_RULE:
            if on_path(args[0]):
                raise MethodError(f"the model calls {_NO_RULE[func]} on the input's path, "
                                  "which has no LRP rule here; use gradient or "
                                  "integrated_gradients on this model")
        elif (product := input_product(func, args, kwargs)) is not None:
            raise MethodError(f"the model multiplies two input-dependent tensors ({product}: "
                              "attention or gating, e.g. squeeze-and-excitation) on the "
                              "input's path, which has no LRP rule here; use gradient or "
                              "integrated_gradients")
        return func(*args, **kwargs)


def check_lrp_report(report: LrpReport, names: list[str], *, relevance_at_input: bool,
                     category: type[Warning]) -> None:
    """Refuse a model without a rule layer on the input's path, or, for the box rule, whose
    input is not read by one layer alone; warn once for the activations and batch norms whose
    relevance was passed through."""
    who = ", ".join(names)
    if report.rule_layers == 0:
        raise MethodError(f"{who}: the model applies no convolution or linear layer on the "
                          "input's path, so LRP has nothing to apply its rules to")
    if relevance_at_input and not (report.first_layer_direct and report.input_uses == 1):
        raise MethodError(f"{who}: the box rule needs a first layer that alone reads the "
                          f"input, but the model calls {report.input_uses} operation(s) on it "
                          "(e.g. Inception's transform_input); use composite epsilon_plus or "
                          "epsilon_alpha2_beta1")
    passed = {k: v for k, v in report.passed.items()}
    if passed:
        text = ", ".join(f"{k}×{n}" for k, n in sorted(passed.items()))
        warnings.warn(f"{who}: relevance passed through unchanged at {text} (as zennit's Pass "
                      "rule; counted over all chunks)", category, stacklevel=4)
