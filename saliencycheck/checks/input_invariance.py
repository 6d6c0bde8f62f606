"""Input invariance (Kindermans et al. 2017): shift the input, compensate it in the first layer.

The compensated model computes the same function of the original image, so a reliable map
does not change; ``saliencycheck.invariance`` builds the compensation and the run checks that
the logits indeed stayed (else the test is invalid, not failed).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from saliencycheck.checks.base import TRAINED, Check, Engine, Group, register_check
from saliencycheck.invariance import compensated, compensation_failure, first_layer, pixel_shift
from saliencycheck.randomization import logit_change
from saliencycheck.sections import Section

INVARIANCE_STAGE = "shifted_input"


class InputInvarianceConfig(Section):
    enabled: bool = Field(
        False, description="Input invariance (Kindermans et al. 2017): add a constant to every "
        "pixel, compensate it in the first layer so the logits stay unchanged (checked), and "
        "compare the maps; a reliable method's map does not change.",
    )
    shift: float = Field(
        -1.0, description="The constant added to every pixel, in the image's [0, 1] scale "
        "before normalisation (Kindermans et al.: -1, MNIST moved from [0, 1] to [-1, 0]).",
    )

    @field_validator("shift")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("a shift of 0 changes nothing; give a nonzero constant, e.g. -1")
        return value


@register_check
class InputInvariance(Check):
    name = "input_invariance"
    title = "input invariance (shifted input, first layer compensating)"
    section = InputInvarianceConfig
    description = "Input invariance test."
    higher_is_better = True
    has_validity = True
    identity_row = True
    figure = "bars"

    def plan(self, model: nn.Module, example: Tensor, config: Any) -> str:
        """The first layer, which compensates the shift."""
        return first_layer(model, example)

    def stage_names(self, setup: Any) -> list[str]:
        return [TRAINED, INVARIANCE_STAGE]

    def steps(self, setup: Any) -> float:
        return 1

    def score(self, engine: Engine, group: Group) -> None:
        """Maps of the shifted input on the model whose first layer undoes the shift, against
        the trained maps; how far the logits moved is stored (they must not)."""
        super().score(engine, group)
        setup = engine.setup
        inputs = group.inputs
        shift = pixel_shift(setup.config.tests.input_invariance.shift, setup.preprocessing.std,
                            inputs)
        shifted = inputs + shift
        with compensated(engine.model(), setup.plans[self.name], shift) as model:
            with torch.no_grad():
                moved = model(shifted)
            maps = engine.maps(model, shifted, group.targets)
        change = logit_change(group.logits, moved)
        engine.observe(self.name, 1, len(group.ids), change)
        failure = compensation_failure(change["relative_l2"])
        engine.record(self.name, 1, INVARIANCE_STAGE, group.ids, group.targets, group.targets,
                      maps, group.score(maps), note=failure and f"invalid test: {failure}")

    def validity(self, setup: Any, context: dict, observations: list) -> dict:
        """Whether the first layer kept the logits of the shifted input."""
        seen = [o for o in observations if o.test == self.name]
        n = sum(o.n for o in seen)
        change = sum(o.relative_l2_sum for o in seen) / n if n else float("nan")
        reason = compensation_failure(change)
        return {"layer": setup.plans[self.name],
                "shift": setup.config.tests.input_invariance.shift,
                "logit_relative_l2": change, "valid": not reason, "reason": reason}
