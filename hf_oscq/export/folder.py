"""The export folder (the layout `export_quantized` writes): reading its manifest, finding its variants, and the
Auto class its checkpoints load with.

```
OUT/fp/  OUT/w2/ ... OUT/w8/  OUT/oscq_export.json
```
Everything here is local and read-only: a folder that is incomplete is rejected before any card is rendered or any
network call is made. The CLI, the cards, the Hub push and the Space all read export folders through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import OscqValueError
from ..paths import not_a_folder
from ..provenance import Provenance
from ..quantization.spec import QuantSpec, validate_bits
from ..quantization.variants import FULL_PRECISION, is_variant, sort_variants, variant_name, variant_names
from .checkpoint import QUANT_METHOD, READABLE_FORMAT_VERSIONS, read_config, restore_guarded_fields
from .formats import COMPRESSED_TENSORS_FORMAT, EXPORT_FORMATS, OSCQ_FORMAT

MANIFEST_NAME = "oscq_export.json"
# Written by the recipes next to a trained model: how it was trained, the dataset included, so that
# `hf-oscq export` can re-estimate BatchNorm statistics on the same training data without being told.
TRAINING_INFO_NAME = "oscq_training.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Formats that are unpickled on load: never published, whatever the case of the name or the suffixes after them
# (`model.PT`, `extra.pkl.gz`), nor inside an archive (`pickle_reason`).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_PICKLE_PROTOCOLS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))  # the first bytes of a pickle
# (pipeline tag, Auto class, its architecture mapping in transformers.models.auto.modeling_auto, the architecture
# suffix of models outside that mapping such as TimmWrapper). A new task is one more row.
TASKS = (
    (
        "image-classification",
        "AutoModelForImageClassification",
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "ForImageClassification",
    ),
    (
        "text-classification",
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "ForSequenceClassification",
    ),
    ("text-generation", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "ForCausalLM"),
)
FALLBACK_AUTO_CLASS = "AutoModel"


class ExportFolderError(OscqValueError):
    """The export folder is missing, incomplete or not in the format this version of hf_oscq reads."""


def _fail(export_dir: Path, problem: str) -> ExportFolderError:
    return ExportFolderError(
        f"Export folder {str(export_dir)!r} is incomplete: {problem}. Re-run hf_oscq.export_quantized(model, "
        f"{str(export_dir)!r}, bits=...) to write it again."
    )


def _read_json(path: Path, export_dir: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(export_dir, f"{path.relative_to(export_dir)} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _fail(export_dir, f"{path.relative_to(export_dir)} is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise _fail(export_dir, f"{path.relative_to(export_dir)} does not hold a JSON object")
    return content


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a `save_pretrained` folder (one file, or the shards its index lists)."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if not index.is_file():
        return []
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    return [folder / shard for shard in shards]


def weights_size(folder: str | Path) -> int:
    """Bytes of the safetensors weight files of a `save_pretrained` folder."""
    return sum(path.stat().st_size for path in weight_files(Path(folder)))


def _pickled_name(name: str) -> bool:
    """Whether a file name carries a pickle suffix, in any case and anywhere in its suffixes (`model.PT`,
    `extra.pkl.gz`, `weights.bin.zip`)."""
    return any(suffix.lower() in PICKLE_SUFFIXES for suffix in Path(name).suffixes)


def pickle_reason(path: str | Path) -> str | None:
    """Why the file at `path` may hold a pickle, which loading would run as code; `None` when nothing says so.

    Checked without unpickling anything: the name (`_pickled_name`), and for files other than `.safetensors`, the
    first bytes (a pickle of protocol 2 to 5, also inside a gzip stream) and the member names of a zip (what
    `torch.save` writes) or tar archive.
    """
    import gzip
    import tarfile
    import zipfile

    path = Path(path)
    if _pickled_name(path.name):
        return "a pickle file name"
    if path.suffix.lower() == ".safetensors":  # read by safetensors alone, whose length header may start 0x80 0x02
        return None
    try:
        with path.open("rb") as file:
            head = file.read(4)
        if head[:2] == b"\x1f\x8b":  # gzip: look at the start of what it holds
            with gzip.open(path, "rb") as file:
                head = file.read(4)
        if head[:2] in _PICKLE_PROTOCOLS:
            return "pickle data"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as archive:
                members = archive.getnames()
        else:
            return None
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError):
        return None  # unreadable or truncated: other checks name it; this one only looks for pickles
    inside = [member for member in members if _pickled_name(member)]
    return f"an archive holding {inside[:3]}" if inside else None


def export_format(manifest: dict[str, Any]) -> str:
    """The format of an export's `w{b}` folders: its manifest's `format`, `"oscq"` for exports that predate it."""
    return manifest.get("format") or OSCQ_FORMAT


def _check_variant(export_dir: Path, variant: str, bits: int | None, format: str = OSCQ_FORMAT) -> None:
    folder = export_dir / variant
    if not folder.is_dir():
        raise _fail(export_dir, f"the folder {variant}/ is missing")
    pickled = sorted(p.name for p in folder.rglob("*") if p.is_file() and pickle_reason(p))
    if pickled:
        raise ExportFolderError(
            f"{variant}/ in {str(export_dir)!r} holds pickle files {pickled}: only safetensors are published. "
            "Save with save_pretrained(..., safe_serialization=True) and delete the pickle files."
        )
    config = _read_json(folder / "config.json", export_dir)
    files = weight_files(folder)
    if not files or not all(f.is_file() for f in files):
        raise _fail(export_dir, f"{variant}/ has no complete {WEIGHTS_NAME} (or sharded {WEIGHTS_INDEX_NAME})")
    quantization = config.get("quantization_config")
    if bits is None:
        return
    if not isinstance(quantization, dict) or quantization.get("quant_method") != format:
        raise _fail(export_dir, f"{variant}/config.json has no quantization_config with quant_method {format!r}")
    if format == COMPRESSED_TENSORS_FORMAT:
        groups = quantization.get("config_groups")
        found = sorted(
            {str((group.get("weights") or {}).get("num_bits")) for group in groups.values() if isinstance(group, dict)}
            if isinstance(groups, dict)
            else set()
        )
        if found != [str(bits)]:
            raise _fail(
                export_dir, f"{variant}/config.json says num_bits {', '.join(found) or 'none'}, expected {bits}"
            )
    elif quantization.get("bits") != bits:
        raise _fail(export_dir, f"{variant}/config.json says bits={quantization.get('bits')!r}, expected {bits}")


def read_training_info(checkpoint: str | Path) -> dict[str, Any]:
    """How a full-precision checkpoint was trained, where recorded: its `oscq_training.json`, or for the `fp/` folder
    of an export, the manifest's `training` record. `{}` when neither exists (or the manifest records none).

    Raises:
        ExportFolderError: for a record that exists but is not a JSON object (a truncated or edited file): the
            checks that read it (the run's spec, the split it was trained on) are never skipped silently.
    """
    checkpoint = Path(checkpoint)
    for path, key in ((checkpoint / TRAINING_INFO_NAME, None), (checkpoint.parent / MANIFEST_NAME, "training")):
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ExportFolderError(
                f"{path} cannot be read as JSON ({error}): it records how the model was trained; restore it or "
                "delete it to use the model without the record."
            ) from None
        if not isinstance(record, dict):
            raise ExportFolderError(f"{path} does not hold a JSON object: restore it or delete it.")
        record = record.get(key) if key else record
        if isinstance(record, dict):
            return record
    return {}


def recorded_split(dataset: str, trained: dict[str, Any]) -> dict[str, Any]:
    """How a recipe run split `dataset` (from `read_training_info`), as `load_image_dataset` keyword arguments:
    `seed` (the digits train/test split), `max_train_samples` and `validation_fraction`; the unsplit defaults when the
    record is of another dataset or none. Scoring a run on its own test images, or re-estimating BatchNorm on its own
    training images, needs them."""
    if trained.get("dataset") != dataset:
        return {"seed": 0, "max_train_samples": None, "validation_fraction": 0.0}
    return {
        "seed": (trained.get("hyperparameters") or {}).get("seed", 0),
        "max_train_samples": trained.get("max_train_samples"),
        "validation_fraction": trained.get("validation_fraction") or 0.0,
    }


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Reads and checks `oscq_export.json` alone (the variant folders are not looked at; see
    `read_export_manifest`).

    Returns:
        The manifest, with `bits` as a sorted list of ints, `format` (`"oscq"` for exports written before it was
        recorded) and `metrics`, `training`, `comparisons`, `versions` present (possibly `None`; exports written
        before versions were recorded have none).

    Raises:
        ExportFolderError: for a missing folder or manifest, another format version or invalid fields.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ExportFolderError(
            f"Export folder {str(export_dir)!r} {not_a_folder(export_dir)}: pass the directory "
            "hf_oscq.export_quantized wrote."
        )
    manifest = _read_json(export_dir / MANIFEST_NAME, export_dir)
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
        writer = f" ({versions['hf_oscq']})" if versions.get("hf_oscq") else ""
        raise ExportFolderError(
            f"{MANIFEST_NAME} in {str(export_dir)!r} has format_version {manifest.get('format_version')!r}; this "
            f"hf_oscq reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Install the hf_oscq version "
            f"that wrote it{writer}, or export again."
        )
    try:
        bits = sorted({validate_bits(b) for b in manifest.get("bits") or []})
    except ValueError as error:
        raise _fail(export_dir, f"{MANIFEST_NAME} lists invalid bit-widths ({error})") from None
    if not bits:
        raise _fail(export_dir, f"{MANIFEST_NAME} lists no bit-widths")
    manifest["bits"] = bits
    if manifest.setdefault("format", OSCQ_FORMAT) not in EXPORT_FORMATS:
        raise _fail(export_dir, f"{MANIFEST_NAME} names the unknown format {manifest['format']!r}")
    for key in ("metrics", "training", "comparisons", "provenance", "versions"):
        if not isinstance(manifest.setdefault(key, None), dict | None):
            raise _fail(export_dir, f"{MANIFEST_NAME} field {key!r} must be an object or null")
    return manifest


def manifest_provenance(
    provenance: Provenance | dict[str, Any] | None, metrics: Any = None, comparisons: Any = None
) -> dict[str, Any] | None:
    """The manifest's `provenance` record, `{"metrics": ..., "comparisons": ...}`: what the stored `metrics` and
    `comparisons` tables were measured on (`None` for a table that is not stored), or `None` without any.

    Raises:
        OscqValueError: for a `provenance` that is not a `Provenance` (or its `to_dict()`).
    """
    if provenance is None:
        return None
    value = Provenance.from_dict(provenance)
    if value is None:
        raise OscqValueError(
            f"provenance must be an hf_oscq.Provenance (or its to_dict()), got {provenance!r}: say what the metrics "
            "were measured on, e.g. Provenance('accuracy', 'uoft-cs/cifar10', 'test', examples=10000, "
            "batchnorm='none')."
        )
    return {
        "metrics": value.to_dict() if metrics else None,
        "comparisons": value.to_dict() if comparisons else None,
    }


def table_provenance(manifest: dict[str, Any], table: str) -> Provenance | None:
    """What the manifest's `table` (`"metrics"` or `"comparisons"`) was measured on; `None` where it was not
    recorded (exports written before provenance was, or tables passed without it)."""
    return Provenance.from_dict((manifest.get("provenance") or {}).get(table))


def read_export_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Checks that `export_dir` is a complete export folder and returns its `oscq_export.json`.

    Checked: the manifest (format version, bit-widths, export format), `fp/` and every `w{b}/` folder (config.json,
    safetensors weights, a `quantization_config` of the export's format and bit-width), and that no pickle file is
    present.

    Args:
        export_dir: the folder `export_quantized` wrote.

    Returns:
        The manifest, as `read_manifest` returns it.

    Raises:
        ExportFolderError: naming the first problem found and how to fix it.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    _check_variant(export_dir, FULL_PRECISION, None)
    for b in manifest["bits"]:
        _check_variant(export_dir, variant_name(b), b, manifest["format"])
    return manifest


def _check_float_files(folder: Path) -> None:
    from safetensors import safe_open

    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name).get_shape()
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            raise ExportFolderError(
                f"{path} is not a readable safetensors file ({error}): it is truncated or corrupted."
            ) from None


def checkpoint_model_config(folder: str | Path):
    """The transformers config of one checkpoint folder as `from_pretrained` sees it: in hf_oscq's format, with the
    fields the export guarded (`architectures`, ...: set so that a load without hf_oscq fails) put back, as the
    quantizer puts them back. Build a model from it on the meta device to inspect its layers without the weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    quantization = read_config(folder).get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        restore_guarded_fields(config, quantization.get("guarded_fields") or {})
    return config


def bn_recalibrated(folder: str | Path) -> bool | None:
    """Whether the BatchNorm statistics of one checkpoint folder were re-estimated after rounding: its own
    `quantization_config` says so in hf_oscq's format, the export's manifest in the folder above for the
    compressed-tensors format (whose config has no such field); `None` for a full-precision folder (nothing was
    rounded) or where nothing records it."""
    folder = Path(folder)
    quantization = read_config(folder).get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    if quantization.get("quant_method") == QUANT_METHOD:
        return bool(quantization.get("bn_recalibrated"))
    try:
        return bool(read_manifest(folder.parent).get("bn_recalibrated"))
    except ExportFolderError:
        return None


def verify_checkpoint_folder(folder: str | Path) -> None:
    """Checks every file of one export folder (`fp/` or `w{b}/`) as loading it would, without loading the weights.

    `w{b}/` in hf_oscq's format: the checks `from_pretrained` makes (`validate_checkpoint_files`, with the model
    built on the meta device from config.json, and every packed weight's codes); in the compressed-tensors format:
    `compressed_tensors_folder.verify_compressed_tensors_folder` (its quantization_config, checksum and packed
    tensors).
    `fp/`: readable safetensors headers that fit their files (a plain transformers checkpoint carries no checksum).
    All: every JSON file parses.

    Raises:
        ExportFolderError: naming the file and what is wrong with it.
    """
    import torch

    from .checkpoint import CheckpointFormatError, validate_checkpoint_files
    from .hf_quantizer import OscqQuantizationConfig

    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ExportFolderError(f"{path} is not valid JSON ({error}).") from None
    config = read_config(folder)
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == COMPRESSED_TENSORS_FORMAT:
        from .compressed_tensors_folder import verify_compressed_tensors_folder

        verify_compressed_tensors_folder(folder)
        return
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        _check_float_files(folder)
        return
    try:
        quantization_config = OscqQuantizationConfig.from_dict(quantization)
        model_config = checkpoint_model_config(folder)
        with torch.device("meta"):
            model = auto_class_for(config).from_config(model_config)
        validate_checkpoint_files(weight_files(folder), quantization_config, model, check_codes=True)
    except CheckpointFormatError as error:
        raise ExportFolderError(str(error)) from None


def variants(manifest: dict[str, Any]) -> list[str]:
    """`["fp", "w2", ...]`: the folders of an export, parent first."""
    return variant_names(manifest["bits"])


def export_spec(manifest: dict[str, Any], bits: int) -> QuantSpec:
    """The `QuantSpec` the export's `w{bits}` variant was quantized with (its manifest stores the spec's fields)."""
    return QuantSpec.from_dict({**manifest, "bits": bits})


def variant_folders(folder: str | Path) -> dict[str, Path]:
    """`{"fp": path, "w2": path, ...}` for an export folder (parent first), or `{name: folder}` for one checkpoint
    folder.

    Raises:
        ExportFolderError: when `folder` does not exist or holds neither.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFolderError(f"{folder} {not_a_folder(folder)}: pass an export folder or a checkpoint folder.")
    if (folder / "config.json").is_file():
        return {folder.name: folder}
    found = {child.name: child for child in folder.iterdir() if (child / "config.json").is_file()}
    names = sort_variants(name for name in found if is_variant(name))
    if not names:
        raise ExportFolderError(f"{folder} holds neither config.json nor fp/ or w{{b}}/ checkpoint folders.")
    return {name: found[name] for name in names}


def folder_size(folder: str | Path) -> int:
    """Bytes of all files under `folder` (hidden ones excluded)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not _hidden(p, Path(folder)))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def folder_files(folder: str | Path) -> list[Path]:
    """Files under `folder` in sorted order, relative to it, without hidden files and folders (`.cache/`, ...)."""
    root = Path(folder)
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not _hidden(p, root))


def task_for(config: dict[str, Any] | Any) -> tuple[str | None, str]:
    """`(pipeline tag, Auto class name)` of a model config (a `config.json` dict or a `PretrainedConfig`): the first
    row of `TASKS` whose transformers mapping lists its architecture, or whose suffix it ends with;
    `(None, "AutoModel")` for an architecture no row knows."""
    from transformers.models.auto import modeling_auto

    architectures = (config.get("architectures") if isinstance(config, dict) else config.architectures) or []
    for tag, auto_class, mapping, suffix in TASKS:
        known = set(getattr(modeling_auto, mapping, {}).values())
        if any(name in known or name.endswith(suffix) for name in architectures):
            return tag, auto_class
    return None, FALLBACK_AUTO_CLASS


def auto_class_for(config: dict[str, Any] | Any | str | Path) -> type:
    """The transformers Auto class that loads a checkpoint: from its config, or from its folder's `config.json`.

    Example:
        ```python
        model = auto_class_for("export/w3").from_pretrained("export/w3")
        ```
    """
    if isinstance(config, str | Path):
        config = read_config(config)
    import transformers

    return getattr(transformers, task_for(config)[1])
