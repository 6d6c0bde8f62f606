"""Turn a validated config into everything a run needs: model, device, images, methods, stages.

`prepare` is shared by `saliencycheck run` and `saliencycheck validate`, so validating a config
checks exactly what a run would: the model builds, its weights load, the named layers exist,
the images load and every method's parameters are valid.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliencycheck.checks import CHECKS, Check
from saliencycheck.config import Config, LoadedConfig, MethodEntry
from saliencycheck.data import (
    ImageRecord,
    ImageRef,
    SkippedImage,
    discover_images,
    image_ids,
    load_images,
    printable,
    read_labels,
)
from saliencycheck.engine.device_memory import auto_chunk_size, cap_device_memory
from saliencycheck.errors import (
    ConfigError,
    DataError,
    InputIgnoredWarning,
    ModelError,
    SaliencyCheckError,
    first_line,
)
from saliencycheck.methods import (
    AttributionContext,
    ReluRuleWarning,
    ResolvedMethod,
    resolve_method,
)
from saliencycheck.methods.layers import default_layer, layer_layout
from saliencycheck.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    Preprocessing,
    build_model,
    get_submodule,
    load_checkpoint,
    resolve_device,
)
from saliencycheck.postprocess import PostprocessOptions
from saliencycheck.randomization import Stage
from saliencycheck.relu_rules import ReluRuleMode, ReluRuleReport
from saliencycheck.runner.ownership import check_apart
from saliencycheck.verdicts import check_fail_on, resolve_stage

LABEL_CHECKPOINTS = ("checkpoint", "control_checkpoint")  # label randomization's fields
# naming ready models


@dataclass(frozen=True)
class RunSetup:
    """Everything resolved from the config; the executor reads, never changes, it."""

    config: Config
    source: Path
    output_dir: Path
    model: nn.Module
    weights_source: str
    device: torch.device
    preprocessing: Preprocessing
    images: list[ImageRef]  # read per work unit, so memory does not grow with their number
    figure_ids: frozenset[str]  # the first output.figure_images readable images
    labels: dict[str, int] | None
    methods: list[ResolvedMethod]
    plans: dict[str, Any]  # per enabled check: what its plan() fixed (stages, a layer)
    context: AttributionContext
    post: PostprocessOptions
    model_in_memory: bool = False  # handed to prepare(): no worker can rebuild it from config
    label_models: dict[str, nn.Module] | None = dataclass_field(default=None, repr=False)

    @cached_property
    def model_sha256(self) -> str:
        """SHA-256 of the model's weights, hashed once (the manifest and run.json both record
        it; the run never changes ``model``: stages randomize a working copy)."""
        from saliencycheck.runner.provenance import model_sha256  # provenance imports setup

        return model_sha256(self.model)

    def resolve(self, path: str | Path) -> Path:
        """A path from the config, relative to the config file's folder."""
        return LoadedConfig(config=self.config, source=self.source).resolve(path)

    @property
    def checks(self) -> list[Check]:
        """The enabled checks, in registry order."""
        return [check for check in CHECKS if check.enabled(self.config)]

    @property
    def stages(self) -> dict[str, list[Stage]]:
        """Per randomization test, its randomized model states (stages.csv's)."""
        return {check.name: check.stages(self.plans[check.name]) for check in self.checks
                if check.randomizes}

    @property
    def stage_names(self) -> dict[str, list[str]]:
        """Per test with stages, its stage names in order, the trained model first."""
        names = {check.name: check.stage_names(self) for check in self.checks}
        return {test: stages for test, stages in names.items() if stages is not None}

    @property
    def final_stage(self) -> dict[str, int]:
        """Per test, the stage judged as 'final' (label randomization: the random-label
        model; the control is its reference, not a later stage)."""
        return {check.name: check.final_stage(names)
                for check in self.checks if (names := check.stage_names(self)) is not None}

    @property
    def pass_steps(self) -> int:
        """Progress steps of one unit's shared passes: the trained model and every stage of
        every randomization test sharing them, each repeat."""
        stages = sum(len(self.plans[check.name]) for check in self.checks
                     if check.shares_passes and check.randomizes)
        return 1 + stages * self.config.runtime.repeats

    @property
    def steps_per_unit(self) -> float:
        """Progress steps of one work unit: the shared passes, then the checks' own passes
        (sMPRT's noisy copies; the label models, the random class, the shifted input)."""
        return self.pass_steps + sum(check.steps(self) for check in self.checks)


