"""Transformers and channels-last models: Grad-CAM reads token and NHWC layers correctly (against
hand-written hooks and reshapes), or refuses; the default layer follows the stated rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from saliencycheck.errors import MethodError, ModelError
from saliencycheck.methods import AttributionContext, get_method, resolve_method
from saliencycheck.methods.layers import (
    default_layer,
    layer_layout,
    spatial_layout,
    to_nchw,
    token_grid,
)
from saliencycheck.runner.setup import with_default_layers


def tiny_vit() -> VisionTransformer:
    """A 2-layer ViT on 32×32 inputs, 8×8 patches (a 4×4 grid after the class token), with a
    head drawn at random (torchvision starts it at zero: every gradient would be zero)."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=16, mlp_dim=32, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def tiny_swin() -> SwinTransformer:
    """Two Swin stages on 32×32 inputs: 8×8 patches, merged to 4×4, channels last."""
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=5).eval()


def reference_cam(model: nn.Module, x: Tensor, targets: Tensor, layer: str,
                  as_map) -> Tensor:  # noqa: ANN001 (a function)
    """Grad-CAM written out: hook the layer, backprop the target logits, read the activation and
    its gradient as (N, K, h, w) with ``as_map``, weight by the spatial mean gradient, ReLU,
    upsample bilinearly."""
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: kept.setdefault("a", output))
    try:
        logits = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), kept["a"])
    a, g = as_map(kept["a"].detach()), as_map(grad)
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True).clamp(min=0)
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)


def test_layouts_read_from_shapes() -> None:
    assert token_grid(197, (224, 224)) == (1, 14, 14)  # ViT-B/16: class token, 14×14 patches
    assert token_grid(196, (224, 224)) == (0, 14, 14)  # no class token
    assert token_grid(13, (48, 64)) == (1, 3, 4)  # a 3:4 input, a 3×4 grid
    assert token_grid(10, (32, 32)) == (1, 3, 3)
    assert token_grid(2, (32, 32)) is None  # one patch is no map
    assert spatial_layout((2, 197, 768), (224, 224)) == "tokens"
    assert spatial_layout((2, 7, 7, 768), (224, 224)) == "nhwc"  # Swin's norm
    assert spatial_layout((2, 512, 7, 7), (224, 224)) == "nchw"
    assert spatial_layout((2, 512, 2, 2), (48, 64)) == "nchw"  # rounding: no NHWC evidence
    assert spatial_layout((2, 10), (224, 224)) is None
    assert spatial_layout((2, 512, 1, 1), (224, 224)) is None  # pooled: nothing spatial
    tokens = torch.arange(2 * 5 * 3.).reshape(2, 5, 3)  # class token + 2×2 patches, 3 channels
    as_map = to_nchw(tokens, "tokens", (32, 32))
    assert as_map.shape == (2, 3, 2, 2)
    assert torch.equal(as_map[1, :, 1, 0], tokens[1, 1 + 2])  # row 1, column 0: patch 2


@pytest.mark.parametrize(("build", "layer", "layout", "as_map"), [
    (tiny_vit, "encoder.layers.encoder_layer_1.ln_1", "tokens",
     lambda t: t[:, 1:].reshape(len(t), 4, 4, -1).permute(0, 3, 1, 2)),
    (tiny_swin, "norm", "nhwc", lambda t: t.permute(0, 3, 1, 2)),
])
def test_gradcam_on_transformers_equals_hooks_and_an_explicit_reshape(build, layer, layout,
                                                                      as_map) -> None:
    model = build()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 3, 4])
    # the default layer by the stated rule, not the first layer (the patch embedding)
    assert default_layer(model, x) == layer
    assert layer_layout(model, x, layer) == layout
    expected = reference_cam(model, x, targets, layer, as_map)
    assert expected.abs().sum() > 0
    for given in ("auto", layout):
        maps = get_method("gradcam").fn(model, x, targets, AttributionContext(), layer=layer,
                                        layout=given)
        torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-7)


