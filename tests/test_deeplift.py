"""DeepLIFT-Rescale by call: equal to Captum's where Captum is right (every nonlinearity a module
called once), summation-to-delta where Captum breaks it (module reuse, functional calls)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from captum.attr import DeepLift
from torch import Tensor, nn

from saliencycheck.errors import MethodError
from saliencycheck.methods import AttributionContext, resolve_method
from saliencycheck.methods.baselines import make_baseline

CONTEXT = AttributionContext(chunk_size=3)  # several chunks for the 4 images below


def calibrated(model: nn.Module, size: int) -> nn.Module:
    """Random init, BatchNorm statistics fitted on random images; float64, eval mode."""
    torch.manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model.eval().double()


def inputs(size: int = 16, count: int = 4) -> Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)


class Distinct(nn.Module):
    """Every nonlinearity its own module, called once: where Captum's DeepLift is right.
    Conv-BN-ReLU, average pooling, a residual addition, sigmoid and ELU. (Not max pooling:
    Captum's rule there misses summation-to-delta, see below.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), \
            nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2, self.relu2 = nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        self.conv3, self.act3 = nn.Conv2d(6, 4, 1), nn.ELU()
        self.head, self.gate = nn.Linear(4 * 8 * 8, 8), nn.Sigmoid()
        self.out = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.conv2(x)) + x
        x = self.act3(self.conv3(x))
        return self.out(self.gate(self.head(x.flatten(1))))


class Reused(Distinct):
    """The same function with one ReLU module applied twice and a functional ELU: Captum's
    DeepLift mishandles both; the attributions must not change."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu1(self.conv2(x)) + x  # relu1 again
        x = F.elu(self.conv3(x))
        return self.out(torch.sigmoid(self.head(x.flatten(1))))


def captum_deeplift(model: nn.Module, x: Tensor, targets: Tensor, reference: Tensor
                    ) -> tuple[Tensor, Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeepLift(model).attribute(x.clone(), baselines=reference, target=targets,
                                         return_convergence_delta=True)


@pytest.mark.parametrize("baseline", ["black", "blur", "uniform"])
def test_deeplift_equals_captum_where_every_nonlinearity_is_a_module_called_once(
        baseline: str) -> None:
    distinct = calibrated(Distinct(), 16)
    x = inputs()
    targets = torch.tensor([0, 1, 2, 3])
    reference = make_baseline(baseline, x, CONTEXT, blur_sigma=2.0)
    theirs, _ = captum_deeplift(distinct, x, targets, reference)
    method = resolve_method({"name": "deeplift", "baseline": baseline, "blur_sigma": 2.0})
    ours = method(distinct, x, targets, CONTEXT)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    # the same function with a reused ReLU module and functional calls: the same map
    reused = Reused().double().eval()
    reused.load_state_dict(distinct.state_dict())
    torch.testing.assert_close(method(reused, x, targets, CONTEXT), ours, rtol=1e-9, atol=1e-12)
    gap = (distinct(x) - distinct(reference)).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(ours.sum(dim=(1, 2, 3)), gap.detach(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v2"])
def test_summation_to_delta_holds_where_captum_breaks_it(name: str) -> None:
    """torchvision's ResNet applies one ReLU module several times per block (Captum refuses
    it), DenseNet calls F.relu and MobileNetV2 uses ReLU6 (Captum's attributions miss
    f(x) − f(x′) by more than the gap itself, by its own convergence delta); saliencycheck's
    sum to it within 1e-4 of the gap."""
    model = calibrated(tvm.get_model(name, weights=None, num_classes=10), 32)
    x = inputs(32, 2)
    targets = model(x).argmax(dim=1)
    reference = make_baseline("black", x, CONTEXT, blur_sigma=5.0)
    gap = (model(x) - model(reference)).gather(1, targets[:, None])[:, 0].detach()
    ours = resolve_method("deeplift")(model, x, targets, CONTEXT)
    assert float(((ours.sum(dim=(1, 2, 3)) - gap).abs() / gap.abs()).max()) < 1e-4
    if name == "resnet18":
        with pytest.raises(RuntimeError, match="used more than once"):
            captum_deeplift(model, x, targets, reference)
    else:
        _, delta = captum_deeplift(model, x, targets, reference)
        assert float((delta.abs() / gap.abs()).max()) > 1.0


class MaxPooled(Distinct):
    """Distinct with a max pool (non-overlapping) and an overlapping one."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.relu1(self.bn1(self.conv1(x))), 2)
        x = self.relu2(self.conv2(x)) + x
        x = F.max_pool2d(self.act3(self.conv3(x)), 3, stride=1, padding=1)
        return self.out(self.gate(self.head(x.flatten(1))))


def test_max_pooling_splits_the_difference_at_the_cross_maximum_and_sums_to_delta() -> None:
    """Captum's rule (Δy split at max(y, y′) between the input's and the reference's winner),
    with overlapping windows adding up: the sum is exact, where Captum's own delta is not."""
    model = MaxPooled().double().eval()
    model.load_state_dict(calibrated(Distinct(), 16).state_dict())
    x = inputs()
    targets = torch.tensor([0, 1, 2, 3])
    reference = make_baseline("black", x, CONTEXT, blur_sigma=5.0)
    gap = (model(x) - model(reference)).gather(1, targets[:, None])[:, 0].detach()
    ours = resolve_method("deeplift")(model, x, targets, CONTEXT)
    torch.testing.assert_close(ours.sum(dim=(1, 2, 3)), gap, rtol=1e-9, atol=1e-12)
    # one pooled value by hand: the input's winner gets M − y′, the reference's y − M
    a = torch.tensor([[[[1.0, 3.0], [0.0, 2.0]]]], dtype=torch.float64)
    b = torch.tensor([[[[4.0, 0.5], [0.0, 1.0]]]], dtype=torch.float64)
    net = nn.Sequential(nn.MaxPool2d(2), nn.Flatten()).eval()  # the logit: the max
    from saliencycheck.methods.deeplift import deeplift

    with pytest.MonkeyPatch.context() as patch:  # the reference input is b itself
        patch.setattr("saliencycheck.methods.deeplift.make_baseline",
                      lambda *args, **kwargs: b)
        got = deeplift(net, a, torch.tensor([0]), AttributionContext())
    # y = 3 (at [0, 1]), y′ = 4 (at [0, 0]), M = 4: 0 to the input's winner, −1 to the
    # reference's, divided by Δx there (−3): multiplier 1/3, attribution (1 − 4)/3 = −1
    expected = torch.zeros_like(a)
    expected[0, 0, 0, 0] = -1.0
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("name", "reason"), [("efficientnet_b0", "multiplies two"),
                                              ("convnext_tiny", "calls layer_norm")])
def test_operations_without_a_rescale_rule_are_refused_in_one_line(name: str,
                                                                   reason: str) -> None:
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=5).eval()
    with pytest.raises(MethodError, match=f"deeplift: the model {reason}") as info:
        resolve_method("deeplift")(model, torch.randn(1, 3, 32, 32), torch.tensor([0]))
    assert "\n" not in str(info.value)


def test_control_flow_on_the_input_is_refused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 2, 3), nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            if x.mean() > -1:  # the black baseline (about -2.1) takes the other branch
                y = torch.relu(y)
            return self.head(y.mean(dim=(2, 3)))

    with pytest.raises(MethodError, match="calls differ|more nonlinearities|fewer"):
        resolve_method("deeplift")(Branchy().eval(), torch.zeros(1, 3, 8, 8),
                                   torch.tensor([0]))
