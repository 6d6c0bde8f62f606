"""Run work units on Ray: a local Ray instance, or an existing cluster (``ray_address``).

One Ray actor per free slot of the cluster holds ``gpus_per_task`` GPUs and ``cpus_per_task``
CPUs, rebuilds the setup from the config once (see :mod:`saliencycheck.runner.worker`), and
runs one unit at a time; the driver hands out the next unit as each finishes and stores its
result at once. Actors, and calls lost with them, are restarted and retried ``max_retries``
times; a CUDA or I/O error inside a unit is retried as often. Images, weights and the output
folder must be at the same paths on every node (a shared file system). A unit that still fails
after its retries stops the run only once the units in flight on the other workers have come
back and been stored, so ``--resume`` retries just the rest.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from saliencycheck.errors import ConfigError, SaliencyCheckError, WorkerError, first_line
from saliencycheck.runner.backends import Save, UnitProgress
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import RunSetup
from saliencycheck.runner.store import UnitResult
from saliencycheck.runner.worker import WorkerSpec, build_executor

RETRIED = (RuntimeError, OSError)  # CUDA errors (out of memory among them) and I/O hiccups
CONNECT_TIMEOUT_S = 10.0


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError("runtime.backend: ray needs Ray, which is not installed; "
                          "pip install 'saliencycheck[ray]' (or set runtime.backend: local)"
                          ) from None
    return ray


def cluster_address(configured: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The cluster to connect to and where that was said: ``runtime.ray_address``, else
    ``RAY_ADDRESS``, else (None, "") for a local instance."""
    if configured:
        return configured, "runtime.ray_address"
    if environ.get("RAY_ADDRESS"):
        return environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return None, ""


def check_reachable(address: str, source: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds where nothing listens at ``address``: ray.init itself retries there
    for minutes, logging warnings. 'auto' and 'local' are Ray's own names, not probed."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{source} {address!r}: expected HOST:PORT, e.g. head-node:6379 "
                          "(or ray://head-node:10001 for Ray Client)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{source} {address!r}: no Ray cluster answers there ({reason}); "
                          f"start its head with `ray start --head --port={port}` or fix "
                          f"{source}") from None


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
        self.address, self.source = cluster_address(setup.config.runtime.ray_address,
                                                    os.environ)
        if self.address is not None and not self.ray.is_initialized():
            check_reachable(self.address, self.source)

    def run(self, units: list[WorkUnit], *, prepared: dict[str, Any], save: Save,
            progress: UnitProgress) -> None:
        if not units:
            return
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            self._connect(ray)
        try:
            self._run(ray, units, prepared, save, progress)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: ModuleType) -> None:
        """Connect to the cluster, or start a local instance (address None; Ray may also
        attach to one already running on this machine)."""
        try:
            ray.init(address=self.address, include_dashboard=False,
                     logging_level=logging.WARNING)
        except ConnectionError as exc:  # something listens (probed): most often a token
            first = first_line(exc)[:200]
            token = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
                     "; a cluster started with token authentication (InvalidAuthToken in "
                     "Ray's log above) needs export RAY_AUTH_MODE=token")
            raise ConfigError(f"{self.source or 'Ray'} {self.address!r}: cannot connect "
                              f"({first}){token}") from None

    def _run(self, ray: ModuleType, units: list[WorkUnit], prepared: dict[str, Any],
             save: Save, progress: UnitProgress) -> None:
        runtime = self.setup.config.runtime
        resources = ray.cluster_resources()
        gpus = gpus_per_task(runtime.gpus_per_task, device=runtime.device,
                             cluster_gpus=resources.get("GPU", 0))
        count = worker_count(resources, gpus=gpus, cpus=runtime.cpus_per_task,
                             units=len(units))
        # On a Ray worker the GPU Ray assigns is the only one visible: cuda means that one.
        spec = ray.put(WorkerSpec.of(self.setup, prepared,
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
        done, failed = 0, None
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            unit, worker = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # after its retries: stop handing out work
                failed = failed or (unit, exc)
                continue
            save(result)
            done += 1
            progress(self.setup.steps_per_unit, f"{unit.id} done on ray ({done}/{len(units)})")
            if pending and failed is None:
                submit(worker)
        if failed is not None:
            unit, exc = failed
            raise _failure(ray, unit, exc, retries=runtime.max_retries) from exc


def _failure(ray: ModuleType, unit: WorkUnit, exc: Exception, *, retries: int) -> Exception:
    """What to raise for a unit that failed on Ray: a config or data error inside a worker
    as itself, anything else (a crashed or lost worker) as a WorkerError saying what to do."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, SaliencyCheckError):
        return cause
    first = first_line(cause or exc)[:200]
    return WorkerError(f"{unit.id} failed on Ray after {retries} retries "
                       f"({type(cause or exc).__name__}: {first}); the units that finished "
                       "are stored: rerun with --resume to retry the rest (or raise "
                       "runtime.max_retries)")
