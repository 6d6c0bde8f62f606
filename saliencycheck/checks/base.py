"""The protocol every sanity test and baseline implements, and what the executor hands it.

A check is one class: its YAML section, the model states it randomizes (shared with every
other check's in one set of passes) or the work it does itself per image group, how it scores
(and whether a higher score is better), its terminal table, and its verdict rule. The executor
(``runner/executor.py``) only orchestrates; the CLI tables, ``compare``, the verdicts and the
figures loop over the registry (``saliencycheck.checks``) instead of naming tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel
from rich.table import Table
from torch import Tensor, nn

from saliencycheck.metrics import ReferenceScorer, Scores
from saliencycheck.randomization import (
    Stage,
    block_seed,
    find_blocks,
    plan_stages,
    select_blocks,
)
from saliencycheck.results import RANDOM_MAP, SummaryRow
from saliencycheck.verdicts import Verdict, decide

if TYPE_CHECKING:  # the runner hands its setup in; a check only reads it
    from saliencycheck.runner.setup import RunSetup

TRAINED = "trained"  # stage 0 of every test: the trained model
REPEAT_SEED_STEP = 1000  # repeat r randomizes with runtime.seed + 1000·r (the floor: +1, +2)


@dataclass(frozen=True)
class StageRef:
    """A randomized model state of one check (``stage`` None: the trained model)."""

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


Maps = dict[str, Tensor]  # method label -> raw maps of a batch
ScoreTable = dict[str, dict[str, Scores]]  # method label -> metric -> scores


class Engine(Protocol):
    """What the executor offers a check while it scores one work unit."""

    setup: RunSetup

    def record(self, test: str, stage_index: int, stage: str, ids: list[str], targets: Tensor,
               explained: Tensor, maps: Maps, scores: ScoreTable, *, repeat: int = 0,
               note: str = "") -> None:
        """Store one score row per image × method × metric (and the figure maps)."""

    def maps(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Maps:
        """Every method's raw maps of ``inputs`` on ``model``, explaining ``targets``."""

    def model(self, ref: StageRef | None = None) -> nn.Module:
        """The working copy in the state ``ref`` (None: trained); the next call may change it."""

    def observe(self, test: str, stage_index: int, n: int, change: dict[str, float]) -> None:
        """Record how far a model's logits moved from the trained ones (stages.csv)."""

    def prepared(self, test: str) -> Any:
        """What the check's :meth:`Check.prepare` obtained for the run (None: nothing)."""

    def groups(self, inputs: Tensor, targets: Tensor, *, copies: int = 1) -> list[slice]:
        """Image groups whose rows (``copies`` of each image) fill at most one pass."""

    def staged_maps(self, inputs: Tensor, targets: list[Tensor], refs: list[StageRef | None],
                    progress: Callable[[float], None]) -> list[Maps]:
        """Every method's maps on each of ``refs`` in shared passes (prefix-cached)."""


@dataclass
class Group:
    """One image group of a unit and what the shared passes computed for it."""

    ids: list[str]
    inputs: Tensor
    targets: Tensor  # the class explained on the trained model
    logits: Tensor  # the trained model's
    trained: Maps
    scorers: dict[str, ReferenceScorer]  # against the trained maps, per method
    identity: ScoreTable  # the trained maps scored against themselves (stage 0's row)
    states: list[tuple[StageRef, Tensor, Maps]] = field(default_factory=list)
    # this check's model states in the shared passes: (state, class explained, maps)

    def score(self, maps: Maps) -> ScoreTable:
        """Each method's ``maps`` against its trained maps."""
        return {label: self.scorers[label].score(candidate) for label, candidate in maps.items()}


@dataclass
class Unit:
    """A whole work unit, for checks that run passes of their own after the groups."""

    id: str
    ids: list[str]
    inputs: Tensor
    targets: Tensor
    explained: dict[StageRef, Tensor]  # per model state: the class it explains
    progress: Callable[[float, str], None]


@dataclass(frozen=True)
class View:
    """What a check's terminal table shows: the run's summary and its own details."""

    summary: list[SummaryRow]
    methods: list[str]
    metrics: list[str]
    final: int | None  # the check's judged stage (None: it has no stages)
    validity: dict | None  # the check's validity (label randomization, input invariance)

    def rows(self, test: str, stage_index: int | None = None) -> dict[tuple[str, str], SummaryRow]:
        """``test``'s summary rows by (method, metric), at one stage or any."""
        return {(s.method, s.metric): s for s in self.summary
                if s.test == test and (stage_index is None or s.stage_index == stage_index)}