def resolve_preprocessing(config: Config, weights_pre: Preprocessing | None) -> Preprocessing:
    """Explicit images.size/mean/std win; else the weights' own; else 224 and ImageNet stats."""
    images = config.images
    base = weights_pre or Preprocessing(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    size = images.size or base.size
    resize = base.resize if images.size is None else None
    return Preprocessing(size=size, mean=images.mean or base.mean, std=images.std or base.std,
                         resize=resize)


def resolve_methods(config: Config) -> list[ResolvedMethod]:
    """Validate each method entry against its registered parameter schema."""
    resolved, labels = [], set()
    for index, entry in enumerate(config.methods):
        raw = entry.model_dump(exclude_none=True) if isinstance(entry, MethodEntry) else entry
        try:
            method = resolve_method(raw)
        except ConfigError as exc:
            raise ConfigError(f"methods[{index}].{exc}") from None
        if method.label in labels:
            raise ConfigError(f"methods[{index}]: {method.label!r} is listed twice; give one a "
                              "distinct label:")
        labels.add(method.label)
        resolved.append(method)
    return resolved


def check_layers(model: nn.Module, methods: list[ResolvedMethod]) -> None:
    """Every layer a method names must exist in the model."""
    for index, method in enumerate(methods):
        layer = getattr(method.params, "layer", None)
        if layer:
            get_submodule(model, layer, field=f"methods[{index}].layer")


def with_default_layers(methods: list[ResolvedMethod], model: nn.Module,
                        example: torch.Tensor) -> list[ResolvedMethod]:
    """Fix Grad-CAM's layer and its layout once per run (recorded in run.json), not once per
    call: the default layer where none is named, the layout read from the layer's output
    where it is 'auto' (a layer whose output is no spatial map is refused here)."""
    resolved = []
    for index, method in enumerate(methods):
        fields = type(method.params).model_fields
        if "layer" in fields:
            layer = method.params.layer or default_layer(model, example)
            update = {"layer": layer}
            if "layout" in fields and method.params.layout == "auto":
                try:
                    update["layout"] = layer_layout(model, example, layer)
                except ModelError as exc:
                    raise ModelError(f"methods[{index}].layer: {exc}") from None
            method = replace(method, params=method.params.model_copy(update=update))
        resolved.append(method)
    return resolved


def prepare(loaded: LoadedConfig, *, probe_methods: bool = False,
            model: nn.Module | None = None, images: list[ImageRef] | None = None,
            labels: dict[str, int] | None = None,
            label_models: dict[str, nn.Module] | None = None) -> RunSetup:
    """Resolve the config into a `RunSetup` (builds the model, loads images, plans stages).

    Errors name the config file first, then the field. `probe_methods` runs every method once
    on one image, so `validate` also catches methods this model cannot support (e.g. guided
    backprop on a network without ReLU, or a custom callable returning the wrong shape).
    A ``model`` given here is used instead of the config's ``model:`` section: a copy of it,
    so the caller's module is never moved, randomized or otherwise changed. ``images`` (refs
    holding preprocessed tensors) and their ``labels`` replace ``images.path`` and
    ``images.labels`` likewise, and ``label_models`` ({'model': ..., 'control': ...}) the
    label randomization test's checkpoints.
    """
    try:
        setup = _prepare(loaded, model, images, labels, label_models)
        if images is None:
            check_apart(setup.output_dir, loaded.resolve(setup.config.images.path),
                        [ref.path for ref in setup.images], field="output.dir")
        check_verdict_rules(setup)
        if probe_methods:
            probe(setup)
            check_label_checkpoints(setup)
    except SaliencyCheckError as exc:  # the cause (user code's traceback) stays for error.log
        raise type(exc)(f"{loaded.source.name}: {exc}") from exc.__cause__
    return setup


def check_verdict_rules(setup: RunSetup) -> None:
    """Thresholds name existing stages; fail_on names computed methods."""
    check_fail_on(setup.config.fail_on, [m.label for m in setup.methods])
    for test, threshold in setup.config.thresholds.items():
        resolve_stage(test, threshold.stage, setup.stage_names[test], setup.final_stage[test])


@dataclass(frozen=True)
class MethodStatus:
    """What probing a method on the run's first image found: ``ok``, ``warning`` (it runs,
    with a caveat: the guided rule applied to the ReLUs only) or ``refused`` (the error)."""

    label: str
    status: str
    detail: str = ""
    error: SaliencyCheckError | None = dataclass_field(default=None, repr=False)


def method_statuses(setup: RunSetup) -> list[MethodStatus]:
    """Run each method once on the first image: its status, refusals named by YAML path."""
    inputs = first_readable(setup.images, setup.preprocessing)[0].tensor[None].to(setup.device)
    with torch.inference_mode():
        target = setup.model(inputs).argmax(dim=1)
    statuses = []
    for index, method in enumerate(setup.methods):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReluRuleWarning)
            try:
                method(setup.model, inputs, target, setup.context)
            except SaliencyCheckError as exc:
                error = type(exc)(f"methods[{index}] ({method.label}): {exc}")
                statuses.append(MethodStatus(method.label, "refused", str(exc), error))
                continue
        notes = [str(w.message) for w in caught if issubclass(w.category, ReluRuleWarning)]
        statuses.append(MethodStatus(method.label, "warning" if notes else "ok",
                                     "; ".join(notes)))
    return statuses


