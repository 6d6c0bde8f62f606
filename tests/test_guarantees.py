"""What saliencycheck promises about the output folder and its exit codes (README: "What
saliencycheck guarantees"): it deletes only files it wrote, one run per folder at a time,
units never reused across changed inputs, and every way a run ends is an honest exit code."""

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
from PIL import Image

from saliencycheck.errors import StoreError
from saliencycheck.runner import lock as lock_module
from saliencycheck.runner import manifest as manifest_module
from saliencycheck.runner import run as run_module
from saliencycheck.runner.lock import FolderLock
from saliencycheck.runner.manifest import HashCache
from saliencycheck.runner.ownership import STATE_DIR, OutputFolder
from tests.test_batch import ROOT, run_cli, write_project
from tests.test_cli import tiny_cnn


def error_line(output: str) -> str:
    """The one `error:` line of a refused command (and no traceback)."""
    assert "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    return line


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but saliencycheck's own bookkeeping), with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and STATE_DIR not in p.relative_to(folder).parts}


def owned(folder: Path) -> dict[str, str]:
    return OutputFolder(folder).owned()


# --- ownership of the output folder -----------------------------------------------------------

def test_a_foreign_folder_is_refused_and_with_force_its_files_survive_every_run(
        tmp_path: Path) -> None:
    config = write_project(tmp_path, output={"figures": True})
    paper = tmp_path / "paper"
    (paper / "figures").mkdir(parents=True)
    (paper / "maps").mkdir()
    user_files = {"figures/fig1.pdf": b"%PDF-1.4 mine", "maps/notes.txt": b"keep",
                  "report.csv": b"my own report"}
    for name, data in user_files.items():
        (paper / name).write_bytes(data)

    refused = run_cli("run", config, "-o", paper)
    assert refused.exit_code == 2
    line = error_line(refused.output)
    assert "is not empty" in line and "not created by saliencycheck" in line and "--force" in line
    assert files_under(paper) == user_files

    # --force, but a user's file where saliencycheck would write its own: refused by name
    # before any work, never overwritten
    clash = run_cli("run", config, "-o", paper, "--force")
    assert clash.exit_code == 2
    assert "report.csv exists and was not written by saliencycheck" in error_line(clash.output)
    assert files_under(paper) == user_files
    (paper / "report.csv").unlink()
    del user_files["report.csv"]
    for attempt in range(2):  # the second run deletes the first run's files, and only those
        result = run_cli("run", config, "-o", paper, "--force", "--set",
                         f"runtime.seed={attempt}")
        assert result.exit_code == 0, result.output
        now = files_under(paper)
        assert {name: now[name] for name in user_files} == user_files
        assert set(now) - set(user_files) == set(owned(paper)), "every other file is recorded"
        assert (paper / "figures" / "curves_cascading.png").is_file()


def test_every_file_of_a_run_is_in_the_manifest_with_its_hash(tmp_path: Path) -> None:
    from saliencycheck.runner.ownership import file_sha256

    config = write_project(tmp_path, output={"figures": True, "save_maps": True},
                           thresholds={"cascading": {"metric": "ssim", "max": 2.0}})
    result = run_cli("run", config, "--junit", tmp_path / "out" / "junit.xml")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    manifest = owned(out)
    assert set(files_under(out)) == set(manifest)
    assert {"run.json", "report.csv", "summary.csv", "verdicts.csv", "junit.xml",
            "units/plan.json", "maps/img0.npz"} <= set(manifest)
    assert all(file_sha256(out / name) == digest for name, digest in manifest.items())
    info = json.loads((out / "run.json").read_text())
    assert info["complete"] is True and info["interrupted_by"] is None
    assert set(info["report_files"]) <= set(manifest)


def test_a_file_the_user_changed_is_kept_with_a_warning(tmp_path: Path) -> None:
    config = write_project(tmp_path, output={"figures": True})
    assert run_cli("run", config).exit_code == 0
    edited = tmp_path / "out" / "figures" / "curves_cascading.png"
    edited.write_bytes(b"annotated by hand")
    result = run_cli("run", config, "--set", "output.figures=false")
    assert result.exit_code == 0, result.output
    assert edited.read_bytes() == b"annotated by hand"
    assert "changed since" in result.output and "curves_cascading.png" in result.output


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_option_is_an_error_not_the_current_folder(tmp_path: Path,
                                                                   value: str) -> None:
    config = write_project(tmp_path)
    for command in (["run", config, "-o", value], ["merge", tmp_path, "-o", value]):
        result = run_cli(*command)
        assert result.exit_code == 2
        assert "empty output folder" in error_line(result.output)


@pytest.mark.parametrize(("path", "output"), [("images", "images/out"), ("images", "images"),
                                              ("images/*.png", "images/run"),
                                              ("images", ".")])
