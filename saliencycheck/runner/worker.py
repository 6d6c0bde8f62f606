"""A worker process's side of a run: rebuild the setup from the config, then run units.

Workers (one process per GPU, or Ray workers on other machines) get the loaded config, never
the model object: each builds its own model, images and stages with `prepare`, exactly as the
driver did, so a unit's results do not depend on which process ran it. The label
randomization models are trained once by the driver and shipped on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

from saliencycheck.config import Config, LoadedConfig
from saliencycheck.label_training import LabelModels
from saliencycheck.runner.executor import UnitExecutor
from saliencycheck.runner.setup import RunSetup, prepare


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the driver's setup on its own ``device``."""

    config: Config
    source: Path
    device: str
    label_models: LabelModels | None = None  # on the CPU

    @classmethod
    def of(cls, setup: RunSetup, label_models: LabelModels | None, device: str) -> WorkerSpec:
        return cls(config=setup.config, source=setup.source, device=device,
                   label_models=on_device(label_models, "cpu"))


def on_device(label_models: LabelModels | None, device: str) -> LabelModels | None:
    """Copies of the label models on ``device`` (the originals stay where they are)."""
    if label_models is None:
        return None
    return replace(label_models, models={role: copy.deepcopy(model).to(device)
                                         for role, model in label_models.models.items()})


def build_executor(spec: WorkerSpec) -> UnitExecutor:
    """Prepare the run on ``spec.device`` and return an executor for its units."""
    runtime = spec.config.runtime.model_copy(update={"device": spec.device})
    config = spec.config.model_copy(update={"runtime": runtime})
    setup = prepare(LoadedConfig(config=config, source=spec.source))
    return UnitExecutor(setup, on_device(spec.label_models, str(setup.device)))
