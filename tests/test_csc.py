"""Cosine similarity convergence: the run's values equal a hand computation from each block's
Jacobian, the test separates a rank-one backward (z⁺, guided backprop on a deep plain network)
from the gradient, and what it cannot judge it says."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

import saliencycheck as sc
from saliencycheck.checks.csc import mean_pairwise_cosine, random_vectors
from saliencycheck.config import parse_config
from saliencycheck.errors import ConfigError

SAMPLES = 5
IMAGES = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def _csc(model: nn.Module, images: Tensor, methods: list, tmp_path, name: str, *,
         batch_size: int = 8, samples: int = SAMPLES, **config) -> pd.DataFrame:
    result = sc.check(model, images, methods=methods, device="cpu",
                      tests={"cascading": {"enabled": False}, "independent": {"enabled": False},
                             "csc": {"enabled": True, "samples": samples,
                                     "granularity": "layer"}},
                      metrics=["spearman"], baselines={"random_floor": False, "edges": False},
                      image_settings={"mean": [0.0] * 3, "std": [1.0] * 3},
                      runtime={"batch_size": batch_size, "chunk_size": 7},
                      output=tmp_path / name, **config)
    report = pd.read_csv(result.folder / "report.csv", dtype={"stage": str})
    return report[report.test == "csc"]


def _hand_csc(model: nn.Module, image: Tensor, place: int, block: str, *,
              relevance: bool) -> tuple[float, float]:
    """(the input maps' CSC, the vectors' own) from the block's explicit Jacobian: the maps are
    Jᵀv (the gradient), or x ⊙ Jᵀv (LRP-0: relevance A ⊙ v injected, relevance at the input)."""
    module = model.get_submodule(block)
    kept = []
    handle = module.register_forward_hook(lambda m, a, out: kept.append(out))
    with torch.no_grad():
        model(image[None])
    handle.remove()
    activation = kept[0][0]

    def block_output(x: Tensor) -> Tensor:
        store = []
        h = module.register_forward_hook(lambda m, a, out: store.append(out))
        model(x[None])
        h.remove()
        return store[0][0].flatten()

    jacobian = torch.autograd.functional.jacobian(block_output, image).flatten(1)  # (A, x)
    v = random_vectors([place], block, tuple(activation.shape), SAMPLES, seed=0,
                       device=torch.device("cpu")).flatten(1)
    maps = image.flatten() * (v @ jacobian) if relevance else v @ jacobian

    def cosine(first: Tensor, second: Tensor) -> float:
        return abs(float(first @ second / (first.norm() * second.norm())))

    pairs = list(itertools.combinations(range(SAMPLES), 2))
    return (sum(cosine(maps[i], maps[j]) for i, j in pairs) / len(pairs),
            sum(cosine(v[i], v[j]) for i, j in pairs) / len(pairs))


def test_the_run_equals_the_hand_computation_from_each_blocks_jacobian(tmp_path) -> None:
    model = _small()
    report = _csc(model, IMAGES, ["gradient", {"name": "lrp", "rule": "epsilon",
                                               "epsilon": 1e-12}], tmp_path, "hand")
    assert list(dict.fromkeys(report.stage)) == ["5", "2", "0"]  # from the logits down
    checked = 0
    for place in range(len(IMAGES)):
        for block in ("5", "2", "0"):
            rows = report[(report.image == report.image.unique()[place])
                          & (report.stage == block)].set_index("method").value
            for method, relevance in (("gradient", False), ("lrp_epsilon", True)):
                maps, vectors = _hand_csc(model, IMAGES[place], place, block,
                                          relevance=relevance)
                assert rows[method] == pytest.approx(maps, rel=5e-4), (method, block)  # float32
                assert rows["random_vectors"] == pytest.approx(vectors, rel=1e-5)
                checked += 1
    assert checked == 18
    assert report[report.method == "gradient"].value.nunique() == 9  # no value repeated


def test_the_values_do_not_depend_on_how_the_images_are_grouped(tmp_path) -> None:
    methods = ["gradient", "guided_backprop", "deeplift"]
    once = _csc(_small(), IMAGES, methods, tmp_path, "all", batch_size=8)
    singly = _csc(_small(), IMAGES, methods, tmp_path, "one", batch_size=1)
    columns = ["image", "method", "stage_index", "value"]
    pd.testing.assert_frame_equal(
        once[columns].sort_values(columns[:3]).reset_index(drop=True),
        singly[columns].sort_values(columns[:3]).reset_index(drop=True), rtol=1e-6)


def _plain_deep() -> nn.Module:
    """A VGG-like stack of sixteen 3×3 convolutions with ReLUs (8 channels), no skips."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = 3
    for _ in range(16):
        layers += [nn.Conv2d(width, 8, 3, padding=1), nn.ReLU()]
        width = 8
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).eval()


