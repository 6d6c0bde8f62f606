"""The Python API: the sanity checks on a model already in memory, from a notebook or a script.

``check`` builds the same validated config the CLI reads from YAML (keyword arguments are its
sections) and runs the same engine (``prepare`` + ``run_check``) on a copy of the model, so a
call and ``saliencycheck run`` on the same model and images write the same reports. It never
prints (unless ``progress=True``) and never exits: bad input raises the CLI's one-line message
as a :class:`~saliencycheck.errors.SaliencyCheckError` (``ConfigError`` for the config).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from html import escape
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from saliencycheck.config import LoadedConfig, parse_config
from saliencycheck.data import ImageRef, load_images
from saliencycheck.engine.device_memory import memory_fraction_restored
from saliencycheck.errors import ConfigError, UsageError
from saliencycheck.methods import resolve_method
from saliencycheck.methods.custom import IN_MEMORY, forget, remember
from saliencycheck.runner import RunResult, RunSetup, prepare, run_check
from saliencycheck.runner.ownership import OutputFolder
from saliencycheck.runner.run import grid_figure, test_curves
from saliencycheck.runner.store import ResultStore
from saliencycheck.verdicts import Verdict, interval_text

SOURCE = "check()"  # how errors name the config of an API call (the CLI names the YAML file)


def method(name: str, *, label: str | None = None, **params: Any) -> dict[str, Any]:
    """A configured method for ``check(methods=[...])``, validated now: e.g.
    ``method("integrated_gradients", steps=32)`` (the YAML entry ``{name: ..., steps: 32}``)."""
    entry = {"name": name, **({"label": label} if label is not None else {}), **params}
    try:
        resolve_method(entry)
    except ConfigError as exc:
        raise ConfigError(f"method({name!r}): {exc}") from None
    return entry


@dataclass
class Result:
    """What a check found: the verdicts, and the report files as DataFrames or saved.

    ``folder`` holds every file ``saliencycheck run`` writes; unless ``check(output=...)``
    named one, it is a temporary folder that lives as long as this object (``save`` copies it).
    """

    run: RunResult
    folder: Path
    setup: RunSetup = field(repr=False)
    _temporary: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def verdicts(self) -> list[Verdict]:
        """One verdict per method × test with a threshold (PASS, FAIL or INVALID)."""
        return self.run.verdicts

    @property
    def passed(self) -> bool:
        """False when a FAIL counts for the gate (``fail_on``): what exit code 1 means."""
        return not self.run.failures

    def to_pandas(self):  # noqa: ANN201 - pandas is an optional dependency
        """report.csv as a DataFrame: one row per image × method × test × stage × metric."""
        return _read_csv(self.folder / "report.csv")

    def summary(self):  # noqa: ANN201
        """summary.csv as a DataFrame: means, intervals and the random-network floor."""
        return _read_csv(self.folder / "summary.csv")

    def stages(self):  # noqa: ANN201
        """stages.csv as a DataFrame: what each stage randomized and how far the logits moved."""
        return _read_csv(self.folder / "stages.csv")

    def plot_curves(self, test: str = "cascading") -> Figure:
        """The similarity curves of ``test`` (figures/curves_<test>.png), as a Figure."""
        self._check_test(test)
        return test_curves(self.setup, self.run.summary, test)

    def plot_grid(self, image: int | str = 0, test: str = "cascading") -> Figure:
        """The paper's grid of one image (its index or id) in ``test``: every method's map at
        every stage. Kept for the first ``output_settings={"figure_images": N}`` images."""
        self._check_test(test)
        maps = ResultStore(self.folder).figure_maps()
        shown = sorted({key.split("|")[0] for key in maps})
        ids = [ref.id for ref in self.setup.images]
        name = ids[image] if isinstance(image, int) and 0 <= image < len(ids) else image
        if name not in shown:
            raise UsageError(f"plot_grid(): no maps kept for image {image!r}; kept: "
                             f"{', '.join(shown) or 'none (figures are off)'}; set "
                             "output_settings={'figures': True, 'figure_images': N}")
        ref = next(r for r in self.setup.images if r.id == name)
        display = load_images([ref], self.setup.preprocessing)[0][0].display
        return grid_figure(self.setup, maps, name, test, display)

    def _check_test(self, test: str) -> None:
        if test not in self.setup.stage_names:
            raise UsageError(f"{test!r} did not run; the tests that ran: "
                             f"{', '.join(self.setup.stage_names)}")

    def _repr_html_(self) -> str:
        """Jupyter's view: each verdict, its final-stage score beside the floor and the
        random-map control."""
        head = ("<tr><th>method</th><th>test</th><th>verdict</th><th>metric</th>"
                "<th>stage</th><th>mean [CI]</th><th>limit</th><th>floor</th>"
                "<th>control</th></tr>")
        rows = []
        for v in self.verdicts:
            colour = {"PASS": "#c8e6c9", "FAIL": "#ffcdd2"}.get(v.verdict, "#eeeeee")
            limit = (f"≤ {v.max:.3g}" if math.isfinite(v.max)
                     else f"≥ {v.min:.3g}" if math.isfinite(v.min) else "")
            floor = f"{v.floor:.3f}" if math.isfinite(v.floor) else ""
            control = f"{v.control:.3f}" if math.isfinite(v.control) else ""
            rows.append(
                f'<tr style="background:{colour}"><td>{escape(v.method)}</td>'
                f"<td>{escape(v.test)}</td><td><b>{v.verdict}</b></td><td>{escape(v.metric)}</td>"
                f"<td>{escape(v.stage)}</td><td>{interval_text(v.statistic, v.ci_low, v.ci_high)}"
                f"</td><td>{limit}</td><td>{floor}</td><td>{control}</td></tr>")
        gate = "passed" if self.passed else "FAILED (a gated method failed)"
        body = "".join(rows) or '<tr><td colspan="9">no thresholds: no verdicts</td></tr>'
        return (f"<div><p>saliencycheck: {len(self.setup.images)} images, "
                f"{len(self.run.methods)} methods; gate <b>{gate}</b></p>"
                f"<table>{head}{body}</table></div>")

    def save(self, path: str | PathLike[str], *, force: bool = False) -> Path:
        """Copy every file of the run into ``path`` (a new or empty folder, unless ``force``):
        exactly what ``saliencycheck run`` writes. The copy is saliencycheck's folder (its
        manifest comes along), so a later run there may replace it."""
        target = Path(path)
        if target.resolve() == self.folder.resolve():
            return target
        OutputFolder.claim(target, force=force, field="save()", change="point save()",
                           forcing="pass force=True")
        shutil.copytree(self.folder, target, dirs_exist_ok=True)
        return target


def _read_csv(path: Path):  # noqa: ANN202
    try:
        import pandas
    except ImportError:
        raise UsageError("Result tables need pandas: pip install 'saliencycheck[pandas]'") \
            from None
    return pandas.read_csv(path)


def check(model: nn.Module, images: str | PathLike[str] | Tensor | Iterable, *,
          targets: str | int | Tensor = "predicted",
          methods: Sequence[str | dict[str, Any] | Callable[..., Tensor]] | None = None,
          tests: dict[str, Any] | None = None,
          metrics: Sequence[str] | None = None,
          device: str = "auto", seed: int = 0,
          output: str | PathLike[str] | None = None, force: bool = False,
          progress: bool = False, **config: Any) -> Result:
    """Run the sanity checks on ``model`` (any ``nn.Module``; never modified) and return
    the :class:`Result`.

    ``images`` is what the YAML's ``images.path`` takes (a folder, a glob or a file), read and
    preprocessed as the CLI does (``image_settings={...}``: the YAML's other ``images:`` keys,
    size, mean, std, limit, labels); or images already preprocessed: an (N, C, H, W) tensor,
    a Dataset or DataLoader of such tensors or of (tensor, label) pairs (their ``mean`` and
    ``std`` in ``image_settings`` only shape the figures and the baselines, as in YAML).
    ``targets`` is ``images.target`` ('predicted', a class index, or 'label': the pairs'
    labels), or an (N,) tensor of classes. ``methods``, ``tests`` and ``metrics`` are the YAML
    sections of those names (defaults as in YAML); ``methods`` may also hold functions
    ``fn(model, inputs, targets) -> maps`` (a Captum or zennit call wrapped, or your own). Any
    other section is a keyword argument (``runtime=``, ``thresholds=``, ``postprocess=``,
    ``baselines=``, ``fail_on=``, ``output=`` settings go through ``output_settings=``).
    ``output`` keeps the files in that folder (claimed as the CLI claims ``-o``: a non-empty
    folder saliencycheck did not write needs ``force``); by default they go to a temporary
    folder. Raises the CLI's one-line errors as exceptions.
    """
    with prepared(model, images, targets=targets, methods=methods, tests=tests,
                  metrics=metrics, device=device, seed=seed, output=output, force=force,
                  **config) as (setup, temporary):
        with _progress_bar(progress) as advance:
            run = run_check(setup, progress=advance, force=force)
    return Result(run=run, folder=setup.output_dir, setup=setup, _temporary=temporary)


@contextmanager
def prepared(model: nn.Module, images: str | PathLike[str] | Tensor | Iterable, *,
             targets: str | int | Tensor = "predicted",
             methods: Sequence[str | dict[str, Any] | Callable[..., Tensor]] | None = None,
             tests: dict[str, Any] | None = None, metrics: Sequence[str] | None = None,
             device: str = "auto", seed: int = 0, output: str | PathLike[str] | None = None,
             force: bool = False, **config: Any
             ) -> Iterator[tuple[RunSetup, tempfile.TemporaryDirectory | None]]:
    """The validated plan that :func:`check` runs (same arguments), and the temporary output
    folder when ``output`` is None (the caller keeps it alive). For tools that drive the engine
    themselves, as the benchmark's bare-compute contenders do; in-memory method functions are
    usable until the block ends."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"check(): model must be a torch.nn.Module, not {type(model).__name__}")
    refs, labels = None, None
    if not isinstance(images, (str, PathLike)):
        refs, labels = in_memory_images(images)
        images = MEMORY
    if isinstance(targets, Tensor):
        labels = tensor_targets(targets, refs)
        targets = "label"
    tests, label_models = label_models_of(tests)
    data = _config_dict(model, images, targets=targets, methods=methods, tests=tests,
                        metrics=metrics, device=device, seed=seed, config=config)
    temporary = tempfile.TemporaryDirectory(prefix="saliencycheck-") if output is None else None
    folder = Path(temporary.name if temporary else output)
    data["output"]["dir"] = str(folder.resolve())
    functions = [m["callable"] for m in data.get("methods", [])
                 if isinstance(m, dict) and str(m.get("callable", "")).startswith(IN_MEMORY)]
    try:
        loaded = LoadedConfig(config=parse_config(data, source=SOURCE),
                              source=Path.cwd() / SOURCE)
        if temporary is None:  # claimed before any work, in the API's words (then found ours)
            OutputFolder.claim(folder, force=force, field="check(): output",
                               change="set output=", forcing="pass force=True")
        restore = memory_fraction_restored() if loaded.config.runtime.device_memory_gib \
            else nullcontext()
        with restore:
            yield prepare(loaded, model=model, images=refs, labels=labels,
                          label_models=label_models), temporary
    finally:
        for name in functions:  # the functions were needed for this run only
            forget(name)


