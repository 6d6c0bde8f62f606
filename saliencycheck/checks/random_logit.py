"""The random logit test (Sixt et al. 2020): does the map depend on the class explained?

The map for the explained class is compared with the map for another class drawn at random:
a method whose maps stay the same explains the image, not the model's decision.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from saliencycheck.checks.base import (
    REPEAT_SEED_STEP,
    TRAINED,
    Check,
    Engine,
    Group,
    register_check,
)
from saliencycheck.errors import MethodError
from saliencycheck.randomization import block_seed
from saliencycheck.sections import Section

LOGIT_STAGE = "random_class"


class RandomLogitConfig(Section):
    enabled: bool = Field(
        False, description="Random logit test (Sixt et al. 2020): the map for the explained "
        "class against the map for another class drawn at random (seeded per image).",
    )


@register_check
class RandomLogit(Check):
    name = "random_logit"
    title = "random logit (the explained class, a random other class)"
    section = RandomLogitConfig
    description = "Random logit test."
    against_floor = True
    identity_row = True
    figure = "bars"

    def stage_names(self, setup: Any) -> list[str]:
        return [TRAINED, LOGIT_STAGE]

    def steps(self, setup: Any) -> float:
        return 1

    def score(self, engine: Engine, group: Group) -> None:
        """Maps for a random other class (drawn per image from a generator seeded by the
        repeat's seed and the image id, so batching cannot change it) against the explained
        class's; one draw per ``runtime.repeats`` (seeds seed, seed+1000, ...)."""
        super().score(engine, group)
        classes = group.logits.shape[1]
        if classes < 2:
            raise MethodError("random_logit: the model has one output; there is no other "
                              "class to explain")
        runtime = engine.setup.config.runtime
        model = engine.model()
        targets = group.targets
        for repeat in range(runtime.repeats):
            seed = runtime.seed + REPEAT_SEED_STEP * repeat
            shifts = [int(torch.randint(1, classes, (1,), generator=torch.Generator()
                                        .manual_seed(block_seed(seed, image))))
                      for image in group.ids]
            others = (targets + torch.tensor(shifts, device=targets.device)) % classes
            maps = engine.maps(model, group.inputs, others)
            engine.record(self.name, 1, LOGIT_STAGE, group.ids, targets, others, maps,
                          group.score(maps), repeat=repeat)
