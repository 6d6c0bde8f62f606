"""Guided Backprop (Springenberg et al. 2015) and Deconvnet (Zeiler & Fergus 2014).

Both are the input gradient with a modified backward at every ReLU application, applied by
:class:`saliencycheck.relu_rules.ReluRuleMode` during the forward (functional calls and reused
modules included). A model without ReLU raises MethodError; other activations keep their plain
gradient and one :class:`~saliencycheck.engine.passes.ReluRuleWarning` per call says so.
"""

from __future__ import annotations

from torch import nn

from saliencycheck.engine.passes import (
    MethodPlan,
    Request,
    RowSource,
    input_gradient_maps,
    planned_method,
)
from saliencycheck.methods.base import AttributionContext


@planned_method(
    "guided_backprop",
    description="gradient passing back only positive gradients through ReLUs with positive input",
)
def guided_backprop(
    model: nn.Module, source: RowSource, context: AttributionContext
) -> MethodPlan:
    """Guided Backprop: at each ReLU, backward = grad.clamp(min=0) · (x > 0); (N, C, H, W)."""
    maps = input_gradient_maps(source.count)
    return MethodPlan([Request("guided", source, maps, "guided_backprop")], maps.result)


@planned_method(
    "deconvnet",
    description="gradient passing back only positive gradients through ReLUs, ignoring their input",
)
def deconvnet(model: nn.Module, source: RowSource, context: AttributionContext) -> MethodPlan:
    """Deconvnet: at each ReLU, backward = grad.clamp(min=0) whatever x was; (N, C, H, W)."""
    maps = input_gradient_maps(source.count)
    return MethodPlan([Request("deconvnet", source, maps, "deconvnet")], maps.result)
