"""What a recorded accuracy or perplexity was measured on: one small value shared by every writer and reader of
numbers (the Trainer's metrics, the recipes' `cross_bit.json` / `cross_bit.md`, the export manifest, `hf-oscq eval`,
the model cards and the Space).

Two tables are set side by side only when their provenances are known and equal; anything else is shown in its own
labelled table. A record written before provenance was recorded reads as `None` ("not recorded"), which never
matches anything.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCURACY, PERPLEXITY = "accuracy", "perplexity"
# The metric's name and unit as every printed table and caption states them.
METRIC_LABELS = {ACCURACY: "top-1 accuracy (%)", PERPLEXITY: "perplexity (token-level, lower is better)"}
# The metric's name where its value is stored as it is (an accuracy as a fraction): the cards' model index.
METRIC_NAMES = {ACCURACY: "top-1 accuracy", PERPLEXITY: "token-level perplexity"}
# The dataset of a local copy (an imagefolder, parquet files, a save_to_disk folder): never its path.
LOCAL = "local"
# How BatchNorm statistics were handled after rounding.
BATCHNORM = {
    "none": "no BatchNorm layer",
    "plain": "plain rounding (BatchNorm statistics not re-estimated)",
    "re-estimated": "BatchNorm statistics re-estimated after rounding",
    "full-precision": "full precision (no weight rounded, BatchNorm statistics as trained)",
}
NOT_RECORDED = "not recorded"
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def metric_label(metric: str) -> str:
    """`"accuracy"` -> `"top-1 accuracy (%)"`; another metric name as it is."""
    return METRIC_LABELS.get(metric, metric)


def sentence(text: str) -> str:
    """`text` with its first letter upper-cased (the rest kept: dataset ids and `BatchNorm` keep their case)."""
    return text[:1].upper() + text[1:]


def metric_of(table: Mapping[str, Mapping[str, float]]) -> str:
    """The headline metric of a cross-bit table: perplexity for a language model's table, else accuracy."""
    return PERPLEXITY if any(PERPLEXITY in row for row in table.values()) else ACCURACY


def dataset_id(source: str | None, hub_id: str | None = None) -> str | None:
    """The dataset as a provenance names it: `hub_id` when given, `"local"` for an existing local path, else `source`
    when it is a Hub id or a recipe dataset's name such as `digits` (`None` for anything else)."""
    if hub_id:
        return hub_id
    if source is None:
        return None
    if Path(source).exists():
        return LOCAL
    return source if _HUB_ID.fullmatch(source) else None


@dataclass(frozen=True)
class Provenance:
    """What a cross-bit table was measured on; every value of the table shares it, and its columns (`fp`, `w2`, ...)
    give each value's bit-width.

    Args:
        metric: `"accuracy"` (top-1, stored as a fraction, shown in %) or `"perplexity"` (`exp` of the sum of token
            losses over the number of tokens).
        dataset: a Hub dataset id, a recipe dataset without one (`digits`, `kjv`), or `"local"`; never a path.
        split: the split evaluated (`"test"`; for a dataset split by seed, the seed too).
        examples: the number of examples evaluated (images, or text blocks).
        tokens: for perplexity, the number of predicted tokens.
        batchnorm: `"none"` (the model has no BatchNorm layer), `"plain"` or `"re-estimated"` (how the statistics
            of rounded weights were handled), `"full-precision"` (a checkpoint where nothing was rounded).
        bn_samples: for `"re-estimated"`, the number of training images forwarded at each bit-width.

    Raises:
        ValueError: for an unknown metric or BatchNorm handling, or a dataset that is a path.
    """

    metric: str
    dataset: str | None = None
    split: str | None = None
    examples: int | None = None
    tokens: int | None = None
    batchnorm: str | None = None
    bn_samples: int | None = None

    def __post_init__(self):
        if self.metric not in METRIC_LABELS:
            raise ValueError(f"Provenance metric must be one of {sorted(METRIC_LABELS)}, got {self.metric!r}.")
        if self.batchnorm is not None and self.batchnorm not in BATCHNORM:
            raise ValueError(f"Provenance batchnorm must be one of {sorted(BATCHNORM)}, got {self.batchnorm!r}.")
        if self.dataset is not None and (self.dataset != LOCAL and not _HUB_ID.fullmatch(self.dataset)):
            raise ValueError(
                f"Provenance dataset {self.dataset!r} is not a Hub id: name a local copy {LOCAL!r}, never its path."
            )

    @property
    def known(self) -> bool:
        """Whether every field a comparison needs was recorded."""
        counted = self.examples is not None and (self.metric != PERPLEXITY or self.tokens is not None)
        return None not in (self.dataset, self.split, self.batchnorm) and counted

    def matches(self, other: Provenance | None) -> bool:
        """Whether a table of this provenance may sit next to one of `other`: both known and equal."""
        return other is not None and self.known and other.known and self == other

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Any) -> Provenance | None:
        """The provenance of a stored record, or `None` where none (or an older, partial one) was recorded."""
        if isinstance(record, Provenance):
            return record
        if not isinstance(record, Mapping) or record.get("metric") not in METRIC_LABELS:
            return None
        fields = {field.name for field in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in record.items() if key in fields})
        except (TypeError, ValueError):
            return None

    def describe(self) -> str:
        """One sentence: `"top-1 accuracy (%) on 1,000 examples of the test split of zalando-datasets/fashion_mnist;
        BatchNorm statistics re-estimated after rounding on 256 training images"`."""
        counts = f"{self.examples:,} examples" if self.examples is not None else "an unrecorded number of examples"
        if self.tokens is not None:
            counts += f" ({self.tokens:,} predicted tokens)"
        dataset = "a local copy of a dataset" if self.dataset == LOCAL else self.dataset or "an unnamed dataset"
        split = f"the {self.split} split" if self.split else "an unrecorded split"
        text = f"{metric_label(self.metric)} on {counts} of {split} of {dataset}"
        if self.batchnorm is None:
            return f"{text}; BatchNorm handling {NOT_RECORDED}"
        handling = BATCHNORM[self.batchnorm]
        if self.batchnorm == "re-estimated" and self.bn_samples:
            handling += f" on {self.bn_samples:,} training images"
        return f"{text}; {handling}"


