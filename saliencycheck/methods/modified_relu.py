"""Guided Backprop (Springenberg et al. 2015) and Deconvnet (Zeiler & Fergus 2014).

Both are the input gradient with a modified backward at every ReLU application, applied by
:class:`saliencycheck.relu_rules.ReluRuleMode` during the forward (functional calls and reused
modules included). A model without ReLU raises MethodError; other activations keep their plain
gradient and one :class:`ReluRuleWarning` per call says so.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from saliencycheck.errors import MethodError
from saliencycheck.methods.base import AttributionContext, check_call, input_gradients
from saliencycheck.methods.registry import register_method
from saliencycheck.relu_rules import ReluRuleMode, Rule


class ReluRuleWarning(UserWarning):
    """A modified-backward method met activations other than ReLU and left them unmodified."""


def modified_relu_gradients(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext, *,
    rule: Rule, name: str,
) -> Tensor:
    """Input gradient under ``rule`` at every ReLU, shape (N, C, H, W); ``name`` for messages."""
    check_call(model, inputs, targets, name)
    mode = ReluRuleMode(rule)
    grads = input_gradients(
        model, inputs, targets, chunk_size=context.chunk_size, forward_context=lambda: mode
    )
    report = mode.report()
    others = ", ".join(f"{act}×{n}" for act, n in sorted(report.other_activations.items()))
    if report.relu_calls == 0:
        found = f" (it applies {others})" if others else ""
        raise MethodError(
            f"{name}: the model applies no ReLU{found}, so the modified backward is undefined; "
            "use gradient or integrated_gradients instead"
        )
    if others:
        warnings.warn(
            f"{name}: the rule applies to ReLU only; other activations kept their plain "
            f"gradient ({others}, counted over all chunks)",
            ReluRuleWarning,
            stacklevel=3,
        )
    return grads


@register_method(
    "guided_backprop",
    description="gradient passing back only positive gradients through ReLUs with positive input",
)
def guided_backprop(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext
) -> Tensor:
    """Guided Backprop: at each ReLU, backward = grad.clamp(min=0) · (x > 0); (N, C, H, W)."""
    return modified_relu_gradients(
        model, inputs, targets, context, rule="guided", name="guided_backprop"
    )


@register_method(
    "deconvnet",
    description="gradient passing back only positive gradients through ReLUs, ignoring their input",
)
def deconvnet(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext
) -> Tensor:
    """Deconvnet: at each ReLU, backward = grad.clamp(min=0) whatever x was; (N, C, H, W)."""
    return modified_relu_gradients(
        model, inputs, targets, context, rule="deconvnet", name="deconvnet"
    )
