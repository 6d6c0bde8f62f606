"""LRP and Deep Taylor against zennit (an LGPL test oracle, never imported by the package),
conservation, LRP-0 = gradient × input on ReLU networks, and one-line refusals."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import Tensor, nn

from saliencycheck.errors import MethodError
from saliencycheck.methods import AttributionContext, resolve_method

zennit = pytest.importorskip("zennit")  # installed by `make` from requirements-oracles.txt
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    LayerMapComposite,
    layer_map_base,
)
from zennit.layer import Sum  # noqa: E402
from zennit.rules import AlphaBeta, Epsilon, Gamma, Norm, ZBox, ZPlus  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402
from zennit.types import AvgPool, Convolution  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONTEXT = AttributionContext(mean=MEAN, std=STD, chunk_size=64)


def calibrated(model: nn.Module, size: int) -> nn.Module:
    """Random init with BatchNorm statistics fitted on random images; float64, eval mode."""
    torch.manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model.eval().double()


def images(size: int, count: int = 2) -> Tensor:
    """Normalised images: pixels uniform in [0, 1], so the box rule's bounds hold."""
    pixels = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (pixels - mean) / std


def bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    return ((0 - mean) / std).expand_as(x[:1]), ((1 - mean) / std).expand_as(x[:1])


def narrow_head(model: tvm.VGG) -> tvm.VGG:
    """VGG with its classifier's layers kept but 64 wide instead of 4096 (102 M parameters
    less): the same kinds of layers for the rules, a test that runs in seconds."""
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(64, 10))
    return model


MODELS = {  # name: (builder, image size, zennit's canonizers)
    "vgg11": (lambda: narrow_head(tvm.vgg11(weights=None)), 32, list),
    "vgg11_bn": (lambda: narrow_head(tvm.vgg11_bn(weights=None)), 32, list),
    "resnet18": (lambda: tvm.resnet18(weights=None, num_classes=10), 32,
                 lambda: [ResNetCanonizer()]),  # its addition as a `Sum` module
}


def merged(model: nn.Module) -> nn.Module:
    """A copy with every batch norm folded into the convolution before it (registration order
    is call order in VGG and ResNet) and replaced by ``nn.Identity``: the same function.

    zennit's own ``MergeBatchNorm`` leaves an identity batch norm that still adds its ε to the
    variance: the canonized model's logits differ from the model's by ~5e-6 per batch norm
    (measured), which compounds to ~6e-5 on VGG-11-BN. Folding by hand keeps the function."""
    import copy

    model = copy.deepcopy(model)
    last = None
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d):
            last = module
        elif isinstance(module, nn.BatchNorm2d):
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            bias = last.bias if last.bias is not None else torch.zeros_like(scale)
            with torch.no_grad():
                last.weight.mul_(scale[:, None, None, None])
                last.bias = nn.Parameter((bias - module.running_mean) * scale + module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model


def zennit_composite(spec: dict, x: Tensor, canonizers: list):
    """zennit's composite for one of our method entries. Its ``Norm`` rule at sums and
    average pooling gets a negligible stabiliser: saliencycheck splits there in exact
    proportion (no division is needed in its form), zennit adds 1e-6 to the denominator."""
    low, high = bounds(x)
    exact = [(Sum, Norm(stabilizer=1e-30)), (AvgPool, Norm(stabilizer=1e-30))]
    composites = {
        "epsilon_plus": lambda: EpsilonPlus(layer_map=exact, canonizers=canonizers),
        "epsilon_gamma_box": lambda: EpsilonGammaBox(low=low, high=high, layer_map=exact,
                                                     canonizers=canonizers),
        "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(layer_map=exact,
                                                           canonizers=canonizers),
    }
    if "composite" in spec:
        return composites[spec["composite"]]()
    if spec["name"] == "deep_taylor":
        first = [(Convolution, ZBox(low=low, high=high))]
        rule = ZPlus()
    else:
        first = []
        rule = {"epsilon": Epsilon(), "gamma": Gamma(gamma=0.25), "zplus": ZPlus(),
                "alpha_beta": AlphaBeta(alpha=2.0, beta=1.0)}[spec["rule"]]
    layer_map = exact + layer_map_base() + [(Convolution, rule), (torch.nn.Linear, rule)]
    if first:
        from zennit.composites import SpecialFirstLayerMapComposite

        return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first,
                                             canonizers=canonizers)
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def zennit_relevance(model: nn.Module, x: Tensor, targets: Tensor, composite) -> Tensor:  # noqa: ANN001
    """zennit's relevance with the explained logit's value as the output relevance."""
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(
            x.clone(), lambda out: torch.eye(out.shape[1], dtype=out.dtype)[targets] * out)
    return relevance


