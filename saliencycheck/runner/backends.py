"""Where work units run: in this process, in one worker process per GPU, or on Ray.

A backend runs the units it is given and hands each result to ``save`` as soon as the unit
finishes, on the driver, so every backend fills the same result store and `--resume` works
whichever ran the units before.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from saliencycheck.errors import SaliencyCheckError, WorkerError
from saliencycheck.label_training import LabelModels
from saliencycheck.runner.executor import UnitExecutor
from saliencycheck.runner.plan import WorkUnit
from saliencycheck.runner.setup import RunSetup
from saliencycheck.runner.store import UnitResult
from saliencycheck.runner.worker import WorkerSpec, build_executor

Save = Callable[[UnitResult], None]
UnitProgress = Callable[[float, str], None]  # (steps advanced, description)


class Backend(Protocol):
    def run(self, units: list[WorkUnit], *, label_models: LabelModels | None, save: Save,
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
        from saliencycheck.runner.ray_backend import RayBackend

        return RayBackend(setup)
    devices = worker_devices(setup.config.runtime.device, torch.cuda.device_count())
    if len(devices) > 1:
        return ProcessPool(setup, devices)
    return InProcess(setup)


@dataclass
class InProcess:
    """Units one after another in this process, with progress inside each unit."""

    setup: RunSetup

    def run(self, units: list[WorkUnit], *, label_models: LabelModels | None, save: Save,
            progress: UnitProgress) -> None:
        executor = UnitExecutor(self.setup, label_models)
        for unit in units:
            save(executor.run(unit, progress))


@dataclass
class ProcessPool:
    """One spawned worker process per device (per GPU), each taking the next unit when free;
    progress advances per finished unit."""

    setup: RunSetup
    devices: list[str]
    poll_s: float = 2.0

    def run(self, units: list[WorkUnit], *, label_models: LabelModels | None, save: Save,
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
            spec = WorkerSpec.of(self.setup, label_models, device)
            workers.append(context.Process(target=_serve, args=(spec, tasks, results),
                                           daemon=True))
            workers[-1].start()
        try:
            for done in range(1, len(units) + 1):
                device, outcome = self._next(results, workers)
                if isinstance(outcome, BaseException):
                    raise outcome
                save(outcome)
                progress(self.setup.steps_per_unit,
                         f"{outcome.unit_id} done on {device} ({done}/{len(units)})")
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()

    def _next(self, results, workers) -> tuple[str, UnitResult | BaseException]:  # noqa: ANN001
        """The next finished unit; raise when a worker died without reporting."""
        while True:
            try:
                return results.get(timeout=self.poll_s)
            except queue.Empty:
                for device, worker in zip(self.devices, workers):
                    if worker.exitcode not in (None, 0):
                        raise WorkerError(f"the worker on {device} exited with code "
                                          f"{worker.exitcode}; the units that finished are "
                                          "stored: rerun with --resume to run the rest") from None


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
