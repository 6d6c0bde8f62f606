"""Attribution methods against independent references (Captum, plain autograd, hand-computed
values), and their properties: batching, chunking, seeding, cleanup, completeness.

Captum defects found here (captum 0.9): its GuidedBackprop / Deconvolution hook ``nn.ReLU``
modules only, so they silently return the plain gradient on Inception-v3 and GoogLeNet
(functional ``F.relu``), MobileNetV2 (``nn.ReLU6``) and EfficientNet (no ReLU), and miss
DenseNet's final ``F.relu``. For those architectures the reference is a plain-autograd guided
ReLU swapped in by monkeypatching ``torch.nn.functional`` (a mechanism independent of ours).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from torch import Tensor, nn
from torchvision.models.googlenet import BasicConv2d as GoogLeNetConv
from torchvision.models.inception import BasicConv2d as InceptionConv

from saliencycheck.errors import ConfigError, MethodError, ModelError
from saliencycheck.methods import (
    AttributionContext,
    ReluRuleWarning,
    available_methods,
    get_method,
    resolve_method,
)
from saliencycheck.methods.baselines import make_baseline
from saliencycheck.methods.layers import default_layer
from saliencycheck.relu_rules import ReluRuleMode

CONTEXT = AttributionContext()
MEAN = torch.tensor(CONTEXT.mean).reshape(1, 3, 1, 1)
STD = torch.tensor(CONTEXT.std).reshape(1, 3, 1, 1)
TARGETS = torch.tensor([3, 7])

# name -> (builder, input size, Grad-CAM default layer at that size)
ARCHS: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "resnet18": (lambda: tvm.resnet18(weights=None), 64, "layer4"),
    "vgg11": (lambda: tvm.vgg11(weights=None), 64, "features"),
    "squeezenet1_1": (lambda: tvm.squeezenet1_1(weights=None), 64, "features"),
    "densenet121": (lambda: tvm.densenet121(weights=None), 64, "features"),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(weights=None), 64, "features"),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(weights=None), 64, "features"),
    "googlenet": (
        lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=True), 64, "inception5b"
    ),
    # At 96 px Mixed_7c outputs 1×1, so the default is the last spatial block, Mixed_6e.
    "inception_v3": (
        lambda: tvm.inception_v3(weights=None, aux_logits=False, init_weights=True), 96, "Mixed_6e"
    ),
}
RELU_ARCHS = [name for name in ARCHS if name != "efficientnet_b0"]
ALL_RELU_MODULES = ["resnet18", "vgg11", "squeezenet1_1"]  # every ReLU an nn.ReLU module


def _calibrate_batchnorm(model: nn.Module, size: int) -> nn.Module:
    """Re-estimate BatchNorm statistics on random inputs so random-init logits are O(1)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1)))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def arch(name: str, double: bool = False) -> tuple[nn.Module, Tensor, Tensor]:
    """A random-init, BatchNorm-calibrated model in eval mode, two normalised images and their
    predicted classes (explaining other classes can give all-zero Grad-CAMs at random init).

    ``double``: a float64 copy, for comparisons where batch composition changes float32
    rounding enough to flip a ReLU gate or max-pool choice near a tie (noisy inputs, chunking).
    """
    return _arch64(name) if double else _arch32(name)


