"""Guided Backprop (Springenberg et al. 2015) and Deconvnet (Zeiler & Fergus 2014).

Both are the input gradient with a modified backward at every ReLU application, applied by
:class:`saliencycheck.relu_rules.ReluRuleMode` during the forward (functional calls and reused
modules included). A model without ReLU raises MethodError; other activations keep their plain
gradient and one :class:`~saliencycheck.engine.passes.ReluRuleWarning` per call says so.
``nonlinearity_rule: gelu_as_relu`` (opt-in, an extension with no published definition) rules
GELU and SiLU as ReLUs too; the default label then says so (``guided_backprop_gelu_as_relu``).
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from saliencycheck.engine.passes import (
    MethodPlan,
    Request,
    RowSource,
    input_gradient_maps,
    planned_method,
    ruled_family,
)
from saliencycheck.methods.base import AttributionContext
from saliencycheck.methods.registry import MethodParams
from saliencycheck.relu_rules import NonlinearityRule


class GuidedParams(MethodParams):
    """Parameters of the methods with a modified ReLU backward."""

    nonlinearity_rule: NonlinearityRule = Field(
        "relu_only",
        description="relu_only: the rule at ReLU/ReLU6 calls only, as published (a model with "
        "none on the input's path is refused); gelu_as_relu: also at GELU and SiLU (positive "
        "gradient passed back where their input is positive), an extension with no published "
        "definition, labelled in the results (default label <name>_gelu_as_relu)",
    )

    def default_label(self, name: str) -> str:
        return name if self.nonlinearity_rule == "relu_only" else \
            f"{name}_{self.nonlinearity_rule}"


@planned_method(
    "guided_backprop",
    params=GuidedParams,
    description="gradient passing back only positive gradients through ReLUs with positive input",
)
def guided_backprop(
    model: nn.Module, source: RowSource, context: AttributionContext, *,
    nonlinearity_rule: NonlinearityRule = "relu_only",
) -> MethodPlan:
    """Guided Backprop: at each ReLU, backward = grad.clamp(min=0) · (x > 0); (N, C, H, W)."""
    maps = input_gradient_maps(source.count)
    return MethodPlan([Request(ruled_family("guided", nonlinearity_rule), source, maps,
                               "guided_backprop")], maps.result)


@planned_method(
    "deconvnet",
    params=GuidedParams,
    description="gradient passing back only positive gradients through ReLUs, ignoring their input",
)
def deconvnet(model: nn.Module, source: RowSource, context: AttributionContext, *,
              nonlinearity_rule: NonlinearityRule = "relu_only") -> MethodPlan:
    """Deconvnet: at each ReLU, backward = grad.clamp(min=0) whatever x was; (N, C, H, W)."""
    maps = input_gradient_maps(source.count)
    return MethodPlan([Request(ruled_family("deconvnet", nonlinearity_rule), source, maps,
                               "deconvnet")], maps.result)
