"""Verdicts and the CI gate: thresholds, PASS/FAIL/INVALID, exit codes, JUnit XML, JSON."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from saliencycheck.checks import CHECKS
from saliencycheck.cli import app
from saliencycheck.compare import compare_runs
from saliencycheck.config import Threshold
from saliencycheck.errors import ConfigError
from saliencycheck.results import SummaryRow
from saliencycheck.verdicts import (
    FAIL,
    INVALID,
    PASS,
    decide,
    gate_failures,
    junit_xml,
    resolve_stage,
)

runner = CliRunner()
NAMES = {"cascading": ["trained", "fc", "layer4", "conv1"]}
FINAL = {"cascading": 3}


def row(method: str, index: int, mean: float, low: float, high: float) -> SummaryRow:
    return SummaryRow(method, "cascading", index, NAMES["cascading"][index], "spearman", mean,
                      0.1, low, high, 8, 0)


SUMMARY = [row("gradient", 3, 0.05, -0.02, 0.12), row("guided_backprop", 3, 0.60, 0.50, 0.70),
           row("gradcam", 3, math.nan, math.nan, math.nan), row("gradient", 1, 0.3, 0.2, 0.4)]
METHODS = ["gradient", "guided_backprop", "gradcam"]


def test_a_method_passes_when_the_upper_bound_is_within_max() -> None:
    verdicts = decide(SUMMARY, {"cascading": Threshold(metric="spearman", max=0.25)},
                      methods=METHODS, stage_names=NAMES, final_stage=FINAL)
    by_method = {v.method: v for v in verdicts}
    assert by_method["gradient"].verdict == PASS  # 0.12 <= 0.25
    assert by_method["guided_backprop"].verdict == FAIL  # 0.70 > 0.25
    assert by_method["gradcam"].verdict == INVALID and "undefined" in by_method["gradcam"].reason
    # The bound, not the mean, decides: mean 0.20 passes max 0.25 only if its CI does.
    close = [row("gradient", 3, 0.20, 0.14, 0.26)]
    (verdict,) = decide(close, {"cascading": Threshold(metric="spearman", max=0.25)},
                        methods=["gradient"], stage_names=NAMES, final_stage=FINAL)
    assert verdict.verdict == FAIL and "0.260 > max 0.25" in verdict.reason


def test_stages_by_name_or_index_and_invalid_tests() -> None:
    for stage in ("fc", 1):
        (verdict,) = decide(SUMMARY, {"cascading": Threshold(metric="spearman", stage=stage,
                                                             max=0.35)},
                            methods=["gradient"], stage_names=NAMES, final_stage=FINAL)
        assert (verdict.stage, verdict.verdict) == ("fc", FAIL)  # 0.4 > 0.35
    (verdict,) = decide(SUMMARY, {"cascading": Threshold(metric="spearman", max=0.9)},
                        methods=["gradient"], stage_names=NAMES, final_stage=FINAL,
                        invalid_tests={"cascading": "invalid test: not memorised"})
    assert verdict.verdict == INVALID
    with pytest.raises(ConfigError, match=r"thresholds\.cascading\.stage: no stage named"):
        resolve_stage("cascading", "layer9", NAMES["cascading"], 3)
    with pytest.raises(ConfigError, match="past the last stage"):
        resolve_stage("cascading", 7, NAMES["cascading"], 3)


def test_the_floor_is_recorded_only_where_it_is_a_reference() -> None:
    floor = SummaryRow("gradient", "random_floor", 1, "random_vs_random", "spearman", 0.3, 0.1,
                       0.25, 0.35, 8, 0)
    shifted = SummaryRow("gradient", "input_invariance", 1, "shifted_input", "spearman", 0.99,
                         0.01, 0.98, 1.0, 8, 0)
    names = {**NAMES, "input_invariance": ["trained", "shifted_input"]}
    verdicts = {v.test: v for v in decide(
        [*SUMMARY, floor, shifted],
        {"cascading": Threshold(metric="spearman", max=0.25),
         "input_invariance": Threshold(metric="spearman", min=0.95)},
        methods=["gradient"], stage_names=names, final_stage={**FINAL, "input_invariance": 1},
        # as the run judges: the floor applies to the checks scoring plain maps
        floor_tests=[check.name for check in CHECKS if check.against_floor])}
    assert verdicts["cascading"].floor == pytest.approx(0.3)
    assert math.isnan(verdicts["input_invariance"].floor)
    assert verdicts["input_invariance"].verdict == PASS


def test_the_gate_counts_only_the_methods_fail_on_names() -> None:
    verdicts = decide(SUMMARY, {"cascading": Threshold(metric="spearman", max=0.25)},
                      methods=METHODS, stage_names=NAMES, final_stage=FINAL)
    assert [v.method for v in gate_failures(verdicts, "all")] == ["guided_backprop"]
    assert gate_failures(verdicts, "none") == []
    assert gate_failures(verdicts, ["gradient", "gradcam"]) == []
    suite = ElementTree.fromstring(junit_xml(verdicts, gate_failures(verdicts, "all")))
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    assert suite.get("skipped") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["guided_backprop"].find("failure") is not None
    assert cases["gradient"].find("failure") is None


@pytest.fixture
def project(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            images / f"img{i}.png")
    config = {
        "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 4},
        "images": {"path": "images", "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": ["gradient", "guided_backprop"],
        "tests": {"cascading": {"enabled": True}},
        "metrics": ["spearman_abs", "ssim"],
        "runtime": {"device": "cpu"},
        "output": {"dir": "out", "figure_images": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _run(project: Path, *args: str):
    return runner.invoke(app, ["run", str(project / "config.yaml"), *args])


def test_exit_code_0_when_every_method_passes_and_1_when_a_gated_one_fails(project) -> None:
    passing = _run(project, "--set", "thresholds={cascading: {metric: ssim, max: 1.01}}")
    assert passing.exit_code == 0, passing.output
    assert "check passed" in passing.output
    with (project / "out" / "verdicts.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["verdict"] for r in rows} == {PASS} and len(rows) == 2
    assert (project / "out" / "figures" / "verdicts.png").is_file()

    failing = _run(project, "--set", "thresholds={cascading: {metric: ssim, max: -0.5}}",
                   "--junit", str(project / "junit.xml"))
    assert failing.exit_code == 1, failing.output
    assert "check failed" in failing.output
    suite = ElementTree.parse(project / "junit.xml").getroot()
    assert suite.get("failures") == "2"
    assert {c.get("name") for c in suite.iter("testcase")} == {"gradient", "guided_backprop"}

    ungated = _run(project, "--set", "thresholds={cascading: {metric: ssim, max: -0.5}}",
                   "--set", "fail_on=none")
    assert ungated.exit_code == 0, ungated.output


def test_json_goes_to_stdout_alone(project) -> None:
    result = runner.invoke(app, ["run", str(project / "config.yaml"), "--json", "--set",
                                 "thresholds={cascading: {metric: ssim, max: -0.5}}",
                                 "--set", "fail_on=[gradient]"])
    assert result.exit_code == 1
    stdout = result.stdout
    payload = json.loads(stdout[stdout.index("{"):])
    assert payload["passed"] is False and payload["failed"] == ["gradient/cascading"]
    assert {v["method"] for v in payload["verdicts"]} == {"gradient", "guided_backprop"}


@pytest.mark.parametrize(("override", "message"), [
    ("thresholds={independent: {metric: ssim, max: 0.2}}", "the independent test does not run"),
    ("thresholds={cascading: {metric: hog, max: 0.2}}", "thresholds.cascading.metric"),
    ("thresholds={cascading: {metric: ssim, stage: nowhere, max: 0.2}}", "no stage named"),
    ("fail_on=[smoothgrad]", "fail_on: 'smoothgrad' is not one of the methods"),
    ("tests.smooth_mprt.enabled=true --set thresholds={smooth_mprt: {metric: ssim, "
     "max_above_floor: 0.1}}", "thresholds.smooth_mprt.max_above_floor"),
])
def test_bad_verdict_rules_exit_2_with_one_line(project, override: str, message: str) -> None:
    result = _run(project, *(arg for part in override.split(" --set ")
                             for arg in ("--set", part)))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_compare_finds_an_injected_regression_and_passes_an_identical_run(project) -> None:
    import shutil

    result = _run(project, "--set", "thresholds={cascading: {metric: ssim, max: 1.01}}")
    assert result.exit_code == 0, result.output
    baseline = project / "out"
    same = runner.invoke(app, ["compare", str(baseline), str(baseline)])
    assert same.exit_code == 0 and "no regression" in same.output

    new = project / "new"
    shutil.copytree(baseline, new)
    with (new / "summary.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    target = next(r for r in rows if r["method"] == "gradient" and r["stage_index"] == "2"
                  and r["metric"] == "ssim")
    target["mean"] = str(float(target["mean"]) + 0.2)  # less sensitive to randomization
    with (new / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (new / "verdicts.csv").open(newline="") as fh:
        verdicts = list(csv.DictReader(fh))
    verdicts[1]["verdict"] = "FAIL"
    with (new / "verdicts.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(verdicts[0]))
        writer.writeheader()
        writer.writerows(verdicts)

    moved = runner.invoke(app, ["compare", str(baseline), str(new), "--tolerance", "0.05"])
    assert moved.exit_code == 1, moved.output
    assert "2 regression(s)" in moved.output and "+0.200" in moved.output
    assert runner.invoke(app, ["compare", str(baseline), str(new),
                               "--tolerance", "0.3"]).exit_code == 1  # the verdict still moved
    missing = runner.invoke(app, ["compare", str(baseline), str(project / "nowhere")])
    assert missing.exit_code == 2 and "no complete report" in missing.output
    (new / "run.json").unlink()  # a run that stopped while writing its report
    unfinished = runner.invoke(app, ["compare", str(baseline), str(new)])
    assert unfinished.exit_code == 2 and "run.json is absent" in unfinished.output


def _edit_csv(path: Path, edit) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        edit(r)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_compare_catches_completeness_scores_turning_undefined_and_lost_passes(project) -> None:
    import shutil

    result = _run(project, "--set", "methods=[gradient, gradient_x_input]", "--set",
                  "tests.completeness.enabled=true", "--set",
                  "thresholds={cascading: {metric: ssim, max: 1.01}}", "--set", "fail_on=none")
    assert result.exit_code == 0, result.output  # gradient x input fails completeness
    baseline = project / "out"

    def variant(name: str, summary=None, verdicts=None) -> list[tuple[str, ...]]:
        new = project / name
        shutil.copytree(baseline, new)
        if summary:
            _edit_csv(new / "summary.csv", summary)
        if verdicts:
            _edit_csv(new / "verdicts.csv", verdicts)
        moved = runner.invoke(app, ["compare", str(baseline), str(new)])
        assert moved.exit_code == 1, moved.output
        return [(c.method, c.test, c.baseline, c.new)
                for c in compare_runs(baseline, new).regressions]

    def worse_completeness(r: dict) -> None:
        if r["test"] == "completeness":
            r["mean"] = str(float(r["mean"]) + 5)

    ((method, test, _, _),) = variant("complete", summary=worse_completeness)
    assert (method, test) == ("gradient_x_input", "completeness")

    def constant_maps(r: dict) -> None:  # the gradient's maps became constant: all NaN
        if r["method"] == "gradient" and r["test"] == "cascading" and r["stage_index"] != "0":
            r["mean"] = "nan"

    moved = variant("undefined", summary=constant_maps)
    assert moved and all(m == "gradient" and new == "nan" for m, _, _, new in moved)

    def invalid(r: dict) -> None:
        if r["method"] == "gradient":
            r["verdict"] = INVALID

    assert variant("invalid", verdicts=invalid) == [("gradient", "cascading", PASS, INVALID)]


def edge_detector(model, inputs, targets):
    """A 'method' that ignores the model: the Sobel edges of the input (checked against SciPy
    in test_sobel_magnitude_matches_scipy)."""
    from saliencycheck.postprocess import sobel_magnitude

    return sobel_magnitude(inputs)


def test_baselines_floor_and_edges_are_one_for_an_edge_detector_and_low_for_gradient(
        project) -> None:
    result = _run(project, "--set",
                  "methods=[gradient, {name: custom, label: edges, "
                  "callable: 'tests.test_verdicts:edge_detector'}]",
                  "--set", "thresholds={cascading: {metric: spearman_abs, "
                  "max_above_floor: 0.05}}")
    assert result.exit_code in (0, 1), result.output
    assert "random-network floor" in result.output
    with (project / "out" / "summary.csv").open(newline="") as fh:
        floor = {r["method"]: float(r["mean"]) for r in csv.DictReader(fh)
                 if r["test"] == "random_floor" and r["metric"] == "spearman_abs"}
    assert floor["edges"] > 0.999  # identical maps whatever the weights
    assert floor["gradient"] < floor["edges"] - 0.3
    with (project / "out" / "summary.csv").open(newline="") as fh:
        edges = {r["method"]: float(r["mean"]) for r in csv.DictReader(fh)
                 if r["test"] == "edge_similarity" and r["metric"] == "spearman_abs"}
    assert edges["edges"] > 0.999  # the edge detector is one
    assert edges["gradient"] < edges["edges"] - 0.3
    with (project / "out" / "verdicts.csv").open(newline="") as fh:
        verdicts = {r["method"]: r for r in csv.DictReader(fh)}
    # A relative rule is judged against each method's own floor (recorded in the verdict).
    assert float(verdicts["edges"]["floor"]) > 0.999
    assert float(verdicts["gradient"]["max"]) == pytest.approx(floor["gradient"] + 0.05)


def test_a_relative_threshold_is_judged_against_the_methods_floor() -> None:
    floor = [SummaryRow("gradient", "random_floor", 1, "random_vs_random", "spearman", 0.30,
                        0.1, 0.25, 0.35, 8, 0),
             SummaryRow("guided_backprop", "random_floor", 1, "random_vs_random", "spearman",
                        0.60, 0.1, 0.55, 0.65, 8, 0)]
    rule = {"cascading": Threshold(metric="spearman", max_above_floor=0.05)}
    verdicts = {v.method: v for v in decide(SUMMARY + floor, rule, methods=METHODS,
                                             stage_names=NAMES, final_stage=FINAL,
                                             floor_tests=("cascading",))}
    assert verdicts["gradient"].verdict == PASS  # 0.12 <= 0.30 + 0.05
    assert verdicts["guided_backprop"].verdict == FAIL  # 0.70 > 0.60 + 0.05
    assert verdicts["guided_backprop"].max == pytest.approx(0.65)
    assert "floor 0.600 + 0.05" in verdicts["guided_backprop"].reason
    assert verdicts["gradcam"].verdict == INVALID  # no floor (and no score)
    with pytest.raises(ConfigError, match="give one of max"):
        from saliencycheck.config import parse_config

        parse_config({"thresholds": {"cascading": {"metric": "spearman_abs", "max": 0.2,
                                                   "max_above_floor": 0.1}}})


def test_sobel_magnitude_matches_scipy() -> None:
    import torch
    from scipy import ndimage

    from saliencycheck.postprocess import sobel_magnitude

    images = torch.rand(2, 3, 17, 13, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    got = sobel_magnitude(images)[:, 0].numpy()
    for image, edges in zip(images.mean(dim=1).numpy(), got):
        expected = np.hypot(ndimage.sobel(image, axis=0, mode="nearest"),
                            ndimage.sobel(image, axis=1, mode="nearest"))
        np.testing.assert_allclose(edges, expected, rtol=1e-12, atol=1e-12)


def test_the_same_config_gives_a_byte_identical_report(project) -> None:
    every_test = ["--set", "tests={cascading: {enabled: true}, random_logit: {enabled: true}, "
                  "input_invariance: {enabled: true}, entropy_mprt: {enabled: true}, "
                  "smooth_mprt: {enabled: true, samples: 3}}"]
    first = _run(project, "-o", str(project / "first"), *every_test)
    second = _run(project, "-o", str(project / "second"), *every_test)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    for name in ("report.csv", "summary.csv", "stages.csv"):
        assert (project / "first" / name).read_bytes() == (project / "second" / name).read_bytes()


def test_bootstrap_interval_matches_scipy_and_covers_seeds() -> None:
    from scipy import stats

    from saliencycheck.report.tables import bootstrap_interval

    rng = np.random.default_rng(3)
    values = rng.normal(0.4, 0.1, size=40)
    low, high = bootstrap_interval(values[:, None], resamples=4000, seed=1)
    reference = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=4000,
                                random_state=1).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.01)
    assert high == pytest.approx(reference.high, abs=0.01)
    assert (low, high) == bootstrap_interval(values[:, None], resamples=4000, seed=1)
    assert bootstrap_interval(np.full((5, 1), 0.3)) == pytest.approx((0.3, 0.3))
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([[0.3]])))
    # Seeds that disagree widen the interval: images alone would not show it.
    per_seed = np.stack([values[:10], values[:10] + 0.3], axis=1)  # 10 images x 2 seeds
    wide = bootstrap_interval(per_seed, seed=0)
    narrow = bootstrap_interval(per_seed[:, :1], seed=0)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_repeats_randomize_with_new_seeds_and_pool_into_the_summary(project) -> None:
    result = _run(project, "--set", "runtime.repeats=2", "--set",
                  "tests.random_logit.enabled=true")
    assert result.exit_code == 0, result.output
    with (project / "out" / "report.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["test"] == "cascading"]
    assert {r["repeat"] for r in rows if r["stage_index"] == "0"} == {"0"}
    later = [r for r in rows if r["stage_index"] == "2" and r["metric"] == "ssim"
             and r["method"] == "gradient"]
    by_repeat = {rep: [float(r["value"]) for r in later if r["repeat"] == rep]
                 for rep in ("0", "1")}
    assert len(by_repeat["0"]) == len(by_repeat["1"]) == 4
    assert by_repeat["0"] != by_repeat["1"]  # another seed, other random weights
    with (project / "out" / "summary.csv").open(newline="") as fh:
        summary = [r for r in csv.DictReader(fh) if r["test"] == "cascading"
                   and r["stage_index"] == "2" and r["metric"] == "ssim"
                   and r["method"] == "gradient"]
    assert summary[0]["n"] == "8"  # 4 images x 2 seeds
    assert float(summary[0]["mean"]) == pytest.approx(np.mean(by_repeat["0"] + by_repeat["1"]))
    # The random-network floor is drawn again per repeat too: its interval covers the seeds.
    with (project / "out" / "report.csv").open(newline="") as fh:
        floor = [r for r in csv.DictReader(fh) if r["test"] == "random_floor"
                 and r["method"] == "gradient" and r["metric"] == "ssim"]
    floor_by_repeat = {rep: [r["value"] for r in floor if r["repeat"] == rep]
                       for rep in ("0", "1")}
    assert len(floor_by_repeat["0"]) == len(floor_by_repeat["1"]) == 4
    assert floor_by_repeat["0"] != floor_by_repeat["1"]
    seeds = json.loads((project / "out" / "run.json").read_text())["seeds"]
    assert seeds["random_floor_copies"] == [[1, 2], [1001, 1002]]
    # The random logit draws its other class again per repeat (seeds 0 and 1000).
    with (project / "out" / "report.csv").open(newline="") as fh:
        logit = [r for r in csv.DictReader(fh) if r["test"] == "random_logit"
                 and r["stage_index"] == "1" and r["method"] == "gradient"
                 and r["metric"] == "ssim"]
    drawn = {rep: [r["target_explained"] for r in logit if r["repeat"] == rep]
             for rep in ("0", "1")}
    assert len(drawn["0"]) == len(drawn["1"]) == 4 and drawn["0"] != drawn["1"]
    assert all(r["target_explained"] != r["target"] for r in logit)
    with (project / "out" / "summary.csv").open(newline="") as fh:
        [pooled] = [r for r in csv.DictReader(fh) if r["test"] == "random_logit"
                    and r["stage_index"] == "1" and r["metric"] == "ssim"
                    and r["method"] == "gradient"]
    assert pooled["n"] == "8"


def test_the_confidence_level_reaches_the_summary_verdicts_and_figures(project,
                                                                      monkeypatch) -> None:
    from saliencycheck.report import figures

    titles = []
    original = figures.Figure.suptitle
    monkeypatch.setattr(figures.Figure, "suptitle",
                        lambda fig, text, **kw: titles.append(text) or original(fig, text, **kw))
    intervals = {}
    for level in ("0.5", "0.95"):
        result = _run(project, "-o", str(project / level), "--set", f"runtime.ci_level={level}",
                      "--set", "thresholds={cascading: {metric: ssim, max: 1.01}}")
        assert result.exit_code == 0, result.output
        with (project / level / "summary.csv").open(newline="") as fh:
            intervals[level] = {(r["method"], r["stage_index"], r["metric"]):
                                (float(r["ci_low"]), float(r["ci_high"]))
                                for r in csv.DictReader(fh) if r["test"] == "cascading"
                                and r["stage_index"] != "0"}
        with (project / level / "verdicts.csv").open(newline="") as fh:
            reasons = [r["reason"] for r in csv.DictReader(fh)]
        assert all(f"upper {float(level):.0%} bound" in reason for reason in reasons), reasons
    for key, (low, high) in intervals["0.5"].items():
        wide_low, wide_high = intervals["0.95"][key]
        assert wide_low <= low <= high <= wide_high and high - low < wide_high - wide_low
    assert any("mean and 50 % CI" in t for t in titles)
    assert any("mean and 95 % CI" in t for t in titles)


def test_the_preset_is_recorded_and_its_floor_copies_explain_their_own_class(project) -> None:
    """With adebayo2018's 'recompute', each random copy of the floor explains its own top
    class: the floor's first copy (seed + 1) is the full cascade of a run seeded one higher,
    so its explained classes must be that cascade's last stage's."""
    def rows(folder: str, test: str) -> list[dict[str, str]]:
        with (project / folder / "report.csv").open(newline="") as fh:
            return [r for r in csv.DictReader(fh) if r["test"] == test
                    and r["method"] == "gradient" and r["metric"] == "ssim"]

    for folder, seed in (("seed0", 0), ("seed1", 1)):
        result = _run(project, "-o", str(project / folder), "--set", "preset=adebayo2018",
                      "--set", f"runtime.seed={seed}")
        assert result.exit_code == 0, result.output
    run = json.loads((project / "seed0" / "run.json").read_text())
    assert run["config"]["preset"] == "adebayo2018"
    assert run["config"]["tests"]["target_on_randomized"] == "recompute"
    floor = {r["image"]: r["target_explained"] for r in rows("seed0", "random_floor")}
    cascade = rows("seed1", "cascading")
    last = max(int(r["stage_index"]) for r in cascade)
    assert floor == {r["image"]: r["target_explained"] for r in cascade
                     if int(r["stage_index"]) == last}


def test_independent_randomization_runs_bottom_up_too(project) -> None:
    names = {}
    for order in ("top_down", "bottom_up"):
        result = _run(project, "-o", str(project / order), "--set",
                      "tests.independent.enabled=true", "--set",
                      f"tests.independent.order={order}")
        assert result.exit_code == 0, result.output
        with (project / order / "stages.csv").open(newline="") as fh:
            names[order] = [r["stage"] for r in csv.DictReader(fh)
                            if r["test"] == "independent" and r["stage_index"] != "0"]
    assert len(names["top_down"]) > 2 and names["bottom_up"] == names["top_down"][::-1]


def test_random_logit_explains_another_class_per_image_whatever_the_batching(project) -> None:
    reports = {}
    for batch in (1, 4):
        result = _run(project, "-o", str(project / f"b{batch}"), "--set",
                      "tests.random_logit.enabled=true", "--set",
                      f"runtime.batch_size={batch}", "--set",
                      "thresholds={random_logit: {metric: ssim, max: 1.01}}")
        assert result.exit_code == 0, result.output
        with (project / f"b{batch}" / "report.csv").open(newline="") as fh:
            reports[batch] = [r for r in csv.DictReader(fh) if r["test"] == "random_logit"]
    rows = reports[1]
    assert {(r["stage_index"], r["stage"]) for r in rows} == {("0", "trained"),
                                                              ("1", "random_class")}
    other = [r for r in rows if r["stage_index"] == "1"]
    assert other and all(r["target_explained"] != r["target"] for r in other)
    assert {(r["image"], r["target_explained"]) for r in other} == {
        (r["image"], r["target_explained"]) for r in reports[4] if r["stage_index"] == "1"}
    assert (project / "b1" / "figures" / "img0" / "random_logit.png").is_file()
    with (project / "b1" / "verdicts.csv").open(newline="") as fh:
        assert {r["test"] for r in csv.DictReader(fh)} == {"random_logit"}


def linear_model(num_classes: int = 4):
    """f(x) = W x, no bias: integrated gradients and gradient × input are complete on it."""
    import torch
    from torch import nn

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes, bias=False))
    torch.random.set_rng_state(state)
    return model


def bias_free_cnn(num_classes: int = 4):
    """A ReLU CNN without biases (max and average pooling): LRP-ε and gradient × input are
    complete on it."""
    import torch
    from torch import nn

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, num_classes, bias=False))
    torch.random.set_rng_state(state)
    return model


def test_completeness_is_exact_on_a_linear_model_and_fails_for_gradient_x_input_with_biases(
        project) -> None:
    def completeness(factory: str, out: str) -> dict[str, dict[str, str]]:
        result = _run(project, "-o", str(project / out), "--set",
                      f"model={{factory: '{factory}', num_classes: 4}}", "--set",
                      "methods=[{name: integrated_gradients, steps: 8}, gradient_x_input, "
                      "deeplift, {name: lrp, rule: epsilon}, {name: lrp, rule: zplus}]",
                      "--set", "tests={cascading: {enabled: false}, "
                      "completeness: {enabled: true, tolerance: 0.05}}",
                      "--set", "fail_on=none")
        assert result.exit_code == 0, result.output
        with (project / out / "verdicts.csv").open(newline="") as fh:
            return {r["method"]: r for r in csv.DictReader(fh) if r["test"] == "completeness"}

    linear = completeness("tests.test_verdicts:linear_model", "linear")
    for method in ("integrated_gradients", "gradient_x_input", "deeplift", "lrp_epsilon"):
        assert linear[method]["verdict"] == PASS
        assert float(linear[method]["statistic"]) < 1e-4  # float32 sums of 3,072 terms
    assert "lrp_zplus" not in linear  # z⁺ does not conserve the logit: not judged
    bias_free = completeness("tests.test_verdicts:bias_free_cnn", "bias_free")
    for method in ("gradient_x_input", "deeplift", "lrp_epsilon"):
        assert bias_free[method]["verdict"] == PASS, method
        assert float(bias_free[method]["statistic"]) < 1e-4
    cnn = completeness("tests.test_cli:tiny_cnn", "cnn")
    for method in ("gradient_x_input", "lrp_epsilon"):  # biases absorb part of the logit
        assert cnn[method]["verdict"] == FAIL, method
        assert float(cnn[method]["statistic"]) > 0.05
    # DeepLIFT's summation-to-delta holds whatever the biases and ReLUs
    assert cnn["deeplift"]["verdict"] == PASS and float(cnn["deeplift"]["statistic"]) < 1e-4