def test_the_run_fixes_the_layer_and_its_layout_or_refuses_a_layer_that_is_no_map() -> None:
    model = tiny_vit()
    example = torch.randn(1, 3, 32, 32)
    (fixed,) = with_default_layers([resolve_method("gradcam")], model, example)
    assert (fixed.params.layer, fixed.params.layout) == ("encoder.layers.encoder_layer_1.ln_1",
                                                         "tokens")
    with pytest.raises(ModelError, match=r"^methods\[0\]\.layer: layer 'heads.head' outputs "
                                         r"\(1, 5\), which cannot be read as a spatial map"):
        with_default_layers([resolve_method({"name": "gradcam", "layer": "heads.head"})],
                            model, example)


def test_a_head_that_ignores_the_input_is_said_not_explained() -> None:
    """torchvision's ViT starts with a zero head: the logits do not depend on the input."""
    torch.manual_seed(0)
    model = tvm.vit_b_16(weights=None, image_size=32, num_classes=5).eval()
    with pytest.raises(ModelError, match="the logits do not depend on the input"):
        default_layer(model, torch.randn(1, 3, 32, 32))


def test_guided_methods_refuse_swin_v2_whose_relus_never_see_the_input(tmp_path) -> None:
    """Swin V2's only ReLUs are in its continuous position-bias MLP, fed by coordinates, not
    by the image; GELU keeps its plain gradient. So guided backprop would equal the gradient:
    refused in one line, naming both (as on Swin V1, which has no ReLU at all)."""
    import numpy as np
    from PIL import Image

    from saliencycheck.config import LoadedConfig, parse_config
    from saliencycheck.errors import MethodError, SaliencyCheckError
    from saliencycheck.runner.setup import prepare

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "images" / "a.png")
    for builder in ("swin_v2_t", "swin_t"):
        config = parse_config({
            "model": {"name": builder, "num_classes": 5},
            "images": {"path": str(tmp_path / "images"), "size": 32},
            "methods": ["gradient", "guided_backprop"], "runtime": {"device": "cpu"},
            "tests": {"cascading": {"enabled": False}}, "baselines": {"random_floor": False}})
        with pytest.raises(SaliencyCheckError) as info:
            prepare(LoadedConfig(config=config, source=tmp_path / "c.yaml"), probe_methods=True)
        message = str(info.value)
        assert "methods[1] (guided_backprop)" in message and "\n" not in message
        assert "no ReLU" in message and "gelu" in message
        if builder == "swin_v2_t":
            assert "on the input's path" in message and "do not see the input" in message
    assert issubclass(MethodError, SaliencyCheckError)


def test_builder_keywords_reach_the_model_or_are_refused_with_the_list(tmp_path) -> None:
    from saliencycheck.config import ModelConfig, load_config
    from saliencycheck.errors import ConfigError
    from saliencycheck.models import build_model

    model = build_model(ModelConfig(name="vit_b_16", num_classes=5,
                                    kwargs={"image_size": 64, "dropout": 0.0})).module
    assert (model.image_size, model.encoder.pos_embedding.shape[1]) == (64, 1 + 4 * 4)
    with pytest.raises(ConfigError, match=r"^model\.kwargs: vit_b_16 rejects \{'imag_size': 64\}"
                                          r" .*takes: image_size, patch_size"):
        build_model(ModelConfig(name="vit_b_16", kwargs={"imag_size": 64}))
    for text, where in (("model: {name: vit_b_16, kwargs: {num_classes: 3}}",
                         "model.kwargs: num_classes: set model.num_classes instead"),
                        ("model: {factory: a:b, kwargs: {x: 1}}",
                         "model: kwargs go to a torchvision builder")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"c.yaml: {where}"):
            load_config(path)


