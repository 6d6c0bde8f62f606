"""Bad input through the CLI: every case gets its exit code and one line naming the file or
YAML path and the fix, never a traceback. The corpus is generated here, not downloaded."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from saliencycheck.cli import app
from saliencycheck.data import MIN_SIDE, UnreadableImage, read_rgb
from tests.test_cli import tiny_cnn

runner = CliRunner()
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (40, 40, 3), dtype=np.uint8)


def _jpeg(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# name -> (file bytes, usable?)
CORPUS: dict[str, tuple[bytes, bool]] = {
    "good.png": (_png(Image.fromarray(RGB)), True),
    "corrupt.jpg": (_jpeg(RGB)[:300] + RNG.integers(0, 255, 600, dtype=np.uint8).tobytes(),
                    False),
    "truncated.png": (_png(Image.fromarray(RGB))[:2000], False),
    "text.jpg": (b"hello, I am not an image", False),
    "empty.png": (b"", False),
    "sixteen_bit.png": (_png(Image.fromarray(
        RNG.integers(0, 65535, (40, 40)).astype(np.uint16))), True),
    "cmyk.jpg": (_jpeg(RGB, "CMYK"), True),
    "palette.png": (_png(Image.fromarray(RGB).convert("P")), True),
    "rgba.png": (_png(Image.fromarray(np.dstack([RGB, np.full((40, 40, 1), 9, np.uint8)]))),
                 True),
    "gray.png": (_png(Image.fromarray(RGB[..., 0])), True),
    "one_pixel.png": (_png(Image.fromarray(RGB[:1, :1])), False),
    "bomb.png": (_png(Image.new("1", (20000, 20000))), False),  # 400 M pixels declared
}


def _config(tmp_path: Path, **changes) -> Path:
    config = {
        "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 4},
        "images": {"path": "images", "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": ["gradient"],
        "tests": {"cascading": {"enabled": True}},
        "metrics": ["spearman_abs"],
        "baselines": {"random_floor": False, "edges": False},
        "runtime": {"device": "cpu", "bootstrap": 100},
        "output": {"dir": "out", "figures": False},
        **changes,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _one_line_error(result, *fragments: str) -> None:
    """Exit code 2, one ``error:`` line holding every fragment, no traceback."""
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    text = " ".join(output[output.index("error:"):].split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (data, _) in CORPUS.items():
        (folder / name).write_bytes(data)
    return folder


def test_every_file_of_the_corpus_is_converted_or_refused_with_a_reason(corpus: Path) -> None:
    for name, (_, usable) in CORPUS.items():
        if usable:
            image = read_rgb(corpus / name)
            if isinstance(image, torch.Tensor):  # high bit depth: float (3, H, W) in [0, 1]
                assert image.shape == (3, 40, 40) and 0 <= image.min() <= image.max() <= 1
            else:
                assert image.mode == "RGB" and image.size == (40, 40), name
        else:
            with pytest.raises(UnreadableImage) as refused:
                read_rgb(corpus / name)
            assert str(refused.value), name
    sixteen = read_rgb(corpus / "sixteen_bit.png")
    raw = np.asarray(Image.open(corpus / "sixteen_bit.png"), dtype=np.float64) / 65535
    np.testing.assert_allclose(sixteen[0].numpy(), raw, rtol=1e-6)  # no 8-bit clipping
    assert "decompression bomb" in _reason(corpus / "bomb.png")
    assert f"at least {MIN_SIDE} px" in _reason(corpus / "one_pixel.png")
    assert "0 bytes" in _reason(corpus / "empty.png")


def _reason(path: Path) -> str:
    with pytest.raises(UnreadableImage) as refused:
        read_rgb(path)
    return str(refused.value)


def test_a_run_over_the_corpus_skips_the_unreadable_and_lists_them(tmp_path: Path,
                                                                   corpus: Path) -> None:
    result = runner.invoke(app, ["run", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    report = (tmp_path / "out" / "report.csv").read_text()
    unusable = {name for name, (_, usable) in CORPUS.items() if not usable}
    for name in CORPUS:
        assert (name in report) == (name not in unusable), name
    assert result.output.count("skipped unreadable image") == len(unusable)
    listed = json.loads((tmp_path / "out" / "run.json").read_text())["skipped_images"]
    assert {Path(s["path"]).name for s in listed} == unusable
    assert all(s["reason"] for s in listed)


def test_a_permission_error_is_a_skip_not_a_crash(tmp_path: Path, corpus: Path,
                                                  monkeypatch) -> None:
    real_open = Image.open

    def deny(path, *args, **kwargs):  # noqa: ANN001, ANN202 (root reads any file: simulate)
        if Path(path).name == "gray.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", deny)
    assert "Permission denied" in _reason(corpus / "gray.png")
    result = runner.invoke(app, ["run", str(_config(tmp_path))])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    with (tmp_path / "out" / "skipped.csv").open(newline="") as fh:
        reasons = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert "Permission denied" in reasons["gray.png"]


def test_no_usable_image_exits_2(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("not an image")
    _one_line_error(runner.invoke(app, ["run", str(_config(tmp_path))]),
                    "none of the 2 images could be read", "a.png: empty file (0 bytes))",
                    "images.path")


@pytest.mark.parametrize(("setup", "fragments"), [
    ("empty_folder", ("images.path: no images found",)),
    ("missing", ("images.path: 'nowhere' does not exist",)),
])
def test_missing_or_empty_image_folders_exit_2(tmp_path: Path, setup: str,
                                               fragments: tuple[str, ...]) -> None:
    (tmp_path / "images").mkdir()
    path = _config(tmp_path, **({"images": {"path": "nowhere"}} if setup == "missing" else {}))
    _one_line_error(runner.invoke(app, ["run", str(path)]), *fragments)


@pytest.mark.parametrize(("override", "fragments"), [
    ("runtime.devise=cpu", ("runtime.devise: unknown key 'devise' (did you mean 'device'?)",)),
    ("tests.cascadng={enabled: true}", ("did you mean 'cascading'?",)),
    ("metrics=[spearmann]", ("metrics[0]: 'spearmann' is not one of",
                             "did you mean 'spearman'?")),
    ("methods=[gradiant]", ("methods[0].name: unknown method 'gradiant'",
                            "did you mean 'gradient'?")),
    ("methods=[{name: integrated_gradients, stpes: 4}]", ("did you mean 'steps'?",)),
    ("methods=[{name: integrated_gradients, steps: 0}]", ("methods[0].steps:",
                                                          "greater than or equal to 1")),
    ("methods=[{name: smoothgrad, samples: -3}]", ("methods[0].samples:",)),
    ("runtime.batch_size=0", ("runtime.batch_size:", "greater than or equal to 1")),
    ("runtime.batch_size=many", ("runtime.batch_size:", "valid integer")),
    ("thresholds={cascading: {metric: spearman_abs, maxx: 0.2}}", ("did you mean 'max'?",)),
    ("thresholds={cascadin: {metric: spearman_abs, max: 0.2}}",
     ("thresholds.cascadin", "did you mean 'cascading'?")),
    ("methods=[{name: gradcam, layer: '6.0'}]", ("methods[0].layer: the model has no module",
                                                 "did you mean '5.0'?",
                                                 "its last convolutions are")),
    ("runtime.device=cuda", ("runtime.device: CUDA requested but not available",)),
    ("runtime.device=tpu", ("runtime.device: 'tpu' is not a device",)),
    *[(f"runtime.device={name}", (f"runtime.device: {name!r} is not supported",
                                  "use auto, cpu, cuda or cuda:N with N < "
                                  "torch.cuda.device_count()"))
      for name in ("mps", "xpu", "meta")],
    ("runtime.seed=-5", ("runtime.seed:", "greater than or equal to 0")),
    ("images.size=100000", ("images.size: 100000 px is too large: at most 4096",
                            "give a smaller size")),
    ("model={name: resnt18}", ("model.name: unknown torchvision model 'resnt18'",
                               "did you mean 'resnet18'?")),
])
def test_config_mistakes_name_the_field_and_the_fix(tmp_path: Path, corpus: Path,
                                                     override: str,
                                                     fragments: tuple[str, ...],
                                                     monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    path = _config(tmp_path)
    _one_line_error(runner.invoke(app, ["validate", str(path), "--set", override]),
                    "config.yaml", *fragments)


def test_a_gpu_index_beyond_the_machines_gpus_exits_2(tmp_path: Path, corpus: Path,
                                                     monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a two-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = runner.invoke(app, ["validate", str(_config(tmp_path)), "--set",
                                 "runtime.device=cuda:7"])
    _one_line_error(result, "config.yaml: runtime.device: 'cuda:7' names GPU 7, but this "
                    "machine has 2 (cuda:0 to cuda:1)", "use auto, cpu, cuda or cuda:N")


def test_yaml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  name: resnet18\nimages: [unclosed\nruntime: {}\n")
    _one_line_error(runner.invoke(app, ["validate", str(path)]), "config.yaml: line ")


# --- checkpoints --------------------------------------------------------------------------


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def _model_config(tmp_path: Path, weights: str) -> Path:
    return _config(tmp_path, model={"name": "resnet18", "num_classes": 4, "weights": weights})


def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path,
                                                                  corpus: Path) -> None:
    import torchvision

    marker = tmp_path / "pwned"
    with (tmp_path / "evil.pt").open("wb") as fh:
        pickle.dump({"state_dict": Payload(str(marker))}, fh)
    torch.save({"state_dict": Payload(str(marker))}, tmp_path / "evil_zip.pt")
    torch.save(torchvision.models.resnet18(num_classes=4), tmp_path / "whole.pt")
    for name, what in (("evil.pt", "a raw Python pickle"),
                       ("evil_zip.pt", "pickled Python objects (getattr"),
                       ("whole.pt", "pickled Python objects (torchvision.models.resnet.ResNet, "
                                    "as torch.save(model) writes)")):
        with warnings.catch_warnings(record=True) as caught:  # torch's warnings: no noise
            warnings.simplefilter("always")
            result = runner.invoke(app, ["validate", str(_model_config(tmp_path, name))])
        _one_line_error(result, f"model.weights: {tmp_path / name} is not a plain state_dict "
                        f"but {what}", "loading it would run code, which weights_only=True "
                        "loading refuses", "from trusted code, re-save it with "
                        "torch.save(model.state_dict(), path)")
        assert "\x1b" not in result.output  # torch's own message has terminal colour codes
        assert not [w for w in caught if "pickle protocol" in str(w.message)], name
        assert not marker.exists()  # the payload did not run


def test_checkpoints_of_the_wrong_model_name_the_mismatch(tmp_path: Path, corpus: Path) -> None:
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pt")
    _one_line_error(runner.invoke(app, ["validate", str(_model_config(tmp_path, "ten.pt"))]),
                    "ten.pt does not match the model: size mismatch for fc.weight (checkpoint "
                    "[10, 512], model [4, 512]), fc.bias (checkpoint [10], model [4])",
                    "check model.name and model.num_classes")
    torch.save(torchvision.models.mobilenet_v2(num_classes=4).state_dict(),
               tmp_path / "other.pt")
    _one_line_error(runner.invoke(app, ["validate", str(_model_config(tmp_path, "other.pt"))]),
                    "other.pt does not match the model: 102 missing keys (first: conv1.weight, "
                    "bn1.weight, bn1.bias, bn1.running_mean, ...)",
                    "314 unexpected keys (first: features.0.0.weight, features.0.1.weight, "
                    "features.0.1.bias, features.0.1.running_mean, ...)")
    good = io.BytesIO()
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), good)
    for length in (5000, len(good.getvalue()) // 2):
        (tmp_path / "truncated.pt").write_bytes(good.getvalue()[:length])
        _one_line_error(runner.invoke(app, ["validate",
                                            str(_model_config(tmp_path, "truncated.pt"))]),
                        f"model.weights: {tmp_path / 'truncated.pt'} is truncated or corrupt",
                        "re-save it with torch.save(model.state_dict(), path), or download or "
                        "copy it again")


def test_an_empty_checkpoint_is_named_not_an_internal_error(tmp_path: Path,
                                                            corpus: Path) -> None:
    (tmp_path / "zero.pt").write_bytes(b"")
    _one_line_error(runner.invoke(app, ["validate", str(_model_config(tmp_path, "zero.pt"))]),
                    f"config.yaml: model.weights: {tmp_path / 'zero.pt'} is empty (0 bytes)",
                    "re-save it with torch.save(model.state_dict(), path)")


def _label_config(tmp_path: Path, checkpoint: str) -> Path:
    return _config(tmp_path, tests={"cascading": {"enabled": False},
                                    "label_randomization": {"checkpoint": checkpoint}})


@pytest.mark.parametrize("command", ["validate", "run"])
def test_label_randomization_checkpoints_are_loaded_by_validate_and_named_with_the_file(
        tmp_path: Path, corpus: Path, command: str) -> None:
    from tests.test_cli import tiny_cnn

    marker = tmp_path / "pwned"
    torch.save({"state_dict": Payload(str(marker))}, tmp_path / "evil.pt")
    (tmp_path / "zero.pt").write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "wrong.pt")
    where = "config.yaml: tests.label_randomization.checkpoint:"
    for name, problem in (("zero.pt", "is empty (0 bytes)"),
                          ("evil.pt", "is not a plain state_dict"),
                          ("wrong.pt", "does not match the model: 12 missing keys (first: "
                                       "0.weight, 0.bias, 2.weight, 2.bias, ...); 2 unexpected "
                                       "keys (first: weight, bias)")):
        result = runner.invoke(app, [command, str(_label_config(tmp_path, name))])
        _one_line_error(result, f"{where} {tmp_path / name} {problem}")
        assert not marker.exists()
    torch.save(tiny_cnn().state_dict(), tmp_path / "good.pt")
    result = runner.invoke(app, [command, str(_label_config(tmp_path, "good.pt"))])
    assert result.exit_code == 0, result.output


# --- numerics -----------------------------------------------------------------------------


class NanModel(torch.nn.Module):
    """A model whose outputs are NaN (as after an overflow)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3))) * float("nan")


