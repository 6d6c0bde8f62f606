"""Guided-backprop and deconvnet backward rules at every ReLU application.

Springenberg et al. 2015 (guided backprop) and Zeiler & Fergus 2014 (deconvnet) change the
backward pass of each ReLU: guided passes back ``grad.clamp(min=0) * (x > 0)``, deconvnet
``grad.clamp(min=0)`` whatever the forward input ``x`` was.

Hooks on ``nn.ReLU`` modules miss functional calls (DenseNet's final ``F.relu``, every
``F.relu`` in Inception-v3 and GoogLeNet) and mishandle one module applied several times
(torchvision's ResNet). :class:`ReluRuleMode` is a ``TorchFunctionMode`` instead: while it is
active, every ReLU *call* -- ``F.relu`` (which ``nn.ReLU`` and ``F.relu(x, inplace=True)``
dispatch to), ``torch.relu``, ``torch.relu_``, ``Tensor.relu`` and ``Tensor.relu_`` -- is
replaced by an autograd function with the same forward and the rule's backward. It never
touches the model, so nothing has to be restored.

ReLU6 (``F.relu6``, and ``F.hardtanh(x, 0, 6)`` that ``nn.ReLU6`` dispatches to; used by
MobileNetV2) is treated as a ReLU whose gradient is also zero above 6, exactly as its
forward is flat there: guided passes back ``grad⁺ * (0 < x < 6)``, deconvnet
``grad⁺ * (x < 6)``.

Notes
-----
* In-place calls (``inplace=True``, ``relu_``) are computed out of place and the result
  returned: correct for code that uses the return value, as torchvision's models all do.
* Other activations (SiLU, Hardswish, GELU, sigmoid, tanh, ...) keep their plain gradient;
  the mode counts them (:class:`ReluRuleReport`) so callers can warn that the rule applied to
  the ReLUs only. EfficientNet has no ReLU at all; MobileNetV3 mixes ReLU and Hardswish.
* ``nonlinearity_rule="gelu_as_relu"`` (opt-in) also rules GELU and SiLU calls as if they
  were ReLUs: their forward is unchanged and their backward is the rule's, guided
  ``grad.clamp(min=0) * (x > 0)``, deconvnet ``grad.clamp(min=0)``. It lets the guided methods
  run on transformers and modern CNNs, but it is an extension with no published definition;
  the report counts these calls apart (``as_relu``) so callers can say so.
* Operations that are not dispatched through ``torch.overrides`` (TorchScript, a ReLU written
  as ``x.clamp(min=0)``) are not seen.
* A ReLU counts only on the input's computational path: when its input requires grad. The
  runs freeze their own copy's parameters, so there that means "depends on the image"; a
  ReLU that never sees the input (Swin V2's continuous position-bias MLP) is counted apart,
  and a model whose every ReLU is of that kind is refused like a model without ReLU. (Under
  ``torch.no_grad`` nothing requires grad and every call counts.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

Rule = Literal["guided", "deconvnet"]
NonlinearityRule = Literal["relu_only", "gelu_as_relu"]

# the activations each nonlinearity rule treats as ReLUs (beyond ReLU and ReLU6 themselves)
AS_RELU: dict[str, frozenset[str]] = {"relu_only": frozenset(),
                                      "gelu_as_relu": frozenset({"gelu", "silu"})}

_RELU = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}

_OTHER_ACTIVATIONS = {
    F.silu: "silu",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.gelu: "gelu",
    F.mish: "mish",
    F.elu: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.leaky_relu: "leaky_relu",
    F.prelu: "prelu",
    F.rrelu: "rrelu",
    F.softplus: "softplus",
    F.threshold: "threshold",
    F.glu: "glu",
    F.logsigmoid: "logsigmoid",
    F.sigmoid: "sigmoid",
    torch.sigmoid: "sigmoid",
    Tensor.sigmoid: "sigmoid",
    Tensor.sigmoid_: "sigmoid",
    F.tanh: "tanh",
    torch.tanh: "tanh",
    Tensor.tanh: "tanh",
    Tensor.tanh_: "tanh",
}


@dataclass(frozen=True)
class ReluRuleReport:
    """What a :class:`ReluRuleMode` met: ReLU/ReLU6 calls (modified), other activations (not)."""

    relu_calls: int
    other_activations: dict[str, int] = field(default_factory=dict)
    off_path_relus: int = 0  # ReLU calls whose input does not depend on the image
    as_relu: dict[str, int] = field(default_factory=dict)  # other activations ruled as ReLU


class _RuledReLU(torch.autograd.Function):
    """``clamp(x, 0, upper)`` forward, or ``activation(x)`` for an activation ruled as a ReLU
    (then ``upper`` is None); the guided or deconvnet rule as backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rule: Rule, upper: float | None,
                activation: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        if rule == "guided":
            gate = x > 0 if upper is None else (x > 0) & (x < upper)
        else:
            gate = None if upper is None else x < upper
        ctx.save_for_backward(gate)
        return activation(x) if activation is not None else x.clamp(min=0, max=upper)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (gate,) = ctx.saved_tensors
        grad = grad.clamp(min=0)
        if gate is not None:
            grad = torch.where(gate, grad, torch.zeros_like(grad))
        return grad, None, None, None


