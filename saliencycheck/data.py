"""Find, read and preprocess the input images; read labels."""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
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
    """An image to explain, not yet read: its report id and path; or, handed over in memory
    (the Python API), its id, a stand-in path and the preprocessed (C, H, W) tensor."""

    id: str
    path: Path
    tensor: torch.Tensor | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable id for reports, its path, and its display version."""

    id: str
    path: Path
    tensor: torch.Tensor  # (3, S, S), normalised
    display: np.ndarray  # (S, S, 3) float in [0, 1], what the model saw before normalisation


@dataclass(frozen=True)
class SkippedImage:
    """An image that cannot be used: its path as printable text (see `printable`), and why."""

    path: Path
    reason: str


def printable(path: str | Path) -> str:
    """A path as text that every UTF-8 file, JSON document and terminal accepts: bytes of a
    file name that are not UTF-8 (which Python keeps as lone surrogates) are escaped as
    ``\\xff``. For reports and messages only; the file is opened by its real path."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_listing(spec: Path) -> list[str]:
    """The lines of a text file listing images; DataError naming it when it cannot be read."""
    try:
        return spec.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"images.path: {printable(spec)} is not UTF-8 text (byte "
                        f"0x{exc.object[exc.start]:02x} at offset {exc.start}); save the list "
                        "of image paths as UTF-8") from None
    except OSError as exc:
        raise DataError(f"images.path: cannot read {printable(spec)} "
                        f"({exc.strerror or first_line(exc)}); make it readable") from None


