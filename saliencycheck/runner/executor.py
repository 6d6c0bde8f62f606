"""Execute one work unit: trained maps once, then every stage of every test, scored on device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saliencycheck.data import load_images
from saliencycheck.methods.passes import compute_maps
from saliencycheck.metrics import score_maps
from saliencycheck.postprocess import absolute
from saliencycheck.randomization import RandomizedModels, logit_change
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import RunSetup
from saliencycheck.runner.store import ScoreRow, StageObservation, UnitResult

TRAINED = "trained"
ProgressCallback = Callable[[int, str], None]  # (steps advanced, description)


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
    """Runs units against one model; owns the single working copy used for randomization."""

    def __init__(self, setup: RunSetup) -> None:
        self.setup = setup
        self.randomized = RandomizedModels(setup.model)

    def run(self, unit: WorkUnit, progress: ProgressCallback) -> UnitResult:
        setup = self.setup
        records, skipped = load_images([setup.images[i] for i in unit.image_indices],
                                       setup.preprocessing)
        result = UnitResult(unit_id=unit.id, skipped=[(str(s.path), s.reason) for s in skipped])
        if not records:
            progress(setup.steps_per_unit, f"{unit.id}: unreadable")
            return result
        ids = [r.id for r in records]
        inputs = torch.stack([r.tensor for r in records]).to(setup.device)
        raw_maps: dict[str, dict[str, np.ndarray]] = {i: {} for i in ids}

        with torch.inference_mode():
            logits = setup.model(inputs)
        targets = compute_targets(setup, ids, logits)
        trained = compute_maps(setup.methods, setup.model, inputs, targets, setup.context)
        progress(1, f"{unit.id}: trained model")

        for test, stages in setup.stages.items():
            self._score_stage(result, raw_maps, test, 0, TRAINED, ids, targets, targets,
                              trained, trained)
            tests = setup.config.tests
            models = self.randomized.stage_models(
                stages, init=tests.init, std=tests.init_std,
                reset_running_stats=tests.reset_running_stats, seed=setup.config.runtime.seed)
            for stage, model in models:
                with torch.inference_mode():
                    stage_logits = model(inputs)
                explained = (stage_logits.argmax(dim=1)
                             if tests.target_on_randomized == "recompute" else targets)
                maps = compute_maps(setup.methods, model, inputs, explained, setup.context)
                change = logit_change(logits, stage_logits)  # means over this unit's images
                result.stages.append(StageObservation(
                    test=test, stage_index=stage.index, n=len(ids),
                    relative_l2_sum=change["relative_l2"] * len(ids),
                    top1_agreement_sum=change["top1_agreement"] * len(ids)))
                self._score_stage(result, raw_maps, test, stage.index, stage.name, ids, targets,
                                  explained, trained, maps)
                progress(1, f"{unit.id}: {test} {stage.name}")

        if setup.config.output.save_maps:
            self._save_raw_maps(raw_maps)
        return result

    def _score_stage(self, result: UnitResult, raw_maps: dict[str, dict[str, np.ndarray]],
                     test: str, stage_index: int, stage_name: str, ids: list[str],
                     targets: torch.Tensor, explained: torch.Tensor,
                     reference: dict[str, torch.Tensor], maps: dict[str, torch.Tensor]) -> None:
        setup = self.setup
        target_list, explained_list = targets.tolist(), explained.tolist()
        for method, candidate in maps.items():
            scores = score_maps(reference[method], candidate, setup.config.metrics, setup.post)
            for metric, score in scores.items():
                values = score.values.tolist()
                for i, image in enumerate(ids):
                    result.rows.append(ScoreRow(
                        image=image, target=target_list[i], target_explained=explained_list[i],
                        method=method, test=test, stage_index=stage_index, stage=stage_name,
                        metric=metric, value=float(values[i]), note=score.reasons[i]))
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

    def _save_raw_maps(self, raw_maps: dict[str, dict[str, np.ndarray]]) -> None:
        folder = self.setup.output_dir / "maps"
        folder.mkdir(parents=True, exist_ok=True)
        for image, arrays in raw_maps.items():
            path = folder / (safe_name(image) + ".npz")
            np.savez_compressed(path, **arrays)


def safe_name(image_id: str) -> str:
    """A file-system-safe name for an image id (sub-folders flattened)."""
    return Path(image_id).with_suffix("").as_posix().replace("/", "__")
