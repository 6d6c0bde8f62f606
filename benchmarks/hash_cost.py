"""What the content fingerprints cost: hashing every image of a 10,000-image run.

The plan of every run, resume and merge records the SHA-256 of each image
(`saliencycheck/runner/manifest.py`). This measures, on files written here, the first run
(every file read and hashed) and a resume (hashes taken from the cache by stat), next to the
time the run itself spends decoding the same images, and writes `hash_cost.md`.

    .venv/bin/python benchmarks/hash_cost.py                 # 10,000 images of 224x224 JPEG
    .venv/bin/python benchmarks/hash_cost.py --images 500    # quicker
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from saliencycheck.data import read_rgb
from saliencycheck.runner.manifest import HashCache


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    paths = []
    for i in range(count):  # distinct files of a realistic JPEG size (smooth content + noise)
        pixels = np.roll(base, i, axis=1) // 4 + rng.integers(0, 8, base.shape, dtype=np.uint8)
        paths.append(folder / f"img{i:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("hash_cost.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root / "images", args.images, args.size)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        cold = timed(lambda: (cache := HashCache(root / "out"), [cache.sha256(p) for p in paths],
                              cache.save()))
        warm = timed(lambda: (cache := HashCache(root / "out"), [cache.sha256(p) for p in paths]))
        sample = paths[: min(500, len(paths))]
        decode = timed(lambda: [read_rgb(p) for p in sample]) * len(paths) / len(sample)
    lines = [
        "# Content fingerprints: hashing cost",
        "",
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; `benchmarks/hash_cost.py --images {args.images} "
        f"--size {args.size}`.",
        "",
        "| what | seconds | per image |",
        "|---|---|---|",
        f"| first run: read and SHA-256 every image ({megabytes:.0f} MiB) | {cold:.2f} | "
        f"{cold / len(paths) * 1e3:.3f} ms |",
        f"| resume or merge: hashes from the cache (stat only) | {warm:.2f} | "
        f"{warm / len(paths) * 1e3:.3f} ms |",
        f"| for scale: decoding the images (PIL, as a run does; from {len(sample)}) | "
        f"{decode:.2f} | {decode / len(paths) * 1e3:.3f} ms |",
        "",
        "The images were just written, so they are read from the OS page cache: on a cold "
        "network file system the first run's hashing costs what reading the files costs, "
        "which the run's decoding pays again anyway.",
    ]
    text = "\n".join(lines) + "\n"
    args.output.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
