"""The successors' sanity tests: input invariance, sMPRT, eMPRT, checked against hand-written
references (autograd loops, numpy/SciPy histograms, Kindermans' bias construction)."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy import stats
from torch import nn
from typer.testing import CliRunner

from saliencycheck.checks import get_check
from saliencycheck.cli import app
from saliencycheck.complexity import entropy_rise, histogram_entropy
from saliencycheck.config import Threshold, load_config, parse_config
from saliencycheck.errors import ConfigError
from saliencycheck.invariance import compensated, first_layer, pixel_shift
from saliencycheck.results import SummaryRow
from saliencycheck.verdicts import FAIL, PASS, decide
from tests.test_cli import tiny_cnn

runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            images / f"img{i}.png")
    config = {
        "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 4},
        "images": {"path": "images", "size": 32, "mean": [0.5, 0.4, 0.3],
                   "std": [0.2, 0.25, 0.3]},
        "methods": ["gradient", "gradient_x_input", "guided_backprop",
                    {"name": "integrated_gradients", "steps": 8}],
        "tests": {"cascading": {"enabled": True}},
        "metrics": ["spearman_abs", "spearman", "ssim"],
        "runtime": {"device": "cpu", "bootstrap": 200},
        "output": {"dir": "out", "figure_images": 1, "save_maps": True},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _run(project: Path, *args: str):
    return runner.invoke(app, ["run", str(project / "config.yaml"), *args])


# --- eMPRT ------------------------------------------------------------------------------


def test_histogram_entropy_matches_numpy_histogram_and_scipy_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.cat([torch.randn(3, 17, 19, generator=generator, dtype=torch.float64),
                      torch.rand(2, 17, 19, generator=generator, dtype=torch.float64) ** 4,
                      torch.full((1, 17, 19), 0.3, dtype=torch.float64)])
    for bins in (100, 7):
        got = histogram_entropy(maps, bins).numpy()
        expected = [stats.entropy(np.histogram(m, bins=bins)[0]) for m in maps.numpy()]
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert histogram_entropy(maps)[-1] == 0  # a constant map: one bin


def test_entropy_rise_is_relative_and_undefined_for_a_constant_trained_map() -> None:
    rise = entropy_rise(torch.tensor([2.0, 0.0]), torch.tensor([3.0, 1.0]))
    assert rise.values[0] == pytest.approx(0.5)
    assert math.isnan(rise.values[1]) and "constant" in rise.reasons[1]


def test_entropy_mprt_scores_the_cascades_last_model_without_extra_passes(project) -> None:
    result = _run(project, "--set", "tests.entropy_mprt.enabled=true",
                  "--set", "thresholds={entropy_mprt: {metric: entropy_rise, min: -10}}")
    assert result.exit_code == 0, result.output
    assert "entropy_mprt: histogram entropy" in result.output
    rows = _rows(project / "out" / "report.csv")
    stages = {r["stage"] for r in rows if r["test"] == "entropy_mprt"}
    assert stages == {"trained", "fully_randomized"}
    final = max(int(r["stage_index"]) for r in rows if r["test"] == "cascading")
    with np.load(project / "out" / "maps" / "img0.npz") as saved:
        trained = torch.from_numpy(saved["cascading/gradient/0"])[None]
        randomized = torch.from_numpy(saved[f"cascading/gradient/{final}"])[None]
        # the eMPRT model is the cascade's last one: the same maps
        np.testing.assert_array_equal(saved["entropy_mprt/gradient/1"],
                                      saved[f"cascading/gradient/{final}"])
    h0 = histogram_entropy(trained.abs().sum(dim=1)).item()
    h1 = histogram_entropy(randomized.abs().sum(dim=1)).item()
    got = {(r["stage_index"], r["metric"]): float(r["value"]) for r in rows
           if (r["test"], r["method"], r["image"]) == ("entropy_mprt", "gradient", "img0.png")}
    assert got[("0", "entropy")] == pytest.approx(h0, rel=1e-6)
    assert got[("1", "entropy")] == pytest.approx(h1, rel=1e-6)
    assert got[("1", "entropy_rise")] == pytest.approx((h1 - h0) / h0, rel=1e-5)
    verdicts = {r["method"]: r for r in _rows(project / "out" / "verdicts.csv")}
    assert verdicts["gradient"]["verdict"] == PASS and float(verdicts["gradient"]["min"]) == -10
    assert (project / "out" / "figures" / "bars_entropy_mprt.png").is_file()


def test_group_maps_computes_one_model_state_once(project) -> None:
    from saliencycheck.runner import prepare
    from saliencycheck.runner.executor import UnitExecutor

    setup = prepare(load_config(project / "config.yaml",
                                ["tests.entropy_mprt.enabled=true",
                                 "tests.independent.enabled=true"]))
    executor = UnitExecutor(setup)
    inputs = torch.randn(2, 3, 32, 32)
    targets = torch.tensor([0, 1])
    maps, _ = executor.group_maps(inputs, [targets] * (1 + len(executor.pass_refs)), None,
                                  lambda _: None)
    names = [(r.test, r.stage.index) for r in executor.pass_refs]
    final = len(setup.stages["cascading"])
    at = {name: maps[1 + k] for k, name in enumerate(names)}
    assert at[("entropy_mprt", 1)] is at[("cascading", final)]
    assert at[("independent", 1)] is at[("cascading", 1)]  # both randomize only the top block
    assert at[("independent", 2)] is not at[("cascading", 2)]


# --- input invariance ---------------------------------------------------------------------


def test_compensation_equals_kindermans_bias_change_where_that_is_exact() -> None:
    """For a first layer without padding, undoing the shift at its input is the bias change
    b' = b − W·Δ of Kindermans et al.: same logits, same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 3, 8, 8)
    shift = pixel_shift(-1.0, [0.2, 0.25, 0.3], x)
    by_bias = copy.deepcopy(model)
    with torch.no_grad():
        by_bias[0].bias -= (by_bias[0].weight * shift.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    shifted = (x + shift).requires_grad_()
    with compensated(model, first_layer(model, x), shift):
        out = model(shifted)
        (grad,) = torch.autograd.grad(out[:, 1].sum(), shifted)
    reference_input = (x + shift).requires_grad_()
    reference = by_bias(reference_input)
    (reference_grad,) = torch.autograd.grad(reference[:, 1].sum(), reference_input)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, reference_grad)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)  # the function is kept


