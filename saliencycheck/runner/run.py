"""Run a sanity check end to end: plan units, execute them, store each, then write every output.

Never prints or exits: progress goes through a callback, problems are raised as the project's
exception types, and the CLI decides what the user sees.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from saliencycheck.atomic import atomic_write_text
from saliencycheck.config import ENTROPY_RISE, FLOOR_TESTS
from saliencycheck.data import load_images
from saliencycheck.errors import SaliencyCheckError, StoreError
from saliencycheck.invariance import compensation_failure
from saliencycheck.label_training import LabelModels, obtain_label_models
from saliencycheck.methods import compute_maps
from saliencycheck.metrics import score_maps
from saliencycheck.report.figures import (
    comparison_bars,
    similarity_curves,
    stage_grid,
    verdict_heatmap,
)
from saliencycheck.report.tables import (
    SummaryRow,
    summarize,
    write_report,
    write_skipped,
    write_stages,
    write_summary,
)
from saliencycheck.runner.backends import choose_backend
from saliencycheck.runner.executor import UNCHANGED_NOTE, figure_key, safe_name
from saliencycheck.runner.manifest import check_same_run, manifest
from saliencycheck.runner.plan import WorkUnit, plan_units
from saliencycheck.runner.provenance import (
    checkpoint_hashes,
    config_sha256,
    model_sha256,
    package_versions,
    seeds,
)
from saliencycheck.runner.setup import (
    ENTROPY_TEST,
    INVARIANCE_TEST,
    LABEL_TEST,
    LOGIT_TEST,
    SMOOTH_TEST,
    RunSetup,
    first_readable,
)
from saliencycheck.runner.shards import Shard
from saliencycheck.runner.store import ResultStore
from saliencycheck.verdicts import (
    FLOOR_TEST,
    Verdict,
    completeness_verdicts,
    decide,
    gate_failures,
    write_verdicts,
)

Progress = Callable[[int, int, str], None]  # (steps advanced, total steps, description)
TITLES = {"cascading": "cascading randomization", "independent": "independent randomization",
          LABEL_TEST: "label randomization (random-label model, true-label control)",
          LOGIT_TEST: "random logit (the explained class, a random other class)",
          INVARIANCE_TEST: "input invariance (shifted input, first layer compensating)",
          SMOOTH_TEST: "smooth MPRT (maps averaged over noisy copies)",
          ENTROPY_TEST: "efficient MPRT (relative rise of histogram entropy)"}
RUN_JSON = "run.json"  # written last: present only beside whole report files (units_done: how
# much of the run they cover)
BAR_TESTS = (LABEL_TEST, LOGIT_TEST, INVARIANCE_TEST, ENTROPY_TEST)  # alternatives, not a cascade


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
    label_randomization: dict | None = None  # validity and the models' accuracies
    input_invariance: dict | None = None  # whether the compensation kept the logits
    verdicts: list[Verdict] = field(default_factory=list)
    failures: list[Verdict] = field(default_factory=list)  # FAIL verdicts fail_on counts
    units_resumed: int = 0  # already stored when the run started (--resume)
    unchanged_stages: list[tuple[str, str]] = field(default_factory=list)  # (test, stage)
    # whose randomization moved no logit: their scores say nothing

    @property
    def interrupted(self) -> bool:
        return self.units_done < self.units_total


def run_check(setup: RunSetup, *, progress: Progress = lambda *_: None,
              retrain: bool = False, resume: bool = False) -> RunResult:
    """Execute every work unit, storing each at once, then write reports and figures.

    With ``resume``, the units already stored for the same plan are kept and skipped (a
    stored plan of another config raises StoreError); without it the store starts empty.
    With the label randomization test, its models are trained first (or loaded: from the
    checkpoints, or from the cache in the output folder unless ``retrain``). On
    KeyboardInterrupt the outputs are written from the units already stored, then the
    interrupt propagates, so nothing computed is lost.
    """
    started = time.perf_counter()
    units = plan_units(len(setup.images), batch_size=setup.config.runtime.batch_size)
    store = open_store(setup, units, keep=resume, fix="run without --resume to start afresh, "
                       "or set output.dir to another folder")
    try:
        ran = execute(setup, store, units, progress=progress, retrain=retrain)
    except KeyboardInterrupt:
        write_outputs(setup, store, units_total=len(units),
                      timings={"compute_s": time.perf_counter() - started})
        raise
    result = write_outputs(setup, store, units_total=len(units),
                           timings={"compute_s": time.perf_counter() - started})
    return replace(result, units_resumed=len(units) - ran)


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
              retrain: bool = False) -> ShardResult:
    """Run this shard's units that are not stored yet, into the shared output folder.

    Shards always keep what is stored (a resubmitted array task picks up where it stopped)
    and never write the report: `merge` does, from every shard's units.
    """
    units = plan_units(len(setup.images), batch_size=setup.config.runtime.batch_size)
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
    hold units of the same plan; ``fix`` tells the user what to do when it does not."""
    store = ResultStore(setup.output_dir)
    (setup.output_dir / RUN_JSON).unlink(missing_ok=True)  # the units are about to change
    plan = manifest(setup, units)
    stored = store.read_plan() if keep else None
    if stored is not None:
        check_same_run(stored, plan, where=setup.output_dir, fix=fix)
        return store
    if keep and store.unit_ids():
        raise StoreError(f"{store.root} holds units without a plan.json (from an older "
                         f"saliencycheck), so they cannot be checked; {fix}")
    if not keep:
        store.clear()
        shutil.rmtree(setup.output_dir / "maps", ignore_errors=True)  # another run's images
    store.write_plan(plan)
    return store


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
    label_models = obtain_models(setup, retrain=retrain,
                                 progress=lambda text: progress(0, total, text))
    store.write_context({
        "label_randomization": label_models.as_json() if label_models else None,
        "fidelity": precision_fidelity(setup) if todo else store.context().get("fidelity", {}),
    })
    backend.run(todo, label_models=label_models, save=store.save,
                progress=lambda n, text: progress(n, total, text))
    return len(todo)


