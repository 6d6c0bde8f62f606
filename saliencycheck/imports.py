"""Import a callable the user named in the config ('package.module:function').

Code from a config runs only through here, and only because the user wrote its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def import_callable(path: str) -> Callable[..., Any]:
    """The object at ``"package.module:attr.attr"``; ValueError saying what failed otherwise."""
    module_name, sep, qualname = path.partition(":")
    if not (sep and module_name and qualname):
        raise ValueError(f"expected 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"cannot import {path!r} ({type(err).__name__}: {err}); make it importable or fix "
            "the name"
        ) from None
    if not callable(obj):
        raise ValueError(f"{path!r} is a {type(obj).__name__}, not a function")
    return obj
