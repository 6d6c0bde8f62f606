"""Where work units run: in this process, in one worker process per GPU, or on Ray.

A backend runs the units it is given and hands each result to ``save`` as soon as the unit
finishes, on the driver, so every backend fills the same result store and `--resume` works
whichever ran the units before.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from saliencycheck.errors import SaliencyCheckError, UsageError, WorkerError
from saliencycheck.runner.executor import UnitExecutor
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import RunSetup
from saliencycheck.runner.store import UnitResult
from saliencycheck.runner.worker import WorkerSpec, build_executor

Save = Callable[[UnitResult], None]
UnitProgress = Callable[[float, str], None]  # (steps advanced, description)


class Backend(Protocol):
    def run(self, units: list[WorkUnit], *, prepared: dict[str, Any], save: Save,
            progress: UnitProgress) -> None:
        """Run ``units``, calling ``save`` with each result as it finishes."""


def worker_devices(requested: str, gpu_count: int) -> list[str]:
    """The devices of the local workers: every visible GPU when ``runtime.device`` is 'auto'
    and there are several, else the one device the run uses (one in-process worker)."""
    if requested == "auto" and gpu_count > 1:
        return [f"cuda:{index}" for index in range(gpu_count)]
    return [requested]


def choose_backend(setup: RunSetup) -> Backend:
    """The backend ``runtime.backend`` names; locally, one worker per GPU when several.
    Chosen before any work, so a missing Ray is reported at once."""
    if setup.config.runtime.backend == "ray":
        if setup.model_in_memory:
            raise UsageError("runtime.backend: 'ray' workers build the model from the config's "
                             "model: section, and this model was handed over in memory; use "
                             "backend 'local', or a config with model.name or model.factory")
        from saliencycheck.runner.ray_backend import RayBackend

        return RayBackend(setup)
    devices = worker_devices(setup.config.runtime.device, torch.cuda.device_count())
    if len(devices) > 1 and not setup.model_in_memory:  # workers rebuild it from the config
        return ProcessPool(setup, devices)
    return InProcess(setup)


@dataclass
class InProcess:
    """Units one after another in this process, with progress inside each unit."""

    setup: RunSetup

    def run(self, units: list[WorkUnit], *, prepared: dict[str, Any], save: Save,
            progress: UnitProgress) -> None:
        executor = UnitExecutor(self.setup, prepared)
        for unit in units:
            save(executor.run(unit, progress))


@dataclass
class ProcessPool:
    """One spawned worker process per device (per GPU), each taking the next unit when free;
    progress advances per finished unit."""

    setup: RunSetup
    devices: list[str]
    poll_s: float = 2.0

    def run(self, units: list[WorkUnit], *, prepared: dict[str, Any], save: Save,
            progress: UnitProgress) -> None:
        if not units:
            return
        context = torch.multiprocessing.get_context("spawn")
        tasks, results = context.Queue(), context.Queue()
        for unit in units:
            tasks.put(unit)
        workers = []
        for device in self.devices:
            tasks.put(None)
            spec = WorkerSpec.of(self.setup, prepared, device)
            workers.append(context.Process(target=_serve, args=(spec, tasks, results),
                                           daemon=True))
            workers[-1].start()
        try:
            self._collect(results, workers, units, save, progress)
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()

    def _collect(self, results, workers, units: list[WorkUnit], save: Save,  # noqa: ANN001
                 progress: UnitProgress) -> None:
        """Store every result as it comes. A worker that fails (an error) or dies (its unit
        in flight is lost) leaves the rest to the others; once every worker has exited, the
        first failure is raised, so nothing another worker finished is lost."""
        done, failure = 0, None
        for device, outcome in self._outcomes(results, workers):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                continue
            save(outcome)
            done += 1
            progress(self.setup.steps_per_unit,
                     f"{outcome.unit_id} done on {device} ({done}/{len(units)})")
            if done == len(units):
                return
        if failure is not None:
            raise failure
        died = ", ".join(f"the worker on {device} exited with code {worker.exitcode}"
                         for device, worker in zip(self.devices, workers)
                         if worker.exitcode not in (None, 0)) or "the workers stopped"
        raise WorkerError(f"{len(units) - done} of {len(units)} units did not finish: {died}; "
                          "the units that finished are stored: rerun with --resume to run "
                          "the rest")

    def _outcomes(self, results, workers):  # noqa: ANN001, ANN202
        """(device, result or error) as they arrive, until every worker has exited and what
        they sent has been read."""
        while True:
            try:
                yield results.get(timeout=self.poll_s)
            except queue.Empty:
                if any(worker.exitcode is None for worker in workers):
                    continue
                try:  # all exited: what they sent before is in the pipe
                    yield results.get(timeout=1.0)
                except queue.Empty:
                    return


def _serve(spec: WorkerSpec, tasks, results) -> None:  # noqa: ANN001  (multiprocessing queues)
    """A worker process: build the executor once, then run units until the None sentinel."""
    try:
        executor = build_executor(spec)
        while (unit := tasks.get()) is not None:
            results.put((spec.device, executor.run(unit, lambda *_: None)))
    except Exception as exc:  # reported to the driver, which raises it
        error = exc if isinstance(exc, SaliencyCheckError) else RuntimeError(
            f"worker on {spec.device}: {type(exc).__name__}: {exc}")
        results.put((spec.device, error))
