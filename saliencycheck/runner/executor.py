"""Execute one work unit: every stage of every test, prefix-cached and scored on the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from saliencycheck.atomic import atomic_write
from saliencycheck.complexity import entropy_rise, histogram_entropy
from saliencycheck.config import ENTROPY_RISE
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
from saliencycheck.errors import MethodError
from saliencycheck.invariance import compensated, compensation_failure, pixel_shift
from saliencycheck.label_training import LabelModels
from saliencycheck.methods.baselines import make_baseline
from saliencycheck.metrics import ReferenceScorer, Scores
from saliencycheck.postprocess import absolute, reduce_channels, sobel_magnitude
from saliencycheck.randomization import RandomizedModels, Stage, block_seed, logit_change
from saliencycheck.results import ScoreRow, StageObservation
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import (
    EDGE_STAGE,
    ENTROPY_TEST,
    FLOOR_STAGE,
    INVARIANCE_STAGE,
    INVARIANCE_TEST,
    LABEL_TEST,
    LOGIT_STAGE,
    LOGIT_TEST,
    SMOOTH_TEST,
    TRAINED,
    RunSetup,
)
from saliencycheck.runner.store import UnitResult
from saliencycheck.verdicts import (
    COMPLETENESS_METRIC,
    COMPLETENESS_TEST,
    EDGE_TEST,
    ENTROPY,
    FLOOR_TEST,
)

ProgressCallback = Callable[[float, str], None]  # (steps advanced, description)
REPEAT_SEED_STEP = 1000  # repeat r randomizes with runtime.seed + 1000·r (the floor: +1, +2)
CUMULATIVE_TESTS = ("cascading", SMOOTH_TEST)  # each stage adds blocks to the last one's
UNCHANGED_LOGITS = 1e-7  # relative L2 change of the logits at or below which a stage is flagged
UNCHANGED_NOTE = ("logits unchanged by this stage: the randomized block does not reach the "
                  "output, so the score says nothing about the method")


def floor_seeds(seed: int, repeats: int) -> list[tuple[int, int]]:
    """The seeds of the random-network floor's two fully random copies, per repeat."""
    return [(seed + REPEAT_SEED_STEP * r + 1, seed + REPEAT_SEED_STEP * r + 2)
            for r in range(repeats)]


def figure_key(image: str, test: str, method: str) -> str:
    return f"{image}|{test}|{method}"


def compute_targets(setup: RunSetup, ids: list[str], logits: torch.Tensor) -> torch.Tensor:
    target = setup.config.images.target
    if target == "predicted":
        return logits.argmax(dim=1)
    if target == "label":
        return torch.tensor([setup.labels[i] for i in ids], device=logits.device)
    return torch.full((len(ids),), int(target), device=logits.device, dtype=torch.long)


@dataclass(frozen=True)
class _StageRef:
    """A randomization stage of one test (``stage`` None: the trained model)."""

    test: str
    stage: Stage | None
    seed: int | None = None  # a repeat's, or a floor copy's, own seed (None: the run's)
    repeat: int = 0

    @property
    def key(self) -> tuple:
        """Refs with equal keys are the same model state (the draws are per block and seed):
        their maps are computed once (eMPRT's model is the cascade's last stage)."""
        blocks = frozenset(self.stage.blocks) if self.stage else frozenset()
        return blocks, self.seed

    @property
    def modules(self) -> tuple[str, ...]:
        """The module paths this stage randomizes (for the prefix cache)."""
        if self.stage is None:
            return ()
        return tuple(chain.from_iterable(b.module_names for b in self.stage.randomized_blocks))