def probe(setup: RunSetup) -> None:
    """Raise the first method's refusal (see :func:`method_statuses`), if any."""
    for status in method_statuses(setup):
        if status.error is not None:
            raise status.error from None


def input_path_activations(setup: RunSetup) -> ReluRuleReport:
    """The activations one forward of the first image calls: ReLUs on the input's path (the
    guided methods' rule applies there), ReLUs that never see it, other activations."""
    inputs = first_readable(setup.images, setup.preprocessing)[0].tensor[None].to(setup.device)
    mode = ReluRuleMode("guided")
    with torch.enable_grad(), mode:
        setup.model(inputs.clone().requires_grad_(True))
    return mode.report()


def first_readable(images: list[ImageRef], pre: Preprocessing, count: int = 1
                   ) -> list[ImageRecord]:
    """The first `count` images that load (at least one: the run's example input)."""
    found: list[ImageRecord] = []
    first_skipped: list[SkippedImage] = []
    for ref in images:
        if len(found) >= max(count, 1):
            break
        loaded, skipped = load_images([ref], pre)
        found += loaded
        first_skipped = first_skipped or skipped
    if not found:
        why = f": {first_skipped[0].reason}" if first_skipped else ""
        raise DataError(f"images.path: none of the {len(images)} images could be read "
                        f"(first: {printable(images[0].path)}{why}); check the files and "
                        "images.path")
    return found


def unreadable_images(setup: RunSetup) -> list[SkippedImage]:
    """Read every image once (for `validate`): those that cannot be read, with the reason."""
    skipped = []
    for start in range(0, len(setup.images), 64):
        skipped += load_images(setup.images[start:start + 64], setup.preprocessing)[1]
    return skipped


