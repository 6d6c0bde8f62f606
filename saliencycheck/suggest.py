"""'Did you mean ...?' for names a user typed: config keys, choices, methods, models, layers."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def not_one_of(error: dict[str, Any]) -> str | None:
    """For a pydantic ``literal_error`` on a string: which choices there are and the closest
    one; None for any other error."""
    value = error.get("input")
    if error.get("type") != "literal_error" or not isinstance(value, str):
        return None
    options = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
    return f"{value!r} is not one of {', '.join(options)}{did_you_mean(value, options)}"
