"""The gate itself: each verdict rule on hand-built summaries whose verdict is known by
construction, the bootstrap interval at its stated level, and the library's defaults equal to
the config's. Every case sits on the side of a bound where a plausible bug (the mean judged
instead of the bound, the wrong bound, the wrong stage, the wrong floor, a 90 % interval
called 95 %) flips the verdict."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from saliencycheck.checks import CHECKS
from saliencycheck.config import (
    Config,
    PostprocessConfig,
    RuntimeConfig,
    Threshold,
    parse_config,
)
from saliencycheck.metrics import ssim
from saliencycheck.postprocess import PostprocessOptions, absolute, min_max, signed
from saliencycheck.report.tables import FLOOR_TEST, bootstrap_interval, summarize
from saliencycheck.results import ScoreRow, SummaryRow
from saliencycheck.runner.setup import RunSetup
from saliencycheck.verdicts import (
    FAIL,
    INVALID,
    PASS,
    Verdict,
    completeness_verdicts,
    decide,
    gate_failures,
)

NAN = math.nan
CASCADE = ["trained", "fc", "layer4", "conv1"]
NAMES = {"cascading": CASCADE, "input_invariance": ["trained", "shifted_input"]}
FINAL = {"cascading": 3, "input_invariance": 1}
LABEL_TEST = "label_randomization"
FLOOR_TESTS = tuple(check.name for check in CHECKS if check.against_floor)  # as the run judges


def summary_row(mean: float, low: float, high: float, *, method: str = "gradient",
                test: str = "cascading", index: int = 3, metric: str = "spearman"
                ) -> SummaryRow:
    """A summary row of ``test`` at stage ``index`` (named as in :data:`NAMES`)."""
    stage = NAMES[test][index] if test in NAMES else "stage"
    return SummaryRow(method, test, index, stage, metric, mean, 0.1, low, high, 8, 0)


def floor_row(mean: float, *, method: str = "gradient", metric: str = "spearman",
              low: float = NAN, high: float = NAN) -> SummaryRow:
    return SummaryRow(method, FLOOR_TEST, 1, "random_vs_random", metric, mean, 0.1, low, high,
                      8, 0)


def judge(summary: list[SummaryRow], threshold: Threshold, *, test: str = "cascading",
          methods: tuple[str, ...] = ("gradient",), **kwargs: object) -> dict[str, Verdict]:
    """Each method's verdict on ``test`` under one threshold."""
    return {v.method: v for v in decide(summary, {test: threshold}, methods=list(methods),
                                        stage_names=NAMES, final_stage=FINAL,
                                        floor_tests=FLOOR_TESTS, **kwargs)}


# -- max: the upper bound -------------------------------------------------------------------

@pytest.mark.parametrize(("mean", "high", "expected"), [
    (0.20, 0.30, FAIL),  # mean ≤ max < upper bound: the interval still reaches above max
    (0.20, 0.25, PASS),  # the bound on the limit passes (≤, not <)
    (0.20, 0.24, PASS),
    (0.26, 0.30, FAIL),
])
def test_a_max_rule_judges_the_upper_bound(mean: float, high: float, expected: str) -> None:
    verdict = judge([summary_row(mean, 0.10, high)],
                    Threshold(metric="spearman", max=0.25))["gradient"]
    assert verdict.verdict == expected
    assert verdict.max == 0.25 and math.isnan(verdict.min)
    assert (verdict.statistic, verdict.ci_low, verdict.ci_high) == (mean, 0.10, high)
    assert f"upper 95% bound of mean spearman at conv1: {high:.3f}" in verdict.reason


def test_a_max_rule_is_not_judged_on_the_lower_bound() -> None:
    # lower bound ≤ max < mean ≤ upper: only the mean or the lower bound would pass it
    verdict = judge([summary_row(0.30, 0.20, 0.40)], Threshold(metric="spearman", max=0.25))
    assert verdict["gradient"].verdict == FAIL


# -- min: the lower bound -------------------------------------------------------------------

@pytest.mark.parametrize(("mean", "low", "expected"), [
    (0.97, 0.93, FAIL),  # mean ≥ min > lower bound
    (0.97, 0.95, PASS),  # the bound on the limit passes (≥, not >)
    (0.97, 0.96, PASS),
    (0.94, 0.90, FAIL),
])
def test_a_min_rule_judges_the_lower_bound(mean: float, low: float, expected: str) -> None:
    verdict = judge([summary_row(mean, low, 0.99, test="input_invariance", index=1)],
                    Threshold(metric="spearman", min=0.95), test="input_invariance")["gradient"]
    assert verdict.verdict == expected
    assert verdict.min == 0.95 and math.isnan(verdict.max)
    assert f"lower 95% bound of mean spearman at shifted_input: {low:.3f}" in verdict.reason