class UnitExecutor:
    """Runs units against one model; owns the single working copy used for randomization.

    Per unit: the logits of every stage (one prefix-cached forward each), then the images in
    groups whose rows fill one pass, each group pushed through the trained model and every
    stage of every test in turn (:func:`~saliencycheck.engine.passes.run_staged`), so the
    layers a stage leaves trained are not recomputed; each group's maps are scored at once.
    """

    def __init__(self, setup: RunSetup, label_models: LabelModels | None = None) -> None:
        self.setup = setup
        self.label_models = label_models
        self._label_note = ("" if label_models is None or label_models.valid
                            else f"invalid test: {label_models.reason}")
        self.randomized = RandomizedModels(setup.model)
        tests = setup.config.tests
        self._options = dict(init=tests.init, std=tests.init_std,
                             reset_running_stats=tests.reset_running_stats,
                             seed=setup.config.runtime.seed)
        for stages in setup.stages.values():
            self.randomized.check(stages)
        seed, runtime_repeats = setup.config.runtime.seed, setup.config.runtime.repeats
        self.stages = [_StageRef(test, stage, seed=seed + REPEAT_SEED_STEP * r if r else None,
                                 repeat=r)
                       for r in range(runtime_repeats)
                       for test, stages in setup.stages.items() for stage in stages]
        # sMPRT's stages run on noisy copies of the images, in passes of their own
        self.pass_refs = [ref for ref in self.stages if ref.test != SMOOTH_TEST]
        self.smooth_refs = [ref for ref in self.stages if ref.test == SMOOTH_TEST]
        self.floor_refs = [_StageRef(FLOOR_TEST, setup.floor_stage, seed=k, repeat=r)
                           for r, pair in enumerate(floor_seeds(seed, runtime_repeats))
                           for k in pair] if setup.floor_stage else []
        # The stage logits (stages.csv, and the explained class with 'recompute') come from a
        # no-grad forward of their own only where the passes cannot give them: with
        # 'recompute' they are needed before the passes, in reduced precision they would
        # differ from the fp32 logits, and sMPRT's passes see noisy images.
        runtime = setup.config.runtime
        # With 'recompute' the floor's copies explain their own top class too.
        self.recompute = tests.target_on_randomized == "recompute"
        self.logits_from_passes = not self.recompute and runtime.precision == "fp32"
        self.forward_refs = (self.smooth_refs if self.logits_from_passes else self.stages) \
            + (self.floor_refs if self.recompute else [])
        self._trace: CallTrace | None = None

    def _enter(self, ref: _StageRef | None) -> nn.Module:
        options = self._options if ref is None or ref.seed is None \
            else {**self._options, "seed": ref.seed}
        return self.randomized.enter(ref.stage if ref else None, **options)

    def prefix_trace(self, example: torch.Tensor) -> CallTrace | None:
        if not self.setup.config.runtime.prefix_cache:
            return None
        if self._trace is None:
            self._trace = trace_calls(self._enter(None), example)
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
        ids = [r.id for r in records]
        inputs = torch.stack([r.tensor for r in records]).to(setup.device)
        trace = self.prefix_trace(inputs[:1])
        try:
            logits, forward_logits = self._logits(inputs, trace, self.forward_refs)
            targets = compute_targets(setup, ids, logits)
            observed = {ref: (logits, z) for ref, z in zip(self.forward_refs, forward_logits)}
            explained = [observed[ref][1].argmax(dim=1) if self.recompute else targets
                         for ref in self.stages]
            pass_explained = [e for ref, e in zip(self.stages, explained)
                              if ref.test != SMOOTH_TEST]
            pass_explained += [observed[ref][1].argmax(dim=1) if self.recompute else targets
                               for ref in self.floor_refs]
            raw_maps: dict[str, dict[str, np.ndarray]] = {i: {} for i in ids}
            pass_logits: list[list[Tensor | None]] = []  # per group: trained, then pass_refs
            for group in self.groups(inputs, targets):
                share = setup.pass_steps * (group.stop - group.start) / len(ids)
                group_explained = [e[group] for e in pass_explained]
                maps, kept = self.group_maps(
                    inputs[group], [targets[group], *group_explained], trace,
                    lambda done, g=group, share=share: progress(
                        done * share, f"{unit.id}: images {g.start + 1}–{g.stop} of {len(ids)}"))
                pass_logits.append(kept[:1 + len(self.pass_refs)])
                passes = len(self.pass_refs)
                floor_maps, floor_explained = maps[1 + passes:], group_explained[passes:]
                maps, group_explained = maps[:1 + passes], group_explained[:passes]
                scorers = {label: ReferenceScorer(trained, setup.config.metrics, setup.post)
                           for label, trained in maps[0].items()}
                self._score_group(result, raw_maps, ids[group], targets[group],
                                  group_explained, maps, scorers)
                pairs = zip(floor_maps[::2], floor_maps[1::2], floor_explained[::2])
                for repeat, (first, second, explained_first) in enumerate(pairs):
                    self._score_floor(result, ids[group], targets[group], [first, second],
                                      explained_first, repeat)
                if setup.config.tests.random_logit.enabled:
                    self._score_random_logit(result, raw_maps, ids[group], inputs[group],
                                             targets[group], logits.shape[1], scorers)
                    progress((group.stop - group.start) / len(ids), f"{unit.id}: random logit")
                if setup.config.tests.input_invariance.enabled:
                    self._score_input_invariance(result, raw_maps, ids[group], inputs[group],
                                                 targets[group], logits[group], scorers)
                    progress((group.stop - group.start) / len(ids),
                             f"{unit.id}: input invariance")
                if setup.config.tests.completeness.enabled:
                    self._score_completeness(result, ids[group], inputs[group], targets[group],
                                             maps[0])
                if setup.config.baselines.edges:
                    self._score_edges(result, ids[group], inputs[group], targets[group],
                                      scorers)
                if self.label_models is not None:
                    self._score_label_models(result, raw_maps, ids[group], inputs[group],
                                             targets[group], scorers)
                    progress(len(self.label_models.models) * (group.stop - group.start)
                             / len(ids), f"{unit.id}: label randomization")
            if self.smooth_refs:
                self._score_smooth(result, raw_maps, ids, inputs, targets,
                                   [e for ref, e in zip(self.stages, explained)
                                    if ref.test == SMOOTH_TEST], trace,
                                   lambda done, text: progress(done, f"{unit.id}: {text}"))
            if self.logits_from_passes:
                observed.update(self._pass_logits(inputs, trace, pass_logits))
            self._observe_stages(result, [(ref, *observed[ref]) for ref in self.stages])
        finally:
            self._enter(None)
        if setup.config.output.save_maps:
            result.files = self._save_raw_maps(raw_maps)
        return result

    def _pass_logits(self, inputs: torch.Tensor, trace: CallTrace | None,
                     groups: list[list[Tensor | None]]
                     ) -> dict[_StageRef, tuple[Tensor, Tensor]]:
        """(trained, stage) logits of every pass stage, as the passes computed them, each
        group's rows in order; both from the passes, so a stage that changes nothing shows
        exactly no change. A no-grad forward where no method's passes read the images."""
        stacked = [torch.cat(parts) if all(p is not None for p in parts) else None
                   for parts in zip(*groups)]
        trained, stages = stacked[0], stacked[1:]
        if trained is None:
            trained, stages = self._logits(inputs, trace, self.pass_refs)
        return {ref: (trained, z) for ref, z in zip(self.pass_refs, stages)}

    def _observe_stages(self, result: UnitResult,
                        observed: list[tuple[_StageRef, Tensor, Tensor]]) -> None:
        """How far each stage moved the logits (stored, pooled into stages.csv), from
        (stage, trained logits, stage logits) in :attr:`stages` order; rows of stages that
        moved none get :data:`UNCHANGED_NOTE`."""
        unchanged = set()
        previous: dict[tuple[str, int], torch.Tensor] = {}  # per (test, repeat)
        for ref, logits, z in observed:
            n = len(logits)
            change = logit_change(logits, z)  # means over this unit's images
            # what this stage itself randomized: cumulative tests add to the last stage
            before = previous.get((ref.test, ref.repeat), logits) \
                if ref.test in CUMULATIVE_TESTS else logits
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
                refs: list[_StageRef]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The trained logits and those of each of ``refs``; a stage runs only the modules at
        and after its first randomized one."""
        model = self._enter(None)
        prefixes = [prefix_modules(trace, ref.modules) if trace else () for ref in refs]
        cache = PrefixCache(model, chain.from_iterable(prefixes),
                            modifiers=trace.modifiers if trace else None)
        with torch.no_grad():
            with cache.record() as recorded:
                logits = model(inputs)
            stage_logits = []
            for ref, prefix in zip(refs, prefixes):
                self._enter(ref)
                with cache.stub(prefix, recorded, grad=False):
                    stage_logits.append(model(inputs))
        self._enter(None)
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
                    rows.setdefault(request.family, {})[request.source.key] = \
                        request.source.count
        unit_rows = max((sum(keys.values()) for keys in rows.values()), default=len(inputs))
        size = max(1, setup.context.chunk_size * len(inputs) // (unit_rows * copies))
        return [slice(start, min(start + size, len(inputs)))
                for start in range(0, len(inputs), size)]

    def group_maps(self, inputs: torch.Tensor, targets: list[torch.Tensor],
                   trace: CallTrace | None, progress: Callable[[float], None],
                   refs: list[_StageRef | None] | None = None
                   ) -> tuple[list[dict[str, Tensor]], list[Tensor | None]]:
        """Raw maps of every method for each of ``refs`` (None: the trained model), explaining
        ``targets`` (one per ref), and each ref's logits of the images as the passes computed
        them (None where no pass read the images). By default the refs are the trained model,
        every stage of the shared passes and the floor's random copies (last, in pairs per
        repeat). Refs of one model state (:attr:`_StageRef.key`) with equal targets are
        computed once."""
        setup = self.setup
        if refs is None:
            refs = [None, *self.pass_refs, *self.floor_refs]
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
        run_staged([StageRequests(enter=partial(self._enter, refs[index]),
                                  requests=[r for plan in stage_plans.values()
                                            for r in plan.requests],
                                  randomized=refs[index].modules if refs[index] else (),
                                  logits=logits)
                    for index, stage_plans, logits in zip(firsts, plans, kept)],
                   setup.context, trace, progress=progress)
        maps = []
        for index, stage_plans in zip(firsts, plans):
            model = self._enter(refs[index])
            maps.append({m.label: stage_plans[m.label].finish() if m.label in stage_plans
                         else m(model, inputs, targets[index], setup.context)
                         for m in setup.methods})
        return [maps[slot] for slot in slots], [kept[slot].value for slot in slots]

    def _score_group(self, result: UnitResult, raw_maps: dict[str, dict[str, np.ndarray]],
                     ids: list[str], targets: torch.Tensor, explained: list[torch.Tensor],
                     maps: list[dict[str, torch.Tensor]],
                     scorers: dict[str, ReferenceScorer]) -> None:
        setup = self.setup
        identical = {label: scorer.score(maps[0][label]) for label, scorer in scorers.items()}
        for test in setup.stage_names:
            if test not in (SMOOTH_TEST, ENTROPY_TEST):  # they score their own trained maps
                self._record(result, raw_maps, test, 0, TRAINED, ids, targets, targets,
                             maps[0], identical)
        entropy = {}
        for ref, stage_explained, stage_maps in zip(self.pass_refs, explained, maps[1:]):
            if ref.test == ENTROPY_TEST:
                if not entropy:
                    entropy = self._entropies(maps[0])
                    self._record(result, raw_maps, ENTROPY_TEST, 0, TRAINED, ids, targets,
                                 targets, maps[0], {label: {ENTROPY: Scores(
                                     h, ("",) * len(ids))} for label, h in entropy.items()})
                randomized = self._entropies(stage_maps)
                scores = {label: {ENTROPY: Scores(h, ("",) * len(ids)),
                                  ENTROPY_RISE: entropy_rise(entropy[label], h)}
                          for label, h in randomized.items()}
            else:
                scores = {label: scorers[label].score(candidate)
                          for label, candidate in stage_maps.items()}
            self._record(result, raw_maps, ref.test, ref.stage.index, ref.stage.name, ids,
                         targets, stage_explained, stage_maps, scores, repeat=ref.repeat)

    def _entropies(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """eMPRT's complexity of each map: histogram entropy of its channel-reduced values."""
        setup = self.setup
        return {label: histogram_entropy(reduce_channels(m, setup.post.abs_reduction),
                                         setup.config.tests.entropy_mprt.bins)
                for label, m in maps.items()}

    def _score_smooth(self, result: UnitResult, raw_maps: dict[str, dict[str, np.ndarray]],
                      ids: list[str], inputs: torch.Tensor, targets: torch.Tensor,
                      explained: list[torch.Tensor], trace: CallTrace | None,
                      progress: ProgressCallback) -> None:
        """sMPRT: every model's maps averaged over noisy copies of each image (the last copy
        noise-free), then scored like the cascading test; images in groups whose copies fill
        one pass."""
        setup = self.setup
        copies = setup.config.tests.smooth_mprt.samples
        refs: list[_StageRef | None] = [None, *self.smooth_refs]
        for group in self.groups(inputs, targets, copies=copies):
            count = group.stop - group.start
            noisy = self._noisy_copies(ids[group], inputs[group])
            stage_targets = [t[group].repeat_interleave(copies)
                             for t in (targets, *explained)]
            maps, _ = self.group_maps(noisy, stage_targets, trace, lambda done, n=count: progress(
                done * setup.smooth_steps * n / len(ids), "smooth MPRT"), refs=refs)
            smoothed = [{label: m.view(count, copies, *m.shape[1:]).mean(dim=1)
                         for label, m in stage.items()} for stage in maps]
            scorers = {label: ReferenceScorer(trained, setup.config.metrics, setup.post)
                       for label, trained in smoothed[0].items()}
            self._record(result, raw_maps, SMOOTH_TEST, 0, TRAINED, ids[group], targets[group],
                         targets[group], smoothed[0],
                         {label: scorer.score(smoothed[0][label])
                          for label, scorer in scorers.items()})
            for ref, stage_explained, stage_maps in zip(self.smooth_refs, explained,
                                                        smoothed[1:]):
                scores = {label: scorers[label].score(candidate)
                          for label, candidate in stage_maps.items()}
                self._record(result, raw_maps, SMOOTH_TEST, ref.stage.index, ref.stage.name,
                             ids[group], targets[group], stage_explained[group], stage_maps,
                             scores, repeat=ref.repeat)

    def _noisy_copies(self, ids: list[str], inputs: torch.Tensor) -> torch.Tensor:
        """sMPRT's copies of each image, (N·copies, C, H, W): Gaussian noise of std ``noise``
        × the image's range, drawn from a generator seeded by the run's seed and the image id
        (batching cannot change it); each image's last copy is the image itself."""
        section = self.setup.config.tests.smooth_mprt
        rows = []
        for image, x in zip(ids, inputs):
            generator = torch.Generator().manual_seed(
                block_seed(self.setup.config.runtime.seed, f"{SMOOTH_TEST}/{image}"))
            noise = torch.randn((section.samples - 1, *x.shape), generator=generator)
            sigma = section.noise * float(x.max() - x.min())
            rows += [x + sigma * noise.to(x.device, x.dtype), x[None]]
        return torch.cat(rows)

    def _score_input_invariance(self, result: UnitResult,
                                raw_maps: dict[str, dict[str, np.ndarray]], ids: list[str],
                                inputs: torch.Tensor, targets: torch.Tensor,
                                logits: torch.Tensor, scorers: dict[str, ReferenceScorer]
                                ) -> None:
        """Maps of the shifted input on the model whose first layer undoes the shift, against
        the trained maps; how far the logits moved is stored (they must not)."""
        setup = self.setup
        shift = pixel_shift(setup.config.tests.input_invariance.shift,
                            setup.preprocessing.std, inputs)
        shifted = inputs + shift
        with compensated(self._enter(None), setup.invariance_layer, shift) as model:
            with torch.no_grad():
                moved = model(shifted)
            maps = compute_maps(setup.methods, model, shifted, targets, setup.context)
        change = logit_change(logits, moved)
        result.stages.append(StageObservation(
            test=INVARIANCE_TEST, stage_index=1, n=len(ids),
            relative_l2_sum=change["relative_l2"] * len(ids),
            top1_agreement_sum=change["top1_agreement"] * len(ids)))
        scores = {label: scorers[label].score(candidate) for label, candidate in maps.items()}
        failure = compensation_failure(change["relative_l2"])
        self._record(result, raw_maps, INVARIANCE_TEST, 1, INVARIANCE_STAGE, ids, targets,
                     targets, maps, scores, note=failure and f"invalid test: {failure}")

    def _score_floor(self, result: UnitResult, ids: list[str], targets: torch.Tensor,
                     copies: list[dict[str, torch.Tensor]], explained: torch.Tensor,
                     repeat: int) -> None:
        """The random-network floor: one fully random copy's maps against the other's (one
        pair of copies per repeat; ``explained``: the first copy's class, which differs from
        the target only with 'recompute', where each copy explains its own top class)."""
        first, second = copies
        scores = {label: ReferenceScorer(first[label], self.setup.config.metrics,
                                         self.setup.post).score(second[label])
                  for label in first}
        self._record(result, {}, FLOOR_TEST, 1, FLOOR_STAGE, ids, targets, explained, {},
                     scores, repeat=repeat)

    def _score_edges(self, result: UnitResult, ids: list[str], inputs: torch.Tensor,
                     targets: torch.Tensor, scorers: dict[str, ReferenceScorer]) -> None:
        """The edge-detector baseline: trained maps against the input's Sobel magnitude."""
        edges = sobel_magnitude(inputs)
        scores = {}
        for label, scorer in scorers.items():
            channels = scorer.shape[1]  # spread over the map's channels: the views sum them
            scores[label] = scorer.score(edges.expand(-1, channels, -1, -1) / channels)
        self._record(result, {}, EDGE_TEST, 1, EDGE_STAGE, ids, targets, targets, {}, scores)

    def _score_random_logit(self, result: UnitResult,
                            raw_maps: dict[str, dict[str, np.ndarray]], ids: list[str],
                            inputs: torch.Tensor, targets: torch.Tensor, classes: int,
                            scorers: dict[str, ReferenceScorer]) -> None:
        """Maps for a random other class (drawn per image from a generator seeded by the
        repeat's seed and the image id, so batching cannot change it) against the explained
        class's; one draw per ``runtime.repeats`` (seeds seed, seed+1000, ...)."""
        setup = self.setup
        if classes < 2:
            raise MethodError("random_logit: the model has one output; there is no other "
                              "class to explain")
        model = self._enter(None)
        for repeat in range(setup.config.runtime.repeats):
            seed = setup.config.runtime.seed + REPEAT_SEED_STEP * repeat
            shifts = [int(torch.randint(1, classes, (1,), generator=torch.Generator()
                                        .manual_seed(block_seed(seed, image)))) for image in ids]
            others = (targets + torch.tensor(shifts, device=targets.device)) % classes
            maps = compute_maps(setup.methods, model, inputs, others, setup.context)
            scores = {label: scorers[label].score(candidate) for label, candidate in maps.items()}
            self._record(result, raw_maps, LOGIT_TEST, 1, LOGIT_STAGE, ids, targets, others,
                         maps, scores, repeat=repeat)

    def _score_completeness(self, result: UnitResult, ids: list[str], inputs: torch.Tensor,
                            targets: torch.Tensor, trained: dict[str, torch.Tensor]) -> None:
        """Relative error of Σ attributions against f(x) − f(baseline), per image, for
        integrated gradients (its own baseline) and gradient × input (baseline 0)."""
        setup = self.setup
        model = self._enter(None)
        scores = {}
        for method in setup.methods:
            if method.name == "integrated_gradients":
                baseline = make_baseline(method.params.baseline, inputs, setup.context,
                                         blur_sigma=method.params.blur_sigma)
            elif method.name == "gradient_x_input":
                baseline = torch.zeros_like(inputs)
            else:
                continue
            with torch.no_grad():
                logits = model(inputs)
                gap = (logits - model(baseline)).gather(1, targets[:, None])[:, 0]
            total = trained[method.label].flatten(1).sum(dim=1)
            error = (total - gap).abs() / gap.abs()
            flat = gap.abs() <= 1e-12 * (1 + logits.abs().amax())
            error = torch.where(flat, torch.full_like(error, float("nan")), error)
            scores[method.label] = {COMPLETENESS_METRIC: Scores(error.double(), tuple(
                "f(x) = f(baseline): no gap to complete" if f else "" for f in flat.tolist()))}
        if scores:
            self._record(result, {}, COMPLETENESS_TEST, 0, TRAINED, ids, targets, targets, {},
                         scores)

    def _score_label_models(self, result: UnitResult,
                            raw_maps: dict[str, dict[str, np.ndarray]], ids: list[str],
                            inputs: torch.Tensor, targets: torch.Tensor,
                            scorers: dict[str, ReferenceScorer]) -> None:
        """Maps of the random-label model (and the control) scored against the trained maps."""
        setup, labels = self.setup, self.label_models
        for index, role in enumerate(setup.label_stages, start=1):
            model = labels.models[role]
            explained = targets
            if setup.config.tests.target_on_randomized == "recompute":
                with torch.no_grad():
                    explained = model(inputs).argmax(dim=1)
            maps = compute_maps(setup.methods, model, inputs, explained, setup.context)
            scores = {label: scorers[label].score(candidate) for label, candidate in maps.items()}
            self._record(result, raw_maps, LABEL_TEST, index, role, ids, targets, explained,
                         maps, scores)

    def _record(self, result: UnitResult, raw_maps: dict[str, dict[str, np.ndarray]],
                test: str, stage_index: int, stage_name: str, ids: list[str],
                targets: torch.Tensor, explained: torch.Tensor,
                maps: dict[str, torch.Tensor], scores: dict[str, dict[str, Scores]],
                repeat: int = 0, note: str = "") -> None:
        setup = self.setup
        note = self._label_note if test == LABEL_TEST else note
        target_list, explained_list = targets.tolist(), explained.tolist()
        for method, method_scores in scores.items():
            for metric, score in method_scores.items():
                values = score.values.tolist()
                for i, image in enumerate(ids):
                    result.rows.append(ScoreRow(
                        image=image, target=target_list[i], target_explained=explained_list[i],
                        method=method, test=test, stage_index=stage_index, stage=stage_name,
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

