"""The result store: each finished work unit is written atomically, as data, at once.

Reports, summaries and figures are all computed from what is stored here, so an interrupted
run loses at most the unit in flight.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class ResultStore:
    """Units as `units/<id>.json` (+ `.npz` for figure maps) under the output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root / "units"
        self.root.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        for path in self.root.glob("unit-*"):
            path.unlink()

    def save(self, result: UnitResult) -> None:
        if result.figure_maps:
            def write_npz(tmp: Path) -> None:
                with tmp.open("wb") as fh:
                    np.savez_compressed(fh, **result.figure_maps)
            _atomic_write(self.root / f"{result.unit_id}.npz", write_npz)
        payload = {"unit_id": result.unit_id,
                   "rows": [asdict(r) for r in result.rows],
                   "stages": [asdict(s) for s in result.stages],
                   "skipped": result.skipped}
        _atomic_write(self.root / f"{result.unit_id}.json",
                      lambda tmp: tmp.write_text(json.dumps(payload), encoding="utf-8"))

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