def manual_vit(model: VisionTransformer, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """torchvision's ViT forward written out, each attention formed explicitly as
    softmax(q kᵀ / √d) from the in-projection: the logits and every layer's (N, heads, T, T)
    attention, part of the autograd graph."""
    n = len(inputs)
    x = model.conv_proj(inputs).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_token.expand(n, -1, -1), x], dim=1) + model.encoder.pos_embedding
    attentions = []
    for layer in model.encoder.layers:
        mha = layer.self_attention
        heads, dim = mha.num_heads, mha.embed_dim // mha.num_heads
        y = layer.ln_1(x)
        q, k, v = (y @ mha.in_proj_weight.T + mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-1, -2) / dim ** 0.5, dim=-1)
        attentions.append(attention)
        mixed = (attention @ v).transpose(1, 2).reshape(n, -1, mha.embed_dim)
        x = x + mha.out_proj(mixed)
        x = x + layer.mlp(layer.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0]), attentions


def _upsampled(rollout: Tensor, size: int) -> Tensor:
    grid = round((rollout.shape[-1] - 1) ** 0.5)
    patches = rollout[:, 0, 1:].reshape(len(rollout), 1, grid, grid)
    return F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)


def test_rollouts_equal_a_hand_written_vit() -> None:
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 0, 4])
    logits, attentions = manual_vit(model, x.requires_grad_(True))
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-6)  # the same network
    eye = torch.eye(attentions[0].shape[-1])
    rollout = eye.expand(3, -1, -1)
    for attention in attentions:  # Abnar & Zuidema: (A + I) / 2, rows renormalised, mean heads
        step = 0.5 * attention.detach().mean(dim=1) + 0.5 * eye
        rollout = (step / step.sum(dim=-1, keepdim=True)) @ rollout
    got = get_method("attention_rollout").fn(model, x.detach(), targets, AttributionContext())
    torch.testing.assert_close(got, _upsampled(rollout, 32), rtol=1e-5, atol=1e-7)
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), attentions)
    rollout = eye.expand(3, -1, -1)
    for attention, grad in zip(attentions, grads):  # Chefer et al. 2021, eq. 5-6
        rollout = rollout + (grad * attention).clamp(min=0).mean(dim=1).detach() @ rollout
    got = get_method("gradient_rollout").fn(model, x.detach(), targets, AttributionContext())
    torch.testing.assert_close(got, _upsampled(rollout, 32), rtol=1e-5, atol=1e-7)
    # attention rollout ignores the class explained; gradient rollout does not
    other = (targets + 1) % 5
    assert torch.equal(get_method("attention_rollout").fn(model, x.detach(), other,
                                                          AttributionContext()),
                       get_method("attention_rollout").fn(model, x.detach(), targets,
                                                          AttributionContext()))
    assert not torch.allclose(get_method("gradient_rollout").fn(model, x.detach(), other,
                                                                AttributionContext()),
                              got)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_rollout_is_refused_without_multihead_attention() -> None:
    with pytest.raises(MethodError, match="no nn.MultiheadAttention"):
        get_method("attention_rollout").fn(tiny_swin(), torch.randn(1, 3, 32, 32),
                                           torch.tensor([0]), AttributionContext())


