"""The project's exception types; each carries the process exit code the CLI uses."""

from __future__ import annotations

import re

ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours some libraries put in messages


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message without terminal colour codes, or
    the exception's type name when the message is empty (``EOFError()`` has none): what a
    one-line error quotes of a library's exception."""
    lines = [line.strip() for line in ANSI_CODES.sub("", str(exc)).splitlines()]
    return next((line for line in lines if line), type(exc).__name__)


class SaliencyCheckError(Exception):
    """Base class: a problem the user can fix, reported as one line, never a traceback."""

    exit_code: int = 2


class ConfigError(SaliencyCheckError):
    """The config file is missing, unparsable or invalid (names the file and YAML path)."""


class DataError(SaliencyCheckError):
    """Images, labels or listing files cannot be found or read."""


class ModelError(SaliencyCheckError):
    """The model cannot be built, its weights cannot be loaded, or a named layer is missing."""


class MethodError(SaliencyCheckError):
    """An attribution method cannot be applied to this model (e.g. no ReLU to modify)."""


class UsageError(SaliencyCheckError):
    """A command-line option or environment variable (--shard, SLURM_ARRAY_*) is invalid."""


class StoreError(SaliencyCheckError):
    """An output folder's stored units cannot be resumed or merged (another config, missing)."""


class WorkerError(SaliencyCheckError):
    """A work unit kept failing on a worker beyond runtime.max_retries (a crashed process, a
    lost node): the other finished units are stored, so ``--resume`` retries only the rest."""

    exit_code = 3


class UserCodeError(SaliencyCheckError):
    """Code the user named (a model factory, a model's forward, a custom method) ended the
    process (``sys.exit``) or failed in a way saliencycheck cannot fix: exit 3 naming it,
    never an exit code that could pass for the run's verdict."""

    exit_code = 3


class InputIgnoredWarning(UserWarning):
    """The model's logits do not depend on its input: every gradient-based map is zero."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI cancellation, a Slurm time limit), raised by the CLI's signal handler and
    handled like Ctrl-C: finished units are kept and the report is written from them."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by ``interrupt`` while its units ran; the report of the units done was
    written (run.json says ``complete: false``)."""

    def __init__(self, interrupt: KeyboardInterrupt, *, units_done: int,
                 units_total: int) -> None:
        super().__init__(f"interrupted after {units_done} of {units_total} units")
        self.interrupt = interrupt
        self.units_done = units_done
        self.units_total = units_total

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process its signal ended."""
        return 143 if isinstance(self.interrupt, Terminated) else 130