def obtain_models(setup: RunSetup, *, retrain: bool,
                  progress: Callable[[str], None]) -> LabelModels | None:
    """The label randomization test's models (None when the test is not configured)."""
    section = setup.config.tests.label_randomization
    if section is None:
        return None
    example = first_readable(setup.images, setup.preprocessing)[0].tensor[None].to(setup.device)
    try:
        return obtain_label_models(setup.model, example, section, pre=setup.preprocessing,
                                   resolve=setup.resolve,
                                   cache=(setup.output_dir / LABEL_TEST).resolve(),
                                   retrain=retrain, progress=progress)
    except SaliencyCheckError as exc:  # its checkpoints are config fields: name the file
        raise type(exc)(f"{setup.source.name}: {exc}") from None


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
                  timings: dict[str, float]) -> RunResult:
    """Write report.csv, summary.csv, stages.csv, figures and run.json from the store."""
    started = time.perf_counter()
    out = setup.output_dir
    # run.json is written last: while it is absent the folder holds no complete report, so
    # a failure part way (a full disk) cannot leave an earlier run's report passing for this
    (out / RUN_JSON).unlink(missing_ok=True)
    stored = store.load()
    context = store.context()
    fidelity = context.get("fidelity") or {}
    label_randomization = context.get("label_randomization")
    rows = stored.rows
    write_report(out / "report.csv", rows)
    runtime = setup.config.runtime
    summary = summarize(rows, level=runtime.ci_level, resamples=runtime.bootstrap,
                        seed=runtime.seed)
    write_summary(out / "summary.csv", summary)
    write_stages(out / "stages.csv", setup.stages, stored.stages, setup.stage_names)
    write_skipped(out / "skipped.csv", stored.skipped)
    # Every output is rewritten from the store: nothing of an earlier run in this folder
    # (figures of other images, verdicts of thresholds since removed) may pass for this one's.
    shutil.rmtree(out / "figures", ignore_errors=True)
    if setup.config.output.figures and rows:
        write_figures(setup, store, summary)
    final_stage = setup.final_stage
    invalid = ({LABEL_TEST: f"invalid test: {label_randomization['reason']}"}
               if label_randomization and not label_randomization["valid"] else {})
    invariance = invariance_check(setup, stored.stages)
    if invariance and not invariance["valid"]:
        invalid[INVARIANCE_TEST] = f"invalid test: {invariance['reason']}"
    verdicts = decide(summary, setup.config.thresholds, methods=[m.label for m in setup.methods],
                      stage_names=setup.stage_names, final_stage=final_stage,
                      invalid_tests=invalid, level=runtime.ci_level)
    if setup.config.tests.completeness.enabled:
        verdicts += completeness_verdicts(summary, setup.config.tests.completeness.tolerance,
                                          level=runtime.ci_level)
    failures = gate_failures(verdicts, setup.config.fail_on)
    (out / "verdicts.csv").unlink(missing_ok=True)
    if verdicts:
        write_verdicts(out / "verdicts.csv", verdicts)
        if setup.config.output.figures:
            verdict_heatmap(out / "figures" / "verdicts.png", verdicts,
                            level=setup.config.runtime.ci_level)
    timings = {**timings, "report_s": time.perf_counter() - started}
    write_run_json(setup, out / RUN_JSON, timings=timings, units_done=len(stored.unit_ids),
                   units_total=units_total, skipped=stored.skipped, fidelity=fidelity,
                   label_randomization=label_randomization, input_invariance=invariance)
    return RunResult(output_dir=out, summary=summary, skipped=stored.skipped,
                     precision=setup.context.precision, fidelity=fidelity,
                     methods=[m.label for m in setup.methods], metrics=list(setup.config.metrics),
                     final_stage=final_stage,
                     units_done=len(stored.unit_ids), units_total=units_total, timings=timings,
                     label_randomization=label_randomization, verdicts=verdicts,
                     failures=failures, input_invariance=invariance, unchanged_stages=sorted(
                         {(r.test, r.stage) for r in rows if UNCHANGED_NOTE in r.note}))


