"""Batch runs: resume after SIGKILL, shards and merge, the local worker pool, and their parts.

Every end-to-end test compares report.csv byte for byte with one uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import Result
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from saliencycheck.atomic import atomic_write, atomic_write_text
from saliencycheck.cli import app
from saliencycheck.errors import UsageError
from saliencycheck.results import ScoreRow
from saliencycheck.runner import backends
from saliencycheck.runner.backends import worker_devices
from saliencycheck.runner.plan import plan_units
from saliencycheck.runner.shards import Shard, parse_shard, shard_from_env
from saliencycheck.runner.store import ResultStore, UnitResult
from tests.test_cli import tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _pause(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    time.sleep(0.01)


def slow_cnn(num_classes: int = 10) -> nn.Module:
    """`tiny_cnn` (same modules, same weights) whose every forward pauses, so that a run
    lasts long enough to be killed between its first and its last unit."""
    model = tiny_cnn(num_classes)
    model.register_forward_pre_hook(_pause)
    return model


LABEL_TEST = {"label_randomization": {"train": {"data": "digits", "limit": 10, "epochs": 1,
                                               "control": False}}}


def write_project(root: Path, *, images: int = 4, **sections: dict) -> Path:
    """Images and a small config (two methods, the cascading and random logit tests, no
    figures; ``sections`` add to or replace its sections) under root."""
    folder = root / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png")
    config = {
        "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 10},
        "images": {"path": "images", "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": ["gradient"],
        "tests": {"random_logit": {"enabled": True}},
        "metrics": ["spearman_abs", "ssim"],
        "baselines": {"edges": False, "random_floor": False},
        "runtime": {"device": "cpu", "batch_size": 1, "bootstrap": 100},
        "output": {"dir": "out", "figures": False, "figure_images": 1},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


def run_cli(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def report(folder: Path) -> bytes:
    return (folder / "report.csv").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted local run of the small project: the report every other must equal."""
    config = write_project(tmp_path_factory.mktemp("reference"))
    result = run_cli("run", config)
    assert result.exit_code == 0, result.output
    return config.parent / "out"


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path,
                                                            reference: Path) -> None:
    config = write_project(tmp_path, model={"factory": "tests.test_batch:slow_cnn"})
    units = tmp_path / "out" / "units"
    process = subprocess.Popen([sys.executable, "-m", "saliencycheck", "run", str(config)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while process.poll() is None and not list(units.glob("unit-*.json")):
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, stderr
    stored = sorted(p.name for p in units.glob("unit-*.json"))
    assert 1 <= len(stored) < 4, "killed after the first unit, long before the last"
    assert not (tmp_path / "out" / "report.csv").exists()

    result = run_cli("run", config, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resumed: {len(stored)} of 4 units were already stored" in result.output
    assert report(tmp_path / "out") == report(reference)
    assert (tmp_path / "out" / "summary.csv").read_bytes() == \
        (reference / "summary.csv").read_bytes()


def test_resume_refuses_units_of_another_config(tmp_path: Path) -> None:
    config = write_project(tmp_path)
    assert run_cli("run", config).exit_code == 0
    result = run_cli("run", config, "--resume", "--set", "runtime.seed=3")
    assert result.exit_code == 2
    assert "differs in runtime.seed" in result.output
    assert "run without --resume" in result.output
    # Where units run changes no score: resuming on another backend or device is allowed.
    result = run_cli("run", config, "--resume", "--set", "runtime.max_retries=0")
    assert result.exit_code == 0, result.output
    assert "resumed: 4 of 4 units were already stored" in result.output


def test_shards_merged_give_the_report_of_one_run(tmp_path: Path, reference: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_project(tmp_path, output={"figures": True},  # figures change no score
                           thresholds={"cascading": {"metric": "ssim", "max": 2}})
    out = tmp_path / "out"
    assert run_cli("run", config, "--shard", "0/3").exit_code == 0
    assert not (out / "report.csv").exists()
    # A Slurm array --array=1-3: task 3 is shard 2/3.
    for name, value in {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
                        "SLURM_ARRAY_TASK_COUNT": "3"}.items():
        monkeypatch.setenv(name, value)
    result = run_cli("run", config)
    assert result.exit_code == 0, result.output
    assert "shard 2/3: 1 of its 1 units stored" in result.output
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")

    result = run_cli("merge", out)
    assert result.exit_code == 2
    assert "shards 1/3 have not finished: 1 of 4 units missing (unit-00001)" in result.output
    assert not (out / "report.csv").exists()

    # Resubmitting only the missing task (`sbatch --array=1`): the variables now describe a
    # one-task array, which would silently run every unit as "shard 0/1"; refused instead.
    for name, value in {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1",
                        "SLURM_ARRAY_TASK_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    result = run_cli("run", config)
    assert result.exit_code == 2
    last = result.output.splitlines()[-1]
    assert last.startswith("error:") and "Traceback" not in result.output, result.output
    assert "holds the units of 3 shards" in last
    assert '--shard "$SLURM_ARRAY_TASK_ID/3"' in last
    assert not (out / "units" / "shards-1").exists()
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")

    assert run_cli("run", config, "--shard", "1/3").exit_code == 0
    result = run_cli("merge", out)
    assert result.exit_code == 0, result.output
    for name in ("report.csv", "summary.csv", "stages.csv"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert "PASS" in (out / "verdicts.csv").read_text()
    assert (out / "figures" / "img0" / "cascading.png").is_file()
    info = json.loads((out / "run.json").read_text())
    assert (info["units_done"], info["units_total"]) == (4, 4)
    # the merged run's page, and `report` regenerates it from the folder alone
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "PASSED (exit code 0)" in page and "report.html" in info["report_files"]
    assert run_cli("report", out, "-o", tmp_path / "again.html").exit_code == 0
    assert (tmp_path / "again.html").read_text(encoding="utf-8") == page


def test_merge_of_several_folders_and_its_refusals(tmp_path: Path, reference: Path) -> None:
    config = write_project(tmp_path)
    for index in range(2):
        result = run_cli("run", config, "--shard", f"{index}/2", "-o", tmp_path / f"s{index}")
        assert result.exit_code == 0, result.output
    result = run_cli("merge", tmp_path / "s0", tmp_path / "s1", "-o", tmp_path / "all")
    assert result.exit_code == 0, result.output
    assert report(tmp_path / "all") == report(reference)

    result = run_cli("merge", tmp_path / "s0")
    assert result.exit_code == 2 and "shards 1/2 have not finished" in result.output
    result = run_cli("merge", tmp_path / "s0", "--allow-partial")
    assert result.exit_code == 0, result.output
    assert "partial: 2 of 4 units merged" in result.output
    assert json.loads((tmp_path / "s0" / "run.json").read_text())["units_done"] == 2

    result = run_cli("merge", tmp_path / "images")
    assert result.exit_code == 2 and "no units/plan.json" in result.output
    other = run_cli("run", config, "--shard", "0/2", "-o", tmp_path / "seed1",
                    "--set", "runtime.seed=1")
    assert other.exit_code == 0, other.output
    result = run_cli("merge", tmp_path / "s1", tmp_path / "seed1")
    assert result.exit_code == 2 and "differs in runtime.seed" in result.output


def test_merge_exit_code_follows_the_gate(tmp_path: Path) -> None:
    config = write_project(tmp_path,
                           thresholds={"cascading": {"metric": "spearman_abs", "max": -2}})
    assert run_cli("run", config, "--shard", "0/1").exit_code == 0
    result = run_cli("merge", tmp_path / "out")
    assert result.exit_code == 1
    assert "check failed" in result.output


def test_a_pool_of_worker_processes_gives_the_same_report(tmp_path: Path, reference: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The multi-GPU path (one spawned worker per device), run with two CPU workers."""
    config = write_project(tmp_path)
    monkeypatch.setattr(backends, "worker_devices", lambda requested, count: ["cpu", "cpu"])

    def in_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("the units must run in the worker processes")

    monkeypatch.setattr(backends.InProcess, "run", in_process)
    result = run_cli("run", config)
    assert result.exit_code == 0, result.output
    assert report(tmp_path / "out") == report(reference)


def test_a_worker_process_that_dies_loses_only_its_unit(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_project(tmp_path, images=3, model={"factory": "tests.test_ray:dying_cnn"},
                           runtime={"batch_size": 2})
    monkeypatch.setattr(backends, "worker_devices", lambda requested, count: ["cpu", "cpu"])
    result = run_cli("run", config)
    assert result.exit_code == 3, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: 1 of 2 units did not finish: the worker on cpu exited "
                           "with code 1; the units that finished are stored: rerun with "
                           "--resume"), line
    # the other worker went on: its unit is stored
    units = tmp_path / "out" / "units"
    assert sorted(p.name for p in units.glob("unit-*.json")) == ["unit-00001.json"]


def test_worker_devices_use_every_gpu_unless_one_is_pinned() -> None:
    assert worker_devices("auto", 0) == ["auto"]
    assert worker_devices("auto", 1) == ["auto"]
    assert worker_devices("auto", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert worker_devices("cuda:1", 4) == ["cuda:1"]
    assert worker_devices("cpu", 4) == ["cpu"]


def test_shards_split_the_units_round_robin() -> None:
    units = plan_units(10, batch_size=1)
    parts = [Shard(i, 3).units(units) for i in range(3)]
    assert [u.id for u in parts[1]] == ["unit-00001", "unit-00004", "unit-00007"]
    assert sorted(u.id for part in parts for u in part) == [u.id for u in units]


@pytest.mark.parametrize(("text", "shard"), [("0/4", Shard(0, 4)), ("3/4", Shard(3, 4))])
def test_parse_shard(text: str, shard: Shard) -> None:
    assert parse_shard(text) == shard


@pytest.mark.parametrize(("text", "message"), [
    ("4/4", r"shard 4 is outside 0\.\.3; shards are 0-based"),
    ("1-4", r"expected I/N, e\.g\. --shard 0/4"),
    ("0/0", r"at least 1"),
])
def test_parse_shard_rejects(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_shard(text)


def test_shard_from_slurm_array_variables() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}) == \
        Shard(0, 4)
    one_based = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1",
                 "SLURM_ARRAY_TASK_COUNT": "4"}
    assert shard_from_env(one_based) == Shard(3, 4)
    stepped = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_STEP": "4", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert shard_from_env(stepped) == Shard(3, 4)
    with pytest.raises(UsageError, match="not an evenly spaced array"):
        shard_from_env({**stepped, "SLURM_ARRAY_TASK_ID": "5"})
    with pytest.raises(UsageError, match="outside 0..3.*--shard .*original array size"):
        shard_from_env({**one_based, "SLURM_ARRAY_TASK_MIN": "0"})
    assert shard_from_env(one_based).origin.startswith("SLURM_ARRAY_TASK_ID=4 (MIN=1")
    assert parse_shard("3/4").origin == ""


def test_only_a_shard_from_slurm_variables_must_match_the_stored_count() -> None:
    from_env = shard_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"})
    from_env.check_against([], where="out")
    from_env.check_against([2], where="out")
    with pytest.raises(UsageError, match="holds the units of 8 shards"):
        from_env.check_against([2, 8], where="out")
    parse_shard("0/2").check_against([8], where="out")  # explicit: the user's choice


def test_bad_shard_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("run", write_project(tmp_path), "--shard", "2/2")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "shards are 0-based" in result.output


def test_atomic_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(tmp_path) == ["plan.json"]


def test_a_write_failing_midway_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    atomic_write_text(target, "first")

    def half_then_full_disk(tmp: Path) -> None:
        tmp.write_text("sec")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_full_disk)
    assert target.read_text() == "first"
    assert os.listdir(tmp_path) == ["plan.json"]


def test_a_unit_cut_off_while_being_stored_is_not_finished(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Half of its JSON written, then the disk is full: the unit is not stored (a resume runs
    it again) and the store still loads."""
    row = ScoreRow(image="a.png", target=1, target_explained=1, method="gradient",
                   test="cascading", stage_index=1, stage="fc", metric="ssim", value=0.5)
    store = ResultStore(tmp_path)
    store.save(UnitResult("unit-00000", rows=[row]))
    write_text = Path.write_text

    def cut_off(self: Path, text: str, *args: object, **kwargs: object) -> int:
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_off)
    with pytest.raises(OSError):
        store.save(UnitResult("unit-00001", rows=[row]))
    monkeypatch.undo()
    assert store.unit_ids() == {"unit-00000"}
    assert store.load().rows == [row]
