"""Execute one work unit: every check's model states, prefix-cached and scored on the device.

The executor orchestrates; the science is in the checks (``saliencycheck.checks``). Per unit:
the logits every check's model states need before the passes, then the images in groups whose
rows fill one pass, each group pushed through the trained model and every model state of the
checks that share the passes in turn (:func:`~saliencycheck.engine.passes.run_staged`, so the
layers a state leaves trained are not recomputed); each check then scores the group (and
runs passes of its own: the random class, the shifted input, the label models); after the
groups, the checks with passes over the whole unit (sMPRT's noisy copies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saliencycheck.atomic import atomic_write
from saliencycheck.checks.base import Group, Maps, ScoreTable, StageRef, Unit
from saliencycheck.data import load_images, safe_name
from saliencycheck.engine.fp32 import exact_fp32
from saliencycheck.engine.host_memory import reused_host_memory
from saliencycheck.engine.passes import (
    IMAGES_KEY,
    KeptLogits,
    RowSource,
    StageRequests,
    compute_maps,
    run_staged,
)
from saliencycheck.engine.prefix import CallTrace, PrefixCache, prefix_modules, trace_calls
from saliencycheck.metrics import ReferenceScorer
from saliencycheck.postprocess import absolute
from saliencycheck.randomization import RandomizedModels, logit_change
from saliencycheck.results import ScoreRow, StageObservation
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import RunSetup
from saliencycheck.runner.store import UnitResult

ProgressCallback = Callable[[float, str], None]  # (steps advanced, description)
UNCHANGED_LOGITS = 1e-7  # relative L2 change of the logits at or below which a stage is flagged
UNCHANGED_NOTE = ("logits unchanged by this stage: the randomized block does not reach the "
                  "output, so the score says nothing about the method")


def figure_key(image: str, test: str, method: str) -> str:
    return f"{image}|{test}|{method}"


def compute_targets(setup: RunSetup, ids: list[str], logits: torch.Tensor) -> torch.Tensor:
    target = setup.config.images.target
    if target == "predicted":
        return logits.argmax(dim=1)
    if target == "label":
        return torch.tensor([setup.labels[i] for i in ids], device=logits.device)
    return torch.full((len(ids),), int(target), device=logits.device, dtype=torch.long)


class UnitExecutor:
    """Runs units against one model; owns the single working copy used for randomization.

    It is the :class:`~saliencycheck.checks.base.Engine` the checks score with: they record
    rows, compute maps on the model states it enters, and observe logits through it.
    """

    def __init__(self, setup: RunSetup, prepared: dict[str, Any] | None = None) -> None:
        self.setup = setup
        self._prepared = prepared or {}
        self.checks = setup.checks
        # progress steps, fixed for the run: read per pass and per group, not recomputed
        self.pass_steps = setup.pass_steps
        self.own_steps = {check.name: check.steps(setup) for check in self.checks
                          if not check.randomizes}  # sMPRT's are its own passes'
        self.randomized = RandomizedModels(setup.model)
        tests = setup.config.tests
        self._options = dict(init=tests.init, std=tests.init_std,
                             reset_running_stats=tests.reset_running_stats,
                             seed=setup.config.runtime.seed)
        for stages in setup.stages.values():
            self.randomized.check(stages)
        refs = {check.name: check.refs(setup) for check in self.checks}
        # the model states whose logits stages.csv reports (the randomization tests')
        self.stages = [ref for check in self.checks if check.randomizes
                       for ref in refs[check.name]]
        # the model states of the shared passes (sMPRT's run on noisy copies, on their own)
        self.pass_refs = [ref for check in self.checks if check.shares_passes
                          for ref in refs[check.name]]
        # The stage logits (stages.csv, and the explained class with 'recompute') come from a
        # no-grad forward of their own only where the passes cannot give them: with
        # 'recompute' they are needed before the passes (every state explains its own top
        # class), in reduced precision they would differ from the fp32 logits, and the
        # states outside the shared passes (sMPRT's) see noisy images there.
        self.recompute = tests.target_on_randomized == "recompute"
        self.logits_from_passes = not self.recompute and setup.config.runtime.precision == "fp32"
        shared = set(self.pass_refs)
        self.forward_refs = ([ref for ref in self.stages if ref not in shared]
                             if self.logits_from_passes else list(self.stages))
        if self.recompute:
            self.forward_refs += [ref for ref in self.pass_refs if ref not in self.stages]
        self._trace: CallTrace | None = None
        self._result: UnitResult | None = None
        self._raw_maps: dict[str, dict[str, np.ndarray]] = {}

    # -- the Engine the checks use --------------------------------------------------------
    def model(self, ref: StageRef | None = None) -> nn.Module:
        options = self._options if ref is None or ref.seed is None \
            else {**self._options, "seed": ref.seed}
        return self.randomized.enter(ref.stage if ref else None, **options)

    def maps(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Maps:
        return compute_maps(self.setup.methods, model, inputs, targets, self.setup.context)

    def prepared(self, test: str) -> Any:
        return self._prepared.get(test)

    def observe(self, test: str, stage_index: int, n: int, change: dict[str, float]) -> None:
        self._result.stages.append(StageObservation(
            test=test, stage_index=stage_index, n=n,
            relative_l2_sum=change["relative_l2"] * n,
            top1_agreement_sum=change["top1_agreement"] * n))

    def staged_maps(self, inputs: Tensor, targets: list[Tensor], refs: list[StageRef | None],
                    progress: Callable[[float], None]) -> list[Maps]:
        return self.group_maps(inputs, targets, self._trace, progress, refs=refs)[0]

    # -- running a unit ---------------------------------------------------------------------
    def prefix_trace(self, example: torch.Tensor) -> CallTrace | None:
        if not self.setup.config.runtime.prefix_cache:
            return None
        if self._trace is None:
            self._trace = trace_calls(self.model(), example)
        return self._trace

    def run(self, unit: WorkUnit, progress: ProgressCallback) -> UnitResult:
        """One unit's scores, keeping freed host memory for the next pass while it runs
        (``runtime.reuse_host_memory``; every backend runs its units through here)."""
        runtime = self.setup.config.runtime
        with reused_host_memory(runtime.reuse_host_memory), \
                exact_fp32(runtime.precision == "fp32"):  # the logits and scores too
            return self._run(unit, progress)

    def _run(self, unit: WorkUnit, progress: ProgressCallback) -> UnitResult:
        setup = self.setup
        records, skipped = load_images([setup.images[i] for i in unit.image_indices],
                                       setup.preprocessing)
        result = UnitResult(unit_id=unit.id, skipped=[(str(s.path), s.reason) for s in skipped])
        if not records:
            progress(setup.steps_per_unit, f"{unit.id}: unreadable")
            return result
        self._result, self._raw_maps = result, {r.id: {} for r in records}
        ids = [r.id for r in records]
        inputs = torch.stack([r.tensor for r in records]).to(setup.device)
        trace = self.prefix_trace(inputs[:1])
        try:
            logits, forward_logits = self._logits(inputs, trace, self.forward_refs)
            targets = compute_targets(setup, ids, logits)
            observed = {ref: (logits, z) for ref, z in zip(self.forward_refs, forward_logits)}
            explained = {ref: observed[ref][1].argmax(dim=1) if self.recompute else targets
                         for ref in [*self.stages, *self.pass_refs]}
            pass_logits: list[list[Tensor | None]] = []  # per group: trained, then pass_refs
            for group in self.groups(inputs, targets):
                count = group.stop - group.start
                maps, kept = self.group_maps(
                    inputs[group], [targets[group], *(explained[ref][group]
                                                      for ref in self.pass_refs)], trace,
                    lambda done, g=group, n=count: progress(
                        done * self.pass_steps * n / len(ids),
                        f"{unit.id}: images {g.start + 1}–{g.stop} of {len(ids)}"))
                pass_logits.append(kept)
                self._score_group(Group(
                    ids=ids[group], inputs=inputs[group], targets=targets[group],
                    logits=logits[group], trained=maps[0], scorers={}, identity={}),
                    {ref: (explained[ref][group], m) for ref, m in zip(self.pass_refs, maps[1:])},
                    lambda steps, text, n=count: progress(steps * n / len(ids),
                                                          f"{unit.id}: {text}"))
            whole = Unit(id=unit.id, ids=ids, inputs=inputs, targets=targets,
                         explained={ref: explained[ref] for ref in self.stages},
                         progress=lambda done, text: progress(done, f"{unit.id}: {text}"))
            for check in self.checks:
                check.score_unit(self, whole)
            if self.logits_from_passes:
                observed.update(self._pass_logits(inputs, trace, pass_logits))
            self._observe_stages(result, [(ref, *observed[ref]) for ref in self.stages])
        finally:
            self.model()
            self._result, raw_maps, self._raw_maps = None, self._raw_maps, {}
        if setup.config.output.save_maps:
            result.files = self._save_raw_maps(raw_maps)
        return result

    def _score_group(self, group: Group, states: dict[StageRef, tuple[Tensor, Maps]],
                     progress: ProgressCallback) -> None:
        """Every check scores one image group: the trained maps against themselves and each
        check's model states of the shared passes (``states``: class explained, maps);
        ``progress`` takes a whole unit's steps (scaled to the group)."""
        setup = self.setup
        group.scorers = {label: ReferenceScorer(m, setup.config.metrics, setup.post)
                         for label, m in group.trained.items()}
        group.identity = {label: scorer.score(group.trained[label])
                          for label, scorer in group.scorers.items()}
        for check in self.checks:
            check.score(self, replace(group, states=[
                (ref, *states[ref]) for ref in self.pass_refs if ref.test == check.name]))
            if self.own_steps.get(check.name):
                progress(self.own_steps[check.name], check.name.replace("_", " "))

    def _pass_logits(self, inputs: torch.Tensor, trace: CallTrace | None,
                     groups: list[list[Tensor | None]]
                     ) -> dict[StageRef, tuple[Tensor, Tensor]]:
        """(trained, stage) logits of every pass stage, as the passes computed them, each
        group's rows in order; both from the passes, so a stage that changes nothing shows
        exactly no change. A no-grad forward where no method's passes read the images."""
        stacked = [torch.cat(parts) if all(p is not None for p in parts) else None
                   for parts in zip(*groups)]
        observed = [ref for ref in self.pass_refs if ref in set(self.stages)]
        trained, stages = stacked[0], dict(zip(self.pass_refs, stacked[1:]))
        if trained is None:
            trained, logits = self._logits(inputs, trace, observed)
            stages = dict(zip(observed, logits))
        return {ref: (trained, stages[ref]) for ref in observed}

    def _observe_stages(self, result: UnitResult,
                        observed: list[tuple[StageRef, Tensor, Tensor]]) -> None:
        """How far each stage moved the logits (stored, pooled into stages.csv), from
        (stage, trained logits, stage logits) in :attr:`stages` order; rows of stages that
        moved none get :data:`UNCHANGED_NOTE`."""
        unchanged = set()
        cumulative = {check.name for check in self.checks if check.cumulative}
        previous: dict[tuple[str, int], torch.Tensor] = {}  # per (test, repeat)
        for ref, logits, z in observed:
            n = len(logits)
            change = logit_change(logits, z)  # means over this unit's images
            # what this stage itself randomized: cumulative tests add to the last stage
            before = previous.get((ref.test, ref.repeat), logits) \
                if ref.test in cumulative else logits
            if logit_change(before, z)["relative_l2"] <= UNCHANGED_LOGITS:
                unchanged.add((ref.test, ref.stage.index, ref.repeat))
            previous[(ref.test, ref.repeat)] = z
            result.stages.append(StageObservation(
                test=ref.test, stage_index=ref.stage.index, n=n,
                relative_l2_sum=change["relative_l2"] * n,
                top1_agreement_sum=change["top1_agreement"] * n))
        if unchanged:
            result.rows = [replace(row, note="; ".join(n for n in (row.note, UNCHANGED_NOTE)
                                                       if n))
                           if (row.test, row.stage_index, row.repeat) in unchanged else row
                           for row in result.rows]

    def _logits(self, inputs: torch.Tensor, trace: CallTrace | None,
                refs: list[StageRef]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The trained logits and those of each of ``refs``; a stage runs only the modules at
        and after its first randomized one."""
        model = self.model()
        prefixes = [prefix_modules(trace, ref.modules) if trace else () for ref in refs]
        cache = PrefixCache(model, chain.from_iterable(prefixes),
                            modifiers=trace.modifiers if trace else None)
        with torch.no_grad():
            with cache.record() as recorded:
                logits = model(inputs)
            stage_logits = []
            for ref, prefix in zip(refs, prefixes):
                self.model(ref)
                with cache.stub(prefix, recorded, grad=False):
                    stage_logits.append(model(inputs))
        self.model()
        return logits, stage_logits

    def groups(self, inputs: torch.Tensor, targets: torch.Tensor, *, copies: int = 1
               ) -> list[slice]:
        """Consecutive image groups whose rows (per backward rule; ``copies`` of each image)
        fill at most one pass, so the per-stage maps held at once stay within one pass's
        worth of images."""
        setup = self.setup
        source = RowSource.of(inputs, targets)
        rows: dict[str, dict[object, int]] = {}
        for method in setup.methods:
            if method.spec.plan is not None:
                plan = method.spec.plan(self.randomized.model, source, setup.context,
                                        **dict(method.params))
                for request in plan.requests:
                    if request.family != "forward":  # a forward row keeps one logit, no map
                        rows.setdefault(request.family, {})[request.source.key] = \
                            request.source.count
        unit_rows = max((sum(keys.values()) for keys in rows.values()), default=len(inputs))
        size = max(1, setup.context.chunk_size * len(inputs) // (unit_rows * copies))
        return [slice(start, min(start + size, len(inputs)))
                for start in range(0, len(inputs), size)]

    def group_maps(self, inputs: torch.Tensor, targets: list[torch.Tensor],
                   trace: CallTrace | None, progress: Callable[[float], None],
                   refs: list[StageRef | None] | None = None
                   ) -> tuple[list[dict[str, Tensor]], list[Tensor | None]]:
        """Raw maps of every method for each of ``refs`` (None: the trained model), explaining
        ``targets`` (one per ref), and each ref's logits of the images as the passes computed
        them (None where no pass read the images). By default the refs are the trained model
        and every model state of the shared passes (:attr:`pass_refs`). Refs of one model
        state (:attr:`StageRef.key`) with equal targets are computed once."""
        setup = self.setup
        if refs is None:
            refs = [None, *self.pass_refs]
        unique: dict[tuple, int] = {}
        slots = []
        for ref, stage_targets in zip(refs, targets):
            key = (ref.key if ref else (frozenset(), None), tuple(stage_targets.tolist()))
            slots.append(unique.setdefault(key, len(unique)))
        firsts = [slots.index(slot) for slot in range(len(unique))]
        plans = []
        for index in firsts:
            source = RowSource.of(inputs, targets[index])
            plans.append({m.label: m.spec.plan(self.randomized.model, source, setup.context,
                                               **dict(m.params))
                          for m in setup.methods if m.spec.plan is not None})
        kept = [KeptLogits(key=IMAGES_KEY, count=len(inputs)) for _ in firsts]
        run_staged([StageRequests(enter=partial(self.model, refs[index]),
                                  requests=[r for plan in stage_plans.values()
                                            for r in plan.requests],
                                  randomized=refs[index].modules if refs[index] else (),
                                  logits=logits)
                    for index, stage_plans, logits in zip(firsts, plans, kept)],
                   setup.context, trace, progress=progress)
        maps = []
        for index, stage_plans in zip(firsts, plans):
            model = self.model(refs[index])
            maps.append({m.label: stage_plans[m.label].finish() if m.label in stage_plans
                         else m(model, inputs, targets[index], setup.context)
                         for m in setup.methods})
        return [maps[slot] for slot in slots], [kept[slot].value for slot in slots]

    def record(self, test: str, stage_index: int, stage: str, ids: list[str], targets: Tensor,
               explained: Tensor, maps: Maps, scores: ScoreTable, *, repeat: int = 0,
               note: str = "") -> None:
        """One score row per image × method × metric of ``scores``; the ``maps`` of the
        figure images (the first seed's) kept for the grids, all with ``output.save_maps``."""
        setup, result, raw_maps = self.setup, self._result, self._raw_maps
        target_list, explained_list = targets.tolist(), explained.tolist()
        for method, method_scores in scores.items():
            for metric, score in method_scores.items():
                values = score.values.tolist()
                for i, image in enumerate(ids):
                    result.rows.append(ScoreRow(
                        image=image, target=target_list[i], target_explained=explained_list[i],
                        method=method, test=test, stage_index=stage_index, stage=stage,
                        metric=metric, value=float(values[i]),
                        note="; ".join(n for n in (score.reasons[i], note) if n),
                        repeat=repeat))
            candidate = maps.get(method)
            if candidate is None or repeat:  # figures and saved maps: the first seed only
                continue
            wanted = [i for i, image in enumerate(ids) if image in setup.figure_ids]
            if wanted:
                shown = absolute(candidate[wanted], reduction=setup.post.abs_reduction,
                                 percentile=setup.post.percentile).cpu().numpy()
                for row, i in enumerate(wanted):
                    key = figure_key(ids[i], test, method)
                    stack = result.figure_maps.get(key)
                    frame = shown[row][None].astype(np.float16)
                    result.figure_maps[key] = (
                        frame if stack is None else np.concatenate([stack, frame]))
            if setup.config.output.save_maps:
                array = candidate.detach().cpu().numpy()
                for i, image in enumerate(ids):
                    raw_maps[image][f"{test}/{method}/{stage_index}"] = array[i]

    def _save_raw_maps(self, raw_maps: dict[str, dict[str, np.ndarray]]) -> list[str]:
        """maps/<image>.npz, each written atomically; their paths relative to the output
        folder, which the driver records as saliencycheck's own (the unit may run elsewhere)."""
        folder = self.setup.output_dir / "maps"
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for image, arrays in raw_maps.items():
            name = safe_name(image) + ".npz"

            def write(tmp: Path, arrays: dict[str, np.ndarray] = arrays) -> None:
                with tmp.open("wb") as fh:
                    np.savez_compressed(fh, **arrays)
            atomic_write(folder / name, write)
            names.append(f"maps/{name}")
        return names

