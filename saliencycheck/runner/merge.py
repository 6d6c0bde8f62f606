"""Merge the units that shards (or interrupted runs) stored into one report.

Each output folder holds its plan (``units/plan.json``: the resolved config, its file and
the unit plan), so merging needs no other input. The first folder (or ``output``) receives
the units of the others and the report; missing units are named, never silently left out.
"""

from __future__ import annotations

import time
from pathlib import Path

from saliencycheck.errors import StoreError
from saliencycheck.runner.lock import FolderLock
from saliencycheck.runner.manifest import HashCache, check_same_run, loaded_config, manifest
from saliencycheck.runner.ownership import OutputFolder
from saliencycheck.runner.plan import plan_units
from saliencycheck.runner.run import RunResult, planned_outputs, write_outputs
from saliencycheck.runner.setup import prepare
from saliencycheck.runner.shards import owner
from saliencycheck.runner.store import PLAN, ResultStore


def merge_outputs(folders: list[Path], *, output: Path | None = None,
                  allow_partial: bool = False, force: bool = False) -> RunResult:
    """Gather the units of ``folders`` into ``output`` (default: the first folder) and write
    the report, summary, verdicts, figures and run.json there from them.

    The target folder is claimed (``force`` as for a run) and locked while merging. Raises
    StoreError when a folder holds no plan or another config's units, or when units are
    missing (unless ``allow_partial``).
    """
    check_mergeable(folders)
    target_dir = output if output is not None else folders[0]
    OutputFolder.claim(target_dir, force=force, field="-o" if output is not None
                       else str(target_dir))
    with FolderLock(target_dir):
        return _merge(folders, output=output, allow_partial=allow_partial)


def _merge(folders: list[Path], *, output: Path | None, allow_partial: bool) -> RunResult:
    started = time.perf_counter()
    stores = [ResultStore(folder) for folder in folders]
    plan = stores[0].read_plan()
    for folder, store in zip(folders[1:], stores[1:]):
        check_same_run(plan, store.read_plan(), where=folder,
                       fix=f"merge only the shards of {folders[0]}'s run")
    target = ResultStore(output) if output is not None else stores[0]
    if output is not None and target.read_plan() is not None:
        check_same_run(plan, target.read_plan(), where=output, fix="merge into another "
                       "--output folder")
    stored = set().union(target.unit_ids(), *(store.unit_ids() for store in stores))
    missing = [unit for unit in plan["units"] if unit not in stored]
    if missing and not allow_partial:
        counts = sorted(set().union(*(store.shard_counts() for store in [target, *stores])))
        raise StoreError(missing_message(missing, list(plan["units"]), counts))
    setup = prepare(loaded_config(plan, output_dir=target.root.parent))
    units = plan_units(len(setup.images), batch_size=setup.config.runtime.batch_size)
    check_same_run(plan, manifest(setup, units, HashCache(target.root.parent)),
                   where=target.root.parent, fix="the inputs changed since the units were "
                   "computed: rerun the shards (or the run) on the current files")
    names = planned_outputs(setup, units)
    target.folder.check_free(names)  # before anything is written there
    target.folder.reserve(names)
    if output is not None:
        target.write_plan(plan)
    for store in stores:
        if store.root != target.root:
            target.adopt(store)
            if not target.context():
                target.write_context(store.context())
    return write_outputs(setup, target, units_total=len(plan["units"]),
                         timings={"merge_s": time.perf_counter() - started})


def check_mergeable(folders: list[Path]) -> None:
    """Raise StoreError naming a folder that holds no plan of stored units."""
    for folder in folders:
        if not (folder / "units" / PLAN).is_file():
            raise StoreError(f"{folder}: no units/{PLAN}; give the output.dir of a "
                             "saliencycheck run or shard")


def missing_message(missing: list[str], planned: list[str], shard_counts: list[int]) -> str:
    """Which units (and, for one shard count, which shards) are missing, and how to finish."""
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    units = f"{len(missing)} of {len(planned)} units missing ({shown})"
    if len(shard_counts) == 1:
        count = shard_counts[0]
        shards = sorted({owner(planned.index(unit), count) for unit in missing})
        named = ", ".join(f"{index}/{count}" for index in shards)
        return (f"shards {named} have not finished: {units}; rerun them with "
                f"`saliencycheck run CONFIG --shard I/{count}`, or merge with --allow-partial")
    return (f"{units}; finish them with `saliencycheck run CONFIG --resume`, or merge with "
            "--allow-partial")