def invariance_check(setup: RunSetup, observations: list) -> dict | None:
    """Whether the first layer kept the logits of the shifted input (None: test not run)."""
    if setup.invariance_layer is None:
        return None
    seen = [o for o in observations if o.test == INVARIANCE_TEST]
    n = sum(o.n for o in seen)
    change = sum(o.relative_l2_sum for o in seen) / n if n else float("nan")
    reason = compensation_failure(change)
    return {"layer": setup.invariance_layer, "shift": setup.config.tests.input_invariance.shift,
            "logit_relative_l2": change, "valid": not reason, "reason": reason}


def write_figures(setup: RunSetup, store: ResultStore, summary: list[SummaryRow]) -> None:
    figures = setup.output_dir / "figures"
    maps = store.figure_maps()
    shown = {key.split("|")[0] for key in maps}
    by_id = {r.id: r for r in load_images([i for i in setup.images if i.id in shown],
                                          setup.preprocessing)[0]}
    floors = {(s.method, s.metric): s for s in summary if s.test == FLOOR_TEST}
    for test, names in setup.stage_names.items():
        images = sorted({key.split("|")[0] for key in maps if key.split("|")[1] == test})
        for image in images:
            grid = {m.label: maps[figure_key(image, test, m.label)] for m in setup.methods
                    if figure_key(image, test, m.label) in maps}
            stage_grid(figures / safe_name(image) / f"{test}.png", by_id[image].display, grid,
                       names,
                       title=f"{image} - {TITLES.get(test, test)} ({setup.config.model.name})")
        metrics = [ENTROPY_RISE] if test == ENTROPY_TEST else list(setup.config.metrics)
        if test in BAR_TESTS:  # alternatives to compare, not a sequence
            comparison_bars(figures / f"bars_{test}.png", summary, test, metrics,
                            title=TITLES[test], ylabel="rise over the trained map's entropy"
                            if test == ENTROPY_TEST else "similarity to trained map",
                            methods=[m.label for m in setup.methods],
                            level=setup.config.runtime.ci_level)
        else:  # the floor compares plain maps: not sMPRT's averaged ones
            similarity_curves(figures / f"curves_{test}.png", summary, test, metrics,
                              floors=floors if test in FLOOR_TESTS else {},
                              level=setup.config.runtime.ci_level)


def write_run_json(setup: RunSetup, path: Path, *, timings: dict[str, float], units_done: int,
                   units_total: int, skipped: list[tuple[str, str]],
                   fidelity: dict[str, float], label_randomization: dict | None = None,
                   input_invariance: dict | None = None) -> None:
    """The resolved config, versions, device, timings, skipped images, and what was run."""
    info = {
        "config_file": str(setup.source),
        "config": setup.config.model_dump(mode="json"),
        "config_sha256": config_sha256(setup),
        "versions": package_versions(),
        "seeds": seeds(setup),
        "checkpoints_sha256": checkpoint_hashes(setup, label_randomization),
        "model_sha256": model_sha256(setup.model),
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
        "label_randomization": label_randomization,
        "input_invariance": input_invariance,
        "units_done": units_done,
        "units_total": units_total,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    atomic_write_text(path, json.dumps(info, indent=2, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)
