"""`saliencycheck compare`: did a new run regress against a baseline run?

Both folders must hold a complete report (run.json, written last, covering every unit): a
folder whose run was cut short, or is still running, is refused instead of compared, so
"no regression" is never said of a report that is not there.

In a sanity check, a higher similarity to the trained model's maps after randomization is
worse: the method became less sensitive to the model. So a regression is a mean similarity
(summary.csv, any method × test × randomized stage × metric, and completeness's relative
error on the trained model) that rose by more than the tolerance, a score that became
undefined (constant maps) or defined, a verdict that went from PASS to FAIL or INVALID or
disappeared (verdicts.csv), or a score the baseline had and the new run lacks. Falls are
listed as improvements. Two scores point the other way and
regress when they *fall*: input invariance's similarity (the map should not change) and eMPRT's
entropy rise. The random-network floor, the edge-detector similarity, eMPRT's raw entropies
and label randomization's true-label control describe, they do not judge: they are not
compared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from saliencycheck.checks import get_check
from saliencycheck.errors import DataError
from saliencycheck.report.files import read_rows
from saliencycheck.verdicts import PASS

Key = tuple[str, str, int, str]  # method, test, stage_index, metric


def _worse_when(test: str, metric: str, stage: str) -> int:
    """+1: a rise is a regression; −1: a fall is; 0: not compared (a description). Each
    check says (``Check.direction``); a test this version does not know is compared as a
    similarity."""
    check = get_check(test)
    return 1 if check is None else check.direction(metric, stage)


def _compared(test: str, stage_index: int) -> bool:
    """Stage 0 is the trained model compared with itself (a score of 1), except for the
    checks that score the trained model alone (completeness)."""
    check = get_check(test)
    return stage_index > 0 or (check is not None and check.compares_trained())


@dataclass(frozen=True)
class Change:
    """One score or verdict that moved between the runs."""

    method: str
    test: str
    stage: str
    metric: str
    baseline: str
    new: str
    delta: float | None  # new − baseline mean; None for verdicts and missing scores


@dataclass(frozen=True)
class Comparison:
    regressions: list[Change]
    improvements: list[Change]
    compared: int  # scores present in both runs


def check_complete(folder: Path) -> None:
    """Raise DataError unless ``folder`` holds a complete report: run.json present (it is
    written last), readable, and covering every planned unit."""
    path = folder / "run.json"
    if not path.is_file():
        raise DataError(f"{folder}: no complete report (run.json is absent: the run did not "
                        "finish, stopped while writing its report, or is still running); "
                        "finish it with `saliencycheck run CONFIG --resume`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        done, total = int(info["units_done"]), int(info["units_total"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a saliencycheck run.json ({type(exc).__name__}); give "
                        "the output folder of a finished run") from None
    if done < total or info.get("complete") is False:
        raise DataError(f"{folder}: its report is partial ({done} of {total} units"
                        + (f", interrupted by {info['interrupted_by']}"
                           if info.get("interrupted_by") else "")
                        + "); finish it with `saliencycheck run CONFIG --resume` before "
                        "comparing")


def _means(folder: Path) -> dict[Key, tuple[str, float]]:
    rows = read_rows(folder / "summary.csv", required=True)
    try:
        return {(r["method"], r["test"], int(r["stage_index"]), r["metric"]):
                (r["stage"], float(r["mean"])) for r in rows
                if _compared(r["test"], int(r["stage_index"]))}
    except (KeyError, ValueError) as exc:
        raise DataError(f"{folder / 'summary.csv'}: not a saliencycheck summary ({exc})") \
            from None


def _verdicts(folder: Path) -> dict[tuple[str, str], dict[str, str]]:
    path = folder / "verdicts.csv"
    return {(r["method"], r["test"]): r for r in read_rows(path)} if path.is_file() else {}


def compare_runs(baseline: Path, new: Path, *, tolerance: float = 0.05) -> Comparison:
    """Regressions and improvements of ``new`` against ``baseline`` beyond ``tolerance``."""
    if not tolerance >= 0:
        raise DataError(f"--tolerance must be ≥ 0, got {tolerance}")
    for folder in (baseline, new):
        check_complete(folder)
    before, after = _means(baseline), _means(new)
    regressions, improvements, compared = [], [], 0
    for key, (stage, old) in sorted(before.items()):
        method, test, _, metric = key
        direction = _worse_when(test, metric, stage)
        if not direction:
            continue
        if key not in after:
            regressions.append(Change(method, test, stage, metric, f"{old:.3f}", "missing",
                                      None))
            continue
        value = after[key][1]
        if math.isnan(old) or math.isnan(value):
            # defined in one run only: the maps became constant, or stopped being; either
            # way the comparison cannot vouch for the new run
            if math.isnan(old) != math.isnan(value):
                regressions.append(
                    Change(method, test, stage, metric, f"{old:.3f}", f"{value:.3f}", None))
            continue
        compared += 1
        delta = value - old
        change = Change(method, test, stage, metric, f"{old:.3f}", f"{value:.3f}", delta)
        if delta * direction > tolerance:
            regressions.append(change)
        elif delta * direction < -tolerance:
            improvements.append(change)
    old_verdicts, new_verdicts = _verdicts(baseline), _verdicts(new)
    for key, row in sorted(old_verdicts.items()):
        if row["verdict"] != PASS:
            continue
        now = new_verdicts.get(key)
        if now is None or now["verdict"] != PASS:
            regressions.append(Change(key[0], key[1], row["stage"], row["metric"], PASS,
                                      now["verdict"] if now else "missing", None))
    return Comparison(regressions, improvements, compared)
