"""Property-based tests (hypothesis): the config loader and the metrics on arbitrary input."""

from __future__ import annotations

import math
import string
from pathlib import Path

import numpy as np
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from saliencycheck.config import Config, load_config, parse_config
from saliencycheck.errors import ConfigError
from saliencycheck.metrics import score_maps
from saliencycheck.postprocess import PostprocessOptions

# Keys users write (real ones, so the fuzzer reaches deep into sections) and noise.
KEYS = st.sampled_from([
    "model", "images", "methods", "tests", "metrics", "runtime", "output", "thresholds",
    "baselines", "postprocess", "preset", "fail_on", "name", "weights", "path", "size",
    "steps", "samples", "enabled", "order", "granularity", "device", "batch_size", "seed",
    "metric", "max", "min", "stage", "cascading", "label_randomization", "train", "shift",
]) | st.text(string.ascii_letters + "_.", min_size=1, max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
YAML_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(KEYS, inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, YAML_VALUES, max_size=6))
def test_any_mapping_is_a_config_or_a_config_error(data: dict) -> None:
    try:
        config = parse_config(data, source="fuzz.yaml")
    except ConfigError as error:
        message = str(error)
        assert message.startswith("fuzz.yaml: ") and "\n" not in message.strip()
    else:
        assert isinstance(config, Config)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | YAML_VALUES.map(lambda v: yaml.safe_dump(v)))
def test_any_file_text_loads_or_raises_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        assert str(error).startswith(str(path))


METRICS = ["spearman_abs", "spearman", "pearson", "ssim", "hog"]
MAPS = arrays(np.float64, (2, 2, 48, 48),
              elements=st.floats(-1e3, 1e3, allow_nan=False, width=64)
              | st.sampled_from([0.0, 1.0, -1.0]))


@settings(max_examples=40, deadline=None)
@given(MAPS, MAPS)
def test_metrics_stay_in_range_are_symmetric_and_one_on_identical_maps(a: np.ndarray,
                                                                       b: np.ndarray) -> None:
    first, second = torch.from_numpy(a), torch.from_numpy(b)
    options = PostprocessOptions()
    forward = score_maps(first, second, METRICS, options)
    backward = score_maps(second, first, METRICS, options)
    itself = score_maps(first, first, METRICS, options)
    for name in METRICS:
        values, reasons = forward[name].values, forward[name].reasons
        for value, reason in zip(values.tolist(), reasons):
            assert math.isnan(value) == bool(reason), (name, value, reason)  # NaN says why
            assert math.isnan(value) or -1 - 1e-9 <= value <= 1 + 1e-9, (name, value)
        torch.testing.assert_close(values, backward[name].values, equal_nan=True,
                                   rtol=1e-6, atol=1e-9)
        for value in itself[name].values.tolist():
            assert math.isnan(value) or abs(value - 1) < 1e-6, (name, value)