SPECS = [{"name": "lrp", "rule": "epsilon"}, {"name": "lrp", "rule": "gamma"},
         {"name": "lrp", "rule": "zplus"},
         {"name": "lrp", "rule": "alpha_beta", "alpha": 2, "beta": 1},
         {"name": "lrp", "composite": "epsilon_plus"},
         {"name": "lrp", "composite": "epsilon_gamma_box"},
         {"name": "lrp", "composite": "epsilon_alpha2_beta1"},
         {"name": "deep_taylor"}]


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, nn.Module]]:
    """Each model and its copy with the batch norms folded by hand (zennit's input)."""
    built = {name: calibrated(build(), size) for name, (build, size, _) in MODELS.items()}
    return {name: (model, merged(model)) for name, model in built.items()}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.get("composite") or s.get("rule")
                         or s["name"])
def test_lrp_equals_zennit(model_name: str, spec: dict, models: dict) -> None:
    """Every rule and composite equals zennit's to 1e-5 of the map's largest relevance, in
    float64: zennit on the model with its batch norms folded by hand, and with its ResNet
    canonizer; saliencycheck on the model as it is (it merges them per call)."""
    model, folded = models[model_name]
    _, size, canonizers = MODELS[model_name]
    x = images(size)
    with torch.no_grad():
        targets = model(x).argmax(dim=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = resolve_method(spec)(model, x, targets, CONTEXT)
    theirs = zennit_relevance(folded, x, targets,
                              zennit_composite(spec, x, canonizers()))
    scale = theirs.abs().max()
    assert scale > 0
    assert float((ours - theirs).abs().max() / scale) < 1e-5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # zennit restores too
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


class _Residual(nn.Module):
    """Bias-free ReLU network with a residual addition, a concatenation, max and average
    pooling: LRP-ε conserves the logit exactly here (nothing absorbs relevance)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.branch = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.side = nn.Conv2d(6, 2, 1, bias=False)
        self.head = nn.Linear(8 * 4 * 4, 5, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.branch(x) + x)  # residual addition
        x = torch.cat([x, torch.relu(self.side(x))], dim=1)  # concatenation
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.head(x.flatten(1))


CONSERVING = [{"name": "lrp", "rule": "epsilon", "epsilon": 1e-12},
              {"name": "lrp", "rule": "gamma"}, {"name": "lrp", "rule": "zplus"},
              {"name": "lrp", "rule": "alpha_beta", "alpha": 1, "beta": 0},
              {"name": "lrp", "composite": "epsilon_plus"},
              {"name": "lrp", "composite": "epsilon_gamma_box"}, {"name": "deep_taylor"}]


@pytest.mark.parametrize("spec", CONSERVING, ids=lambda s: s.get("composite") or s.get("rule")
                         or s["name"])
def test_relevance_sums_to_the_logit_on_a_bias_free_network(spec: dict) -> None:
    """The rules conserve relevance layer by layer where their denominators are not zero;
    without biases nothing absorbs any, so the map sums to the explained logit. (α2β1 is left
    out: where a neuron has no negative contribution it hands back α = 2 times its share.)"""
    torch.manual_seed(3)
    model = _Residual().double().eval()
    with torch.no_grad():
        model.head.weight.mul_(100)  # logits of order 1: ε = 1e-6 is then negligible
    x = images(16, 4)
    targets = torch.tensor([0, 1, 2, 3])
    maps = resolve_method(spec)(model, x, targets, CONTEXT)
    logits = model(x).gather(1, targets[:, None]).squeeze(1).detach()
    assert logits.abs().min() > 0.1
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), logits, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["resnet50", "vgg11", "googlenet", "inception_v3",
                                  "squeezenet1_1"])
def test_lrp_zero_is_gradient_times_input_on_relu_networks(name: str) -> None:
    """A known identity (Ancona et al. 2018): on a ReLU network, LRP-ε with ε → 0 equals
    gradient × input, batch norms merged, residuals and concatenations split in proportion."""
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet",
                                                                    "inception_v3") else {}
    size = 80 if name == "inception_v3" else 32
    built = tvm.get_model(name, weights=None, num_classes=10, **kwargs)
    model = calibrated(narrow_head(built) if name == "vgg11" else built, size)
    x = images(size)
    targets = model(x).argmax(dim=1)
    ours = resolve_method({"name": "lrp", "rule": "epsilon", "epsilon": 1e-12})(
        model, x, targets, CONTEXT)
    reference = resolve_method("gradient_x_input")(model, x, targets, CONTEXT)
    assert float((ours - reference).abs().max() / reference.abs().max()) < 1e-6


@pytest.mark.parametrize(("name", "reason"), [
    ("convnext_tiny", "layer_norm"), ("efficientnet_b0", "sigmoid"),
    ("vit_b_16", "layer_norm"), ("mobilenet_v3_small", "hardsigmoid"),
])
def test_operations_without_a_rule_are_refused_in_one_line(name: str, reason: str) -> None:
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=5, **kwargs).eval()
    if name == "vit_b_16":
        nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(1, 3, 32, 32)
    for spec in ({"name": "lrp", "composite": "epsilon_plus"}, "deep_taylor"):
        with pytest.raises(MethodError, match=f"calls {reason}.*no LRP rule here") as info:
            resolve_method(spec)(model, x, torch.tensor([0]), CONTEXT)
        assert "\n" not in str(info.value)
    assert not any(m._forward_hooks for m in model.modules())


def test_gating_products_and_the_box_rule_without_a_first_layer_are_refused() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            y = torch.relu(self.conv(x))
            y = y * y.mean(dim=(2, 3), keepdim=True)  # two input-dependent factors
            return self.head(y.mean(dim=(2, 3)))

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(MethodError, match=r"multiplies two input-dependent tensors \(mul"):
        resolve_method("lrp")(Gated().eval(), x, torch.tensor([0, 1]), CONTEXT)
    scaled = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 6 * 6, 2)).eval()
    shifted = nn.Sequential(*[scaled[i] for i in range(1, 5)])

    class Shifted(nn.Module):  # reads its input twice, as Inception's transform_input does
        def forward(self, x: Tensor) -> Tensor:
            return shifted(x * 0.5 + x * 0.5)

    with pytest.raises(MethodError, match="box rule needs a first layer that alone reads the "
                                          "input"):
        resolve_method("deep_taylor")(Shifted().eval(), x, torch.tensor([0, 1]), CONTEXT)
    resolve_method({"name": "lrp", "composite": "epsilon_plus"})(
        Shifted().eval(), x, torch.tensor([0, 1]), CONTEXT)  # no box rule: fine


def test_parameters_are_validated_in_one_line() -> None:
    from saliencycheck.errors import ConfigError

    for entry, message in (
        ({"name": "lrp", "rule": "zplus", "composite": "epsilon_plus"}, "not both"),
        ({"name": "lrp", "rule": "epsilon", "gamma": 0.5}, "gamma not used by epsilon"),
        ({"name": "lrp", "rule": "alpha_beta", "alpha": 2}, "alpha − beta must be 1"),
        ({"name": "lrp", "rule": "box"}, "rule"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_method(entry)
    assert resolve_method({"name": "lrp", "composite": "epsilon_plus"}).label == \
        "lrp_epsilon_plus"
    assert resolve_method("lrp").label == "lrp_epsilon"


def test_the_package_never_imports_zennit() -> None:
    code = ("import sys, torch, saliencycheck, saliencycheck.methods as m, saliencycheck.cli; "
            "m.resolve_method('deep_taylor')(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), "
            "torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval(), torch.randn(1, 3, 4, 4), "
            "torch.tensor([0])); "
            "assert not [k for k in sys.modules if k.startswith('zennit')], 'zennit imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_check_scores_the_maps_of_each_randomized_state(tmp_path) -> None:
    """Through the engine (shared passes over every stage): each stage's stored map equals
    the method called alone on that stage's model; every stage is scored."""
    import numpy as np

    import saliencycheck as sc
    from saliencycheck.api import prepared
    from saliencycheck.runner.executor import UnitExecutor

    torch.manual_seed(4)
    model = tvm.resnet18(weights=None, num_classes=5).eval()
    x = images(32, 2).float()
    arguments = {"methods": [sc.method("lrp", composite="epsilon_plus"), "deep_taylor"],
                 "metrics": ["spearman_abs"], "device": "cpu",
                 "image_settings": {"mean": list(MEAN), "std": list(STD)},
                 "tests": {"cascading": {"granularity": "block",
                                         "blocks": ["fc", "layer4.*", "layer1.0"]}},
                 "baselines": {"random_floor": False},
                 "output_settings": {"figures": False, "save_maps": True}}
    result = sc.check(model, x, output=tmp_path / "run", **arguments)
    rows = result.to_pandas()
    assert set(rows["method"]) == {"lrp_epsilon_plus", "deep_taylor", "random_map"}
    with prepared(model, x, **arguments) as (setup, _):
        executor = UnitExecutor(setup)
        refs = get_cascading_refs(setup)
        targets = setup.model(x).argmax(dim=1)
        (stored,) = (tmp_path / "run" / "maps").glob("image0*.npz")
        with np.load(stored) as saved:
            for index, ref in [(0, None), *enumerate(refs, start=1)]:
                state = executor.model(ref)
                for method in setup.methods:
                    alone = method(state, x, targets, setup.context)[0]
                    np.testing.assert_allclose(saved[f"cascading/{method.label}/{index}"],
                                               alone.numpy(), rtol=1e-4, atol=1e-6)
    assert set(rows[rows["test"] == "cascading"]["stage"]) == {"trained",
                                                              *(r.stage.name for r in refs)}


def get_cascading_refs(setup):  # noqa: ANN001, ANN201
    from saliencycheck.checks import get_check

    return get_check("cascading").refs(setup)


def test_in_place_activations_pass_relevance_through_unchanged() -> None:
    """nn.ReLU6(inplace=True) calls F.hardtanh(x, 0., 6., True) and nn.ELU(inplace=True)
    F.elu(x, 1., True), positionally: the pass rule must keep x, not the overwritten value.
    Without biases the relevance then sums to the logit."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU6(inplace=True),
                          nn.Conv2d(6, 6, 3, bias=False), nn.ELU(inplace=True), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 3, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(8)  # some activations above 6
    x = images(8, 3)
    targets = torch.tensor([0, 1, 2])
    with pytest.warns(UserWarning, match=r"passed through unchanged at elu×1, relu6×1"):
        maps = resolve_method({"name": "lrp", "rule": "epsilon", "epsilon": 1e-12})(
            model, x, targets, CONTEXT)
    logits = model(x).gather(1, targets[:, None])[:, 0].detach()
    assert (model[0](x) > 6).any()
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), logits, rtol=1e-5, atol=1e-9)


def _captum_lrp(model: nn.Module, x: Tensor, targets: Tensor, rule: object) -> Tensor:
    """Captum's ``LRP`` with ``rule`` on every convolution and linear layer (its defaults, ε,
    on the pooling layers), on a copy whose ReLUs are out of place (Captum needs that)."""
    from captum.attr import LRP

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.rule = copy.deepcopy(rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LRP(model).attribute(x.clone(), target=targets)


def _without_biases(model: nn.Module) -> nn.Module:
    """Biases zeroed: with inputs ≥ 0 and a positive target logit, Captum's γ and α1β0 are
    then the same formulas as zennit's, which saliencycheck follows. They differ only where
    this rules out: Captum modifies W alone (zennit W and b), and applies W⁺ to inputs of
    either sign (zennit splits them by sign); units whose pre-activation is negative, where
    zennit's generalised γ boosts the negative contributions instead, hold no relevance after
    their ReLU."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()
    return model