def test_the_output_folder_may_not_overlap_the_images(tmp_path: Path, path: str,
                                                      output: str) -> None:
    config = write_project(tmp_path)
    settings = ["--set", f"images.path={path}", "--set", f"output.dir={output}"]
    for command in (["validate"], ["run", "--force"]):
        result = run_cli(*command, config, *settings)
        assert result.exit_code == 2, result.output
        assert "images" in error_line(result.output)
    assert not (tmp_path / "images" / "out").exists()


# --- one run per folder -------------------------------------------------------------------------

def _hold(folder: Path, *, shared: bool) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until its stdin closes."""
    code = ("import sys; from pathlib import Path; from saliencycheck.runner.lock import "
            f"FolderLock\nwith FolderLock(Path({str(folder)!r}), shared={shared}):\n"
            "    print('held', flush=True); sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def test_folder_lock_exclusive_shared_and_the_holder_named(tmp_path: Path) -> None:
    other = _hold(tmp_path, shared=False)
    try:
        for shared in (False, True):
            with pytest.raises(StoreError, match=rf"in use by another saliencycheck run \(PID "
                                                 rf"{other.pid} on .*, started "):
                FolderLock(tmp_path, shared=shared).__enter__()
    finally:
        other.communicate("")
    shards = [_hold(tmp_path, shared=True) for _ in range(2)]  # shards run side by side
    try:
        with FolderLock(tmp_path, shared=True):
            pass
        with pytest.raises(StoreError, match="in use by shards of an array job"):
            FolderLock(tmp_path).__enter__()
    finally:
        for shard in shards:
            shard.communicate("")
    with FolderLock(tmp_path), FolderLock(tmp_path, shared=True):  # re-entered: a no-op
        pass
    assert not list((tmp_path / STATE_DIR).glob("holder-*"))


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    holder = _hold(tmp_path, shared=False)
    holder.kill()
    holder.wait()
    with FolderLock(tmp_path):  # the kernel released the flock; its record is stale
        assert [p.name for p in (tmp_path / STATE_DIR).glob("holder-*")] == \
            [f"holder-{lock_module.socket.gethostname()}-{os.getpid()}.json"]


def test_without_flock_a_stale_holder_is_detected_by_its_pid(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    def no_flock(*_: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = tmp_path / STATE_DIR
    state.mkdir()
    holder = {"host": lock_module.socket.gethostname(), "started": time.time(),
              "command": "saliencycheck run old.yaml", "shared": False}
    (state / f"holder-x-{dead.pid}.json").write_text(json.dumps({**holder, "pid": dead.pid}))
    with FolderLock(tmp_path):  # the dead holder is stale: taken over
        assert not (state / f"holder-x-{dead.pid}.json").exists()
    live = {**holder, "pid": os.getppid(), "command": "saliencycheck run live.yaml"}
    (state / "holder-y-1.json").write_text(json.dumps(live))
    with pytest.raises(StoreError, match="live.yaml"):
        FolderLock(tmp_path).__enter__()


def _slow_run(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saliencycheck", "run", str(config), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_units(process: subprocess.Popen, units: Path, count: int = 1) -> None:
    deadline = time.time() + 120
    while process.poll() is None and len(list(units.glob("unit-*.json"))) < count:
        assert time.time() < deadline, "the run stored no unit in 2 minutes"
        time.sleep(0.01)


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    config = write_project(tmp_path, model={"factory": "tests.test_batch:slow_cnn"})
    first = _slow_run(config)
    try:
        _wait_for_units(first, tmp_path / "out" / "units")
        second = run_cli("run", config)
        assert second.exit_code == 2
        line = error_line(second.output)
        assert f"PID {first.pid}" in line and "started" in line and "another folder" in line
    finally:
        stderr = first.communicate(timeout=300)[1].decode()
    assert first.returncode == 0, stderr
    assert len(list((tmp_path / "out" / "units").glob("unit-*.json"))) == 4


# --- content fingerprints -----------------------------------------------------------------------

def test_resume_refuses_an_image_replaced_by_one_of_the_same_size(tmp_path: Path) -> None:
    config = write_project(tmp_path)
    assert run_cli("run", config).exit_code == 0
    image = tmp_path / "images" / "img2.png"
    stat = image.stat()
    other = np.asarray(Image.open(tmp_path / "images" / "img1.png"))
    replaced = tmp_path / "replacement.png"
    Image.fromarray(other[::-1].copy()).save(replaced)
    data = replaced.read_bytes()
    assert len(data) != stat.st_size or True
    image.write_bytes(data[: stat.st_size].ljust(stat.st_size, b"\0"))  # same size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the same mtime
    result = run_cli("run", config, "--resume")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "image img2.png" in line and "SHA-256" in line and "run without --resume" in line


def test_resume_and_merge_refuse_a_checkpoint_replaced_at_the_same_path(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(tiny_cnn(10).state_dict(), weights)
    config = write_project(tmp_path, model={"weights": str(weights)})
    assert run_cli("run", config, "--shard", "0/2").exit_code == 0
    model = tiny_cnn(10)
    with torch.no_grad():
        next(model.parameters()).mul_(2)
    torch.save(model.state_dict(), weights)
    resumed = run_cli("run", config, "--resume")
    assert resumed.exit_code == 2
    assert "model.weights" in error_line(resumed.output)
    assert run_cli("run", config, "--shard", "1/2").exit_code == 2  # the shard refuses too
    merged = run_cli("merge", tmp_path / "out", "--allow-partial")
    assert merged.exit_code == 2
    assert "model.weights" in error_line(merged.output)


def test_hashes_are_cached_by_stat_and_read_again_when_the_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = manifest_module.file_sha256
    monkeypatch.setattr(manifest_module, "file_sha256",
                        lambda path: reads.append(path) or real(path))
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(bytes([i]) * 100)
    cache = HashCache(tmp_path)
    first = [cache.sha256(f) for f in files]
    cache.save()
    again = HashCache(tmp_path)
    assert [again.sha256(f) for f in files] == first and len(reads) == 3
    files[1].write_bytes(b"\x07" * 100)  # same size
    assert again.sha256(files[1]) != first[1] and len(reads) == 4


# --- honest exit codes --------------------------------------------------------------------------

class ExitingModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sys.exit(0)


def exiting_model(num_classes: int = 10) -> torch.nn.Module:
    return ExitingModel()


def test_sys_exit_in_user_code_is_exit_3_never_0(tmp_path: Path) -> None:
    config = write_project(tmp_path, model={"factory": "tests.test_guarantees:exiting_model"})
    for command in ("validate", "run"):
        result = run_cli(command, config)
        assert result.exit_code == 3, result.output
        assert "sys.exit(0)" in error_line(result.output)
    assert not (tmp_path / "out" / "run.json").exists()


def test_sigterm_keeps_the_units_writes_a_partial_report_and_exits_143(tmp_path: Path) -> None:
    config = write_project(tmp_path, model={"factory": "tests.test_batch:slow_cnn"})
    out = tmp_path / "out"
    process = _slow_run(config)
    try:
        _wait_for_units(process, out / "units")
        process.send_signal(signal.SIGTERM)
    finally:
        stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated (SIGTERM)" in stderr
    info = json.loads((out / "run.json").read_text())
    assert info["complete"] is False and info["interrupted_by"] == "SIGTERM"
    assert 1 <= info["units_done"] < 4
    refused = run_cli("compare", out, out)
    assert refused.exit_code == 2 and "partial" in error_line(refused.output)
    result = run_cli("run", config, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["complete"] is True


def test_an_interrupt_while_the_report_is_written_leaves_no_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_project(tmp_path)
    out = tmp_path / "out"
    assert run_cli("run", config).exit_code == 0
    old_summary = (out / "summary.csv").read_bytes()

    def interrupt(path: Path, rows: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_summary", interrupt)
    result = run_cli("run", config, "--set", "runtime.seed=5")
    assert result.exit_code == 130
    assert "holds no report (run.json absent)" in result.output
    assert "reports were written" not in result.output
    assert not (out / "run.json").exists()
    assert not (out / "summary.csv").exists() or (out / "summary.csv").read_bytes() != old_summary
    refused = run_cli("compare", out, out)
    assert refused.exit_code == 2 and "no complete report" in error_line(refused.output)


def test_junit_and_init_paths_are_checked_before_any_work(tmp_path: Path) -> None:
    config = write_project(tmp_path)
    for junit in ("/proc/saliencycheck.xml", str(tmp_path)):
        result = run_cli("run", config, "--junit", junit)
        assert result.exit_code == 2
        assert "--junit" in error_line(result.output)
        assert "loading model" not in result.output and not (tmp_path / "out" / "units").exists()
    for target, message in ((tmp_path / "missing" / "c.yaml", "does not exist"),
                            (Path("/proc/c.yaml"), "cannot write"),
                            (tmp_path, "is a folder")):
        result = run_cli("init", target)
        assert result.exit_code == 2
        assert message in error_line(result.output)


@pytest.mark.parametrize("damage", ["plan", "unit", "manifest", "context"])
def test_corrupt_internal_files_are_named_with_the_fix(tmp_path: Path, damage: str) -> None:
    config = write_project(tmp_path)
    out = tmp_path / "out"
    assert run_cli("run", config).exit_code == 0
    target = {"plan": out / "units" / "plan.json", "unit": out / "units" / "unit-00001.json",
              "manifest": out / STATE_DIR / "manifest.json",
              "context": out / "units" / "context.json"}[damage]
    target.write_bytes(b"{\xff not json")
    result = run_cli("run", config, "--resume")
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert target.name in line and "corrupt" in line
    if damage in ("plan", "unit"):
        merged = run_cli("merge", out)
        assert merged.exit_code == 2 and target.name in error_line(merged.output)
