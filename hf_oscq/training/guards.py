"""Refusals: the weight shardings hf_oscq cannot quantize (FSDP1, DeepSpeed ZeRO-3), QAT with activation
checkpointing, and training on with a non-finite loss or weight. FSDP2 (`fully_shard`) splits each weight by rows,
and hf_oscq reduces the scale `max|W|` and the penalty's sums across the shards (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import OscqValueError
from ..quantization.sharding import local_shard
from .methods import get_method


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
    if version is not None and not get_method(args.osc_method).sharding_aware:
        raise OscqValueError(
            f"osc_method={args.osc_method!r} does not handle FSDP2-sharded weights (its terms need whole tensors): "
            "train it with DDP (accelerate launch --multi_gpu) or on one process."
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
    if checkpointing and get_method(args.osc_method).quantized_forward:
        raise OscqValueError(
            f"osc_method={args.osc_method!r} does not support activation (gradient) checkpointing: its forward pass "
            "sees fake-quantized weights, and the recomputed one would use the full-precision weights. Disable "
            "activation_checkpointing (and FSDP's activation_checkpointing) or use a method with a full-precision "
            "forward pass (osc_method='oscillation' or 'kure')."
        )


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter of `model` holding NaN or Inf on this process (its local shard under FSDP2,
    so no collective runs), or None."""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(local_shard(parameter.detach()).local).all()):
            return name
    return None


def check_finite_loss(loss: torch.Tensor, model: nn.Module, step: int, fp16: bool) -> None:
    """Stops training at a non-finite loss, naming the parameter that caused it.

    A non-finite weight always stops training. A non-finite loss with finite weights stops it too, except with
    `fp16` mixed precision, where the gradient scaler's documented policy (torch.amp) applies: the step is skipped
    and the scale lowered.

    Raises:
        OscqValueError: naming the first non-finite parameter, or the step whose loss is not finite.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    name = first_nonfinite_parameter(model)
    if name is not None:
        raise OscqValueError(
            f"Training stopped at step {step}: weight {name!r} contains NaN or Inf values, so the loss is "
            f"{float(loss.detach().float().reshape(-1)[0])}. The model diverged at the previous step or was loaded "
            "from a corrupt checkpoint: lower the learning rate (or osc_lambda), enable gradient clipping "
            "(max_grad_norm), or resume from a healthy checkpoint."
        )
    if not fp16:
        raise OscqValueError(
            f"Training stopped at step {step}: the loss is {float(loss.detach().float().reshape(-1)[0])} while every "
            "weight is finite, so this batch holds NaN or Inf inputs or labels, or the forward pass overflows. Check "
            "the data, or train in float32 / bf16."
        )
