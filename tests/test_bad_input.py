"""More bad input through the CLI, each refused (or skipped) before any compute with one line
naming the file or field and the fix: YAML that repeats a key or expands without bound, `--set`
values that are not YAML, numbers off any sensible scale, float images with NaN pixels,
checkpoints in formats saliencycheck does not read, factories that fail or exit, models that
return more than logits, labels CSVs from spreadsheets, file names that are not UTF-8, and
image ids and file names that must stay distinct."""

from __future__ import annotations

import collections
import csv
import json
import os
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from saliencycheck.cli import app
from saliencycheck.config import MAX_YAML_NODES, parse_config, parse_yaml
from saliencycheck.data import (
    NAME_BYTES,
    UnreadableImage,
    discover_images,
    image_ids,
    read_rgb,
    safe_name,
)
from saliencycheck.errors import ConfigError
from saliencycheck.models import build_model
from tests.test_cli import tiny_cnn
from tests.test_hardening import _config as hardening_config

runner = CliRunner()
RNG = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, names: tuple[str, ...] = ("img0.png", "img1.png")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(RNG.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _config(tmp_path: Path, **changes: object) -> Path:
    """test_hardening's config for a tiny model, smaller (16 px) and with no test: validate
    in a second."""
    quick = {"images": {"path": "images", "size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
             "tests": {"cascading": {"enabled": False}}}
    return hardening_config(tmp_path, **{**quick, **changes})


def _error_line(result, exit_code: int) -> str:
    """The one ``error:`` line (rich may wrap it), after checking the exit code and that no
    traceback was printed."""
    output = result.output
    assert result.exit_code == exit_code, output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1, output
    return " ".join(output[output.index("error:"):].split())


def _one_line_error(result, *fragments: str, exit_code: int = 2) -> None:
    text = _error_line(result, exit_code)
    for fragment in fragments:
        assert fragment in text, text


def _validate(config: Path, *overrides: str):
    args = ["validate", str(config)]
    for override in overrides:
        args += ["--set", override]
    return runner.invoke(app, args)


# --- 1. YAML ----------------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model: {name: resnet18}\nruntime: {device: cpu}\nmodel: {name: vgg16}\n")
    _one_line_error(_validate(path), "config.yaml: line 3: duplicate key 'model' (first on "
                    "line 1)", "remove one")
    path.write_text("runtime: {seed: 1, seed: 2}\n")  # also inside a flow mapping
    _one_line_error(_validate(path), "line 1: duplicate key 'seed'")


def test_merge_keys_may_still_override_what_they_merge() -> None:
    assert parse_yaml("base: &b {x: 1, y: 1}\nc: {<<: *b, x: 2}\n")["c"] == {"x": 2, "y": 1}


def test_a_billion_laughs_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        previous, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    bomb = "model:\n  factory_kwargs:\n" + "".join(f"    {line}\n" for line in lines)
    assert len(bomb) < 1200  # 9^9: 387 million values once expanded
    path = tmp_path / "config.yaml"
    path.write_text(bomb)
    start = time.perf_counter()
    _one_line_error(_validate(path), "config.yaml: line",
                    f"aliases expand to more than {MAX_YAML_NODES:,} values")
    assert time.perf_counter() - start < 5
    path.write_text("model:\n  factory_kwargs: &loop {again: *loop}\n")
    _one_line_error(_validate(path), "a recursive alias")


def test_values_nested_without_end_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model: " + "[" * 20000)
    _one_line_error(_validate(path), "config.yaml", "nested thousands of levels deep")


@pytest.mark.parametrize(("override", "fragments"), [
    ("metrics=[ssim", ("--set 'metrics=[ssim': the value is not valid YAML",
                       "close its brackets")),
    ("model.name=: x", ("--set 'model.name=: x': the value is not valid YAML", "quote it")),
    ("runtime.device=\tcpu", ("the value is not valid YAML", "'\\t'")),
    ("=1", ("--set '=1': expected section.key=value",)),
    ("a..b=1", ("--set 'a..b=1': expected section.key=value with no empty names",)),
    ("runtime.seed", ("--set 'runtime.seed': expected section.key=value",)),
    ("runtime={seed: 1, seed: 2}", ("--set", "duplicate key 'seed'")),
    ("model.factory_kwargs=" + "[" * 20000, ("--set", "nested thousands of levels deep")),
])
def test_malformed_set_values_name_the_option(tmp_path: Path, override: str,
                                              fragments: tuple[str, ...]) -> None:
    _images(tmp_path / "images")
    _one_line_error(_validate(_config(tmp_path), override), *fragments)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes("model: {name: résnet18}\n".encode("latin-1"))
    _one_line_error(_validate(path), "config.yaml: not UTF-8 text (byte 0xe9 at offset 15)",
                    "save the config as UTF-8")


def test_a_config_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    path = _config(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Notepad saves UTF-8
    result = _validate(path)
    assert result.exit_code == 0, result.output


# --- 2. bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "fragments"), [
    ("runtime.repeats=1000", ("runtime.repeats: 1,000 is too many: at most 100",
                              "typical: 1 to 5")),
    ("runtime.bootstrap=2000000", ("runtime.bootstrap: 2,000,000 is too many: at most "
                                   "100,000", "typical: 1,000 to 10,000")),
    ("methods=[{name: smoothgrad, samples: 50000}]", (
        "methods[0].samples: 50,000 is too many: at most 10,000", "typical: 25 to 50")),
    ("methods=[{name: vargrad, samples: 50000}]", ("methods[0].samples: 50,000 is too many",)),
    ("tests.smooth_mprt={enabled: true, samples: 50000}", (
        "tests.smooth_mprt.samples: 50,000 is too many: at most 10,000", "typical: 50")),
    ("methods=[{name: integrated_gradients, steps: 50000}]", (
        "methods[0].steps: 50,000 is too many: at most 10,000", "typical: 20 to 300")),
    ("methods=[{name: smoothgrad, of: integrated_gradients, of_params: {steps: 50000}}]", (
        "methods[0].of_params.steps: 50,000 is too many",)),
    ("output.dir=''", ("output.dir: empty: it would mean the config file's own folder",
                       "e.g. runs/latest")),
])
def test_values_off_any_sensible_scale_are_refused(tmp_path: Path, override: str,
                                                   fragments: tuple[str, ...]) -> None:
    _images(tmp_path / "images")
    _one_line_error(_validate(_config(tmp_path), override), "config.yaml", *fragments)


def test_the_bounds_themselves_are_accepted() -> None:
    config = parse_config({"runtime": {"repeats": 100, "bootstrap": 100_000},
                           "tests": {"smooth_mprt": {"samples": 10_000}},
                           "methods": [{"name": "smoothgrad", "samples": 10_000},
                                       {"name": "integrated_gradients", "steps": 10_000}]})
    assert config.runtime.repeats == 100
    with pytest.raises(ConfigError, match="at most 100 "):
        parse_config({"runtime": {"repeats": 101}})


# --- 3. non-finite pixels -------------------------------------------------------------------


def _float_tiff(path: Path, bad: int) -> None:
    values = RNG.random((64, 64), dtype=np.float32)
    values.flat[:bad] = np.nan
    values.flat[bad:bad + 2] = np.inf  # -9999-style no-data would be finite; these are not
    Image.fromarray(values).save(path)  # mode F


def test_nan_pixels_are_refused_with_the_count_and_the_fix(tmp_path: Path) -> None:
    _float_tiff(tmp_path / "nan.tif", 10)
    assert Image.open(tmp_path / "nan.tif").mode == "F"
    with pytest.raises(UnreadableImage, match=r"non-finite pixel values \(NaN or inf\): 12 of "
                       r"4096 pixels; fill them \(e.g. numpy.nan_to_num\)"):
        read_rgb(tmp_path / "nan.tif")
    only_inf = RNG.random((16, 16), dtype=np.float32)
    only_inf[0, 0] = -np.inf  # clamping to [0, 1] would have hidden it
    Image.fromarray(only_inf).save(tmp_path / "inf.tif")
    with pytest.raises(UnreadableImage, match="1 of 256 pixels"):
        read_rgb(tmp_path / "inf.tif")


def test_a_nan_image_first_in_line_is_skipped_not_blamed_on_the_model(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ("b.png", "c.png"))
    _float_tiff(images / "a_nodata.tif", 10)  # sorted first: the image the model is probed on
    path = _config(tmp_path, tests={"cascading": {"enabled": True}})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    with (out / "skipped.csv").open(newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [Path(r["path"]).name for r in skipped] == ["a_nodata.tif"]
    assert skipped[0]["reason"].startswith("non-finite pixel values (NaN or inf): 12 of 4096")
    with (out / "report.csv").open(newline="") as fh:
        assert {r["image"] for r in csv.DictReader(fh)} == {"b.png", "c.png"}


# --- 4. checkpoints in other formats --------------------------------------------------------


def _weights_config(tmp_path: Path, weights: str) -> Path:
    _images(tmp_path / "images")
    return _config(tmp_path, model={"factory": "tests.test_cli:tiny_cnn", "num_classes": 4,
                                    "weights": weights})


def _safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """The safetensors layout by hand: u64 header length, JSON header, raw little-endian data."""
    header, chunks, offset = {}, [], 0
    for name, tensor in state.items():
        data = tensor.detach().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def test_a_safetensors_checkpoint_is_named_with_the_conversion(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", tiny_cnn().state_dict())
    _one_line_error(_validate(_weights_config(tmp_path, "model.safetensors")),
                    "model.weights:", "model.safetensors is a safetensors file, which "
                    "saliencycheck does not read", "safetensors.torch import load_file",
                    "torch.save(load_file('model.safetensors'), 'model.pt')")


def test_a_torchscript_archive_is_named_with_the_conversion(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still used
        torch.jit.save(torch.jit.script(tiny_cnn()), str(tmp_path / "scripted.pt"))
    _one_line_error(_validate(_weights_config(tmp_path, "scripted.pt")),
                    "scripted.pt is a TorchScript archive (torch.jit.save)",
                    "torch.save(torch.jit.load('scripted.pt').state_dict(), 'scripted.pt')")


@pytest.mark.parametrize(("name", "data"), [
    ("model.onnx", RNG.integers(0, 255, 300, dtype=np.uint8).tobytes()),
    # a ModelProto's start: ir_version 8, producer_name 'pytorch' (as torch.onnx.export writes)
    ("exported.pt", b"\x08\x08\x12\x07pytorch\x1a\x052.1.0:" + bytes(200)),
])
def test_an_onnx_model_is_named_with_the_way_back(tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    _one_line_error(_validate(_weights_config(tmp_path, name)),
                    f"{name} is an ONNX model, which saliencycheck does not read",
                    "give the PyTorch state_dict it was exported from")


def test_other_bad_files_stay_truncated_or_corrupt(tmp_path: Path) -> None:
    (tmp_path / "noise.pt").write_bytes(RNG.integers(0, 255, 500, dtype=np.uint8).tobytes())
    _one_line_error(_validate(_weights_config(tmp_path, "noise.pt")),
                    "noise.pt is truncated or corrupt")


# --- 5. factories that fail -----------------------------------------------------------------


FACTORY_MODULES = {
    "needs_missing": "import not_a_real_package_xyz\n\ndef build(num_classes=4):\n    pass\n",
    "bad_name_import": "from os import no_such_name_xyz\n",
    "exits_on_import": "import sys\nsys.exit(4)\n",
    "factories": (
        "import sys\n"
        "def exits(num_classes=4):\n    sys.exit(0)\n"
        "def interrupted(num_classes=4):\n    raise KeyboardInterrupt\n"
        "def raises(num_classes=4):\n    raise ValueError('no such checkpoint variant')\n"
        "def lazy_import(num_classes=4):\n    import not_a_real_package_xyz\n"
        "def fixed_args(depth):\n    pass\n"
        "def build(num_classes=4):\n    pass\n"
    ),
}


@pytest.fixture
def factories(tmp_path: Path, monkeypatch) -> Path:
    """A package of misbehaving factories, importable for this test only."""
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, code in FACTORY_MODULES.items():
        (package / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        monkeypatch.delitem(sys.modules, name)
    _images(tmp_path / "images")
    return tmp_path


@pytest.mark.parametrize(("factory", "exit_code", "fragments"), [
    ("userpkg.needs_missing:build", 2, (
        "model.factory: cannot import 'userpkg.needs_missing:build': its module "
        "userpkg.needs_missing exists, but its own import failed (No module named "
        "'not_a_real_package_xyz')", "install the package that provides it")),
    ("userpkg.bad_name_import:build", 2, ("its own import failed (cannot import name "
                                          "'no_such_name_xyz'", "fix that import")),
    ("userpkg.not_there:build", 2, ("there is no module 'userpkg.not_there'",)),
    ("nowhere_pkg_xyz.mod:build", 2, ("there is no module 'nowhere_pkg_xyz'",)),
    ("userpkg.factories:buidl", 2, ("userpkg.factories has no attribute 'buidl' (did you "
                                    "mean 'build'?)",)),
    ("userpkg.factories:lazy_import", 2, ("model.factory: userpkg.factories:lazy_import "
                                          "failed importing a module (No module named "
                                          "'not_a_real_package_xyz')",)),
    ("userpkg.factories:fixed_args", 2, ("model.factory_kwargs: userpkg.factories:fixed_args "
                                         "rejected them",)),
    ("userpkg.factories:exits", 3, ("model.factory 'userpkg.factories:exits' called "
                                    "sys.exit(0) instead of returning a model", "exit 3")),
    ("userpkg.exits_on_import:build", 3, ("its module called sys.exit(4) on import",)),
    ("userpkg.factories:raises", 3, ("model.factory 'userpkg.factories:raises' raised "
                                     "ValueError: no such checkpoint variant",
                                     "fix the factory")),
])
def test_a_failing_factory_is_named(factories: Path, factory: str, exit_code: int,
                                    fragments: tuple[str, ...]) -> None:
    config = _config(factories, model={"factory": factory, "num_classes": 4})
    _one_line_error(_validate(config), "config.yaml", *fragments, exit_code=exit_code)


def test_a_factory_that_raises_keeps_its_traceback_for_the_error_log(factories: Path) -> None:
    from saliencycheck.config import LoadedConfig
    from saliencycheck.errors import UserCodeError
    from saliencycheck.runner import prepare

    config = parse_config(yaml.safe_load(_config(factories).read_text())
                          | {"model": {"factory": "userpkg.factories:raises"}})
    with pytest.raises(UserCodeError) as raised:
        prepare(LoadedConfig(config=config, source=factories / "config.yaml"))
    assert isinstance(raised.value.__cause__, ValueError)  # what error.log shows


def test_ctrl_c_in_a_factory_is_an_interrupt_not_an_error(factories: Path) -> None:
    from saliencycheck.config import ModelConfig

    with pytest.raises(KeyboardInterrupt):
        build_model(ModelConfig(factory="userpkg.factories:interrupted"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{factories}"}
    config = _config(factories, model={"factory": "userpkg.factories:interrupted"})
    result = subprocess.run([sys.executable, "-m", "saliencycheck", "validate", str(config)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr


# --- 6. models that return more than logits -------------------------------------------------


Pair = collections.namedtuple("Pair", ["logits", "aux"])


class _Returns(nn.Module):
    """A tiny CNN whose forward wraps its logits in another structure."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.net = tiny_cnn(num_classes)

    def wrap(self, logits: torch.Tensor) -> object:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> object:
        return self.wrap(self.net(x))


class ReturnsTuple(_Returns):
    def wrap(self, logits: torch.Tensor) -> object:
        return logits, logits.detach()


class ReturnsDict(_Returns):
    def wrap(self, logits: torch.Tensor) -> object:
        return {"logits": logits, "features": logits}


class ReturnsNamedTuple(_Returns):
    def wrap(self, logits: torch.Tensor) -> object:
        return Pair(logits, logits)


class ReturnsMap(_Returns):
    def wrap(self, logits: torch.Tensor) -> object:
        return logits[:, :, None, None].expand(-1, -1, 4, 4)  # per-pixel classes


@pytest.mark.parametrize(("model", "fragments"), [
    ("ReturnsTuple", ("returned tuple (2 values), not a logits tensor",)),
    ("ReturnsDict", ("returned dict (keys 'logits', 'features')",)),
    ("ReturnsNamedTuple", ("returned Pair (2 values)", "e.g. return model(x).logits")),
    ("ReturnsMap", ("returned a tensor of shape (1, 4, 4, 4), not (N, classes) logits",)),
])
def test_a_model_returning_more_than_logits_is_refused_with_the_fix(
        tmp_path: Path, model: str, fragments: tuple[str, ...]) -> None:
    _images(tmp_path / "images")
    config = _config(tmp_path, model={"factory": f"tests.test_bad_input:{model}"})
    _one_line_error(runner.invoke(app, ["run", str(config)]), "config.yaml: model: its forward",
                    *fragments, "wrap the model so forward returns the (N, classes) logits "
                    "tensor")
    assert not (tmp_path / "out" / "report.csv").exists()


# --- 7. labels CSVs -------------------------------------------------------------------------


def _labels_config(tmp_path: Path, data: bytes) -> Path:
    _images(tmp_path / "images")
    (tmp_path / "labels.csv").write_bytes(data)
    return _config(tmp_path, images={"path": "images", "size": 16, "target": "label",
                                     "labels": "labels.csv"})


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbfimage,label\nimg0.png,1\nimg1.png,2\n",  # Excel's "CSV UTF-8"
    b"image , label\r\nimg0.png , 1 \r\n\r\nimg1.png, 2\r\n\r\n",  # spaces, blank lines, CRLF
])
def test_labels_from_spreadsheets_are_read(tmp_path: Path, data: bytes) -> None:
    result = _validate(_labels_config(tmp_path, data))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("data", "fragments"), [
    ("image,label\nimg0.png,1\nimg1.png,2 # café\n".encode("latin-1"), (
        "images.labels:", "labels.csv is not UTF-8 text (byte 0xe9", "save it as UTF-8")),
    (b"image,label\nimg0.png,1\nimg1.png,7\n", (
        "images.labels: image 'img1.png' has label 7, out of range for the model's 4 classes "
        "(0 to 3)",)),
    (b"image,label\nimg0.png,-1\nimg1.png,2\n", ("image 'img0.png' has label -1",)),
    (b"image,label\nimg0.png,1\nimg1.png,2\nimg0.png,3\n", (
        "line 4: 'img0.png' is labelled 3, but 1 on line 2; keep one",)),
    (b"image,label\nimg0.png,1\nimg1.png,two\n", ("line 3: label 'two' is not an integer",)),
    (b"image,label\n" + b"x" * 200_000 + b",1\n", ("labels.csv is not a readable CSV (field "
                                                     "larger than field limit",)),
])
def test_bad_labels_are_one_line(tmp_path: Path, data: bytes,
                                 fragments: tuple[str, ...]) -> None:
    _one_line_error(_validate(_labels_config(tmp_path, data)), "config.yaml", *fragments)


# --- 8. names that are not UTF-8 ------------------------------------------------------------


def _bytes_name(folder: Path, name: bytes, data: bytes) -> None:
    """A file whose name is raw bytes (not UTF-8); skips where the file system refuses it."""
    try:
        fd = os.open(os.fsencode(folder) + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        pytest.skip(f"this file system refuses names that are not UTF-8 ({exc})")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_images_with_names_that_are_not_utf8_run_with_escaped_ids(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ("plain.png",))
    _bytes_name(images, b"caf\xe9.png", _png_bytes())  # latin-1 'café'
    _bytes_name(images, b"broken\xff.png", b"not an image")
    path = _config(tmp_path, tests={"cascading": {"enabled": True}},
                   output={"dir": "out", "figures": True, "figure_images": 3,
                           "save_maps": True})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    with (out / "report.csv").open(newline="", encoding="utf-8") as fh:
        assert {r["image"] for r in csv.DictReader(fh)} == {"caf\\xe9.png", "plain.png"}
    with (out / "skipped.csv").open(newline="", encoding="utf-8") as fh:
        assert [Path(r["path"]).name for r in csv.DictReader(fh)] == ["broken\\xff.png"]
    json.loads((out / "run.json").read_text(encoding="utf-8"))
    name = safe_name("caf\\xe9.png")
    assert "~" in name and (out / "maps" / f"{name}.npz").is_file()
    assert (out / "figures" / name / "cascading.png").is_file()


def test_an_image_list_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    (tmp_path / "list.txt").write_bytes(b"images/img0.png\nimages/caf\xe9.png\n")
    config = _config(tmp_path, images={"path": "list.txt", "size": 16})
    _one_line_error(_validate(config), "images.path:", "list.txt is not UTF-8 text (byte 0xe9",
                    "save the list of image paths as UTF-8")


# --- 9. unique ids and file names -----------------------------------------------------------


def test_the_bundled_samples_keep_their_ids_and_figure_names() -> None:
    digits = ROOT / "sample_images" / "digits"
    paths = discover_images(digits, raw="sample_images/digits")
    ids = image_ids(paths, digits)
    assert ids == sorted(p.name for p in paths) and "digit0_1615.png" in ids
    assert [safe_name(i) for i in ids] == [Path(i).stem for i in ids]


def test_same_named_files_in_different_folders_keep_distinct_ids(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        _images(tmp_path / "data" / folder, ("x.png",))
    glob = tmp_path / "data" / "**" / "*.png"
    paths = discover_images(glob, raw="data/**/*.png")
    assert image_ids(paths, glob.parent) == ["a/x.png", "b/x.png"]
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    listing = elsewhere / "list.txt"
    listing.write_text("".join(f"{tmp_path / 'data' / f / 'x.png'}\n" for f in "ba")
                       + f"{tmp_path / 'data' / 'a' / 'x.png'}\n")  # listed twice: once
    paths = discover_images(listing, raw="list.txt")
    assert image_ids(paths, elsewhere) == ["a/x.png", "b/x.png"]
    assert image_ids(paths[:1], elsewhere) == ["x.png"]  # as before: the file name


def test_same_named_files_get_their_own_maps_through_the_cli(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        _images(tmp_path / "data" / folder, ("x.png",))
    (tmp_path / "data" / "a__x.png").write_bytes((tmp_path / "data" / "a" / "x.png")
                                                 .read_bytes())
    path = _config(tmp_path, images={"path": "data/**/*.png", "size": 16},
                   tests={"cascading": {"enabled": True}},
                   output={"dir": "out", "figures": True, "figure_images": 3,
                           "save_maps": True})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    with (tmp_path / "out" / "report.csv").open(newline="") as fh:
        assert {r["image"] for r in csv.DictReader(fh)} == {"a/x.png", "b/x.png", "a__x.png"}
    assert len(list((tmp_path / "out" / "maps").glob("*.npz"))) == 3
    assert len([p for p in (tmp_path / "out" / "figures").iterdir() if p.is_dir()]) == 3


def test_names_that_collided_before_are_distinct() -> None:
    ids = ["a/b.png", "a__b.jpg", "a/b.jpg", "a__b.png", "a_b.png", "b.png", "b.jpg", "b"]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids), names
    assert safe_name("digit0.png") == "digit0" and safe_name("cmyk.jpg") == "cmyk.jpg"
    assert safe_name("verdicts.png") == "verdicts"  # never figures/verdicts.png itself
    assert not safe_name("x.PNG").lower().endswith(".png")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=300), min_size=2, max_size=8, unique=True))
def test_distinct_ids_give_distinct_safe_file_names(ids: list[str]) -> None:
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and "\x00" not in name and not name.startswith(".")
        assert 0 < len(name.encode("utf-8")) <= NAME_BYTES <= 255 - len(".npz")
        assert name not in ("", ".", "..")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}(/[A-Za-z0-9_.-]{1,10})?"
                              r"\.(png|jpg|PNG|tif)", fullmatch=True),
                min_size=2, max_size=8, unique=True))
def test_distinct_path_like_ids_give_distinct_names(ids: list[str]) -> None:
    assert len({safe_name(i) for i in ids}) == len(ids)
