"""Prefix activation caching: which modules a stage skips, and maps equal to full passes."""

from __future__ import annotations

import copy
import csv
from itertools import chain
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from saliencycheck.engine.passes import RowSource, StageRequests, run_staged
from saliencycheck.engine.prefix import PrefixCache, prefix_modules, trace_calls
from saliencycheck.errors import MethodError
from saliencycheck.methods import AttributionContext, resolve_method
from saliencycheck.randomization import (
    RandomizedModels,
    Stage,
    find_blocks,
    plan_stages,
    reinitialize_,
)

RESNET_TRUNK = {"conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                "avgpool"}


@pytest.fixture(scope="module")
def resnet_trace():
    model = torchvision.models.resnet18(num_classes=10).eval()
    return trace_calls(model, torch.zeros(1, 3, 32, 32))


def test_randomizing_the_head_stubs_the_whole_trunk(resnet_trace) -> None:
    assert set(prefix_modules(resnet_trace, ["fc"])) == RESNET_TRUNK
    assert prefix_modules(resnet_trace, ["conv1"]) == ()
    assert prefix_modules(resnet_trace, [""]) == ()  # the model's own parameters: no prefix


def test_the_trace_knows_which_outputs_in_place_ops_modify(resnet_trace) -> None:
    # ReLU(inplace=True) follows the first BatchNorm of the stem and of each block; the
    # second's output gets the residual added in the block's own code, then its ReLU
    modifiers = resnet_trace.modifiers
    assert modifiers["bn1"] == {"relu"}
    assert modifiers["layer1.0.bn1"] == {"layer1.0.relu"}
    assert modifiers["layer4.1.bn2"] == {"layer4.1", "layer4.1.relu"}
    assert not {"conv1", "layer1.0.conv1", "layer1.0", "maxpool"} & modifiers.keys()


def test_a_module_called_again_after_the_cut_is_not_stubbed(resnet_trace) -> None:
    # BasicBlock applies self.relu after bn1 and again after the residual sum (after bn2).
    stubbed = set(prefix_modules(resnet_trace, ["layer4.1.bn2"]))
    assert {"layer3", "layer4.0", "layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2"} <= stubbed
    assert "layer4.1.relu" not in stubbed and "layer4.1" not in stubbed
    assert "layer3.0" not in stubbed  # only the outermost stubbed modules are listed


def test_nothing_after_a_gradcam_layer_is_stubbed(resnet_trace) -> None:
    stubbed = set(prefix_modules(resnet_trace, ["fc"], visible=["layer3"]))
    assert stubbed == RESNET_TRUNK - {"layer4", "avgpool"}
    inside = set(prefix_modules(resnet_trace, ["fc"], visible=["layer4.1.conv2"]))
    assert "layer4" not in inside and "layer4.1.conv2" in inside


def test_a_stub_called_more_often_than_recorded_says_how_to_turn_caching_off() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    cache = PrefixCache(model, ["0"])
    with cache.record() as recorded:
        model(torch.ones(1, 2))
    with cache.stub(["0"], recorded, grad=False):
        model(torch.ones(1, 2))
        with pytest.raises(MethodError, match="prefix_cache: false"):
            model(torch.ones(1, 2))


METHODS = [
    "gradient",
    {"name": "integrated_gradients", "steps": 2},
    "guided_backprop",
    "gradcam",
    {"name": "smoothgrad", "samples": 2},
    {"name": "occlusion", "window": 16, "stride": 8},  # forward passes only
]


def _modules(stage: Stage | None) -> tuple[str, ...]:
    if stage is None:
        return ()
    return tuple(chain.from_iterable(b.module_names for b in stage.randomized_blocks))


def staged_maps(model: nn.Module, stages: list[Stage], inputs: torch.Tensor,
                targets: torch.Tensor, *, prefix: bool, chunk_size: int = 64,
                layer: str | None = None, affine_stem: bool = True):
    """Every method's maps on the trained model and each stage, through ``run_staged``."""
    from saliencycheck.runner.setup import with_default_layers

    methods = [resolve_method({"name": "gradcam", "layer": layer} if m == "gradcam" and layer
                              else m) for m in METHODS]
    methods = with_default_layers(methods, model, inputs[:1])
    context = AttributionContext(chunk_size=chunk_size, affine_stem=affine_stem)
    randomized = RandomizedModels(model)
    refs: list[Stage | None] = [None, *stages]
    source = RowSource.of(inputs, targets)
    plans = [{m.label: m.spec.plan(randomized.model, source, context, **dict(m.params))
              for m in methods} for _ in refs]
    trace = trace_calls(randomized.model, inputs[:1]) if prefix else None
    run_staged([StageRequests(enter=lambda s=s: randomized.enter(s),
                              requests=[r for p in stage_plans.values() for r in p.requests],
                              randomized=_modules(s))
                for s, stage_plans in zip(refs, plans)], context, trace)
    return methods, [{label: p.finish() for label, p in stage_plans.items()}
                     for stage_plans in plans]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    builder = getattr(torchvision.models, name)
    return builder(num_classes=5).double().eval()


@pytest.mark.parametrize(("name", "granularity", "layer"), [
    ("resnet18", "layer", None),  # in-place ReLU, residual sums, a ReLU module called twice
    ("densenet121", "block", "features.denseblock3"),  # concatenations, functional ReLU
    ("mobilenet_v2", "block", "features.14"),  # ReLU6, inverted residuals
    ("squeezenet1_1", "layer", "features.12"),  # Fire modules: concatenated expand branches
])
def test_prefix_cached_maps_equal_independently_randomized_full_passes(
        name: str, granularity: str, layer: str | None) -> None:
    size = 32
    model = _model(name)
    inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        targets = model(inputs).argmax(dim=1)
    blocks = find_blocks(model, inputs[:1], granularity=granularity)
    cascading = plan_stages(blocks, model=model, test="cascading")
    independent = plan_stages(blocks, model=model, test="independent")
    every = max(1, len(cascading) // 3)  # a spread of cuts, from the head to the input
    stages = cascading[::every] + cascading[-1:] + independent[::every]
    methods, got = staged_maps(model, stages, inputs, targets, prefix=True, chunk_size=5,
                               layer=layer)
    context = AttributionContext()
    for stage, maps in zip([None, *stages], got):
        reference = copy.deepcopy(model)  # randomized on its own, full forward and backward
        for block in stage.randomized_blocks if stage else ():
            reinitialize_(reference, block, seed=0)
        for method in methods:
            expected = method(reference, inputs, targets, context)
            torch.testing.assert_close(maps[method.label], expected, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{name} {stage and stage.name} "
                                                     f"{method.label}: {m}")


class CountConvolutions(TorchFunctionMode):
    """Counts the convolutions actually computed (a stubbed module computes none)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.conv2d, F.conv2d):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _conv_calls(model: nn.Module, stages: list[Stage], inputs: torch.Tensor, *,
                prefix: bool) -> int:
    """Convolutions computed by ``run_staged`` for the gradient on the trained model and
    ``stages``."""
    randomized = RandomizedModels(model)
    gradient = resolve_method("gradient")
    targets = torch.zeros(len(inputs), dtype=torch.long)
    plans = [gradient.spec.plan(randomized.model, RowSource.of(inputs, targets),
                                AttributionContext()) for _ in range(len(stages) + 1)]
    trace = trace_calls(randomized.model, inputs[:1]) if prefix else None
    with CountConvolutions() as counter:
        run_staged([StageRequests(enter=lambda s=s: randomized.enter(s), requests=p.requests,
                                  randomized=_modules(s))
                    for s, p in zip([None, *stages], plans)], AttributionContext(), trace)
    return counter.count


def test_prefix_caching_skips_the_unchanged_convolutions() -> None:
    model = _model("resnet18")
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    stages = plan_stages(find_blocks(model, inputs[:1], granularity="layer"), model=model,
                         test="cascading")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    # Randomizing only fc: the stage runs no convolution, only the trained forward does.
    assert _conv_calls(model, stages[:1], inputs, prefix=True) == convs
    assert _conv_calls(model, stages[:1], inputs, prefix=False) == 2 * convs
    # The whole cascade, top-down: a stage re-runs only the convolutions after its cut.
    full = _conv_calls(model, stages, inputs, prefix=False)
    assert full == convs * (len(stages) + 1)
    assert _conv_calls(model, stages, inputs, prefix=True) < 0.65 * full


FAILURES: list[int] = []  # module-level: the runs work on deep copies of the model


class OutOfMemoryOnce(nn.Module):
    """Raises a simulated CUDA out-of-memory error on its ``fail_at``-th forward of > 2 rows."""

    def __init__(self, model: nn.Module, fail_at: int) -> None:
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at and x.shape[0] > 2:
            FAILURES.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_in_a_later_stage_recomputes_only_what_is_missing() -> None:
    model = _model("resnet18")
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    targets = torch.tensor([0, 1, 2, 3])
    wrapped = OutOfMemoryOnce(model, fail_at=4).eval()  # trace, stage 0, 1, then stage 2 fails
    stages = plan_stages(find_blocks(wrapped, inputs[:1], granularity="layer"),
                         model=wrapped, test="cascading")[:4]
    wrapped.calls = 0
    FAILURES.clear()
    with pytest.warns(UserWarning, match="out of device memory in a pass of 20 rows"):
        _, got = staged_maps(wrapped, stages, inputs, targets, prefix=True,
                             layer="model.layer4")
    assert FAILURES == [20]  # 4 images + 8 integration points + 8 noisy copies, in one pass
    wrapped.fail_at = -1
    _, expected = staged_maps(wrapped, stages, inputs, targets, prefix=True,
                              layer="model.layer4")
    for stage_expected, stage_got in zip(expected, got):
        for label, maps in stage_expected.items():
            torch.testing.assert_close(stage_got[label], maps, rtol=1e-9, atol=1e-12)


def test_auto_chunk_size_fits_a_share_of_free_memory() -> None:
    from saliencycheck.engine.device_memory import CPU_CHUNK_ROWS, auto_chunk_size, rows_for

    assert rows_for(10_000, 100, share=0.5) == 50
    assert rows_for(10, 100) == 1  # at least one row; a real out-of-memory then says so
    assert rows_for(10**15, 1, most=4096) == 4096
    assert auto_chunk_size(nn.Linear(2, 2), torch.zeros(1, 2)) == CPU_CHUNK_ROWS


def test_chunk_size_accepts_auto_or_a_positive_count() -> None:
    from saliencycheck.config import RuntimeConfig
    from saliencycheck.errors import ConfigError

    assert RuntimeConfig().chunk_size == "auto"
    assert RuntimeConfig(chunk_size=7).chunk_size == 7
    for bad in (0, "big"):
        with pytest.raises((ValueError, ConfigError)):
            RuntimeConfig(chunk_size=bad)


class IgnoresItsInput(nn.Module):
    """Logits from a constant (the convolution runs but is multiplied by 0): every gradient
    map is all zero, and the stubbed prefix outputs carry no gradient to the input."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.ones(x.shape[0], 4)) + 0 * self.conv(x).sum()


def test_a_model_that_ignores_its_input_gives_undefined_scores_not_a_crash(
        tmp_path: Path) -> None:
    from tests.test_batch import run_cli, write_project

    config = write_project(tmp_path, images=2, model={"factory":
                                                      "tests.test_prefix:IgnoresItsInput"},
                           tests={"random_logit": {"enabled": False},
                                  "cascading": {"enabled": True}})
    result = run_cli("run", config)  # runtime.prefix_cache is on by default
    assert result.exit_code == 0, result.output
    with (tmp_path / "out" / "report.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["metric"] == "spearman_abs"
                and r["method"] != "random_map"]  # the control's noise does not read the model
    assert rows and all(r["value"] == "nan" and "constant map" in r["note"] for r in rows)