def check_label_sources(loaded: LoadedConfig) -> None:
    """The label randomization test's checkpoints or data folder exist (read at run time)."""
    section = loaded.config.tests.label_randomization
    if section is None:
        return
    where = "tests.label_randomization"
    for field in LABEL_CHECKPOINTS:
        raw = getattr(section, field)
        if raw is not None and not loaded.resolve(raw).is_file():
            raise ConfigError(f"{where}.{field}: checkpoint file not found: "
                              f"{loaded.resolve(raw)}")
    if section.train is not None and section.train.data != "digits" \
            and not loaded.resolve(section.train.data).is_dir():
        raise ConfigError(f"{where}.train.data: {loaded.resolve(section.train.data)} is not a "
                          "folder; give 'digits' or a folder with one sub-folder per class")


def check_label_checkpoints(setup: RunSetup) -> None:
    """For `validate`: the label randomization checkpoints load into a copy of the model as a
    run will load them (a run loads them once, when it obtains the test's models)."""
    section = setup.config.tests.label_randomization
    for field in LABEL_CHECKPOINTS if section is not None else ():
        raw = getattr(section, field)
        if raw is not None:
            load_checkpoint(copy.deepcopy(setup.model), setup.resolve(raw),
                            field=f"tests.label_randomization.{field}")


def check_logits(output: object) -> None:
    """The model's forward must return the ``(N, classes)`` logits tensor that every method
    differentiates; a tuple, dict or model-output object is refused with the fix."""
    if isinstance(output, torch.Tensor):
        if output.ndim != 2:
            raise ModelError(f"model: its forward returned a tensor of shape "
                             f"{tuple(output.shape)}, not (N, classes) logits; wrap the model "
                             "so forward returns the (N, classes) logits tensor")
        return
    what = type(output).__name__
    if isinstance(output, dict):
        what += f" (keys {', '.join(map(repr, list(output)[:6]))})"
    elif isinstance(output, (tuple, list)):
        what += f" ({len(output)} values)"
    hint = "; e.g. return model(x).logits" if hasattr(output, "logits") else ""
    raise ModelError(f"model: its forward returned {what}, not a logits tensor; wrap the model "
                     f"so forward returns the (N, classes) logits tensor{hint}")


def warn_if_input_ignored(x: torch.Tensor, logits: torch.Tensor, image: str) -> None:
    """Warn when the top logit's gradient with respect to ``x`` (a batch of one, requiring
    grad) is zero everywhere: every gradient map would be all zero and every score
    meaningless (a zero head: torchvision's ViT at initialisation)."""
    (grad,) = torch.autograd.grad(logits[0].max(), x, allow_unused=True)
    if grad is None or not grad.any():
        warnings.warn(f"model: its logits do not depend on the input ({image}: the top logit's "
                      "gradient is zero everywhere, e.g. a zero-initialised head such as "
                      "torchvision's ViT before training); every gradient-based map is zero "
                      "and its scores say nothing; load trained weights", InputIgnoredWarning,
                      stacklevel=2)


def in_memory(module: nn.Module) -> LoadedModel:
    """A caller's model as the run's: a deep copy in eval mode (the caller's stays as it is)."""
    if not isinstance(module, nn.Module):
        raise ModelError(f"model: got {type(module).__name__}, not a torch.nn.Module")
    return LoadedModel(module=copy.deepcopy(module).eval(),
                       weights_source=f"in memory ({type(module).__name__})", preprocessing=None)


