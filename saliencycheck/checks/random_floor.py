"""The random-network floor: how alike the maps of two unrelated networks already are.

Two copies of the model, every parameter randomized with different seeds, are scored against
each other: the similarity a method keeps with *any* network of this architecture (its
architectural prior, Binder et al. 2023). Every plain-map score is shown next to it (Δ), and a
threshold may be set above it (``max_above_floor``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from saliencycheck.checks.base import (
    REPEAT_SEED_STEP,
    Check,
    Engine,
    Group,
    StageRef,
    View,
    mean_cell,
    method_table,
    register_check,
)
from saliencycheck.metrics import ReferenceScorer
from saliencycheck.randomization import Stage, find_blocks
from saliencycheck.results import FLOOR_TEST

FLOOR_STAGE = "random_vs_random"


def floor_seeds(seed: int, repeats: int) -> list[tuple[int, int]]:
    """The seeds of the two fully random copies, per repeat."""
    return [(seed + REPEAT_SEED_STEP * r + 1, seed + REPEAT_SEED_STEP * r + 2)
            for r in range(repeats)]


@register_check
class RandomFloor(Check):
    name = FLOOR_TEST
    title = "random-network floor"
    description = ("Score the maps of two independently, fully randomized copies of the model "
                   "(seeds runtime.seed+1 and +2) against each other: the similarity an "
                   "unrelated network of the same architecture already has, shown next to every "
                   "score.")
    baseline = True
    default_on = True
    thresholds = False
    shares_passes = True

    def plan(self, model: nn.Module, example: Tensor, config: Any) -> Stage:
        """One model state with every parameter randomized."""
        every = find_blocks(model, example, granularity="layer")
        return Stage(index=1, name=FLOOR_STAGE, randomized_blocks=tuple(every),
                     fraction_randomized=1.0)

    def refs(self, setup: Any) -> list[StageRef]:
        """The two copies of each repeat, in pairs."""
        stage = setup.plans[self.name]
        return [StageRef(self.name, stage, seed=k, repeat=r)
                for r, pair in enumerate(floor_seeds(setup.config.runtime.seed,
                                                     setup.config.runtime.repeats))
                for k in pair]

    def score(self, engine: Engine, group: Group) -> None:
        """One copy's maps against the other's; the class recorded is the first copy's (it
        differs from the target only with 'recompute', where each explains its own)."""
        setup = engine.setup
        pairs = zip(group.states[::2], group.states[1::2])
        for (ref, explained, first), (_, _, second) in pairs:
            scores = {label: ReferenceScorer(first[label], setup.config.metrics, setup.post)
                      .score(second[label]) for label in first}
            engine.record(self.name, 1, FLOOR_STAGE, group.ids, group.targets, explained, {},
                          scores, repeat=ref.repeat)

    def direction(self, metric: str, stage: str) -> int:
        return 0  # a reference, not a judgement

    def table(self, view: View) -> Any:
        rows = view.rows(self.name)
        if not rows:
            return None
        return method_table(view, "random-network floor: two fully random copies of the model "
                            "scored against each other (a score near it means unrelated), "
                            "mean over images", mean_cell(rows))
