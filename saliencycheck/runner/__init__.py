"""Plan, execute and store a run; `prepare` resolves a config, `run_check` runs it."""

from saliencycheck.runner.run import RunResult, run_check
from saliencycheck.runner.setup import RunSetup, prepare

__all__ = ["RunResult", "RunSetup", "prepare", "run_check"]
