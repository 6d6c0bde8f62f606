"""Cascading model-parameter randomization (Adebayo et al. 2018, §3.1).

The model's blocks are randomized one after another, from the logits toward the input
(``top_down``, the paper's order) or the reverse, each stage keeping the blocks randomized
before it; the maps of every stage are scored against the trained model's. A method whose
maps keep resembling the trained ones after the weights are gone does not explain the model.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from saliencycheck.checks.base import Check, randomization_plan, register_check
from saliencycheck.randomization import Stage
from saliencycheck.sections import Granularity, Order, Section


class CascadingConfig(Section):
    enabled: bool = Field(True, description="Run cascading model-parameter randomization.")
    granularity: Granularity = Field(
        "block",
        description=(
            "'block': the model's top-level children, containers expanded one level "
            "(Inception-v3 gives the paper's 17 blocks); 'layer': every module with parameters."
        ),
    )
    order: Order = Field(
        "top_down", description="Randomize from the logits toward the input, or the reverse."
    )
    blocks: list[str] | None = Field(
        None, min_length=1,
        description="Randomize only these blocks: names or globs (e.g. ['layer4.*', 'fc']) "
        "matched against the blocks of `granularity` (`saliencycheck validate` lists them), "
        "kept in model order; default: every block.",
    )


@register_check
class Cascading(Check):
    name = "cascading"
    title = "cascading randomization"
    section = CascadingConfig
    description = "Cascading test."
    against_floor = True
    shares_passes = True
    randomizes = True
    cumulative = True
    identity_row = True
    figure = "curves"

    def plan(self, model: nn.Module, example: Tensor, config: Any) -> list[Stage]:
        return randomization_plan(model, example, config.tests.cascading, test=self.name,
                                  field=f"tests.{self.name}")
