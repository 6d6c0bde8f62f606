"""Write sample_images/: held-out digits as PNG (with labels.csv) and a few scikit-image photos.

Run from the repo root: `python scripts/make_sample_images.py`. Deterministic.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from saliencycheck.zoo import DIGITS_TRAIN_COUNT, digits_pixels

ROOT = Path(__file__).resolve().parents[1] / "sample_images"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def write_digits(per_class: int = 2) -> None:
    pixels, labels = digits_pixels(64)
    out = ROOT / "digits"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for digit in range(10):
        held_out = np.flatnonzero(labels[DIGITS_TRAIN_COUNT:] == digit)[:per_class]
        for index in held_out + DIGITS_TRAIN_COUNT:
            name = f"digit{digit}_{index:04d}.png"
            Image.fromarray(pixels[index], mode="L").save(out / name)
            rows.append((name, int(labels[index])))
    with (out / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("image", "label"), *rows])


def write_photos(size: int = 256) -> None:
    out = ROOT / "photos"
    out.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image.thumbnail((size, size))
        image.save(out / f"{name}.jpg", quality=90)


if __name__ == "__main__":
    write_digits()
    write_photos()
