"""Run a sanity check end to end: plan units, execute them, store each, then write every output.

Never prints or exits: progress goes through a callback, problems are raised as the project's
exception types, and the CLI decides what the user sees.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from saliencycheck.atomic import atomic_write_text
from saliencycheck.checks import CHECKS, get_check
from saliencycheck.checks.label_randomization import CACHE_DIR
from saliencycheck.data import load_images
from saliencycheck.errors import RunInterrupted, StoreError, Terminated
from saliencycheck.methods import compute_maps
from saliencycheck.metrics import score_maps
from saliencycheck.report.figures import (
    comparison_bars,
    curves_figure,
    stage_grid_figure,
    verdict_heatmap,
)
from saliencycheck.report.figures import save as save_figure
from saliencycheck.report.html import REPORT_HTML, write_html_report
from saliencycheck.report.tables import (
    summarize,
    write_report,
    write_skipped,
    write_stages,
    write_summary,
)
from saliencycheck.results import FLOOR_TEST, SummaryRow
from saliencycheck.runner.backends import choose_backend
from saliencycheck.runner.executor import UNCHANGED_NOTE, figure_key, safe_name
from saliencycheck.runner.lock import FolderLock
from saliencycheck.runner.manifest import HashCache, check_same_run, manifest
from saliencycheck.runner.ownership import ERROR_LOG, STATE_DIR, OutputFolder
from saliencycheck.runner.plan import WorkUnit, plan_units
from saliencycheck.runner.provenance import (
    checkpoint_hashes,
    config_sha256,
    package_versions,
    seeds,
)
from saliencycheck.runner.setup import RunSetup, first_readable
from saliencycheck.runner.shards import Shard
from saliencycheck.runner.store import CONTEXT, PLAN, ResultStore
from saliencycheck.verdicts import Verdict, gate_failures, write_verdicts

Progress = Callable[[int, int, str], None]  # (steps advanced, total steps, description)
RUN_JSON = "run.json"  # written last: present only beside whole report files (units_done: how
# much of the run they cover)
# The report: rewritten as a set from the stored units. While run.json is absent the folder
# holds no report (the files of an earlier one are removed first, so none passes for this one).
REPORT_FILES = ("report.csv", "summary.csv", "stages.csv", "skipped.csv", "verdicts.csv")
REPORT_DIRS = ("figures",)
VERDICT_FIGURE = "figures/verdicts.png"


@dataclass(frozen=True)
class RunResult:
    """What the CLI shows at the end of a run; every file is already written."""

    output_dir: Path
    summary: list[SummaryRow]
    skipped: list[tuple[str, str]]  # (path, reason) of the images that could not be read
    precision: str
    fidelity: dict[str, float]  # method -> abs-Spearman of reduced-precision vs fp32 maps
    methods: list[str]  # labels, in config order
    metrics: list[str]  # in config order
    final_stage: dict[str, int]
    units_done: int
    units_total: int
    timings: dict[str, float] = field(default_factory=dict)
    validity: dict[str, dict] = field(default_factory=dict)  # per check that reports one:
    # whether it could judge (label randomization's models, input invariance's compensation)
    verdicts: list[Verdict] = field(default_factory=list)
    failures: list[Verdict] = field(default_factory=list)  # FAIL verdicts fail_on counts
    units_resumed: int = 0  # already stored when the run started (--resume)
    unchanged_stages: list[tuple[str, str]] = field(default_factory=list)  # (test, stage)
    # whose randomization moved no logit: their scores say nothing

    @property
    def interrupted(self) -> bool:
        return self.units_done < self.units_total


def run_check(setup: RunSetup, *, progress: Progress = lambda *_: None,
              retrain: bool = False, resume: bool = False, force: bool = False) -> RunResult:
    """Execute every work unit, storing each at once, then write reports and figures.

    The output folder is claimed (a non-empty folder saliencycheck did not create is refused
    unless ``force``) and locked for the run (see ``ownership`` and ``lock``). With
    ``resume``, the units already stored for the same plan are kept and skipped (a stored
    plan of another config or other input files raises StoreError); without it the store
    starts empty. With the label randomization test, its models are trained first (or
    loaded: from the checkpoints, or from the cache in the output folder unless ``retrain``).
    Interrupted (KeyboardInterrupt, or :class:`~saliencycheck.errors.Terminated` for SIGTERM)
    while units run, the report is written from the units already stored, marked partial,
    and :class:`~saliencycheck.errors.RunInterrupted` is raised: nothing computed is lost. An
    interrupt while the report itself is written propagates as it is: no run.json, so the
    folder holds no report.
    """
    started = time.perf_counter()
    units = plan_units(len(setup.images), batch_size=setup.config.runtime.batch_size)
    with owned_output(setup, force=force):
        store = open_store(setup, units, keep=resume, fix="run without --resume to start "
                           "afresh, or set output.dir to another folder")
        try:
            ran = execute(setup, store, units, progress=progress, retrain=retrain)
        except KeyboardInterrupt as interrupt:
            result = write_outputs(setup, store, units_total=len(units),
                                   timings={"compute_s": time.perf_counter() - started},
                                   interrupted=interrupt)
            raise RunInterrupted(interrupt, units_done=result.units_done,
                                 units_total=result.units_total) from interrupt
        result = write_outputs(setup, store, units_total=len(units),
                               timings={"compute_s": time.perf_counter() - started})
    return replace(result, units_resumed=len(units) - ran)


@contextmanager
def owned_output(setup: RunSetup, *, force: bool, shared: bool = False) -> Iterator[None]:
    """The run's output folder, claimed and locked (``shared`` for shards) while inside."""
    OutputFolder.claim(setup.output_dir, force=force)
    with FolderLock(setup.output_dir, shared=shared):
        yield