def describe(provenance: Provenance | None, metric: str = ACCURACY) -> str:
    """`provenance.describe()`, or for none recorded the metric and "what it was measured on was not recorded"."""
    if provenance is None:
        return f"{metric_label(metric)}; what it was measured on was {NOT_RECORDED}"
    return provenance.describe()


def group_by_provenance(
    tables: Iterable[tuple[str, Mapping[str, Any], Provenance | None]],
) -> list[tuple[Provenance | None, dict[str, Mapping[str, Any]]]]:
    """Groups labelled tables `(label, cross-bit table, provenance)` into the tables that may be shown together:
    `[(provenance, {label: table, ...}), ...]` in first-seen order. A table joins a group only when its provenance
    `matches` the group's; an unknown provenance is a group of its own."""
    groups: list[tuple[Provenance | None, dict[str, Mapping[str, Any]]]] = []
    for label, table, provenance in tables:
        for known, members in groups:
            if provenance is not None and provenance.matches(known):
                members[label] = table
                break
        else:
            groups.append((provenance, {label: table}))
    return groups


def batchnorm_handling(has_batchnorm: bool, recalibration_samples: int | None) -> tuple[str, int | None]:
    """`(batchnorm, bn_samples)` of a `Provenance`: `"none"` without BatchNorm layers, `"re-estimated"` with the
    number of images when statistics were re-estimated, else `"plain"`."""
    if not has_batchnorm:
        return "none", None
    if recalibration_samples:
        return "re-estimated", int(recalibration_samples)
    return "plain", None


def trainer_provenance(
    trainer, metrics: Mapping[str, float], prefix: str, dataset: str | None = None, split: str | None = None
) -> Provenance:
    """The provenance of an `OscillationTrainer` evaluation's metrics (`trainer.evaluate(..., metric_key_prefix=
    prefix)`): the examples and tokens it counted (`{prefix}_samples`, `{prefix}_tokens`), the BatchNorm handling of
    its cross-bit passes, and the dataset and split its caller names."""
    from .quantization.batchnorm import has_batchnorm

    batchnorm, bn_samples = batchnorm_handling(has_batchnorm(trainer.model), trainer.bn_recalibration_samples)
    tokens = metrics.get(f"{prefix}_tokens")
    examples = metrics.get(f"{prefix}_samples")
    return Provenance(
        metric=PERPLEXITY if f"{prefix}_perplexity" in metrics else ACCURACY,
        dataset=dataset,
        split=split,
        examples=None if examples is None else int(examples),
        tokens=None if tokens is None else int(tokens),
        batchnorm=batchnorm,
        bn_samples=bn_samples,
    )
