"""Deterministic models for the benchmark: every contender gets the very same weights.

Workload (a) uses the trained digits ResNet-18 (``saliencycheck.zoo:digits_resnet18``, trained
once and cached). Workload (b) uses :func:`resnet50_seeded`: no ImageNet weights can be
downloaded here, and the cost of the passes does not depend on the weights' values.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def resnet50_seeded(*, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision's ResNet-50, initialised from ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.resnet50(num_classes=num_classes)
    return model.eval()
