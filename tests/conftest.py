"""Shared fixtures: the trained digits model (trained once, cached in the repo's .cache/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from saliencycheck.zoo import digits_resnet18

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_model() -> nn.Module:
    """ResNet-18 trained on digits [0, 1600): ~30 s on 2 CPU cores the first time, then cached."""
    return digits_resnet18(cache=str(ROOT / ".cache"))
