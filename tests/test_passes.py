"""Shared passes: methods computed together equal methods computed alone, in fewer rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saliencycheck.methods import AttributionContext, compute_maps, resolve_method

METHODS = [
    "gradient",
    "gradient_x_input",
    {"name": "integrated_gradients", "steps": 3},
    {"name": "integrated_gradients", "steps": 3, "rule": "gauss_lobatto", "label": "ig_lobatto"},
    {"name": "gradcam", "layer": "3"},
    "guided_backprop",
    {"name": "guided_gradcam", "layer": "3"},
    {"name": "smoothgrad", "samples": 4},
    {"name": "vargrad", "samples": 4},
    {"name": "smoothgrad", "of": "integrated_gradients", "of_params": {"steps": 2},
     "samples": 2, "label": "smooth_ig"},
    "deconvnet",
]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
        nn.Sequential(nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).double().eval()


@pytest.fixture(scope="module")
def batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = small_cnn()
    inputs = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        targets = model(inputs).argmax(dim=1)
    return model, inputs, targets


@pytest.mark.parametrize("chunk_size", [1000, 5, 1])
def test_shared_passes_equal_each_method_alone(batch, chunk_size: int) -> None:
    model, inputs, targets = batch
    methods = [resolve_method(m) for m in METHODS]
    context = AttributionContext(mean=(0.5,) * 3, std=(0.5,) * 3, chunk_size=chunk_size)
    together = compute_maps(methods, model, inputs, targets, context)
    assert list(together) == [m.label for m in methods]
    for method in methods:
        alone = method(model, inputs, targets, AttributionContext(mean=(0.5,) * 3,
                                                                  std=(0.5,) * 3))
        torch.testing.assert_close(together[method.label], alone, rtol=1e-10, atol=1e-12)


def test_rows_with_equal_keys_are_computed_once(batch) -> None:
    model, inputs, targets = batch
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        names = ["gradient", "gradient_x_input", {"name": "gradcam", "layer": "3"},
                 "guided_backprop", {"name": "guided_gradcam", "layer": "3"},
                 {"name": "smoothgrad", "samples": 4}, {"name": "vargrad", "samples": 4}]
        methods = [resolve_method(m) for m in names]
        compute_maps(methods, model, inputs, targets, AttributionContext(chunk_size=1000))
        shared = list(rows)
        rows.clear()
        for method in methods:
            method(model, inputs, targets, AttributionContext(chunk_size=1000))
        alone = list(rows)
    finally:
        handle.remove()
    # plain: the 3 images (gradient, ×input, Grad-CAM, Grad-CAM of guided Grad-CAM) and their
    # 12 noisy copies (SmoothGrad and VarGrad); guided: the 3 images (both guided methods).
    # SmoothGrad's one-row forward finds the model's affine stem (saliencycheck.engine.stem).
    assert shared == [1, 15, 3]
    assert sum(alone) == 3 + 3 + 3 + 3 + (3 + 3) + (1 + 12) + 12



class OutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for batches above ``limit`` rows, like a full GPU."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.failures = model, limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_chunk_and_loses_nothing(batch) -> None:
    from saliencycheck.engine.passes import RowSource, run_requests

    model, inputs, targets = batch
    methods = [resolve_method(m) for m in METHODS if "layer" not in m]  # wrapper renames layers
    context = AttributionContext(mean=(0.5,) * 3, std=(0.5,) * 3, chunk_size=64)
    expected = compute_maps(methods, model, inputs, targets, context)
    limited = OutOfMemoryAbove(model, limit=5).eval()
    with pytest.warns(UserWarning, match=r"out of device memory in a pass of \d+ rows; "
                                         r"retrying in passes of \d+"):
        got = compute_maps(methods, limited, inputs, targets, context)
    assert limited.failures >= 1
    for label, maps in expected.items():
        torch.testing.assert_close(got[label], maps, rtol=1e-10, atol=1e-12)
    smooth = resolve_method({"name": "smoothgrad", "samples": 4})  # 12 rows > 5
    plan = smooth.spec.plan(limited, RowSource.of(inputs, targets), context, **dict(smooth.params))
    with pytest.warns(UserWarning, match="out of device memory"):
        size = run_requests(limited, plan.requests, AttributionContext(chunk_size=64))
    assert size.rows <= 5 and size.halvings >= 1


def test_reduced_precision_is_close_but_not_identical() -> None:
    from scipy.stats import spearmanr

    model = small_cnn().float()
    inputs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    targets = model(inputs).argmax(dim=1)
    method = [resolve_method("gradient")]
    fp32 = compute_maps(method, model, inputs, targets, AttributionContext())["gradient"]
    bf16 = compute_maps(method, model, inputs, targets,
                        AttributionContext(precision="bf16"))["gradient"]
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    for a, b in zip(fp32, bf16):
        assert spearmanr(a.flatten(), b.flatten())[0] > 0.9


class Quadratic(nn.Module):
    """f(x) = Σ_j (W_j · x)² + v · x: its gradient is linear along any path, so every
    quadrature with two or more nodes integrates it exactly."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(5, 4, 48, generator=generator, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(5, 48, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return (torch.einsum("cjf,nf->ncj", self.w, x) ** 2).sum(-1) + x @ self.v.T


