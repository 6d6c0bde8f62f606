"""Run work units on Ray: a local Ray instance, or an existing cluster (``ray_address``).

One Ray actor per free slot of the cluster holds ``gpus_per_task`` GPUs and ``cpus_per_task``
CPUs, rebuilds the setup from the config once (see :mod:`saliencycheck.runner.worker`), and
runs one unit at a time; the driver hands out the next unit as each finishes and stores its
result at once. Actors, and calls lost with them, are restarted and retried ``max_retries``
times; a CUDA or I/O error inside a unit is retried as often. Images, weights and the output
folder must be at the same paths on every node (a shared file system).
"""

from __future__ import annotations

import logging
from collections import deque
from types import ModuleType

from saliencycheck.errors import ConfigError, SaliencyCheckError
from saliencycheck.label_training import LabelModels
from saliencycheck.runner.backends import Save, UnitProgress
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import RunSetup
from saliencycheck.runner.store import UnitResult
from saliencycheck.runner.worker import WorkerSpec, build_executor

RETRIED = (RuntimeError, OSError)  # CUDA errors (out of memory among them) and I/O hiccups


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError("runtime.backend: ray needs Ray, which is not installed; "
                          "pip install 'saliencycheck[ray]' (or set runtime.backend: local)"
                          ) from None
    return ray


def gpus_per_task(requested: float | None, *, device: str, cluster_gpus: float) -> float:
    """``runtime.gpus_per_task``, or by default 1 when the cluster has GPUs and the run is
    not pinned to the CPU, else 0."""
    if requested is not None:
        if requested > 0 and cluster_gpus == 0:
            raise ConfigError(f"runtime.gpus_per_task: {requested} GPUs per task, but the Ray "
                              "cluster has no GPUs; set runtime.gpus_per_task: 0")
        return requested
    return 1.0 if cluster_gpus > 0 and device != "cpu" else 0.0


def worker_count(resources: dict[str, float], *, gpus: float, cpus: float, units: int) -> int:
    """How many workers fit the cluster at once (at least one, at most one per unit)."""
    fits = resources.get("CPU", 0) // cpus
    if gpus > 0:
        fits = min(fits, resources.get("GPU", 0) // gpus)
    return int(max(1, min(fits, units)))


class UnitWorker:
    """A Ray actor: one setup per process, one unit per call."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.executor = build_executor(spec)

    def run(self, unit: WorkUnit) -> UnitResult:
        return self.executor.run(unit, lambda *_: None)


class RayBackend:
    """Units on Ray actors; Ray is imported when the backend is chosen, before any work."""

    def __init__(self, setup: RunSetup) -> None:
        self.setup = setup
        self.ray = import_ray()

    def run(self, units: list[WorkUnit], *, label_models: LabelModels | None, save: Save,
            progress: UnitProgress) -> None:
        if not units:
            return
        ray = self.ray
        runtime = self.setup.config.runtime
        started = not ray.is_initialized()
        if started:  # ray_address None: RAY_ADDRESS, else a new local instance
            ray.init(address=runtime.ray_address, include_dashboard=False,
                     logging_level=logging.WARNING)
        try:
            self._run(ray, units, label_models, save, progress)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: ModuleType, units: list[WorkUnit], label_models: LabelModels | None,
             save: Save, progress: UnitProgress) -> None:
        runtime = self.setup.config.runtime
        resources = ray.cluster_resources()
        gpus = gpus_per_task(runtime.gpus_per_task, device=runtime.device,
                             cluster_gpus=resources.get("GPU", 0))
        count = worker_count(resources, gpus=gpus, cpus=runtime.cpus_per_task,
                             units=len(units))
        # On a Ray worker the GPU Ray assigns is the only one visible: cuda means that one.
        spec = ray.put(WorkerSpec.of(self.setup, label_models,
                                     "cuda" if gpus > 0 else "cpu"))
        actor = ray.remote(UnitWorker).options(
            num_gpus=gpus, num_cpus=runtime.cpus_per_task, max_restarts=runtime.max_retries,
            max_task_retries=runtime.max_retries)
        workers = [actor.remote(spec) for _ in range(count)]
        progress(0, f"ray: {count} workers ({gpus:g} GPU, {runtime.cpus_per_task:g} CPU each)")
        pending, running = deque(units), {}

        def submit(worker: object) -> None:
            unit = pending.popleft()
            ref = worker.run.options(retry_exceptions=list(RETRIED)).remote(unit)
            running[ref] = (unit, worker)

        for worker in workers:
            if pending:
                submit(worker)
        done = 0
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            unit, worker = running.pop(ref)
            save(_result(ray, ref))
            done += 1
            progress(self.setup.steps_per_unit, f"{unit.id} done on ray ({done}/{len(units)})")
            if pending:
                submit(worker)


def _result(ray: ModuleType, ref: object) -> UnitResult:
    """The unit's result; a config or data error inside a worker is raised as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, SaliencyCheckError):
            raise exc.cause from None
        raise
