"""Shards for Slurm job arrays: ``--shard I/N`` runs every N-th work unit, starting at I.

I is 0-based (shards 0/N … N-1/N). Inside a Slurm array job the shard defaults to the task's
position in the array: (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP of
SLURM_ARRAY_TASK_COUNT, so ``--array=0-7`` and ``--array=1-8`` both give shards 0/8 … 7/8.
Units are dealt round-robin, so every shard gets a similar share of the images. A shard taken
from the Slurm variables is refused when the output folder was split into another number of
shards: that is a part of an array resubmitted (``--array=3,7``), whose variables describe the
new, smaller array, so the shard must be passed explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from saliencycheck.errors import UsageError
from saliencycheck.runner.plan import WorkUnit


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int
    origin: str = field(default="", compare=False)  # the Slurm variables it came from, if any

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def units(self, units: list[WorkUnit]) -> list[WorkUnit]:
        """This shard's share of the planned units."""
        return units[self.index::self.count]

    def check_against(self, stored_counts: list[int], where: object) -> None:
        """Refuse a shard from the Slurm variables when the units stored in ``where`` were
        split into another number of shards (a partly resubmitted array)."""
        others = [count for count in stored_counts if count != self.count]
        if self.origin and others:
            raise UsageError(
                f"{self.origin} gives shard {self}, but {where} holds the units of "
                f"{others[-1]} shards; resubmitting only some tasks of an array changes those "
                f"variables, so pass the shard explicitly: --shard \"$SLURM_ARRAY_TASK_ID/"
                f"{others[-1]}\"")


def owner(position: int, count: int) -> int:
    """The shard (0-based) that runs the unit at ``position`` in the plan."""
    return position % count


def parse_shard(text: str) -> Shard:
    """Read ``I/N`` (0 ≤ I < N)."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. --shard 0/4 (I is 0-based)")
    return _checked(int(index), int(count), f"--shard {text!r}")


def shard_from_env(environ: Mapping[str, str]) -> Shard | None:
    """The shard of this Slurm array task, or None outside an array job."""
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
             "SLURM_ARRAY_TASK_STEP")
    raw = {name: environ.get(name, default) for name, default in zip(names, ("", "", "0", "1"))}
    if not all(value.isdigit() for value in raw.values()) or int(raw[names[3]]) < 1:
        shown = ", ".join(f"{k}={v!r}" for k, v in raw.items())
        raise UsageError(f"Slurm array variables are not numbers ({shown}); pass --shard I/N")
    task, count, first, step = (int(raw[name]) for name in names)
    offset, rest = divmod(task - first, step)
    where = f"SLURM_ARRAY_TASK_ID={task} (MIN={first}, STEP={step}, COUNT={count})"
    resubmitted = ("; if only some tasks of an array were resubmitted, pass the shard "
                   "explicitly: --shard \"$SLURM_ARRAY_TASK_ID/N\" with N the original array size")
    if rest:
        raise UsageError(f"{where}: not an evenly spaced array; submit --array=0-{count - 1}"
                         + resubmitted)
    return replace(_checked(offset, count, where, advice=resubmitted), origin=where)


def _checked(index: int, count: int, where: str, advice: str = "") -> Shard:
    if count < 1:
        raise UsageError(f"{where}: the number of shards must be at least 1")
    if not 0 <= index < count:
        raise UsageError(f"{where}: shard {index} is outside 0..{count - 1}; shards are 0-based "
                         f"(0/{count} … {count - 1}/{count}); for a Slurm array use a contiguous "
                         f"--array=0-{count - 1} and leave --shard out{advice}")
    return Shard(index, count)
