"""Model building (builders, weights names, checkpoints, factories) and image loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from saliencycheck.config import ModelConfig
from saliencycheck.data import ImageRef, discover_images, image_ids, load_images, read_labels
from saliencycheck.errors import ConfigError, DataError, ModelError
from saliencycheck.models import Preprocessing, build_model, resolve_device


def tiny_factory(num_classes: int = 3) -> torch.nn.Module:
    """Used by the factory test through 'tests.test_models_data:tiny_factory'."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, num_classes))


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18(num_classes=5).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_checkpoint_formats_load_exactly(tmp_path: Path, resnet_state, wrap: str) -> None:
    state = resnet_state
    if wrap == "dataparallel":
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif wrap in ("state_dict", "model"):
        payload = {wrap: state, "optimizer_note": "ignored"}
    else:
        payload = state
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    loaded = build_model(ModelConfig(name="resnet18", num_classes=5, weights=str(path)))
    for key, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert not loaded.module.training
    assert "checkpoint" in loaded.weights_source


class NotATensor:
    """Any pickled class other than tensors: weights_only loading must refuse it."""


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": NotATensor()}}, path)
    with pytest.raises(ModelError, match="weights_only=True"):
        build_model(ModelConfig(name="resnet18", weights=str(path)))


def test_checkpoint_mismatch_is_one_clear_line(tmp_path: Path, resnet_state) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(resnet_state, path)
    with pytest.raises(ModelError, match="does not match the model") as info:
        build_model(ModelConfig(name="resnet18", num_classes=10, weights=str(path)))
    assert "\n" not in str(info.value)


def test_unknown_builder_and_weights() -> None:
    with pytest.raises(ConfigError, match="unknown torchvision model"):
        build_model(ModelConfig(name="resnet19"))
    with pytest.raises(ConfigError, match="neither a torchvision weights name"):
        build_model(ModelConfig(name="resnet18", weights="IMAGENET9K_V7"))


def test_weights_name_is_resolved_the_torchvision_way(monkeypatch) -> None:
    # No download here: intercept the builder call and check what it was given.
    seen = {}
    real = torchvision.models.get_model_builder("resnet18")

    def fake_builder(**kwargs):
        seen.update(kwargs)
        return real(weights=None)

    monkeypatch.setattr(torchvision.models, "get_model_builder", lambda name: fake_builder)
    loaded = build_model(ModelConfig(name="resnet18", weights="DEFAULT"))
    assert seen["weights"] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert loaded.preprocessing == Preprocessing(
        size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize=256)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(ModelConfig(name="resnet18", weights="IMAGENET1K_V1", num_classes=10))


def test_factory_is_called_with_kwargs() -> None:
    loaded = build_model(ModelConfig(factory="tests.test_models_data:tiny_factory",
                                     num_classes=7))
    assert loaded.module[-1].out_features == 7
    with pytest.raises(ConfigError, match="cannot import"):
        build_model(ModelConfig(factory="no_such_package.mod:fn"))
    with pytest.raises(ConfigError, match="expected 'package.module:function'"):
        build_model(ModelConfig(factory="just_a_name"))


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA requested"):
            resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu9")


def make_images(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / "sub" / "b.jpg")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored")


def test_discovery_folder_glob_and_list(tmp_path: Path) -> None:
    make_images(tmp_path)
    found = discover_images(tmp_path, raw="x")
    assert [p.name for p in found] == ["a.png", "broken.png", "b.jpg"]
    assert image_ids(found, tmp_path) == ["a.png", "broken.png", "sub/b.jpg"]
    assert [p.name for p in discover_images(tmp_path / "*.png", raw="x")] == ["a.png", "broken.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nsub/b.jpg\na.png\n")
    assert [p.name for p in discover_images(listing, raw="x")] == ["a.png", "b.jpg"]
    with pytest.raises(DataError, match="does not exist"):
        discover_images(tmp_path / "nope", raw="nope")


def test_unreadable_image_is_skipped_with_reason(tmp_path: Path) -> None:
    make_images(tmp_path)
    paths = discover_images(tmp_path, raw="x")
    pre = Preprocessing(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    refs = [ImageRef(i, p) for i, p in zip(image_ids(paths, tmp_path), paths)]
    records, skipped = load_images(refs, pre)
    assert [r.id for r in records] == ["a.png", "sub/b.jpg"]
    assert [s.path.name for s in skipped] == ["broken.png"]
    for r in records:
        assert r.tensor.shape == (3, 16, 16) and r.display.shape == (16, 16, 3)
        torch.testing.assert_close(r.tensor, (torch.from_numpy(r.display).permute(2, 0, 1) - 0.5)
                                   / 0.25)


def test_labels_csv(tmp_path: Path) -> None:
    make_images(tmp_path)
    paths = [tmp_path / "a.png", tmp_path / "sub" / "b.jpg"]
    ids = ["a.png", "sub/b.jpg"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,label\na.png,3\nb.jpg,1\n")
    assert read_labels(csv_path, ids, paths) == {"a.png": 3, "sub/b.jpg": 1}
    csv_path.write_text("image,label\na.png,3\n")
    with pytest.raises(DataError, match="no label for image 'sub/b.jpg'"):
        read_labels(csv_path, ids, paths)
    csv_path.write_text("image,label\na.png,three\nb.jpg,1\n")
    with pytest.raises(DataError, match="line 2"):
        read_labels(csv_path, ids, paths)
