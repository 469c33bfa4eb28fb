"""The bundled example images: test images of each dataset with their true labels (`examples/examples.json`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
INDEX_FILE = "examples.json"


@dataclass(frozen=True)
class Example:
    """One test image of `dataset` and its true label (the label name the recipes' models use)."""

    path: Path
    label: str
    dataset: str


def load_examples(folder: Path = EXAMPLES_DIR) -> dict[str, list[Example]]:
    """`{dataset: [Example, ...]}` from `folder/examples.json` (`{dataset: [[file, label], ...]}`), or `{}`."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return {}
    listed = json.loads(index.read_text())
    return {
        dataset: [Example(folder / name, str(label), dataset) for name, label in entries]
        for dataset, entries in listed.items()
    }


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_example(examples: dict[str, list[Example]], path: str | Path | None) -> Example | None:
    """The bundled example whose bytes equal the file at `path` (gradio hands examples over as copies), or None."""
    if path is None or not Path(path).is_file():
        return None
    digest = _digest(path)
    for example in (example for listed in examples.values() for example in listed):
        if example.path.is_file() and _digest(example.path) == digest:
            return example
    return None
