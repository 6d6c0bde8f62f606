"""What run.json records so a result can be traced back: versions, config hash, seeds, files."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from saliencycheck.checks.base import REPEAT_SEED_STEP
from saliencycheck.checks.random_floor import floor_seeds
from saliencycheck.runner.ownership import file_sha256
from saliencycheck.runner.plan import PLACEMENT
from saliencycheck.runner.setup import RunSetup

PACKAGES = ("saliencycheck", "torch", "torchvision", "numpy", "scikit-image", "pydantic", "ray")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def config_sha256(setup: RunSetup) -> str:
    """SHA-256 of the resolved config (defaults and preset applied, keys sorted) without
    where it ran (backend, device, Ray resources, output folder): equal hashes mean the same
    settings, whatever the YAML's layout or comments."""
    config = setup.config.model_dump(mode="json")
    for section, keys in PLACEMENT.items():
        config[section] = {k: v for k, v in config[section].items() if k not in keys}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def model_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, values): the
    weights the run explained, however they came (torchvision weights, checkpoint, factory)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def seeds(setup: RunSetup) -> dict[str, object]:
    """Every seed the run drew from."""
    runtime, tests = setup.config.runtime, setup.config.tests
    section = tests.label_randomization
    return {
        "runtime.seed": runtime.seed,
        "randomization_repeats": [runtime.seed + REPEAT_SEED_STEP * r
                                  for r in range(runtime.repeats)],
        "random_floor_copies": ([list(pair) for pair in floor_seeds(runtime.seed,
                                                                    runtime.repeats)]
                                if setup.config.baselines.random_floor else []),
        "label_training": section.train.seed if section and section.train else None,
    }


def checkpoint_hashes(setup: RunSetup, label_randomization: dict | None) -> dict[str, str]:
    """SHA-256 of every checkpoint file the config names (model weights, label models) and
    of the label randomization models the run trained or took from its cache."""
    config = setup.config
    named = [config.model.weights]
    if config.tests.label_randomization is not None:
        section = config.tests.label_randomization
        named += [section.checkpoint, section.control_checkpoint]
    paths = [setup.resolve(name) for name in named if name]
    paths += [Path(m["source"]) for m in (label_randomization or {}).get("models", [])]
    return {str(path): file_sha256(path) for path in paths if path.is_file()}
