"""Golden outputs: two small runs that cover every method, test and number-changing option
give the report files stored in tests/golden/ (`scripts/golden_outputs.py` writes them).

A refactor that changes no number must leave these runs byte-identical on the machine that
wrote them (`scripts/golden_outputs.py --check`, which also runs the quickstart); here the
numbers are compared to 1e-6 relative, so that another CPU's float summation order passes
while any real change to a score, a stage, a row or a verdict fails.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from saliencycheck.cli import app

GOLDEN = Path(__file__).resolve().parent / "golden"
CONFIGS = ["every_test", "layer_options"]
FILES = ["report.csv", "summary.csv", "stages.csv", "verdicts.csv"]


def seeded_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 initialised from seed 0 (the global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=num_classes)


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def same(got: str, expected: str) -> bool:
    """Equal text, or equal numbers to 1e-6 relative (NaN equals NaN)."""
    if got == expected:
        return True
    try:
        a, b = float(got), float(expected)
    except ValueError:
        return False
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_run_gives_the_stored_report(name: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(GOLDEN / f"{name}.yaml"), "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code in (0, 1), result.output
    for file in FILES:
        got, expected = read(tmp_path / "out" / file), read(GOLDEN / name / file)
        assert len(got) == len(expected), file
        for index, (row, stored) in enumerate(zip(got, expected)):
            assert row.keys() == stored.keys(), file
            wrong = [k for k in row if not same(row[k], stored[k])]
            assert not wrong, f"{file} row {index}: " + ", ".join(
                f"{k} {row[k]!r} != {stored[k]!r}" for k in wrong)
