"""Evaluating checkpoints on any image classification dataset, as `hf-oscq eval` does: the dataset (a Hub id, a local
`save_to_disk` folder, an imagefolder, parquet files, or a dataset of the recipes), each checkpoint's own saved image
processor, accuracy through `evaluate`, and the table recorded in an export's manifest so that its cards carry it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OscqError, OscqValueError
from .export.folder import MANIFEST_NAME, auto_class_for, manifest_provenance, read_manifest, variant_folders
from .label_map import model_class_ids
from .provenance import Provenance
from .quantization.batchnorm import warn_if_stale_statistics

logger = logging.getLogger(__name__)

_LOCAL_FIX = (
    "pass an imagefolder (one subfolder of images per class, optionally under train/ and test/), a folder written by "
    "save_to_disk, or parquet files, holding at least one readable example."
)
# Split names tried in this order when none is given (the Hub's names for held-out data first).
DEFAULT_SPLITS = ("test", "validation", "valid", "eval", "train")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


class HubDatasetUnreachableError(OscqError, RuntimeError):
    """A dataset given by its Hub id could not be downloaded."""


def _hub_dataset(source: str, split: str | None):
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        reason = str(error).splitlines()[0] if str(error) else ""
        raise HubDatasetUnreachableError(
            f"Could not load the dataset {source!r} from the Hugging Face Hub ({type(error).__name__}: {reason}). "
            "Offline, pass a local copy instead: a folder written by save_to_disk, an imagefolder (one subfolder "
            "per class) or parquet files."
        ) from None


def _local_dataset(path: Path):
    import datasets

    if path.is_file():
        if path.suffix != ".parquet":
            raise OscqValueError(f"{path} is a file but not a .parquet file: pass a parquet file or a folder.")
        return datasets.load_dataset("parquet", data_files={"train": str(path)})
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        # The split from the file name, as the Hub names them: test-00000-of-00001.parquet, ...
        files: dict[str, list[str]] = {}
        for file in parquet:
            files.setdefault(file.stem.split("-")[0], []).append(str(file))
        return datasets.load_dataset("parquet", data_files=files)
    return datasets.load_dataset("imagefolder", data_dir=str(path))


def _pick_split(loaded, split: str | None, source: str):
    """`(dataset, split name)` of a loaded dataset or dataset dict."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded, split or (str(loaded.split) if loaded.split is not None else "train")
    names = list(loaded)
    if split is not None:
        if split not in loaded:
            raise OscqValueError(f"{source} has no split {split!r}; its splits are {names}. Pass --split NAME.")
        return loaded[split], split
    chosen = next((name for name in DEFAULT_SPLITS if name in loaded), names[0] if len(names) == 1 else None)
    if chosen is None:
        raise OscqValueError(f"{source} has the splits {names}: choose one with --split NAME.")
    logger.info("Evaluating on the %r split of %s", chosen, source)
    return loaded[chosen], chosen


def _column(dataset, given: str | None, candidates: tuple[str, ...], kind: str, feature_type: str) -> str:
    columns = list(dataset.column_names)
    if given is not None:
        if given not in columns:
            raise OscqValueError(f"The dataset has no column {given!r}; its columns are {columns}.")
        return given
    typed = [name for name, feature in dataset.features.items() if type(feature).__name__ == feature_type]
    for name in typed + [c for c in candidates if c in columns]:
        return name
    flag = "--image_column" if kind == "image" else "--label_column"
    raise OscqValueError(f"Which column holds the {kind}s? The dataset has {columns}: pass {flag} NAME.")


def load_eval_dataset(
    source: str,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    data_dir: str | Path | None = None,
    max_samples: int | None = None,
    seed: int = 0,
):
    """`load_eval_split(...)` without the split's name: the dataset alone."""
    return load_eval_split(source, split, image_column, label_column, data_dir, max_samples, seed)[0]


