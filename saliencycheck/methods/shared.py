"""Compute several methods' maps for one model and batch: the executor's single entry point."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from saliencycheck.methods.base import AttributionContext
from saliencycheck.methods.registry import ResolvedMethod


def compute_maps(
    methods: Sequence[ResolvedMethod],
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    context: AttributionContext,
) -> dict[str, Tensor]:
    """Raw maps of every method, keyed by label: ``{label: (N, C or 1, H, W)}``."""
    return {method.label: method(model, inputs, targets, context) for method in methods}