@functools.cache
def _arch64(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    model, inputs, targets = _arch32(name)
    return copy.deepcopy(model).double(), inputs.double(), targets


@functools.cache
def _arch32(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    build, size, _ = ARCHS[name]
    torch.manual_seed(0)
    model = _calibrate_batchnorm(build(), size)
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    inputs = (pixels - MEAN) / STD
    with torch.no_grad():
        return model, inputs, model(inputs).argmax(dim=1)


def assert_maps_close(actual: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    """Relative comparison with an absolute tolerance scaled to the map's magnitude."""
    scale = expected.abs().max().item()
    assert scale > 0, "degenerate reference map"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def max_rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- references


def plain_gradient(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    x = inputs.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    return grad


class _ReferenceRule(torch.autograd.Function):
    """clamp(x, 0, upper) forward; guided or deconvnet backward, written independently."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, deconv: bool, upper: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.deconv, ctx.upper = deconv, upper
        return torch.minimum(torch.maximum(x, torch.zeros_like(x)), torch.full_like(x, upper))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        keep = grad > 0
        keep &= x < ctx.upper
        if not ctx.deconv:
            keep &= x > 0
        return grad * keep.to(grad.dtype), None, None


def patched_relu_gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, *, deconv: bool
) -> Tensor:
    """Guided/deconvnet reference: F.relu and F.hardtanh(0, 6) swapped by monkeypatching."""
    relu, hardtanh = F.relu, F.hardtanh

    def ruled_relu(x: Tensor, inplace: bool = False) -> Tensor:
        return _ReferenceRule.apply(x, deconv, float("inf"))

    def ruled_hardtanh(x: Tensor, min_val: float = -1.0, max_val: float = 1.0,
                       inplace: bool = False) -> Tensor:
        assert (min_val, max_val) == (0.0, 6.0)
        return _ReferenceRule.apply(x, deconv, 6.0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "relu", ruled_relu)
        patch.setattr(F, "hardtanh", ruled_hardtanh)
        grad = plain_gradient(model, inputs, targets)
    assert (F.relu, F.hardtanh) == (relu, hardtanh)
    return grad


def _quiet(fn: Callable[[], Tensor]) -> Tensor:
    """Run a Captum call without its hook / requires_grad warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn().detach()


def reference_baseline(kind: str, inputs: Tensor, blur_sigma: float = 5.0) -> Tensor:
    """Baselines computed independently of saliencycheck.methods.baselines."""
    if kind == "black":
        return ((0 - MEAN) / STD).expand_as(inputs)
    if kind == "white":
        return ((1 - MEAN) / STD).expand_as(inputs)
    if kind == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if kind == "blur":  # scipy's 'mirror' is torch's 'reflect' padding; both truncate at 3σ
        blurred = scipy.ndimage.gaussian_filter(
            inputs.double().numpy(), sigma=(0, 0, blur_sigma, blur_sigma), mode="mirror",
            truncate=3.0,
        )
        return torch.from_numpy(blurred).float()
    if kind == "uniform":  # documented: one U(0,1) pattern from Generator(seed), all images
        pixels = torch.rand(inputs.shape[1:], generator=torch.Generator().manual_seed(0))
        return ((pixels - MEAN) / STD).expand_as(inputs)
    raise ValueError(kind)


def gradcam_reference(model: nn.Module, inputs: Tensor, targets: Tensor, layer: str) -> Tensor:
    cam = LayerGradCam(model, model.get_submodule(layer))
    maps = _quiet(lambda: cam.attribute(inputs, target=targets, relu_attributions=True))
    return LayerAttribution.interpolate(maps, inputs.shape[2:], interpolate_mode="bilinear")


def smoothing_reference(
    attribution: Any, inputs: Tensor, targets: Tensor, *, samples: int, noise: float,
    nt_type: str, **kwargs: Any,
) -> Tensor:
    """Captum NoiseTunnel per image (σ depends on the image), fed our documented noise:
    ε = randn((samples, C, H, W)) from Generator(seed), shared by all images."""
    eps = torch.randn((samples, *inputs.shape[1:]), generator=torch.Generator().manual_seed(0))
    maps = []
    for x, t in zip(inputs.split(1), targets.split(1)):
        sigma = noise * (x.max() - x.min()).item()
        tunnel = NoiseTunnel(attribution)
        tunnel._add_noise_to_input = lambda inp, stdev, n: inp.repeat_interleave(n, 0) + stdev * eps
        maps.append(_quiet(lambda: tunnel.attribute(
            x, nt_type=nt_type, nt_samples=samples, stdevs=sigma, target=t, **kwargs
        )))
    return torch.cat(maps)


def _ref_gradient(model, inputs, targets, params, layer):
    return _quiet(lambda: Saliency(model).attribute(inputs, target=targets, abs=False))


def _ref_gradient_x_input(model, inputs, targets, params, layer):
    return _quiet(lambda: InputXGradient(model).attribute(inputs, target=targets))


def _ref_integrated_gradients(model, inputs, targets, params, layer):
    baseline = reference_baseline(params.get("baseline", "black"), inputs)
    ig = IntegratedGradients(model)
    return _quiet(lambda: ig.attribute(
        inputs, baselines=baseline, target=targets, n_steps=params["steps"],
        method="gausslegendre",
    ))


def _ref_captum_guided(model, inputs, targets, params, layer):
    return _quiet(lambda: GuidedBackprop(model).attribute(inputs, target=targets))


def _ref_captum_deconvnet(model, inputs, targets, params, layer):
    return _quiet(lambda: Deconvolution(model).attribute(inputs, target=targets))


def _ref_patched_guided(model, inputs, targets, params, layer):
    return patched_relu_gradient(model, inputs, targets, deconv=False)


def _ref_patched_deconvnet(model, inputs, targets, params, layer):
    return patched_relu_gradient(model, inputs, targets, deconv=True)


def _ref_gradcam(model, inputs, targets, params, layer):
    return gradcam_reference(model, inputs, targets, layer)


def _ref_gradcam_plus_plus(model, inputs, targets, params, layer):
    """Grad-CAM++ from its paper (Chattopadhyay et al. 2018, eq. 19): with Y = exp(S) and a
    network piecewise linear beyond the layer, ∂ⁿY/∂Aⁿ = Y gⁿ; the map is divided by Y (our
    maps leave out that per-image factor). Activation and gradient read through hooks."""
    kept = {}

    def keep(module: nn.Module, args: object, output: Tensor) -> Tensor:
        kept["a"] = output
        return output.clone()  # DenseNet's later in-place ReLU must not change what is kept

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        logits = model(inputs.clone().requires_grad_(True))
    finally:
        handle.remove()
    score = logits.gather(1, targets[:, None]).squeeze(1)
    (g,) = torch.autograd.grad(score.sum(), kept["a"])
    a, y = kept["a"].detach(), score.detach().exp().view(-1, 1, 1, 1)
    d1, d2, d3 = y * g, y * g ** 2, y * g ** 3
    denominator = 2 * d2 + a.sum(dim=(2, 3), keepdim=True) * d3
    alpha = torch.where(denominator != 0, d2 / torch.where(denominator != 0, denominator, 1), 0)
    weights = (alpha * d1.clamp(min=0)).sum(dim=(2, 3), keepdim=True) / y
    cam = (weights * a).sum(dim=1, keepdim=True).clamp(min=0)
    return LayerAttribution.interpolate(cam, inputs.shape[2:], interpolate_mode="bilinear")


def _ref_captum_guided_gradcam(model, inputs, targets, params, layer):
    ggc = GuidedGradCam(model, model.get_submodule(layer))
    return _quiet(lambda: ggc.attribute(inputs, target=targets, interpolate_mode="bilinear"))


def _ref_patched_guided_gradcam(model, inputs, targets, params, layer):
    guided = patched_relu_gradient(model, inputs, targets, deconv=False)
    return guided * gradcam_reference(model, inputs, targets, layer)


def _ref_smoothgrad(model, inputs, targets, params, layer):
    inner = {"gradient": Saliency, "guided_backprop": GuidedBackprop,
             "integrated_gradients": IntegratedGradients}[params.get("of", "gradient")](model)
    kwargs: dict[str, Any] = {"abs": False} if isinstance(inner, Saliency) else {}
    if isinstance(inner, IntegratedGradients):
        kwargs = {"n_steps": params["of_params"]["steps"], "method": "gausslegendre",
                  "baselines": reference_baseline("black", inputs[:1]).contiguous()}
    return smoothing_reference(
        inner, inputs, targets, samples=params["samples"], noise=params.get("noise", 0.15),
        nt_type="vargrad" if params.get("_vargrad") else "smoothgrad", **kwargs,
    )


@dataclass(frozen=True)
class Case:
    """One (method × architecture) configuration and its independent reference."""

    method: str
    arch: str
    reference: Callable[..., Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    rtol: float = 1e-4
    double: bool = False

    @property
    def id(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params.items() if k != "of_params")
        return f"{self.method}-{self.arch}" + (f"-{extra}" if extra else "")


CASES = [
    *[Case("gradient", a, _ref_gradient) for a in ARCHS],
    *[Case("gradient_x_input", a, _ref_gradient_x_input)
      for a in ("resnet18", "densenet121", "inception_v3")],
    Case("integrated_gradients", "resnet18", _ref_integrated_gradients, {"steps": 8}),
    Case("integrated_gradients", "googlenet", _ref_integrated_gradients,
         {"steps": 3, "baseline": "mean"}),
    Case("integrated_gradients", "mobilenet_v2", _ref_integrated_gradients,
         {"steps": 3, "baseline": "white"}),
    Case("integrated_gradients", "resnet18", _ref_integrated_gradients,
         {"steps": 4, "baseline": "blur"}),
    Case("integrated_gradients", "squeezenet1_1", _ref_integrated_gradients,
         {"steps": 4, "baseline": "uniform"}),
    # Captum agrees where every ReLU is an nn.ReLU module (ResNet reuses one per block).
    *[Case("guided_backprop", a, _ref_captum_guided) for a in ALL_RELU_MODULES],
    *[Case("deconvnet", a, _ref_captum_deconvnet) for a in ALL_RELU_MODULES],
    *[Case("guided_backprop", a, _ref_patched_guided) for a in RELU_ARCHS],
    *[Case("deconvnet", a, _ref_patched_deconvnet) for a in RELU_ARCHS],
    *[Case("gradcam", a, _ref_gradcam) for a in ARCHS],
    *[Case("gradcam_plus_plus", a, _ref_gradcam_plus_plus)
      for a in ("resnet18", "vgg11", "densenet121")],
    Case("guided_gradcam", "resnet18", _ref_captum_guided_gradcam),
    Case("guided_gradcam", "vgg11", _ref_captum_guided_gradcam),
    Case("guided_gradcam", "densenet121", _ref_patched_guided_gradcam),
    # Noisy inputs in float64: in float32 a different batch size can flip a near-tie gate.
    Case("smoothgrad", "resnet18", _ref_smoothgrad, {"samples": 4}, double=True),
    Case("smoothgrad", "resnet18", _ref_smoothgrad,
         {"samples": 3, "of": "guided_backprop", "noise": 0.3}, double=True),
    Case("smoothgrad", "squeezenet1_1", _ref_smoothgrad,
         {"samples": 2, "of": "integrated_gradients", "of_params": {"steps": 3}}, double=True),
    Case("vargrad", "resnet18", _ref_smoothgrad, {"samples": 4}, double=True),
]


def _method_params(case: Case) -> dict[str, Any]:
    return {k: v for k, v in case.params.items() if not k.startswith("_")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_method_matches_reference(case: Case) -> None:
    model, inputs, targets = arch(case.arch, case.double)
    method = resolve_method({"name": case.method, **_method_params(case)})
    params = {**case.params, "_vargrad": case.method == "vargrad"}
    expected = case.reference(model, inputs, targets, params, ARCHS[case.arch][2])
    with torch.no_grad():  # methods must enable grad themselves
        actual = method(model, inputs, targets, CONTEXT)
    assert actual.shape == expected.shape
    assert_maps_close(actual, expected, rtol=case.rtol)


# ------------------------------------------------------------ modified ReLU: Captum's defect


@pytest.mark.parametrize("name", ["googlenet", "inception_v3", "mobilenet_v2", "densenet121"])
def test_guided_backprop_covers_relus_that_captum_misses(name: str) -> None:
    model, inputs, targets = arch(name)
    ours = get_method("guided_backprop").fn(model, inputs, targets, CONTEXT)
    gradient = plain_gradient(model, inputs, targets)
    captum = _ref_captum_guided(model, inputs, targets, {}, None)
    assert max_rel_diff(ours, gradient) > 0.5
    if name == "densenet121":  # Captum modifies the nn.ReLUs, misses the final F.relu
        assert max_rel_diff(captum, ours) > 0.05
    else:  # functional F.relu or nn.ReLU6 only: Captum returns the plain gradient
        torch.testing.assert_close(captum, gradient)


def _count_calls(model: nn.Module, inputs: Tensor, kinds: tuple[type, ...]) -> int:
    """How many times modules of ``kinds`` run in one forward (forward hooks)."""
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1))
               for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)


@pytest.mark.parametrize(
    ("name", "kinds", "functional"),
    [
        ("resnet18", (nn.ReLU,), 0),  # one nn.ReLU per block, applied twice
        ("densenet121", (nn.ReLU,), 1),  # + F.relu after `features`
        ("googlenet", (GoogLeNetConv,), 0),  # one F.relu in each
        ("inception_v3", (InceptionConv,), 0),
        ("mobilenet_v2", (nn.ReLU6,), 0),
    ],
)
def test_relu_interceptions_count_every_application(name, kinds, functional) -> None:
    model, inputs, targets = arch(name)
    mode = ReluRuleMode("guided")
    with torch.no_grad(), mode:
        model(inputs[:1])
    report = mode.report()
    assert report.relu_calls == _count_calls(model, inputs[:1], kinds) + functional
    assert report.other_activations == {}
    if name == "resnet18":
        assert report.relu_calls == 17  # stem + 2 per basic block × 8


def test_modified_backward_hand_computed() -> None:
    """x → W1 → ReLU → W2 → logits, and the same with ReLU6; rules applied by hand."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 4) * 3, torch.randn(3, 6)
    for activation, upper in ((nn.ReLU(inplace=True), np.inf), (nn.ReLU6(inplace=True), 6.0)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6, bias=False), activation,
                              nn.Linear(6, 3, bias=False)).eval()
        model[1].weight.data, model[3].weight.data = w1.clone(), w2.clone()
        inputs = torch.randn(5, 1, 2, 2)
        targets = torch.tensor([0, 1, 2, 0, 1])
        z = inputs.flatten(1) @ w1.T
        assert ((z > 0) & (z < upper)).any() and (z < 0).any()
        assert upper == np.inf or (z > upper).any()
        up = w2[targets].clamp(min=0)
        guided = (up * ((z > 0) & (z < upper))) @ w1
        deconv = (up * (z < upper)) @ w1
        for name, expected in (("guided_backprop", guided), ("deconvnet", deconv)):
            actual = get_method(name).fn(model, inputs, targets, CONTEXT)
            torch.testing.assert_close(actual.flatten(1), expected)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_modified_backward_without_relu_raises(method: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with pytest.raises(MethodError, match="applies no ReLU.*use gradient"):
        resolve_method(method)(model.eval(), torch.randn(2, 3, 8, 8), TARGETS % 5)
    model, inputs, targets = arch("efficientnet_b0")  # SiLU and sigmoid only
    with pytest.raises(MethodError, match=r"silu×49"):
        resolve_method(method)(model, inputs, targets)


def test_other_activations_warn_once_per_call() -> None:
    torch.manual_seed(0)
    model = _calibrate_batchnorm(tvm.mobilenet_v3_small(weights=None), 64)  # ReLU + Hardswish
    inputs = torch.randn(2, 3, 64, 64)
    with pytest.warns(ReluRuleWarning, match="ReLU only.*hardswish") as record:
        get_method("guided_backprop").fn(
            model, inputs, TARGETS, AttributionContext(chunk_size=1)
        )
    assert len([w for w in record if issubclass(w.category, ReluRuleWarning)]) == 1
    mode = ReluRuleMode("deconvnet")
    with torch.no_grad(), mode:
        model(inputs[:1])
    report = mode.report()
    assert report.relu_calls > 0 and report.other_activations["hardswish"] > 0


# -------------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize(("name", "size", "expected"), [
    *[(name, size, layer) for name, (_, size, layer) in ARCHS.items()],
    ("inception_v3", 128, "Mixed_7c"),  # 2×2 there
])
def test_gradcam_default_layer(name: str, size: int, expected: str) -> None:
    model, _, _ = arch(name)
    assert default_layer(model, torch.randn(1, 3, size, size)) == expected


def test_gradcam_keeps_activations_from_later_inplace_ops() -> None:
    """The explained layer's output is overwritten in place downstream (as in DenseNet)."""

    class InplaceAfter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(1, 2, 3, padding=1)
            self.head = nn.Linear(2, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(F.relu(self.features(x), inplace=True).sum(dim=(2, 3)) ** 2)

    torch.manual_seed(0)
    model = InplaceAfter().eval()
    inputs, targets = torch.randn(2, 1, 5, 5), torch.tensor([0, 2])
    a = model.features(inputs).detach()
    # logit_t = Σ_j W_tj (Σ_hw relu(a_j))² + b  →  ∂/∂a_jhw = 2 W_tj S_j 1[a_jhw > 0]
    s = a.clamp(min=0).sum(dim=(2, 3))
    w = model.head.weight[targets].detach()
    grads = 2 * w[:, :, None, None] * s[:, :, None, None] * (a > 0)
    expected = (grads.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    actual = get_method("gradcam").fn(model, inputs, targets, CONTEXT, layer="features")
    assert (a < 0).any() and (expected > 0).any()
    torch.testing.assert_close(actual, expected)  # 5×5 → 5×5: interpolation is the identity


def test_gradcam_unknown_layer_lists_modules() -> None:
    model, inputs, targets = arch("resnet18")
    with pytest.raises(ModelError, match=r"no module 'layer9'.*layer4, avgpool, fc"):
        resolve_method({"name": "gradcam", "layer": "layer9"})(model, inputs, targets)


# ---------------------------------------------------------------- integrated gradients


class _Quadratic(nn.Module):
    """f_c(x) = Σ_j (W_cj · x)² + v_c · x: a polynomial, so Gauss–Legendre is exact."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, features, dtype=torch.float64))
        self.v = nn.Linear(features, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return (torch.einsum("cjf,nf->ncj", self.w, x) ** 2).sum(-1) + self.v(x)


@pytest.mark.parametrize("baseline", ["black", "white", "mean", "blur", "uniform"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_integrated_gradients_completeness(baseline: str, steps: int) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2])
    reference = make_baseline(baseline, inputs, CONTEXT, blur_sigma=5.0)  # the one IG uses
    linear = nn.Sequential(nn.Flatten(), nn.Linear(48, 3, dtype=torch.float64)).eval()
    for model in (linear, _Quadratic(48).eval()):
        attributions = resolve_method(
            {"name": "integrated_gradients", "steps": steps, "baseline": baseline}
        )(model, inputs, targets)
        with torch.no_grad():
            rise = (model(inputs) - model(reference)).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), rise, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ SmoothGrad / VarGrad


def test_smoothgrad_with_one_noiseless_sample_is_the_inner_method() -> None:
    model, inputs, targets = arch("resnet18")
    for inner in ("gradient", "guided_backprop"):
        smooth = resolve_method({"name": "smoothgrad", "of": inner, "samples": 1, "noise": 0.0})
        assert torch.equal(
            smooth(model, inputs, targets, CONTEXT),
            get_method(inner).fn(model, inputs, targets, CONTEXT),
        )


def test_smoothgrad_noise_is_seeded_locally() -> None:
    model, inputs, targets = arch("squeezenet1_1")
    smooth = resolve_method({"name": "vargrad", "samples": 3})
    state = torch.random.get_rng_state()
    first = smooth(model, inputs, targets, AttributionContext(seed=5))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(first, smooth(model, inputs, targets, AttributionContext(seed=5)))
    assert not torch.allclose(first, smooth(model, inputs, targets, AttributionContext(seed=6)))


# ---------------------------------------------------- batching, chunking, cleanup (all methods)

USER_MODULE = "user_attributions"
ALL_METHODS: dict[str, dict[str, Any]] = {
    "gradient": {},
    "gradient_x_input": {},
    "integrated_gradients": {"steps": 3, "baseline": "uniform"},
    "guided_backprop": {},
    "deconvnet": {},
    "gradcam": {},
    "gradcam_plus_plus": {},
    "guided_gradcam": {},
    "lrp": {"composite": "epsilon_gamma_box"},
    "deep_taylor": {},
    "deeplift": {"baseline": "mean"},
    "occlusion": {"window": 8, "stride": 6},  # 64 px: 11×11 positions, the last edge-aligned
    "attention_rollout": {"head_fusion": "max"},
    "gradient_rollout": {},
    "smoothgrad": {"samples": 3},
    "vargrad": {"samples": 3, "of": "integrated_gradients", "of_params": {"steps": 2}},
    "custom": {"callable": f"{USER_MODULE}:gradient_times"},
}


ATTENTION_METHODS = {"attention_rollout", "gradient_rollout"}  # they need MultiheadAttention


def _small_vit(double: bool = False) -> nn.Module:
    """A 2-layer ViT on 16×16 inputs (4×4 patches), head drawn at random (not zero)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                              hidden_dim=8, mlp_dim=16, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return (model.double() if double else model).eval()


def test_every_registered_method_is_covered() -> None:
    assert list(ALL_METHODS) == [spec.name for spec in available_methods()]
    for spec in available_methods():
        assert spec.description
        assert all(info.description for info in spec.params.model_fields.values())


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A user module with attribution functions, importable for the test's duration."""
    (tmp_path / f"{USER_MODULE}.py").write_text(
        "import torch\n"
        "def gradient_times(model, inputs, targets, *, scale=1.0):\n"
        "    x = inputs.requires_grad_(True)\n"
        "    score = model(x).gather(1, targets[:, None]).sum()\n"
        "    return scale * torch.autograd.grad(score, x)[0]\n"
        "def channel_sum(model, inputs, targets):\n"
        "    return inputs.sum(dim=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return USER_MODULE


@pytest.mark.usefixtures("user_module")
@pytest.mark.parametrize("name", ALL_METHODS)
def test_batch_equals_single_images_and_chunks(name: str) -> None:
    model, inputs, targets = arch("resnet18", double=True)
    if name in ATTENTION_METHODS:
        model, inputs, targets = _small_vit(double=True), torch.randn(
            len(inputs), 3, 16, 16, generator=torch.Generator().manual_seed(0)).double(), \
            targets % 10
    method = resolve_method({"name": name, **ALL_METHODS[name]})
    batch = method(model, inputs, targets, CONTEXT)
    singles = torch.cat([method(model, x, t, CONTEXT) for x, t in zip(inputs.split(1),
                                                                      targets.split(1))])
    chunked = method(model, inputs, targets, AttributionContext(chunk_size=1))
    assert_maps_close(singles, batch, rtol=1e-5)
    assert_maps_close(chunked, batch, rtol=1e-5)
    assert not torch.equal(batch[0], batch[1])


class _Boom(nn.Module):
    """Identity that raises when armed: an exception in the middle of the forward."""

    armed = False

    def forward(self, x: Tensor) -> Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


def _small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3),
        nn.ReLU(), _Boom(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    ).eval()
    model[0].weight.requires_grad_(False)  # a frozen parameter must stay frozen
    return model


def _assert_untouched(model: nn.Module, state: dict[str, Tensor], flags: list[bool]) -> None:
    for module in model.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks"):
            assert not getattr(module, hooks), f"{hooks} left on {type(module).__name__}"
        assert not module.training
    assert not torch.overrides._get_current_function_mode_stack()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.usefixtures("user_module")
@pytest.mark.parametrize("name", ALL_METHODS)
def test_model_and_inputs_untouched_even_after_an_error(name: str) -> None:
    model, boom, size = _small_cnn(), 5, 8
    if name in ATTENTION_METHODS:  # the error in the middle of the encoder
        model, boom, size = _small_vit(), None, 16
        layers = model.encoder.layers
        layers.encoder_layer_1 = nn.Sequential(_Boom(), layers.encoder_layer_1).eval()
        layers.encoder_layer_0.self_attention.out_proj.weight.requires_grad_(False)
    layer = {"layer": "3"} if "gradcam" in name else {}
    method = resolve_method({"name": name, **ALL_METHODS[name], **layer})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    inputs = torch.randn(2, 3, size, size)
    copy = inputs.clone()
    maps = method(model, inputs, TARGETS, CONTEXT)
    assert maps.shape[0] == 2 and not maps.requires_grad
    assert torch.equal(inputs, copy) and not inputs.requires_grad and inputs.grad is None
    _assert_untouched(model, state, flags)
    armed = model[boom] if boom is not None else model.encoder.layers.encoder_layer_1[0]
    armed.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        method(model, inputs, TARGETS, CONTEXT)
    armed.armed = False
    _assert_untouched(model, state, flags)


def test_context_and_normalisation_are_checked() -> None:
    with pytest.raises(ConfigError, match="^chunk_size: "):
        AttributionContext(chunk_size=0)
    with pytest.raises(ConfigError, match="^mean/std: "):
        AttributionContext(mean=(0.5,), std=(0.2, 0.2))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    grey = torch.zeros(2, 1, 4, 4)
    ig = resolve_method({"name": "integrated_gradients", "steps": 1})
    with pytest.raises(MethodError, match="3 mean/std values but the inputs have 1 channel"):
        ig(model, grey, TARGETS % 3)
    mnist = AttributionContext(mean=(0.1307,), std=(0.3081,))
    black = torch.full((2, 1, 4, 4), (0 - 0.1307) / 0.3081)  # the baseline: zero attribution
    assert ig(model, black, TARGETS % 3, mnist).abs().max() < 1e-6


def test_inference_mode_and_training_mode_are_rejected() -> None:
    model, inputs, targets = arch("resnet18")
    with torch.inference_mode(), pytest.raises(MethodError, match="inference_mode"):
        get_method("gradient").fn(model, inputs, targets, CONTEXT)
    model = _small_cnn().train()
    with pytest.raises(ModelError, match=r"model.eval\(\)"):
        get_method("gradient").fn(model, torch.randn(2, 3, 8, 8), TARGETS, CONTEXT)


# ------------------------------------------------------------------------------ custom


def test_custom_method(user_module: str) -> None:
    model, inputs, targets = arch("resnet18")
    method = resolve_method({"name": "custom", "callable": f"{user_module}:gradient_times",
                             "params": {"scale": 2.0}})
    with torch.no_grad():
        maps = method(model, inputs, targets)
    assert_maps_close(maps, 2 * plain_gradient(model, inputs, targets))
    wrong = resolve_method({"name": "custom", "callable": f"{user_module}:channel_sum"})
    with pytest.raises(MethodError, match=r"returned \(2, 64, 64\).*\(2, 3 or 1, 64, 64\)"):
        wrong(model, inputs, targets)


@pytest.mark.parametrize("path", ["no_such_module:fn", "torch:no_such_fn", "torch", "torch:pi"])
def test_custom_import_failure_names_the_callable(path: str) -> None:
    with pytest.raises(ConfigError, match=rf"^callable: .*'{path}'"):
        resolve_method({"name": "custom", "callable": path})


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize(("entry", "message"), [
    ("gradcamm", r"^name: unknown method 'gradcamm' \(did you mean 'gradcam'\?\); choose "
                 r"one of: gradient, "),
    ({"steps": 3}, r"^name: required"),
    ({"name": "integrated_gradients", "stpes": 3}, r"^stpes: unknown .* takes: steps, baseline"),
    ({"name": "integrated_gradients", "steps": 0}, r"^steps: .*greater than or equal to 1"),
    ({"name": "integrated_gradients", "baseline": "grey"}, r"^baseline: 'grey' is not one of"),
    ({"name": "smoothgrad", "of": "vargrad"}, r"^of: unknown or unsupported method 'vargrad'"),
    ({"name": "smoothgrad", "of": "integrated_gradients", "of_params": {"steps": -1}},
     r"^of_params\.steps: "),
    ({"name": "smoothgrad", "of_params": {"name": "gradcam"}}, r"^of_params: .*'of'"),
    ({"name": "gradient", "label": 3}, r"^label: must be a string"),
    (["gradient"], r"a name or a mapping"),
])
def test_resolve_method_errors_name_the_field(entry: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        resolve_method(entry)
    assert "\n" not in str(error.value)


def test_resolve_method_labels_and_defaults() -> None:
    plain = resolve_method("integrated_gradients")
    assert (plain.name, plain.label, plain.params.steps, plain.params.baseline) == (
        "integrated_gradients", "integrated_gradients", 50, "black")
    assert resolve_method({"name": "integrated_gradients", "baseline": "blur"}).label == (
        "integrated_gradients")
    assert resolve_method({"name": "gradient", "label": "grad"}).label == "grad"
    assert resolve_method("vargrad").params.samples == 25
    assert resolve_method("smoothgrad").params.samples == 50
    assert resolve_method("smoothgrad").params.noise == 0.15