def test_a_layer_behind_an_input_transform_cannot_compensate() -> None:
    class Rescaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x * 2).mean(dim=(2, 3))

    with pytest.raises(ConfigError, match=r"tests\.input_invariance: the first layer 'conv' "
                                          r"does not receive the model's input"):
        first_layer(Rescaled(), torch.randn(1, 3, 8, 8))


def test_input_invariance_gradient_passes_gradient_x_input_and_ig_fail(project) -> None:
    rule = "thresholds={input_invariance: {metric: spearman, min: 0.99}}"
    result = _run(project, "--set", "tests.input_invariance.enabled=true", "--set", rule,
                  "--set", "fail_on=[gradient, guided_backprop]")
    assert result.exit_code == 0, result.output
    verdicts = {r["method"]: r["verdict"] for r in _rows(project / "out" / "verdicts.csv")}
    assert verdicts == {"gradient": PASS, "guided_backprop": PASS,
                        "gradient_x_input": FAIL, "integrated_gradients": FAIL}
    stages = [r for r in _rows(project / "out" / "stages.csv")
              if r["test"] == "input_invariance"]
    assert float(stages[0]["logit_relative_l2"]) < 1e-5  # checked and reported
    assert float(stages[0]["top1_agreement"]) == 1.0
    with np.load(project / "out" / "maps" / "img1.npz") as saved:
        np.testing.assert_allclose(saved["input_invariance/gradient/1"],
                                   saved["cascading/gradient/0"], rtol=1e-4, atol=1e-6)
    gated = _run(project, "--set", "tests.input_invariance.enabled=true", "--set", rule,
                 "--set", "fail_on=all")
    assert gated.exit_code == 1
    assert "gradient_x_input (input_invariance)" in " ".join(gated.output.split())


