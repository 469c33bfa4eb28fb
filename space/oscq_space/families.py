"""Finding and loading model families: the full-precision parent and its w2..w8 children from one export folder.

An entry is a local export folder (the one holding `oscq_export.json`) or a Hub repo id whose files are such a
folder. Nothing here raises past `load_families`: problems become messages the page shows, so one broken
checkpoint never takes the whole Space down.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer

# Importing hf_oscq registers the loader for quantized checkpoints with transformers, and timm's resnet18_cifar
# (the architecture of the CIFAR ResNet-18 exports).
from hf_oscq import select_weights
from hf_oscq.export.checkpoint import FORMAT_VERSION
from hf_oscq.export.folder import MANIFEST_NAME as EXPORT_FILE
from hf_oscq.export.folder import ExportFolderError, auto_class_for, export_spec, read_manifest, weights_size
from hf_oscq.paths import child_path
from hf_oscq.quantization.batchnorm import has_batchnorm
from hf_oscq.quantization.variants import (
    FULL_PRECISION,
    sort_variants,
    variant_bits,
    variant_name,
    variant_names,
    variant_repo_id,
)
from hf_oscq.training.methods import run_label

logger = logging.getLogger(__name__)

MODELS_ENV = "OSCQ_MODELS"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]
SPACE_CARD = Path(__file__).resolve().parents[1] / "README.md"


class FamilyError(Exception):
    """A family that cannot be loaded at all; the message says what to fix."""


@dataclass
class Variant:
    """One checkpoint of a family: `"fp"` (full precision) or `"w{bits}"`."""

    name: str
    bits: int | None
    path: Path
    model: nn.Module | None = None
    size_bytes: int | None = None
    error: str | None = None


@dataclass
class Family:
    """A parent model and its quantized children, with the export's record (`oscq_export.json`)."""

    name: str
    method: str
    record: dict
    image_processor: object | None = None
    tokenizer: object | None = None  # language models: the tokenizer exported with them
    variants: dict[str, Variant] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> list[Variant]:
        """Variants whose model loaded, full precision first, then from most to fewest bits."""
        return [variant for variant in self.variants.values() if variant.model is not None]

    @property
    def reference_model(self) -> nn.Module | None:
        """The full-precision model when it loaded, else the first loaded checkpoint (None when none loaded)."""
        parent = self.variants.get(FULL_PRECISION)
        if parent is not None and parent.model is not None:
            return parent.model
        return self.loaded[0].model if self.loaded else None

    @property
    def dataset(self) -> str | None:
        """The dataset the family was trained on, as its export records it (`digits`, `fashion_mnist`, ...)."""
        return (self.record.get("training") or {}).get("dataset")

    @property
    def num_channels(self) -> int:
        model = self.reference_model
        return int(getattr(model.config, "num_channels", 3)) if model is not None else 3

    @functools.cached_property
    def quantizable_layers(self) -> tuple[str, ...]:
        """Names of the weights the export quantized, found in the reference model."""
        spec = export_spec(self.record, min(self.record["bits"]))
        return tuple(select_weights(self.reference_model, spec=spec))


def configured_entries(
    environ: Mapping[str, str] = os.environ, repo_root: Path | None = None, space_card: Path = SPACE_CARD
) -> list[str]:
    """The entries to load, first of: `OSCQ_MODELS` (comma-separated), the export folders found under the
    repository's `outputs/`, the `models` of the Space's README front matter (how a deployed Space knows them)."""
    configured = [entry.strip() for entry in environ.get(MODELS_ENV, "").split(",") if entry.strip()]
    if configured:
        return configured
    root = repo_root if repo_root is not None else Path(__file__).resolve().parents[2]
    outputs = root / "outputs"
    found = [str(path.parent) for path in sorted(outputs.rglob(EXPORT_FILE))] if outputs.is_dir() else []
    if found or not space_card.is_file():
        return found
    from huggingface_hub import SpaceCard

    return list(SpaceCard.load(space_card).data.models or [])


def resolve_entry(entry: str) -> Path:
    """The local export folder of an entry: the folder itself, or one assembled from the Hub repos it names.

    Raises:
        FamilyError: for a folder that does not exist (and is not a repo id) or a repo that cannot be downloaded.
    """
    path = Path(entry).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FamilyError(f"{entry!r} is a file; {MODELS_ENV} takes export folders (holding {EXPORT_FILE}).")
        return path
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(entry)
    except HFValidationError:
        raise FamilyError(
            f"{entry!r} is neither an existing folder nor a Hub repo id (owner/name). Fix {MODELS_ENV}, or run "
            "`make demo` to create local exports under outputs/."
        ) from None
    return _download_family(entry)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS))


