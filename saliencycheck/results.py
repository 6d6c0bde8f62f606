"""The rows a run produces, shared by the runner that stores them, the report that tabulates
them and the verdicts that judge them (none of which imports another for them).

``ScoreRow`` is one line of report.csv, ``StageObservation`` what a unit saw of each stage's
logits (pooled into stages.csv), ``SummaryRow`` one line of summary.csv. The field tuples are
the CSV columns, in order: a public contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CI_LEVEL = 0.95  # the default confidence level of every interval (runtime.ci_level)
FLOOR_TEST = "random_floor"  # the rows of the random-network floor, read beside every score
COSINE_SIMILARITY = "cosine_similarity"  # the CSC test's score (saliencycheck.checks.csc)
RANDOM_MAP = "random_map"  # the random-map control's label in the method column
ROW_FIELDS = ("image", "target", "target_explained", "method", "test", "stage_index", "stage",
              "metric", "value", "note", "repeat")


@dataclass(frozen=True)
class ScoreRow:
    """One similarity score: image × method × test × stage × metric (tidy data)."""

    image: str
    target: int
    target_explained: int
    method: str
    test: str
    stage_index: int
    stage: str
    metric: str
    value: float
    note: str = ""
    repeat: int = 0  # which of runtime.repeats randomization seeds (0 for the trained model)


@dataclass(frozen=True)
class StageObservation:
    """Per unit and stage: how much the logits moved (summed so units can be pooled)."""

    test: str
    stage_index: int
    n: int
    relative_l2_sum: float
    top1_agreement_sum: float


SUMMARY_FIELDS = ("method", "test", "stage_index", "stage", "metric", "mean", "std",
                  "ci_low", "ci_high", "n", "n_undefined", "floor", "above_floor")
STAGE_FIELDS = ("test", "stage_index", "stage", "blocks_randomized", "parameters_randomized",
                "num_parameters", "fraction_randomized", "logit_relative_l2", "top1_agreement")


@dataclass(frozen=True)
class SummaryRow:
    """One line of summary.csv: a method × test × stage × metric over images × repeats."""

    method: str
    test: str
    stage_index: int
    stage: str
    metric: str
    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    n_undefined: int
    floor: float = math.nan  # the random-network floor's mean for this method and metric
    above_floor: float = math.nan  # mean − floor: how far above unrelated networks it stays
