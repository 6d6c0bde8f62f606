"""Gradient (Simonyan et al. 2014) and Gradient ⊙ Input (Shrikumar et al. 2016)."""

from __future__ import annotations

from torch import nn

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


@planned_method("gradient_x_input", description="gradient × (normalised) input")
def gradient_x_input(
    model: nn.Module, source: RowSource, context: AttributionContext
) -> MethodPlan:
    """Gradient times the normalised input, shape (N, C, H, W); shares the gradient's pass."""
    maps = RowMaps(fn=lambda inputs, grads, pair: inputs * grads, count=source.count)
    return MethodPlan([Request("plain", source, maps, "gradient_x_input")], maps.result)
