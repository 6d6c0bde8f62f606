"""The label (data) randomization test's models, trained by saliencycheck itself and cached.

Adebayo et al. 2018 (section 4) compare the maps of the model under test with those of the
same architecture trained on permuted labels until it memorises them. From a recipe
(``tests.label_randomization.train``) this module builds that model and, optionally, a
true-label *control* trained with exactly the same recipe, data and initialisation, so only
the labels differ: the control's similarity to the model under test is what honest
retraining alone does to the maps. Both start from the model under test with every parameter
re-drawn by its own initializer (seeded), train on the CPU or GPU with a rich progress line,
stop early once the training accuracy reaches ``min_train_accuracy``, and are cached under the
output folder keyed by a hash of (recipe, data listing, architecture), so a re-run reuses them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from saliencycheck.atomic import atomic_write, atomic_write_text
from saliencycheck.checks.label_randomization import (
    CONTROL,
    RANDOM_LABELS,
    LabelRandomizationConfig,
    TrainRecipe,
)
from saliencycheck.data import ImageRef, load_images
from saliencycheck.errors import ConfigError, DataError, ModelError, first_line
from saliencycheck.models import Preprocessing, load_checkpoint
from saliencycheck.randomization import find_blocks, reinitialize_
from saliencycheck.zoo import DIGITS_TRAIN_COUNT, accuracy, digits_pixels, train_classifier

TrainingProgress = Callable[[str], None]  # a one-line status


@dataclass(frozen=True)
class TrainingData:
    """Normalised training and held-out inputs with their true labels; ``listing`` names the
    data exactly (for the cache key)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    heldout_inputs: torch.Tensor
    heldout_labels: torch.Tensor
    listing: str


@dataclass(frozen=True)
class ModelReport:
    """How one of the test's models was obtained and how well it fits."""

    role: str
    source: str
    cached: bool
    epochs: int | None = None
    train_accuracy: float | None = None  # on the labels it was trained on
    heldout_accuracy: float | None = None  # on true labels


@dataclass(frozen=True)
class LabelModels:
    """The random-label model, the optional control, and whether the test is valid."""

    models: dict[str, nn.Module]  # role -> model in eval mode
    reports: list[ModelReport]
    valid: bool
    reason: str
    chance: float | None = None
    recipe: dict | None = None  # its seed drew the label permutation and the initialisation

    def as_json(self) -> dict:
        return {"valid": self.valid, "reason": self.reason, "chance_accuracy": self.chance,
                "recipe": self.recipe, "models": [asdict(r) for r in self.reports]}


def obtain_label_models(model: nn.Module, example: torch.Tensor, section: LabelRandomizationConfig,
                        *, pre: Preprocessing, resolve: Callable[[str], Path], cache: Path,
                        retrain: bool = False,
                        progress: TrainingProgress = lambda _: None) -> LabelModels:
    """Load the checkpoints, or train (or reuse from ``cache``) the models of the recipe."""
    if section.checkpoint is not None:
        return _from_checkpoints(model, section, resolve)
    recipe = section.train
    data = training_data(recipe, pre, resolve, num_classes=_num_classes(model, example))
    key = cache_key(recipe, data, model)
    models, reports = {}, []
    roles = [RANDOM_LABELS, CONTROL] if recipe.control else [RANDOM_LABELS]
    for role in roles:
        labels = permuted(data.labels, recipe.seed) if role == RANDOM_LABELS else data.labels
        path = cache / f"{role}-{key}.pt"
        trained, report = _cached_or_trained(model, example, data, labels, recipe, role, path,
                                             retrain=retrain, progress=progress)
        models[role] = trained
        reports.append(report)
    random_report = reports[0]
    chance = 1.0 / int(data.labels.max() + 1)
    if random_report.train_accuracy < recipe.min_train_accuracy:
        valid = False
        reason = (f"the random-label model reached {random_report.train_accuracy:.1%} training "
                  f"accuracy, below min_train_accuracy {recipe.min_train_accuracy:.0%}: it did "
                  "not memorise its labels; train longer (epochs, lr) or on fewer examples "
                  "(limit)")
    else:
        valid = True
        reason = (f"the random-label model memorised {random_report.train_accuracy:.1%} of its "
                  f"training labels; held-out accuracy {random_report.heldout_accuracy:.1%} "
                  f"(chance {chance:.1%})")
    return LabelModels(models=models, reports=reports, valid=valid, reason=reason, chance=chance,
                       recipe=recipe.model_dump() | {"data_listing": data.listing})


