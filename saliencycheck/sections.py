"""The building blocks of every config section, below both the config and the checks.

Each sanity test declares its own YAML section in its module (``saliencycheck.checks``), and
``saliencycheck.config`` assembles the sections into the whole config; both build on these
pieces, which import neither.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from saliencycheck.complexity import ENTROPY_RISE
from saliencycheck.metrics import METRICS
from saliencycheck.results import COSINE_SIMILARITY

# Upper bounds that catch a typo (an extra zero) before hours of compute; generous for real use.
MAX_SAMPLES = 10_000  # noisy copies per image (SmoothGrad, VarGrad, sMPRT)
MAX_STEPS = 10_000  # integration steps per image
Granularity = Literal["block", "layer"]
Order = Literal["top_down", "bottom_up"]


def at_most(value: int, limit: int, *, typical: str) -> int:
    """``value`` when it is at most ``limit``; else a ValueError naming the limit and the
    typical values (an upper bound catches a typo such as an extra zero before hours of work)."""
    if value > limit:
        raise ValueError(f"{value:,} is too many: at most {limit:,} ({typical})")
    return value


class Section(BaseModel):
    """Base of every section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(Section):
    """When a method passes a test: its score at one stage must stay low (randomization
    tests) or high (input invariance, entropy rise) enough."""

    metric: Literal[(*METRICS, ENTROPY_RISE, COSINE_SIMILARITY)] = Field(  # type: ignore[valid-type]
        description="The metric judged (must be listed in metrics; entropy_mprt: entropy_rise; "
        "csc: cosine_similarity)."
    )
    stage: Literal["final"] | Annotated[int, Field(ge=1)] | str = Field(
        "final",
        description="'final' (the last stage; for label_randomization the random-label model), "
        "a stage index, or a stage name (a block, e.g. layer4).",
    )
    max: float | None = Field(
        None, description="Pass if the upper confidence bound of the mean similarity is ≤ max."
    )
    max_above_floor: float | None = Field(
        None, description="Or pass if that bound is ≤ the random-network floor + this margin "
        "(needs baselines.random_floor; cascading, independent, label_randomization and "
        "random_logit only)."
    )
    max_above_control: float | None = Field(
        None, description="Or pass if that bound is ≤ the random-map control's mean at the same "
        "stage + this margin (needs baselines.random_map; cascading and independent only)."
    )
    min: float | None = Field(
        None, description="Or pass if the lower confidence bound of the mean is ≥ min (for "
        "scores that must stay high: input_invariance, entropy_mprt)."
    )

    @model_validator(mode="after")
    def _has_bound(self) -> Threshold:
        if sum(bound is not None for bound in (self.max, self.max_above_floor,
                                               self.max_above_control, self.min)) != 1:
            raise ValueError("give one of max: (the highest similarity a passing method may "
                             "keep), max_above_floor: (a margin above the random-network "
                             "floor), max_above_control: (a margin above the random-map "
                             "control) or min: (the lowest score that passes)")
        return self
