"""Reference inputs ("baselines") for Integrated Gradients, in the model's normalised space."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from saliencycheck.methods.base import AttributionContext, normalise

Baseline = Literal["black", "white", "mean", "blur", "uniform"]


def make_baseline(
    kind: Baseline, inputs: Tensor, context: AttributionContext, *, blur_sigma: float
) -> Tensor:
    """The baseline for each image, shape of ``inputs`` (N, C, H, W).

    black / white: pixel value 0 / 1 in every channel, normalised with ``context``'s mean/std.
    mean: each image's per-channel mean. blur: each image blurred with a Gaussian of
    ``blur_sigma`` pixels (kernel truncated at 3σ, and to the image size; reflect padding).
    uniform: U(0, 1) pixels (float32 on the CPU, then cast) from a generator seeded with
    ``context.seed``, normalised; one pattern shared by all images, so an image's map does not
    depend on its batch.
    """
    if kind in ("black", "white"):
        pixels = torch.full_like(inputs[:1], 0.0 if kind == "black" else 1.0)
        return normalise(pixels, context).expand_as(inputs)
    if kind == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if kind == "blur":
        radius = min(math.ceil(3 * blur_sigma), min(inputs.shape[2:]) - 1)
        return gaussian_blur(inputs, kernel_size=2 * radius + 1, sigma=blur_sigma)
    generator = torch.Generator().manual_seed(context.seed)
    pixels = torch.rand(inputs.shape[1:], generator=generator).to(inputs)
    return normalise(pixels[None], context).expand_as(inputs)
