"""What a training run records next to its weights, `oscq_training.json`: its method and quantization spec.

`OscillationTrainer` writes it with every checkpoint and with `save_model` (the recipes extend it with their data
and hyperparameters). Two readers hold a run to it: resuming refuses a checkpoint trained with another method or
spec (`check_resume`), and `hf-oscq export` exports with the run's recorded spec (`recorded_spec`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import OscqValueError
from ..export.folder import TRAINING_INFO_NAME, ExportFolderError, read_training_info
from ..quantization.spec import QuantSpec

logger = logging.getLogger(__name__)

SPEC_KEY = "quant_spec"  # the run's `QuantSpec.to_dict()`
RESUME_FLAG = "osc_allow_spec_change"


def run_record(args: Any) -> dict[str, Any]:
    """How `args` (an `OscillationConfig`) trains: method and its settings (`method_settings`), spec and the settings
    `hf-oscq export` reuses (the BatchNorm re-estimation's sample count, seed and batch size)."""
    return {
        **args.method_settings(),  # osc_method, osc_bits, osc_lambda, ... and the method's own settings
        SPEC_KEY: args.quant_spec.to_dict(),
        "osc_bn_recalibration_samples": args.osc_bn_recalibration_samples,
        "hyperparameters": {"seed": args.seed, "eval_batch_size": args.per_device_eval_batch_size},
    }


def write_run_record(folder: str | Path, args: Any) -> None:
    """Writes `run_record(args)` to `folder/oscq_training.json`, keeping what a recipe added to a record of the same
    run there (its dataset and hyperparameters), so that saving again (`push_to_hub`, a later `save_model`) loses
    nothing `hf-oscq export` reads."""
    record = run_record(args)
    path = Path(folder) / TRAINING_INFO_NAME
    try:
        previous = read_training_info(folder) if path.is_file() else {}
    except ExportFolderError:  # a damaged record of this folder: the run's own record replaces it
        previous = {}
    if previous.get("osc_method") == record["osc_method"] and previous.get(SPEC_KEY) == record[SPEC_KEY]:
        settings = {**(previous.get("hyperparameters") or {}), **record["hyperparameters"]}
        record = {**previous, **record, "hyperparameters": settings}
    path.write_text(json.dumps(record, indent=2) + "\n")


def recorded_spec(record: dict[str, Any]) -> QuantSpec | None:
    """The `QuantSpec` a run recorded (`None` for records written before the spec was, or none).

    Raises:
        OscqValueError: for a recorded spec that is not a valid one.
    """
    fields = record.get(SPEC_KEY)
    if not isinstance(fields, dict):
        return None
    try:
        return QuantSpec.from_dict(fields)
    except (OscqValueError, TypeError) as error:
        raise OscqValueError(f"The run's {TRAINING_INFO_NAME} records an invalid quantization spec: {error}") from None


def describe_run(method: str, spec: QuantSpec) -> str:
    """`osc_method='qat', osc_bits=3, per_channel, target_modules=None, exclude_modules=None`, for messages."""
    granularity = f"group_size={spec.group_size}" if spec.group_size else spec.granularity
    return (
        f"osc_method={method!r}, osc_bits={spec.bits}, {granularity}, target_modules="
        f"{list(spec.target_modules) if spec.target_modules else None}, exclude_modules="
        f"{list(spec.exclude_modules) if spec.exclude_modules else None}"
    )


def check_resume(checkpoint: str | Path, args: Any) -> None:
    """Checks that resuming `checkpoint` continues the run it belongs to: the same `osc_method` and quantization spec
    (bits, granularity, group size, target and exclude modules) as `args`, unless `args.osc_allow_spec_change`.

    A checkpoint without a record (written by another Trainer, or by an older hf_oscq) is resumed as it is.

    Raises:
        OscqValueError: naming the recorded and the current settings.
    """
    record = read_training_info(checkpoint)
    spec = recorded_spec(record)
    if spec is None:
        return
    method = record.get("osc_method")
    if method == args.osc_method and spec == args.quant_spec:
        return
    recorded, current = describe_run(method, spec), describe_run(args.osc_method, args.quant_spec)
    if getattr(args, RESUME_FLAG, False):
        logger.warning(
            "Resuming %s, trained with %s, under other settings (%s): %s=True",
            checkpoint,
            recorded,
            current,
            RESUME_FLAG,
        )
        return
    raise OscqValueError(
        f"The checkpoint {str(checkpoint)!r} was trained with {recorded}, but this run is set to {current}: resuming "
        f"would continue another run. Resume with the recorded settings, start a new output_dir, or pass "
        f"{RESUME_FLAG}=True to continue from its weights and optimizer state under the new settings."
    )