def _hardtanh_range(args: tuple, kwargs: dict) -> tuple[float, float]:
    """``(min_val, max_val)`` of a call ``F.hardtanh(input, min_val=-1., max_val=1., ...)``."""
    min_val = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    max_val = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return float(min_val), float(max_val)


class ReluRuleMode(TorchFunctionMode):
    """While active, every ReLU/ReLU6 call gets the ``rule``'s backward; see the module docstring.

    One instance may be entered several times (e.g. once per chunk); its counts accumulate.
    """

    def __init__(self, rule: Rule, nonlinearity_rule: NonlinearityRule = "relu_only") -> None:
        super().__init__()
        if rule not in ("guided", "deconvnet"):
            raise ValueError(f"unknown ReLU rule {rule!r}; use 'guided' or 'deconvnet'")
        if nonlinearity_rule not in AS_RELU:
            raise ValueError(f"unknown nonlinearity rule {nonlinearity_rule!r}; use "
                             f"{' or '.join(map(repr, AS_RELU))}")
        self.rule: Rule = rule
        self._as_relu_names = AS_RELU[nonlinearity_rule]
        self._relu_calls = 0
        self._off_path = 0
        self._other: Counter[str] = Counter()
        self._as_relu: Counter[str] = Counter()

    def _ruled(self, x: Tensor, upper: float | None) -> Tensor | None:
        """The ruled ReLU of ``x`` where it lies on the input's path; None (counted) where
        it does not, so the plain call runs."""
        if torch.is_grad_enabled() and not x.requires_grad:
            self._off_path += 1
            return None
        self._relu_calls += 1
        return _RuledReLU.apply(x, self.rule, upper)

    def _as_relu_call(self, name: str, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        """An activation ruled as a ReLU (``nonlinearity_rule``): its own forward, the rule's
        backward; counted apart. Off the input's path it runs plain, as a ReLU would."""
        x = args[0]
        if torch.is_grad_enabled() and not x.requires_grad:
            self._other[name] += 1
            return func(*args, **kwargs)
        self._as_relu[name] += 1
        # computed out of place, as the ReLUs are: drop ``inplace`` (SiLU's second argument)
        rest = () if name == "silu" else args[1:]
        options = {k: v for k, v in kwargs.items() if k != "inplace"}
        return _RuledReLU.apply(x, self.rule, None, lambda t: func(t, *rest, **options))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        ruled = None
        if func in _RELU:
            ruled = self._ruled(args[0], None)
        elif func is F.relu6 or func is F.hardtanh and _hardtanh_range(args, kwargs) == (0, 6):
            ruled = self._ruled(args[0], 6.0)
        elif func is F.hardtanh:
            self._other["hardtanh"] += 1
        elif _OTHER_ACTIVATIONS.get(func) in self._as_relu_names:
            return self._as_relu_call(_OTHER_ACTIVATIONS[func], func, args, kwargs)
        elif func in _OTHER_ACTIVATIONS:
            self._other[_OTHER_ACTIVATIONS[func]] += 1
        return ruled if ruled is not None else func(*args, **kwargs)

    def report(self) -> ReluRuleReport:
        """Counts so far (over every time this mode was entered)."""
        return ReluRuleReport(relu_calls=self._relu_calls, other_activations=dict(self._other),
                              off_path_relus=self._off_path, as_relu=dict(self._as_relu))