@dataclass(frozen=True)
class ShardResult:
    """What one shard did; the report is written by `merge` once every shard is done."""

    output_dir: Path
    shard: Shard
    units_run: int
    units_stored: int  # of this shard, including those of earlier attempts
    units_shard: int
    units_missing: int  # of the whole plan, every shard


def run_shard(setup: RunSetup, shard: Shard, *, progress: Progress = lambda *_: None,
              retrain: bool = False, force: bool = False) -> ShardResult:
    """Run this shard's units that are not stored yet, into the shared output folder.

    Shards always keep what is stored (a resubmitted array task picks up where it stopped)
    and never write the report: `merge` does, from every shard's units.
    """
    units = plan_units(len(setup.images), batch_size=setup.config.runtime.batch_size)
    with owned_output(setup, force=force, shared=True):
        store = open_store(setup, units, keep=True, fix="delete its units/ folder (or set "
                           "output.dir to another folder) before the array job starts")
        shard.check_against(store.shard_counts(), where=setup.output_dir)
        store.mark_shards(shard.count)
        mine = shard.units(units)
        ran = execute(setup, store, mine, progress=progress, retrain=retrain)
        stored = store.unit_ids()
    return ShardResult(output_dir=setup.output_dir, shard=shard, units_run=ran,
                       units_stored=sum(u.id in stored for u in mine), units_shard=len(mine),
                       units_missing=sum(u.id not in stored for u in units))


def open_store(setup: RunSetup, units: list[WorkUnit], *, keep: bool, fix: str) -> ResultStore:
    """The output folder's store, holding this run's plan: emptied, or (``keep``) checked to
    hold units of the same plan; ``fix`` tells the user what to do when it does not. Only
    files saliencycheck recorded as its own are ever removed, and every file the run may
    write is reserved as its own before any is written (see ``ownership``)."""
    store = ResultStore(setup.output_dir)
    names = planned_outputs(setup, units)
    store.folder.check_free(names)  # before any work
    plan = manifest(setup, units, HashCache(setup.output_dir))
    stored = store.read_plan() if keep else None
    if stored is not None:
        check_same_run(stored, plan, where=setup.output_dir, fix=fix)
    elif keep and store.unit_ids():
        raise StoreError(f"{store.root} holds units without a plan.json (from an older "
                         f"saliencycheck), so they cannot be checked; {fix}")
    store.folder.remove([RUN_JSON])  # the units are about to change
    if not keep:  # a fresh run: nothing of the earlier one stays beside the new units
        remove_report(store)
        store.clear()
        store.folder.remove(under=["maps"])
    store.folder.reserve(names)
    if stored is None:
        store.write_plan(plan)
    return store


