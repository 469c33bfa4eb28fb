"""Hints for inputs that do not reach the model: columns the Trainer removed before a dataset transform could read
them (`remove_unused_columns`), and labels under a name the Trainer does not pass on (`target` instead of `labels`).
The plain Trainer fails there with a bare `KeyError` or "The model did not return a loss"."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from ..errors import OscqValueError


def removed_columns_hint(columns: Collection[str], removed: Collection[str]) -> str:
    return (
        f"The Trainer removed the columns {sorted(removed)} because the model's forward does not take them "
        f"(remove_unused_columns=True), leaving {sorted(columns)}. If a transform (set_transform / with_transform) "
        "builds the model inputs from them, pass remove_unused_columns=False to OscillationConfig."
    )


def guard_transform(dataset, removed: Collection[str], description: str | None):
    """`dataset` with its format transform (if any) wrapped so that a `KeyError` for a removed column becomes an
    `OscqValueError` saying so. `dataset` is the Trainer's pruned copy; other datasets are returned unchanged."""
    format_ = getattr(dataset, "format", None)
    if not removed or not isinstance(format_, Mapping) or format_.get("type") != "custom":
        return dataset
    transform: Callable = format_["format_kwargs"]["transform"]
    columns = list(dataset.column_names)
    where = f"the {description} dataset" if description else "the dataset"

    def guarded(batch):
        try:
            return transform(batch)
        except KeyError as error:
            raise OscqValueError(
                f"The transform of {where} reads the column {error.args[0]!r}, which is not there. "
                + removed_columns_hint(columns, removed)
            ) from error

    dataset.set_transform(guarded, columns=format_["columns"], output_all_columns=format_["output_all_columns"])
    return dataset


def missing_labels_hint(inputs: Mapping, label_names: Collection[str], removed: Collection[str]) -> str | None:
    """What to change when a batch carries none of the label names, else `None`."""
    if any(name in inputs for name in label_names):
        return None
    hint = (
        f"The batch holds {sorted(inputs)} and no {sorted(label_names)}: name the dataset's label column `labels` "
        "(or `label`, which the data collator renames), or set label_names=[...] in OscillationConfig."
    )
    if removed:
        hint += (
            f" The Trainer removed {sorted(removed)} (remove_unused_columns=True): columns the forward does not take."
        )
    return hint
