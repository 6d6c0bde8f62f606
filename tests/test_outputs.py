"""The output folder: checked writable before any work; a failure while the report is written
leaves no earlier run's report passing for this one (run.json, written last, is absent)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from saliencycheck.runner import run as run_module
from tests.test_batch import run_cli, write_project


def _error_line(output: str) -> str:
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in output
    return line


@pytest.mark.parametrize(("target", "message"), [
    ("afile", "is a file, not a folder; set config.yaml: output.dir (or -o) to a folder"),
    ("/proc/saliencycheck-out", "cannot write to /proc/saliencycheck-out ("),
])
def test_an_output_folder_that_cannot_be_written_is_one_line_exit_2(
        tmp_path: Path, target: str, message: str) -> None:
    config = write_project(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    result = run_cli("run", config, "-o", tmp_path / target if target == "afile" else target)
    assert result.exit_code == 2, result.output
    line = _error_line(result.output)
    assert line.startswith("error: config.yaml: output.dir: ") and message in line, line
    assert "model" not in result.output.split("error:")[0], "checked before the model loads"


def test_merge_into_a_file_is_one_line_exit_2(tmp_path: Path) -> None:
    config = write_project(tmp_path)
    assert run_cli("run", config, "--shard", "0/1").exit_code == 0
    (tmp_path / "afile").write_text("not a folder")
    result = run_cli("merge", tmp_path / "out", "-o", tmp_path / "afile")
    assert result.exit_code == 2, result.output
    assert "-o: " in _error_line(result.output) and "is a file" in result.output


def test_a_full_disk_while_the_report_is_written_leaves_no_report_passing_as_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_project(tmp_path)
    out = tmp_path / "out"
    assert run_cli("run", config).exit_code == 0
    assert json.loads((out / "run.json").read_text())["config"]["runtime"]["seed"] == 0

    def full_disk(path: Path, rows: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_module, "write_summary", full_disk)
    result = run_cli("run", config, "--set", "runtime.seed=3")
    assert result.exit_code == 2, result.output
    line = _error_line(result.output)
    assert "No space left on device" in line and "holds no complete report" in line
    assert "--resume (or merge) writes the report" in line
    # The first run's run.json is gone: its summary next to the new report.csv is not
    # presented as this run's complete result.
    assert not (out / "run.json").exists()
    monkeypatch.undo()
    resumed = run_cli("run", config, "--set", "runtime.seed=3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed: 4 of 4 units were already stored" in resumed.output
    assert json.loads((out / "run.json").read_text())["config"]["runtime"]["seed"] == 3
