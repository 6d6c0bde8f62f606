"""The affine stem: which layers it finds, and maps equal to pulling back every row."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from saliencycheck.engine.stem import find_affine_stem
from saliencycheck.methods import AttributionContext, compute_maps, resolve_method
from saliencycheck.randomization import find_blocks, plan_stages
from tests.test_prefix import staged_maps


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    ("resnet18", {}, ("conv1", "bn1")),
    ("vgg11", {}, ("features.0",)),  # a ReLU right after the first convolution
    ("densenet121", {}, ("features.conv0", "features.norm0")),
    ("convnext_tiny", {}, ("features.0.0",)),  # LayerNorm is not affine in the input
    ("inception_v3", {"transform_input": True, "init_weights": False}, ()),  # a functional
])                                                            # rescaling before the first conv
def test_torchvision_stems(name: str, kwargs: dict, expected: tuple[str, ...]) -> None:
    model = getattr(torchvision.models, name)(**kwargs).eval()
    size = 299 if name == "inception_v3" else 64
    assert find_affine_stem(model, torch.randn(1, 3, size, size)) == expected


class InputTwice(nn.Module):
    """Uses the input after its first convolution as well: no stem pulls back all of it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)) + x)


class _ConvNorm(nn.Module):
    """A convolution, a BatchNorm and a linear head, wired by each subclass's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


class SkipAroundNorm(_ConvNorm):
    """The convolution's output also bypasses the BatchNorm: the stem ends at the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(torch.relu(self.bn(y)) + y)


class InPlaceBetween(_ConvNorm):
    """A functional in-place ReLU between conv and BatchNorm: the stem ends at the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(self.bn(torch.relu_(y)))


@pytest.mark.parametrize(("model", "expected"), [
    (InputTwice(), ()),
    (SkipAroundNorm(), ("conv",)),
    (InPlaceBetween(), ("conv",)),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(),
                   nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), ("0", "1", "2")),
    (nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), ()),
])
def test_stem_checks(model: nn.Module, expected: tuple[str, ...]) -> None:
    assert find_affine_stem(model.eval(), torch.randn(1, 3, 8, 8)) == expected


def test_batchnorm_in_training_mode_is_not_affine() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 8 * 8, 4)).eval()
    model[1].train()
    assert find_affine_stem(model, torch.randn(2, 3, 8, 8)) == ("0",)


STEM_METHODS = ["gradient", "gradcam", {"name": "integrated_gradients", "steps": 5},
                {"name": "integrated_gradients", "steps": 3, "rule": "gauss_lobatto",
                 "baseline": "uniform", "label": "ig_lobatto"},
                {"name": "smoothgrad", "samples": 3}, {"name": "vargrad", "samples": 3}]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    for module in model.modules():  # statistics far from (0, 1): a wrong Aᵀ would show
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    inputs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        targets = model(inputs).argmax(dim=1)
    return model, inputs, targets


@pytest.mark.parametrize("chunk_size", [1000, 7])
def test_maps_equal_pulling_back_every_row(resnet, chunk_size: int) -> None:
    model, inputs, targets = resnet
    methods = [resolve_method(m) for m in STEM_METHODS]
    got, expected = (compute_maps(methods, model, inputs, targets,
                                  AttributionContext(chunk_size=chunk_size, affine_stem=stem))
                     for stem in (True, False))
    for label, maps in expected.items():
        torch.testing.assert_close(got[label], maps, rtol=1e-10, atol=1e-13, msg=label)


def test_the_stem_backward_runs_on_one_row_per_image(resnet) -> None:
    model, inputs, targets = resnet
    rows: list[int] = []
    handle = model.conv1.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        methods = [resolve_method(m) for m in ("gradient", {"name": "integrated_gradients",
                                                            "steps": 8})]
        compute_maps(methods, model, inputs, targets, AttributionContext(chunk_size=1000))
    finally:
        handle.remove()
    # the stem check's one row; the pass (3 images + 3 × 8 path points); the pull-back of the
    # 3 gradient rows and the 3 integrals
    assert rows == [1, 3 + 3 * 8, 3 + 3]


def test_staged_maps_equal_pulling_back_every_row(resnet) -> None:
    """Cascading stages from the head down to the stem itself, through the prefix cache."""
    model, inputs, targets = resnet
    blocks = find_blocks(model, inputs[:1], granularity="layer")
    cascading = plan_stages(blocks, model=model, test="cascading")
    stages = [cascading[0], cascading[len(cascading) // 2], cascading[-2], cascading[-1]]
    assert {"conv1"} <= set(stages[-1].randomized_blocks[-1].module_names)  # the stem too
    methods, got = staged_maps(model, stages, inputs, targets, prefix=True, chunk_size=8)
    _, expected = staged_maps(model, stages, inputs, targets, prefix=True, chunk_size=8,
                              affine_stem=False)
    for index, (maps, reference) in enumerate(zip(got, expected)):
        for method in methods:
            torch.testing.assert_close(maps[method.label], reference[method.label],
                                       rtol=1e-10, atol=1e-13, msg=f"{index} {method.label}")
