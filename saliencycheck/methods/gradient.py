"""Gradient (Simonyan et al. 2014) and Gradient ⊙ Input (Shrikumar et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saliencycheck.engine.passes import (
    MethodPlan,
    Request,
    RowMaps,
    RowSource,
    input_gradient_maps,
    planned_method,
)
from saliencycheck.methods.base import AttributionContext


@planned_method("gradient", description="∂ logit of the target class / ∂ input")
def gradient(model: nn.Module, source: RowSource, context: AttributionContext) -> MethodPlan:
    """∂ logit[target] / ∂ input (pre-softmax score), shape (N, C, H, W)."""
    maps = input_gradient_maps(source.count)
    return MethodPlan([Request("plain", source, maps, "gradient")], maps.result)


def zero_reference(inputs: Tensor, context: AttributionContext) -> Tensor:
    """Gradient × input completes to f(x) − f(0) for networks that are piecewise linear and
    without biases (Ancona et al. 2018); the completeness test measures how far others are."""
    return torch.zeros_like(inputs)


@planned_method("gradient_x_input", description="gradient × (normalised) input",
                reference=zero_reference)
def gradient_x_input(
    model: nn.Module, source: RowSource, context: AttributionContext
) -> MethodPlan:
    """Gradient times the normalised input, shape (N, C, H, W); shares the gradient's pass."""
    maps = RowMaps(fn=lambda inputs, grads, pair: inputs * grads, count=source.count)
    return MethodPlan([Request("plain", source, maps, "gradient_x_input")], maps.result)
