"""Import a callable the user named in the config ('package.module:function').

Code from a config runs only through here, and only because the user wrote its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from saliencycheck.errors import first_line
from saliencycheck.suggest import did_you_mean


def import_callable(path: str) -> Callable[..., Any]:
    """The object at ``"package.module:attr.attr"``.

    A ValueError says what failed and the fix: the module named does not exist, it exists but
    its own imports fail (a package it needs is not installed), or it lacks the attribute.
    Anything else its import raises (SystemExit, SyntaxError, ...) propagates unchanged, so
    the caller can name the user's code that raised it.
    """
    module_name, sep, qualname = path.partition(":")
    if not (sep and module_name and qualname):
        raise ValueError(f"expected 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ValueError(f"cannot import {path!r}: there is no module {missing!r}; make it "
                             "importable (install it, or add its folder to PYTHONPATH) or fix "
                             "the name") from None
        raise ValueError(f"cannot import {path!r}: its module {module_name} exists, but its own "
                         f"import failed ({first_line(err)}); install the package that "
                         "provides it in this environment") from None
    except ImportError as err:  # e.g. 'cannot import name' inside the module
        raise ValueError(f"cannot import {path!r}: its module {module_name} exists, but its own "
                         f"import failed ({first_line(err)}); fix that import") from None
    for depth, attr in enumerate(qualname.split(".")):
        if not hasattr(obj, attr):
            owner = ".".join([module_name, *qualname.split(".")[:depth]])
            names = [name for name in dir(obj) if not name.startswith("_")]
            raise ValueError(f"cannot import {path!r}: {owner} has no attribute "
                             f"{attr!r}{did_you_mean(attr, names)}; fix the name")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"{path!r} is a {type(obj).__name__}, not a function")
    return obj
