"""Finding the feature-map layer that Grad-CAM explains."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from saliencycheck.errors import ModelError


def default_layer(model: nn.Module, inputs: Tensor) -> str:
    """Name of the last top-level child (``named_children`` order) that holds parameters, ran
    in a forward of ``inputs[:1]``, and output a 4-D feature map larger than 1×1.

    E.g. resnet → layer4, vgg → features, densenet → features, inception_v3 → Mixed_7c,
    googlenet → inception5b, squeezenet / mobilenet / efficientnet → features. Children without
    parameters are skipped because pooling layers can output spatial maps too (VGG's
    ``AdaptiveAvgPool2d`` gives 7×7 whatever the input size).
    """
    spatial: set[str] = set()
    handles: list[RemovableHandle] = []

    def record(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, Tensor) and output.ndim == 4 and output.shape[2:].numel() > 1:
                spatial.add(name)
            else:
                spatial.discard(name)
        return hook

    try:
        for name, child in model.named_children():
            handles.append(child.register_forward_hook(record(name)))
        with torch.no_grad():
            model(inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    candidates = [
        name for name, child in model.named_children()
        if name in spatial and any(True for _ in child.parameters())
    ]
    if not candidates:
        raise ModelError(
            "no top-level module with parameters outputs a spatial feature map, so Grad-CAM has "
            "no default layer; set the method's layer: to a dotted module path"
        )
    return candidates[-1]