@pytest.mark.parametrize("case", ["epsilon", "gamma", "alpha1_beta0"])
def test_lrp_equals_captum_on_vgg11(case: str) -> None:
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule

    torch.manual_seed(0)
    model = narrow_head(tvm.vgg11(weights=None)).double().eval()
    x = images(32)
    if case != "epsilon":  # where both libraries define the rule alike (see _without_biases)
        model, x = _without_biases(model), x.abs()
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(dim=1)
    assert (logits.gather(1, targets[:, None]) > 0).all()
    ours = {"epsilon": {"rule": "epsilon", "epsilon": 1e-6},
            "gamma": {"rule": "gamma", "gamma": 0.25},
            "alpha1_beta0": {"rule": "alpha_beta", "alpha": 1, "beta": 0}}[case]
    theirs = {"epsilon": EpsilonRule(epsilon=1e-6), "gamma": GammaRule(gamma=0.25),
              "alpha1_beta0": Alpha1_Beta0_Rule()}[case]
    theirs.STABILITY_FACTOR = 1e-6  # Captum's 1e-9 for γ and α1β0; saliencycheck's (zennit's)
    got = resolve_method({"name": "lrp", **ours})(model, x, targets, CONTEXT)
    expected = _captum_lrp(model, x, targets, theirs)
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_string_padding_grouped_and_strided_convolutions_get_the_same_rules() -> None:
    """Wᵀs without a forward (convolution_backward) for numeric padding, strides, dilation and
    groups; through a probe for padding='same': LRP-0 is gradient × input on both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding="same"), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, stride=2, padding=(1, 2), dilation=2, groups=3),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).double()
    x = images(16)
    model(x)
    model.eval()
    targets = torch.tensor([1, 3])
    got = resolve_method({"name": "lrp", "rule": "epsilon", "epsilon": 1e-12})(
        model, x, targets, CONTEXT)
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    torch.testing.assert_close(got, grad * x, rtol=1e-7, atol=1e-10)
