"""Plan a run as work units (a shard of images × every configured method and test), and
fingerprint a plan (see :mod:`saliencycheck.runner.manifest`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

# Where and how units run: changes no score, so left out of config hashes and plan fingerprints.
PLACEMENT = {"runtime": ("backend", "device", "gpus_per_task", "cpus_per_task", "ray_address",
                         "max_retries"),
             "output": ("dir",)}


@dataclass(frozen=True)
class WorkUnit:
    """One shard of images; a unit's results are stored as soon as it finishes."""

    id: str
    image_indices: tuple[int, ...]


def plan_units(num_images: int, *, batch_size: int) -> list[WorkUnit]:
    """Split the images into consecutive shards of at most `batch_size`."""
    return [
        WorkUnit(id=f"unit-{start // batch_size:05d}",
                 image_indices=tuple(range(start, min(start + batch_size, num_images))))
        for start in range(0, num_images, batch_size)
    ]


def fingerprint(plan: dict) -> str:
    """A hash of everything in a plan that changes the scores."""
    config = {section: ({k: v for k, v in values.items() if k not in PLACEMENT[section]}
                        if section in PLACEMENT else values)
              for section, values in plan["config"].items()}
    files = {field: entry[1] for field, entry in plan.get("files", {}).items()}
    text = json.dumps({"config": config, "images": plan["images"], "units": plan["units"],
                       "files": files, "model_sha256": plan.get("model_sha256")},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
