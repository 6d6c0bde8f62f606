"""Integrated Gradients (Sundararajan et al. 2017) with Gauss–Legendre or Gauss–Lobatto
quadrature."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from saliencycheck.engine.passes import (
    GroupSum,
    GroupTotal,
    MethodPlan,
    Request,
    RowSource,
    planned_method,
)
from saliencycheck.methods.base import AttributionContext
from saliencycheck.methods.baselines import Baseline, make_baseline
from saliencycheck.methods.registry import MethodParams
from saliencycheck.sections import MAX_STEPS, at_most


class IntegratedGradientsParams(MethodParams):
    """Parameters of integrated_gradients (defaults: the original recipe)."""

    steps: int = Field(50, ge=1, description="quadrature nodes along the path (paper: 50)")
    baseline: Baseline = Field(
        "black",
        description="reference input: black/white (pixel 0/1), mean (per image and channel), "
        "blur (Gaussian-blurred input) or uniform (seeded U(0,1) pixels)",
    )
    blur_sigma: float = Field(5.0, gt=0, description="σ in pixels of the 'blur' baseline")
    rule: Literal["gauss_legendre", "gauss_lobatto"] = Field(
        "gauss_legendre",
        description="quadrature: gauss_legendre (exact to degree 2·steps−1, Captum's "
        "'gausslegendre') or gauss_lobatto (exact to degree 2·steps−3; its last node is the "
        "input itself, so those rows are shared with gradient and Grad-CAM; steps ≥ 2)",
    )

    @field_validator("steps")
    @classmethod
    def _few_steps(cls, steps: int) -> int:
        return at_most(steps, MAX_STEPS, typical="typical: 20 to 300; each step is a forward "
                       "and backward pass per image")

    @model_validator(mode="after")
    def _lobatto_needs_two_nodes(self) -> IntegratedGradientsParams:
        if self.rule == "gauss_lobatto" and self.steps < 2:
            raise ValueError("gauss_lobatto needs steps >= 2 (its nodes include both ends)")
        return self


def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α_k and weights w_k of the ``steps``-point Gauss–Legendre rule on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2


def gauss_lobatto(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (ascending, first 0 and last 1) and weights of the ``steps``-point Gauss–Lobatto
    rule on [0, 1]: interior nodes are the roots of P'_{n−1}, w_k = 2 / (n(n−1) P_{n−1}(x_k)²)
    on [−1, 1] (Abramowitz & Stegun 25.4.32)."""
    legendre = np.polynomial.legendre.Legendre.basis(steps - 1)
    nodes = np.concatenate([[-1.0], np.sort(legendre.deriv().roots().real), [1.0]])
    weights = 2.0 / (steps * (steps - 1) * legendre(nodes) ** 2)
    return (nodes + 1) / 2, weights / 2


def baseline_reference(inputs: Tensor, context: AttributionContext, *, baseline: Baseline,
                       blur_sigma: float, **_: object) -> Tensor:
    """Integrated gradients completes to f(x) − f(baseline) (Sundararajan et al. 2017)."""
    return make_baseline(baseline, inputs, context, blur_sigma=blur_sigma)


@planned_method(
    "integrated_gradients",
    params=IntegratedGradientsParams,
    description="path integral of the gradient from a baseline to the input, × (x − baseline)",
    reference=baseline_reference,
)
def integrated_gradients(
    model: nn.Module, source: RowSource, context: AttributionContext, *,
    steps: int, baseline: Baseline, blur_sigma: float, rule: str,
) -> MethodPlan:
    """``(x − x') · Σ_k w_k ∇f(x' + α_k (x − x'))``, shape (N, C, H, W).

    The integral over α ∈ [0, 1] uses the Gauss–Legendre rule with ``steps`` nodes, exact for
    integrands that are polynomials of degree < 2·steps; a left/right Riemann sum would give
    only (steps − 1)/steps of the exact value on a linear model. So on a linear model the
    attributions sum to f(x) − f(x') to float precision (completeness). The images × steps
    path points are built chunk by chunk inside the shared passes. With ``gauss_lobatto``
    the node α = 1 is the input itself: its rows are the images' own, shared with gradient,
    gradient × input and Grad-CAM (exact for degree ≤ 2·steps − 3 instead of 2·steps − 1).
    """
    alphas, weights = (gauss_lobatto if rule == "gauss_lobatto" else gauss_legendre)(steps)
    at_input = rule == "gauss_lobatto"  # the last node is α = 1: the images themselves
    path_nodes = steps - 1 if at_input else steps

    def reference(inputs: Tensor) -> Tensor:
        return make_baseline(baseline, inputs, context, blur_sigma=blur_sigma)

    def build(index: Tensor) -> tuple[Tensor, Tensor]:
        inputs, targets = source.build(index // path_nodes)
        alpha = torch.as_tensor(alphas, dtype=inputs.dtype, device=inputs.device)
        alpha = alpha[(index % path_nodes).to(inputs.device)].view(-1, 1, 1, 1)
        ref = reference(inputs)
        return ref + alpha * (inputs - ref), targets

    points = RowSource(key=("integrated_gradients", source.key, steps, baseline, blur_sigma,
                            context.seed, rule),
                       count=source.count * path_nodes, build=build)
    total = GroupTotal(count=source.count)
    requests = [Request("plain", points, GroupSum(total, path_nodes, weights[:path_nodes]),
                        "integrated_gradients")]
    if at_input:
        requests.append(Request("plain", source, GroupSum(total, 1, weights[-1:]),
                                "integrated_gradients"))

    def finish() -> Tensor:
        inputs, _ = source.build(torch.arange(source.count))
        return (inputs - reference(inputs)) * total.value

    return MethodPlan(requests, finish)
