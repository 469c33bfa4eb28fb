"""Refusals: the weight shardings hf_oscq cannot quantize (FSDP1, DeepSpeed ZeRO-3) and QAT with activation
checkpointing. FSDP2 (`fully_shard`) splits each weight by rows, and hf_oscq reduces the scale `max|W|` and the
penalty's sums across the shards (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import os

from ..errors import OscqValueError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def _fsdp_config(args) -> dict:
    return args.fsdp_config if isinstance(args.fsdp_config, dict) else {}


def fsdp_version(args) -> int | None:
    """The FSDP version the run will use (`None` without FSDP): the Trainer's `fsdp_config["version"]` (default 2),
    else that of an `accelerate launch` FSDP config (its `fsdp_version`, default 1)."""
    if args.fsdp:
        return int(_fsdp_config(args).get("version", 2))
    if _env_flag("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_sharding(args) -> None:
    """Accepts FSDP2; raises for the sharding schemes whose shards are not whole rows of each weight.

    FSDP2 (`fully_shard`) splits each weight by rows, and hf_oscq reduces the scale `max|W|` and the penalty's sums
    across the shards (docs/DISTRIBUTED.md). FSDP1 and DeepSpeed ZeRO-3 flatten the weights into one buffer and cut it
    anywhere, so a process holds arbitrary slices of several tensors.
    """
    version = fsdp_version(args)
    if version is not None and version != 2:
        raise OscqValueError(
            f"hf_oscq supports FSDP version 2 (fully_shard) only, got fsdp_version {version}: FSDP1 flattens the "
            "weights into slices that do not follow tensor rows. Set fsdp_config={'version': 2} (the Trainer's "
            "default) or fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp.yaml)."
        )
    zero3 = False
    if args.deepspeed:
        config = args.hf_deepspeed_config.config if getattr(args, "hf_deepspeed_config", None) else {}
        zero3 = config.get("zero_optimization", {}).get("stage") == 3
    if zero3 or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise OscqValueError(
            "hf_oscq does not support DeepSpeed ZeRO-3: it partitions each weight into flat slices, and the "
            "quantizer's per-tensor scale max|W| needs whole rows (see docs/DISTRIBUTED.md). Shard with FSDP2 "
            "(recipes/accelerate/fsdp.yaml), or use ZeRO-1/2, which keep whole weights on every process."
        )
    checkpointing = args.gradient_checkpointing or (
        version is not None
        and (
            str(_fsdp_config(args).get("activation_checkpointing", False)).lower() == "true"
            or _env_flag("FSDP_ACTIVATION_CHECKPOINTING")
        )
    )
    if args.osc_method == "qat" and checkpointing:
        raise OscqValueError(
            "osc_method='qat' does not support activation (gradient) checkpointing: the recomputed forward pass "
            "would use the full-precision weights. Disable activation_checkpointing (and FSDP's "
            "activation_checkpointing) or use osc_method='oscillation'."
        )
