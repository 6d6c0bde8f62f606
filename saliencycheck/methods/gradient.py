"""Gradient (Simonyan et al. 2014) and Gradient ⊙ Input (Shrikumar et al. 2016)."""

from __future__ import annotations

from torch import Tensor, nn

from saliencycheck.methods.base import AttributionContext, check_call, input_gradients
from saliencycheck.methods.registry import register_method


@register_method("gradient", description="∂ logit of the target class / ∂ input")
def gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext
) -> Tensor:
    """∂ logit[target] / ∂ input (pre-softmax score), shape (N, C, H, W)."""
    check_call(model, inputs, targets, "gradient")
    return input_gradients(model, inputs, targets, chunk_size=context.chunk_size)


@register_method("gradient_x_input", description="gradient × (normalised) input")
def gradient_x_input(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext
) -> Tensor:
    """Gradient times the normalised input, shape (N, C, H, W)."""
    check_call(model, inputs, targets, "gradient_x_input")
    return inputs * input_gradients(model, inputs, targets, chunk_size=context.chunk_size)
