"""Writes the bundled example images: test-split digits (8 x 8) and Fashion-MNIST test images (28 x 28), as PNG.

Run from the repository root: `python space/examples/make_examples.py`. Images keep their native size, so the
examples are exactly what the demo models were evaluated on.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def write_digits(count: int = 4, seed: int = 0) -> None:
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    test = order[int(0.8 * len(order)) :]  # the digits test split of hf_oscq.data (80/20, seed 0)
    chosen = {}
    for index in test:  # the first test image of each of `count` different digits
        if len(chosen) < count:
            chosen.setdefault(int(digits.target[index]), index)
    for index in chosen.values():
        pixels = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(HERE / f"digit_{digits.target[index]}.png")


def write_fashion(indices: tuple[int, ...] = (0, 1, 2)) -> None:
    with gzip.open(FASHION_DIR / "t10k-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_DIR / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    for index in indices:
        Image.fromarray(images[index], mode="L").save(HERE / f"fashion_{FASHION_LABELS[labels[index]]}.png")


if __name__ == "__main__":
    write_digits()
    write_fashion()