def from_modules(model: nn.Module, example: torch.Tensor,
                 given: dict[str, nn.Module]) -> LabelModels:
    """The test's models handed over in memory (``check(tests={"label_randomization":
    {"model": ..., "control": ...}})``): copies in eval mode, checked to give the trained
    model's logits shape on ``example``."""
    with torch.inference_mode():
        expected = tuple(model(example).shape)
    models, reports = {}, []
    for role, key in ((RANDOM_LABELS, "model"), (CONTROL, "control")):
        if given.get(key) is None:
            continue
        module = given[key]
        field = f"tests.label_randomization.{key}"
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{field}: got {type(module).__name__}, not a torch.nn.Module")
        copied = copy.deepcopy(module).to(example.device).eval().requires_grad_(False)
        with torch.inference_mode():
            got = tuple(copied(example).shape)
        if got != expected:
            raise ConfigError(f"{field}: its logits have shape {got} where the model's have "
                              f"{expected}; hand over a model of the same architecture")
        models[role] = copied
        reports.append(ModelReport(role=role, source=f"in memory ({type(module).__name__})",
                                   cached=False))
    return LabelModels(models=models, reports=reports, valid=True,
                       reason="models handed over in memory: their memorisation of permuted "
                              "labels was not checked by saliencycheck")


def _from_checkpoints(model: nn.Module, section: LabelRandomizationConfig,
                      resolve: Callable[[str], Path]) -> LabelModels:
    models, reports = {}, []
    for role, raw, field in ((RANDOM_LABELS, section.checkpoint, "checkpoint"),
                             (CONTROL, section.control_checkpoint, "control_checkpoint")):
        if raw is None:
            continue
        path = resolve(raw)
        if not path.is_file():
            raise ConfigError(f"tests.label_randomization.{field}: checkpoint file not found: "
                              f"{path}")
        loaded = copy.deepcopy(model)
        load_checkpoint(loaded, path, field=f"tests.label_randomization.{field}")
        models[role] = loaded.eval().requires_grad_(False)
        reports.append(ModelReport(role=role, source=str(path), cached=False))
    return LabelModels(models=models, reports=reports, valid=True,
                       reason="ready checkpoint: its memorisation of permuted labels was not "
                              "checked by saliencycheck")


def training_data(recipe: TrainRecipe, pre: Preprocessing, resolve: Callable[[str], Path], *,
                  num_classes: int) -> TrainingData:
    """The recipe's data, preprocessed as the run's images are (size, mean, std)."""
    if recipe.data == "digits":
        pixels, labels = digits_pixels(pre.size)
        x = torch.from_numpy(pixels).float().div(255.0)[:, None]
        x = x.repeat(1, len(pre.mean), 1, 1) if len(pre.mean) > 1 else x
        mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
        std = torch.tensor(pre.std).view(1, -1, 1, 1)
        x, y = (x - mean) / std, torch.from_numpy(labels)
        count = min(recipe.limit or DIGITS_TRAIN_COUNT, DIGITS_TRAIN_COUNT)
        data = TrainingData(x[:count], y[:count], x[DIGITS_TRAIN_COUNT:], y[DIGITS_TRAIN_COUNT:],
                            listing=f"digits[0:{count}]@{pre.size}")
    else:
        data = _image_folder(resolve(recipe.data), recipe, pre)
    if int(data.labels.max()) >= num_classes:
        raise DataError(f"tests.label_randomization.train.data: {int(data.labels.max()) + 1} "
                        f"classes, but the model has {num_classes} outputs")
    return data


