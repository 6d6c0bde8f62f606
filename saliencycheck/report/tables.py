"""CSV views of the stored results: report.csv, summary.csv, stages.csv."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from saliencycheck.randomization import Stage
from saliencycheck.runner.store import ROW_FIELDS, ScoreRow, StageObservation

SUMMARY_FIELDS = ("method", "test", "stage_index", "stage", "metric", "mean", "std",
                  "ci_low", "ci_high", "n", "n_undefined")
STAGE_FIELDS = ("test", "stage_index", "stage", "blocks_randomized", "parameters_randomized",
                "num_parameters", "fraction_randomized", "logit_relative_l2", "top1_agreement")


@dataclass(frozen=True)
class SummaryRow:
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


def _write(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def sort_rows(rows: list[ScoreRow]) -> list[ScoreRow]:
    """A stable order independent of unit completion order."""
    return sorted(rows, key=lambda r: (r.test, r.method, r.stage_index, r.metric, r.image))


def write_report(path: Path, rows: list[ScoreRow]) -> None:
    """report.csv: one row per image × method × test × stage × metric."""
    _write(path, ROW_FIELDS, [asdict(r) for r in sort_rows(rows)])


def mean_confidence_interval(
    values: np.ndarray, level: float = 0.95
) -> tuple[float, float, float, float]:
    """Mean, sample std and Student-t confidence interval of the defined (non-NaN) values."""
    n = len(values)
    if n == 0:
        return (math.nan,) * 4
    mean = float(values.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def summarize(rows: list[ScoreRow]) -> list[SummaryRow]:
    """Per method × test × stage × metric: mean, std, 95 % CI over images, n."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r.method, r.test, r.stage_index, r.stage, r.metric)].append(r.value)
    summary = []
    for (method, test, index, stage, metric), values in sorted(
            groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2], kv[0][4])):
        array = np.asarray(values, dtype=np.float64)
        defined = array[~np.isnan(array)]
        mean, std, low, high = mean_confidence_interval(defined)
        summary.append(SummaryRow(method, test, index, stage, metric, mean, std, low, high,
                                  len(defined), int(len(array) - len(defined))))
    return summary


def write_summary(path: Path, summary: list[SummaryRow]) -> None:
    _write(path, SUMMARY_FIELDS, [asdict(s) for s in summary])


def write_stages(path: Path, stages: dict[str, list[Stage]],
                 observations: list[StageObservation]) -> list[dict]:
    """stages.csv: per test and stage, what was randomized and how far the logits moved."""
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
    _write(path, STAGE_FIELDS, rows)
    return rows