def load_eval_split(
    source: str,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    data_dir: str | Path | None = None,
    max_samples: int | None = None,
    seed: int = 0,
):
    """The evaluation images and labels of a dataset, as stored (no transform), with columns `image` and `label`.

    Args:
        source: a dataset of the recipes (`digits`, `fashion_mnist`, `cifar10`, `tiny-imagenet`; their test split,
            `data_dir` for a local copy), a local path (a `save_to_disk` folder, a folder or file of parquet, or an
            imagefolder: one subfolder per class, optionally under `train/` / `test/`), or a Hub dataset id.
        split: the split to evaluate; by default the first of `DEFAULT_SPLITS` the dataset has.
        image_column: the column holding the images; by default the column of `Image` type, else `image` / `img`.
        label_column: the column holding the labels; by default the `ClassLabel` column, else `label` / `labels`.
        data_dir: a local copy of a recipe dataset (see `hf_oscq.scripts.data.load_image_dataset`).
        max_samples: keep the first samples only.
        seed: seed of the train/test split of the datasets that have none of their own (`digits`); the recipes
            split with their run's seed, so scoring a run on its own test images needs that seed.

    Returns:
        `(dataset, split)`: a `datasets.Dataset` with the columns `image` and `label` (a `ClassLabel` where the class
        names are known), and the split's name as a `Provenance` records it.

    Raises:
        OscqValueError: for a missing split or column.
        HubDatasetUnreachableError: when `source` is a Hub id that cannot be downloaded (offline, or unknown).
    """
    import datasets

    from .scripts.data import DATASETS, raw_splits, split_name
    from .scripts.dataset_errors import dataset_errors

    if source in DATASETS and not Path(source).exists():
        if split is not None:
            raise OscqValueError(f"--split does not apply to {source!r}, whose test split is built in.")
        _, dataset, names = raw_splits(source, data_dir, seed)
        if not isinstance(dataset.features["labels"], datasets.ClassLabel):  # IDX files, digits: ids in name order
            dataset = dataset.cast_column("labels", datasets.ClassLabel(names=names))
        split = split_name(DATASETS[source], seed)
    elif Path(source).exists():
        with dataset_errors(f"--dataset {source}", _LOCAL_FIX):
            loaded = _local_dataset(Path(source))
        dataset, split = _pick_split(loaded, split, source)
    else:
        dataset, split = _pick_split(_hub_dataset(source, split), split, source)
    image = _column(dataset, image_column, IMAGE_COLUMNS, "image", "Image")
    label = _column(dataset, label_column, LABEL_COLUMNS, "label", "ClassLabel")
    dataset = dataset.select_columns([image, label]).rename_columns({image: "image", label: "label"})
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, split


def _as_image(value: Any):
    """A PIL image of a stored image: PIL images as loaded, 2-D / 3-D uint8 arrays (IDX files, digits) as images."""
    if hasattr(value, "convert"):
        return value
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.asarray(value, dtype=np.uint8))


def image_inputs(image_processor, images: list) -> Any:
    """The model inputs of a batch of images: the checkpoint's saved image processor called on them as loaded.

    Returns:
        The `pixel_values` tensor `(batch, channels, height, width)`, float32.
    """
    return image_processor(images=[_as_image(image) for image in images], return_tensors="pt")["pixel_values"]


def _batches(dataset, image_processor, batch_size: int) -> Iterator[dict[str, Any]]:
    from .scripts.dataset_errors import dataset_errors

    for start in range(0, len(dataset), batch_size):
        rows = f"The dataset's rows {start} to {min(start + batch_size, len(dataset)) - 1}"
        with dataset_errors(rows, "replace or remove the file that is not a readable image (PNG, JPEG, ...)."):
            rows = dataset[start : start + batch_size]
            pixel_values = image_inputs(image_processor, rows["image"])
        yield {"pixel_values": pixel_values, "labels": rows["label"]}