def test_a_min_rule_is_not_judged_on_the_upper_bound() -> None:
    verdict = judge([summary_row(0.94, 0.90, 0.97, test="input_invariance", index=1)],
                    Threshold(metric="spearman", min=0.95), test="input_invariance")
    assert verdict["gradient"].verdict == FAIL  # only the upper bound reaches 0.95


# -- max_above_floor: each method's own floor of the judged metric, plus the margin ----------

def test_max_above_floor_adds_the_margin_to_the_methods_own_floor_of_the_metric() -> None:
    summary = [
        summary_row(0.33, 0.26, 0.40, method="gradient"),  # floor 0.30 + 0.05 = 0.35 < 0.40
        summary_row(0.55, 0.48, 0.62, method="guided_backprop"),  # ≤ 0.60 + 0.05
        # another metric's floor (listed first): not this rule's reference
        floor_row(0.90, metric="ssim"),
        floor_row(0.90, method="guided_backprop", metric="ssim"),
        # the floor's mean is the reference: its upper bound would let gradient pass
        floor_row(0.30, low=0.20, high=0.40),
        floor_row(0.60, method="guided_backprop", low=0.50, high=0.70),
    ]
    rule = Threshold(metric="spearman", max_above_floor=0.05)
    by_method = judge(summary, rule, methods=("gradient", "guided_backprop"))
    gradient, guided = by_method["gradient"], by_method["guided_backprop"]
    assert (gradient.verdict, guided.verdict) == (FAIL, PASS)
    assert gradient.floor == 0.30 and gradient.max == pytest.approx(0.35)
    assert guided.floor == 0.60 and guided.max == pytest.approx(0.65)
    assert "0.400 > floor 0.300 + 0.05" in gradient.reason


def test_max_above_control_adds_the_margin_to_the_controls_mean_at_the_judged_stage() -> None:
    summary = [
        summary_row(0.33, 0.26, 0.40, method="gradient"),  # control 0.02 + 0.3 = 0.32 < 0.40
        summary_row(0.20, 0.15, 0.31, method="guided_backprop"),  # ≤ 0.32
        # the control at another stage and in another metric: not this rule's reference
        summary_row(0.50, 0.40, 0.60, method="random_map", index=2),
        summary_row(0.50, 0.40, 0.60, method="random_map", metric="ssim"),
        summary_row(0.02, -0.05, 0.09, method="random_map"),  # its mean, not its bound
    ]
    rule = Threshold(metric="spearman", max_above_control=0.3)
    by_method = judge(summary, rule, methods=("gradient", "guided_backprop"))
    gradient, guided = by_method["gradient"], by_method["guided_backprop"]
    assert (gradient.verdict, guided.verdict) == (FAIL, PASS)
    assert gradient.control == 0.02 and gradient.max == pytest.approx(0.32)
    assert "0.400 > control 0.020 + 0.3" in gradient.reason
    missing = judge(summary[:1], rule)["gradient"]
    assert missing.verdict == INVALID and "no random-map control" in missing.reason


# -- one image: no interval, the mean decides and the reason says so --------------------------

@pytest.mark.parametrize(("rule", "mean", "expected"), [
    (Threshold(metric="spearman", max=0.25), 0.20, PASS),
    (Threshold(metric="spearman", max=0.25), 0.30, FAIL),
    (Threshold(metric="spearman", min=0.95, stage=1), 0.97, PASS),
    (Threshold(metric="spearman", min=0.95, stage=1), 0.90, FAIL),
])
def test_one_image_falls_back_to_the_mean_and_says_so(rule: Threshold, mean: float,
                                                      expected: str) -> None:
    test = "cascading" if rule.min is None else "input_invariance"
    row = summary_row(mean, NAN, NAN, test=test, index=FINAL[test])
    verdict = judge([row], rule, test=test)["gradient"]
    assert verdict.verdict == expected
    assert f"mean (one score) of mean spearman at {row.stage}: {mean:.3f}" in verdict.reason


# -- which stage is judged ---------------------------------------------------------------------

STAGED = [summary_row(0.40, 0.30, 0.50, index=1), summary_row(0.25, 0.15, 0.35, index=2),
          summary_row(0.05, 0.00, 0.10, index=3)]


@pytest.mark.parametrize(("stage", "name", "expected"), [
    ("final", "conv1", PASS), (3, "conv1", PASS), (2, "layer4", FAIL), ("layer4", "layer4", FAIL),
    (1, "fc", FAIL), ("fc", "fc", FAIL),
])
def test_the_stage_is_final_an_index_or_a_block_name(stage: str | int, name: str,
                                                     expected: str) -> None:
    verdict = judge(STAGED, Threshold(metric="spearman", stage=stage, max=0.2))["gradient"]
    assert (verdict.stage, verdict.stage_index, verdict.verdict) == (
        name, CASCADE.index(name), expected)