def _image_folder(root: Path, recipe: TrainRecipe, pre: Preprocessing) -> TrainingData:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise ConfigError(f"tests.label_randomization.train.data: {root} is not a folder; give "
                          "'digits' or a folder with one sub-folder of images per class")
    try:
        samples = ImageFolder(str(root)).samples
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"tests.label_randomization.train.data: {root}: {exc}") from None
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(recipe.seed))
    heldout_count = max(1, len(samples) // 10)
    heldout, train = order[:heldout_count].tolist(), order[heldout_count:].tolist()
    train = train[: recipe.limit] if recipe.limit else train

    def load(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        refs = [ImageRef(id=str(i), path=Path(samples[i][0])) for i in indices]
        records, skipped = load_images(refs, pre)
        if skipped:
            raise DataError(f"tests.label_randomization.train.data: cannot read "
                            f"{skipped[0].path} ({skipped[0].reason})")
        return (torch.stack([r.tensor for r in records]),
                torch.tensor([samples[int(r.id)][1] for r in records]))

    x, y = load(train)
    hx, hy = load(heldout)
    listing = hashlib.sha256(json.dumps(
        [(str(Path(p).relative_to(root)), c, Path(p).stat().st_size) for p, c in samples]
    ).encode()).hexdigest()
    return TrainingData(x, y, hx, hy, listing=f"{root}:{listing}:{pre.size}")


def permuted(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The labels shuffled once by a permutation drawn from ``seed`` (recorded in run.json)."""
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def cache_key(recipe: TrainRecipe, data: TrainingData, model: nn.Module) -> str:
    """A hash of everything that changes the trained weights."""
    architecture = [type(model).__name__] + [(name, tuple(t.shape))
                                             for name, t in model.state_dict().items()]
    recipe_fields = recipe.model_dump(exclude={"control"})
    text = json.dumps({"recipe": recipe_fields, "data": data.listing,
                       "architecture": architecture}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fresh_model(model: nn.Module, example: torch.Tensor, seed: int) -> nn.Module:
    """The model under test's architecture with every parameter re-drawn by its own
    initializer (seeded per layer) and running statistics reset: the same for both models."""
    fresh = copy.deepcopy(model).eval()
    for block in find_blocks(fresh, example, granularity="layer"):
        reinitialize_(fresh, block, init="reset", reset_running_stats=True, seed=seed)
    return fresh.requires_grad_(True)


def _cached_or_trained(model: nn.Module, example: torch.Tensor, data: TrainingData,
                       labels: torch.Tensor, recipe: TrainRecipe, role: str, path: Path, *,
                       retrain: bool, progress: TrainingProgress) -> tuple[nn.Module, ModelReport]:
    meta = path.with_suffix(".json")
    trained = fresh_model(model, example, recipe.seed)
    if path.is_file() and meta.is_file() and not retrain:
        try:
            load_checkpoint(trained, path, field="label randomization cache")
            report = ModelReport(**{**json.loads(meta.read_text(encoding="utf-8")),
                                    "cached": True})
            return trained.eval().requires_grad_(False), report
        except (ModelError, ValueError, TypeError) as exc:  # our own cache: train it again
            warnings.warn(f"{first_line(exc)}; training the {role} model again", stacklevel=2)
            trained = fresh_model(model, example, recipe.seed)
    epochs = train(trained, data.inputs, labels, recipe, role=role, progress=progress)
    trained.eval().requires_grad_(False)
    report = ModelReport(role=role, source=str(path), cached=False, epochs=epochs,
                         train_accuracy=accuracy(trained, data.inputs, labels),
                         heldout_accuracy=accuracy(trained, data.heldout_inputs,
                                                   data.heldout_labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic, checkpoint before its report: an interrupted run never leaves a half-written
    # model, and Slurm array tasks training the same model at once never corrupt the cache.
    atomic_write(path, lambda tmp: torch.save(trained.state_dict(), tmp))
    atomic_write_text(meta, json.dumps(asdict(report) | {"cached": False}, indent=2))
    return trained, report


def train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, recipe: TrainRecipe, *,
          role: str, progress: TrainingProgress) -> int:
    """Train in place with the recipe on the model's device; stop once the eval-mode training
    accuracy reaches ``min_train_accuracy``. Returns the epochs run."""
    name = "random-label model" if role == RANDOM_LABELS else "true-label control"

    def report(epoch: int, loss: float, fit: float) -> None:
        progress(f"training {name}: epoch {epoch}/{recipe.epochs}, loss {loss:.3f}, "
                 f"training accuracy {fit:.1%}")

    return train_classifier(model, inputs, labels, epochs=recipe.epochs, lr=recipe.lr,
                            batch_size=recipe.batch_size, seed=recipe.seed,
                            optimizer=recipe.optimizer, stop_at=recipe.min_train_accuracy,
                            on_epoch=report)


def _num_classes(model: nn.Module, example: torch.Tensor) -> int:
    with torch.inference_mode():
        return int(model(example).shape[-1])
