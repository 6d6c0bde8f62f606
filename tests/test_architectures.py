"""The methods people deploy on the architectures they deploy them on: each of LRP (three
choices), Deep Taylor, DeepLIFT, occlusion and Grad-CAM++ gives a finite, non-zero map of the
input's shape on ResNet-18/50, VGG-11, DenseNet-121, GoogLeNet, Inception-v3, MobileNetV2,
SqueezeNet, EfficientNet-B0 and ConvNeXt-Tiny, or is refused in one line that names what it
cannot handle. Correctness is the other tests' (zennit, Captum, completeness); this is the
sweep a user's first try makes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tvm

from saliencycheck.errors import SaliencyCheckError
from saliencycheck.methods import AttributionContext, resolve_method
from tests.test_deeplift import calibrated
from tests.test_lrp import narrow_head

METHODS = [{"name": "lrp", "composite": "epsilon_plus"},
           {"name": "lrp", "composite": "epsilon_gamma_box"}, {"name": "lrp", "rule": "epsilon"},
           "deep_taylor", "deeplift", {"name": "occlusion", "window": 16, "stride": 16},
           "gradcam_plus_plus"]
LRP = ("lrp_epsilon_plus", "lrp_epsilon_gamma_box", "lrp_epsilon", "deep_taylor")
# builder, image size (the last feature map at least 2×2 for Grad-CAM++'s default layer),
# and the refusals expected: method label -> a part of its one-line message
ARCHITECTURES = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), 32, {}),
    "resnet50": (lambda: tvm.resnet50(num_classes=10), 32, {}),
    "vgg11": (lambda: narrow_head(tvm.vgg11()), 64, {}),
    "densenet121": (lambda: tvm.densenet121(num_classes=10), 64, {}),
    "googlenet": (lambda: tvm.googlenet(num_classes=10, aux_logits=False, init_weights=True),
                  64, {}),
    "inception_v3": (lambda: tvm.inception_v3(num_classes=10, aux_logits=False,
                                              init_weights=True), 96, {}),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), 64, {}),
    "squeezenet1_1": (lambda: tvm.squeezenet1_1(num_classes=10), 64, {}),
    # squeeze-and-excitation gates its features with a sigmoid of themselves
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), 64, {
        **dict.fromkeys(LRP, "calls sigmoid on the input's path, which has no LRP rule"),
        "deeplift": "multiplies two input-dependent tensors"}),
    "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=10), 32, {
        **dict.fromkeys(LRP, "calls layer_norm (LayerNorm) on the input's path"),
        "deeplift": "calls layer_norm (LayerNorm) on the input's path"}),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_method_runs_or_is_refused_in_one_line(name: str) -> None:
    builder, size, refused = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = calibrated(builder(), size)  # fitted BatchNorm statistics, float64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    with torch.no_grad():
        targets = model(x).argmax(dim=1)
    outcome = {}
    for entry in METHODS:
        method = resolve_method(entry)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MobileNetV2's ReLU6 passed through: a warning
                maps = method(model, x, targets, AttributionContext())
        except SaliencyCheckError as exc:
            assert "\n" not in str(exc)
            outcome[method.label] = str(exc)
            continue
        assert maps.shape[0] == 2 and maps.shape[2:] == x.shape[2:]
        assert torch.isfinite(maps).all() and (maps.flatten(1).abs().sum(dim=1) > 0).all()
        outcome[method.label] = "ok"
    expected = {label: "ok" for label in outcome} | refused
    for label, status in outcome.items():
        if expected[label] == "ok":
            assert status == "ok", f"{name} {label}: {status}"
        else:
            assert expected[label] in status, f"{name} {label}: {status}"
