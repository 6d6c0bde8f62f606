"""Postprocessing against a hand-written numpy version of the original recipe, and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saliencycheck.errors import ConfigError
from saliencycheck.postprocess import (
    PostprocessOptions,
    absolute,
    min_max,
    per_map_percentile,
    reduce_channels,
    signed,
    views,
)


def _maps(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Heavy-tailed random maps, like raw gradients."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) ** 3).to(dtype)


# The original recipe, one map (C, H, W) at a time (adebayoj/sanity_checks_saliency).
def _absolute_np(m: np.ndarray, q: float = 99.0) -> np.ndarray:
    x = np.abs(m).sum(axis=0)
    low, high = x.min(), np.percentile(x, q)
    return np.clip((x - low) / (high - low), 0, 1)


def _signed_np(m: np.ndarray, q: float = 99.0) -> np.ndarray:
    x = m.sum(axis=0)
    return np.clip(x / np.percentile(np.abs(x), q), -1, 1)


def _min_max_np(m: np.ndarray) -> np.ndarray:
    x = np.abs(m).sum(axis=0)
    return (x - x.min()) / (x.max() - x.min())


@pytest.mark.parametrize("q", [0.0, 1.0, 37.5, 50.0, 99.0, 99.9, 100.0])
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentile_matches_numpy(q: float, n: int) -> None:
    x = _maps(3, n, seed=n)
    expected = np.percentile(x.numpy(), q, axis=1)
    np.testing.assert_allclose(per_map_percentile(x, q).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_percentile_beyond_torch_quantile_limit() -> None:
    side = 4097  # 4097**2 > 2**24, the most torch.quantile accepts
    x = torch.rand(1, side, side, generator=torch.Generator().manual_seed(0))
    expected = np.percentile(x.numpy().reshape(1, -1), 99.0, axis=1)
    np.testing.assert_allclose(per_map_percentile(x, 99.0).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("q", [-1.0, 100.5])
def test_percentile_out_of_range_is_config_error(q: float) -> None:
    with pytest.raises(ConfigError, match="percentile"):
        per_map_percentile(_maps(1, 10), q)


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (2, 1, 20, 28)])
@pytest.mark.parametrize("q", [99.0, 90.0])
def test_views_match_numpy_recipe(shape: tuple[int, ...], q: float) -> None:
    maps = _maps(*shape)
    got_abs = absolute(maps, percentile=q)
    got_signed = signed(maps, percentile=q)
    got_min_max = min_max(maps)
    for i, m in enumerate(maps.numpy()):
        np.testing.assert_allclose(got_abs[i].numpy(), _absolute_np(m, q), atol=1e-10)
        np.testing.assert_allclose(got_signed[i].numpy(), _signed_np(m, q), atol=1e-10)
        np.testing.assert_allclose(got_min_max[i].numpy(), _min_max_np(m), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_keep_dtype_and_agree(dtype: torch.dtype) -> None:
    maps = _maps(3, 3, 24, 24, dtype=dtype)
    reference = maps.double().numpy()
    for fn, recipe in [(absolute, _absolute_np), (signed, _signed_np), (min_max, _min_max_np)]:
        out = fn(maps)
        assert out.dtype == dtype and out.shape == (3, 24, 24)
        for i, m in enumerate(reference):
            np.testing.assert_allclose(out[i].double().numpy(), recipe(m), atol=1e-5)


def test_ranges_and_ties() -> None:
    maps = _maps(5, 3, 40, 40)
    a, s, mm = absolute(maps), signed(maps), min_max(maps)
    assert a.min() >= 0 and a.max() <= 1
    assert s.min() >= -1 and s.max() <= 1 and s.min() < 0
    assert mm.amin(dim=(1, 2)).eq(0).all() and mm.amax(dim=(1, 2)).eq(1).all()
    # the top 1 % of each absolute map is clipped to ties at 1
    assert ((a == 1).flatten(1).sum(dim=1) >= 0.01 * 40 * 40 - 1).all()


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_map_gives_no_nan(value: float) -> None:
    # absolute and min-max divide 0 by 0: zeros; signed divides c by |c|: sign(c), still constant
    maps = torch.full((2, 3, 16, 16), value, dtype=torch.float64)
    out = views(maps, PostprocessOptions())
    zeros = torch.zeros(2, 16, 16, dtype=torch.float64)
    assert torch.equal(out["absolute"], zeros)
    assert torch.equal(out["minmax"], zeros)
    assert torch.equal(out["signed"], torch.full_like(zeros, float(np.sign(value))))


def test_sparse_map_zero_scale_keeps_its_support() -> None:
    # more than 99 % of the pixels at the minimum: the 99th percentile equals the minimum,
    # so numpy's recipe divides by 0; x/0 clips to sign(x), 0/0 is 0
    maps = torch.zeros(1, 1, 20, 20, dtype=torch.float64)
    maps[0, 0, 3, 4] = 5.0
    maps[0, 0, 7, 1] = -2.0
    a = absolute(maps)
    s = signed(maps)
    expected_abs = torch.zeros(1, 20, 20, dtype=torch.float64)
    expected_abs[0, 3, 4] = expected_abs[0, 7, 1] = 1.0
    expected_signed = torch.zeros(1, 20, 20, dtype=torch.float64)
    expected_signed[0, 3, 4], expected_signed[0, 7, 1] = 1.0, -1.0
    assert torch.equal(a, expected_abs)
    assert torch.equal(s, expected_signed)


def test_each_reduction_does_what_it_says() -> None:
    maps = torch.tensor([[[[1.0]], [[-3.0]], [[0.5]]]])  # (1, 3, 1, 1)
    expected = {"sum_abs": 4.5, "abs_sum": 1.5, "max_abs": 3.0, "sum": -1.5, "mean": -0.5}
    for how, value in expected.items():
        out = reduce_channels(maps, how)
        assert out.shape == (1, 1, 1)
        assert out.item() == pytest.approx(value)


def test_reductions_on_random_maps() -> None:
    maps = _maps(2, 3, 8, 8)
    m = maps.numpy()
    expected = {
        "sum_abs": np.abs(m).sum(axis=1),
        "abs_sum": np.abs(m.sum(axis=1)),
        "max_abs": np.abs(m).max(axis=1),
        "sum": m.sum(axis=1),
        "mean": m.mean(axis=1),
    }
    for how, value in expected.items():
        np.testing.assert_allclose(reduce_channels(maps, how).numpy(), value, atol=1e-12)


def test_reduction_choice_reaches_views() -> None:
    maps = _maps(2, 3, 16, 16)
    options = PostprocessOptions(abs_reduction="max_abs", signed_reduction="mean", percentile=95)
    out = views(maps, options)
    assert list(out) == ["absolute", "signed", "minmax"]
    torch.testing.assert_close(out["absolute"], absolute(maps, reduction="max_abs", percentile=95))
    torch.testing.assert_close(out["signed"], signed(maps, reduction="mean", percentile=95))
    torch.testing.assert_close(out["minmax"], min_max(maps, reduction="max_abs"))
    assert list(views(maps, options, names={"minmax"})) == ["minmax"]


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="sum_abs"):
        reduce_channels(_maps(1, 3, 4, 4), "l2")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        reduce_channels(_maps(3, 4, 4), "sum")
    with pytest.raises(ConfigError, match="minmax"):
        views(_maps(1, 3, 4, 4), PostprocessOptions(), names={"min-max"})