def test_a_rank_one_backward_converges_and_the_gradient_does_not(tmp_path) -> None:
    """z⁺ (products of non-negative matrices, rank one in the limit: Sixt et al. Thm 1) and
    guided backprop stay far above the gradient wherever the relevance is injected, and reach
    0.9 when it starts at the logits; the gradient stays below 0.5 (random init: measured
    0.95 / 0.94 / 0.49 at the logits, 0.70 / 0.94 / 0.24 four layers below)."""
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = _csc(_plain_deep(), images, ["gradient", "guided_backprop",
                                          {"name": "lrp", "rule": "zplus"}], tmp_path, "deep",
                  samples=8)
    csc = report.groupby(["method", "stage_index"]).value.mean().unstack()
    assert csc.loc["lrp_zplus", 1] > 0.9 and csc.loc["guided_backprop", 1] > 0.9
    assert (csc.loc["gradient"] < 0.5).all()
    upper = csc.columns[:12]  # injected from the logits down to the fifth convolution
    for method in ("lrp_zplus", "guided_backprop"):
        assert (csc.loc[method, upper] > csc.loc["gradient", upper] + 0.25).all(), method


def test_methods_without_one_backward_pass_are_not_applicable_and_say_so(tmp_path) -> None:
    report = _csc(_small(), IMAGES, ["gradient", {"name": "occlusion", "window": 3,
                                                  "stride": 3}, "gradcam"], tmp_path, "na")
    for method in ("occlusion", "gradcam"):
        rows = report[report.method == method]
        assert len(rows) == 3 * 3 and rows.value.isna().all()
        assert rows.note.str.contains(f"not applicable: {method}").all()
    assert report[report.method == "gradient"].value.notna().all()


def test_the_config_is_checked_in_one_line() -> None:
    base = {"model": {"name": "resnet18"}, "metrics": ["spearman"]}
    with pytest.raises(ConfigError, match=r"tests\.csc\.samples"):
        parse_config({**base, "tests": {"csc": {"enabled": True, "samples": 1}}})
    with pytest.raises(ConfigError, match=r"thresholds.csc.metric: csc is judged by "
                                          r"cosine_similarity"):
        parse_config({**base, "tests": {"csc": {"enabled": True}},
                      "thresholds": {"csc": {"metric": "spearman", "max": 0.9}}})
    config = parse_config({**base, "tests": {"csc": {"enabled": True}}, "thresholds": {
        "csc": {"metric": "cosine_similarity", "stage": 3, "max": 0.95}}})
    assert config.tests.csc.samples == 32


def test_the_mean_pairwise_cosine_is_the_mean_over_distinct_pairs() -> None:
    maps = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0],  # image 0: |cos| 0, √½, √½
                         [2.0, 0.0], [3.0, 0.0], [0.0, 0.0]])  # image 1: a zero map
    values, reasons = mean_pairwise_cosine(maps, 3)
    assert values[0].item() == pytest.approx((0 + 2 * 0.5 ** 0.5) / 3)
    assert torch.isnan(values[1]) and reasons == ("", "a propagated map is zero")


def test_lrp_epsilon_converges_as_gradient_x_input_with_batch_norms_merged(tmp_path) -> None:
    """LRP-ε is gradient × input on ReLU networks, batch norms merged into the convolutions
    before them; an injection point between a convolution and its batch norm (layer
    granularity) must not break the merge (it did: the hook's copy hid the convolution)."""
    from tests.test_deeplift import calibrated

    model = calibrated(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 5)), 6).float()
    report = _csc(model, IMAGES, ["gradient_x_input", {"name": "lrp", "rule": "epsilon",
                                                       "epsilon": 1e-9}], tmp_path, "bn")
    values = report.pivot_table(index=["image", "stage"], columns="method", values="value")
    assert len(values) == 3 * 5  # the linear layer, both batch norms, both convolutions
    assert values["lrp_epsilon"].to_numpy() == pytest.approx(
        values["gradient_x_input"].to_numpy(), rel=1e-3)
