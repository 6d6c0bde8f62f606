"""Atomic file writes: a uniquely named temporary file in the same folder, then a rename.

Readers never see a half-written file, and concurrent writers (Slurm array tasks sharing one
output folder, on one node or several) never write into each other's temporary file.
"""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary path next to ``path``, then rename it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping]) -> None:
    """A CSV file with a header of ``fields`` and one line per row (a mapping), atomically."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
