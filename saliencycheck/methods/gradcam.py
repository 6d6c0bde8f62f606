"""Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017), on any layer whose output reads as a
spatial map: convolutional (NCHW), channels-last (NHWC) or transformer patch tokens."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from saliencycheck.engine.passes import (
    LayerPair,
    MethodPlan,
    Request,
    RowMaps,
    RowSource,
    input_gradient_maps,
    planned_method,
    ruled_family,
)
from saliencycheck.methods.base import AttributionContext
from saliencycheck.methods.layers import Layout, default_layer, to_nchw
from saliencycheck.methods.modified_relu import GuidedParams
from saliencycheck.methods.registry import MethodParams
from saliencycheck.relu_rules import NonlinearityRule


class GradCamParams(MethodParams):
    """Parameters of gradcam and guided_gradcam."""

    layer: str | None = Field(
        None,
        description="dotted path of the module whose output feature map is explained; default: "
        "the last top-level module (or module of the last repeated unit) with parameters whose "
        "output is a spatial map the logit's gradient reaches (layer4 on ResNet, norm on Swin, "
        "the last encoder layer's ln_1 on ViT)",
    )
    layout: Layout = Field(
        "auto",
        description="how the layer's output reads as a map: nchw, nhwc (channels last), tokens "
        "(leading class tokens dropped, patch tokens on the input's grid), or auto (from its "
        "shape; an output none fits is refused)",
    )


def _cam(inputs: Tensor, grads: Tensor | None, pair: LayerPair | None, *, layer: str,
         layout: str) -> Tensor:
    """``ReLU(Σ_k α_k A_k)``, α_k = spatial mean of ∂score/∂A_k, upsampled: (rows, 1, H, W);
    A and its gradient read as NCHW maps first (:func:`~saliencycheck.methods.layers.to_nchw`)."""
    size = tuple(inputs.shape[2:])
    activations, layer_grads = (to_nchw(t, layout, size, layer=layer) for t in pair)
    alpha = layer_grads.mean(dim=(2, 3), keepdim=True)
    cam = (alpha * activations).sum(dim=1, keepdim=True).clamp(min=0)
    return F.interpolate(cam, size=inputs.shape[2:], mode="bilinear", align_corners=False)


def _cam_plus_plus(inputs: Tensor, grads: Tensor | None, pair: LayerPair | None, *,
                   layer: str, layout: str) -> Tensor:
    """Grad-CAM++: ``ReLU(Σ_k w_k A_k)`` with ``w_k = Σ_ij a_k^ij ReLU(g_k^ij)`` and
    ``a = g² / (2g² + Σ_ab A_k^ab · g³)`` (0 where g = 0), upsampled: (rows, 1, H, W)."""
    size = tuple(inputs.shape[2:])
    activations, g = (to_nchw(t, layout, size, layer=layer) for t in pair)
    g2, g3 = g.pow(2), g.pow(3)
    denominator = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g3
    a = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1), 0)
    weights = (a * g.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    cam = (weights * activations).sum(dim=1, keepdim=True).clamp(min=0)
    return F.interpolate(cam, size=inputs.shape[2:], mode="bilinear", align_corners=False)


def _cam_maps(model: nn.Module, source: RowSource, layer: str | None, layout: str,
              cam: Callable[..., Tensor] = _cam) -> RowMaps:
    if layer is None:
        layer = default_layer(model, source.build(torch.arange(1))[0])
    return RowMaps(fn=partial(cam, layer=layer, layout=layout), count=source.count,
                   layer=layer, needs_grads=False)


@planned_method(
    "gradcam",
    params=GradCamParams,
    description="ReLU of the feature maps weighted by their mean gradient, upsampled",
)
def gradcam(
    model: nn.Module, source: RowSource, context: AttributionContext, *, layer: str | None,
    layout: str = "auto",
) -> MethodPlan:
    """``ReLU(Σ_k α_k A_k)`` with ``α_k`` the spatial mean of ∂ logit[target] / ∂A_k.

    A is the ``layer``'s output (captured in the plain pass of the images, shared with the
    gradient) read in its ``layout``; the map is upsampled bilinearly (align_corners=False)
    to the input size. Shape (N, 1, H, W), non-negative.
    """
    cams = _cam_maps(model, source, layer, layout)
    return MethodPlan([Request("plain", source, cams, "gradcam")], cams.result)


@planned_method(
    "gradcam_plus_plus",
    params=GradCamParams,
    description="Grad-CAM with pixel-wise weights of the positive gradients (Grad-CAM++)",
)
def gradcam_plus_plus(
    model: nn.Module, source: RowSource, context: AttributionContext, *, layer: str | None,
    layout: str = "auto",
) -> MethodPlan:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19, in the exponential form without its
    per-image factor ``exp(S)``, which scales every map by one positive number), from the
    same plain pass and layer pair as Grad-CAM. Shape (N, 1, H, W), non-negative."""
    cams = _cam_maps(model, source, layer, layout, _cam_plus_plus)
    return MethodPlan([Request("plain", source, cams, "gradcam_plus_plus")], cams.result)


class GuidedGradCamParams(GradCamParams, GuidedParams):
    """Parameters of guided_gradcam: Grad-CAM's layer and layout, guided backprop's rule."""


@planned_method(
    "guided_gradcam",
    params=GuidedGradCamParams,
    description="guided backprop × upsampled Grad-CAM",
)
def guided_gradcam(
    model: nn.Module, source: RowSource, context: AttributionContext, *, layer: str | None,
    layout: str = "auto", nonlinearity_rule: NonlinearityRule = "relu_only",
) -> MethodPlan:
    """Guided Backprop × Grad-CAM (broadcast over channels), shape (N, C, H, W); both factors
    come from the passes guided_backprop and gradcam already make."""
    guided = input_gradient_maps(source.count)
    cams = _cam_maps(model, source, layer, layout)
    return MethodPlan(
        [Request(ruled_family("guided", nonlinearity_rule), source, guided, "guided_gradcam"),
         Request("plain", source, cams, "guided_gradcam")],
        lambda: guided.result() * cams.result(),
    )
