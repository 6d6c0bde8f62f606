"""Small trained models on real data that ships with a package, for the quickstart and tests.

`digits_resnet18` trains torchvision's ResNet-18 on scikit-learn's handwritten digits
(1,797 images of 8x8 pixels, upsampled to 64x64, grey replicated to RGB) and caches the
checkpoint, so the quickstart explains a *trained* network offline. An untrained network
makes every saliency map meaningless. Use it from a config with
`model.factory: saliencycheck.zoo:digits_resnet18`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from saliencycheck.atomic import atomic_write

DIGITS_TRAIN_COUNT = 1600  # digits [0, 1600) train the model; [1600, 1797) are held out
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


def cache_dir() -> Path:
    """Where trained checkpoints are cached: $SALIENCYCHECK_CACHE or ~/.cache/saliencycheck."""
    root = os.environ.get("SALIENCYCHECK_CACHE") or Path.home() / ".cache" / "saliencycheck"
    return Path(root)


def digits_pixels(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, size, size) images (bilinear upsampling) and labels (N,).

    These are exactly the pixels of the PNGs in sample_images/digits, so a model trained on
    them sees the same values when the CLI reads the PNG files.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    large = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (large.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return pixels, digits.target.astype(np.int64)


def digits_tensors(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (N, 3, size, size) inputs and labels, as the CLI would preprocess the PNGs."""
    pixels, labels = digits_pixels(size)
    x = torch.from_numpy(pixels).float().div(255.0)[:, None].repeat(1, 3, 1, 1)
    mean = torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(labels)


def train_classifier(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: str = "adam",
    stop_at: float | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> int:
    """Train on the model's device with a local generator for shuffling; return the epochs run.

    ``optimizer``: ``"adam"`` or ``"sgd"`` (momentum 0.9). With ``stop_at``, training stops
    once the eval-mode accuracy on ``inputs`` reaches it; ``on_epoch(epoch, mean loss,
    accuracy)`` reports each epoch (the accuracy is measured only for these two). The model
    is handed back in eval mode with no gradients, as if loaded from a checkpoint.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    if optimizer == "adam":
        step = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        step = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        total_loss, order = 0.0, torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < 2 and start > 0:
                continue  # a last batch of one breaks BatchNorm in training mode
            loss = F.cross_entropy(model(inputs[batch].to(device)), labels[batch].to(device))
            step.zero_grad(set_to_none=True)
            loss.backward()
            step.step()
            total_loss += float(loss.detach()) * len(batch)
        if stop_at is None and on_epoch is None:
            continue
        fit = accuracy(model, inputs, labels)
        if on_epoch is not None:
            on_epoch(epoch, total_loss / len(inputs), fit)
        if stop_at is not None and fit >= stop_at:
            break
    model.zero_grad(set_to_none=True)
    model.eval()
    return epoch


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Eval-mode top-1 accuracy on the model's device (the model is left in eval mode)."""
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(chunk.to(device)).argmax(1).cpu()
                                 for chunk in inputs.split(256)])
    return float((predictions == labels.cpu()).float().mean())


def digits_resnet18(
    *,
    num_classes: int = 10,
    size: int = 64,
    epochs: int = 3,
    seed: int = 0,
    cache: str | None = None,
) -> nn.Module:
    """ResNet-18 trained on digits [0, 1600) (~98 % held-out accuracy, ~30 s on 2 CPU cores).

    The first call trains and caches the weights (keyed by the recipe); later calls load them.
    """
    if num_classes != 10:
        raise ValueError("digits_resnet18 has 10 classes; remove model.num_classes or set it to 10")
    recipe = {"arch": "resnet18", "size": size, "epochs": epochs, "seed": seed, "lr": 1e-3,
              "batch_size": 64}
    return _trained(recipe, lambda: torchvision.models.resnet18(num_classes=10), cache)


def digits_vit(
    *,
    num_classes: int = 10,
    size: int = 32,
    epochs: int = 40,
    seed: int = 0,
    cache: str | None = None,
) -> nn.Module:
    """A 4-layer Vision Transformer (torchvision's ``VisionTransformer``: 8×8 patches, a 4×4
    grid and a class token, width 64) trained on digits [0, 1600): ~92 % held-out accuracy,
    ~30 s on 2 CPU cores, then cached like :func:`digits_resnet18`."""
    if num_classes != 10:
        raise ValueError("digits_vit has 10 classes; remove model.num_classes or set it to 10")
    recipe = {"arch": "vit_4x64_p8", "size": size, "epochs": epochs, "seed": seed, "lr": 5e-4,
              "batch_size": 64}
    return _trained(recipe, lambda: VisionTransformer(
        image_size=size, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=10), cache)


def digits_vgg(
    *,
    num_classes: int = 10,
    size: int = 32,
    epochs: int = 8,
    seed: int = 0,
    cache: str | None = None,
) -> nn.Module:
    """A VGG-style network (six 3×3 convolutions with ReLUs in four max-pooled stages, then
    two linear layers; no batch norm, no skip connection: the family Captum's LRP and the
    relevance-rule literature use) trained on digits [0, 1600) at 32×32, then cached like
    :func:`digits_resnet18`."""
    if num_classes != 10:
        raise ValueError("digits_vgg has 10 classes; remove model.num_classes or set it to 10")
    recipe = {"arch": "vgg6", "size": size, "epochs": epochs, "seed": seed, "lr": 1e-3,
              "batch_size": 64}
    return _trained(recipe, _vgg_style, cache)


def _vgg_style() -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 3
    for stage in ([16], [32], [64, 64], [128, 128]):
        for channels in stage:
            layers += [nn.Conv2d(width, channels, 3, padding=1), nn.ReLU()]
            width = channels
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 2 * 2, 128), nn.ReLU(),
                         nn.Dropout(0.25), nn.Linear(128, 10))


def _trained(recipe: dict, build: Callable[[], nn.Module], cache: str | None) -> nn.Module:
    """The model ``build()`` makes, trained on digits [0, 1600) by ``recipe`` (Adam; keys
    arch, size, epochs, seed, lr, batch_size) the first time and cached under a key of the
    recipe and torchvision's version; loaded from the cache afterwards."""
    keyed = {**recipe, "train": DIGITS_TRAIN_COUNT, "torchvision": torchvision.__version__}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    path = (Path(cache) if cache else cache_dir()) / f"digits_{recipe['arch']}_{key}.pt"
    with torch.random.fork_rng(devices=[]):  # torchvision's init uses the global RNG: isolate it
        torch.manual_seed(recipe["seed"])
        model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    inputs, labels = digits_tensors(recipe["size"])
    train_classifier(model, inputs[:DIGITS_TRAIN_COUNT], labels[:DIGITS_TRAIN_COUNT],
                     epochs=recipe["epochs"], lr=recipe["lr"], batch_size=recipe["batch_size"],
                     seed=recipe["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: an interrupted training never leaves a half-written cache
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model