@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_gauss_lobatto_integrates_as_exactly_as_gauss_legendre(baseline: str) -> None:
    model = Quadratic().eval()
    inputs = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(4),
                         dtype=torch.float64)
    targets = torch.tensor([0, 3, 4])
    legendre, lobatto = (
        resolve_method({"name": "integrated_gradients", "steps": 4, "baseline": baseline,
                        "rule": rule})(model, inputs, targets)
        for rule in ("gauss_legendre", "gauss_lobatto"))
    torch.testing.assert_close(lobatto, legendre, rtol=1e-10, atol=1e-10)


def test_gauss_lobatto_shares_the_input_rows_with_the_gradient(batch) -> None:
    model, inputs, targets = batch
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        # each preceded by the one-row forward that finds the affine stem (engine.stem)
        for rule, expected in (("gauss_legendre", [1, 3 + 3 * 4]),
                               ("gauss_lobatto", [1, 3 + 3 * 3])):
            rows.clear()
            methods = [resolve_method("gradient"), resolve_method(
                {"name": "integrated_gradients", "steps": 4, "rule": rule})]
            compute_maps(methods, model, inputs, targets, AttributionContext(chunk_size=1000))
            assert rows == expected
    finally:
        handle.remove()
    with pytest.raises(Exception, match="steps >= 2"):
        resolve_method({"name": "integrated_gradients", "steps": 1, "rule": "gauss_lobatto"})


@pytest.mark.parametrize("chunk_size", [1000, 4])
def test_the_passes_keep_the_images_logits_of_every_state(batch, chunk_size: int) -> None:
    from saliencycheck.engine.passes import KeptLogits, RowSource, StageRequests, run_staged

    model, inputs, targets = batch
    model = small_cnn()  # its own copy: states are entered by swapping the last weight
    weights = {"trained": model[-1].weight, "other": -2.0 * model[-1].weight.detach()}

    def enter(state: str) -> nn.Module:
        model[-1].weight = nn.Parameter(weights[state], requires_grad=False)
        return model

    context = AttributionContext(mean=(0.5,) * 3, std=(0.5,) * 3, chunk_size=chunk_size)
    # integrated gradients' rows come first in the passes; the images' rows are read by
    # gradient (plain) and guided backprop (guided)
    names = [{"name": "integrated_gradients", "steps": 3}, "gradient", "guided_backprop"]
    for methods, reads_images in ((names, True), (names[:1], False)):
        resolved = [resolve_method(m) for m in methods]
        source = RowSource.of(inputs, targets)
        kept = []
        stages = []
        for state in weights:
            plans = [m.spec.plan(model, source, context, **dict(m.params)) for m in resolved]
            kept.append(KeptLogits(key=source.key, count=len(inputs)))
            stages.append(StageRequests(enter=lambda s=state: enter(s), logits=kept[-1],
                                        requests=[r for p in plans for r in p.requests]))
        run_staged(stages, context)
        for state, logits in zip(weights, kept):
            if not reads_images:
                assert logits.value is None  # no pass pushed the images themselves
                continue
            with torch.no_grad():
                expected = enter(state)(inputs)
            torch.testing.assert_close(logits.value, expected.float(), rtol=1e-6, atol=1e-6)