def load_image_processor(folder: str | Path, default=None):
    """The image processor saved in a checkpoint folder (`preprocessor_config.json`), else `default`.

    Raises:
        OscqValueError: when the folder has none and there is no default.
    """
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        if default is not None:
            logger.info("%s has no saved image processor: preparing the images as the recipes do", folder)
            return default
        raise OscqValueError(
            f"{folder} has no preprocessor_config.json, so its images cannot be prepared as in training: save the "
            "image processor next to the model (processor.save_pretrained(folder), or export_quantized(..., "
            "image_processor=processor))."
        )
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def _labels_in_model_order(dataset, config, label_map: dict[str, str | int] | None = None):
    """The dataset with its labels renumbered to the model's class ids: matched by class name to the model's
    `label2id`, or through `label_map` (`label_map.model_class_ids`); never by position alone (an imagefolder numbers
    its classes in the sorted order of the folder names).

    Raises:
        LabelMismatchError: for a dataset class that matches no model class, naming it.
        OscqValueError: for integer labels without names that are not class ids of the model.
    """
    feature = dataset.features["label"]
    names = list(feature.names) if getattr(feature, "names", None) else None
    num_labels = int(getattr(config, "num_labels", 0) or len(getattr(config, "id2label", None) or {}))
    order = model_class_ids(names, getattr(config, "label2id", None), num_labels, label_map)
    if order is None:
        labels = dataset["label"]
        if labels and not 0 <= min(labels) <= max(labels) < num_labels:
            raise OscqValueError(
                f"The dataset's labels run from {min(labels)} to {max(labels)}, but the model has {num_labels} "
                "classes, and without class names they cannot be matched: use a dataset with a ClassLabel column, "
                "or pass --label_map."
            )
        logger.warning("The dataset's labels have no class names: they are taken as the model's class ids.")
        return dataset
    if order == list(range(len(order))):
        return dataset
    import datasets

    logger.info("Labels renumbered to the model's class ids by class name")
    dataset = dataset.cast_column("label", datasets.Value("int64"))
    renumber = lambda labels: {"label": [order[label] for label in labels]}  # noqa: E731
    return dataset.map(renumber, input_columns="label", batched=True)


def _check_label_range(dataset, config, path: Path) -> None:
    """Refuses labels outside the model's class ids (a prediction can never match them, so they would count as
    errors without a word).

    Raises:
        OscqValueError: naming the label range found and the model's number of classes.
    """
    classes = getattr(config, "num_labels", None)
    labels = dataset["label"] if len(dataset) else []
    if not classes or not labels:
        return
    low, high = min(labels), max(labels)
    if low < 0 or high >= classes:
        raise OscqValueError(
            f"The dataset's labels run from {low} to {high}, but {path} classifies {classes} classes (label ids 0 to "
            f"{classes - 1}): evaluate it on a dataset of its own classes, or pass --label_column NAME for the column "
            "that holds them."
        )


def _warn_plain_rounded_batchnorm(name: str, path: Path, model) -> bool:
    """Checkpoints are evaluated as written; a quantized BatchNorm one whose statistics were not re-estimated after
    rounding is worth a warning, since that costs accuracy at low bit-widths. Returns whether the checkpoint's
    statistics were re-estimated."""
    from .export.folder import bn_recalibrated
    from .quantization.batchnorm import has_batchnorm

    recalibrated = bn_recalibrated(path)
    if recalibrated is False and has_batchnorm(model):
        logger.warning(
            "%s: BatchNorm statistics were not re-estimated after rounding (plain rounding, the paper's PTQ), which "
            "costs accuracy at low bit-widths; `hf-oscq export` without --bn_recalibration_samples 0 re-estimates "
            "them.",
            name,
        )
    return bool(recalibrated)