class DeadBranchModel(torch.nn.Module):
    """Its first convolution runs but does not reach the output: randomizing it changes
    nothing, which the run must flag rather than report as a perfect pass."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Conv2d(3, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.head(x)).amax(dim=(2, 3)) + 0 * self.conv(x).mean()


def test_a_model_with_non_finite_outputs_exits_2(tmp_path: Path, corpus: Path) -> None:
    path = _config(tmp_path, model={"factory": "tests.test_hardening:NanModel"})
    _one_line_error(runner.invoke(app, ["run", str(path)]),
                    "model: its outputs on", "are not finite (NaN or inf)", "model.weights")


def test_non_finite_raw_maps_score_nan_with_the_reason() -> None:
    from saliencycheck.metrics import ReferenceScorer
    from saliencycheck.postprocess import PostprocessOptions

    reference = torch.rand(3, 3, 16, 16)
    candidate = torch.rand(3, 3, 16, 16)
    candidate[1, 0, 2, 2] = float("inf")
    reference[2, 1, 0, 0] = float("nan")
    scores = ReferenceScorer(reference, ["spearman_abs", "ssim"], PostprocessOptions()).score(
        candidate)
    for score in scores.values():
        assert math.isfinite(score.values[0]) and score.reasons[0] == ""
        assert math.isnan(score.values[1]) and "(candidate)" in score.reasons[1]
        assert math.isnan(score.values[2]) and "(reference)" in score.reasons[2]
        assert "non-finite" in score.reasons[1]


def test_a_stage_that_leaves_the_logits_unchanged_is_flagged(tmp_path: Path,
                                                             corpus: Path) -> None:
    path = _config(tmp_path, model={"factory": "tests.test_hardening:DeadBranchModel"},
                   tests={"cascading": {"enabled": True, "order": "bottom_up"}})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    with (tmp_path / "out" / "report.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_stage = {r["stage"]: r["note"] for r in rows if r["test"] == "cascading"}
    assert "logits unchanged by this stage" in by_stage["conv"]
    assert "logits unchanged" not in by_stage["head"]
    with (tmp_path / "out" / "stages.csv").open(newline="") as fh:
        stages = {r["stage"]: r for r in csv.DictReader(fh)}
    # bottom-up, the head runs first: adding conv to the cascade moves nothing further
    assert stages["conv"]["logit_relative_l2"] == stages["head"]["logit_relative_l2"]


class OutOfMemoryAboveTwoRows(torch.nn.Sequential):
    """`tiny_cnn` (the same modules under the same names, so the same randomized stages),
    raising a simulated CUDA out-of-memory error on any pass of > 2 rows."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__(*tiny_cnn(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(x)


