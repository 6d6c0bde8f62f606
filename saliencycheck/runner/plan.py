"""Plan a run as work units: a shard of images × every configured method and test."""

from __future__ import annotations

from dataclasses import dataclass


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
