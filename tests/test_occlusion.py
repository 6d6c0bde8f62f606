"""Occlusion: equal to Captum's ``Occlusion`` where the patch positions tile the image, the
closed form of a linear model everywhere (edge-aligned last positions included), forward passes
only, batched and prefix-cached like the gradient methods."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from captum.attr import Occlusion
from torch import Tensor, nn

from saliencycheck.engine.passes import RowSource, StageRequests, run_staged
from saliencycheck.engine.prefix import trace_calls
from saliencycheck.errors import ConfigError, MethodError
from saliencycheck.methods import AttributionContext, resolve_method
from saliencycheck.methods.occlusion import patch_spans


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return tvm.resnet18(num_classes=10).double().eval()


def _inputs(count: int = 3, size: int = 32) -> Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


@pytest.mark.parametrize(("window", "stride", "baseline"), [
    (8, 4, 0.0), ((8, 4), (4, 2), 0.5), (16, 16, -1.0)])
def test_occlusion_equals_captum_where_the_positions_tile_the_image(window, stride,
                                                                    baseline) -> None:
    model, x = _resnet(), _inputs()
    targets = torch.tensor([1, 4, 7])
    method = resolve_method({"name": "occlusion", "window": window, "stride": stride,
                             "baseline": baseline})
    got = method(model, x, targets, AttributionContext(chunk_size=7))
    h, w = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    expected = Occlusion(model).attribute(x, sliding_window_shapes=(3, h, w),
                                          strides=(3, sh, sw), baselines=baseline,
                                          target=targets)
    assert got.shape == (3, 1, 32, 32)
    assert torch.equal(expected[:, :1].expand_as(expected), expected)  # one value per pixel
    # Captum accumulates the drops in float32 even for float64 inputs: its rounding, ~5e-8
    torch.testing.assert_close(got, expected[:, :1].double(), rtol=1e-6, atol=1e-9)


def test_a_linear_model_gives_the_closed_form_with_edge_aligned_patches() -> None:
    """f(x) = Σ w·x: hiding a patch drops the logit by Σ_patch w·(x − b); a pixel's map is
    the mean of that over its covering patches. 10 px, window 4, stride 3: starts 0, 3, 6."""
    targets = torch.tensor([0, 2])
    baseline = 0.25
    assert patch_spans(10, 4, 3) == [0, 3, 6]
    assert patch_spans(11, 4, 3) == [0, 3, 6, 7]
    for size in (10, 11):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(2 * size * size, 3)).double().eval()
        x = _inputs(2, size)[:, :2]
        method = resolve_method({"name": "occlusion", "window": 4, "stride": 3,
                                 "baseline": baseline})
        got = method(model, x, targets, AttributionContext(mean=(0.5, 0.5), std=(1, 1)))
        weights = model[1].weight[targets].view(2, 2, size, size)
        contribution = (weights * (x - baseline)).sum(dim=1)  # per pixel, (2, size, size)
        total = torch.zeros(2, size, size, dtype=torch.float64)
        covering = torch.zeros(size, size, dtype=torch.float64)
        for top in patch_spans(size, 4, 3):
            for left in patch_spans(size, 4, 3):
                drop = contribution[:, top:top + 4, left:left + 4].sum(dim=(1, 2))
                total[:, top:top + 4, left:left + 4] += drop[:, None, None]
                covering[top:top + 4, left:left + 4] += 1
        assert covering.min() >= 1
        torch.testing.assert_close(got[:, 0], total / covering, rtol=1e-12, atol=1e-12)


def test_the_copies_are_forward_passes_only_batched_in_chunks() -> None:
    calls: list[tuple[int, bool]] = []

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _resnet()

        def forward(self, x: Tensor) -> Tensor:
            calls.append((len(x), torch.is_grad_enabled()))
            return self.model(x)

    model = Recording().eval()
    method = resolve_method({"name": "occlusion", "window": 16, "stride": 8})
    method(model, _inputs(3), torch.tensor([0, 1, 2]), AttributionContext(chunk_size=8))
    assert [n for n, _ in calls] == [8, 8, 8, 6]  # 3 images × (1 + 3×3 positions) = 30 rows
    assert not any(grad for _, grad in calls)


def test_prefix_cached_stages_equal_full_forwards() -> None:
    """A stage that randomizes only the head replays the trunk's outputs for the copies; the
    maps equal those of a model randomized on its own."""
    model, x = _resnet(), _inputs(2)
    targets = torch.tensor([3, 5])
    method = resolve_method({"name": "occlusion", "window": 16, "stride": 8})
    context = AttributionContext(chunk_size=6)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    head = {k: torch.randn_like(v) for k, v in model.fc.state_dict().items()}
    trace = trace_calls(model, x[:1])
    ran: list[int] = []  # rows through a convolution inside the trunk (not a stub's output)
    model.layer1[0].conv1.register_forward_hook(lambda module, args, out: ran.append(len(out)))

    def enter(randomized: bool) -> nn.Module:
        model.load_state_dict(trained)
        if randomized:
            model.fc.load_state_dict(head)
        return model

    source = RowSource.of(x, targets)
    plans = [method.spec.plan(model, source, context, **dict(method.params)) for _ in range(2)]
    run_staged([StageRequests(enter=lambda r=r: enter(r), requests=p.requests,
                              randomized=("fc",) if r else ())
                for r, p in zip((False, True), plans)], context, trace)
    assert sum(ran) == 20  # the trunk ran for the trained copies only: 2 × (1 + 9) rows
    for randomized, plan in zip((False, True), plans):
        ran.clear()
        expected = method(enter(randomized), x, targets, context)
        torch.testing.assert_close(plan.finish(), expected, rtol=1e-9, atol=1e-12)


def test_bad_windows_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="stride 7 exceeds the window's width 6"):
        resolve_method({"name": "occlusion", "window": [8, 6], "stride": [5, 7]})
    with pytest.raises(ConfigError, match=r"^window\.0: .*greater than 0"):
        resolve_method({"name": "occlusion", "window": 0})
    method = resolve_method({"name": "occlusion", "window": 40})
    with pytest.raises(MethodError, match=r"window 40×40 is larger than the 32×32 input"):
        method(_resnet(), _inputs(1), torch.tensor([0]))