def test_out_of_memory_through_the_cli_halves_the_passes_and_keeps_the_scores(
        tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png")
    changes = {"methods": ["gradient", {"name": "integrated_gradients", "steps": 4}],
               "runtime": {"device": "cpu", "bootstrap": 100, "batch_size": 2}}
    plain = _config(tmp_path, **changes)
    assert runner.invoke(app, ["run", str(plain), "-o", str(tmp_path / "plain")]).exit_code == 0
    result = runner.invoke(app, ["run", str(plain), "-o", str(tmp_path / "oom"), "--set",
                                 "model.factory=tests.test_hardening:OutOfMemoryAboveTwoRows"])
    assert result.exit_code == 0, result.output
    assert "warning: out of device memory in a pass of 10 rows; retrying in passes of 5" in \
        " ".join(result.output.split())

    def scores(name: str) -> list[tuple[str, float]]:
        with (tmp_path / name / "report.csv").open(newline="") as fh:
            return [(f"{r['image']}|{r['method']}|{r['stage']}|{r['metric']}", float(r["value"]))
                    for r in csv.DictReader(fh)]

    expected, got = scores("plain"), scores("oom")
    assert [k for k, _ in got] == [k for k, _ in expected]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], atol=1e-6)


# --- exit codes, the error log, outputs ------------------------------------------------------


