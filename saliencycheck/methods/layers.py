"""The feature-map layer Grad-CAM explains, and how its output reads as a spatial map.

A layer's output is read in one of three layouts: ``nchw`` (a convolutional feature map),
``nhwc`` (channels last: Swin's norm layers) or ``tokens`` (a transformer's (N, T, C) output:
leading class or register tokens dropped, the patch tokens reshaped to the patch grid, whose
aspect is the input's). ``auto`` decides from the shape and the input's size; an output that
fits none of them is refused, never interpreted silently.

The default layer (:func:`default_layer`): the last module, in order of completion, among the
top-level children and the last repeated unit (``randomization.repeated_units``) with its
submodules, that holds parameters and outputs a spatial map whose gradient reaches the logit
at more than one position. That gives ResNet's ``layer4``, VGG's and DenseNet's ``features``,
Inception-v3's ``Mixed_7c`` (as before), Swin's ``norm`` (channels last) and, on ViT, the last
encoder layer's ``ln_1``: the patch tokens after the final layer never reach the class token
the head reads (their gradient is zero), while those entering its attention do.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from saliencycheck.errors import MethodError, ModelError
from saliencycheck.randomization import repeated_units

Layout = Literal["auto", "nchw", "nhwc", "tokens"]
MAX_EXTRA_TOKENS = 8  # leading non-patch tokens a token layout may carry (class, registers)


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int, int] | None:
    """(leading tokens to drop, grid height, grid width) when ``tokens`` are patch tokens on a
    grid with the aspect of an input of ``size`` (H, W), after at most
    :data:`MAX_EXTRA_TOKENS` leading ones; None when they are not."""
    height, width = size
    common = math.gcd(height, width)
    rh, rw = height // common, width // common
    for drop in range(min(tokens, MAX_EXTRA_TOKENS + 1)):
        patches, rest = divmod(tokens - drop, rh * rw)
        scale = math.isqrt(patches)
        if not rest and scale * scale == patches and patches * rh * rw > 1:
            return drop, scale * rh, scale * rw
    return None


def spatial_layout(shape: tuple[int, ...], size: tuple[int, int], *,
                   single: bool = False) -> str | None:
    """How an output of ``shape`` reads as a spatial map of an input of ``size`` (H, W):
    'nchw', 'nhwc' (4-D, only when its middle dimensions, not its last two, have the input's
    aspect), 'tokens' (3-D patch tokens, :func:`token_grid`), or None. A 1×1 map (a layer
    named on a small input) counts only with ``single``: its CAM is one value, upsampled."""
    height, width = size
    if len(shape) == 4:
        _, a, b, c = shape
        if (b * width != c * height and a * width == b * height and a * b > 1):
            return "nhwc"
        return "nchw" if b * c > 1 or single else None
    if len(shape) == 3 and token_grid(shape[1], size) is not None:
        return "tokens"
    return None


def to_nchw(output: Tensor, layout: str, size: tuple[int, int], *, layer: str = "") -> Tensor:
    """A layer's ``output`` as an (N, K, h, w) feature map (``layout`` 'auto': detected)."""
    if layout == "auto":
        layout = spatial_layout(tuple(output.shape), size, single=True) or ""
        if not layout:
            raise MethodError(f"gradcam: layer {layer!r} outputs {tuple(output.shape)}, which "
                              "cannot be read as a spatial map of the input (NCHW, NHWC or "
                              "patch tokens); choose another layer or set layout:")
    if layout == "nhwc" and output.ndim == 4:
        return output.permute(0, 3, 1, 2)
    if layout == "tokens" and output.ndim == 3:
        grid = token_grid(output.shape[1], size)
        if grid is not None:
            drop, h, w = grid
            return output[:, drop:].reshape(len(output), h, w, -1).permute(0, 3, 1, 2)
    if layout == "nchw" and output.ndim == 4:
        return output
    raise MethodError(f"gradcam: layer {layer!r} outputs {tuple(output.shape)}, which is not "
                      f"a {layout} map of a {size[0]}x{size[1]} input; set layout: to match "
                      "the layer, or choose another")


def layer_layout(model: nn.Module, inputs: Tensor, layer: str) -> str:
    """The layout of ``layer``'s output on ``inputs[:1]``; ModelError when there is none."""
    outputs: list[object] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: outputs.append(output))
    try:
        with torch.no_grad():
            model(inputs[:1])
    finally:
        handle.remove()
    output = outputs[-1] if outputs else None
    layout = spatial_layout(tuple(output.shape), tuple(inputs.shape[2:]), single=True) \
        if isinstance(output, Tensor) else None
    if layout is None:
        got = (tuple(output.shape) if isinstance(output, Tensor)
               else "nothing (it does not run)" if output is None else type(output).__name__)
        raise ModelError(f"layer {layer!r} outputs {got}, which cannot be read as a spatial "
                         "map of the input (NCHW, NHWC or patch tokens); choose another layer "
                         "or set layout:")
    return layout


def default_layer(model: nn.Module, inputs: Tensor) -> str:
    """The layer Grad-CAM explains by default (the rule in this module's docstring), found
    with one forward and backward of ``inputs[:1]``."""
    size = tuple(inputs.shape[2:])
    units = repeated_units(model, inputs[:1])
    last_unit = units[-1] if units else None
    candidates = {name: module for name, module in model.named_modules()
                  if name and any(True for _ in module.parameters())
                  and ("." not in name or last_unit is not None
                       and (name == last_unit or name.startswith(last_unit + ".")))}
    finished: list[tuple[str, Tensor]] = []  # in order of completion

    def keep(name: str):
        def hook(module: nn.Module, args: object, output: object) -> object:
            if isinstance(output, Tensor) and output.requires_grad:
                finished.append((name, output))
                return output.clone()  # later in-place ops change the clone, not this
            return output
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in candidates.items()]
    training = [m.training for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad():
            x = inputs[:1].detach().clone().requires_grad_(True)
            logits = model(x)
            score = logits[0, logits[0].argmax()]
            grads = torch.autograd.grad(score, [x, *(out for _, out in finished)],
                                        allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in zip(model.modules(), training):
            module.training = mode
    if grads[0] is None or not grads[0].any():
        raise ModelError("the logits do not depend on the input (their gradient is zero: e.g. "
                         "torchvision's ViT starts with a zero head), so Grad-CAM has no layer "
                         "to explain and every gradient map is zero; load trained weights")
    for (name, output), grad in reversed(list(zip(finished, grads[1:]))):
        layout = spatial_layout(tuple(output.shape), size)
        if layout is None or grad is None:
            continue
        reached = to_nchw(grad, layout, size).abs().sum(dim=1) > 0
        if int(reached.sum()) > 1:
            return name
    raise ModelError(
        "no layer outputs a spatial feature map whose gradient reaches the logits, so Grad-CAM "
        "has no default layer; set the method's layer: to a dotted module path"
    )
