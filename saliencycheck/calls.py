"""Out-of-place forms of activation calls, for the modes that replace them
(:mod:`saliencycheck.lrp_rules`, :mod:`saliencycheck.deeplift_rules`).

A replaced call must not overwrite its input: the rule's backward keeps that input. The
functional wrappers hand their options to a mode by name (``F.hardtanh`` as ``min_val=``,
``max_val=``, ``inplace=``), but a call that reaches the mode with ``inplace`` by position is
covered too; the result is returned, which is what torchvision's models use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

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
