"""A worker process's side of a run: rebuild the setup from the config, then run units.

Workers (one process per GPU, or Ray workers on other machines) get the loaded config, never
the model object: each builds its own model, images and stages with `prepare`, exactly as the
driver did, so a unit's results do not depend on which process ran it. What the checks
prepare once (label randomization's models) is obtained by the driver and shipped on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saliencycheck.checks import get_check
from saliencycheck.config import Config, LoadedConfig
from saliencycheck.runner.executor import UnitExecutor
from saliencycheck.runner.setup import RunSetup, prepare


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the driver's setup on its own ``device``."""

    config: Config
    source: Path
    device: str
    prepared: dict[str, Any] = field(default_factory=dict)  # by check, on the CPU

    @classmethod
    def of(cls, setup: RunSetup, prepared: dict[str, Any], device: str) -> WorkerSpec:
        return cls(config=setup.config, source=setup.source, device=device,
                   prepared=on_device(prepared, "cpu"))


def on_device(prepared: dict[str, Any], device: str) -> dict[str, Any]:
    """Copies of what the checks prepared, on ``device`` (the originals stay where they are)."""
    return {name: get_check(name).to_device(value, device) for name, value in prepared.items()}


def build_executor(spec: WorkerSpec) -> UnitExecutor:
    """Prepare the run on ``spec.device`` and return an executor for its units."""
    runtime = spec.config.runtime.model_copy(update={"device": spec.device})
    config = spec.config.model_copy(update={"runtime": runtime})
    setup = prepare(LoadedConfig(config=config, source=spec.source))
    return UnitExecutor(setup, on_device(spec.prepared, str(setup.device)))