def report_outputs(setup: RunSetup) -> list[str]:
    """The files (relative paths) of the report that a run of ``setup`` writes."""
    names = [*REPORT_FILES, RUN_JSON]
    if setup.config.output.html:
        names.append(REPORT_HTML)
    if setup.config.output.figures:
        for test in setup.stage_names:
            names += [grid_figure_path(image, test) for image in sorted(setup.figure_ids)]
            names.append(test_figure_path(test))
        names.append(VERDICT_FIGURE)
    return names


def planned_outputs(setup: RunSetup, units: list[WorkUnit]) -> list[str]:
    """Every file (relative path) a run of ``setup`` may write into its output folder."""
    names = [*report_outputs(setup), f"units/{PLAN}", f"units/{CONTEXT}"]
    names += [f"units/{unit.id}.{suffix}" for unit in units for suffix in ("json", "npz")]
    if setup.config.output.save_maps:
        names += [f"maps/{safe_name(ref.id)}.npz" for ref in setup.images]
    return names


def is_reserved(relative: Path) -> bool:
    """Whether a path inside an output folder (relative to it) is one saliencycheck writes,
    or lies in a folder it writes into: never a place for a file the user names (--junit)."""
    return (relative.as_posix() in {*REPORT_FILES, RUN_JSON, ERROR_LOG}
            or relative.parts[0] in {STATE_DIR, "units", "maps", CACHE_DIR, *REPORT_DIRS})


def remove_report(store: ResultStore) -> None:
    """Remove the report files saliencycheck wrote (run.json first)."""
    store.folder.remove([RUN_JSON])
    # report.html too when this run writes none (output.html: false): never a stale page
    store.folder.remove([*REPORT_FILES, REPORT_HTML], under=REPORT_DIRS)


def execute(setup: RunSetup, store: ResultStore, units: list[WorkUnit], *, progress: Progress,
            retrain: bool) -> int:
    """Run the ``units`` not stored yet on the configured backend, storing each as it
    finishes; record what every unit shares (label models, fidelity). Returns how many ran."""
    backend = choose_backend(setup)
    stored = store.unit_ids()
    todo = [unit for unit in units if unit.id not in stored]
    total = setup.steps_per_unit * len(todo)
    resumed = f"{len(units) - len(todo)} of {len(units)} units already stored; " if stored else ""
    progress(0, total, resumed + "starting")
    prepared = prepare_checks(setup, store, retrain=retrain,
                              progress=lambda text: progress(0, total, text))
    store.write_context({
        **{name: get_check(name).prepared_json(value) for name, value in prepared.items()},
        "fidelity": precision_fidelity(setup) if todo else store.context().get("fidelity", {}),
    })
    backend.run(todo, prepared=prepared, save=store.save,
                progress=lambda n, text: progress(n, total, text))
    return len(todo)


def prepare_checks(setup: RunSetup, store: ResultStore, *, retrain: bool,
                   progress: Callable[[str], None]) -> dict[str, object]:
    """What the checks obtain once for the run (label randomization's models), by check;
    the files they write into the output folder are recorded as saliencycheck's."""
    @cache
    def example() -> torch.Tensor:
        return first_readable(setup.images, setup.preprocessing)[0].tensor[None].to(setup.device)

    prepared = {}
    for check in setup.checks:
        value = check.prepare(setup, example, retrain=retrain, progress=progress)
        if value is not None:
            prepared[check.name] = value
            store.folder.record(check.written(setup, value))
    return prepared


def precision_fidelity(setup: RunSetup) -> dict[str, float]:
    """With reduced precision: per method, the mean abs-Spearman between the trained model's
    maps at that precision and at fp32, on the first image batch (empty for fp32)."""
    if setup.context.precision == "fp32":
        return {}
    records = load_images(setup.images[: setup.config.runtime.batch_size],
                          setup.preprocessing)[0]
    inputs = torch.stack([r.tensor for r in records]).to(setup.device)
    with torch.inference_mode():
        targets = setup.model(inputs).argmax(dim=1).clone()
    reduced = compute_maps(setup.methods, setup.model, inputs, targets, setup.context)
    exact = compute_maps(setup.methods, setup.model, inputs, targets,
                         replace(setup.context, precision="fp32"))
    return {label: float(score_maps(exact[label], reduced[label], ["spearman_abs"], setup.post)
                         ["spearman_abs"].values.nanmean())
            for label in exact}


