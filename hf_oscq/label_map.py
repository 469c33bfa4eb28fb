"""Which class of the model each class of an evaluation dataset is: by class name (the model's `label2id`), or by
an explicit mapping, and never by position alone: an imagefolder numbers its classes in the sorted order of its
folder names, which need not be the model's order (`T-shirt/top` cannot even be a folder name).

Used by `hf-oscq eval` (`evaluation.py`, `--label_map`) for every dataset source: a Hub dataset, a local
`save_to_disk` folder, parquet files, an imagefolder and the recipes' datasets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import OscqValueError

# transformers' names for classes nobody named (`PretrainedConfig` fills `id2label` with them).
_GENERIC_LABEL = re.compile(r"LABEL_\d+")


class LabelMismatchError(OscqValueError):
    """The dataset's classes cannot all be matched to the model's classes by name or by the mapping given."""


def parse_label_map(value: str | Path | Mapping | None) -> dict[str, str | int] | None:
    """A `--label_map`: a JSON object (inline, or the path of a `.json` file) from dataset class names (or, for a
    dataset without names, its label ids as strings) to the model's class names or ids.

    Raises:
        OscqValueError: for something that is neither a JSON object nor a file holding one.
    """
    if value is None or isinstance(value, Mapping):
        return None if value is None else {str(key): target for key, target in value.items()}
    text = str(value)
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        text = path.read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not all(isinstance(v, str | int) for v in mapping.values()):
        raise OscqValueError(
            f"--label_map must be a JSON object (or a .json file holding one) from dataset class names to the "
            f'model\'s class names or ids, e.g. \'{{"T-shirt_top": "T-shirt/top"}}\'; got {str(value)[:200]!r}.'
        )
    return {str(key): target for key, target in mapping.items()}


def _normalized(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _suggestion(unmatched: list[str], free: list[str]) -> str:
    """A `--label_map` for the unmatched classes whose letters and digits equal exactly one free model class."""
    pairs = {}
    for name in unmatched:
        candidates = [label for label in free if _normalized(label) == _normalized(name)]
        if len(candidates) == 1:
            pairs[name] = candidates[0]
    if not pairs:
        return ""
    return f" If they are the same classes under other names, pass --label_map '{json.dumps(pairs)}'."


def model_class_ids(
    dataset_names: Sequence[str] | None,
    label2id: Mapping[str, int] | None,
    num_labels: int,
    label_map: Mapping[str, str | int] | None = None,
) -> list[int] | None:
    """The model's class id of each dataset class, in the dataset's order (`result[dataset id] = model id`), or
    `None` where the dataset's ids are the model's ids as they are (a dataset without class names and no mapping).

    Args:
        dataset_names: the dataset's class names (its `ClassLabel` names), `None` for plain integer labels.
        label2id: the model's `config.label2id`.
        num_labels: the model's number of classes.
        label_map: dataset class name (or id, as a string) -> model class name or id; other classes match by name.

    Raises:
        LabelMismatchError: naming the dataset classes that match no model class (and the model classes left over),
            a mapping key that is no dataset class, a target that is no model class, or two dataset classes mapped to
            one model class.
    """
    label2id = {str(name): int(index) for name, index in (label2id or {}).items()}
    named = {name: index for name, index in label2id.items() if not _GENERIC_LABEL.fullmatch(name)}
    label_map = dict(label_map or {})
    if dataset_names is None:
        if not label_map:
            return None
        dataset_names = [str(index) for index in range(max(int(key) for key in label_map) + 1)]
    unknown_keys = sorted(set(label_map) - set(dataset_names))
    if unknown_keys:
        raise LabelMismatchError(
            f"--label_map names {unknown_keys}, which are not classes of the dataset; its classes are "
            f"{list(dataset_names)}."
        )
    order, unmatched = [], []
    for name in dataset_names:
        target = label_map.get(name, name)
        # A digit string is a class id where the mapping says so, or where the model has no class names to match: a
        # dataset whose classes are called "0".."9" is not scored against a model whose classes have other names.
        as_id = name in label_map or not named
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit() and target not in named and as_id):
            index = int(target)
            if not 0 <= index < num_labels:
                raise LabelMismatchError(
                    f"--label_map sends {name!r} to class id {index}; the model has {num_labels}."
                )
        elif target in named:
            index = named[target]
        else:
            unmatched.append(name)
            continue
        order.append(index)
    if unmatched:
        used = set(order)
        free = [name for name, index in named.items() if index not in used]
        raise LabelMismatchError(
            f"The dataset's classes {unmatched} are not classes of the model (by name; its classes are "
            f"{list(named) or f'{num_labels} unnamed ones'}), so their labels cannot be matched to its outputs"
            f"{f'; model classes without a match: {free}' if free else ''}. Pass --label_map with a JSON object "
            f"from dataset class to model class name or id.{_suggestion(unmatched, free)}"
        )
    duplicates = sorted({index for index in order if order.count(index) > 1})
    if duplicates:
        raise LabelMismatchError(
            f"Several dataset classes map to the model's class ids {duplicates}: each dataset class needs its own "
            "model class (check --label_map)."
        )
    return order
