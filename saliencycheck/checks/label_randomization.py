"""Label (data) randomization (Adebayo et al. 2018, §4).

The model is compared with a copy of it trained on permuted labels, which can only memorise:
a method whose maps stay alike explains the images, not what the model learned from its
labels. A true-label control, trained with the same recipe, shows what retraining alone
changes. The random-label model must memorise its labels (``min_train_accuracy``), else the
test is invalid, not failed. ``saliencycheck.label_training`` trains or loads the models.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from rich.console import Group as Rows
from rich.text import Text

from saliencycheck.checks.base import (
    TRAINED,
    Check,
    Engine,
    Group,
    View,
    fmt,
    method_table,
    register_check,
)
from saliencycheck.errors import SaliencyCheckError
from saliencycheck.sections import Section

RANDOM_LABELS = "random_labels"  # the model trained on permuted labels (stage 1, judged)
CONTROL = "control"  # the true-label control (stage 2, its reference)
CACHE_DIR = "label_randomization"  # the trained models' cache, in the output folder


class TrainRecipe(Section):
    """How saliencycheck trains the random-label model (and the true-label control)."""

    data: str = Field(
        "digits",
        description="'digits' (scikit-learn's handwritten digits, the training part [0, 1600)) "
        "or a folder in torchvision ImageFolder layout (one sub-folder per class), relative to "
        "the config file.",
    )
    limit: int | None = Field(
        None, ge=10, description="Train on the first N examples only (a quick, smaller test)."
    )
    epochs: int = Field(100, ge=1, description="Most epochs; training stops early once "
                        "min_train_accuracy is reached.")
    lr: float = Field(1.0e-4, gt=0, description="Learning rate (paper: Adam, 1e-4).")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or sgd with momentum 0.9.")
    batch_size: int = Field(50, ge=1, description="Examples per step (paper: 50).")
    min_train_accuracy: float = Field(
        0.95, gt=0, le=1,
        description="Training accuracy the random-label model must reach (memorisation); "
        "below it the test is reported invalid.",
    )
    control: bool = Field(
        True, description="Also train a true-label control with the same recipe, data and init."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds the initialisation, the label "
                      "permutation and the batch order; 0 to 2**32 - 1.")


class LabelRandomizationConfig(Section):
    checkpoint: str | None = Field(
        None, description="A ready model of the same architecture trained on permuted labels "
        "(state_dict, loaded with weights_only=True)."
    )
    control_checkpoint: str | None = Field(
        None, description="With checkpoint: an optional true-label control trained the same way."
    )
    train: TrainRecipe | None = Field(
        None, description="Or a recipe: saliencycheck trains (and caches) the models itself."
    )

    @model_validator(mode="after")
    def _one_source(self) -> LabelRandomizationConfig:
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give either checkpoint: (a model trained on permuted labels) or "
                             "train: (a recipe), not both or neither")
        if self.control_checkpoint and self.train is not None:
            raise ValueError("control_checkpoint goes with checkpoint:; with train: set "
                             "train.control: true")
        return self


@register_check
class LabelRandomization(Check):
    name = "label_randomization"
    title = "label randomization (random-label model, true-label control)"
    section = LabelRandomizationConfig
    description = ("Label (data) randomization test: compare with a model trained on "
                   "permuted labels (off unless given).")
    optional = True
    has_validity = True
    against_floor = True
    identity_row = True
    figure = "bars"

    def roles(self, config: Any) -> list[str]:
        """The models compared with: the random-label model, then the control if any."""
        section = config.tests.label_randomization
        if section is None:
            return []
        control = section.train.control if section.train else bool(section.control_checkpoint)
        return [RANDOM_LABELS, CONTROL] if control else [RANDOM_LABELS]

    def stage_names(self, setup: Any) -> list[str]:
        return [TRAINED, *self.roles(setup.config)]

    def final_stage(self, names: list[str]) -> int:
        """The random-label model (the control is its reference, not a later stage)."""
        return 1

    def steps(self, setup: Any) -> float:
        return len(self.roles(setup.config))

    def prepare(self, setup: Any, example: Callable[[], torch.Tensor], *, retrain: bool,
                progress: Callable[[str], None]) -> Any:
        """The models: handed in from Python, loaded from checkpoints, or trained (cached in
        the output folder's label_randomization/)."""
        # imported here: training loads checkpoints through the model loader, which imports
        # the config, which is assembled from this registry
        from saliencycheck.label_training import from_modules, obtain_label_models

        if setup.label_models is not None:
            return from_modules(setup.model, example(), setup.label_models)
        try:
            return obtain_label_models(setup.model, example(),
                                       setup.config.tests.label_randomization,
                                       pre=setup.preprocessing, resolve=setup.resolve,
                                       cache=self.cache(setup), retrain=retrain,
                                       progress=progress)
        except SaliencyCheckError as exc:  # its checkpoints are config fields: name the file
            raise type(exc)(f"{setup.source.name}: {exc}") from None

    def cache(self, setup: Any) -> Path:
        """Where trained models are kept: the output folder's label_randomization/."""
        return (setup.output_dir / CACHE_DIR).resolve()

    def written(self, setup: Any, prepared: Any) -> list[Path]:
        """The models (and their notes) trained now into :meth:`cache`."""
        cache = self.cache(setup)
        trained = [Path(m["source"]) for m in prepared.as_json().get("models", [])
                   if not m.get("cached") and cache in Path(m["source"]).resolve().parents]
        return [path for model in trained for path in (model, model.with_suffix(".json"))]

    def prepared_json(self, prepared: Any) -> dict:
        return prepared.as_json()

    def to_device(self, prepared: Any, device: str) -> Any:
        """A copy of the models on ``device``."""
        return replace(prepared, models={role: copy.deepcopy(model).to(device)
                                         for role, model in prepared.models.items()})

    def score(self, engine: Engine, group: Group) -> None:
        """Maps of the random-label model (and the control) against the trained maps, each
        explaining the trained model's class, or its own top class with 'recompute'."""
        setup, models = engine.setup, engine.prepared(self.name)
        note = "" if models.valid else f"invalid test: {models.reason}"
        engine.record(self.name, 0, TRAINED, group.ids, group.targets, group.targets,
                      group.trained, group.identity, note=note)
        for index, role in enumerate(self.roles(setup.config), start=1):
            model = models.models[role]
            explained = group.targets
            if setup.config.tests.target_on_randomized == "recompute":
                with torch.no_grad():
                    explained = model(group.inputs).argmax(dim=1)
            maps = engine.maps(model, group.inputs, explained)
            engine.record(self.name, index, role, group.ids, group.targets, explained, maps,
                          group.score(maps), note=note)

    def validity(self, setup: Any, context: dict, observations: list) -> dict | None:
        """Whether the random-label model memorised its labels, with the models' accuracies
        (as the run stored them when it obtained the models)."""
        return context.get(self.name)

    def direction(self, metric: str, stage: str) -> int:
        """The control describes what retraining alone does: it is not compared."""
        return 0 if stage == CONTROL else 1

    def table(self, view: View) -> Rows | None:
        """The random-label model's similarity next to the control's, and the validity."""
        if view.final is None:
            return None
        rows = {(s.method, s.stage, s.metric): s for s in view.summary if s.test == self.name}
        has_control = any(stage == CONTROL for _, stage, _ in rows)
        shows_floor = any(not math.isnan(s.above_floor) for (_, stage, _), s in rows.items()
                          if stage == RANDOM_LABELS)

        def cell(method: str, metric: str) -> str:
            random = rows.get((method, RANDOM_LABELS, metric))
            control = rows.get((method, CONTROL, metric))
            text = (fmt(random.mean) if random else "-") + (
                f" ({fmt(control.mean)})" if control else "")
            if random and not math.isnan(random.above_floor):
                text += f"\n[dim]Δ{fmt(random.above_floor)}[/]"
            return text

        table = method_table(
            view, f"{self.name}: similarity to the trained model's maps, random-label model"
                  + (" (true-label control)" if has_control else "") + ", mean over images"
                  + ("; Δ: above the random-network floor" if shows_floor else ""), cell)
        info = view.validity
        if info is None:
            return Rows(table)
        status = ("[green]valid[/]" if info["valid"]
                  else "[bold yellow]INVALID[/] (not passed, not failed)")
        return Rows(table, Text.from_markup(f"label randomization: {status}: ")
                    + Text(info["reason"]))
