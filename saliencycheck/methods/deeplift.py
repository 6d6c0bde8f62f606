"""DeepLIFT with the Rescale rule (Shrikumar et al. 2017), by call (see deeplift_rules).

``(x − x′) ⊙ m`` with ``m`` the input's multipliers: the product of every layer's, where each
nonlinearity call's multiplier is ``Δy / Δx`` against the same call on the baseline ``x′``. The
map sums to ``f(x) − f(x′)`` (summation-to-delta), which the completeness test checks. Batched:
the baseline's forward, then the input's forward and backward, per chunk of images.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from saliencycheck.deeplift_rules import ReferencePass, RescalePass
from saliencycheck.methods.base import (
    AttributionContext,
    check_call,
    model_logits,
    select_targets,
)
from saliencycheck.methods.baselines import Baseline, make_baseline
from saliencycheck.methods.integrated_gradients import baseline_reference
from saliencycheck.methods.registry import MethodParams, register_method


class DeepLiftParams(MethodParams):
    """Parameters of deeplift: its reference input, as integrated gradients'."""

    baseline: Baseline = Field(
        "black",
        description="reference input: black/white (pixel 0/1), mean (per image and channel), "
        "blur (Gaussian-blurred input) or uniform (seeded U(0,1) pixels)",
    )
    blur_sigma: float = Field(5.0, gt=0, description="σ in pixels of the 'blur' baseline")


@register_method("deeplift", params=DeepLiftParams, reference=baseline_reference,
                 description="DeepLIFT Rescale: (x − x′) times multipliers Δy/Δx at every "
                 "nonlinearity call")
def deeplift(model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext,
             *, baseline: str = "black", blur_sigma: float = 5.0) -> Tensor:
    """DeepLIFT-Rescale attributions, (N, C, H, W), summing to f(x) − f(x′) per image."""
    check_call(model, inputs, targets, "deeplift")
    references = make_baseline(baseline, inputs, context, blur_sigma=blur_sigma)
    maps = []
    for start in range(0, len(inputs), context.chunk_size):
        rows = slice(start, start + context.chunk_size)
        reference = ReferencePass()
        with torch.no_grad(), reference:
            model_logits(model, references[rows])
        x = inputs[rows].detach().clone().requires_grad_(True)
        rescale = RescalePass(reference)
        with torch.enable_grad():
            with rescale:
                score = select_targets(model_logits(model, x), targets[rows]).sum()
            rescale.finish()
            (multipliers,) = torch.autograd.grad(score, x)
        maps.append((x.detach() - references[rows]) * multipliers)
    return torch.cat(maps)
