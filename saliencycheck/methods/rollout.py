"""Attention rollout (Abnar & Zuidema 2020) and gradient rollout (Chefer et al. 2021).

Both follow how attention mixes the tokens layer by layer, from the class token the head reads
back to the patches, for transformers built on ``nn.MultiheadAttention`` (torchvision's ViT).
torchvision calls its attention with ``need_weights=False`` (the fused kernel never forms the
weights), so while a method runs every ``nn.MultiheadAttention`` call is asked for its per-head
weights through forward hooks that are removed afterwards; the model is not changed.

* ``attention_rollout``: ``R = Â_L ⋯ Â_1`` with ``Â = (A + I) / 2`` row-normalised and ``A``
  the heads' mean (or max, min): the map does not depend on the class explained, nor on the
  head's weights, which is what the random-logit and cascading tests show.
* ``gradient_rollout``: ``R ← R + Ā R`` from ``R = I``, with ``Ā = E_h[(∇A ⊙ A)⁺]``, the
  attention weighted by the gradient of the explained logit (Chefer et al., "Generic
  Attention-model Explainability", eq. 5–6).

The class token's row of ``R`` over the patch tokens, on the patch grid, is upsampled
bilinearly to the input like Grad-CAM: shape (N, 1, H, W). The products are formed in at least
fp32, in chunks of at most :data:`ROLLOUT_CHUNK` images (every layer's weights are kept:
ViT-B/16 holds 22 MB per image).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from saliencycheck.errors import MethodError
from saliencycheck.methods.base import AttributionContext, check_call
from saliencycheck.methods.layers import token_grid
from saliencycheck.methods.registry import MethodParams, register_method

ROLLOUT_CHUNK = 16
_NEED_WEIGHTS, _AVERAGE = 4, 6  # positions in MultiheadAttention.forward's signature


@contextmanager
def attention_weights(model: nn.Module) -> Iterator[list[Tensor]]:
    """Inside, every ``nn.MultiheadAttention`` call of ``model`` computes and keeps its
    per-head weights, (N, heads, T, T), in call order."""
    kept: list[Tensor] = []

    def ask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for position, name in ((_NEED_WEIGHTS, "need_weights"),
                               (_AVERAGE, "average_attn_weights")):
            value = name == "need_weights"
            if len(args) > position:
                args[position] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def keep(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        kept.append(output[1])

    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not attentions:
        raise MethodError("the model has no nn.MultiheadAttention (rollout follows its "
                          "attention weights; Swin's windowed attention is not one); use "
                          "gradient or gradcam")
    handles = [h for m in attentions for h in (
        m.register_forward_pre_hook(ask, with_kwargs=True),
        m.register_forward_hook(keep, with_kwargs=True))]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def _patch_map(rollout: Tensor, size: tuple[int, int]) -> Tensor:
    """The class token's row of ``rollout`` (N, T, T) over the patches, upsampled."""
    grid = token_grid(rollout.shape[-1], size)
    if grid is None or grid[0] == 0:
        raise MethodError(f"rollout: {rollout.shape[-1]} tokens are no class token followed "
                          f"by patches on the grid of a {size[0]}x{size[1]} input")
    drop, h, w = grid
    patches = rollout[:, 0, drop:].reshape(len(rollout), 1, h, w)
    return F.interpolate(patches, size=size, mode="bilinear", align_corners=False)


def _wide(weights: Tensor) -> Tensor:
    """At least float32: a product over every layer is no place for half precision."""
    return weights.to(torch.promote_types(weights.dtype, torch.float32))


def _chunks(inputs: Tensor, targets: Tensor, context: AttributionContext
            ) -> Iterator[tuple[Tensor, Tensor]]:
    size = max(1, min(context.chunk_size, ROLLOUT_CHUNK))
    for start in range(0, len(inputs), size):
        yield inputs[start:start + size], targets[start:start + size]


class AttentionRolloutParams(MethodParams):
    head_fusion: Literal["mean", "max", "min"] = Field(
        "mean", description="how each layer's heads are combined (Abnar & Zuidema: mean)")


@register_method("attention_rollout", params=AttentionRolloutParams,
                 description="product of the layers' attention (+ identity), class token row")
def attention_rollout(model: nn.Module, inputs: Tensor, targets: Tensor,
                      context: AttributionContext, *, head_fusion: str = "mean") -> Tensor:
    """``R = Â_L ⋯ Â_1``, ``Â = rownorm((A + I) / 2)``; independent of ``targets``."""
    check_call(model, inputs, targets, "attention_rollout")
    maps = []
    for x, _ in _chunks(inputs, targets, context):
        with attention_weights(model) as kept, torch.no_grad():
            model(x)
        rollout = None
        for weights in kept:
            fused = getattr(_wide(weights), head_fusion)(dim=1)
            fused = fused.values if head_fusion != "mean" else fused
            step = 0.5 * fused + 0.5 * torch.eye(fused.shape[-1], device=fused.device,
                                                 dtype=fused.dtype)
            step = step / step.sum(dim=-1, keepdim=True)
            rollout = step if rollout is None else step @ rollout
        maps.append(_patch_map(rollout, tuple(inputs.shape[2:])))
    return torch.cat(maps).to(inputs.dtype)


@register_method("gradient_rollout", description="rollout of the gradient-weighted, positive "
                 "attention (Chefer et al. 2021)")
def gradient_rollout(model: nn.Module, inputs: Tensor, targets: Tensor,
                     context: AttributionContext) -> Tensor:
    """``R ← R + Ā R`` from ``R = I``, ``Ā = E_h[(∂ logit[target]/∂A ⊙ A)⁺]``."""
    check_call(model, inputs, targets, "gradient_rollout")
    maps = []
    for x, t in _chunks(inputs, targets, context):
        with attention_weights(model) as kept, torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            # MultiheadAttention returns a reshaped view of the weights it multiplied the
            # values with: the gradient is taken at that tensor, its base
            used = [w._base if w._base is not None else w for w in kept]
            grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), used,
                                        allow_unused=True)
        if any(grad is None for grad in grads):
            raise MethodError("gradient_rollout: the attention weights this torch version "
                              "returns are not those its attention used; use "
                              "attention_rollout or gradcam")
        grads = [grad.reshape(weights.shape) for grad, weights in zip(grads, kept)]
        rollout = None
        for weights, grad in zip(kept, grads):
            relevance = _wide((grad * weights).clamp(min=0).mean(dim=1).detach())
            if rollout is None:
                rollout = torch.eye(relevance.shape[-1], device=relevance.device,
                                    dtype=relevance.dtype).expand_as(relevance).clone()
            rollout = rollout + relevance @ rollout
        maps.append(_patch_map(rollout, tuple(inputs.shape[2:])))
    return torch.cat(maps).to(inputs.dtype)