def tiny_convnext() -> nn.Module:
    """ConvNeXt's stem, CNBlocks (layer scale, channels-last LayerNorm), a downsampling layer
    and its head, at two stages of one block."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], num_classes=5,
                    layer_scale=0.5).eval()


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin, tiny_convnext])
@pytest.mark.parametrize(("prefix", "affine_stem"), [(True, True), (True, False), (False, True)])
def test_the_speed_machinery_changes_no_map_on_transformers_and_modern_cnns(
        build, prefix: bool, affine_stem: bool) -> None:
    """The prefix cache (ViT's class-token concatenation and position-embedding addition,
    Swin's channels-last layers, ConvNeXt's layer scale) and the affine stem give the maps of
    the stages randomized on their own and computed in full, to 1e-9 in float64."""
    import copy
    from itertools import chain

    from saliencycheck.engine.passes import RowSource, StageRequests, run_staged
    from saliencycheck.engine.prefix import trace_calls
    from saliencycheck.randomization import (
        RandomizedModels,
        find_blocks,
        plan_stages,
        reinitialize_,
    )

    model = build().double()
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        targets = model(inputs).argmax(dim=1)
    blocks = find_blocks(model, inputs[:1])
    cascading = plan_stages(blocks, model=model, test="cascading")
    stages = cascading[::max(1, len(cascading) // 3)] + cascading[-1:] + plan_stages(
        blocks, model=model, test="independent")[1::3]
    methods = with_default_layers([resolve_method(m) for m in (
        "gradient", {"name": "integrated_gradients", "steps": 2}, "gradcam",
        {"name": "smoothgrad", "samples": 2})], model, inputs[:1])
    context = AttributionContext(chunk_size=5, affine_stem=affine_stem)
    randomized = RandomizedModels(model)
    refs = [None, *stages]
    source = RowSource.of(inputs, targets)
    plans = [{m.label: m.spec.plan(randomized.model, source, context, **dict(m.params))
              for m in methods} for _ in refs]
    run_staged([StageRequests(
        enter=lambda s=s: randomized.enter(s),
        requests=[r for p in stage_plans.values() for r in p.requests],
        randomized=tuple(chain.from_iterable(b.module_names for b in s.randomized_blocks))
        if s else ()) for s, stage_plans in zip(refs, plans)], context,
        trace_calls(randomized.model, inputs[:1]) if prefix else None)
    for stage, stage_plans in zip(refs, plans):
        reference = copy.deepcopy(model)  # randomized on its own, full forward and backward
        for block in stage.randomized_blocks if stage else ():
            reinitialize_(reference, block, seed=0)
        for method in methods:
            torch.testing.assert_close(
                stage_plans[method.label].finish(),
                method(reference, inputs, targets, AttributionContext()), rtol=1e-9,
                atol=1e-12, msg=lambda m: f"{stage and stage.name} {method.label}: {m}")


def test_a_model_whose_logits_ignore_the_input_is_warned_about(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from saliencycheck.config import LoadedConfig, parse_config
    from saliencycheck.errors import InputIgnoredWarning
    from saliencycheck.runner.setup import prepare

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    raw = {"model": {"name": "vit_b_16", "num_classes": 5, "kwargs": {"image_size": 32}},
           "images": {"path": str(tmp_path / "images"), "size": 32},
           "methods": ["gradient"], "runtime": {"device": "cpu"}}
    with pytest.warns(InputIgnoredWarning, match=r"^model: its logits do not depend on the "
                                                 r"input \(a.png: the top logit's gradient"):
        prepare(LoadedConfig(config=parse_config(raw), source=tmp_path / "c.yaml"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", InputIgnoredWarning)  # a model that reads its input
        prepare(LoadedConfig(config=parse_config({**raw, "model": {"name": "resnet18",
                                                                   "num_classes": 5}}),
                             source=tmp_path / "c.yaml"))


class _AsReluRule(torch.autograd.Function):
    """The reference: an activation module's own forward, a ReLU rule's backward."""

    @staticmethod
    def forward(ctx, x: Tensor, activation: nn.Module, guided: bool) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        ctx.guided = guided
        return activation(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        grad = grad.clamp(min=0)
        return (grad * (x > 0) if ctx.guided else grad), None, None


class _RuledModule(nn.Module):
    def __init__(self, activation: nn.Module, guided: bool) -> None:
        super().__init__()
        self.activation, self.guided = activation, guided

    def forward(self, x: Tensor) -> Tensor:
        return _AsReluRule.apply(x, self.activation, self.guided)


def ruled_by_modules(model: nn.Module, guided: bool) -> nn.Module:
    """A copy of ``model`` whose GELU/SiLU/ReLU *modules* carry the rule: the reference for
    models that apply each activation module once, through a module."""
    import copy

    ruled = copy.deepcopy(model)
    for module in list(ruled.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.GELU, nn.SiLU, nn.ReLU)):
                plain = type(child)() if not isinstance(child, nn.GELU) else nn.GELU(
                    approximate=child.approximate)
                setattr(module, child_name, _RuledModule(plain, guided))
    return ruled


def _conv_silu() -> nn.Module:
    """ReLU, in-place SiLU and tanh-approximated GELU in one small CNN."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(inplace=True),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1), nn.GELU(approximate="tanh"),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("build", [tiny_vit, _conv_silu])
