"""Deterministic models for the benchmark: every contender gets the very same weights.

Workload (a) uses the trained digits ResNet-18 (``saliencycheck.zoo:digits_resnet18``, trained
once and cached). Workloads (b) and (c) use :func:`resnet50_seeded` and :func:`vit_b_16_seeded`:
no ImageNet weights can be downloaded here, and the cost of the passes does not depend on the
weights' values.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def _seeded(builder: str, num_classes: int, seed: int) -> nn.Module:
    """A torchvision builder's model initialised from ``seed`` (the global RNG is left
    untouched), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(builder, num_classes=num_classes)
    return model.eval()


def resnet50_seeded(*, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision's ResNet-50, initialised from ``seed``."""
    return _seeded("resnet50", num_classes, seed)


def vit_b_16_seeded(*, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision's ViT-B/16 (224×224 inputs), initialised from ``seed``. torchvision starts
    the classification head at zero (every logit 0, every gradient 0: Quantus refuses such
    maps), so the head is drawn from N(0, 0.02²) as a trained head would be non-zero."""
    model = _seeded("vit_b_16", num_classes, seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model