MEMORY = "<memory>"  # images.path of images handed over in memory


def in_memory_images(images: Tensor | Iterable) -> tuple[list[ImageRef], dict[str, int] | None]:
    """Refs of preprocessed images given as an (N, C, H, W) tensor, or as a Dataset,
    DataLoader or other iterable of tensors or (tensor, label) pairs (batched or not); and
    their labels, by image id, when pairs carried them."""
    if isinstance(images, Tensor):
        batches: Iterable = [images]
    elif isinstance(images, Iterable) or hasattr(images, "__getitem__"):
        batches = images
    else:
        raise UsageError(f"check(): images must be a path, a tensor, a Dataset or a DataLoader, "
                         f"not {type(images).__name__}")
    tensors, labels = [], []
    for item in batches:
        tensor, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        if not isinstance(tensor, Tensor) or tensor.ndim not in (3, 4):
            raise UsageError("check(): images must hold image tensors, (C, H, W) or "
                             f"(N, C, H, W); got {type(tensor).__name__} "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
        batch = tensor if tensor.ndim == 4 else tensor[None]
        tensors += list(batch)
        if label is not None:
            labels += torch.as_tensor(label).reshape(-1).tolist()
    if not tensors:
        raise UsageError("check(): images is empty")
    if labels and len(labels) != len(tensors):
        raise UsageError(f"check(): {len(labels)} labels for {len(tensors)} images")
    width = len(str(len(tensors) - 1))
    refs = [ImageRef(id=f"image{i:0{width}d}", path=Path(MEMORY) / f"image{i:0{width}d}",
                     tensor=t) for i, t in enumerate(tensors)]
    return refs, ({r.id: int(v) for r, v in zip(refs, labels)} if labels else None)


def tensor_targets(targets: Tensor, refs: list[ImageRef] | None) -> dict[str, int]:
    """Classes given as an (N,) tensor, by image id (images handed over in memory only)."""
    if refs is None:
        raise UsageError("check(): targets as a tensor needs images as tensors (their order); "
                         "for image files use image_settings={'labels': 'labels.csv'} and "
                         "targets='label'")
    if targets.ndim != 1 or len(targets) != len(refs):
        raise UsageError(f"check(): targets must be an ({len(refs)},) tensor of classes, one per "
                         f"image; got shape {tuple(targets.shape)}")
    return {ref.id: int(t) for ref, t in zip(refs, targets.tolist())}


def label_models_of(tests: dict[str, Any] | None
                    ) -> tuple[dict[str, Any] | None, dict[str, nn.Module] | None]:
    """``tests`` with the label randomization models handed over in memory
    (``{"label_randomization": {"model": m, "control": c}}``) taken out, the section then
    naming them as checkpoints ``<memory>``; and those models (None when not given)."""
    section = (tests or {}).get("label_randomization")
    if not isinstance(section, dict) or "model" not in section:
        return tests, None
    section = dict(section)
    given = {"model": section.pop("model"), "control": section.pop("control", None)}
    if "train" in section or "checkpoint" in section:
        raise UsageError("check(): tests.label_randomization: give models (model=, control=) "
                         "or checkpoints or a training recipe, not both")
    section["checkpoint"] = MEMORY
    if given["control"] is not None:
        section["control_checkpoint"] = MEMORY
    return {**tests, "label_randomization": section}, given


def callable_method(fn: Callable[..., Tensor], index: int) -> dict[str, Any]:
    """A method given as a function ``fn(model, inputs, targets) -> maps (N, C or 1, H, W)``
    (a Captum or zennit call wrapped, or your own): the ``custom`` method calling it, labelled
    with its name (``custom<index>`` for a lambda)."""
    name = getattr(fn, "__name__", "")
    label = name if name.isidentifier() else f"custom{index}"
    return {"name": "custom", "callable": remember(fn), "label": label}


def _config_dict(model: nn.Module, images: str | PathLike[str], *, targets: str | int,
                 methods: Sequence | None, tests: dict | None, metrics: Sequence | None,
                 device: str, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """The YAML config, as a dict, that the keyword arguments of :func:`check` describe."""
    if "model" in config:
        raise UsageError("check(): model= is not a keyword: the model is the first argument")
    data: dict[str, Any] = {
        "model": {"name": type(model).__name__},
        "images": {**config.pop("image_settings", {}), "path": str(images),
                   "target": targets},
        "runtime": {"device": device, "seed": seed, **config.pop("runtime", {})},
        "output": dict(config.pop("output_settings", {})),
    }
    if methods is not None:
        data["methods"] = [callable_method(m, i) if callable(m) else m
                           for i, m in enumerate(methods)]
    for name, value in (("tests", tests), ("metrics", metrics)):
        if value is not None:
            data[name] = dict(value) if name == "tests" else list(value)
    return {**data, **config}


@contextmanager
def _progress_bar(shown: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A progress callback for ``run_check``: a rich progress bar when ``shown``, else none."""
    if not shown:
        yield lambda *_: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task("running", total=None)
        yield lambda steps, total, text: bar.update(task, advance=steps, total=total,
                                                    description=text)
