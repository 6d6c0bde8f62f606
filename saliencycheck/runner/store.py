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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from saliencycheck.atomic import TMP_SUFFIX, atomic_write, atomic_write_text
from saliencycheck.errors import StoreError
from saliencycheck.results import ScoreRow, StageObservation
from saliencycheck.runner.ownership import OutputFolder
from saliencycheck.runner.plan import fingerprint


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
    files: list[str] = field(default_factory=list)  # written by the unit (maps/), relative


PLAN = "plan.json"
CONTEXT = "context.json"
SHARD_MARKER = "shards-"


class ResultStore:
    """Units as `units/<id>.json` (+ `.npz` for figure maps) under the output folder.

    Every file is recorded in the folder's manifest as it is written (see
    :mod:`saliencycheck.runner.ownership`), and every unit names the plan it was computed for
    (the plan's fingerprint), so a unit left from another run is never read as this one's.
    """

    def __init__(self, root: Path) -> None:
        self.folder = OutputFolder(root)
        self.root = root / "units"
        self.root.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Forget every unit, the plan, the context and shard markers (a fresh run). Raises
        StoreError when a unit file could not be removed (changed since it was written)."""
        for path in self.root.glob(".*" + TMP_SUFFIX):  # a killed writer's leftovers
            path.unlink()
        kept = self.folder.remove(under=["units"])
        self.root.mkdir(parents=True, exist_ok=True)
        if any(Path(name).name.startswith("unit-") for name in kept):
            raise StoreError(f"{self.folder.root / kept[0]} changed since saliencycheck wrote "
                             "it and was kept; delete it, or set output.dir (or -o) to another "
                             "folder")

    def unit_ids(self) -> set[str]:
        """The ids of the finished units."""
        return {p.stem for p in self.root.glob("unit-*.json")}

    def read_plan(self) -> dict | None:
        plan = self._read_json(PLAN, fix="run without --resume to start afresh, or delete "
                               "the folder's units/ before a shard or merge uses it")
        if plan is not None and not {"config", "images", "units"} <= set(plan):
            raise StoreError(f"{self.root / PLAN} is not a saliencycheck plan; run without "
                             "--resume to start afresh")
        return plan

    def write_plan(self, plan: dict) -> None:
        self._write_text(self.root / PLAN, json.dumps(plan, indent=1, sort_keys=True))

    def context(self) -> dict:
        return self._read_json(CONTEXT, fix="delete it and rerun with --resume") or {}

    def write_context(self, context: dict) -> None:
        self._write_text(self.root / CONTEXT, json.dumps(context, indent=1, sort_keys=True))

    def mark_shards(self, count: int) -> None:
        """Record that the units were split into ``count`` shards (any shard may write it)."""
        marker = self.root / f"{SHARD_MARKER}{count}"
        marker.touch()
        self.folder.record([marker])

    def shard_counts(self) -> list[int]:
        return sorted(int(p.name.removeprefix(SHARD_MARKER))
                      for p in self.root.glob(SHARD_MARKER + "*")
                      if p.name.removeprefix(SHARD_MARKER).isdigit())

    def adopt(self, other: ResultStore) -> list[str]:
        """Copy the finished units this store lacks from ``other``; return their ids."""
        copied = sorted(other.unit_ids() - self.unit_ids())
        for unit_id in copied:
            npz = other.root / f"{unit_id}.npz"
            written = []
            if npz.is_file():  # maps first: a unit's .json says it is complete
                atomic_write(self.root / npz.name, lambda tmp, src=npz: shutil.copyfile(src, tmp))
                written.append(self.root / npz.name)
            src = other.root / f"{unit_id}.json"
            atomic_write(self.root / src.name, lambda tmp, src=src: shutil.copyfile(src, tmp))
            self.folder.record([*written, self.root / src.name])
        for count in other.shard_counts():
            self.mark_shards(count)
        return copied

    def save(self, result: UnitResult) -> None:
        written = [self.folder.root / name for name in result.files]
        if result.figure_maps:
            def write_npz(tmp: Path) -> None:
                with tmp.open("wb") as fh:
                    np.savez_compressed(fh, **result.figure_maps)
            atomic_write(self.root / f"{result.unit_id}.npz", write_npz)
            written.append(self.root / f"{result.unit_id}.npz")
        payload = {"unit_id": result.unit_id,
                   "plan": self._plan_id(),
                   "rows": [asdict(r) for r in result.rows],
                   "stages": [asdict(s) for s in result.stages],
                   "skipped": result.skipped,
                   "files": result.files}
        self._write_text(self.root / f"{result.unit_id}.json", json.dumps(payload),
                         also=written)

    def load(self) -> StoredResults:
        """Rows, stage observations and skipped images of every finished unit. Raises
        StoreError naming a unit file that is corrupt or belongs to another plan."""
        plan_id = self._plan_id()
        units = []
        for path in sorted(self.root.glob("unit-*.json")):
            unit = self._read_json(path.name, fix="delete it and rerun with --resume to "
                                   "compute that unit again")
            if not isinstance(unit, dict) or unit.get("plan") != plan_id:
                raise StoreError(f"{path} was not computed for this folder's plan "
                                 "(units/plan.json); delete it and rerun with --resume")
            units.append(unit)
        try:
            return StoredResults(
                unit_ids=[unit["unit_id"] for unit in units],
                rows=[ScoreRow(**row) for unit in units for row in unit["rows"]],
                stages=[StageObservation(**s) for unit in units for s in unit["stages"]],
                skipped=[tuple(s) for unit in units for s in unit["skipped"]],
            )
        except (KeyError, TypeError) as exc:
            raise StoreError(f"{self.root}: a unit file is damaged ({type(exc).__name__}: "
                             f"{exc}); delete the units/unit-*.json files and rerun") from None

    def figure_maps(self) -> dict[str, np.ndarray]:
        maps: dict[str, np.ndarray] = {}
        for path in sorted(self.root.glob("unit-*.npz")):
            try:
                with np.load(path) as data:
                    maps.update({key: data[key] for key in data.files})
            except (OSError, ValueError, EOFError) as exc:  # zipfile.BadZipFile is OSError-free
                raise StoreError(f"{path} is corrupt ({type(exc).__name__}); delete it and "
                                 "its .json, then rerun with --resume") from None
        return maps

    def _plan_id(self) -> str | None:
        plan = self.read_plan()
        return fingerprint(plan) if plan is not None else None

    def _read_json(self, name: str, *, fix: str) -> object | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise StoreError(f"{path} is corrupt ({type(exc).__name__}); {fix}") from None

    def _write_text(self, path: Path, text: str, also: list[Path] = ()) -> None:
        atomic_write_text(path, text)
        self.folder.record([*also, path])
