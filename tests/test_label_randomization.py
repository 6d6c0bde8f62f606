"""Label (data) randomization: the trainer, its cache, validity, the CLI outputs, the science."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.stats import spearmanr
from torch import nn
from typer.testing import CliRunner

from saliencycheck import label_training
from saliencycheck.cli import app
from saliencycheck.config import LabelRandomizationConfig, TrainRecipe, parse_config
from saliencycheck.errors import ConfigError
from saliencycheck.label_training import CONTROL, RANDOM_LABELS, obtain_label_models, permuted
from saliencycheck.methods import AttributionContext, compute_maps, resolve_method
from saliencycheck.models import Preprocessing
from saliencycheck.postprocess import PostprocessOptions, absolute
from saliencycheck.zoo import DIGITS_TRAIN_COUNT, digits_tensors

runner = CliRunner()
DIGITS_PRE = Preprocessing(size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
# The quickstart's recipe: 100 digits memorised in ~20 epochs on 2 CPU cores.
RECIPE = TrainRecipe(data="digits", limit=100, epochs=40, lr=1e-3, batch_size=50,
                     min_train_accuracy=0.95, control=True, seed=0)


def wide_cnn(num_classes: int = 4) -> nn.Module:
    """A small ReLU CNN with enough features to memorise a few dozen random labels."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, num_classes),
    )
    torch.random.set_rng_state(state)
    return model


@pytest.fixture(scope="module")
def digits_label_models(digits_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("label_cache")
    example = digits_tensors(64)[0][:1]
    models = obtain_label_models(digits_model, example, LabelRandomizationConfig(train=RECIPE),
                                 pre=DIGITS_PRE, resolve=Path, cache=cache)
    return models, cache, example


def test_the_trainer_memorises_permuted_labels_and_the_control_generalises(
        digits_label_models) -> None:
    models, _, _ = digits_label_models
    reports = {r.role: r for r in models.reports}
    assert set(models.models) == {RANDOM_LABELS, CONTROL}
    assert models.valid and "memorised" in models.reason
    assert reports[RANDOM_LABELS].train_accuracy >= 0.95  # on its permuted labels
    assert reports[RANDOM_LABELS].heldout_accuracy < 0.3  # true held-out labels: near 10 %
    assert reports[CONTROL].train_accuracy >= 0.95
    assert reports[CONTROL].heldout_accuracy > reports[RANDOM_LABELS].heldout_accuracy + 0.3
    labels = digits_tensors(64)[1][:100]
    shuffled = permuted(labels, seed=0)
    assert sorted(shuffled.tolist()) == sorted(labels.tolist())  # a permutation ...
    assert (shuffled == labels).float().mean() < 0.3  # ... that moved most labels


def test_a_second_run_reuses_the_cached_models_and_retrain_trains_again(
        digits_model, digits_label_models, monkeypatch) -> None:
    first, cache, example = digits_label_models

    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(label_training, "train", no_training)
    again = obtain_label_models(digits_model, example, LabelRandomizationConfig(train=RECIPE),
                                pre=DIGITS_PRE, resolve=Path, cache=cache)
    assert all(r.cached for r in again.reports)
    for role, model in first.models.items():
        reloaded = again.models[role].state_dict()
        for name, value in model.state_dict().items():
            torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0, msg=name)
    calls = []
    monkeypatch.setattr(label_training, "train", lambda *a, **k: calls.append(k["role"]) or 1)
    obtain_label_models(digits_model, example, LabelRandomizationConfig(train=RECIPE),
                        pre=DIGITS_PRE, resolve=Path, cache=cache, retrain=True)
    assert calls == [RANDOM_LABELS, CONTROL]
    # A different recipe is a different cache entry.
    other = RECIPE.model_copy(update={"seed": 1})
    calls.clear()
    obtain_label_models(digits_model, example, LabelRandomizationConfig(train=other),
                        pre=DIGITS_PRE, resolve=Path, cache=cache)
    assert calls == [RANDOM_LABELS, CONTROL]


def test_a_corrupt_cached_model_is_trained_again_with_a_warning(
        digits_model, digits_label_models, monkeypatch, tmp_path: Path) -> None:
    import shutil

    _, cache, example = digits_label_models
    copied = tmp_path / "cache"
    shutil.copytree(cache, copied)
    for broken in copied.glob(f"{RANDOM_LABELS}-*.pt"):  # (other recipes' entries too)
        broken.write_bytes(broken.read_bytes()[:100])  # truncated, e.g. by a full disk
    calls = []
    monkeypatch.setattr(label_training, "train", lambda *a, **k: calls.append(k["role"]) or 1)
    with pytest.warns(UserWarning, match=r"label randomization cache: .* is truncated or "
                                         r"corrupt.*; training the random_labels model again"):
        models = obtain_label_models(digits_model, example,
                                     LabelRandomizationConfig(train=RECIPE), pre=DIGITS_PRE,
                                     resolve=Path, cache=copied)
    assert calls == [RANDOM_LABELS]  # the control's cache entry was fine
    assert [r.cached for r in models.reports] == [False, True]