def label_setup(control: bool) -> RunSetup:
    """The run setup of a label randomization run with a ``stage: final`` threshold, holding
    only its config: its stage names and final stages are read from the config alone."""
    section = {"checkpoint": "random.pt", **({"control_checkpoint": "control.pt"}
                                             if control else {})}
    config: Config = parse_config({
        "tests": {"cascading": {"enabled": False}, "label_randomization": section},
        "thresholds": {"label_randomization": {"metric": "spearman", "max": 0.25}},
    })
    return RunSetup(config=config, source=Path("config.yaml"), output_dir=Path("out"),
                    model=None, weights_source="", device=None, preprocessing=None, images=[],
                    figure_ids=frozenset(), labels=None, methods=[], plans={}, context=None,
                    post=PostprocessOptions())


@pytest.mark.parametrize("random_passes", [True, False])
def test_label_randomization_final_is_the_random_label_model_not_the_control(
        random_passes: bool) -> None:
    setup = label_setup(control=True)
    assert setup.stage_names[LABEL_TEST] == ["trained", "random_labels", "control"]
    low, high = (0.0, 0.10), (0.80, 0.90)  # well below / well above max 0.25
    random_ci, control_ci = (low, high) if random_passes else (high, low)
    summary = [
        SummaryRow("gradient", LABEL_TEST, 1, "random_labels", "spearman", sum(random_ci) / 2,
                   0.1, *random_ci, 8, 0),
        SummaryRow("gradient", LABEL_TEST, 2, "control", "spearman", sum(control_ci) / 2, 0.1,
                   *control_ci, 8, 0),
    ]
    # as the run does: the config's thresholds, the setup's stage names and final stages
    (verdict,) = decide(summary, setup.config.thresholds, methods=["gradient"],
                        stage_names=setup.stage_names, final_stage=setup.final_stage)
    assert (verdict.stage_index, verdict.stage) == (1, "random_labels")
    assert verdict.verdict == (PASS if random_passes else FAIL)


def test_without_a_control_the_random_label_model_is_still_final() -> None:
    setup = label_setup(control=False)
    assert setup.stage_names[LABEL_TEST] == ["trained", "random_labels"]
    assert setup.final_stage[LABEL_TEST] == 1


# -- completeness: the upper bound of the mean relative error ----------------------------------

def completeness_row(mean: float, low: float, high: float, method: str = "gradient_x_input"
                     ) -> SummaryRow:
    return SummaryRow(method, "completeness", 0, "trained", "relative_error", mean, 0.01, low,
                      high, 8, 0)


@pytest.mark.parametrize(("mean", "high", "expected"), [
    (0.03, 0.08, FAIL),  # mean < tolerance < upper bound
    (0.03, 0.05, PASS),  # on the tolerance passes
    (0.03, 0.04, PASS),
    (0.03, NAN, PASS),  # one image: the mean
    (0.07, NAN, FAIL),
])
def test_completeness_judges_the_upper_bound_of_the_mean_error(mean: float, high: float,
                                                               expected: str) -> None:
    (verdict,) = completeness_verdicts([completeness_row(mean, 0.01, high)], 0.05)
    assert verdict.verdict == expected and verdict.max == 0.05
    one = math.isnan(high)
    what = "mean (one score)" if one else "upper 95% bound of the mean"
    assert verdict.reason.startswith(f"{what} relative error: {mean if one else high:.2e}")


def test_completeness_without_any_defined_error_is_invalid_and_other_tests_are_ignored() -> None:
    summary = [completeness_row(NAN, NAN, NAN, method="integrated_gradients"),
               summary_row(0.9, 0.8, 1.0)]
    (verdict,) = completeness_verdicts(summary, 0.05)
    assert (verdict.method, verdict.verdict) == ("integrated_gradients", INVALID)
    assert gate_failures([verdict], "all") == []


# -- INVALID, and the gate ---------------------------------------------------------------------

