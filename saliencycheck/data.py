"""Find, read and preprocess the input images; read labels."""

from __future__ import annotations

import csv
import glob
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from saliencycheck.errors import DataError, first_line
from saliencycheck.models import Preprocessing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ImageRef:
    """An image to explain, not yet read: its report id and path."""

    id: str
    path: Path


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable id for reports, its path, and its display version."""

    id: str
    path: Path
    tensor: torch.Tensor  # (3, S, S), normalised
    display: np.ndarray  # (S, S, 3) float in [0, 1], what the model saw before normalisation


@dataclass(frozen=True)
class SkippedImage:
    path: Path
    reason: str


def discover_images(spec: Path, *, raw: str) -> list[Path]:
    """Paths from a folder (recursive), a glob pattern, or a text file listing paths."""
    if spec.is_dir():
        paths = [p for p in spec.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif spec.is_file() and spec.suffix.lower() in {".txt", ".lst", ".list"}:
        lines = spec.read_text(encoding="utf-8").splitlines()
        entries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        paths = [(spec.parent / e) if not Path(e).is_absolute() else Path(e) for e in entries]
    elif spec.is_file():
        paths = [spec]
    elif any(ch in str(spec) for ch in "*?["):
        paths = [Path(p) for p in glob.glob(str(spec), recursive=True)]
        paths = [p for p in paths if p.is_file()]
    else:
        raise DataError(f"images.path: {raw!r} does not exist ({spec})")
    if not paths:
        raise DataError(f"images.path: no images found at {raw!r} ({spec}); supported: "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    return sorted(paths)


def image_ids(paths: list[Path], root: Path) -> list[str]:
    """Report ids: paths relative to the images root when possible, else file names."""
    ids = []
    for p in paths:
        try:
            ids.append(p.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            ids.append(p.name)
    return ids


def make_transform(pre: Preprocessing) -> T.Compose:
    """Resize the shorter side, centre-crop to a square, scale to [0, 1] (no normalisation)."""
    return T.Compose([
        T.ToImage(),
        T.Resize(pre.resize or pre.size, antialias=True),
        T.CenterCrop(pre.size),
        T.ToDtype(torch.float32, scale=True),
    ])


MIN_SIDE = 8  # pixels: a smaller image carries no map worth comparing
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImage(Exception):
    """An image file that cannot be used; the message is the reason shown and recorded."""


def read_rgb(path: Path) -> Image.Image | torch.Tensor:
    """Decode an image fully and convert it to RGB: 8-bit modes through PIL (grayscale,
    palette, CMYK; alpha dropped, as torchvision's loaders do), 16-bit and float grayscale to a
    float (3, H, W) tensor in [0, 1] without losing precision. Raises :class:`UnreadableImage`
    with the reason for files that are not images, are empty, truncated or corrupt, declare
    more pixels than PIL's decompression-bomb limit, or are smaller than ``MIN_SIDE``."""
    if path.is_file() and path.stat().st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: truncated and corrupt files fail here
                if min(img.size) < MIN_SIDE:
                    raise UnreadableImage(f"{img.size[0]}x{img.size[1]} px is too small to "
                                          f"explain (at least {MIN_SIDE} px a side)")
                if img.mode in SIXTEEN_BIT or img.mode == "F":
                    scale = 1.0 if img.mode == "F" else 65535.0
                    gray = torch.from_numpy(np.asarray(img, dtype=np.float32) / scale)
                    return gray.clamp(0, 1).expand(3, -1, -1).contiguous()
                if img.mode == "P":  # through RGBA: palette transparency stays well defined
                    return img.convert("RGBA").convert("RGB")
                return img.convert("RGB")
    except UnidentifiedImageError:
        raise UnreadableImage("not an image PIL can read (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"refused as a possible decompression bomb ({first_line(exc)})"
                              ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoders raise all three
        detail = first_line(exc) if str(exc).strip() else "corrupt data"
        raise UnreadableImage(f"cannot decode it ({type(exc).__name__}: {detail})") from None


def load_images(
    refs: list[ImageRef], pre: Preprocessing
) -> tuple[list[ImageRecord], list[SkippedImage]]:
    """Read images as RGB; unreadable files are skipped and returned with the reason.

    Called per work unit, so host memory holds one unit's images, whatever their number.
    """
    transform = make_transform(pre)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    records, skipped = [], []
    for ref in refs:
        try:
            rgb = read_rgb(ref.path)
        except UnreadableImage as exc:
            skipped.append(SkippedImage(ref.path, str(exc)))
            continue
        pixels = transform(rgb)
        records.append(ImageRecord(
            id=ref.id,
            path=ref.path,
            tensor=(pixels - mean) / std,
            display=pixels.permute(1, 2, 0).numpy(),
        ))
    return records, skipped


def read_labels(path: Path, ids: list[str], paths: list[Path]) -> dict[str, int]:
    """Labels from a CSV with columns image,label; matched by id, relative path or file name."""
    if not path.is_file():
        raise DataError(f"images.labels: file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise DataError(f"images.labels: {path} needs a header with columns image,label")
        table = {}
        for line, row in enumerate(reader, start=2):
            try:
                table[row["image"].strip()] = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(f"images.labels: {path} line {line}: label "
                                f"{row.get('label')!r} is not an integer") from None
    labels = {}
    for image_id, p in zip(ids, paths):
        for key in (image_id, p.name, str(p)):
            if key in table:
                labels[image_id] = table[key]
                break
        else:
            raise DataError(f"images.labels: no label for image {image_id!r} in {path}")
    return labels
