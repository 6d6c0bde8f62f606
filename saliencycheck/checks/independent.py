"""Independent model-parameter randomization (Adebayo et al. 2018, §3.1).

One block at a time is randomized, the rest of the model kept trained: which layers a method's
maps depend on, block by block, without the cascade's accumulation.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from saliencycheck.checks.base import Check, randomization_plan, register_check
from saliencycheck.randomization import Stage
from saliencycheck.sections import Granularity, Order, Section


class IndependentConfig(Section):
    enabled: bool = Field(False, description="Run independent (one block at a time) randomization.")
    granularity: Granularity = Field("block", description="As for cascading.")
    order: Order = Field("top_down", description="Order of stages.")
    blocks: list[str] | None = Field(
        None, min_length=1,
        description="Randomize only these blocks: names or globs (e.g. ['layer4.*', 'fc']) "
        "matched against the blocks of `granularity` (`saliencycheck validate` lists them), "
        "kept in model order; default: every block.",
    )


@register_check
class Independent(Check):
    name = "independent"
    title = "independent randomization"
    section = IndependentConfig
    description = "Independent test."
    against_floor = True
    shares_passes = True
    randomizes = True
    identity_row = True
    figure = "curves"

    def plan(self, model: nn.Module, example: Tensor, config: Any) -> list[Stage]:
        return randomization_plan(model, example, config.tests.independent, test=self.name,
                                  field=f"tests.{self.name}")