def _prepare(loaded: LoadedConfig, given: nn.Module | None = None,
             given_images: list[ImageRef] | None = None,
             given_labels: dict[str, int] | None = None,
             label_models: dict[str, nn.Module] | None = None) -> RunSetup:
    config = loaded.config
    methods = resolve_methods(config)
    device = resolve_device(config.runtime.device)
    memory_budget = cap_device_memory(device, config.runtime.device_memory_gib)
    built = in_memory(given) if given is not None else \
        build_model(config.model, resolve=loaded.resolve)
    model = built.module
    check_layers(model, methods)
    if label_models is None:
        check_label_sources(loaded)
    pre = resolve_preprocessing(config, built.preprocessing)

    labels = None
    if given_images is not None:
        images = given_images[: config.images.limit or None]
        labels = given_labels
        if config.images.target == "label" and not labels:
            raise ConfigError("targets: 'label' needs labels: (image, label) pairs from the "
                              "Dataset or DataLoader, or targets as a tensor")
    else:
        root = loaded.resolve(config.images.path)
        paths = discover_images(root, raw=config.images.path)
        if config.images.limit:
            paths = paths[: config.images.limit]
        ids = image_ids(paths, root if root.is_dir() else root.parent)
        images = [ImageRef(id=i, path=p) for i, p in zip(ids, paths)]
        if config.images.target == "label" and not config.images.labels:
            raise ConfigError("images.target: 'label' needs images.labels, a CSV with image,label")
        if config.images.labels:
            labels = read_labels(loaded.resolve(config.images.labels), ids, paths)

    # saliencycheck's own copy (built, or the caller's deep-copied): attribution needs input
    # gradients only, and with frozen parameters "requires grad" means "depends on the image"
    # (the guided methods count only the ReLUs on the input's path)
    model = model.to(device).requires_grad_(False)
    output = config.output
    readable = first_readable(images, pre, output.figure_images if output.figures else 1)
    figure_ids = frozenset(r.id for r in readable[: output.figure_images if output.figures else 0])
    example = readable[0].tensor[None].to(device)
    x = example.clone().requires_grad_(True)  # one forward: the logits, and whether they
    try:  # depend on the input at all (warn_if_input_ignored)
        with torch.enable_grad():
            logits = model(x)
    except RuntimeError as exc:
        raise SaliencyCheckError(
            f"model: forward pass failed on a {pre.size}x{pre.size} image "
            f"({first_line(exc)[:160]}); check images.size and the model"
        ) from None
    check_logits(logits)
    if not logits.isfinite().all():
        raise ModelError(f"model: its outputs on {readable[0].id} are not finite (NaN or inf), "
                         "so every map and score would be undefined; check model.weights and "
                         "the model's forward")
    warn_if_input_ignored(x, logits, readable[0].id)
    logits = logits.detach()
    num_classes = logits.shape[-1]
    target = config.images.target
    if isinstance(target, int) and target >= num_classes:
        raise ConfigError(f"images.target: class {target} out of range for {num_classes} classes")
    wrong = next(((i, label) for i, label in (labels or {}).items()
                  if not 0 <= label < num_classes), None)
    if wrong is not None:
        raise DataError(f"images.labels: image {wrong[0]!r} has label {wrong[1]}, out of range "
                        f"for the model's {num_classes} classes (0 to {num_classes - 1}); fix "
                        "the label or model.num_classes")

    methods = with_default_layers(methods, model, example)
    plans = {check.name: check.plan(model, example, config)
             for check in CHECKS if check.enabled(config)}

    chunk_size = config.runtime.chunk_size
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(model, example, memory_budget)
    context = AttributionContext(mean=pre.mean, std=pre.std, seed=config.runtime.seed,
                                 chunk_size=chunk_size,
                                 precision=config.runtime.precision,
                                 affine_stem=config.runtime.affine_stem)
    return RunSetup(
        config=config, source=loaded.source, output_dir=loaded.resolve(config.output.dir),
        model=model, weights_source=built.weights_source, device=device, preprocessing=pre,
        images=images, figure_ids=figure_ids, labels=labels, methods=methods, plans=plans,
        context=context,
        model_in_memory=given is not None, label_models=label_models,
        post=PostprocessOptions(abs_reduction=config.postprocess.abs_reduction,
                                signed_reduction=config.postprocess.signed_reduction,
                                percentile=config.postprocess.percentile,
                                ssim_data_range=config.postprocess.ssim_data_range),
    )