class BrokenModel(torch.nn.Module):
    """A model whose forward has a bug (not bad input): an internal error, exit 3."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3))) / 0 if x.shape[0] < 0 else {}["no such key"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    env.pop("SALIENCYCHECK_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "saliencycheck", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_an_internal_error_exits_3_with_one_line_and_the_traceback_in_error_log(
        tmp_path: Path, corpus: Path) -> None:
    path = _config(tmp_path, model={"factory": "tests.test_hardening:BrokenModel"})
    result = _cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "internal error: KeyError: 'no such key'" in result.stderr
    log = tmp_path / "out" / "error.log"
    assert f"the traceback is in {log}" in " ".join(result.stderr.split())
    assert "Traceback" in log.read_text() and "test_hardening.py" in log.read_text()
    debug = _cli("--debug", "run", str(path), cwd=tmp_path)
    assert debug.returncode == 3 and "Traceback" in debug.stderr  # still an internal error
    fixed = runner.invoke(app, ["run", str(path), "--set", "model.factory=tests.test_cli:tiny_cnn"])
    assert fixed.exit_code == 0, fixed.output
    assert not log.exists(), "an earlier run's error.log must not pass for this one's"


def test_a_full_disk_exits_2_and_presents_no_report(tmp_path: Path, corpus: Path,
                                                     monkeypatch) -> None:
    from saliencycheck.runner.store import ResultStore

    def full(self, result) -> None:  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "unit.json"))

    monkeypatch.setattr(ResultStore, "save", full)
    result = runner.invoke(app, ["run", str(_config(tmp_path))])
    _one_line_error(result, "cannot write", "No space left on device",
                    "set output.dir (or -o) to a writable folder",
                    "holds no complete report (run.json, written last, is absent)")
    assert not (tmp_path / "out" / "report.csv").exists()


def test_skipped_csv_and_provenance_in_run_json(tmp_path: Path, corpus: Path) -> None:
    import hashlib

    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "w.pt")
    path = _config(tmp_path, model={"name": "resnet18", "num_classes": 4, "weights": "w.pt"},
                   runtime={"device": "cpu", "bootstrap": 100, "repeats": 2, "seed": 5})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    with (tmp_path / "out" / "skipped.csv").open(newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert {Path(r["path"]).name for r in skipped} == {
        name for name, (_, usable) in CORPUS.items() if not usable}
    assert all(r["reason"] for r in skipped)
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    weights = str(tmp_path / "w.pt")
    assert info["checkpoints_sha256"] == {
        weights: hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()}
    assert info["seeds"]["randomization_repeats"] == [5, 1005]
    assert len(info["config_sha256"]) == 64
    assert torch.__version__.startswith(info["versions"]["torch"])
    again = runner.invoke(app, ["run", str(path), "--set", "output.figures=false",
                                "-o", str(tmp_path / "elsewhere")])
    assert again.exit_code == 0
    moved = json.loads((tmp_path / "elsewhere" / "run.json").read_text())
    assert moved["config_sha256"] == info["config_sha256"]  # the same settings, elsewhere
    assert len(info["model_sha256"]) == 64 and moved["model_sha256"] == info["model_sha256"]
    other = torchvision.models.resnet18(num_classes=4)
    torch.save(other.state_dict(), tmp_path / "w.pt")  # other random weights, same file name
    third = runner.invoke(app, ["run", str(path), "-o", str(tmp_path / "third")])
    assert third.exit_code == 0
    changed = json.loads((tmp_path / "third" / "run.json").read_text())
    assert changed["model_sha256"] != info["model_sha256"]
    assert changed["config_sha256"] == info["config_sha256"]


def test_a_reused_output_folder_keeps_nothing_of_the_earlier_run(tmp_path: Path,
                                                                 corpus: Path) -> None:
    first = _config(tmp_path, output={"dir": "out", "figure_images": 2, "save_maps": True},
                    thresholds={"cascading": {"metric": "spearman_abs", "max": 2.0}})
    assert runner.invoke(app, ["run", str(first)]).exit_code == 0
    out = tmp_path / "out"
    assert (out / "verdicts.csv").is_file() and (out / "figures" / "cmyk.jpg").is_dir()
    assert (out / "maps" / "cmyk.jpg.npz").is_file()
    (corpus / "cmyk.jpg").unlink()  # the second run has other images and no thresholds
    second = _config(tmp_path, output={"dir": "out", "figure_images": 2})
    assert runner.invoke(app, ["run", str(second)]).exit_code == 0
    assert not (out / "verdicts.csv").exists()  # no stale verdicts for a CI job to read
    assert not (out / "figures" / "cmyk.jpg").exists() and not (out / "maps").exists()
    assert (out / "figures" / "curves_cascading.png").is_file()
