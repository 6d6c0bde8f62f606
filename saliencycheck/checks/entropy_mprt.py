"""Efficient MPRT (eMPRT, Hedström et al. 2023): how much a map's complexity rises.

Instead of a similarity between two maps, each map's histogram entropy is compared between
the trained and the fully randomized model: a map that explains the model concentrates its
mass, randomizing the model scatters it, so the relative rise of the entropy is the score
(higher: more sensitive). The randomized model is the cascade's last stage, shared with the
cascading test's passes when it runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import Field
from rich.table import Table
from torch import Tensor, nn

from saliencycheck.checks.base import TRAINED, Check, Engine, Group, View, fmt, register_check
from saliencycheck.complexity import ENTROPY, ENTROPY_RISE, entropy_rise, histogram_entropy
from saliencycheck.metrics import Scores
from saliencycheck.postprocess import reduce_channels
from saliencycheck.randomization import Stage, find_blocks, plan_stages
from saliencycheck.sections import Section

ENTROPY_STAGE = "fully_randomized"


class EntropyMprtConfig(Section):
    enabled: bool = Field(
        False, description="Efficient MPRT (eMPRT, Hedström et al. 2023): the relative rise "
        "of each map's histogram entropy from the trained to the fully randomized model "
        "(higher: more sensitive). Two model states, so no order applies; the randomized "
        "model is the cascading test's last stage, shared when cascading runs.",
    )
    bins: int = Field(100, ge=2, description="Equal-width histogram bins per map.")


@register_check
class EntropyMprt(Check):
    name = "entropy_mprt"
    title = "efficient MPRT (relative rise of histogram entropy)"
    section = EntropyMprtConfig
    description = "Efficient (entropy) MPRT test."
    judged_metrics = (ENTROPY_RISE,)
    higher_is_better = True
    shares_passes = True
    randomizes = True
    figure = "bars"
    ylabel = "rise over the trained map's entropy"

    def plan(self, model: nn.Module, example: Tensor, config: Any) -> list[Stage]:
        """The cascade's last model (its granularity), so the passes can be shared."""
        blocks = find_blocks(model, example, granularity=config.tests.cascading.granularity)
        final = plan_stages(blocks, model=model, test="cascading")[-1]
        return [replace(final, index=1, name=ENTROPY_STAGE)]

    def score(self, engine: Engine, group: Group) -> None:
        """The trained maps' entropy (stage 0), then each randomized model's and its rise."""
        if not group.states:
            return
        count = len(group.ids)
        trained = self.entropies(engine.setup, group.trained)
        engine.record(self.name, 0, TRAINED, group.ids, group.targets, group.targets,
                      group.trained, {label: {ENTROPY: Scores(h, ("",) * count)}
                                      for label, h in trained.items()})
        for ref, explained, maps in group.states:
            scores = {label: {ENTROPY: Scores(h, ("",) * count),
                              ENTROPY_RISE: entropy_rise(trained[label], h)}
                      for label, h in self.entropies(engine.setup, maps).items()}
            engine.record(self.name, ref.stage.index, ref.stage.name, group.ids, group.targets,
                          explained, maps, scores, repeat=ref.repeat)

    def entropies(self, setup: Any, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each map's histogram entropy of its channel-reduced values."""
        return {label: histogram_entropy(reduce_channels(m, setup.post.abs_reduction),
                                         setup.config.tests.entropy_mprt.bins)
                for label, m in maps.items()}

    def direction(self, metric: str, stage: str) -> int:
        """The raw entropies describe; the rise is judged (a fall is a regression)."""
        return 0 if metric == ENTROPY else -1

    def table(self, view: View) -> Table | None:
        """Each method's entropy on the trained and the fully randomized model, and the rise."""
        if view.final is None:
            return None
        rows = {(s.method, s.stage_index, s.metric): s.mean for s in view.summary
                if s.test == self.name}
        table = Table(title=f"{self.name}: histogram entropy of the maps (nats), mean over "
                            "images", title_justify="left")
        for column in ("method", "trained", "fully randomized", "relative rise"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method in view.methods:
            table.add_row(method, *[fmt(rows.get(key, float("nan"))) for key in (
                (method, 0, ENTROPY), (method, 1, ENTROPY), (method, 1, ENTROPY_RISE))])
        return table
