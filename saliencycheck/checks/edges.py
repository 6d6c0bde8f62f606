"""The edge-detector baseline: how much a method's maps look like the input's edges.

Adebayo et al. (2018) showed maps that survive randomization resemble an edge detector's
output; each method's trained-model maps are scored against the input's Sobel magnitude.
"""

from __future__ import annotations

from typing import Any

from saliencycheck.checks.base import (
    Check,
    Engine,
    Group,
    View,
    mean_cell,
    method_table,
    register_check,
)
from saliencycheck.postprocess import sobel_magnitude

EDGE_STAGE = "sobel_edges"


@register_check
class EdgeSimilarity(Check):
    name = "edge_similarity"
    key = "edges"
    title = "edge-detector similarity"
    description = ("Score each method's trained-model map against a Sobel edge map of the "
                   "input: how much the method behaves like an edge detector.")
    baseline = True
    default_on = True
    thresholds = False

    def score(self, engine: Engine, group: Group) -> None:
        """The trained maps against the input's Sobel magnitude, spread over the map's
        channels (the views sum them)."""
        edges = sobel_magnitude(group.inputs)
        scores = {}
        for label, scorer in group.scorers.items():
            channels = scorer.shape[1]
            scores[label] = scorer.score(edges.expand(-1, channels, -1, -1) / channels)
        engine.record(self.name, 1, EDGE_STAGE, group.ids, group.targets, group.targets, {},
                      scores)

    def direction(self, metric: str, stage: str) -> int:
        return 0  # a reference, not a judgement

    def table(self, view: View) -> Any:
        rows = view.rows(self.name)
        if not rows:
            return None
        return method_table(view, "edge-detector similarity: the trained model's maps against "
                            "the input's Sobel edges, mean over images", mean_cell(rows))
