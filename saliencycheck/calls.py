"""What the modes that replace operation calls share (:mod:`saliencycheck.lrp_rules`,
:mod:`saliencycheck.deeplift_rules`): which tensors depend on the input, which calls multiply
two of them, and the out-of-place form of activation calls.

A replaced call must not overwrite its input: the rule's backward keeps that input. The
functional wrappers hand their options to a mode by name (``F.hardtanh`` as ``min_val=``,
``max_val=``, ``inplace=``), but a call that reaches the mode with ``inplace`` by position is
covered too; the result is returned, which is what torchvision's models use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# where each activation takes ``inplace`` positionally (its input first)
INPLACE_POSITION: dict[Callable, int] = {
    F.relu: 1, F.relu6: 1, F.hardtanh: 3, F.elu: 2, F.celu: 2, F.selu: 1, F.leaky_relu: 2,
    F.silu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.mish: 1, F.rrelu: 4, F.threshold: 3,
}
_IN_PLACE_METHODS = {torch.relu_: torch.relu, Tensor.relu_: Tensor.relu,
                     Tensor.sigmoid_: Tensor.sigmoid, Tensor.tanh_: Tensor.tanh}


def out_of_place(func: Callable, args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict]:
    """``(func, args, kwargs)`` of the same call computed out of place."""
    func = _IN_PLACE_METHODS.get(func, func)
    position = INPLACE_POSITION.get(func)
    if position is not None and len(args) > position:
        args = args[:position]
    return func, args, {k: v for k, v in kwargs.items() if k != "inplace"}


# products with no relevance or Rescale rule when both operands depend on the input
PRODUCTS: dict[Callable, str] = {
    torch.mul: "mul", Tensor.mul: "mul", Tensor.__mul__: "mul", Tensor.__rmul__: "mul",
    Tensor.mul_: "mul", Tensor.__imul__: "mul", torch.div: "div", Tensor.div: "div",
    Tensor.__truediv__: "div", Tensor.__rtruediv__: "div", Tensor.div_: "div",
    torch.matmul: "matmul", Tensor.matmul: "matmul", Tensor.__matmul__: "matmul",
    torch.bmm: "bmm", torch.einsum: "einsum",
}


def on_path(t: object) -> bool:
    """Whether ``t`` depends on the input: it requires grad and is no parameter (the runs
    freeze their copy's parameters; under ``no_grad`` nothing is on the path)."""
    return (isinstance(t, Tensor) and t.requires_grad and not isinstance(t, nn.Parameter)
            and torch.is_grad_enabled())


def input_product(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """The name of a product call whose operands include two input-dependent tensors (attention,
    gating), or None."""
    if func not in PRODUCTS:
        return None
    operands = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    return PRODUCTS[func] if sum(on_path(a) for a in operands) > 1 else None
