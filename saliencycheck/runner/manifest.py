"""What an output folder's units belong to: the config, the inputs' content and the unit plan.

Stored as ``units/plan.json`` by every run and shard, compared before a run resumes, a shard
joins, or shards are merged, so units computed from different configs *or different files*
are never mixed in one report: the plan holds the SHA-256 of every image, of every
checkpoint the config names, and of the model's parameters as built (a factory's code or a
torchvision weights file that changed shows there). Hashing 10,000 images on every resume
would cost a full read of them, so hashes are cached by path, size, modification and change
time and inode (:class:`HashCache`): replacing a file changes its inode or change time,
which no copy tool preserves. The fingerprint leaves out where and how units run (backend,
device, Ray resources, output folder): those change no score, so a run may resume on another
machine or backend.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from saliencycheck.atomic import atomic_write_text
from saliencycheck.config import Config, LoadedConfig
from saliencycheck.errors import StoreError
from saliencycheck.runner.ownership import STATE_DIR, file_sha256
from saliencycheck.runner.plan import PLACEMENT, WorkUnit, fingerprint
from saliencycheck.runner.setup import RunSetup

HASH_CACHE = "hashes.json"


class HashCache:
    """SHA-256 of files, remembered in ``folder/.saliencycheck/hashes.json`` by resolved path
    with the file's size, mtime, ctime and inode; a file whose stat changed is read again."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_DIR / HASH_CACHE
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or damaged: a cache, so start again
            self.entries = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        info = path.stat()
        key = os.fsdecode(path.resolve()).encode("utf-8", "backslashreplace").decode()
        stat = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        entry = self.entries.get(key)
        if isinstance(entry, list) and entry[:4] == stat:
            return entry[4]
        digest = file_sha256(path)
        self.entries[key] = [*stat, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries))


def input_files(setup: RunSetup) -> dict[str, Path]:
    """The checkpoint files the config names, by config field."""
    config = setup.config
    named = {"model.weights": config.model.weights}
    section = config.tests.label_randomization
    if section is not None:
        named["tests.label_randomization.checkpoint"] = section.checkpoint
        named["tests.label_randomization.control_checkpoint"] = section.control_checkpoint
    paths = {field: setup.resolve(value) for field, value in named.items() if value}
    return {field: path for field, path in paths.items() if path.is_file()}


def manifest(setup: RunSetup, units: list[WorkUnit], hashes: HashCache) -> dict:
    """The plan of this run: resolved config, config file, images (id, size, SHA-256), the
    checkpoints' and the model's SHA-256, and the units."""
    files = {field: [str(path), hashes.sha256(path)]
             for field, path in input_files(setup).items()}
    plan = {
        "config": setup.config.model_dump(mode="json"),
        "source": str(setup.source),
        "images": [[ref.id, *(_size_and_hash(ref.path, hashes) if ref.tensor is None
                              else _tensor_size_and_hash(ref.tensor))] for ref in setup.images],
        "files": files,
        "model_sha256": setup.model_sha256,
        "units": {u.id: [setup.images[i].id for i in u.image_indices] for u in units},
    }
    hashes.save()
    return plan


def differences(stored: dict, current: dict) -> list[str]:
    """What differs between two plans: config paths (runtime.seed), files whose content
    changed (image a/b.png, model.weights w.pt), or 'images'/'units'/'the model'."""
    found = [f"{section}.{key}" if key else section
             for section in sorted(set(stored["config"]) | set(current["config"]))
             for key in _keys(stored["config"].get(section), current["config"].get(section))
             if key not in PLACEMENT.get(section, ())]
    found += changed_files(stored, current)
    if stored.get("model_sha256") != current.get("model_sha256") and not found:
        found.append("the model's parameters (model_sha256)")
    if [entry[0] for entry in stored["images"]] != [entry[0] for entry in current["images"]]:
        found.append("images")
    if stored["units"] != current["units"]:
        found.append("units")
    return found


def changed_files(stored: dict, current: dict) -> list[str]:
    """The images and checkpoints present in both plans whose content differs."""
    before = {entry[0]: entry[1:] for entry in stored["images"]}
    changed = [f"image {image}" for image, *rest in current["images"]
               if image in before and before[image] != rest]
    old_files = stored.get("files", {})
    changed += [f"{field} {entry[0]}" for field, entry in current.get("files", {}).items()
                if field in old_files and old_files[field][1] != entry[1]]
    return changed


def check_same_run(stored: dict, current: dict, *, where: Path, fix: str) -> None:
    """Raise StoreError naming what differs unless both plans would give the same scores."""
    if fingerprint(stored) == fingerprint(current):
        return
    files = changed_files(stored, current)
    if files:
        raise StoreError(f"{where} holds units computed from other files ({', '.join(files[:3])}"
                         f"{', ...' if len(files) > 3 else ''} changed since: the SHA-256 "
                         f"differs); {fix}")
    changed = ", ".join(differences(stored, current)[:4]) or "the plan"
    raise StoreError(f"{where} holds units of another config (differs in {changed}); {fix}")


def loaded_config(plan: dict, *, output_dir: Path) -> LoadedConfig:
    """The stored config as a run would load it, writing into ``output_dir`` on the CPU."""
    data = plan["config"]
    data = {**data, "output": {**data["output"], "dir": str(output_dir.resolve())},
            "runtime": {**data["runtime"], "device": "cpu"}}
    return LoadedConfig(config=Config.model_validate(data), source=Path(plan["source"]))


def _keys(stored: object, current: object) -> list[str]:
    """The keys of a config section whose values differ ('' for a whole non-dict value)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return [] if stored == current else [""]


def _tensor_size_and_hash(tensor: torch.Tensor) -> list:
    """[bytes, SHA-256] of an image handed over in memory."""
    data = tensor.detach().cpu().contiguous().numpy().tobytes()
    return [len(data), hashlib.sha256(data).hexdigest()]


def _size_and_hash(path: Path, hashes: HashCache) -> list:
    """[size, SHA-256] of an image; [-1, ''] when it cannot be read (skipped by the run)."""
    try:
        return [path.stat().st_size, hashes.sha256(path)]
    except OSError:
        return [-1, ""]