def _mean_spearman_abs(model_a: nn.Module, model_b: nn.Module, method: str,
                       inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of SciPy's Spearman of the absolute maps of two models."""
    resolved = [resolve_method(method)]
    context = AttributionContext(mean=(0.5,) * 3, std=(0.5,) * 3)
    options = PostprocessOptions()
    a = absolute(compute_maps(resolved, model_a, inputs, targets, context)[method],
                 reduction=options.abs_reduction, percentile=options.percentile)
    b = absolute(compute_maps(resolved, model_b, inputs, targets, context)[method],
                 reduction=options.abs_reduction, percentile=options.percentile)
    return float(np.mean([spearmanr(x.flatten(), y.flatten())[0]
                          for x, y in zip(a.numpy(), b.numpy())]))


def test_science_gradient_changes_more_than_guided_backprop_under_label_randomization(
        digits_model, digits_label_models) -> None:
    """Adebayo et al. (section 4): the gradient depends on the labels the model learned;
    guided backprop keeps marking the digit whatever the labels were."""
    models, _, _ = digits_label_models
    inputs, _ = digits_tensors(64)
    inputs = inputs[DIGITS_TRAIN_COUNT:DIGITS_TRAIN_COUNT + 24]  # held-out digits
    with torch.no_grad():
        targets = digits_model(inputs).argmax(dim=1)
    random = models.models[RANDOM_LABELS]
    gradient = _mean_spearman_abs(digits_model, random, "gradient", inputs, targets)
    guided = _mean_spearman_abs(digits_model, random, "guided_backprop", inputs, targets)
    assert gradient < guided - 0.1, (gradient, guided)


def test_recipe_and_checkpoint_are_exclusive() -> None:
    for section in ({}, {"checkpoint": "a.pt", "train": {"data": "digits"}}):
        with pytest.raises(ConfigError, match=r"tests\.label_randomization: .*either checkpoint"):
            parse_config({"tests": {"label_randomization": section}})
    with pytest.raises(ConfigError, match=r"tests\.label_randomization\.train\.min_train_accuracy"):
        parse_config({"tests": {"label_randomization": {"train": {"min_train_accuracy": 2}}}})


@pytest.fixture
def folder_project(tmp_path: Path) -> Path:
    """Images to explain, an ImageFolder of 4 classes to train on, and a config using both."""
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            images / f"img{i}.png")
    for c in range(4):
        folder = tmp_path / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                folder / f"{i}.png")
    config = {
        "model": {"factory": "tests.test_label_randomization:wide_cnn", "num_classes": 4},
        "images": {"path": "images", "size": 24, "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": ["gradient", "guided_backprop"],
        "tests": {"cascading": {"enabled": False},
                  "label_randomization": {"train": {
                      "data": "train", "epochs": 60, "lr": 0.01, "batch_size": 8,
                      "min_train_accuracy": 0.95, "control": True}}},
        "metrics": ["spearman_abs", "ssim"],
        "runtime": {"device": "cpu"},
        "output": {"dir": "out", "figure_images": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_runs_the_test_on_an_image_folder_and_writes_its_outputs(folder_project) -> None:
    result = runner.invoke(app, ["run", str(folder_project / "config.yaml"), "--set",
                                 "thresholds={label_randomization: {metric: ssim, "
                                 "max_above_floor: 0.05}}", "--set", "fail_on=none"])
    assert result.exit_code == 0, result.output
    assert "label randomization: valid" in result.output
    assert "Δ: above the random-network floor" in " ".join(result.output.split())
    out = folder_project / "out"
    gradient = next(r for r in _rows(out / "summary.csv") if r["test"] == "label_randomization"
                    and r["stage"] == RANDOM_LABELS and r["method"] == "gradient"
                    and r["metric"] == "ssim")
    assert f"Δ{float(gradient['above_floor']):+.2f}" in result.output
    # max_above_floor end to end: the upper bound judged against that method's own floor
    floors = {(r["method"], r["metric"]): float(r["mean"]) for r in _rows(out / "summary.csv")
              if r["test"] == "random_floor"}
    verdicts = {r["method"]: r for r in _rows(out / "verdicts.csv")}
    assert set(verdicts) == {"gradient", "guided_backprop"}
    for method, verdict in verdicts.items():
        floor = floors[(method, "ssim")]
        assert float(verdict["floor"]) == pytest.approx(floor)
        assert float(verdict["max"]) == pytest.approx(floor + 0.05)
        passed = float(verdict["ci_high"]) <= floor + 0.05
        assert verdict["verdict"] == ("PASS" if passed else "FAIL"), verdict
    rows = [r for r in _rows(out / "report.csv") if r["test"] == "label_randomization"]
    assert {(r["stage_index"], r["stage"]) for r in rows} == {
        ("0", "trained"), ("1", RANDOM_LABELS), ("2", CONTROL)}
    assert len(rows) == 3 * 2 * 2 * 3  # images x methods x metrics x (trained, random, control)
    summary = [r for r in _rows(out / "summary.csv") if r["test"] == "label_randomization"]
    assert {r["stage"] for r in summary} == {"trained", RANDOM_LABELS, CONTROL}
    assert (out / "figures" / "img0" / "label_randomization.png").is_file()
    assert (out / "figures" / "bars_label_randomization.png").is_file()
    info = json.loads((out / "run.json").read_text())["label_randomization"]
    assert info["valid"] and [m["role"] for m in info["models"]] == [RANDOM_LABELS, CONTROL]
    assert info["recipe"]["seed"] == 0
    cached = sorted(p.name for p in (out / "label_randomization").glob("*.pt"))
    assert len(cached) == 2
    hashes = json.loads((out / "run.json").read_text())["checkpoints_sha256"]
    assert {Path(path).name: digest for path, digest in hashes.items()} == {
        name: hashlib.sha256((out / "label_randomization" / name).read_bytes()).hexdigest()
        for name in cached}
    again = runner.invoke(app, ["run", str(folder_project / "config.yaml")])
    assert again.exit_code == 0, again.output
    info = json.loads((out / "run.json").read_text())["label_randomization"]
    assert all(m["cached"] for m in info["models"])


def test_an_unmemorised_model_makes_the_test_invalid_not_failed(folder_project) -> None:
    result = runner.invoke(app, [
        "run", str(folder_project / "config.yaml"),
        "--set", "tests.label_randomization.train.epochs=1",
        "--set", "tests.label_randomization.train.lr=1e-6",
        "--set", "tests.label_randomization.train.min_train_accuracy=1.0",
        # a threshold no map could fail: an invalid test must still not pass or fail
        "--set", "thresholds={label_randomization: {metric: ssim, max: 1.5}}",
        "--junit", str(folder_project / "junit.xml")])
    assert result.exit_code == 0, result.output  # INVALID never fails the gate
    assert "INVALID" in result.output and "min_train_accuracy" in result.output
    out = folder_project / "out"
    assert not json.loads((out / "run.json").read_text())["label_randomization"]["valid"]
    rows = [r for r in _rows(out / "report.csv") if r["test"] == "label_randomization"]
    assert rows and all("invalid test" in r["note"] for r in rows)
    verdicts = _rows(out / "verdicts.csv")
    assert {v["method"] for v in verdicts} == {"gradient", "guided_backprop"}
    assert all(v["verdict"] == "INVALID" and "random-label model" in v["reason"]
               for v in verdicts)
    suite = ElementTree.parse(folder_project / "junit.xml").getroot()
    assert suite.get("failures") == "0" and suite.get("skipped") == "2"


def test_a_ready_checkpoint_is_used_and_a_wrong_one_named(folder_project) -> None:
    torch.save(wide_cnn().state_dict(), folder_project / "random.pt")
    torch.save(nn.Linear(2, 2).state_dict(), folder_project / "wrong.pt")
    good = runner.invoke(app, ["run", str(folder_project / "config.yaml"),
                               "--set", "tests.label_randomization={checkpoint: random.pt}"])
    assert good.exit_code == 0, good.output
    assert "not checked" in good.output
    for value, message in (("{checkpoint: wrong.pt}", "does not match the model"),
                           ("{checkpoint: missing.pt}", "checkpoint file not found")):
        bad = runner.invoke(app, ["run", str(folder_project / "config.yaml"),
                                  "--set", f"tests.label_randomization={value}"])
        assert bad.exit_code == 2
        assert "tests.label_randomization.checkpoint" in bad.output and message in bad.output
        assert "Traceback" not in bad.output


def test_the_starter_config_offers_the_test_commented_out_and_valid_when_uncommented() -> None:
    from saliencycheck.starter import starter_config

    text = starter_config()
    assert parse_config(yaml.safe_load(text)).tests.label_randomization is None
    lines = text.splitlines()
    start = lines.index("  # label_randomization:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  # ") or (block and not line.startswith("  #  ")):
            break
        block.append(line)
    uncommented = text.replace("\n".join(block),
                               "\n".join("  " + line[4:] for line in block))
    recipe = parse_config(yaml.safe_load(uncommented)).tests.label_randomization.train
    assert recipe == TrainRecipe()
