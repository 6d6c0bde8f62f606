"""Every classification builder of torchvision, as a new user would try it (random init, 10
classes, one image): each method is accepted or refused in one line, never a crash or a silent
wrong map; a short cascading run randomizes 100 % of the weights by its last stage.

Each family is represented by its smallest member (the sweep stays within a couple of minutes
on two cores); a builder of a family not listed here fails the first test, so a torchvision
upgrade cannot add an untried family silently.
"""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from torchvision.models import list_models

from saliencycheck.config import LoadedConfig, parse_config
from saliencycheck.errors import SaliencyCheckError
from saliencycheck.runner import prepare, run_check

# family: (builder tried, image size, builder keywords, expected status of guided backprop and
# of Grad-CAM: "ok", or the start of the refusal). Sizes give the last feature maps 2×2 at
# least (a 1×1 map is no default Grad-CAM layer); GoogLeNet's and Inception-v3's auxiliary
# classifiers never run in eval mode, so they are left out to count 100 % of the weights.
FAMILIES = {
    "alexnet": ("alexnet", 128, {}, "ok", "ok"),
    "convnext": ("convnext_tiny", 32, {}, "no ReLU", "ok"),
    "densenet": ("densenet121", 64, {}, "ok", "ok"),
    "efficientnet": ("efficientnet_b0", 64, {}, "no ReLU", "ok"),
    "efficientnet_v2": ("efficientnet_v2_s", 64, {}, "no ReLU", "ok"),
    "googlenet": ("googlenet", 64, {"aux_logits": False}, "ok", "ok"),
    "inception_v3": ("inception_v3", 128, {"aux_logits": False}, "ok", "ok"),
    "maxvit": ("maxvit_t", 224, {}, "no ReLU", "ok"),
    "mnasnet": ("mnasnet0_5", 64, {}, "ok", "ok"),
    "mobilenet_v2": ("mobilenet_v2", 64, {}, "ok", "ok"),
    "mobilenet_v3": ("mobilenet_v3_small", 32, {}, "ok", "ok"),
    "regnet_x": ("regnet_x_400mf", 32, {}, "ok", "ok"),
    "regnet_y": ("regnet_y_400mf", 32, {}, "ok", "ok"),
    "resnet": ("resnet18", 32, {}, "ok", "ok"),
    "resnext": ("resnext50_32x4d", 32, {}, "ok", "ok"),
    "shufflenet_v2": ("shufflenet_v2_x0_5", 32, {}, "ok", "ok"),
    "squeezenet": ("squeezenet1_1", 64, {}, "ok", "ok"),
    "swin": ("swin_t", 64, {}, "no ReLU", "ok"),
    "swin_v2": ("swin_v2_t", 64, {}, "no ReLU on the input's path", "ok"),
    "vgg": ("vgg11", 64, {}, "ok", "ok"),
    "vgg_bn": ("vgg11_bn", 64, {}, "ok", "ok"),
    # torchvision starts ViT's head at zero: the logits do not depend on the input, which
    # Grad-CAM's layer search says instead of explaining a constant
    "vit": ("vit_b_16", 32, {"image_size": 32}, "no ReLU", "the logits do not depend"),
    "wide_resnet": ("wide_resnet50_2", 32, {}, "ok", "ok"),
}
PATTERNS = [(family, re.compile(pattern)) for family, pattern in (
    ("efficientnet_v2", r"efficientnet_v2_"), ("efficientnet", r"efficientnet_b\d"),
    ("mobilenet_v2", r"mobilenet_v2$"), ("mobilenet_v3", r"mobilenet_v3_"),
    ("regnet_x", r"regnet_x_"), ("regnet_y", r"regnet_y_"), ("resnext", r"resnext"),
    ("wide_resnet", r"wide_resnet"), ("resnet", r"resnet\d+$"),
    ("shufflenet_v2", r"shufflenet_v2_"), ("squeezenet", r"squeezenet"),
    ("swin_v2", r"swin_v2_"), ("swin", r"swin_[tsb]$"), ("vgg_bn", r"vgg\d+_bn$"),
    ("vgg", r"vgg\d+$"), ("vit", r"vit_"), ("convnext", r"convnext_"), ("densenet", r"densenet"),
    ("mnasnet", r"mnasnet"), ("alexnet", r"alexnet$"), ("googlenet", r"googlenet$"),
    ("inception_v3", r"inception_v3$"), ("maxvit", r"maxvit_"))]


def family_of(builder: str) -> str | None:
    return next((family for family, pattern in PATTERNS if pattern.match(builder)), None)


def test_every_classification_builder_belongs_to_a_swept_family() -> None:
    builders = list_models(module=tvm)
    assert len(builders) >= 80
    assert {b: family_of(b) for b in builders if family_of(b) not in FAMILIES} == {}
    for family, (builder, *_rest) in FAMILIES.items():
        assert family_of(builder) == family


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def status(method, setup) -> str:  # noqa: ANN001
    """'ok', or the method's one-line refusal on the run's first image."""
    from saliencycheck.runner.setup import first_readable

    x = first_readable(setup.images, setup.preprocessing)[0].tensor[None]
    target = setup.model(x).argmax(dim=1)
    try:
        method(setup.model, x, target, setup.context)
    except SaliencyCheckError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return "ok"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_checked_or_refused_in_one_line(family: str, image: Path,
                                                       tmp_path: Path) -> None:
    builder, size, kwargs, guided, gradcam = FAMILIES[family]
    raw = {"model": {"name": builder, "num_classes": 10, "kwargs": kwargs},
           "images": {"path": str(image), "size": size},
           "methods": ["gradient", "guided_backprop"],
           "tests": {"cascading": {"enabled": True}},
           "metrics": ["spearman"], "baselines": {"random_floor": False, "edges": False},
           "runtime": {"device": "cpu", "bootstrap": 100},
           "output": {"dir": str(tmp_path / "out"), "figures": False}}
    torch.manual_seed(0)
    loaded = LoadedConfig(config=parse_config(raw), source=tmp_path / "sweep.yaml")
    setup = prepare(loaded)
    gradient, guided_backprop = setup.methods
    assert status(gradient, setup) == "ok"
    assert status(guided_backprop, setup).replace("guided_backprop: the model applies ", "") \
        .startswith(guided if guided != "ok" else "ok")
    try:
        with_cam = prepare(LoadedConfig(config=parse_config(
            {**raw, "methods": ["gradcam"]}), source=loaded.source))
        cam_status = status(with_cam.methods[0], with_cam)
    except SaliencyCheckError as exc:
        assert "\n" not in str(exc)
        cam_status = str(exc)
    assert (cam_status == "ok") if gradcam == "ok" else gradcam in cam_status, cam_status
    run_check(replace(setup, methods=[gradient]))
    with (tmp_path / "out" / "stages.csv").open(newline="") as fh:
        stages = [r for r in csv.DictReader(fh) if r["test"] == "cascading"]
    assert float(stages[-1]["fraction_randomized"]) == 1.0