def _download_family(repo_id: str) -> Path:
    """A whole export folder in one repo, or the parent `ORG/NAME` with its children in `ORG/NAME-w{b}`.

    The per-variant layout (how `hf_oscq` publishes) is linked into a local folder shaped like an export folder;
    a child repo that cannot be downloaded is left out and reported as a missing checkpoint.
    """
    try:
        parent = _download(repo_id)
    except Exception as error:  # any download failure is reported on the page, not raised
        raise FamilyError(f"Could not download {repo_id!r} from the Hub ({type(error).__name__}: {error}).") from None
    if (parent / EXPORT_FILE).is_file() and (parent / FULL_PRECISION).is_dir():
        return parent
    record = json.loads((parent / EXPORT_FILE).read_text()) if (parent / EXPORT_FILE).is_file() else {}
    bits = record.get("bits") or list(range(2, 9))
    folder = child_path(tempfile.mkdtemp(prefix="oscq_family_"), repo_id.split("/")[-1])
    folder.mkdir()
    (folder / FULL_PRECISION).symlink_to(parent, target_is_directory=True)
    found = []
    for width in bits:
        try:
            child = variant_name(width)
            (folder / child).symlink_to(_download(variant_repo_id(repo_id, child)), target_is_directory=True)
            found.append(width)
        except Exception as error:  # noqa: BLE001 - a missing child is reported by load_family
            logger.warning("No checkpoint at %s-w%s (%s)", repo_id, width, type(error).__name__)
    if not record and not found:
        raise FamilyError(f"{repo_id!r} has neither {EXPORT_FILE} nor child repos {repo_id}-w2 ... {repo_id}-w8.")
    record = {"format_version": FORMAT_VERSION, **record, "bits": bits if record else found}
    (folder / EXPORT_FILE).write_text(json.dumps(record))
    return folder


def _method_label(record: dict) -> str:
    return run_label((record.get("training") or {}).get("osc_method"), short=True)


def _load_variant(variant: Variant) -> None:
    if not (variant.path / "config.json").is_file():
        variant.error = f"{variant.name}: checkpoint missing at {variant.path} (no config.json); re-run the export."
        return
    try:
        variant.model = auto_class_for(variant.path).from_pretrained(variant.path).eval()
        variant.size_bytes = weights_size(variant.path)
    except Exception as error:  # a corrupt checkpoint must not stop the other bit-widths from loading
        variant.error = f"{variant.name}: could not load {variant.path} ({type(error).__name__}: {error})."


def load_family(entry: str) -> Family:
    """Loads the export folder (or Hub repo) `entry`: every variant listed in its `oscq_export.json`.

    Raises:
        FamilyError: when the entry cannot be found or holds no export record.
    """
    root = resolve_entry(entry)
    record_path = root / EXPORT_FILE
    if not record_path.is_file():
        raise FamilyError(
            f"{entry!r} has no {EXPORT_FILE}: point {MODELS_ENV} at the folder written by hf_oscq.export_quantized "
            "(it holds fp/, w2/ ... w8/ and the record)."
        )
    try:
        record = read_manifest(root)
    except ExportFolderError as error:
        raise FamilyError(str(error)) from None
    method = _method_label(record)
    # a recipe writes OUTPUT_DIR/export: its run folder names it better than the word "export"
    folder = root.parent.name if root.name == "export" and root.parent.name else root.name
    family = Family(name=f"{method} · {folder}", method=method, record=record)
    for name in sort_variants(variant_names(record["bits"]), descending=True):
        variant = Variant(name=name, bits=variant_bits(name), path=root / name)
        _load_variant(variant)
        family.variants[name] = variant
        if variant.error:
            family.problems.append(variant.error)
    for variant in family.variants.values():  # full precision first
        if (variant.path / "preprocessor_config.json").is_file():
            family.image_processor = AutoImageProcessor.from_pretrained(variant.path)
            break
        if (variant.path / "tokenizer_config.json").is_file():
            family.tokenizer = AutoTokenizer.from_pretrained(variant.path)
            break
    else:
        family.problems.append(
            f"{family.name}: the export has neither preprocessor_config.json nor a tokenizer; re-export it with "
            "image_processor=... (image classifiers) or tokenizer=... (language models)"
        )
    if not family.loaded:
        raise FamilyError(f"No checkpoint of {entry!r} could be loaded: " + " ".join(family.problems))
    # Exports from before `has_batchnorm` was recorded: the loaded model answers.
    batchnorm = record["has_batchnorm"] if "has_batchnorm" in record else has_batchnorm(family.reference_model)
    if batchnorm and not record.get("bn_recalibrated"):
        family.problems.append(
            f"{family.name}: the quantized checkpoints were rounded without re-estimating the BatchNorm statistics "
            "(plain rounding, the paper's PTQ), which costs accuracy at low bit-widths; `hf-oscq export` with its "
            "defaults re-estimates them."
        )
    return family


def load_families(entries: Iterable[str]) -> tuple[list[Family], list[str]]:
    """Loads every entry it can; returns the families and a message for each problem met on the way."""
    families, problems = [], []
    for entry in entries:
        try:
            family = load_family(entry)
        except FamilyError as error:
            problems.append(str(error))
            continue
        taken = {existing.name for existing in families}
        base, index = family.name, 2
        while family.name in taken:
            family.name, index = f"{base} ({index})", index + 1
        families.append(family)
        problems.extend(family.problems)
    return families, problems
