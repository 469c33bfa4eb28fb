"""`export_quantized`: one `save_pretrained` folder per bit-width, weights bit-packed at b bits, written atomically.

```
OUT/fp/  OUT/w2/ ... OUT/w8/  OUT/oscq_export.json
```
The whole export is written to a hidden sibling folder and swapped into place at the end (atomically where the
system can), so a failure never leaves a half-written checkpoint and never damages a previous export in `OUT`; what a
killed export leaves beside `OUT` is cleaned by the next export into it (docs/EXPORT.md, "Crash safety").
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, leftovers are left for the user
    fcntl = None

from .._compat import remove_tied_weights
from ..errors import OscqValueError, os_errors
from ..paths import check_output_path
from ..provenance import Provenance
from ..quantization.batchnorm import counted, has_batchnorm, require_batchnorm_handling, reusable_batches
from ..quantization.packed_tensor import PackedWeight
from ..quantization.primitives import check_finite
from ..quantization.ptq import holding_packed_weights, quantized_weights
from ..quantization.selection import output_dims, select_weights
from ..quantization.sharding import is_sharded
from ..quantization.spec import DEFAULT_EVAL_BITS, Patterns, QuantSpec, resolve_spec, validate_bits
from ..quantization.variants import FULL_PRECISION, sort_variants, variant_name, variant_names
from ..versions import library_versions
from .checkpoint import (
    FORMAT_VERSION,
)
from .folder import MANIFEST_NAME, manifest_provenance, weights_size
from .formats import COMPRESSED_TENSORS_FORMAT, OSCQ_FORMAT, check_export_format

logger = logging.getLogger(__name__)


def check_output_dir(output: str | os.PathLike, flag: str = "output_dir") -> Path:
    """Checks, before anything is loaded or written, that `output` can take an export: a new folder on a writable
    disk (no file where one of its folders belongs), an empty folder, or a previous export to replace.

    Returns:
        `output` as an absolute path.

    Raises:
        OscqValueError: naming `flag` (`output_dir`, `--output`), for a file, a foreign non-empty folder, or a path
            that cannot be written.
    """
    output = check_output_path(output, flag)
    if output.exists() and not output.is_dir():
        raise OscqValueError(f"Export output {str(output)!r} is a file: pass a folder path.")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST_NAME).is_file():
        raise OscqValueError(
            f"Export output {str(output)!r} is a non-empty folder that is not an hf_oscq export (no {MANIFEST_NAME}); "
            "it would be replaced. Pass a new or empty folder, or a previous export folder to overwrite."
        )
    return output


def _json_field(name: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise OscqValueError(
            f"export_quantized({name}=...) must be JSON-serializable (plain dicts of numbers/strings): {error}"
        ) from None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape


def _write_variant(
    model: nn.Module,
    fp_dir: Path,
    folder: Path,
    spec: QuantSpec,
    weights: Mapping[str, nn.Parameter],
    calibration_batches: Callable[[], Iterable] | None,
    bn_recalibrated: bool,
    versions: dict[str, str],
) -> int:
    """Writes `folder` (config.json, model.safetensors, side files) through the packed save path: the model holds
    its packed weights (and the BatchNorm statistics re-estimated for them) while it saves. Returns the number of
    images BatchNorm was re-estimated on (0 without re-estimation)."""
    from .hf_quantizer import OscqQuantizationConfig, quantized_for_saving, save_packed_pretrained

    folder.mkdir()
    counts, buffers = [], None
    if bn_recalibrated:
        batches = counted(calibration_batches(), counts)
        with quantized_weights(model, calibration_batches=batches, spec=spec):
            # the weights and BatchNorm statistics are restored on exit: keep the re-estimated statistics
            buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    # Tied weights (GPT-2's lm_head and input embedding) are saved once, under the name transformers keeps (as
    # save_pretrained does); the loader ties them again, so a packed weight is never stored a second time in float.
    live = model.state_dict()
    kept = set(remove_tied_weights(model, live))
    modules = []
    for name in weights:
        saved_as = name if name in kept else next(key for key in kept if _same_storage(live[key], live[name]))
        modules.append(saved_as.removesuffix(".weight"))
    packed = {
        name: PackedWeight.from_float(weight, spec, out_dim)
        for (name, weight), out_dim in zip(weights.items(), output_dims(model, weights))
    }
    quantization = OscqQuantizationConfig.from_spec(spec, modules, bn_recalibrated=bn_recalibrated, versions=versions)
    with holding_packed_weights(model, packed, buffers), quantized_for_saving(model, quantization):
        save_packed_pretrained(model, folder)
    for extra in fp_dir.iterdir():  # image processor and other side files: each folder must work on its own
        if extra.is_file() and extra.name != "config.json" and not extra.name.startswith("model"):
            shutil.copy2(extra, folder / extra.name)
    return sum(counts)


def _stage(name: str) -> None:
    """Marks the point the export has reached (`staging_created`, `fp_written`, `w{b}_written`, `manifest_written`,
    `exchanged`, and without an atomic exchange `moved_aside` and `renamed`). Does nothing: the crash-safety tests
    stop the process here (tests/export/test_writer.py)."""


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or the file
    system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:  # glibc before 2.28, musl
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE (linux/fcntl.h, linux/fs.h)
    if rename(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


def _lock(folder: Path) -> int | None:
    """Holds an exclusive lock on `folder` until the returned descriptor is closed (or the process dies), so that
    other exports tell a folder in use from a leftover of a killed one. None where locks are not available."""
    if fcntl is None:
        return None
    handle = os.open(folder, os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _in_use(folder: Path) -> bool:
    if fcntl is None:
        return True  # cannot tell: leave it
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(handle)


def clean_interrupted_exports(output_dir: str | os.PathLike) -> list[Path]:
    """Removes what killed exports into `output_dir` left beside it, and puts back a previous export that a crash
    between the two renames of the swap left aside.

    Leftovers are the hidden siblings `.NAME.tmp-*` (a staging folder, or the previous export after the swap) and
    `.NAME.old-*` (the previous export moved aside) that no running export holds locked. When `output_dir` does not
    exist, the newest complete `.NAME.old-*` is renamed back to it first. `export_quantized` calls this before writing.

    Returns:
        The leftover folders removed.
    """
    output = Path(output_dir).resolve()
    if not output.parent.is_dir():
        return []
    stale = [
        path
        for path in output.parent.iterdir()
        if path.is_dir()
        and not path.is_symlink()
        and path.name.startswith((f".{output.name}.tmp-", f".{output.name}.old-"))
        and not _in_use(path)
    ]
    aside = [path for path in stale if ".old-" in path.name and (path / MANIFEST_NAME).is_file()]
    if not output.exists() and aside:
        previous = max(aside, key=lambda path: path.stat().st_mtime)
        os.replace(previous, output)
        stale.remove(previous)
        logger.warning(
            "Restored the previous export %s from %s (an export was killed while swapping)", output, previous
        )
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logger.warning("Removed %d folders left by killed exports into %s: %s", len(stale), output, stale)
    return stale


def _what_is_replaced(output: Path, manifest: dict) -> str | None:
    """What the previous export in `output` holds that the new one (`manifest`) does not: its other variants and a
    recorded `hf-oscq eval`; None where there is no previous export or it holds nothing more."""
    try:
        previous = json.loads((output / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    lost = [name for name in previous.get("sizes_bytes") or {} if name not in manifest["sizes_bytes"]]
    parts = [f"its {', '.join(sort_variants(lost))} checkpoints are gone"] if lost else []
    if previous.get("evaluation"):  # an `hf-oscq eval` table: what it was measured on, where recorded
        measured = ((previous.get("provenance") or {}).get("metrics") or {}).get("dataset")
        parts.append(f"its evaluation on {measured or previous['evaluation'].get('dataset')!r} is dropped")
    return "; ".join(parts) or None


def _swap_into_place(staging: Path, output: Path) -> None:
    """Puts the complete export at `output`. With an atomic exchange `output` always holds a complete export: the
    previous one, then the new one; the previous one ends in `staging`, deleted last. Without, the previous export
    is moved aside first, and `clean_interrupted_exports` puts it back if the process dies before the second rename."""
    if not output.exists():
        os.replace(staging, output)
        return
    if _exchange(staging, output):
        _stage("exchanged")
        shutil.rmtree(staging, ignore_errors=True)
        return
    previous = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    held = _lock(output)  # the lock follows the folder: no other export takes it for a leftover while aside
    try:
        os.replace(output, previous)
        _stage("moved_aside")
        try:
            os.replace(staging, output)
        except BaseException:
            os.replace(previous, output)
            raise
        _stage("renamed")
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        if held is not None:
            os.close(held)


def export_quantized(
    model: nn.Module,
    output_dir: str | os.PathLike,
    bits: Sequence[int] = DEFAULT_EVAL_BITS,
    *,
    spec: QuantSpec | None = None,
    image_processor: Any = None,
    tokenizer: Any = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool | None = None,
    calibration_batches: Iterable | Callable[[], Iterable] | None = None,
    plain_rounding: bool = False,
    calibration_source: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training: Mapping[str, Any] | None = None,
    comparisons: Mapping[str, Any] | None = None,
    format: str = OSCQ_FORMAT,
    provenance: Provenance | Mapping[str, Any] | None = None,
) -> Path:
    """Writes the full-precision model and one bit-packed PTQ checkpoint per bit-width (layout: docs/EXPORT.md).

    Each `OUT/w{b}/` loads with `from_pretrained` (the Auto class `auto_class_for` names) and gives exactly
    `quantize_model(model, spec=spec.with_bits(b))`: in hf_oscq's format (`format="oscq"`) after `import hf_oscq`
    (without it, loading raises an error naming it); in the compressed-tensors format in transformers with the
    compressed-tensors package, and in vLLM, without hf_oscq. The manifest `OUT/oscq_export.json`, every safetensors
    file's metadata and the model cards record the library versions that wrote them.

    Args:
        model: a transformers model (anything with `save_pretrained`), e.g. a ViT or a TimmWrapper model.
        output_dir: the export folder; a previous export there is replaced only once the new one is complete,
            with a warning naming the checkpoints and recorded evaluation it held that the new one lacks.
        bits: bit-widths in [2, 8].
        spec: how and which weights are quantized; each bit-width `b` uses `spec.with_bits(b)`.
        image_processor: saved into every folder so each one works on its own.
        tokenizer: a language model's tokenizer, saved into every folder likewise.
        target_modules: which modules to quantize, see `select_weights` (shorthand for `spec`).
        exclude_modules: modules left in float, see `select_weights` (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        calibration_batches: model inputs (a re-iterable such as a list or DataLoader, or a callable returning
            fresh ones; a one-shot generator is refused with several bit-widths) to re-estimate BatchNorm statistics
            at each bit-width, a few hundred training images; needed for a model with BatchNorm (rounding
            invalidates its statistics) unless `plain_rounding`, ignored for models without BatchNorm.
        plain_rounding: round a BatchNorm model without re-estimating its statistics (the paper's PTQ); the
            manifest and the cards say so.
        calibration_source: where `calibration_batches` come from, e.g. `{"dataset": "fashion_mnist", "seed": 42,
            "batch_size": 64}`; stored in the manifest's `bn_recalibration` record next to the number of images
            forwarded at each bit-width (`samples`, counted during the export).
        metrics: the cross-bit table (`cross_bit_evaluate` output) stored in `oscq_export.json`.
        training: how the model was trained (`osc_method`, `osc_bits`, ...), stored in `oscq_export.json`.
        comparisons: cross-bit tables of baselines (`{"qat": ..., "fp_ptq": ...}`), stored in `oscq_export.json`.
        format: how the `w{b}` folders store the weights: `"oscq"`, hf_oscq's bit-packed format (every layer type);
            or `"compressed-tensors"`, compressed-tensors' pack-quantized format, for Linear layers only
            (`hf_oscq/export/compressed_tensors.py` says what it holds). Recorded in the manifest.
        provenance: what `metrics` and `comparisons` were measured on (one `hf_oscq.Provenance`: the same
            evaluation for all of them, as the recipes run it), stored in `oscq_export.json`; without it the cards
            show the tables as measured on something not recorded, each in its own table.

    Returns:
        The export folder.

    Raises:
        OscqValueError: for invalid bit-widths, a non-JSON record, weights holding NaN, sharded weights, an output
            folder that is a file or a foreign non-empty folder, a BatchNorm model without calibration batches
            or `plain_rounding`, an unknown `format`, or selected weights the compressed-tensors format cannot hold.
    """
    check_export_format(format)
    bit_widths = sorted({validate_bits(b) for b in bits})
    if not bit_widths:
        raise OscqValueError("export_quantized needs at least one bit-width, e.g. bits=(2, 3, 4, 8).")
    shorthand_bits = None if spec is not None else bit_widths[0]
    spec = resolve_spec("export_quantized", spec, shorthand_bits, per_channel, target_modules, exclude_modules)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"export_quantized needs a transformers model with save_pretrained, got {type(model).__name__}. Wrap timm "
            "models with transformers' TimmWrapperForImageClassification."
        )
    if is_sharded(model):
        raise OscqValueError(
            "export_quantized needs the whole model on this process, but its weights are sharded across processes "
            "(FSDP2). Save it with trainer.save_model() (which gathers the full weights) and export the model "
            "from_pretrained(<that folder>) reloads, on one process."
        )
    output = Path(output_dir).resolve()
    check_output_dir(output)
    clean_interrupted_exports(output)
    batchnorm = has_batchnorm(model)
    # A callable may decline by returning None, as OscillationTrainer.calibration_batches does with 0 samples.
    recalibrate = batchnorm and not plain_rounding
    if recalibrate:  # a one-shot iterator is refused before anything is written
        calibration_batches = reusable_batches(calibration_batches, "export_quantized", len(bit_widths))
        require_batchnorm_handling(
            model,
            plain_rounding=False,
            recalibrated=calibration_batches is not None and calibration_batches() is not None,
            ways_out="pass calibration_batches=... (a few hundred training inputs; `hf-oscq export --dataset NAME`) "
            "to re-estimate them at every bit-width, or plain_rounding=True (`hf-oscq export "
            "--bn_recalibration_samples 0`) for plain rounding, the paper's PTQ. Nothing was written.",
        )
    versions = library_versions()
    write_variant = _write_variant
    if format == COMPRESSED_TENSORS_FORMAT:
        from .compressed_tensors import compressed_tensors_versions, write_compressed_tensors_variant

        versions, write_variant = compressed_tensors_versions(), write_compressed_tensors_variant
    manifest = {
        "format_version": FORMAT_VERSION,
        "format": format,
        **spec.to_dict(),
        "bits": bit_widths,
        "has_batchnorm": batchnorm,
        "bn_recalibrated": recalibrate,
        # how many images (counted below) and from where; None for plain rounding
        "bn_recalibration": (
            {"samples": None, **(_json_field("calibration_source", calibration_source) or {})} if recalibrate else None
        ),
        "sizes_bytes": {},
        "metrics": _json_field("metrics", metrics),
        "training": _json_field("training", training),
        "comparisons": _json_field("comparisons", comparisons),
        "provenance": manifest_provenance(provenance, metrics, comparisons),
        "versions": versions,
    }
    weights = select_weights(model, spec=spec)
    for name, weight in weights.items():
        check_finite(weight, name)
    if format == COMPRESSED_TENSORS_FORMAT:
        from .compressed_tensors import check_compressed_tensors_model

        check_compressed_tensors_model(model, weights)
    kept = "Nothing was written" + (f"; the previous export in {output} is unchanged." if output.exists() else ".")
    with os_errors(f"write the export {output}", kept):
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    held = _lock(staging)
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        _stage("staging_created")
        fp_dir = staging / FULL_PRECISION
        model.save_pretrained(fp_dir)
        for processor in (image_processor, tokenizer):
            if processor is not None:
                processor.save_pretrained(fp_dir)
        manifest["sizes_bytes"][FULL_PRECISION] = weights_size(fp_dir)
        _stage("fp_written")
        for b in bit_widths:
            start, name = time.perf_counter(), variant_name(b)
            samples = write_variant(
                model,
                fp_dir,
                staging / name,
                spec.with_bits(b),
                weights,
                calibration_batches,
                manifest["bn_recalibrated"],
                versions,
            )
            manifest["sizes_bytes"][name] = weights_size(staging / name)
            if recalibrate:  # the same at every bit-width: the batches are re-iterable or drawn afresh
                manifest["bn_recalibration"]["samples"] = samples
            logger.info(
                "Wrote %s (%d bytes) in %.2f s", name, manifest["sizes_bytes"][name], time.perf_counter() - start
            )
            _stage(f"{name}_written")
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _stage("manifest_written")
        replaced = _what_is_replaced(output, manifest)
        _swap_into_place(staging, output)
        if replaced:
            logger.warning("Replaced the previous export in %s: %s.", output, replaced)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        with os_errors(f"write the export {output}", kept):
            raise error
    finally:
        if held is not None:
            os.close(held)
    logger.info("Exported %s to %s", ", ".join(variant_names(bit_widths)), output)
    return output
