"""The result store: each finished work unit is written atomically, as data, at once.

Reports, summaries and figures are all computed from what is stored here, so an interrupted
run loses at most the unit in flight. Next to the units: ``plan.json`` (the config, images and
unit plan they belong to, see :mod:`saliencycheck.runner.manifest`), ``context.json`` (what
every unit shares: the label randomization models' report, the precision fidelity) and
``shards-<N>`` markers left by ``--shard I/N`` runs, so a merge can name the missing shards.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from saliencycheck.atomic import TMP_SUFFIX, atomic_write, atomic_write_text
from saliencycheck.errors import ConfigError

ROW_FIELDS = ("image", "target", "target_explained", "method", "test", "stage_index", "stage",
              "metric", "value", "note", "repeat")


@dataclass(frozen=True)
class ScoreRow:
    """One similarity score: image × method × test × stage × metric (tidy data)."""

    image: str
    target: int
    target_explained: int
    method: str
    test: str
    stage_index: int
    stage: str
    metric: str
    value: float
    note: str = ""
    repeat: int = 0  # which of runtime.repeats randomization seeds (0 for the trained model)


@dataclass(frozen=True)
class StageObservation:
    """Per unit and stage: how much the logits moved (summed so units can be pooled)."""

    test: str
    stage_index: int
    n: int
    relative_l2_sum: float
    top1_agreement_sum: float


@dataclass(frozen=True)
class StoredResults:
    """Everything the finished units hold, read in one pass over the store."""

    unit_ids: list[str]
    rows: list[ScoreRow]
    stages: list[StageObservation]
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable images


@dataclass
class UnitResult:
    unit_id: str
    rows: list[ScoreRow] = field(default_factory=list)
    stages: list[StageObservation] = field(default_factory=list)
    # "image|test|method" -> (stages, H, W) absolute maps of the images that get figures
    figure_maps: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) unreadable


PLAN = "plan.json"
CONTEXT = "context.json"
SHARD_MARKER = "shards-"


def check_writable(folder: Path, field: str) -> None:
    """Create ``folder`` and write (then remove) a file in it, before any work: an output
    folder that is a file, read-only, or on a file system that refuses it fails in one line
    here, not after the model has loaded. ``field`` names the setting to change."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is a file, not a folder; set {field} (or -o) "
                          "to a folder")
    probe = folder / f".write-probe-{uuid.uuid4().hex}{TMP_SUFFIX}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot write to {folder} "
                          f"({exc.strerror or type(exc).__name__}); set {field} (or -o) to a "
                          "writable folder") from None


class ResultStore:
    """Units as `units/<id>.json` (+ `.npz` for figure maps) under the output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root / "units"
        self.root.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Forget every unit, the plan, the context and shard markers (a fresh run)."""
        for pattern in ("unit-*", PLAN, CONTEXT, SHARD_MARKER + "*", ".*" + TMP_SUFFIX):
            for path in self.root.glob(pattern):
                path.unlink()

    def unit_ids(self) -> set[str]:
        """The ids of the finished units."""
        return {p.stem for p in self.root.glob("unit-*.json")}

    def read_plan(self) -> dict | None:
        path = self.root / PLAN
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_plan(self, plan: dict) -> None:
        atomic_write_text(self.root / PLAN, json.dumps(plan, indent=1, sort_keys=True))

    def context(self) -> dict:
        path = self.root / CONTEXT
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def write_context(self, context: dict) -> None:
        atomic_write_text(self.root / CONTEXT, json.dumps(context, indent=1, sort_keys=True))

    def mark_shards(self, count: int) -> None:
        """Record that the units were split into ``count`` shards (any shard may write it)."""
        (self.root / f"{SHARD_MARKER}{count}").touch()

    def shard_counts(self) -> list[int]:
        return sorted(int(p.name.removeprefix(SHARD_MARKER))
                      for p in self.root.glob(SHARD_MARKER + "*"))

    def adopt(self, other: ResultStore) -> list[str]:
        """Copy the finished units this store lacks from ``other``; return their ids."""
        copied = sorted(other.unit_ids() - self.unit_ids())
        for unit_id in copied:
            npz = other.root / f"{unit_id}.npz"
            if npz.is_file():  # maps first: a unit's .json says it is complete
                atomic_write(self.root / npz.name, lambda tmp, src=npz: shutil.copyfile(src, tmp))
            src = other.root / f"{unit_id}.json"
            atomic_write(self.root / src.name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        for count in other.shard_counts():
            self.mark_shards(count)
        return copied

    def save(self, result: UnitResult) -> None:
        if result.figure_maps:
            def write_npz(tmp: Path) -> None:
                with tmp.open("wb") as fh:
                    np.savez_compressed(fh, **result.figure_maps)
            atomic_write(self.root / f"{result.unit_id}.npz", write_npz)
        payload = {"unit_id": result.unit_id,
                   "rows": [asdict(r) for r in result.rows],
                   "stages": [asdict(s) for s in result.stages],
                   "skipped": result.skipped}
        atomic_write_text(self.root / f"{result.unit_id}.json", json.dumps(payload))

    def load(self) -> StoredResults:
        """Rows, stage observations and skipped images of every finished unit."""
        units = [json.loads(p.read_text(encoding="utf-8"))
                 for p in sorted(self.root.glob("unit-*.json"))]
        return StoredResults(
            unit_ids=[unit["unit_id"] for unit in units],
            rows=[ScoreRow(**row) for unit in units for row in unit["rows"]],
            stages=[StageObservation(**s) for unit in units for s in unit["stages"]],
            skipped=[tuple(s) for unit in units for s in unit["skipped"]],
        )

    def figure_maps(self) -> dict[str, np.ndarray]:
        maps: dict[str, np.ndarray] = {}
        for path in sorted(self.root.glob("unit-*.npz")):
            with np.load(path) as data:
                maps.update({key: data[key] for key in data.files})
        return maps
