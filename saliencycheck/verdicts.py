"""Verdicts: PASS / FAIL / INVALID per method × test, from the summary and the thresholds.

A method passes a randomization test when its maps stop resembling the trained model's maps:
the upper bound of the confidence interval of its mean similarity at the judged stage must not
exceed the threshold's ``max``. Scores that must stay high (input invariance's similarity,
eMPRT's entropy rise) pass when the lower bound reaches the threshold's ``min``. A test that
could not be judged (the random-label model never memorised its labels, the input shift was not
compensated, or the metric is undefined for every image) is INVALID: neither passed nor failed.
The CI gate fails when a method listed in ``fail_on`` fails.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

from saliencycheck.atomic import atomic_write_csv
from saliencycheck.errors import ConfigError
from saliencycheck.results import CI_LEVEL, FLOOR_TEST, RANDOM_MAP, SummaryRow
from saliencycheck.sections import Threshold

PASS, FAIL, INVALID = "PASS", "FAIL", "INVALID"
VERDICT_FIELDS = ("method", "test", "metric", "stage_index", "stage", "statistic", "ci_low",
                  "ci_high", "max", "floor", "verdict", "reason", "min", "control")


@dataclass(frozen=True)
class Verdict:
    """One method's verdict on one test, with the evidence it rests on."""

    method: str
    test: str
    metric: str
    stage_index: int
    stage: str
    statistic: float  # mean similarity over images at the stage
    ci_low: float
    ci_high: float
    max: float  # the upper limit applied: the threshold's max, floor + max_above_floor, or
    # control + max_above_control
    floor: float  # the random-network floor's mean for this method and metric (NaN: none)
    verdict: str
    reason: str
    min: float = math.nan  # the lower limit applied: the threshold's min (NaN: none)
    control: float = math.nan  # the random-map control's mean at the stage (NaN: none)


def interval_text(statistic: float, low: float, high: float) -> str:
    """'0.12 [0.05, 0.20]': a statistic and its interval ('n/a' where undefined)."""
    if not math.isfinite(statistic):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{statistic:.2f}"
    return f"{statistic:.2f} [{low:.2f}, {high:.2f}]"


def resolve_stage(test: str, stage: str | int, names: list[str], final: int) -> int:
    """The stage index a threshold names: 'final', an index, or a stage (block) name."""
    if stage == "final":
        return final
    if isinstance(stage, int):
        if stage >= len(names):
            raise ConfigError(f"thresholds.{test}.stage: {stage} is past the last stage "
                              f"({len(names) - 1})")
        return stage
    if stage not in names:
        raise ConfigError(f"thresholds.{test}.stage: no stage named {stage!r}; stages are "
                          f"{', '.join(names[1:])}")
    return names.index(stage)


def decide(summary: list[SummaryRow], thresholds: dict[str, Threshold], *,
           methods: list[str], stage_names: dict[str, list[str]], final_stage: dict[str, int],
           invalid_tests: dict[str, str] | None = None, level: float = CI_LEVEL,
           floor_tests: Collection[str] = ()) -> list[Verdict]:
    """A verdict for every method and every test with a threshold; the random-network floor
    (``max_above_floor``) applies to the ``floor_tests`` only (those scoring plain maps); the
    random-map control (``max_above_control``) where its rows are, at the judged stage."""
    rows = {(s.method, s.test, s.stage_index, s.metric): s for s in summary}
    floors = {(s.method, s.metric): s.mean for s in summary if s.test == FLOOR_TEST}
    controls = {(s.test, s.stage_index, s.metric): s.mean for s in summary
                if s.method == RANDOM_MAP}
    verdicts = []
    for test, threshold in thresholds.items():
        index = resolve_stage(test, threshold.stage, stage_names[test], final_stage[test])
        stage = stage_names[test][index]
        for method in methods:
            row = rows.get((method, test, index, threshold.metric))
            mean, low, high = ((row.mean, row.ci_low, row.ci_high) if row
                               else (math.nan, math.nan, math.nan))
            # the floor scores plain maps: it is no reference for sMPRT, invariance, eMPRT
            floor = floors.get((method, threshold.metric), math.nan) \
                if test in floor_tests else math.nan
            control = controls.get((test, index, threshold.metric), math.nan)
            upper = threshold.min is None
            limit = (threshold.min if not upper else threshold.max if threshold.max is not None
                     else floor + threshold.max_above_floor
                     if threshold.max_above_floor is not None
                     else control + threshold.max_above_control)
            if invalid_tests and test in invalid_tests:
                verdict, reason = INVALID, invalid_tests[test]
            elif row is None or math.isnan(mean):
                verdict = INVALID
                reason = (f"{threshold.metric} is undefined for every image at {stage} (e.g. "
                          "constant maps); report.csv says why")
            elif threshold.max_above_floor is not None and math.isnan(floor):
                verdict, reason = INVALID, (f"no random-network floor for {method} / "
                                            f"{threshold.metric} (undefined: constant maps)")
            elif threshold.max_above_control is not None and math.isnan(control):
                verdict, reason = INVALID, (f"no random-map control for {threshold.metric} at "
                                            f"{stage}")
            else:
                one = not math.isfinite(high)  # one image: no interval
                bound = mean if one else high if upper else low
                what = ("mean (one score)" if one
                        else f"{'upper' if upper else 'lower'} {level:.0%} bound")
                passed = bound <= limit if upper else bound >= limit
                verdict = PASS if passed else FAIL
                relation = ("≤" if passed else ">") if upper else ("≥" if passed else "<")
                rule = (f"floor {floor:.3f} + {threshold.max_above_floor}"
                        if threshold.max_above_floor is not None
                        else f"control {control:.3f} + {threshold.max_above_control}"
                        if threshold.max_above_control is not None
                        else f"max {threshold.max}" if upper else f"min {threshold.min}")
                reason = (f"{what} of mean {threshold.metric} at {stage}: {bound:.3f} "
                          f"{relation} {rule}")
            verdicts.append(Verdict(method, test, threshold.metric, index, stage, mean, low,
                                    high, limit if upper else math.nan, floor, verdict, reason,
                                    min=math.nan if upper else limit, control=control))
    return verdicts


