"""Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from saliencycheck.errors import MethodError
from saliencycheck.methods.base import AttributionContext, check_call, target_logits
from saliencycheck.methods.layers import default_layer
from saliencycheck.methods.modified_relu import modified_relu_gradients
from saliencycheck.methods.registry import MethodParams, register_method
from saliencycheck.models import get_submodule


class GradCamParams(MethodParams):
    """Parameters of gradcam and guided_gradcam."""

    layer: str | None = Field(
        None,
        description="dotted path of the module whose output feature map is explained; default: "
        "the last top-level module with parameters that outputs a spatial map (e.g. layer4)",
    )


def _layer_activations_and_grads(
    model: nn.Module, layer: nn.Module, x: Tensor, targets: Tensor, path: str
) -> tuple[Tensor, Tensor]:
    """The layer's output A (rows, K, h, w) and ∂ logit[target] / ∂A for one chunk.

    A forward hook keeps the layer's original output as A and passes a clone downstream, so a
    later in-place op (DenseNet's ``F.relu(features, inplace=True)``) cannot overwrite A. If the
    layer runs several times in one forward, the last call is used.
    """
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: object, output: object) -> Tensor:
        if not (isinstance(output, Tensor) and output.ndim == 4):
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise MethodError(
                f"gradcam: layer {path!r} outputs {got}, not a (N, K, h, w) feature map; choose "
                "a convolutional layer"
            )
        captured.append(output)
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        score = target_logits(model, x, targets).sum()
    finally:
        handle.remove()
    if not captured:
        raise MethodError(f"gradcam: layer {path!r} did not run in the forward; choose another")
    activations = captured[-1]
    (grads,) = torch.autograd.grad(score, activations, allow_unused=True)
    if grads is None:
        raise MethodError(f"gradcam: layer {path!r} does not affect the logits; choose another")
    return activations.detach(), grads


def gradcam_maps(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext,
    *, layer: str | None,
) -> Tensor:
    """Grad-CAM upsampled to the input size, shape (N, 1, H, W); see :func:`gradcam`."""
    path = layer if layer is not None else default_layer(model, inputs)
    module = get_submodule(model, path, field="layer")
    maps = []
    with torch.enable_grad():
        for x, t in zip(inputs.split(context.chunk_size), targets.split(context.chunk_size)):
            x = x.detach().clone().requires_grad_(True)
            activations, grads = _layer_activations_and_grads(model, module, x, t, path)
            alpha = grads.mean(dim=(2, 3), keepdim=True)
            cam = (alpha * activations).sum(dim=1, keepdim=True).clamp(min=0)
            maps.append(
                F.interpolate(cam, size=inputs.shape[2:], mode="bilinear", align_corners=False)
            )
    return torch.cat(maps)


@register_method(
    "gradcam",
    params=GradCamParams,
    description="ReLU of the feature maps weighted by their mean gradient, upsampled",
)
def gradcam(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext,
    *, layer: str | None,
) -> Tensor:
    """``ReLU(Σ_k α_k A_k)`` with ``α_k`` the spatial mean of ∂ logit[target] / ∂A_k.

    A is the ``layer``'s output; the map is upsampled bilinearly (align_corners=False) to the
    input size. Shape (N, 1, H, W), non-negative.
    """
    check_call(model, inputs, targets, "gradcam")
    return gradcam_maps(model, inputs, targets, context, layer=layer)


@register_method(
    "guided_gradcam",
    params=GradCamParams,
    description="guided backprop × upsampled Grad-CAM",
)
def guided_gradcam(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext,
    *, layer: str | None,
) -> Tensor:
    """Guided Backprop × Grad-CAM (broadcast over channels), shape (N, C, H, W)."""
    check_call(model, inputs, targets, "guided_gradcam")
    guided = modified_relu_gradients(
        model, inputs, targets, context, rule="guided", name="guided_gradcam"
    )
    return guided * gradcam_maps(model, inputs, targets, context, layer=layer)
