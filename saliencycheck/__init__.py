"""saliencycheck: can I trust this saliency map?

Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018) and their successors. From
Python, ``saliencycheck.check(model, images, ...)`` runs them on a model in memory and returns
a ``Result``; from a shell, ``saliencycheck run config.yaml``. Attribution methods live in
``saliencycheck.methods``, similarity metrics in ``saliencycheck.metrics``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from saliencycheck.errors import ConfigError, SaliencyCheckError

if TYPE_CHECKING:
    from saliencycheck.api import Result, check, method

__version__ = "0.1.0"
__all__ = ["ConfigError", "Result", "SaliencyCheckError", "check", "method"]


def __getattr__(name: str) -> object:
    # Loaded on first use: `python -m saliencycheck` imports this package before its signal
    # handlers are installed, and the API pulls in torch (seconds), so it must not load here.
    if name in ("Result", "check", "method"):
        return getattr(import_module("saliencycheck.api"), name)
    raise AttributeError(f"module 'saliencycheck' has no attribute {name!r}")