class Check:
    """One sanity test (under ``tests:``) or baseline (a switch under ``baselines:``).

    A subclass sets the class attributes and overrides the hooks it needs; the defaults are
    those of a test scored like the cascading test.
    """

    name: ClassVar[str]  # the `test` column of every CSV, and its key in the config
    key: ClassVar[str | None] = None  # its config key where it differs from the name
    title: ClassVar[str]  # figures' and tables' title
    section: ClassVar[type[BaseModel] | None] = None  # its YAML section under tests:
    description: ClassVar[str] = ""  # of its key under tests: or baselines:
    baseline: ClassVar[bool] = False  # a switch under baselines:, reference scores only
    default_on: ClassVar[bool] = False  # a baseline's switch default
    optional: ClassVar[bool] = False  # the section is absent (None) unless given
    thresholds: ClassVar[bool] = True  # judged by thresholds.<name>
    judged_metrics: ClassVar[tuple[str, ...] | None] = None  # None: the config's metrics
    against_floor: ClassVar[bool] = False  # scores plain maps: the random floor applies
    higher_is_better: ClassVar[bool] = False  # a rise of its score is an improvement
    shares_passes: ClassVar[bool] = False  # its model states run in the shared passes
    randomizes: ClassVar[bool] = False  # its stages are listed in stages.csv
    cumulative: ClassVar[bool] = False  # each stage adds blocks to the previous one's
    has_validity: ClassVar[bool] = False  # reports whether it could judge (run.json)
    identity_row: ClassVar[bool] = False  # stores stage 0: the trained maps against themselves
    figure: ClassVar[str | None] = None  # 'curves' (a sequence of stages) or 'bars'
    ylabel: ClassVar[str] = "similarity to trained map"

    # -- configuration ------------------------------------------------------------------
    @property
    def config_key(self) -> str:
        """Its key under tests: (or baselines:)."""
        return self.key or self.name

    def settings(self, config: Any) -> Any:
        """This check's section of ``config`` (a bool for a baseline)."""
        return getattr(config.baselines if self.baseline else config.tests, self.config_key)

    def enabled(self, config: Any) -> bool:
        section = self.settings(config)
        if self.baseline or section is None:
            return bool(section)
        return bool(getattr(section, "enabled", True))

    def validate(self, config: Any) -> None:
        """Rules across sections, raised as ValueError (the config names no field)."""

    def metrics(self, config: Any) -> list[str]:
        """The metrics its scores are reported in."""
        return list(self.judged_metrics or config.metrics)

    # -- planning -------------------------------------------------------------------------
    def plan(self, model: nn.Module, example: Tensor, config: Any) -> Any:
        """What the run fixes once for this check (its stages; a layer), or None."""
        return None

    def stages(self, plan: Any) -> list[Stage]:
        """The randomized model states of ``plan`` (stages.csv, the passes)."""
        return list(plan) if self.randomizes else []

    def stage_names(self, setup: RunSetup) -> list[str] | None:
        """Its stage names, the trained model first (None: no stages to judge)."""
        if not self.randomizes:
            return None
        return [TRAINED] + [s.name for s in setup.stages[self.name]]

    def final_stage(self, names: list[str]) -> int:
        """The stage judged as 'final'."""
        return len(names) - 1

    def refs(self, setup: RunSetup) -> list[StageRef]:
        """Its model states, each repeat's with its own seed."""
        seed = setup.config.runtime.seed
        return [StageRef(self.name, stage, seed=seed + REPEAT_SEED_STEP * r if r else None,
                         repeat=r)
                for r in range(setup.config.runtime.repeats) for stage in self.stages(
                    setup.plans[self.name])]

    def steps(self, setup: RunSetup) -> float:
        """Progress steps of its own passes per unit (per image group, pro rata)."""
        return 0

    def prepare(self, setup: RunSetup, example: Callable[[], Tensor], *, retrain: bool,
                progress: Callable[[str], None]) -> Any:
        """What the run obtains once before the units (label randomization's models; None:
        nothing); ``example()`` is the run's first readable image, a batch of one."""
        return None

    def written(self, setup: RunSetup, prepared: Any) -> list[Path]:
        """Files :meth:`prepare` wrote into the output folder (recorded as saliencycheck's)."""
        return []

    def prepared_json(self, prepared: Any) -> Any:
        """What :meth:`prepare` obtained, for the store and run.json."""
        return None

    def to_device(self, prepared: Any, device: str) -> Any:
        """:meth:`prepare`'s result on ``device`` (a worker's copy)."""
        return prepared

    # -- scoring --------------------------------------------------------------------------
    def score(self, engine: Engine, group: Group) -> None:
        """Score one image group: by default each model state's maps against the trained."""
        if self.identity_row:
            engine.record(self.name, 0, TRAINED, group.ids, group.targets, group.targets,
                          group.trained, group.identity)
        for ref, explained, maps in group.states:
            engine.record(self.name, ref.stage.index, ref.stage.name, group.ids,
                          group.targets, explained, maps, group.score(maps), repeat=ref.repeat)

    def score_unit(self, engine: Engine, unit: Unit) -> None:
        """Work on the whole unit after its groups (passes of its own)."""

    # -- judging and showing --------------------------------------------------------------
    def validity(self, setup: RunSetup, context: dict, observations: list) -> dict | None:
        """Whether the test could judge anything (None: always; else ``valid``, ``reason``)."""
        return None

    def verdicts(self, summary: list[SummaryRow], setup: RunSetup, *, invalid: str = "",
                 level: float) -> list[Verdict]:
        """Its verdicts: by default its threshold's (thresholds.<name>), if set."""
        threshold = setup.config.thresholds.get(self.name)
        if threshold is None:
            return []
        return decide(summary, {self.name: threshold}, methods=[m.label for m in setup.methods],
                      stage_names=setup.stage_names, final_stage=setup.final_stage,
                      invalid_tests={self.name: invalid} if invalid else None, level=level,
                      floor_tests=(self.name,) if self.against_floor else ())

    def direction(self, metric: str, stage: str) -> int:
        """For ``compare``: +1 when a rise of the score is a regression, −1 a fall, 0 none."""
        return -1 if self.higher_is_better else 1

    def compares_trained(self) -> bool:
        """Whether ``compare`` reads stage 0 (scores of the trained model alone)."""
        return False

    def table(self, view: View) -> Table | None:
        """Its terminal table: similarity at the final stage, with Δ above the floor."""
        if view.final is None:
            return None
        rows = view.rows(self.name, view.final)
        shows_floor = any(not math.isnan(s.floor) for s in rows.values())
        return method_table(view, f"{self.name}: similarity to the trained model's maps at the "
                            f"final stage ({view.final}), mean over images"
                            + ("; Δ: above the random-network floor" if shows_floor else ""),
                            floor_cell(rows))


