"""Model-parameter randomization: block discovery, stage plans, re-initialisation, working copy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer

from saliencycheck.errors import ConfigError, ModelError
from saliencycheck.randomization import (
    EMBEDDING_NAME,
    ROOT_NAME,
    RandomizedModels,
    block_seed,
    find_blocks,
    logit_change,
    plan_stages,
    reinitialize_,
)

RESNET18_BLOCKS = ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                   "layer3.1", "layer4.0", "layer4.1", "fc"]
INCEPTION_V3_BLOCKS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
                       "Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                       "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
                       "fc"]
INITS = ["reset", "normal", "shuffle"]


def pretend_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter and running statistic away from its initial value, as training
    would (so that BatchNorm weights are no longer 1, class tokens no longer 0 ...)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(7)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    assert after.keys() == before.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different


class GlobalScale(nn.Module):
    """A module type unknown to saliencycheck whose reset_parameters uses the global RNG and
    also touches a buffer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(channels))
        self.register_buffer("resets", torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.scale)
        self.resets.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class Tiny(nn.Module):
    """Every kind of parameter reinitialize_ handles: own bare parameter, conv, batch norm,
    unknown module with reset_parameters, group norm, embedding, layer norm, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3, 32, 32))  # inputs are 3x32x32
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                  GlobalScale(8), nn.GroupNorm(2, 8))
        self.embed = nn.Embedding(5, 8, padding_idx=0)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8),
                                  nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x + self.offset)
        h = h + self.embed(torch.tensor([1], device=x.device)).view(1, -1, 1, 1)
        return self.head(h)


TINY_BLOCKS = [ROOT_NAME, "body.0", "body.1", "body.3", "body.4", "embed", "head.2", "head.3"]


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                             hidden_dim=16, mlp_dim=32)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return pretend_trained(torchvision.models.resnet18(weights=None, num_classes=10))


@pytest.fixture(scope="module")
def resnet18_blocks(resnet18):
    return find_blocks(resnet18, torch.randn(1, 3, 32, 32, generator=torch.Generator()))


@pytest.fixture
def tiny() -> Tiny:
    torch.manual_seed(0)
    return pretend_trained(Tiny())


def image(size: int = 32, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- find_blocks --------------------------------------------------------------------------


def test_resnet18_blocks(resnet18, resnet18_blocks):
    assert [b.name for b in resnet18_blocks] == RESNET18_BLOCKS
    assert all(b.module_names == (b.name,) for b in resnet18_blocks)
    names = [n for b in resnet18_blocks for n in b.parameter_names]
    assert sorted(names) == sorted(n for n, _ in resnet18.named_parameters())
    assert [n for n in names if n.startswith("layer2.0.")] == \
        [n for n, _ in resnet18.layer2[0].named_parameters(prefix="layer2.0")]
    params = dict(resnet18.named_parameters())
    assert all(b.numel == sum(params[n].numel() for n in b.parameter_names)
               for b in resnet18_blocks)
    bn1 = resnet18_blocks[1]
    assert bn1.running_stat_names == ("bn1.running_mean", "bn1.running_var",
                                      "bn1.num_batches_tracked")
    assert resnet18_blocks[-1].running_stat_names == ()


def test_inception_v3_gives_the_papers_17_blocks():
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    blocks = find_blocks(model, image(80))
    assert [b.name for b in blocks] == INCEPTION_V3_BLOCKS
    names = [n for b in blocks for n in b.parameter_names]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()
                                   if not n.startswith("AuxLogits."))
    stages = plan_stages(blocks, test="cascading", model=model)
    aux = sum(p.numel() for p in model.AuxLogits.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert stages[-1].fraction_randomized == pytest.approx(1 - aux / total)
    layers = find_blocks(model, image(80), granularity="layer")
    assert len(layers) == 189 and not any(b.name.startswith("AuxLogits") for b in layers)


@pytest.mark.parametrize("build, size", [
    (torchvision.models.densenet121, 32),
    (torchvision.models.vgg11, 32),
    (torchvision.models.squeezenet1_1, 64),
])
def test_sequential_models_blocks_cover_every_parameter_once_in_order(build, size):
    torch.manual_seed(0)
    model = build(weights=None, num_classes=10)
    blocks = find_blocks(model, image(size))
    assert blocks
    names = [n for b in blocks for n in b.parameter_names]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    # These models run their modules in the order they define them.
    definition_order = [n for n, _ in model.named_modules()]
    positions = [definition_order.index(m) for b in blocks for m in b.module_names]
    assert positions == sorted(positions)


def test_layer_granularity_resnet18(resnet18):
    layers = find_blocks(resnet18, image(), granularity="layer")
    expected = [n for n, m in resnet18.named_modules()
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    assert len(layers) == 41
    assert sorted(b.name for b in layers) == sorted(expected)
    assert [b.name for b in layers][:3] == ["conv1", "bn1", "layer1.0.conv1"]
    assert layers[-1].name == "fc"
    assert all(b.parameter_names == tuple(n for n, _ in resnet18.get_submodule(b.name)
                                          .named_parameters(prefix=b.name)) for b in layers)


def test_blocks_follow_execution_order_not_definition_order():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.body(x))

    assert [b.name for b in find_blocks(Reversed(), torch.zeros(1, 3))] == ["body", "head"]


def test_shared_parameter_goes_to_the_first_block_only():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(4, 4)
            self.decode = nn.Linear(4, 4)
            self.decode.weight = self.encode.weight

        def forward(self, x):
            return self.decode(self.encode(x))

    blocks = find_blocks(Tied(), torch.zeros(1, 4))
    assert [(b.name, b.parameter_names) for b in blocks] == [
        ("encode", ("encode.weight", "encode.bias")), ("decode", ("decode.bias",))]
    assert sum(b.numel for b in blocks) == sum(p.numel() for p in Tied().parameters())


def test_vit_every_parameter_belongs_to_a_block():
    model = tiny_vit()
    total = sum(p.numel() for p in model.parameters())
    blocks = find_blocks(model, image())
    # the encoder layers one by one; the class token and the position embedding (parameters
    # the model and the encoder own) as the embedding block; the final LayerNorm with the head
    assert [b.name for b in blocks] == [
        "conv_proj", EMBEDDING_NAME, "encoder.layers.encoder_layer_0",
        "encoder.layers.encoder_layer_1", "encoder.ln+heads.head"]
    assert blocks[1].parameter_names == ("class_token", "encoder.pos_embedding")
    assert blocks[-1].module_names == ("encoder.ln", "heads.head")
    layers = find_blocks(model, image(), granularity="layer")
    # out_proj is never called: MultiheadAttention uses its weights directly.
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in [b.name for b in layers]
    for found in (blocks, layers):
        assert sum(b.numel for b in found) == total
        assert plan_stages(found, test="cascading", model=model)[-1].fraction_randomized == 1.0


# The block rule on each family: the repeated unit, block counts as docs/tests.md lists them.
FAMILIES = {  # builder: (keyword arguments, image size, blocks, first blocks, last block)
    "resnet18": ({}, 32, 11, ["conv1", "bn1", "layer1.0"], "fc"),
    "vgg11": ({}, 32, 11, ["features.0", "features.3"], "classifier.6"),
    "vit_b_16": ({"image_size": 32}, 32, 15,
                 ["conv_proj", EMBEDDING_NAME, "encoder.layers.encoder_layer_0"],
                 "encoder.ln+heads.head"),
    "swin_t": ({}, 64, 17, ["features.0", "features.1.0", "features.1.1", "features.2"],
               "norm+head"),
    "swin_v2_t": ({}, 64, 17, ["features.0", "features.1.0", "features.1.1", "features.2"],
                  "norm+head"),
    "convnext_tiny": ({}, 32, 23, ["features.0", "features.1.0", "features.1.1"],
                      "classifier.0+classifier.2"),
    "efficientnet_b0": ({}, 32, 19, ["features.0", "features.1.0", "features.2.0"],
                        "classifier.1"),
    "maxvit_t": ({}, 224, 15, ["stem.0", "stem.1", "blocks.0.layers.0"], "classifier.5"),
    "regnet_y_400mf": ({}, 32, 19, ["stem.0", "stem.1", "trunk_output.block1.block1-0"], "fc"),
    "densenet121": ({}, 32, 64, ["features.conv0", "features.norm0",
                                 "features.denseblock1.denselayer1"],
                    "features.norm5+classifier"),
    "mobilenet_v2": ({}, 32, 20, ["features.0", "features.1"], "classifier.1"),
}


@pytest.mark.parametrize("builder", sorted(FAMILIES))
def test_blocks_follow_each_familys_repeated_unit(builder: str) -> None:
    kwargs, size, count, first, last = FAMILIES[builder]
    torch.manual_seed(0)
    model = getattr(torchvision.models, builder)(weights=None, num_classes=10, **kwargs).eval()
    blocks = find_blocks(model, image(size))
    names = [b.name for b in blocks]
    assert (len(blocks), names[:len(first)], names[-1]) == (count, first, last)
    covered = [n for b in blocks for n in b.parameter_names]
    assert sorted(covered) == sorted(n for n, _ in model.named_parameters())  # all, once
    stages = plan_stages(blocks, test="cascading", model=model)
    assert stages[-1].fraction_randomized == 1.0


def test_find_blocks_leaves_the_model_as_it_was(tiny):
    tiny.train()
    tiny.head.eval()
    before = snapshot(tiny)
    find_blocks(tiny, image())
    assert_state_equal(before, snapshot(tiny))
    assert tiny.training and not tiny.head.training and tiny.body.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny.modules())


def test_find_blocks_errors(tiny):
    with pytest.raises(ConfigError, match="granularity"):
        find_blocks(tiny, image(), granularity="module")
    with pytest.raises(ModelError, match="forward pass"):
        find_blocks(tiny, torch.zeros(1, 5, 32, 32))
    assert all(not m._forward_pre_hooks for m in tiny.modules())
    with pytest.raises(ModelError, match="no module with parameters"):
        find_blocks(nn.ReLU(), image())


# --- plan_stages --------------------------------------------------------------------------


def test_cascading_and_independent_stages(resnet18, resnet18_blocks):
    blocks = resnet18_blocks
    top_down = list(reversed(RESNET18_BLOCKS))
    cascading = plan_stages(blocks, test="cascading", order="top_down", model=resnet18)
    assert [s.index for s in cascading] == list(range(1, 12))
    assert [s.name for s in cascading] == top_down
    assert [s.blocks for s in cascading] == [tuple(top_down[:k]) for k in range(1, 12)]
    assert cascading[1].parameter_names == ("fc.weight", "fc.bias") + blocks[-2].parameter_names
    fractions = [s.fraction_randomized for s in cascading]
    assert all(a < b for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == 1.0
    assert cascading[-1].numel == sum(p.numel() for p in resnet18.parameters())

    independent = plan_stages(blocks, test="independent", order="top_down", model=resnet18)
    assert [s.blocks for s in independent] == [(name,) for name in top_down]
    assert sum(s.fraction_randomized for s in independent) == pytest.approx(1.0)

    bottom_up = plan_stages(blocks, test="cascading", order="bottom_up", model=resnet18)
    assert [s.name for s in bottom_up] == RESNET18_BLOCKS
    assert bottom_up[0].blocks == ("conv1",)


def test_plan_stages_errors(resnet18, resnet18_blocks):
    with pytest.raises(ConfigError, match="test"):
        plan_stages(resnet18_blocks, test="cascade", model=resnet18)
    with pytest.raises(ConfigError, match="order"):
        plan_stages(resnet18_blocks, test="cascading", order="top-down", model=resnet18)
    with pytest.raises(ValueError, match="another model"):
        plan_stages(resnet18_blocks, test="cascading", model=nn.Linear(2, 2))


# --- reinitialize_ ------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
def test_reinitialize_changes_exactly_the_blocks_parameters(tiny, init):
    blocks = find_blocks(tiny, image())
    assert [b.name for b in blocks] == TINY_BLOCKS
    for block in blocks:
        model = copy.deepcopy(tiny)
        before = snapshot(model)
        rng = torch.get_rng_state()
        reinitialize_(model, block, init=init, seed=0)
        assert torch.equal(rng, torch.get_rng_state())
        assert changed(before, model) == set(block.parameter_names), block.name


@pytest.mark.parametrize("init", INITS)
def test_reinitialize_resnet_block(resnet18, resnet18_blocks, init):
    block = resnet18_blocks[4]  # layer2.0: convs, batch norms and the downsample branch
    model = copy.deepcopy(resnet18)
    before = snapshot(model)
    rng = torch.get_rng_state()
    reinitialize_(model, block, init=init, seed=3)
    assert torch.equal(rng, torch.get_rng_state())
    assert changed(before, model) == set(block.parameter_names)

    reinitialize_(model, block, init=init, seed=3, reset_running_stats=True)
    assert changed(before, model) == set(block.parameter_names + block.running_stat_names)
    bn = model.layer2[0].bn1
    assert torch.equal(bn.running_mean, torch.zeros(128))
    assert torch.equal(bn.running_var, torch.ones(128))
    assert int(bn.num_batches_tracked) == 0


def test_vit_reset_changes_every_parameter():
    model = pretend_trained(tiny_vit())
    blocks = find_blocks(model, image())
    before = snapshot(model)
    for block in blocks:
        reinitialize_(model, block, seed=0)
    assert changed(before, model) == {n for n, _ in model.named_parameters()}


def test_reset_matches_the_modules_own_initializer(resnet18, resnet18_blocks):
    model = copy.deepcopy(resnet18)
    fc, conv1 = resnet18_blocks[-1], resnet18_blocks[0]
    reinitialize_(model, fc, seed=5)
    reinitialize_(model, conv1, seed=5)
    reference = copy.deepcopy(resnet18)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(block_seed(5, "fc"))
        reference.fc.reset_parameters()
        torch.manual_seed(block_seed(5, "conv1"))
        reference.conv1.reset_parameters()
    assert torch.equal(model.fc.weight, reference.fc.weight)
    assert torch.equal(model.fc.bias, reference.fc.bias)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    # kaiming_uniform_(a=sqrt(5)) is U(±1/sqrt(fan_in)).
    bound = 1 / math.sqrt(3 * 7 * 7)
    weight = model.conv1.weight.detach().abs()
    assert float(weight.max()) <= bound and float(weight.max()) > 0.99 * bound

    bn = resnet18_blocks[1]
    reinitialize_(model, bn, seed=5)
    assert torch.equal(model.bn1.weight, torch.ones(64))
    assert torch.equal(model.bn1.bias, torch.zeros(64))
    assert torch.equal(model.bn1.running_mean, resnet18.bn1.running_mean)


def test_reset_of_other_parameters(tiny):
    blocks = {b.name: b for b in find_blocks(tiny, image())}
    model = copy.deepcopy(tiny)
    for block in blocks.values():
        reinitialize_(model, block, seed=1)
    assert torch.equal(model.embed.weight[0], torch.zeros(8))  # padding row
    assert torch.equal(model.head[2].weight, torch.ones(8))
    assert torch.equal(model.body[4].bias, torch.zeros(8))
    assert torch.equal(model.body[3].resets, tiny.body[3].resets)
    # The unknown module's own reset_parameters, run on the global RNG seeded and restored.
    again = copy.deepcopy(tiny)
    reinitialize_(again, blocks["body.3"], seed=1)
    assert torch.equal(again.body[3].scale, model.body[3].scale)
    # A bare parameter: truncated normal with the trained tensor's std.
    offset = model.offset.detach()
    trained_std = float(tiny.offset.detach().std(correction=0))
    assert float(offset.abs().max()) <= 2 * trained_std


def test_normal_and_shuffle_draws(resnet18, resnet18_blocks):
    block = resnet18_blocks[-3]  # layer4.0
    model = copy.deepcopy(resnet18)
    reinitialize_(model, block, init="normal", std=0.1, seed=0)
    weight = model.layer4[0].conv2.weight.detach()
    assert float(weight.abs().max()) <= 0.2 + 1e-6
    assert float(weight.std()) == pytest.approx(0.1 * 0.88, rel=0.02)  # std of N cut at ±2σ

    model = copy.deepcopy(resnet18)
    reinitialize_(model, block, init="shuffle", seed=0)
    for name in block.parameter_names:
        new, old = model.get_parameter(name).detach(), resnet18.get_parameter(name).detach()
        assert torch.equal(new.flatten().sort().values, old.flatten().sort().values)


def test_reinitialize_errors(tiny):
    block = find_blocks(tiny, image())[1]
    with pytest.raises(ConfigError, match="init"):
        reinitialize_(tiny, block, init="xavier", seed=0)
    with pytest.raises(ConfigError, match="std"):
        reinitialize_(tiny, block, init="normal", std=0.0, seed=0)
    with pytest.raises(ModelError, match="another model"):
        reinitialize_(nn.Linear(2, 2), block, seed=0)


def test_block_seed_is_stable_across_processes():
    # A pinned value: Python's hash() would change with PYTHONHASHSEED.
    assert block_seed(0, "fc") == 1692046342034473320
    assert block_seed(0, "fc") != block_seed(1, "fc") != block_seed(0, "layer4.1")


# --- RandomizedModels ---------------------------------------------------------------------


def test_cascading_stage_equals_applying_its_blocks(resnet18, resnet18_blocks):
    stages = plan_stages(resnet18_blocks, test="cascading", model=resnet18)
    options = {"init": "reset", "std": 0.1, "reset_running_stats": True, "seed": 11}
    randomized = RandomizedModels(resnet18)
    count = 0
    for stage, model in randomized.stage_models(stages, **options):
        expected = copy.deepcopy(resnet18)
        for block in resnet18_blocks[::-1][: stage.index]:
            reinitialize_(expected, block, **options)
        assert_state_equal(snapshot(model), snapshot(expected))
        assert not model.training
        count += 1
    assert count == len(stages)


def test_independent_stage_randomizes_only_its_block(resnet18, resnet18_blocks):
    stages = plan_stages(resnet18_blocks, test="independent", model=resnet18)
    trained = snapshot(resnet18)
    for stage, model in RandomizedModels(resnet18).stage_models(stages, init="shuffle", seed=2):
        expected = copy.deepcopy(resnet18)
        reinitialize_(expected, stage.randomized_blocks[0], init="shuffle", seed=2)
        assert_state_equal(snapshot(model), snapshot(expected))
        assert changed(trained, model) == set(stage.parameter_names)


def test_same_seed_same_weights_different_seed_different(tiny):
    blocks = find_blocks(tiny, image())
    stages = plan_stages(blocks, test="cascading", model=tiny)
    first = RandomizedModels(tiny).stage_models(stages, seed=4)
    second = RandomizedModels(tiny).stage_models(stages, seed=4)
    other = RandomizedModels(tiny).stage_models(stages, seed=5)
    for (stage, a), (_, b), (_, c) in zip(first, second, other):
        assert_state_equal(snapshot(a), snapshot(b))
        constant = ("body.1", "body.4", "head.2")  # norm layers reset to weight 1, bias 0
        names = [n for n in stage.parameter_names if not n.startswith(constant)]
        assert all(not torch.equal(a.get_parameter(n), c.get_parameter(n)) for n in names)


def test_user_model_untouched_and_trained_state_restored(tiny):
    tiny.train()
    before = snapshot(tiny)
    blocks = find_blocks(tiny, image())
    stages = plan_stages(blocks, test="cascading", model=tiny)
    randomized = RandomizedModels(tiny)
    assert randomized.model is not tiny
    rng = torch.get_rng_state()
    for _, model in randomized.stage_models(stages, reset_running_stats=True, seed=0):
        assert model is randomized.model and model is not tiny
    assert torch.equal(rng, torch.get_rng_state())
    assert_state_equal(before, snapshot(tiny))
    assert tiny.training
    assert_state_equal(before, snapshot(randomized.model))

    # Stopping early restores the trained state too.
    models = randomized.stage_models(stages, init="normal", seed=0)
    next(models)
    next(models)
    assert changed(before, randomized.model)
    models.close()
    assert_state_equal(before, snapshot(randomized.model))


def test_stage_models_errors(tiny, resnet18, resnet18_blocks):
    stages = plan_stages(resnet18_blocks, test="cascading", model=resnet18)
    with pytest.raises(ModelError, match="another model"):
        RandomizedModels(tiny).stage_models(stages, seed=0)
    with pytest.raises(ConfigError, match="init"):
        RandomizedModels(tiny).stage_models([], init="zeros", seed=0)


# --- logit_change -------------------------------------------------------------------------


def test_logit_change_is_zero_for_an_identity_stage(tiny):
    x = image(batch=3)
    stages = plan_stages(find_blocks(tiny, x), test="independent", model=tiny)
    embed = next(s for s in stages if s.name == "embed")
    with torch.no_grad():
        # Shuffling a constant tensor is an identity: the stage must show no change at all.
        tiny.embed.weight.fill_(0.5)
        trained = tiny(x)
        for _, model in RandomizedModels(tiny).stage_models([embed], init="shuffle", seed=0):
            stage = model(x)
    assert logit_change(trained, stage) == {"relative_l2": 0.0, "top1_agreement": 1.0}


def test_logit_change_values():
    trained = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    stage = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    change = logit_change(trained, stage)
    assert change["relative_l2"] == pytest.approx(math.sqrt(2) / 2)
    assert change["top1_agreement"] == 0.5
    with pytest.raises(ValueError, match="same shape"):
        logit_change(trained, stage[:1])


def test_entering_stages_swaps_tensors_and_never_writes_the_trained_ones() -> None:
    """An autograd graph built on the trained model must stay valid while stages come and go:
    the trained tensors keep their version counters and values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)).eval()
    example = torch.randn(1, 1, 4, 4)
    blocks = find_blocks(model, example, granularity="layer")
    cascading = plan_stages(blocks, model=model, test="cascading")
    independent = plan_stages(blocks, model=model, test="independent")
    models = RandomizedModels(model)
    trained = {n: (p, p._version, p.detach().clone())
               for n, p in models.model.named_parameters()}
    x = example.clone().requires_grad_(True)
    out = models.model(x).sum()
    seen = []
    for stage in [*cascading, *independent, cascading[0]]:
        randomized = models.enter(stage, seed=3)
        expected = copy.deepcopy(model)
        for block in stage.randomized_blocks:
            reinitialize_(expected, block, seed=3)
        for (name, got), want in zip(randomized.named_parameters(), expected.parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        seen.append(randomized(example))
    models.enter(None)
    for name, (param, version, value) in trained.items():
        current = dict(models.model.named_parameters())[name]
        assert current is param and param._version == version
        torch.testing.assert_close(param, value, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out, x)  # the trained graph is still usable
    assert grad.abs().sum() > 0
    torch.testing.assert_close(seen[0], seen[-1])  # a stage's draw is kept, not re-drawn


def test_tied_parameters_stay_tied_in_every_stage() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(3, 3)
            self.decode = nn.Linear(3, 3)
            self.decode.weight = self.encode.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decode(self.encode(x))

    model = Tied().eval()
    stages = plan_stages(find_blocks(model, torch.zeros(1, 3), granularity="layer"),
                         model=model, test="independent")
    models = RandomizedModels(model)
    for stage in stages:
        randomized = models.enter(stage, seed=0)
        assert randomized.encode.weight is randomized.decode.weight
    models.enter(None)
    assert models.model.encode.weight is models.model.decode.weight
    torch.testing.assert_close(models.model.decode.weight, model.encode.weight)
