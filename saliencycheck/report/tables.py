"""CSV views of the stored results: report.csv, summary.csv, stages.csv."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from saliencycheck.atomic import atomic_write_csv
from saliencycheck.checks import get_check
from saliencycheck.config import RuntimeConfig
from saliencycheck.randomization import Stage
from saliencycheck.results import (
    CI_LEVEL,
    FLOOR_TEST,
    ROW_FIELDS,
    STAGE_FIELDS,
    SUMMARY_FIELDS,
    ScoreRow,
    StageObservation,
    SummaryRow,
)

# The bootstrap's defaults are the config's (runtime.bootstrap, seed), not copies.
RESAMPLES: int = RuntimeConfig.model_fields["bootstrap"].default
SEED: int = RuntimeConfig.model_fields["seed"].default


def sort_rows(rows: list[ScoreRow]) -> list[ScoreRow]:
    """A stable order independent of unit completion order."""
    return sorted(rows, key=lambda r: (r.test, r.method, r.stage_index, r.metric, r.image,
                                       r.repeat))


def write_report(path: Path, rows: list[ScoreRow]) -> None:
    """report.csv: one row per image × method × test × stage × metric."""
    atomic_write_csv(path, ROW_FIELDS, [asdict(r) for r in sort_rows(rows)])


def bootstrap_interval(values: np.ndarray, *, level: float = CI_LEVEL,
                       resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (images × repeats, NaN for an
    undefined score): images and repeats are resampled independently (a two-way bootstrap),
    so both the image sample and the randomization seeds count. Seeded: deterministic."""
    defined = ~np.isnan(values)
    if defined.sum() < 2 or (values.shape[0] < 2 and values.shape[1] < 2):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    images, repeats = values.shape
    means = []
    for start in range(0, resamples, 250):  # bounded memory for large image counts
        count = min(250, resamples - start)
        rows = rng.integers(0, images, (count, images, 1))
        cols = rng.integers(0, repeats, (count, 1, repeats))
        sample = values[rows, cols].reshape(count, -1)
        defined_count = (~np.isnan(sample)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # an all-undefined resample: NaN
            means.append(np.nansum(sample, axis=1) / defined_count)
    means = np.concatenate(means)
    means = means[~np.isnan(means)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(rows: list[ScoreRow], *, level: float = CI_LEVEL, resamples: int = RESAMPLES,
              seed: int = SEED) -> list[SummaryRow]:
    """Per method × test × stage × metric: mean and std over images × repeats, a bootstrap
    confidence interval (:func:`bootstrap_interval`), n (defined scores), n_undefined."""
    groups: dict[tuple, dict[tuple[str, int], float]] = defaultdict(dict)
    for r in rows:
        groups[(r.method, r.test, r.stage_index, r.stage, r.metric)][(r.image, r.repeat)] = \
            r.value
    summary = []
    for (method, test, index, stage, metric), cells in sorted(
            groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2], kv[0][4])):
        images = sorted({image for image, _ in cells})
        repeats = sorted({repeat for _, repeat in cells})
        table = np.full((len(images), len(repeats)), np.nan)
        for (image, repeat), value in cells.items():
            table[images.index(image), repeats.index(repeat)] = value
        defined = table[~np.isnan(table)]
        mean = float(defined.mean()) if len(defined) else math.nan
        std = float(defined.std(ddof=1)) if len(defined) > 1 else math.nan
        low, high = bootstrap_interval(table, level=level, resamples=resamples, seed=seed)
        summary.append(SummaryRow(method, test, index, stage, metric, mean, std, low, high,
                                  len(defined), int(table.size - len(defined))))
    return with_floor(summary)


def with_floor(summary: list[SummaryRow]) -> list[SummaryRow]:
    """Each score of a test that scores plain maps (``Check.against_floor``) next to the
    random-network floor of its method and metric, and its distance above it (NaN where
    there is no floor)."""
    floors = {(s.method, s.metric): s.mean for s in summary if s.test == FLOOR_TEST}
    return [replace(s, floor=floors[(s.method, s.metric)],
                    above_floor=s.mean - floors[(s.method, s.metric)])
            if _against_floor(s.test) and (s.method, s.metric) in floors else s
            for s in summary]


def _against_floor(test: str) -> bool:
    check = get_check(test)
    return check is not None and check.against_floor


def write_summary(path: Path, summary: list[SummaryRow]) -> None:
    atomic_write_csv(path, SUMMARY_FIELDS, [asdict(s) for s in summary])


def write_stages(path: Path, stages: dict[str, list[Stage]],
                 observations: list[StageObservation],
                 names: dict[str, list[str]] | None = None) -> list[dict]:
    """stages.csv: per test and stage, what was randomized and how far the logits moved;
    with ``names`` (per test, its stage names), also the other models whose logits were
    observed (input invariance's compensated model)."""
    pooled: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for o in observations:
        acc = pooled[(o.test, o.stage_index)]
        acc[0] += o.n
        acc[1] += o.relative_l2_sum
        acc[2] += o.top1_agreement_sum
    rows = []
    for test, test_stages in stages.items():
        rows.append({"test": test, "stage_index": 0, "stage": "trained", "blocks_randomized": "",
                     "parameters_randomized": "", "num_parameters": 0,
                     "fraction_randomized": 0.0, "logit_relative_l2": 0.0,
                     "top1_agreement": 1.0})
        for stage in test_stages:
            n, l2, top1 = pooled.get((test, stage.index), (0, math.nan, math.nan))
            rows.append({
                "test": test, "stage_index": stage.index, "stage": stage.name,
                "blocks_randomized": ";".join(stage.blocks),
                "parameters_randomized": ";".join(stage.parameter_names),
                "num_parameters": stage.numel,
                "fraction_randomized": round(stage.fraction_randomized, 6),
                "logit_relative_l2": l2 / n if n else math.nan,
                "top1_agreement": top1 / n if n else math.nan,
            })
    for (test, index), (n, l2, top1) in pooled.items():
        if test not in stages and names and test in names:
            rows.append({"test": test, "stage_index": index, "stage": names[test][index],
                         "blocks_randomized": "", "parameters_randomized": "",
                         "num_parameters": 0, "fraction_randomized": 0.0,
                         "logit_relative_l2": l2 / n, "top1_agreement": top1 / n})
    atomic_write_csv(path, STAGE_FIELDS, rows)
    return rows


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """skipped.csv: every image that could not be used, with the reason (header only when
    none was skipped, so a CI job can always read it)."""
    atomic_write_csv(path, ("path", "reason"),
           [{"path": image, "reason": reason} for image, reason in sorted(skipped)])
