"""Plan, execute and store a run; `prepare` resolves a config, `run_check` runs it.

The names are loaded on first use, so that `saliencycheck.runner.store` (which the report
package reads) can be imported without importing the whole runner.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saliencycheck.runner.run import RunResult, run_check
    from saliencycheck.runner.setup import RunSetup, prepare

__all__ = ["RunResult", "RunSetup", "prepare", "run_check"]
_HOMES = {"RunResult": "run", "run_check": "run", "RunSetup": "setup", "prepare": "setup"}


def __getattr__(name: str) -> object:
    if name in _HOMES:
        return getattr(import_module(f"saliencycheck.runner.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'saliencycheck.runner' has no attribute {name!r}")