def write_outputs(setup: RunSetup, store: ResultStore, *, units_total: int,
                  timings: dict[str, float],
                  interrupted: BaseException | None = None) -> RunResult:
    """Write report.csv, summary.csv, stages.csv, figures and run.json from the store, as a
    set: the earlier report's files are removed first and run.json is written last, so a
    failure or an interrupt part way leaves a folder without run.json, i.e. without a report.
    ``interrupted``: the interrupt that stopped the units (the report is then partial)."""
    started = time.perf_counter()
    out = setup.output_dir
    remove_report(store)
    store.folder.reserve(report_outputs(setup))
    stored = store.load()
    context = store.context()
    fidelity = context.get("fidelity") or {}
    rows = stored.rows
    write_report(out / "report.csv", rows)
    runtime = setup.config.runtime
    summary = summarize(rows, level=runtime.ci_level, resamples=runtime.bootstrap,
                        seed=runtime.seed)
    write_summary(out / "summary.csv", summary)
    write_stages(out / "stages.csv", setup.stages, stored.stages, setup.stage_names)
    write_skipped(out / "skipped.csv", stored.skipped)
    written = [out / name for name in ("report.csv", "summary.csv", "stages.csv", "skipped.csv")]
    if setup.config.output.figures and rows:
        written += write_figures(setup, store, summary)
    final_stage = setup.final_stage
    validity = {check.name: v for check in setup.checks
                if (v := check.validity(setup, context, stored.stages)) is not None}
    verdicts = []
    for check in judging_order(setup):
        info = validity.get(check.name)
        invalid = f"invalid test: {info['reason']}" if info and not info["valid"] else ""
        verdicts += check.verdicts(summary, setup, invalid=invalid, level=runtime.ci_level)
    failures = gate_failures(verdicts, setup.config.fail_on)
    if verdicts:
        write_verdicts(out / "verdicts.csv", verdicts)
        written.append(out / "verdicts.csv")
        if setup.config.output.figures:
            written.append(out / VERDICT_FIGURE)
            verdict_heatmap(written[-1], verdicts, level=setup.config.runtime.ci_level)
    store.folder.record(written)
    if setup.config.output.html:
        written.append(out / REPORT_HTML)
    timings = {**timings, "report_s": time.perf_counter() - started}
    info = run_info(setup, timings=timings, units_done=len(stored.unit_ids),
                    units_total=units_total, skipped=stored.skipped, fidelity=fidelity,
                    validity=validity,
                    report_files=sorted(store.folder.relative(path) for path in written),
                    interrupted=interrupted)
    text = json.dumps(info, indent=2, default=_json_default)
    if setup.config.output.html:  # from the files just written and run.json's content
        write_html_report(out, info=json.loads(text))
        store.folder.record([out / REPORT_HTML])
    atomic_write_text(out / RUN_JSON, text)
    store.folder.record([out / RUN_JSON])
    store.folder.settle()
    return RunResult(output_dir=out, summary=summary, skipped=stored.skipped,
                     precision=setup.context.precision, fidelity=fidelity,
                     methods=[m.label for m in setup.methods], metrics=list(setup.config.metrics),
                     final_stage=final_stage,
                     units_done=len(stored.unit_ids), units_total=units_total, timings=timings,
                     validity=validity, verdicts=verdicts,
                     failures=failures, unchanged_stages=sorted(
                         {(r.test, r.stage) for r in rows if UNCHANGED_NOTE in r.note}))


def judging_order(setup: RunSetup) -> list:
    """The checks in the order their verdicts are listed: those with a threshold in the
    config's order, then the others (completeness) in registry order."""
    order = list(setup.config.thresholds)
    return sorted(setup.checks, key=lambda c: order.index(c.name) if c.name in order
                  else len(order))


def write_figures(setup: RunSetup, store: ResultStore,
                  summary: list[SummaryRow]) -> list[Path]:
    """Every figure of the report; returns their paths."""
    out = setup.output_dir
    written: list[Path] = []
    maps = store.figure_maps()
    shown = {key.split("|")[0] for key in maps}
    by_id = {r.id: r for r in load_images([i for i in setup.images if i.id in shown],
                                          setup.preprocessing)[0]}
    for test in setup.stage_names:
        images = sorted({key.split("|")[0] for key in maps if key.split("|")[1] == test})
        for image in images:
            written.append(out / grid_figure_path(image, test))
            save_figure(grid_figure(setup, maps, image, test, by_id[image].display),
                        written[-1], bbox_inches="tight", pad_inches=0.1)
        check = get_check(test)
        written.append(out / test_figure_path(test))
        if check.figure == "bars":  # alternatives to compare, not a sequence
            comparison_bars(written[-1], summary, test, check.metrics(setup.config),
                            title=check.title, ylabel=check.ylabel,
                            methods=[m.label for m in setup.methods],
                            level=setup.config.runtime.ci_level)
        else:
            save_figure(test_curves(setup, summary, test), written[-1])
    return written


