"""What run.json records so a result can be traced back: versions, config hash, seeds, files."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from saliencycheck.runner.executor import REPEAT_SEED_STEP, floor_seeds
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(setup: RunSetup) -> str:
    """SHA-256 of the resolved config (defaults and preset applied, keys sorted): equal
    hashes mean the same settings, whatever the YAML's layout or comments."""
    text = json.dumps(setup.config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


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
                                if setup.floor_stage else []),
        "label_training": section.train.seed if section and section.train else None,
    }


def checkpoint_hashes(setup: RunSetup) -> dict[str, str]:
    """SHA-256 of every checkpoint file the config names (model weights, label models)."""
    config = setup.config
    named = [config.model.weights]
    if config.tests.label_randomization is not None:
        section = config.tests.label_randomization
        named += [section.checkpoint, section.control_checkpoint]
    paths = [setup.resolve(name) for name in named if name]
    return {str(path): file_sha256(path) for path in paths if path.is_file()}
