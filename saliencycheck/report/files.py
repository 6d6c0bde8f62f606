"""Reading a stored run's files back: the CSV tables and run.json, with one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from saliencycheck.errors import DataError


def read_run_json(folder: Path) -> dict[str, Any]:
    """run.json of a finished run; DataError naming the fix otherwise."""
    path = folder / "run.json"
    if not path.is_file():
        raise DataError(f"{folder}: no run.json, so no finished report to show (the run did "
                        "not finish or is still running); finish it with `saliencycheck run "
                        "CONFIG --resume`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a saliencycheck run.json ({type(exc).__name__})") \
            from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: not a saliencycheck run.json (not an object)")
    return info


def read_rows(path: Path, *, required: bool = False) -> list[dict[str, str]]:
    """The rows of a CSV file of the report ([] when absent and not ``required``)."""
    if not path.is_file():
        if required:
            raise DataError(f"{path}: not found; the folder holds no saliencycheck report "
                            "(rerun, or give the folder run wrote)")
        return []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