@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet"])
def test_gelu_as_relu_is_the_relu_rule_at_gelu_and_silu_and_labelled(build, name) -> None:
    """Opt-in: GELU and SiLU get the rule's backward (guided: positive gradient where their
    input is positive; deconvnet: positive gradient), their forward unchanged; equal to the
    rule written into the activation modules, to 1e-6. The default refuses the ViT (GELU only)."""
    model = build()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([0, 2, 4])
    method = resolve_method({"name": name, "nonlinearity_rule": "gelu_as_relu"})
    assert method.label == f"{name}_gelu_as_relu"
    with pytest.warns(UserWarning, match=r"gelu_as_relu ruled .*(gelu|silu)×\d+ as ReLUs \(an "
                                         r"extension with no published definition"):
        maps = method(model, x, targets)
    reference_model = ruled_by_modules(model, guided=name == "guided_backprop")
    inputs = x.clone().requires_grad_(True)
    logits = reference_model(inputs)
    torch.testing.assert_close(logits, model(x), rtol=0, atol=0)  # forward unchanged
    (expected,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), inputs)
    torch.testing.assert_close(maps, expected, rtol=1e-6, atol=1e-6)
    with torch.enable_grad():
        inputs = x.clone().requires_grad_(True)
        (plain,) = torch.autograd.grad(model(inputs).gather(1, targets[:, None]).sum(), inputs)
    assert (maps - plain).abs().max() > 1e-3 * plain.abs().max()  # the rule did something
    if build is tiny_vit:
        with pytest.raises(MethodError, match="applies no ReLU.*gelu_as_relu"):
            resolve_method(name)(model, x, targets)


def test_gelu_as_relu_runs_through_a_check_and_is_recorded(tmp_path) -> None:
    """From the API on a ViT: the label says the extension, run.json keeps the rule, the
    guided map shares its pass with guided Grad-CAM, and the status is a warning naming it."""
    import json

    import saliencycheck as sc
    from saliencycheck.api import prepared
    from saliencycheck.runner.setup import method_statuses

    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    methods = [sc.method("guided_backprop", nonlinearity_rule="gelu_as_relu"),
               sc.method("guided_gradcam", nonlinearity_rule="gelu_as_relu")]
    arguments = {"methods": methods, "metrics": ["spearman_abs"], "device": "cpu",
                 "tests": {"cascading": {"granularity": "block",
                                         "blocks": ["encoder.ln+heads.head"]}},
                 "baselines": {"random_floor": False}, "output_settings": {"figures": False}}
    with pytest.warns(UserWarning, match="gelu_as_relu"):
        result = sc.check(model, images, output=tmp_path / "run", **arguments)
    assert set(result.to_pandas()["method"]) == {"guided_backprop_gelu_as_relu",
                                                 "guided_gradcam_gelu_as_relu", "random_map"}
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["methods"]
    assert [m["params"]["nonlinearity_rule"] for m in recorded] == ["gelu_as_relu"] * 2
    with prepared(model, images, **arguments) as (setup, _):
        statuses = method_statuses(setup)
    assert [s.status for s in statuses] == ["warning", "warning"]
    assert all("no published definition" in s.detail for s in statuses)
