"""Writes the bundled example images: test-split digits (8 x 8) and Fashion-MNIST test images (28 x 28), as PNG,
and `examples.json`, which lists each dataset's examples with their true labels (the label names of the recipes).

Run from the repository root: `python space/examples/make_examples.py`. Images keep their native size, so the
examples are exactly what the demo models were evaluated on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from hf_oscq.scripts.data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, digits_splits, read_idx

HERE = Path(__file__).resolve().parent
FASHION_LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def write_digits(count: int = 4, seed: int = 0) -> list[tuple[str, str]]:
    test = digits_splits(seed)[1].with_format("numpy")  # the digits test split of hf_oscq.scripts.data
    images, labels = test["pixel_values"], test["labels"]
    chosen = {}
    for index, label in enumerate(labels):  # the first test image of each of `count` different digits
        if len(chosen) < count:
            chosen.setdefault(int(label), index)
    for label, index in chosen.items():
        Image.fromarray(images[index].astype(np.uint8), mode="L").save(HERE / f"digit_{label}.png")
    return [(f"digit_{label}.png", str(label)) for label in sorted(chosen)]


def write_fashion(indices: tuple[int, ...] = (0, 1, 2)) -> list[tuple[str, str]]:
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    written = []
    for index in indices:
        name = f"fashion_{FASHION_LABELS[labels[index]]}.png"
        Image.fromarray(images[index], mode="L").save(HERE / name)
        written.append((name, FASHION_MNIST_LABELS[labels[index]]))
    return written


if __name__ == "__main__":
    listed = {"digits": write_digits(), "fashion_mnist": write_fashion()}
    lines = [f"  {json.dumps(dataset)}: {json.dumps(entries)}" for dataset, entries in listed.items()]
    (HERE / "examples.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
