"""Similarity metrics against scipy / scikit-image, their NaN reasons, registry and score_maps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import pearsonr, rankdata, spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from saliencycheck import metrics
from saliencycheck.errors import ConfigError
from saliencycheck.metrics import (
    METRICS,
    Scores,
    average_ranks,
    get_metric,
    hog_similarity,
    pearson,
    score_maps,
    spearman,
    ssim,
)
from saliencycheck.postprocess import PostprocessOptions, absolute, views

ATOL = 1e-4


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _smooth(*shape: int, seed: int = 0) -> torch.Tensor:
    """Maps in [0, 1] with spatial structure, like min-max saliency maps."""
    x = ndimage.gaussian_filter(_rand(*shape, seed=seed).numpy(), sigma=(0, 3, 3))
    x = (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(x, axis=(1, 2), keepdims=True)
    return torch.from_numpy(x)


def _pairs(a: torch.Tensor, b: torch.Tensor):
    return zip(a.numpy(), b.numpy())


def _skimage_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    return structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=True, data_range=data_range
    )


def _hog_reference(x: np.ndarray, y: np.ndarray, ppc: int = 16) -> float:
    cell = (ppc, ppc)
    return spearmanr(hog(x, pixels_per_cell=cell), hog(y, pixels_per_cell=cell)).statistic


# --- agreement with independent implementations --------------------------------------------


def test_average_ranks_match_rankdata() -> None:
    x = torch.round(_rand(5, 300) * 10)  # many ties
    expected = np.stack([rankdata(row) for row in x.numpy()])
    np.testing.assert_array_equal(average_ranks(x).numpy(), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (_rand(4, 32, 32, seed=1), _rand(4, 32, 32, seed=2)),
        lambda: (torch.round(5 * _rand(4, 32, 32, seed=1)), torch.round(5 * _rand(4, 32, 32))),
        lambda: (_rand(3, 500, seed=3).clamp(max=0.4), _rand(3, 500, seed=4).clamp(min=0.7)),
        lambda: (_smooth(3, 40, 40, seed=1), 0.5 * _smooth(3, 40, 40, seed=1) + _rand(3, 40, 40)),
    ],
    ids=["random", "rounded", "clipped", "correlated"],
)
def test_spearman_and_pearson_match_scipy(make) -> None:
    a, b = make()
    rho, r = spearman(a, b).values.numpy(), pearson(a, b).values.numpy()
    for i, (x, y) in enumerate(_pairs(a, b)):
        assert rho[i] == pytest.approx(spearmanr(x.ravel(), y.ravel()).statistic, abs=ATOL)
        assert r[i] == pytest.approx(pearsonr(x.ravel(), y.ravel()).statistic, abs=ATOL)


def test_spearman_matches_scipy_on_absolute_view() -> None:
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64) ** 3
    a = absolute(raw[:2])
    b = absolute(raw[2:] + 0.5 * raw[:2])
    assert (a == 1).sum() > 10  # the clipped top 1 % ties at 1
    rho = spearman(a, b).values.numpy()
    for i, (x, y) in enumerate(_pairs(a, b)):
        assert rho[i] == pytest.approx(spearmanr(x.ravel(), y.ravel()).statistic, abs=ATOL)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 64, 48), (2, 11, 15)])
@pytest.mark.parametrize("make", [_rand, _smooth], ids=["random", "smooth"])
def test_ssim_matches_skimage(shape: tuple[int, ...], make) -> None:
    a, b = make(*shape, seed=1), make(*shape, seed=2)
    b = 0.5 * a + 0.5 * b
    got = ssim(a, b).values.numpy()
    for i, (x, y) in enumerate(_pairs(a, b)):
        assert got[i] == pytest.approx(_skimage_ssim(x, y), abs=ATOL)


def test_ssim_data_range_matches_skimage() -> None:
    a, b = _smooth(2, 32, 32, seed=1), _smooth(2, 32, 32, seed=2)
    got = ssim(a, b, data_range=2.0).values.numpy()  # the original run's implicit setting
    for i, (x, y) in enumerate(_pairs(a, b)):
        assert got[i] == pytest.approx(_skimage_ssim(x, y, data_range=2.0), abs=ATOL)


@pytest.mark.parametrize("shape, ppc", [((3, 64, 64), 16), ((2, 64, 80), 16), ((2, 40, 32), 8)])
def test_hog_matches_skimage(shape: tuple[int, ...], ppc: int) -> None:
    a, b = _smooth(*shape, seed=1), _smooth(*shape, seed=2)
    b = 0.5 * a + 0.5 * b
    got = hog_similarity(a, b, pixels_per_cell=ppc).values.numpy()
    for i, (x, y) in enumerate(_pairs(a, b)):
        assert got[i] == pytest.approx(_hog_reference(x, y, ppc), abs=ATOL)


# --- properties ----------------------------------------------------------------------------

ALL_2D = [spearman, pearson, ssim, hog_similarity]


@pytest.mark.parametrize("fn", ALL_2D)
def test_identical_maps_score_one(fn) -> None:
    a = _smooth(3, 64, 64)
    scores = fn(a, a.clone())
    torch.testing.assert_close(scores.values, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert scores.reasons == ("", "", "")


@pytest.mark.parametrize("fn", [spearman, pearson])
def test_constant_map_is_nan_with_reason(fn) -> None:
    a, b = _rand(3, 16, 16, seed=1), _rand(3, 16, 16, seed=2)
    a[0] = 0.25
    b[1] = 0.0
    a[2] = b[2] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = fn(a, b)
    assert torch.isnan(scores.values).all()
    assert scores.reasons == (
        "constant map (reference)",
        "constant map (candidate)",
        "constant map (reference and candidate)",
    )


def test_constant_maps_in_ssim_and_hog() -> None:
    a, b = _smooth(2, 48, 48, seed=1), _smooth(2, 48, 48, seed=2)
    a[0] = b[0] = 0.3  # identical constant maps: skimage's SSIM is 1
    a[1] = 0.0
    s = ssim(a, b)
    assert s.values[0].item() == pytest.approx(1.0, abs=1e-6)
    assert s.values[1].item() == pytest.approx(_skimage_ssim(a[1].numpy(), b[1].numpy()), abs=ATOL)
    assert s.reasons == ("", "")
    h = hog_similarity(a, b)
    assert torch.isnan(h.values).all()
    assert h.reasons == (
        "constant HOG descriptor (reference and candidate)",
        "constant HOG descriptor (reference)",
    )


def test_non_finite_map_is_nan_with_reason() -> None:
    a, b = _rand(2, 16, 16, seed=1), _rand(2, 16, 16, seed=2)
    b[0, 3, 3] = float("nan")
    for fn in [spearman, pearson, ssim]:
        scores = fn(a, b)
        assert torch.isnan(scores.values[0]) and not torch.isnan(scores.values[1])
        assert scores.reasons == ("non-finite values in map (candidate)", "")


def test_too_small_maps_are_nan_with_reason() -> None:
    a, b = _rand(2, 10, 40, seed=1), _rand(2, 10, 40, seed=2)
    s = ssim(a, b)
    assert torch.isnan(s.values).all()
    assert s.reasons == ("map smaller than the 11x11 SSIM window",) * 2
    a, b = _rand(2, 47, 64, seed=1), _rand(2, 47, 64, seed=2)
    h = hog_similarity(a, b)
    assert torch.isnan(h.values).all()
    assert h.reasons == ("map smaller than one HOG block (48x48)",) * 2


def test_spearman_is_invariant_to_monotone_transforms() -> None:
    a, b = _smooth(3, 32, 32, seed=1), _rand(3, 32, 32, seed=2) + _smooth(3, 32, 32, seed=1)
    base = spearman(a, b).values
    for f in [torch.exp, lambda x: x**3, lambda x: 5 * x - 2, torch.sigmoid]:
        torch.testing.assert_close(spearman(f(a), b).values, base, atol=1e-12, rtol=0)


@pytest.mark.parametrize("fn", ALL_2D)
def test_batch_result_equals_per_item_results(fn) -> None:
    a, b = _smooth(4, 48, 48, seed=1), _smooth(4, 48, 48, seed=2)
    a[2] = 0.7  # an undefined item must not disturb its neighbours
    batch = fn(a, b)
    for i in range(4):
        single = fn(a[i : i + 1], b[i : i + 1])
        torch.testing.assert_close(single.values, batch.values[i : i + 1], equal_nan=True)
        assert single.reasons == batch.reasons[i : i + 1]


@pytest.mark.parametrize("fn", ALL_2D)
def test_float32_input_agrees_with_float64(fn) -> None:
    a, b = _smooth(2, 48, 48, seed=1), _smooth(2, 48, 48, seed=2)
    b = 0.5 * a + 0.5 * b
    single = fn(a.float(), b.float())
    assert single.values.dtype == torch.float64 and single.values.shape == (2,)
    torch.testing.assert_close(single.values, fn(a, b).values, atol=ATOL, rtol=0)


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="one shape"):
        spearman(_rand(2, 8, 8), _rand(2, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        ssim(_rand(2, 64), _rand(2, 64))


# --- registry and score_maps ---------------------------------------------------------------


def test_registry_names_and_views() -> None:
    assert {name: spec.view for name, spec in METRICS.items()} == {
        "spearman_abs": "absolute",
        "spearman": "signed",
        "pearson": "absolute",
        "ssim": "minmax",
        "hog": "minmax",
    }
    assert METRICS["spearman_abs"].fn is spearman and METRICS["spearman"].fn is spearman
    assert METRICS["ssim"].fn is ssim and METRICS["hog"].fn is hog_similarity
    assert all(spec.higher_is_similar and spec.description for spec in METRICS.values())
    assert all(get_metric(name).name == name for name in METRICS)


def test_unknown_metric_is_config_error_listing_names() -> None:
    with pytest.raises(ConfigError, match="spearman_abs, spearman, ssim, hog, pearson"):
        get_metric("kendall")
    with pytest.raises(ConfigError, match="kendall"):
        score_maps(_rand(1, 3, 8, 8), _rand(1, 3, 8, 8), ["ssim", "kendall"], PostprocessOptions())


def test_score_maps_computes_views_once_and_matches_metrics(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 3, 48, 48, generator=g)
    candidate = reference + torch.randn(3, 3, 48, 48, generator=g)
    options = PostprocessOptions()
    calls = []

    def counting_views(maps, opts, *, names):
        calls.append(set(names))
        return views(maps, opts, names=names)

    monkeypatch.setattr(metrics, "views", counting_views)
    out = score_maps(reference, candidate, list(METRICS), options)
    assert calls == [{"absolute", "signed", "minmax"}] * 2
    assert list(out) == list(METRICS)
    ref, cand = views(reference, options), views(candidate, options)
    for name, spec in METRICS.items():
        assert isinstance(out[name], Scores)
        expected = spec.fn(ref[spec.view], cand[spec.view])
        torch.testing.assert_close(out[name].values, expected.values)
    same = score_maps(reference, reference, ["spearman_abs"], options)["spearman_abs"]
    assert same.values.eq(1).all()
    calls.clear()
    score_maps(reference, candidate, ["ssim", "hog"], options)
    assert calls == [{"minmax"}] * 2


@pytest.mark.parametrize("shape", [(64, 64), (50, 70), (61, 77), (48, 48)])
@pytest.mark.parametrize("pixels_per_cell", [16, 15, 8])
def test_hog_descriptors_match_skimage(shape: tuple[int, int], pixels_per_cell: int) -> None:
    from skimage.feature import hog

    from saliencycheck.metrics import hog_descriptors

    rng = np.random.default_rng(sum(shape) + pixels_per_cell)
    maps = [rng.random(shape), np.round(rng.random(shape) * 4) / 4,  # many ties and flat areas
            np.kron(rng.random((shape[0] // 8 + 1, shape[1] // 8 + 1)), np.ones((8, 8)))[
                : shape[0], : shape[1]], np.zeros(shape)]
    got = hog_descriptors(torch.from_numpy(np.stack(maps)), pixels_per_cell=pixels_per_cell)
    for m, descriptor in zip(maps, got):
        expected = hog(m, pixels_per_cell=(pixels_per_cell, pixels_per_cell))
        np.testing.assert_allclose(descriptor.numpy(), expected, rtol=0, atol=1e-6)


def test_the_adebayo2018_preset_scores_ssim_with_the_original_data_range() -> None:
    from skimage.metrics import structural_similarity

    from saliencycheck.config import parse_config
    from saliencycheck.metrics import ReferenceScorer
    from saliencycheck.postprocess import PostprocessOptions, views

    config = parse_config({"preset": "adebayo2018"})
    assert config.tests.target_on_randomized == "recompute"
    assert config.postprocess.ssim_data_range == 2.0
    explicit = parse_config({"preset": "adebayo2018", "postprocess": {"ssim_data_range": 1.0}})
    assert explicit.postprocess.ssim_data_range == 1.0  # the config's own value wins
    assert parse_config({}).postprocess.ssim_data_range == 1.0

    generator = torch.Generator().manual_seed(4)
    a, b = torch.rand(3, 2, 24, 24, generator=generator, dtype=torch.float64).unbind(0)[:2]
    a, b = a[None], b[None]
    options = PostprocessOptions(ssim_data_range=2.0)
    got = float(ReferenceScorer(a, ["ssim"], options).score(b)["ssim"].values[0])
    x, y = (views(m, options, names={"minmax"})["minmax"][0].numpy() for m in (a, b))
    expected = structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=True, data_range=2.0)
    assert got == pytest.approx(expected, abs=1e-10)
    assert got != pytest.approx(float(ReferenceScorer(a, ["ssim"], PostprocessOptions())
                                      .score(b)["ssim"].values[0]), abs=1e-3)


def test_a_reference_scorer_ranks_its_reference_once_and_scores_each_candidate_exactly(
        monkeypatch) -> None:
    from saliencycheck.metrics import ReferenceScorer

    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(3, 1, 48, 48, generator=generator)
    candidates = [reference + torch.randn(3, 1, 48, 48, generator=generator) for _ in range(3)]
    options = PostprocessOptions()
    ranked = []
    counting = metrics.average_ranks

    def count_ranks(x):
        ranked.append(x.shape)
        return counting(x)

    monkeypatch.setattr(metrics, "average_ranks", count_ranks)
    scorer = ReferenceScorer(reference, ["spearman_abs", "spearman", "hog"], options)
    assert len(ranked) == 3  # each view's reference and the reference's HOG descriptors
    ref = views(reference, options)
    for candidate in candidates:
        ranked.clear()
        scores = scorer.score(candidate)
        assert len(ranked) == 3  # the candidate's alone
        cand = views(candidate, options)
        for name, view in [("spearman_abs", "absolute"), ("spearman", "signed")]:
            expected = [spearmanr(r.flatten(), c.flatten()).statistic
                        for r, c in zip(ref[view].numpy(), cand[view].numpy())]
            np.testing.assert_allclose(scores[name].values.numpy(), expected, rtol=1e-12)
        expected = [spearmanr(hog(r, pixels_per_cell=(16, 16)), hog(c, pixels_per_cell=(16, 16))
                              ).statistic
                    for r, c in zip(ref["minmax"].numpy(), cand["minmax"].numpy())]
        np.testing.assert_allclose(scores["hog"].values.numpy(), expected, atol=1e-6)