def evaluate_folder(
    folder: str | Path,
    dataset,
    batch_size: int = 256,
    default_processor=None,
    label_map: dict[str, str | int] | None = None,
) -> dict[str, dict[str, float]]:
    """`{variant: {"accuracy": ...}}` of every checkpoint of an export folder (or of one checkpoint folder), each
    with its own saved image processor (`default_processor` for a checkpoint without one), on a dataset from
    `load_eval_dataset`, its labels matched to each model's classes by name or through `label_map`
    (`_labels_in_model_order`).

    Each checkpoint is evaluated as it was written: the BatchNorm statistics of a quantized checkpoint are the ones
    its export stored, so the table is what a user of the files gets (a plain-rounded BatchNorm checkpoint warns).
    """
    import torch

    from .training.metrics import evaluate_model

    table, recalibrated = {}, False
    for name, path in variant_folders(folder).items():
        model = auto_class_for(path).from_pretrained(path).eval()
        recalibrated |= _warn_plain_rounded_batchnorm(name, path, model)
        dataset = _labels_in_model_order(dataset, model.config, label_map)
        _check_label_range(dataset, model.config, path)
        processor = load_image_processor(path, default_processor)
        with torch.no_grad():
            table[name] = evaluate_model(model, _batches(dataset, processor, batch_size))
        logger.info("%s: %s", name, table[name])
    if recalibrated:
        warn_if_stale_statistics(table)
    return table


def record_evaluation(
    export_dir: str | Path, table: dict[str, dict[str, float]], provenance: Provenance | dict[str, Any]
) -> None:
    """Writes a cross-bit table into an export's `oscq_export.json` (`metrics`, and what it was measured on under
    `provenance.metrics`; the comparisons keep theirs), replacing the file atomically; the model cards render from
    it.

    Raises:
        ExportFolderError: when `export_dir` is not a complete export folder.
    """
    from .export.folder import read_export_manifest

    export_dir = Path(export_dir)
    read_export_manifest(export_dir)  # the whole export checked before its manifest is replaced
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text())
    manifest["metrics"] = table
    recorded = manifest.get("provenance") if isinstance(manifest.get("provenance"), dict) else {}
    manifest["provenance"] = {
        "metrics": manifest_provenance(provenance, table)["metrics"],
        "comparisons": recorded.get("comparisons"),
    }
    manifest["evaluation"] = {"by": "hf-oscq eval"}  # the cards say how the table was measured
    handle, staging = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", dir=export_dir)
    with os.fdopen(handle, "w") as file:
        file.write(json.dumps(manifest, indent=2) + "\n")
    os.chmod(staging, 0o644)
    os.replace(staging, export_dir / MANIFEST_NAME)


def checkpoint_batchnorm(folder: str | Path) -> tuple[str, int | None]:
    """`(batchnorm, bn_samples)` of a `Provenance` for the checkpoints of an export folder (or one checkpoint) as
    written: from the manifest, else from the checkpoint's model and `export.folder.bn_recalibrated`
    (`"full-precision"` for a folder where nothing was rounded)."""
    from .export.folder import ExportFolderError, bn_recalibrated, checkpoint_model_config
    from .quantization.batchnorm import has_batchnorm

    try:
        manifest = read_manifest(folder)
    except ExportFolderError:
        manifest = None
    if manifest is not None:
        if not manifest.get("has_batchnorm"):
            return "none", None
        if manifest.get("bn_recalibrated"):
            return "re-estimated", (manifest.get("bn_recalibration") or {}).get("samples")
        return "plain", None
    import torch

    from .export.checkpoint import read_config

    path = next(iter(variant_folders(folder).values()))
    with torch.device("meta"):
        model = auto_class_for(path).from_config(checkpoint_model_config(path))
    if not has_batchnorm(model):
        return "none", None
    recalibrated = bn_recalibrated(path)
    if recalibrated is None:
        return ("full-precision", None) if "quantization_config" not in read_config(path) else (None, None)
    return ("re-estimated", None) if recalibrated else ("plain", None)