def test_what_cannot_be_judged_is_invalid_and_says_why() -> None:
    summary = [summary_row(0.90, 0.80, 1.00),  # a FAIL, were the test valid
               summary_row(NAN, NAN, NAN, method="gradcam")]
    methods = ("gradient", "gradcam", "smoothgrad")  # smoothgrad: no row at all
    rule = Threshold(metric="spearman", max=0.25)
    marked = judge(summary, rule, methods=methods,
                   invalid_tests={"cascading": "invalid test: not memorised"})
    assert {v.verdict for v in marked.values()} == {INVALID}
    assert {v.reason for v in marked.values()} == {"invalid test: not memorised"}

    unmarked = judge(summary, rule, methods=methods)
    assert unmarked["gradient"].verdict == FAIL
    for method in ("gradcam", "smoothgrad"):
        assert unmarked[method].verdict == INVALID
        assert "spearman is undefined for every image at conv1" in unmarked[method].reason

    relative = Threshold(metric="spearman", max_above_floor=0.05)
    no_floor = judge(summary + [floor_row(0.3, metric="ssim")], relative)["gradient"]
    nan_floor = judge(summary + [floor_row(NAN)], relative)["gradient"]
    for verdict in (no_floor, nan_floor):
        assert verdict.verdict == INVALID
        assert "no random-network floor for gradient / spearman" in verdict.reason


def test_the_gate_counts_only_fails_of_the_methods_fail_on_names() -> None:
    summary = [summary_row(0.90, 0.80, 1.00, method="gradient"),  # FAIL
               summary_row(0.05, 0.00, 0.10, method="guided_backprop"),  # PASS
               summary_row(NAN, NAN, NAN, method="gradcam")]  # INVALID
    methods = ("gradient", "guided_backprop", "gradcam")
    judged = list(judge(summary, Threshold(metric="spearman", max=0.25),
                        methods=methods).values())
    assert [v.verdict for v in judged] == [FAIL, PASS, INVALID]
    assert [v.method for v in gate_failures(judged, "all")] == ["gradient"]
    assert [v.method for v in gate_failures(judged, ["gradient"])] == ["gradient"]
    assert gate_failures(judged, ["guided_backprop", "gradcam"]) == []
    assert gate_failures(judged, "none") == []
    invalid = list(judge(summary, Threshold(metric="spearman", max=0.25), methods=methods,
                         invalid_tests={"cascading": "invalid test: why"}).values())
    assert gate_failures(invalid, "all") == []  # INVALID never fails the gate


# -- the interval has the stated level --------------------------------------------------------

def test_summarize_gives_the_percentile_bootstrap_interval_at_the_stated_level() -> None:
    values = np.random.default_rng(0).lognormal(0.0, 1.0, 40)  # skewed: tails differ
    resamples, tolerance = 50_000, 0.01  # Monte Carlo error here: ~0.002

    def reference(level: float) -> tuple[float, float]:
        ci = stats.bootstrap((values,), np.mean, method="percentile", confidence_level=level,
                             n_resamples=resamples, random_state=1).confidence_interval
        return ci.low, ci.high

    def interval(level: float, repeats: int) -> tuple[float, float]:
        # identical repeats: resampling them changes nothing, so the two-way bootstrap of
        # images × repeats is the ordinary bootstrap over images that SciPy computes
        rows = [ScoreRow(f"img{i:02d}", 0, 0, "gradient", "cascading", 1, "fc", "spearman",
                         float(v), repeat=r) for i, v in enumerate(values) for r in range(repeats)]
        (row,) = summarize(rows, level=level, resamples=resamples, seed=1)
        return row.ci_low, row.ci_high

    wide, narrow = reference(0.95), reference(0.90)
    gap = min(narrow[0] - wide[0], wide[1] - narrow[1])
    assert gap > 4 * tolerance  # so a 90 % interval cannot pass for a 95 % one
    for repeats in (1, 2):
        assert interval(0.95, repeats) == pytest.approx(wide, abs=tolerance)
        assert interval(0.90, repeats) == pytest.approx(narrow, abs=tolerance)


# -- the library's defaults are the config's --------------------------------------------------

def _default(function: object, parameter: str) -> object:
    return inspect.signature(function).parameters[parameter].default


def test_library_defaults_equal_the_configs() -> None:
    post, runtime = PostprocessConfig(), RuntimeConfig()
    assert asdict(PostprocessOptions()) == post.model_dump()
    assert _default(absolute, "reduction") == post.abs_reduction
    assert _default(min_max, "reduction") == post.abs_reduction
    assert _default(signed, "reduction") == post.signed_reduction
    for view in (absolute, signed):
        assert _default(view, "percentile") == post.percentile
    assert _default(ssim, "data_range") == post.ssim_data_range
    for function in (summarize, bootstrap_interval):
        assert _default(function, "level") == runtime.ci_level
        assert _default(function, "resamples") == runtime.bootstrap
        assert _default(function, "seed") == runtime.seed
    for function in (decide, completeness_verdicts):
        assert _default(function, "level") == runtime.ci_level
    # the documented defaults themselves (README, docs/verdicts.md): 95 % intervals
    assert runtime.ci_level == 0.95
