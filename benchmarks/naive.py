"""Contender 3, "naive bare compute": every method's passes on its own, no sharing.

What any tool pays without algorithmic savings: each method runs its own full forward and
backward passes (gradient and gradient×input each one pass over the images, integrated
gradients one pass per quadrature node, SmoothGrad one per noisy copy, guided backprop one with
the guided ReLU rule, Grad-CAM one to the feature layer), nothing is cached or shared between
methods or with the targets' forward. Rows (images × steps × samples) are batched up to the run's
``chunk_size`` per pass, the same limit saliencycheck uses, so the difference between this
contender and the "minimal" one is only what sharing and caching save. No metrics, no I/O.

The arithmetic follows saliencycheck's definitions (Gauss–Legendre nodes for IG, noise σ =
noise × (max − min) per image for SmoothGrad, ReLU(Σ α_k A_k) upsampled for Grad-CAM), so the
maps are the same, but nothing from ``saliencycheck.methods`` is called except the ReLU rule
mode, which only swaps the backward of ReLU calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saliencycheck.relu_rules import ReluRuleMode


def _target_score(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    return model(x).gather(1, targets[:, None].clone()).sum()


def input_gradients(model: nn.Module, rows: Tensor, targets: Tensor, *, chunk_size: int,
                    mode: Callable[[], AbstractContextManager] = nullcontext) -> Tensor:
    """∂ logit[target] / ∂ input of every row; one full forward + backward per chunk."""
    grads = []
    for x, t in zip(rows.split(chunk_size), targets.split(chunk_size)):
        x = x.detach().requires_grad_(True)
        with mode():
            score = _target_score(model, x, t)
        grads.append(torch.autograd.grad(score, x)[0])
    return torch.cat(grads)


def _pixel_stats(inputs: Tensor, mean: Sequence[float], std: Sequence[float]):
    shape = (1, -1, 1, 1)
    return (torch.tensor(mean, dtype=inputs.dtype, device=inputs.device).reshape(shape),
            torch.tensor(std, dtype=inputs.dtype, device=inputs.device).reshape(shape))


def integrated_gradients(model: nn.Module, inputs: Tensor, targets: Tensor, *, steps: int,
                         baseline: str, mean: Sequence[float], std: Sequence[float],
                         chunk_size: int) -> Tensor:
    """(x − x') · Σ_k w_k ∇f(x' + α_k (x − x')), Gauss–Legendre nodes; black/white baseline."""
    if baseline not in ("black", "white"):
        raise NotImplementedError(f"naive IG baseline {baseline!r}; the benchmark uses black")
    m, s = _pixel_stats(inputs, mean, std)
    reference = ((0.0 if baseline == "black" else 1.0) - m) / s
    reference = reference.expand_as(inputs)
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.as_tensor((nodes + 1) / 2, dtype=inputs.dtype, device=inputs.device)
    w = torch.as_tensor(weights / 2, dtype=inputs.dtype, device=inputs.device)
    n = inputs.shape[0]
    delta = inputs - reference
    # rows ordered image-major: row = image * steps + step
    points = (reference[:, None] + alphas[None, :, None, None, None] * delta[:, None])
    grads = input_gradients(model, points.reshape(n * steps, *inputs.shape[1:]),
                            targets.repeat_interleave(steps), chunk_size=chunk_size)
    grads = grads.reshape(n, steps, *inputs.shape[1:])
    return delta * (grads * w[None, :, None, None, None]).sum(dim=1)


def smoothgrad(model: nn.Module, inputs: Tensor, targets: Tensor, *, samples: int, noise: float,
               seed: int, chunk_size: int) -> Tensor:
    """Mean gradient over ``samples`` noisy copies, σ = noise × (max − min) of each image."""
    n = inputs.shape[0]
    flat = inputs.flatten(1)
    sigma = (noise * (flat.amax(1) - flat.amin(1))).reshape(n, 1, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, samples, *inputs.shape[1:]), generator=generator).to(inputs)
    rows = (inputs[:, None] + sigma * eps).reshape(n * samples, *inputs.shape[1:])
    grads = input_gradients(model, rows, targets.repeat_interleave(samples),
                            chunk_size=chunk_size)
    return grads.reshape(n, samples, *inputs.shape[1:]).mean(dim=1)


def gradcam(model: nn.Module, inputs: Tensor, targets: Tensor, *, layer: str,
            chunk_size: int) -> Tensor:
    """ReLU(Σ_k α_k A_k) at ``layer``, α the spatial mean gradient, upsampled; (N, 1, H, W)."""
    module = model.get_submodule(layer)
    maps = []
    captured: list[Tensor] = []
    for x, t in zip(inputs.split(chunk_size), targets.split(chunk_size)):
        captured.clear()
        handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            score = _target_score(model, x, t)
        finally:
            handle.remove()
        (activation,) = captured
        (grad,) = torch.autograd.grad(score, activation)
        cam = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True).clamp(min=0)
        maps.append(F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False))
    return torch.cat(maps).detach()


def naive_maps(methods: Sequence, model: nn.Module, inputs: Tensor, targets: Tensor, *,
               mean: Sequence[float], std: Sequence[float], seed: int,
               chunk_size: int) -> dict[str, Tensor]:
    """Raw maps of each method (saliencycheck ``ResolvedMethod`` entries: name and params)."""
    out = {}
    with torch.enable_grad():
        for method in methods:
            name, params = method.name, dict(method.params)
            if name == "gradient":
                out[method.label] = input_gradients(model, inputs, targets,
                                                    chunk_size=chunk_size)
            elif name == "gradient_x_input":
                out[method.label] = inputs * input_gradients(model, inputs, targets,
                                                             chunk_size=chunk_size)
            elif name == "integrated_gradients":
                out[method.label] = integrated_gradients(
                    model, inputs, targets, steps=params["steps"], baseline=params["baseline"],
                    mean=mean, std=std, chunk_size=chunk_size)
            elif name == "smoothgrad" and params.get("of", "gradient") == "gradient":
                out[method.label] = smoothgrad(model, inputs, targets, samples=params["samples"],
                                               noise=params["noise"], seed=seed,
                                               chunk_size=chunk_size)
            elif name == "guided_backprop":
                out[method.label] = input_gradients(
                    model, inputs, targets, chunk_size=chunk_size,
                    mode=lambda: ReluRuleMode("guided"))
            elif name == "gradcam":
                out[method.label] = gradcam(model, inputs, targets, layer=params["layer"],
                                            chunk_size=chunk_size)
            else:
                raise NotImplementedError(f"no naive implementation of {name!r}")
    return out