class RereadsItsInput(nn.Module):
    """`tiny_cnn` plus a term that reads the raw input again after the first layer, so no
    first-layer compensation can keep its logits."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = tiny_cnn(num_classes)
        self.mix = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.mix(x.mean(dim=(2, 3)))


def test_a_compensation_that_moves_the_logits_is_flagged_even_without_a_threshold(
        project) -> None:
    result = _run(project, "--set", "tests.input_invariance.enabled=true", "--set",
                  "model.factory=tests.test_sanity_tests:RereadsItsInput")
    assert result.exit_code == 0, result.output
    assert "warning: input invariance is invalid: the compensated model's logits moved by" \
        in " ".join(result.output.split())
    rows = [r for r in _rows(project / "out" / "report.csv")
            if r["test"] == "input_invariance" and r["stage_index"] == "1"]
    assert rows and all(r["note"].startswith("invalid test: the compensated model's logits "
                                             "moved by") for r in rows)
    verdict = _run(project, "--set", "tests.input_invariance.enabled=true", "--set",
                   "model.factory=tests.test_sanity_tests:RereadsItsInput", "--set",
                   "thresholds={input_invariance: {metric: spearman, min: 0.0}}")
    assert verdict.exit_code == 0, verdict.output
    assert {r["verdict"] for r in _rows(project / "out" / "verdicts.csv")} == {"INVALID"}


# --- sMPRT --------------------------------------------------------------------------------


def test_smooth_mprt_averages_gradients_over_seeded_noisy_copies(project) -> None:
    from saliencycheck.runner import prepare, run_check
    from saliencycheck.runner.executor import UnitExecutor

    setup = prepare(load_config(project / "config.yaml",
                                ["tests.smooth_mprt={enabled: true, samples: 6, noise: 0.2}"]))
    stages = setup.stages["smooth_mprt"]
    assert stages[0].name == "0"  # bottom_up by default: the first convolution first
    run_check(setup)
    executor = UnitExecutor(setup)
    image = torch.from_numpy(np.asarray(
        Image.open(project / "images" / "img2.png").convert("RGB"), dtype=np.float32) / 255)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x = ((image - mean) / std).permute(2, 0, 1)
    smooth = get_check("smooth_mprt")
    copies = smooth.noisy_copies(setup, ["img2.png"], x[None])
    assert copies.shape[0] == 6 and torch.equal(copies[-1], x)  # the last copy: no noise
    spread = (copies[:-1] - x).std() / (x.max() - x.min())
    assert spread == pytest.approx(0.2, rel=0.05)
    torch.testing.assert_close(smooth.noisy_copies(setup, ["img2.png"], x[None]), copies)

    target = int(setup.model(x[None]).argmax())
    with np.load(project / "out" / "maps" / "img2.npz") as saved:
        for stage, ref in ((0, None), (len(stages), smooth.refs(setup)[-1])):
            model = executor.model(ref)  # the one working copy, in that stage's state
            rows = copies.clone().requires_grad_()
            (grad,) = torch.autograd.grad(model(rows)[:, target].sum(), rows)
            np.testing.assert_allclose(saved[f"smooth_mprt/gradient/{stage}"],
                                       grad.mean(dim=0).numpy(), rtol=1e-4, atol=1e-6)
    executor.model()
    rows = _rows(project / "out" / "report.csv")
    assert {r["stage"] for r in rows if r["test"] == "smooth_mprt"} == \
        {"trained", *(s.name for s in stages)}


# --- thresholds ---------------------------------------------------------------------------


def test_min_thresholds_pass_on_the_lower_bound() -> None:
    names = {"input_invariance": ["trained", "shifted_input"]}
    summary = [SummaryRow(m, "input_invariance", 1, "shifted_input", "spearman", mean, 0.01,
                          low, high, 4, 0)
               for m, mean, low, high in (("gradient", 0.999, 0.995, 1.0),
                                          ("gradient_x_input", 0.97, 0.94, 0.99))]
    verdicts = {v.method: v for v in decide(
        summary, {"input_invariance": Threshold(metric="spearman", min=0.95)},
        methods=["gradient", "gradient_x_input"], stage_names=names,
        final_stage={"input_invariance": 1})}
    assert verdicts["gradient"].verdict == PASS
    assert verdicts["gradient_x_input"].verdict == FAIL  # mean 0.97 but lower bound 0.94
    assert "0.940 < min 0.95" in verdicts["gradient_x_input"].reason
    assert math.isnan(verdicts["gradient"].max) and verdicts["gradient"].min == 0.95


@pytest.mark.parametrize(("thresholds", "message"), [
    ({"entropy_mprt": {"metric": "spearman", "min": 0.1}}, "judged by entropy_rise"),
    ({"cascading": {"metric": "entropy_rise", "max": 0.1}}, "judged by entropy_rise"),
    ({"cascading": {"metric": "spearman", "max": 0.1, "min": 0.0}}, "give one of max"),
])
def test_threshold_rules_are_checked(thresholds: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"tests": {"entropy_mprt": {"enabled": True}}, "metrics": ["spearman"],
                      "thresholds": thresholds})


def test_summary_carries_the_floor_next_to_each_score(project) -> None:
    result = _run(project)
    assert result.exit_code == 0, result.output
    assert "Δ: above the random-network floor" in " ".join(result.output.split())
    summary = _rows(project / "out" / "summary.csv")
    floors = {(r["method"], r["metric"]): float(r["mean"]) for r in summary
              if r["test"] == "random_floor"}
    cascading = [r for r in summary if r["test"] == "cascading" and r["method"] != "random_map"]
    for r in cascading:
        floor = floors[(r["method"], r["metric"])]
        assert float(r["floor"]) == pytest.approx(floor)
        assert float(r["above_floor"]) == pytest.approx(float(r["mean"]) - floor)
    assert all(r["floor"] in ("", "nan") for r in summary if r["test"] == "random_floor")


def test_compare_knows_which_scores_must_stay_high(tmp_path: Path) -> None:
    from saliencycheck.compare import compare_runs
    from saliencycheck.results import SUMMARY_FIELDS

    def run(folder: str, means: dict[tuple[str, str], float]) -> Path:
        out = tmp_path / folder
        out.mkdir()
        (out / "run.json").write_text('{"complete": true, "units_done": 1, "units_total": 1}')
        with (out / "summary.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for index, ((test, metric, stage), mean) in enumerate(means.items()):
                writer.writerow({"method": "gradient", "test": test, "stage_index": 1 + index,
                                 "stage": stage, "metric": metric, "mean": mean})
        return out

    before = run("before", {("cascading", "spearman", "s"): 0.1,
                            ("input_invariance", "spearman", "s"): 0.99,
                            ("entropy_mprt", "entropy_rise", "s"): 0.3,
                            ("entropy_mprt", "entropy", "s"): 4.0,
                            ("random_floor", "spearman", "s"): 0.2,
                            ("edge_similarity", "spearman", "sobel_edges"): 0.2,
                            ("label_randomization", "spearman", "random_labels"): 0.2,
                            ("label_randomization", "spearman", "control"): 0.6})
    after = run("after", {("cascading", "spearman", "s"): 0.0,
                          ("input_invariance", "spearman", "s"): 0.80,
                          ("entropy_mprt", "entropy_rise", "s"): 0.1,
                          ("entropy_mprt", "entropy", "s"): 5.0,
                          ("random_floor", "spearman", "s"): 0.5,
                          ("edge_similarity", "spearman", "sobel_edges"): 0.5,
                          ("label_randomization", "spearman", "random_labels"): 0.4,
                          ("label_randomization", "spearman", "control"): 0.9})
    result = compare_runs(before, after, tolerance=0.05)
    assert {(c.test, c.stage) for c in result.regressions} == {
        ("input_invariance", "s"), ("entropy_mprt", "s"),
        ("label_randomization", "random_labels")}
    assert {(c.test, c.metric) for c in result.improvements} == {("cascading", "spearman")}
    # the floor, the edges, the raw entropy and the control describe, they do not judge
    assert result.compared == 4


@pytest.mark.parametrize(("builder", "size"), [
    ("resnet18", 32), ("mobilenet_v3_small", 32), ("squeezenet1_1", 48),
    ("efficientnet_b0", 32), ("densenet121", 32), ("vit_b_16", 32),
])
def test_the_first_layer_of_torchvision_models_compensates_exactly(builder: str,
                                                                   size: int) -> None:
    import torchvision

    torch.manual_seed(0)
    options = {"image_size": size} if builder.startswith("vit") else {}
    model = torchvision.models.get_model(builder, num_classes=10, **options).eval()
    if builder == "vit_b_16":  # its head starts at zero: give the logits something to show
        nn.init.normal_(model.heads.head.weight, std=0.02)
    # float64: in float32, (x + Δ) − Δ differs from x by rounding, which can flip a ReLU or
    # max-pool tie (SqueezeNet's gradients then differ by 1.6 % in norm); the construction
    # itself must be exact
    model = model.double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    shift = pixel_shift(-1.0, [0.229, 0.224, 0.225], x)
    layer = first_layer(model, x)
    rows = (x + shift).requires_grad_()
    with compensated(model, layer, shift):
        out = model(rows)
        (grad,) = torch.autograd.grad(out[:, 3].sum(), rows)
    reference_rows = x.clone().requires_grad_()
    reference = model(reference_rows)
    (reference_grad,) = torch.autograd.grad(reference[:, 3].sum(), reference_rows)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-8, atol=1e-10)


def test_inception_with_transform_input_is_refused_with_the_reason() -> None:
    import torchvision

    model = torchvision.models.inception_v3(num_classes=10, aux_logits=False,
                                            transform_input=True, init_weights=False).eval()
    with pytest.raises(ConfigError, match="does not receive the model's input"):
        first_layer(model, torch.randn(1, 3, 75, 75))
