"""The random-map control: what a map that explains nothing scores on parameter randomization.

Binder et al. (CVPR 2023) showed that model-parameter randomization rewards maps that merely
change: an uninformative map of fresh noise scores *best* on it. So next to the methods, a
control "method" (``random_map`` in the method column) is scored in the cascading and
independent tests: a map of seeded U(0, 1) noise per image, one channel, re-drawn for every
model state, scored against its own draw for the trained model exactly like a method's maps.
A method's similarity near the control's says the test cannot tell it from noise; verdict
rules may demand a margin above it (``max_above_control``).

Each draw is seeded by the run's seed, the image's place in the run's image list and the model
state (never by position in a batch), so shards, image groups and resumed runs draw the same
noise, and images given as files or as tensors the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saliencycheck.checks.base import (
    TRAINED,
    Check,
    Engine,
    Group,
    StageRef,
    image_places,
    register_check,
    seeded_per_image,
)
from saliencycheck.metrics import ReferenceScorer
from saliencycheck.results import RANDOM_MAP


def control_maps(images: list[int], state: str, size: tuple[int, int], *, seed: int,
                 device: torch.device) -> Tensor:
    """(N, 1, H, W) U(0, 1) noise, row i drawn from (seed, ``images[i]``, state)."""
    return seeded_per_image(images, lambda image: f"random_map/{image}/{state}", (1, *size),
                            seed=seed, device=device, draw=torch.rand)


def controlled(check: Check) -> bool:
    """Whether ``check`` scores the control: the model-parameter randomization tests."""
    return check.randomizes and check.against_floor


@register_check
class RandomMap(Check):
    name = RANDOM_MAP
    title = "random-map control"
    description = ("Score a map of seeded uniform noise, re-drawn for every model state, like a "
                   "method in the cascading and independent tests (method column "
                   "'random_map'): the score of a map that explains nothing (Binder et al. "
                   "2023); thresholds may demand max_above_control.")
    baseline = True
    default_on = True
    thresholds = False

    def validate(self, config: Any) -> None:
        """The control's label is its own."""
        labels = [m if isinstance(m, str) else m.label or m.name for m in config.methods]
        if config.baselines.random_map and RANDOM_MAP in labels:
            raise ValueError(f"methods[{labels.index(RANDOM_MAP)}]: the label {RANDOM_MAP!r} "
                             "names the random-map control; choose another label or set "
                             "baselines.random_map: false")

    def score(self, engine: Engine, group: Group) -> None:
        """The control's rows in each model-parameter randomization test's stages."""
        setup = engine.setup
        tests = [check for check in setup.checks if controlled(check)]
        if not tests:
            return
        seed, size = setup.config.runtime.seed, tuple(group.inputs.shape[2:])
        images = image_places(setup, group.ids)

        def draw(state: str) -> Tensor:
            return control_maps(images, state, size, seed=seed, device=group.inputs.device)

        trained = draw(TRAINED)
        scorer = ReferenceScorer(trained, setup.config.metrics, setup.post)
        for check in tests:
            if check.identity_row:
                engine.record(check.name, 0, TRAINED, group.ids, group.targets, group.targets,
                              {}, {RANDOM_MAP: scorer.score(trained)})
            for ref in check.refs(setup):
                engine.record(check.name, ref.stage.index, ref.stage.name, group.ids,
                              group.targets, group.targets, {},
                              {RANDOM_MAP: scorer.score(draw(_state(ref)))}, repeat=ref.repeat)


def _state(ref: StageRef) -> str:
    return f"{ref.test}/{ref.stage.index}/{ref.repeat}"