def discover_images(spec: Path, *, raw: str) -> list[Path]:
    """Paths from a folder (recursive), a glob pattern, or a text file listing paths."""
    if spec.is_dir():
        paths = [p for p in spec.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif spec.is_file() and spec.suffix.lower() in {".txt", ".lst", ".list"}:
        lines = _read_listing(spec)
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
    unique = {os.path.abspath(p): p for p in reversed(paths)}  # a file listed twice: once
    return sorted(unique.values())


def _relative(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` (through symlinks, else as written), or None."""
    for target, base in ((path.resolve(), root.resolve()),
                         (Path(os.path.abspath(path)), Path(os.path.abspath(root)))):
        try:
            return target.relative_to(base).as_posix()
        except ValueError:
            continue
    return None


def image_ids(paths: list[Path], root: Path) -> list[str]:
    """Report ids, unique by construction: each path relative to ``root`` (the images folder,
    or the folder of a glob or list) when every image lies under it and no two resolve to one
    file, as for the bundled samples (``digit0.png``); otherwise every path relative to the
    deepest folder the images share, so ``a/x.png`` and ``b/x.png`` from a list of absolute
    paths or a glob over folders stay apart. Bytes of a name that are not UTF-8 are escaped
    (`printable`), so every CSV, JSON file and terminal takes the ids."""
    relative = [_relative(p, root) for p in paths]
    if None in relative or len(set(relative)) < len(relative):
        absolute = [os.path.abspath(p) for p in paths]
        common = os.path.commonpath([os.path.dirname(a) for a in absolute])
        relative = [Path(os.path.relpath(a, common)).as_posix() for a in absolute]
    ids = [printable(r) for r in relative]
    if len(set(ids)) < len(ids):  # only a name escaped into another's exact text
        first = next(i for i in ids if ids.count(i) > 1)
        clash = [printable(p) for p, i in zip(paths, ids) if i == first]
        raise DataError(f"images.path: {clash[0]} and {clash[1]} would share the id {first!r} "
                        "(a name that is not UTF-8 escapes to the other's); rename one")
    return ids


NAME_BYTES = 200  # longest file name derived from an id; file systems allow 255 bytes
_PLAIN_PNG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.png")
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.[A-Za-z0-9]+")


def safe_name(image_id: str) -> str:
    """The file name for an image id: ``figures/<name>/<test>.png``, ``maps/<name>.npz``.

    A function of the id alone, so every worker, shard and merge names a file alike without
    the run's list of ids; distinct ids get distinct names, at most ``NAME_BYTES`` bytes,
    never with ``/`` or a leading dot. Three forms that cannot meet:

    - a plain PNG id (ASCII letters, digits, ``_``, ``-``): its stem, ``digit0.png`` →
      ``digit0``, as always; no dot;
    - another plain id: itself, ``photo.jpg`` → ``photo.jpg``; a dot, never a final
      ``.png`` (so never the name of a report figure such as ``figures/verdicts.png``);
    - anything else (sub-folders, spaces, escaped bytes, long names): a readable stem cut to
      fit, ``~`` and 16 hex digits of the id's SHA-256, ``sub/a.png`` → ``sub_a.png~3b5f...``;
      the only names with ``~``, distinct up to a 64-bit hash collision.

    So ``a/b.png``, ``a__b.jpg`` and ``a/b.jpg`` (one name each before) stay apart.
    """
    if len(image_id) <= NAME_BYTES:
        if _PLAIN_PNG.fullmatch(image_id):
            return image_id[: -len(".png")]
        if _PLAIN.fullmatch(image_id) and not image_id.lower().endswith(".png"):
            return image_id
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    readable = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in image_id)
    readable = readable.lstrip(".") or "image"
    room = NAME_BYTES - len(digest) - 1
    readable = readable.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{readable}~{digest}"


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
    more pixels than PIL's decompression-bomb limit, are smaller than ``MIN_SIDE``, or hold
    NaN or inf pixels (float images' no-data values)."""
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
                    values = np.asarray(img, dtype=np.float32) / scale
                    bad = int(np.count_nonzero(~np.isfinite(values)))
                    if bad:  # no-data values of float TIFFs: clamping would hide inf, not NaN
                        raise UnreadableImage(
                            f"non-finite pixel values (NaN or inf): {bad} of {values.size} "
                            "pixels; fill them (e.g. numpy.nan_to_num) before explaining")
                    gray = torch.from_numpy(values)
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
        if ref.tensor is not None:
            _from_memory(ref, pre, records, skipped)
            continue
        try:
            rgb = read_rgb(ref.path)
        except UnreadableImage as exc:
            skipped.append(SkippedImage(Path(printable(ref.path)), str(exc)))
            continue
        pixels = transform(rgb)
        records.append(ImageRecord(
            id=ref.id,
            path=ref.path,
            tensor=(pixels - mean) / std,
            display=pixels.permute(1, 2, 0).numpy(),
        ))
    return records, skipped


def _from_memory(ref: ImageRef, pre: Preprocessing, records: list[ImageRecord],
                 skipped: list[SkippedImage]) -> None:
    """An image handed over as a preprocessed tensor: used as it is (its display version
    undoes the normalisation), or skipped when it holds NaN or inf."""
    tensor = ref.tensor.detach().float().cpu()
    bad = int((~tensor.isfinite()).sum())
    if bad:
        skipped.append(SkippedImage(ref.path, f"non-finite values (NaN or inf): {bad} of "
                                              f"{tensor.numel()}; fill them before explaining"))
        return
    channels = tensor.shape[0]
    mean = torch.tensor(pre.mean[:channels]).view(-1, 1, 1)
    std = torch.tensor(pre.std[:channels]).view(-1, 1, 1)
    pixels = (tensor * std + mean).clamp(0, 1)
    pixels = pixels.expand(3, -1, -1) if channels == 1 else pixels[:3]
    records.append(ImageRecord(id=ref.id, path=ref.path, tensor=tensor,
                               display=pixels.permute(1, 2, 0).numpy()))


def read_labels(path: Path, ids: list[str], paths: list[Path]) -> dict[str, int]:
    """Labels from a CSV with columns image,label; matched by id, relative path or file name.
    UTF-8 with or without a byte-order mark (as spreadsheet programs write it); spaces around
    names and values are ignored."""
    if not path.is_file():
        raise DataError(f"images.labels: file not found: {path}")
    table: dict[str, tuple[int, int]] = {}  # image -> (label, line)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            if not {"image", "label"} <= set(reader.fieldnames):
                raise DataError(f"images.labels: {path} needs a header with columns "
                                "image,label")
            for line, row in enumerate(reader, start=2):
                image = (row["image"] or "").strip()
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise DataError(f"images.labels: {path} line {line}: label "
                                    f"{row.get('label')!r} is not an integer") from None
                if table.get(image, (label,))[0] != label:
                    raise DataError(f"images.labels: {path} line {line}: {image!r} is labelled "
                                    f"{label}, but {table[image][0]} on line {table[image][1]}; "
                                    "keep one")
                table.setdefault(image, (label, line))
    except UnicodeDecodeError as exc:
        raise DataError(f"images.labels: {path} is not UTF-8 text (byte "
                        f"0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as "
                        "UTF-8 (CSV UTF-8 in a spreadsheet program)") from None
    except csv.Error as exc:
        raise DataError(f"images.labels: {path} is not a readable CSV ({first_line(exc)}); "
                        "save it as plain CSV with columns image,label") from None
    except OSError as exc:
        raise DataError(f"images.labels: cannot read {path} "
                        f"({exc.strerror or first_line(exc)}); make it readable") from None
    labels = {}
    for image_id, p in zip(ids, paths):
        for key in (image_id, p.name, str(p)):
            if key in table:
                labels[image_id] = table[key][0]
                break
        else:
            raise DataError(f"images.labels: no label for image {image_id!r} in {path}")
    return labels
