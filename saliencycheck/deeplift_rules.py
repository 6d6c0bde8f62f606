"""DeepLIFT's Rescale rule (Shrikumar et al. 2017) at every nonlinearity *call*.

Captum's ``DeepLift`` keeps each module's input on the module, so a module called twice per
forward (torchvision's ResNet applies one ``nn.ReLU`` several times per block) gets the wrong
reference, and functional calls (``F.relu``) are not seen: the attributions no longer sum to
``f(x) − f(x′)`` (Captum issues #1082, #1104, #578). Here two ``TorchFunctionMode`` passes do it
by call: :class:`ReferencePass` runs the model on the baseline ``x′`` and keeps every
nonlinearity call's input and output in call order; :class:`RescalePass` runs it on ``x`` and
gives the k-th call the multiplier of the k-th reference call as its backward. Linear
operations keep their gradient, which is their multiplier. So ``(x − x′) ⊙ ∂`` sums to
``f(x) − f(x′)`` exactly (summation-to-delta), whatever module or function made each call.

* Element-wise nonlinearities (ReLU, ReLU6, GELU, SiLU, sigmoid, tanh, ...): ``m = Δy / Δx``,
  the plain derivative where ``|Δx| < 1e-10`` (Captum's rule).
* Max pooling: ``Δy`` split at the cross maximum ``M = max(y, y′)``: ``M − y′`` goes to the
  input's winner and ``y − M`` to the reference's, then divided by ``Δx`` there (Captum's rule;
  overlapping windows add up rather than overwrite, which keeps the sum exact).
* No rule here, refused in one line: softmax, normalisation over features (LayerNorm,
  GroupNorm), attention, and products of two input-dependent tensors (gating).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from saliencycheck.calls import input_product, on_path, out_of_place
from saliencycheck.errors import MethodError

EPS = 1e-10
_ELEMENTWISE = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh,
                F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.selu, F.celu,
                F.leaky_relu, F.softplus, F.sigmoid, torch.sigmoid, Tensor.sigmoid,
                F.tanh, torch.tanh, Tensor.tanh, F.logsigmoid}
_POOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
          F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_NO_RULE = {
    F.softmax: "softmax", F.log_softmax: "log_softmax", F.layer_norm: "layer_norm (LayerNorm)",
    F.group_norm: "group_norm (GroupNorm)",
    F.scaled_dot_product_attention: "scaled_dot_product_attention (attention)",
    F.multi_head_attention_forward: "multi_head_attention_forward (nn.MultiheadAttention)",
}
def _vjp(func: Callable, x: Tensor, rest: tuple, kwargs: dict, grad: Tensor) -> Tensor:
    """The plain input gradient of ``func(x, *rest, **kwargs)`` against ``grad``."""
    with torch.enable_grad():
        probe = x.detach().requires_grad_(True)
        (result,) = torch.autograd.grad(func(probe, *rest, **kwargs), probe, grad)
    return result


class _Rescale(torch.autograd.Function):
    """An element-wise nonlinearity with DeepLIFT's multiplier ``Δy / Δx`` as its backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, x_ref: Tensor, y_ref: Tensor,
                func: Callable, rest: tuple, kwargs: dict) -> Tensor:
        ctx.save_for_backward(x, y, x_ref, y_ref)
        ctx.call = (func, rest, kwargs)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, x_ref, y_ref = ctx.saved_tensors
        delta_in = x - x_ref
        small = delta_in.abs() < EPS
        secant = grad * (y - y_ref) / torch.where(small, torch.ones_like(delta_in), delta_in)
        if small.any():
            func, rest, kwargs = ctx.call
            secant = torch.where(small, _vjp(func, x, rest, kwargs, grad), secant)
        return secant, None, None, None, None, None, None