def completeness_verdicts(summary: list[SummaryRow], tolerance: float, *,
                          level: float = CI_LEVEL, test: str = "completeness") -> list[Verdict]:
    """PASS when the upper bound of the mean relative completeness error is ≤ tolerance (the
    mean itself where one score leaves no interval)."""
    verdicts = []
    for s in summary:
        if s.test != test:
            continue
        if math.isnan(s.mean):
            verdict, reason = INVALID, "f(x) = f(baseline) for every image: nothing to complete"
        else:
            one = not math.isfinite(s.ci_high)  # one image: no interval
            bound = s.mean if one else s.ci_high
            what = "mean (one score)" if one else f"upper {level:.0%} bound of the mean"
            verdict = PASS if bound <= tolerance else FAIL
            reason = (f"{what} relative error: {bound:.2e} "
                      f"{'≤' if verdict == PASS else '>'} tolerance {tolerance}")
        verdicts.append(Verdict(s.method, test, s.metric, 0, s.stage, s.mean,
                                s.ci_low, s.ci_high, tolerance, math.nan, verdict, reason))
    return verdicts


def gate_failures(verdicts: list[Verdict], fail_on: str | list[str]) -> list[Verdict]:
    """The FAIL verdicts of the methods ``fail_on`` names ('all', 'none' or labels)."""
    if fail_on == "none":
        return []
    return [v for v in verdicts
            if v.verdict == FAIL and (fail_on == "all" or v.method in fail_on)]


def check_fail_on(fail_on: str | list[str], methods: list[str]) -> None:
    """Raise ConfigError if ``fail_on`` names a method the run does not compute."""
    if isinstance(fail_on, list):
        unknown = [m for m in fail_on if m not in methods]
        if unknown:
            raise ConfigError(f"fail_on: {unknown[0]!r} is not one of the methods "
                              f"({', '.join(methods)}); use their labels, 'all' or 'none'")


def write_verdicts(path: Path, verdicts: list[Verdict]) -> None:
    """verdicts.csv: one row per method × test with a threshold."""
    atomic_write_csv(path, VERDICT_FIELDS, [asdict(v) for v in verdicts])


def verdicts_json(verdicts: list[Verdict], failures: list[Verdict]) -> str:
    """The verdicts and the gate's outcome as JSON (NaN written as null)."""
    def clean(value: object) -> object:
        return None if isinstance(value, float) and math.isnan(value) else value

    return json.dumps({
        "passed": not failures,
        "failed": [f"{v.method}/{v.test}" for v in failures],
        "verdicts": [{k: clean(x) for k, x in asdict(v).items()} for v in verdicts],
    }, indent=2)


def junit_xml(verdicts: list[Verdict], gated: list[Verdict]) -> str:
    """JUnit XML: one test case per method × test; a FAIL is a failure (an error only when the
    gate counts it is not distinguished: CI dashboards show both), INVALID is skipped."""
    suite = ElementTree.Element("testsuite", name="saliencycheck", tests=str(len(verdicts)),
                                failures=str(sum(v.verdict == FAIL for v in verdicts)),
                                skipped=str(sum(v.verdict == INVALID for v in verdicts)))
    gated_keys = {(v.method, v.test) for v in gated}
    for v in verdicts:
        case = ElementTree.SubElement(suite, "testcase", classname=f"saliencycheck.{v.test}",
                                      name=v.method)
        if v.verdict == FAIL:
            kind = "gating" if (v.method, v.test) in gated_keys else "not gating (fail_on)"
            ElementTree.SubElement(case, "failure", message=v.reason, type=kind)
        elif v.verdict == INVALID:
            ElementTree.SubElement(case, "skipped", message=v.reason)
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True)
