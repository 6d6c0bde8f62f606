"""The random-map control: seeded noise per image and model state, scored like a method in the
parameter-randomization tests only, identical however the images are grouped, near zero
similarity by construction, and usable as a verdict reference (``max_above_control``)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

import saliencycheck as sc
from saliencycheck.checks.random_map import control_maps
from saliencycheck.config import parse_config
from saliencycheck.errors import ConfigError
from saliencycheck.results import RANDOM_MAP


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 5)).eval()


IMAGES = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _run(tmp_path, name: str, batch_size: int, **config):
    return sc.check(_model(), IMAGES, methods=["gradient"], device="cpu",
                    tests={"cascading": {"enabled": True, "granularity": "layer"},
                           "independent": {"enabled": True, "granularity": "layer"},
                           "random_logit": {"enabled": True}},
                    metrics=["spearman", "spearman_abs", "ssim"],
                    runtime={"batch_size": batch_size, "chunk_size": 64},
                    output=tmp_path / name, **config)


def test_each_image_and_state_draws_its_own_reproducible_noise() -> None:
    first = control_maps([0, 1], "cascading/1/0", (8, 8), seed=0, device=torch.device("cpu"))
    assert first.shape == (2, 1, 8, 8) and 0 <= first.min() and first.max() < 1
    again = control_maps([1], "cascading/1/0", (8, 8), seed=0, device=torch.device("cpu"))
    assert torch.equal(again[0], first[1])  # not by position in the batch
    for other in (control_maps([0], "cascading/2/0", (8, 8), seed=0,
                               device=torch.device("cpu")),
                  control_maps([0], "cascading/1/0", (8, 8), seed=1,
                               device=torch.device("cpu"))):
        assert not torch.allclose(other[0], first[0])
    assert not torch.allclose(first[0], first[1])


def test_the_control_is_scored_in_every_randomization_stage_and_nowhere_else(tmp_path) -> None:
    result = _run(tmp_path, "one", batch_size=6)
    summary = pd.read_csv(result.folder / "summary.csv")
    control = summary[summary.method == RANDOM_MAP]
    assert set(control.test) == {"cascading", "independent"}
    for test in ("cascading", "independent"):
        stages = set(summary[(summary.method == "gradient") & (summary.test == test)]
                     .stage_index)
        assert set(control[control.test == test].stage_index) == stages
    trained = control[control.stage_index == 0]
    assert (trained["mean"] == 1.0).all()  # its own trained draw against itself
    later = control[control.stage_index > 0]
    # fresh U(0, 1) noise against another draw: no similarity, in every metric (6 images of
    # 16×16 pixels: a stage's mean strays by 0.1 at most)
    assert later["mean"].abs().max() < 0.2 and later["mean"].abs().mean() < 0.05
    assert not any(v.method == RANDOM_MAP for v in result.verdicts)
    # a second run with another grouping of the images draws the same noise
    regrouped = pd.read_csv(_run(tmp_path, "two", batch_size=2).folder / "report.csv")
    once = pd.read_csv(result.folder / "report.csv")
    columns = ["image", "test", "stage_index", "metric", "value"]
    pick = lambda frame: frame[frame.method == RANDOM_MAP][columns].sort_values(  # noqa: E731
        columns[:4]).reset_index(drop=True)
    pd.testing.assert_frame_equal(pick(once), pick(regrouped))


def test_max_above_control_judges_against_the_control_at_the_stage(tmp_path) -> None:
    result = _run(tmp_path, "judged", batch_size=6, thresholds={
        "cascading": {"metric": "spearman_abs", "max_above_control": 0.3}})
    summary = pd.read_csv(result.folder / "summary.csv")
    (verdict,) = result.verdicts
    control = summary[(summary.method == RANDOM_MAP) & (summary.test == "cascading")
                      & (summary.stage_index == verdict.stage_index)
                      & (summary.metric == "spearman_abs")]["mean"].item()
    assert verdict.control == pytest.approx(control)
    assert verdict.max == pytest.approx(control + 0.3)
    assert f"control {control:.3f} + 0.3" in verdict.reason
    written = pd.read_csv(result.folder / "verdicts.csv")
    assert written.control.item() == pytest.approx(control)


def test_rules_that_need_the_control_say_so_in_one_line() -> None:
    base = {"model": {"name": "resnet18"}, "metrics": ["spearman"],
            "tests": {"random_logit": {"enabled": True}}}
    with pytest.raises(ConfigError, match=r"max_above_control needs the random-map control; "
                                          r"set baselines.random_map: true"):
        parse_config({**base, "baselines": {"random_map": False}, "thresholds": {
            "cascading": {"metric": "spearman", "max_above_control": 0.1}}})
    with pytest.raises(ConfigError, match=r"thresholds.random_logit.max_above_control: the "
                                          r"random-map control is scored in cascading and "
                                          r"independent only"):
        parse_config({**base, "thresholds": {
            "random_logit": {"metric": "spearman", "max_above_control": 0.1}}})
    with pytest.raises(ConfigError, match=r"methods\[1\]: the label 'random_map' names the "
                                          r"random-map control"):
        parse_config({**base, "methods": ["gradient", {"name": "gradient",
                                                        "label": "random_map"}]})
    assert parse_config({**base, "baselines": {"random_map": False}, "methods": [
        {"name": "gradient", "label": "random_map"}]}).baselines.random_map is False
