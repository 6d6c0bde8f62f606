"""Smooth MPRT (sMPRT, Hedström et al. 2023): the cascade, on maps averaged over noisy inputs.

Gradient-based maps are noisy enough that their similarity after randomization partly measures
the noise; averaging each model's maps over noisy copies of the input first (the last copy
noise-free) removes it. The copies run in passes of their own, every stage prefix-cached.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from saliencycheck.checks.base import (
    TRAINED,
    Check,
    Engine,
    Unit,
    randomization_plan,
    register_check,
)
from saliencycheck.metrics import ReferenceScorer
from saliencycheck.randomization import Stage, block_seed
from saliencycheck.sections import MAX_SAMPLES, Granularity, Order, Section, at_most


class SmoothMprtConfig(Section):
    enabled: bool = Field(
        False, description="Smooth MPRT (sMPRT, Hedström et al. 2023): cascading "
        "randomization with every map averaged over noisy copies of the input first.",
    )
    samples: int = Field(50, ge=2, description="Noisy copies per image; the last is noise-free.")

    @field_validator("samples")
    @classmethod
    def _few_samples(cls, value: int) -> int:
        return at_most(value, MAX_SAMPLES, typical="typical: 50, the authors' value; each copy "
                       "is a pass of every method at every stage")
    noise: float = Field(
        0.1, gt=0, description="Noise standard deviation as a fraction of each image's range "
        "(max - min).",
    )
    granularity: Granularity = Field("block", description="As for cascading.")
    order: Order = Field(
        "bottom_up", description="Order of the cascade (the authors recommend bottom_up)."
    )
    blocks: list[str] | None = Field(
        None, min_length=1,
        description="Randomize only these blocks: names or globs (e.g. ['layer4.*', 'fc']) "
        "matched against the blocks of `granularity` (`saliencycheck validate` lists them), "
        "kept in model order; default: every block.",
    )


@register_check
class SmoothMprt(Check):
    name = "smooth_mprt"
    title = "smooth MPRT (maps averaged over noisy copies)"
    section = SmoothMprtConfig
    description = "Smooth MPRT test."
    randomizes = True
    cumulative = True
    figure = "curves"

    def plan(self, model: nn.Module, example: Tensor, config: Any) -> list[Stage]:
        return randomization_plan(model, example, config.tests.smooth_mprt, test="cascading",
                                  field=f"tests.{self.name}")

    def steps(self, setup: Any) -> float:
        """Each of its models, weighted by the copies (reported by :meth:`score_unit`)."""
        stages = 1 + len(setup.stages[self.name]) * setup.config.runtime.repeats
        return stages * setup.config.tests.smooth_mprt.samples

    def score_unit(self, engine: Engine, unit: Unit) -> None:
        """Every model's maps averaged over noisy copies of each image, then scored like the
        cascading test; images in groups whose copies fill one pass."""
        setup = engine.setup
        copies = setup.config.tests.smooth_mprt.samples
        refs = [ref for ref in unit.explained if ref.test == self.name]
        steps = self.steps(setup)
        for group in engine.groups(unit.inputs, unit.targets, copies=copies):
            count = group.stop - group.start
            ids, targets = unit.ids[group], unit.targets[group]
            noisy = self.noisy_copies(setup, ids, unit.inputs[group])
            stage_targets = [t[group].repeat_interleave(copies)
                             for t in (unit.targets, *(unit.explained[ref] for ref in refs))]
            maps = engine.staged_maps(noisy, stage_targets, [None, *refs], lambda done, n=count:
                                      unit.progress(done * steps * n / len(unit.ids),
                                                    "smooth MPRT"))
            smoothed = [{label: m.view(count, copies, *m.shape[1:]).mean(dim=1)
                         for label, m in stage.items()} for stage in maps]
            scorers = {label: ReferenceScorer(trained, setup.config.metrics, setup.post)
                       for label, trained in smoothed[0].items()}
            engine.record(self.name, 0, TRAINED, ids, targets, targets, smoothed[0],
                          {label: scorer.score(smoothed[0][label])
                           for label, scorer in scorers.items()})
            for ref, stage_maps in zip(refs, smoothed[1:]):
                engine.record(self.name, ref.stage.index, ref.stage.name, ids, targets,
                              unit.explained[ref][group], stage_maps,
                              {label: scorers[label].score(candidate)
                               for label, candidate in stage_maps.items()}, repeat=ref.repeat)

    def noisy_copies(self, setup: Any, ids: list[str], inputs: Tensor) -> Tensor:
        """The copies of each image, (N·copies, C, H, W): Gaussian noise of std ``noise`` ×
        the image's range, drawn from a generator seeded by the run's seed and the image id
        (batching cannot change it); each image's last copy is the image itself."""
        section = setup.config.tests.smooth_mprt
        rows = []
        for image, x in zip(ids, inputs):
            generator = torch.Generator().manual_seed(
                block_seed(setup.config.runtime.seed, f"{self.name}/{image}"))
            noise = torch.randn((section.samples - 1, *x.shape), generator=generator)
            sigma = section.noise * float(x.max() - x.min())
            rows += [x + sigma * noise.to(x.device, x.dtype), x[None]]
        return torch.cat(rows)