def image_places(setup: RunSetup, ids: list[str]) -> list[int]:
    """Each image's place in the run's image list: what per-image random draws are seeded
    by, so that no grouping, shard or resume changes them, and files or tensors alike."""
    wanted = set(ids)
    places = {ref.id: i for i, ref in enumerate(setup.images) if ref.id in wanted}
    return [places[image] for image in ids]


def seeded_per_image(places: list[int], key: Callable[[int], str], shape: tuple[int, ...], *,
                     seed: int, device: Any, draw: Callable[..., Tensor]) -> Tensor:
    """(len(places), *shape): row i drawn by ``draw`` (``torch.rand``, ``torch.randn``) from a
    generator of its own, seeded by the run's seed and ``key(places[i])``."""
    rows = []
    for place in places:
        generator = torch.Generator(device=device).manual_seed(block_seed(seed, key(place)))
        rows.append(draw(shape, generator=generator, device=device))
    return torch.stack(rows)


def randomization_plan(model: nn.Module, example: Tensor, section: Any, *, test: str,
                       field: str) -> list[Stage]:
    """The stages of a randomization test from its section's granularity, order and
    ``blocks`` (``field``: the section's path, for errors)."""
    blocks = find_blocks(model, example, granularity=section.granularity)
    if section.blocks is not None:
        blocks = select_blocks(blocks, section.blocks, field=f"{field}.blocks")
    return plan_stages(blocks, model=model, test=test, order=section.order)


def fmt(value: float | None) -> str:
    """A score as the tables show it: signed, two decimals, n/a when undefined."""
    return "n/a" if value is None or math.isnan(value) else f"{value:+.2f}"


def method_table(view: View, title: str, cell: Callable[[str, str], str]) -> Table:
    """Methods × metrics, each cell ``cell(method, metric)``."""
    table = Table(title=title, title_justify="left")
    table.add_column("method", no_wrap=True)
    for metric in view.metrics:
        table.add_column(metric, justify="right")
    for method in view.methods:
        table.add_row(method, *[cell(method, metric) for metric in view.metrics])
    control = [cell(RANDOM_MAP, metric) for metric in view.metrics]
    if any(c != "-" for c in control):  # the tests that score the random-map control
        table.add_row(f"[dim]{RANDOM_MAP} (control)[/]", *[f"[dim]{c}[/]" for c in control])
    return table


def mean_cell(rows: dict[tuple[str, str], SummaryRow]) -> Callable[[str, str], str]:
    """A cell function showing each (method, metric) row's mean ("-" when absent)."""
    return lambda method, metric: (fmt(rows[(method, metric)].mean)
                                   if (method, metric) in rows else "-")


def floor_cell(rows: dict[tuple[str, str], SummaryRow]) -> Callable[[str, str], str]:
    """Like :func:`mean_cell`, with the distance above the random-network floor (Δ)."""
    def cell(method: str, metric: str) -> str:
        row = rows.get((method, metric))
        if row is None:
            return "-"
        if math.isnan(row.above_floor):
            return fmt(row.mean)
        return f"{fmt(row.mean)}\n[dim]Δ{fmt(row.above_floor)}[/]"  # two lines: stays narrow
    return cell


CHECKS: list[Check] = []  # in registration order


def register_check(cls: type[Check]) -> type[Check]:
    """Class decorator adding one instance of ``cls`` to :data:`CHECKS`."""
    if any(c.name == cls.name for c in CHECKS):
        raise ValueError(f"sanity check {cls.name!r} is already registered")
    CHECKS.append(cls())
    return cls


def get_check(name: str) -> Check | None:
    """The registered check whose rows carry ``name`` in their `test` column (None: none)."""
    return next((c for c in CHECKS if c.name == name), None)
