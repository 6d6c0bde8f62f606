"""Merge the units that shards (or interrupted runs) stored into one report.

Each output folder holds its plan (``units/plan.json``: the resolved config, its file and
the unit plan), so merging needs no other input. The first folder (or ``output``) receives
the units of the others and the report; missing units are named, never silently left out.
"""

from __future__ import annotations

import time
from pathlib import Path

from saliencycheck.errors import StoreError
from saliencycheck.runner.manifest import check_same_run, loaded_config, manifest
from saliencycheck.runner.plan import plan_units
from saliencycheck.runner.run import RunResult, write_outputs
from saliencycheck.runner.setup import prepare
from saliencycheck.runner.shards import owner
from saliencycheck.runner.store import PLAN, ResultStore


def merge_outputs(folders: list[Path], *, output: Path | None = None,
                  allow_partial: bool = False) -> RunResult:
    """Gather the units of ``folders`` into ``output`` (default: the first folder) and write
    the report, summary, verdicts, figures and run.json there from them.

    Raises StoreError when a folder holds no plan or another config's units, or when units
    are missing (unless ``allow_partial``).
    """
    started = time.perf_counter()
    for folder in folders:
        if not (folder / "units" / PLAN).is_file():
            raise StoreError(f"{folder}: no units/{PLAN}; give the output.dir of a "
                             "saliencycheck run or shard")
    stores = [ResultStore(folder) for folder in folders]
    plan = stores[0].read_plan()
    for folder, store in zip(folders[1:], stores[1:]):
        check_same_run(plan, store.read_plan(), where=folder,
                       fix=f"merge only the shards of {folders[0]}'s run")
    target = ResultStore(output) if output is not None else stores[0]
    if output is not None:
        if target.read_plan() is not None:
            check_same_run(plan, target.read_plan(), where=output, fix="merge into another "
                           "--output folder")
        target.write_plan(plan)
    for store in stores:
        if store.root != target.root:
            target.adopt(store)
            if not target.context():
                target.write_context(store.context())
    missing = [unit for unit in plan["units"] if unit not in target.unit_ids()]
    if missing and not allow_partial:
        raise StoreError(missing_message(missing, list(plan["units"]), target.shard_counts()))
    setup = prepare(loaded_config(plan, output_dir=target.root.parent))
    units = plan_units(len(setup.images), batch_size=setup.config.runtime.batch_size)
    check_same_run(plan, manifest(setup, units), where=target.root.parent,
                   fix="the images changed since the run; rerun it")
    return write_outputs(setup, target, units_total=len(plan["units"]),
                         timings={"merge_s": time.perf_counter() - started})


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
