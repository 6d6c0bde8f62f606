"""The command line end to end with Typer's CliRunner on a tiny model and images the test writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from saliencycheck.cli import app
from saliencycheck.results import ROW_FIELDS

runner = CliRunner()


def tiny_cnn(num_classes: int = 4) -> nn.Module:
    """A small ReLU CNN (random init, seeded) for fast CLI runs."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
    torch.random.set_rng_state(generator_state)
    return model


def tanh_cnn(num_classes: int = 4) -> nn.Module:
    """No ReLU anywhere: guided backprop is undefined on it."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG but not really")
    config = {
        "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 4},
        "images": {"path": "images", "size": 48, "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": ["gradient", "guided_backprop",
                    {"name": "integrated_gradients", "steps": 4},
                    {"name": "gradcam", "layer": "5"},
                    {"name": "smoothgrad", "samples": 3, "label": "smooth"}],
        "tests": {"cascading": {"enabled": True}, "independent": {"enabled": True}},
        "metrics": ["spearman_abs", "spearman", "ssim", "hog", "pearson"],
        "runtime": {"device": "cpu", "batch_size": 2},
        "output": {"dir": "out", "figure_images": 1, "save_maps": True},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_writes_every_output(project: Path) -> None:
    result = runner.invoke(app, ["run", str(project / "config.yaml")])
    assert result.exit_code == 0, result.output
    out = project / "out"
    rows = read_csv(out / "report.csv")
    assert tuple(rows[0]) == ROW_FIELDS
    # blocks (top level, the inner Sequential expanded): 0, 2, 3, 5.0, 8 -> 5 stages per test
    stages = {t: {int(r["stage_index"]) for r in rows if r["test"] == t}
              for t in ("cascading", "independent")}
    assert stages["cascading"] == set(range(6)) and stages["independent"] == set(range(6))
    # images x methods x metrics x (stages of both tests + the floor + the edge baseline),
    # and the random-map control's images x metrics x stages of both tests
    assert len(rows) == 5 * 5 * 5 * (6 + 6 + 1 + 1) + 5 * 5 * (6 + 6)
    floor = [r for r in rows if r["test"] == "random_floor"]
    assert {(r["stage_index"], r["stage"]) for r in floor} == {("1", "random_vs_random")}
    assert {r["image"] for r in rows} == {f"img{i}.png" for i in range(5)}
    assert {r["method"] for r in rows} == {"gradient", "guided_backprop", "integrated_gradients",
                                           "gradcam", "smooth", "random_map"}
    values = np.array([float(r["value"]) for r in rows])
    finite = values[np.isfinite(values)]
    assert finite.size > 0.9 * values.size
    assert np.all(finite <= 1 + 1e-6) and np.all(finite >= -1 - 1e-6)
    for r in rows:
        if not np.isfinite(float(r["value"])):
            assert r["note"], "an undefined score must say why"
    trained = [float(r["value"]) for r in rows
               if r["stage_index"] == "0" and r["metric"] == "spearman_abs" and r["note"] == ""]
    np.testing.assert_allclose(trained, 1.0, atol=1e-6)

    summary = read_csv(out / "summary.csv")
    assert {"method", "test", "stage_index", "stage", "metric", "mean", "std", "ci_low",
            "ci_high", "n"} <= set(summary[0])
    # methods x metrics x (stages + the two baselines), the control's metrics x stages
    assert len(summary) == 5 * 5 * 14 + 5 * 12
    stage_rows = read_csv(out / "stages.csv")
    cascading = [r for r in stage_rows if r["test"] == "cascading"]
    fractions = [float(r["fraction_randomized"]) for r in cascading]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert cascading[1]["blocks_randomized"] == "8"  # the Linear head goes first (top-down)
    assert all(float(r["logit_relative_l2"]) > 0 for r in cascading[1:])

    for name in ("cascading", "independent"):
        figures = out / "figures"
        for png in (figures / "img0" / f"{name}.png", figures / f"curves_{name}.png"):
            with Image.open(png) as image:
                image.load()
                assert image.size[0] > 200
    assert not (out / "figures" / "img1").exists()  # figure_images: 1

    info = json.loads((out / "run.json").read_text())
    assert info["device"] == "cpu" and torch.__version__.startswith(info["versions"]["torch"])
    assert [s["path"].endswith("broken.png") for s in info["skipped_images"]] == [True]
    assert "broken.png" in result.output  # the warning names the file

    with np.load(out / "maps" / "img0.npz") as maps:
        assert maps["cascading/gradient/0"].shape == (3, 48, 48)
        assert maps["cascading/gradcam/5"].shape == (1, 48, 48)


def test_run_is_deterministic(project: Path) -> None:
    config = str(project / "config.yaml")
    first = runner.invoke(app, ["run", config, "--set", "output.figures=false"])
    assert first.exit_code == 0, first.output
    report = (project / "out" / "report.csv").read_bytes()
    second = runner.invoke(app, ["run", config, "--set", "output.figures=false"])
    assert second.exit_code == 0, second.output
    assert (project / "out" / "report.csv").read_bytes() == report


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("tests.cascading.order=sideways", "tests.cascading.order"),
        ("methods=[{name: gradcam, layer: nope}]", "methods[0].layer"),
        ("methods=[{name: integrated_gradients, stepz: 3}]", "methods[0].stepz"),
        ("methods=[telepathy]", "telepathy"),
        ("images.path=missing", "images.path"),
        ("model.weights=missing.pt", "model.weights"),
        ("tests.cascading.blocks=['8', 'head*']", "tests.cascading.blocks[1]: 'head*' matches "
                                                   "no block; the blocks are 0, 2, 3, 5.0, 8"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(project: Path, override: str, needle: str) -> None:
    for command in ("run", "validate"):
        result = runner.invoke(app, [command, str(project / "config.yaml"), "--set", override])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "config.yaml" in result.output
        assert "Traceback" not in result.output
        assert result.output.strip().startswith("error:")


def test_validate_probes_each_method_on_the_model(project: Path) -> None:
    result = runner.invoke(app, ["validate", str(project / "config.yaml"),
                                 "--set", "model.factory=tests.test_cli:tanh_cnn",
                                 "--set", "methods=[gradient, guided_backprop]"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: config.yaml: methods[1] (guided_backprop):")
    assert "no ReLU" in result.output and "Traceback" not in result.output


def test_validate_does_not_run(project: Path) -> None:
    result = runner.invoke(app, ["validate", str(project / "config.yaml")])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "5 images (1 unreadable)" in result.output
    assert not (project / "out").exists()


def test_validate_lists_the_blocks_each_stage_randomizes(project: Path) -> None:
    result = runner.invoke(app, ["validate", str(project / "config.yaml"), "--set",
                                 "tests.cascading.blocks=['5.*', '8']", "--set",
                                 "tests.independent.enabled=false"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Granularity block: the model's repeated units" in result.output  # the rule
    rows = [line.split("│")[1:-1] for line in result.output.splitlines()
            if line.count("│") == 5]  # the stage table's (the methods' has 3 columns)
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["1", "8", "36", "2.5%"],  # top down: the head (8·4 + 4 of 1,444 parameters) first
        ["2", "5.0", "584", "42.9%"]]  # then the last convolution (8·8·9 + 8)


def test_init_writes_a_valid_commented_config(tmp_path: Path) -> None:
    path = tmp_path / "starter.yaml"
    result = runner.invoke(app, ["init", str(path)])
    assert result.exit_code == 0, result.output
    assert path.read_text().count("#") > 40
    assert runner.invoke(app, ["init", str(path)]).exit_code == 2  # no silent overwrite
    from saliencycheck.config import load_config

    load_config(path)


def test_methods_lists_the_registry() -> None:
    result = runner.invoke(app, ["methods"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("gradient", "gradient_x_input", "integrated_gradients", "guided_backprop",
                 "deconvnet", "gradcam", "guided_gradcam", "smoothgrad", "vargrad", "custom"):
        assert name in result.output


def test_validate_shows_each_methods_status_on_the_model(project: Path) -> None:
    result = runner.invoke(app, ["validate", str(project / "config.yaml"), "--set",
                                 "model.factory=tests.test_cli:tanh_cnn", "--set",
                                 "methods=[gradient, gradcam]"], terminal_width=200)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())  # the title, however rich wrapped it
    assert "methods on this model (0 ReLU call(s) on the input's path; other activations: " \
        "tanh×1)" in shown
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.output.splitlines() if line.count("│") == 4}
    assert rows["gradient"] == ["ok", ""]
    assert rows["gradcam"][0] == "ok" and rows["gradcam"][1].startswith("layer ")
    refused = runner.invoke(app, ["validate", str(project / "config.yaml"), "--set",
                                  "model.factory=tests.test_cli:tanh_cnn", "--set",
                                  "methods=[guided_backprop, gradient, deconvnet]"])
    assert refused.exit_code == 2
    assert refused.output.startswith("error: config.yaml: methods[0] (guided_backprop):")
    assert refused.output.strip().endswith("(and 1 more refused: deconvnet)")