def grid_figure_path(image: str, test: str) -> str:
    """Where an image's stage grid in ``test`` goes, relative to the output folder."""
    return f"figures/{safe_name(image)}/{test}.png"


def test_figure_path(test: str) -> str:
    """Where a test's summary figure goes: bars for alternatives, curves for a cascade."""
    return f"figures/{get_check(test).figure or 'curves'}_{test}.png"


def grid_figure(setup: RunSetup, maps: dict[str, np.ndarray], image: str, test: str,
                display: np.ndarray) -> Figure:
    """The paper's grid of one image in one test: its maps, method × stage."""
    grid = {m.label: maps[figure_key(image, test, m.label)] for m in setup.methods
            if figure_key(image, test, m.label) in maps}
    return stage_grid_figure(display, grid, setup.stage_names[test],
                             title=f"{image} - {get_check(test).title} "
                                   f"({setup.config.model.label})")


def test_curves(setup: RunSetup, summary: list[SummaryRow], test: str) -> Figure:
    """A test's similarity curves; the random-network floor only where it applies (it
    compares plain maps: not sMPRT's averaged ones)."""
    floors = {(s.method, s.metric): s for s in summary if s.test == FLOOR_TEST}
    check = get_check(test)
    return curves_figure(summary, test, check.metrics(setup.config),
                         floors=floors if check.against_floor else {},
                         level=setup.config.runtime.ci_level,
                         title=None if check.randomizes else check.title, ylabel=check.ylabel)


def run_info(setup: RunSetup, *, timings: dict[str, float], units_done: int,
             units_total: int, skipped: list[tuple[str, str]],
             fidelity: dict[str, float], validity: dict[str, dict] | None = None,
             report_files: list[str] = (),
             interrupted: BaseException | None = None) -> dict[str, Any]:
    """run.json's content: the resolved config, versions, device, timings, skipped images,
    and what was run; ``complete`` is true when every planned unit is in the report."""
    return {
        "complete": units_done == units_total,
        "interrupted_by": (None if interrupted is None else
                           "SIGTERM" if isinstance(interrupted, Terminated) else "SIGINT"),
        "config_file": str(setup.source),
        "config": setup.config.model_dump(mode="json"),
        "config_sha256": config_sha256(setup),
        "versions": package_versions(),
        "seeds": seeds(setup),
        "checkpoints_sha256": checkpoint_hashes(setup, (validity or {}).get(
            "label_randomization")),
        "model_sha256": setup.model_sha256,
        "python": platform.python_version(),
        "device": str(setup.device),
        "device_name": (torch.cuda.get_device_name(setup.device)
                        if setup.device.type == "cuda" else platform.processor() or "cpu"),
        "torch_threads": torch.get_num_threads(),
        "weights": setup.weights_source,
        "preprocessing": {"size": setup.preprocessing.size, "mean": setup.preprocessing.mean,
                          "std": setup.preprocessing.std, "resize": setup.preprocessing.resize},
        "methods": [{"label": m.label, "name": m.name, "params": m.params.model_dump(mode="json")}
                    for m in setup.methods],
        "target": setup.config.images.target,
        "target_on_randomized": setup.config.tests.target_on_randomized,
        "postprocess": setup.config.postprocess.model_dump(mode="json"),
        "precision": setup.context.precision,
        "chunk_size": setup.context.chunk_size,
        "precision_fidelity_spearman_abs": fidelity,
        "images": [r.id for r in setup.images],
        "skipped_images": [{"path": path, "reason": reason} for path, reason in skipped],
        "stages": {test: len(stages) for test, stages in setup.stages.items()},
        "stage_table": "stages.csv",
        **{check.name: (validity or {}).get(check.name) for check in CHECKS
           if check.has_validity},
        "units_done": units_done,
        "units_total": units_total,
        "report_files": list(report_files),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _json_default(value: object) -> object:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)
