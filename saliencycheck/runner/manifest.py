"""What an output folder's units belong to: the config, the images and the unit plan.

Stored as ``units/plan.json`` by every run and shard, compared before a run resumes, a shard
joins, or shards are merged, so the units of different configs are never mixed in one report.
The fingerprint leaves out where and how units run (backend, device, Ray resources, output
folder): those change no score, so a run may resume on another machine or backend.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from saliencycheck.config import Config, LoadedConfig
from saliencycheck.errors import StoreError
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import RunSetup

PLACEMENT = {"runtime": ("backend", "device", "gpus_per_task", "cpus_per_task", "ray_address",
                         "max_retries"),
             "output": ("dir",)}


def manifest(setup: RunSetup, units: list[WorkUnit]) -> dict:
    """The plan of this run: resolved config, config file, images (id, size) and units."""
    return {
        "config": setup.config.model_dump(mode="json"),
        "source": str(setup.source),
        "images": [[ref.id, _size(ref.path)] for ref in setup.images],
        "units": {u.id: [setup.images[i].id for i in u.image_indices] for u in units},
    }


def fingerprint(plan: dict) -> str:
    """A hash of everything in a plan that changes the scores."""
    config = {section: ({k: v for k, v in values.items() if k not in PLACEMENT[section]}
                        if section in PLACEMENT else values)
              for section, values in plan["config"].items()}
    text = json.dumps({"config": config, "images": plan["images"], "units": plan["units"]},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def differences(stored: dict, current: dict) -> list[str]:
    """What differs between two plans, as config paths (runtime.seed) or 'images'/'units'."""
    found = [f"{section}.{key}" if key else section
             for section in sorted(set(stored["config"]) | set(current["config"]))
             for key in _keys(stored["config"].get(section), current["config"].get(section))
             if key not in PLACEMENT.get(section, ())]
    found += [part for part in ("images", "units") if stored[part] != current[part]]
    return found


def check_same_run(stored: dict, current: dict, *, where: Path, fix: str) -> None:
    """Raise StoreError naming what differs unless both plans would give the same scores."""
    if fingerprint(stored) == fingerprint(current):
        return
    changed = ", ".join(differences(stored, current)[:4]) or "the plan"
    raise StoreError(f"{where} holds units of another config (differs in {changed}); {fix}")


def loaded_config(plan: dict, *, output_dir: Path) -> LoadedConfig:
    """The stored config as a run would load it, writing into ``output_dir`` on the CPU."""
    data = plan["config"]
    data = {**data, "output": {**data["output"], "dir": str(output_dir.resolve())},
            "runtime": {**data["runtime"], "device": "cpu"}}
    return LoadedConfig(config=Config.model_validate(data), source=Path(plan["source"]))


def _keys(stored: object, current: object) -> list[str]:
    """The keys of a config section whose values differ ('' for a whole non-dict value)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return [] if stored == current else [""]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1
