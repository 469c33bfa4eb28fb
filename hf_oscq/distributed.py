"""Checks that a run has the processes its launcher asked for, and a weight sharding hf_oscq handles (FSDP2).

Two launcher traps (accelerate 1.15, see docs/DISTRIBUTED.md): `accelerate launch --cpu --num_processes 2` (or a
`MULTI_CPU` config) starts ONE process; and processes started without `use_cpu` on a machine without GPU each train
alone (torch.distributed is initialised, but the Trainer does not use it), all writing one output folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class WorldSizeError(RuntimeError):
    """The number of training processes differs from what the launcher was asked for."""


def _accelerate_launch_arguments() -> list[str] | None:
    """The arguments of the parent `accelerate launch` command, when this process was started by one (Linux)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    for index, part in enumerate(argv[:-1]):
        if part.endswith("accelerate") and argv[index + 1] == "launch":
            return argv[index + 2:]
        if part == "accelerate.commands.launch":  # python -m accelerate.commands.launch
            return argv[index + 1:]
    return None


def launcher_world_size() -> int | None:
    """The number of processes the launcher was asked for: `WORLD_SIZE` (torchrun, accelerate's multi-process
    launchers), else `--num_processes` / the config file's `num_processes` of a parent `accelerate launch`."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    argv = _accelerate_launch_arguments()
    if argv is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    arguments, _ = launch_command_parser().parse_known_args(argv)
    if arguments.num_processes is not None:
        return int(arguments.num_processes)
    if arguments.config_file:
        from accelerate.commands.config.config_args import load_config_from_file

        return int(load_config_from_file(arguments.config_file).num_processes)
    return None


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
        raise ValueError(
            f"hf_oscq supports FSDP version 2 (fully_shard) only, got fsdp_version {version}: FSDP1 flattens the "
            "weights into slices that do not follow tensor rows. Set fsdp_config={'version': 2} (the Trainer's "
            "default) or fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp.yaml)."
        )
    zero3 = False
    if args.deepspeed:
        config = args.hf_deepspeed_config.config if getattr(args, "hf_deepspeed_config", None) else {}
        zero3 = config.get("zero_optimization", {}).get("stage") == 3
    if zero3 or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ValueError(
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
        raise ValueError(
            "osc_method='qat' does not support activation (gradient) checkpointing: the recomputed forward pass "
            "would use the full-precision weights. Disable activation_checkpointing (and FSDP's "
            "activation_checkpointing) or use osc_method='oscillation'."
        )


def check_world_size(args, expected: int | None = None):
    """Makes the Trainer arguments use every launched process, or stops with an error saying how to launch.

    Args:
        args: the parsed `OscillationConfig`.
        expected: the number of processes wanted (default: `launcher_world_size()`).

    Returns:
        `args`, or a copy with `use_cpu=True` when several processes run on a machine without GPU.

    Raises:
        WorldSizeError: when the run would not have `expected` processes.
    """
    expected = expected or launcher_world_size() or 1
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size != started and started == expected and not torch.cuda.is_available() and not args.use_cpu:
        logger.info("%d processes on a machine without GPU: training on CPU with torch.distributed (gloo).", started)
        args = dataclasses.replace(args, use_cpu=True)
    if fsdp_version(args) is not None and (args.use_cpu or not torch.cuda.is_available()):
        logger.warning(
            "FSDP was requested on CPU: accelerate runs multi-process CPU training as DDP (whole weights on every "
            "process), which gives the same model without the memory saving."
        )
    group = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if args.world_size != expected or (expected > 1 and group != expected):
        raise WorldSizeError(
            f"The launcher was asked for {expected} process(es), but this run has {started} process(es) and the "
            f"Trainer sees a world size of {args.world_size}. With accelerate 1.15, `accelerate launch --cpu "
            "--num_processes N` and `distributed_type: MULTI_CPU` start ONE process: on CPU use `accelerate launch "
            "--multi_gpu --num_processes N` or --config_file recipes/accelerate/multi_cpu.yaml (the recipes switch "
            "to use_cpu themselves); on GPUs check num_processes against the visible GPUs."
        )
    return args