class _RescalePool(torch.autograd.Function):
    """Max pooling with DeepLIFT's multipliers (Captum's cross-maximum split)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, x_ref: Tensor, y_ref: Tensor,
                func: Callable, rest: tuple, kwargs: dict) -> Tensor:
        ctx.save_for_backward(x, y, x_ref, y_ref)
        ctx.call = (func, rest, kwargs)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, x_ref, y_ref = ctx.saved_tensors
        func, rest, kwargs = ctx.call
        cross = torch.maximum(y, y_ref)
        routed = _vjp(func, x, rest, kwargs, grad * (cross - y_ref)) \
            + _vjp(func, x_ref, rest, kwargs, grad * (y - cross))
        delta_in = x - x_ref
        small = delta_in.abs() < EPS
        result = routed / torch.where(small, torch.ones_like(delta_in), delta_in)
        if small.any():
            result = torch.where(small, _vjp(func, x, rest, kwargs, grad), result)
        return result, None, None, None, None, None, None


def _pool_call(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    """(input, other positional arguments, keywords) of a pooling call, indices not returned."""
    options = {k: v for k, v in kwargs.items() if k != "return_indices"}
    return args[0], args[1:], options


class ReferencePass(TorchFunctionMode):
    """While active (the forward of the baseline), keep each nonlinearity call's input and
    output, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable, Tensor, Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _ELEMENTWISE:
            plain, args, options = out_of_place(func, args, kwargs)
            x = args[0]
            y = plain(x, *args[1:], **options)
            self.calls.append((func, x.detach(), y.detach()))
            return y
        if func in _POOLS:
            x, rest, options = _pool_call(args, kwargs)
            y = func(x, *rest, **options)
            self.calls.append((func, x.detach(), y.detach()))
            return (y, func(x, *rest, **options, return_indices=True)[1]) \
                if kwargs.get("return_indices") else y
        return func(*args, **kwargs)


class RescalePass(TorchFunctionMode):
    """While active (the forward of the input), the k-th nonlinearity call gets the multiplier
    against the k-th call of ``reference`` as its backward."""

    def __init__(self, reference: ReferencePass) -> None:
        super().__init__()
        self.reference = reference.calls
        self.index = 0

    def _ref(self, func: Callable, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.index >= len(self.reference):
            raise MethodError("deeplift: the model calls more nonlinearities on the input than "
                              "on the baseline; its forward must not depend on the input's "
                              "values (control flow)")
        ref_func, x_ref, y_ref = self.reference[self.index]
        self.index += 1
        if ref_func is not func or x_ref.shape != x.shape:
            raise MethodError("deeplift: the model's calls differ between the input and the "
                              "baseline (control flow depends on the input); DeepLIFT needs the "
                              "same computation for both")
        return x_ref, y_ref

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _ELEMENTWISE:
            x_ref, y_ref = self._ref(func, args[0])
            plain, args, options = out_of_place(func, args, kwargs)
            x = args[0]
            with torch.no_grad():
                y = plain(x, *args[1:], **options)
            if not on_path(x):
                return y
            return _Rescale.apply(x, y, x_ref, y_ref, plain, args[1:], options)
        if func in _POOLS:
            x_ref, y_ref = self._ref(func, args[0])
            x, rest, options = _pool_call(args, kwargs)
            if kwargs.get("return_indices"):
                raise MethodError("deeplift: a max pooling whose indices the model reads "
                                  "(unpooling) has no rule here")
            with torch.no_grad():
                y = func(x, *rest, **options)
            if not on_path(x):
                return y
            return _RescalePool.apply(x, y, x_ref, y_ref, func, rest, options)
        if func in _NO_RULE and on_path(args[0]):
            raise MethodError(f"deeplift: the model calls {_NO_RULE[func]} on the input's path, "
                              "which has no Rescale rule here; use integrated_gradients")
        if (product := input_product(func, args, kwargs)) is not None:
            raise MethodError(f"deeplift: the model multiplies two input-dependent tensors "
                              f"({product}: attention or gating) on the input's path, which "
                              "has no Rescale rule here; use integrated_gradients")
        return func(*args, **kwargs)

    def finish(self) -> None:
        if self.index != len(self.reference):
            raise MethodError("deeplift: the model calls fewer nonlinearities on the input than "
                              "on the baseline (control flow depends on the input)")
