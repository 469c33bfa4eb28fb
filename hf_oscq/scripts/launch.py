"""Checks that a run has the processes its launcher asked for, and ends them cleanly.

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

from .._compat import accelerate_config_processes, accelerate_launch_parser
from ..errors import OscqError, OscqValueError
from ..training.guards import fsdp_version

logger = logging.getLogger(__name__)


class WorldSizeError(OscqError, RuntimeError):
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
            return argv[index + 2 :]
        if part == "accelerate.commands.launch":  # python -m accelerate.commands.launch
            return argv[index + 1 :]
    return None


def launcher_world_size() -> int | None:
    """The number of processes the launcher was asked for: `WORLD_SIZE` (torchrun, accelerate's multi-process
    launchers), else `--num_processes` / the config file's `num_processes` of a parent `accelerate launch`."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    argv = _accelerate_launch_arguments()
    if argv is None:
        return None
    arguments, _ = accelerate_launch_parser().parse_known_args(argv)
    if arguments.num_processes is not None:
        return int(arguments.num_processes)
    if arguments.config_file:
        return accelerate_config_processes(arguments.config_file)
    return None


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


def check_run_settings(training, expected_world_size: int | None = None):
    """What every recipe checks before loading anything: the launch (`check_world_size`, whose result it returns)
    and that `--push_to_hub` names its repository.

    Raises:
        OscqValueError: `--push_to_hub` without `--hub_model_id`.
    """
    training = check_world_size(training, expected_world_size)
    if training.push_to_hub and not training.hub_model_id:
        raise OscqValueError("--push_to_hub needs --hub_model_id ORG/NAME (the full-precision model's repository).")
    return training


def resume_point(requested: str | bool | None, run_dir: str | Path) -> str | None:
    """The checkpoint one run of a recipe resumes from, for `--resume_from_checkpoint` (a recipe trains one run per
    method, each in its own folder, so a single path cannot name them all).

    Args:
        requested: the flag's value: unset, `false`, `true` (every run resumes from the last `checkpoint-N` in its
            folder) or the path of a checkpoint folder (the run whose folder holds it resumes from it, the others as
            with `true`).
        run_dir: the run's output folder.

    Returns:
        The checkpoint folder to pass to `Trainer.train`, or `None` to train from the start (nothing requested, or
        nothing saved yet in `run_dir`: a run the interruption never reached).

    Raises:
        OscqValueError: for a path that is not a folder.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if requested is None or requested is False or str(requested).lower() in ("", "false", "no", "0"):
        return None
    run_dir = Path(run_dir)
    if requested is not True and str(requested).lower() not in ("true", "yes", "1"):
        path = Path(requested)
        if not path.is_dir():
            raise OscqValueError(
                f"--resume_from_checkpoint {requested}: no such folder. Pass a checkpoint-N folder of a run "
                "(output_dir/training/METHOD/checkpoint-N), or true to resume every run from its last checkpoint "
                "(saved with --save_strategy steps or epoch)."
            )
        if run_dir.resolve() in path.resolve().parents:
            return str(path)
    last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if last is None:
        logger.info("No checkpoint in %s: this run trains from the start.", run_dir)
    return last


def end_processes(completed: bool = True) -> None:
    """Tears down the process group a launcher (`torchrun`, `accelerate launch`) started, before the interpreter
    exits: with the group alive at exit, its communication threads are destroyed while still running and a process
    aborts (`terminate called without an active exception`, SIGABRT) after all its work is done, more often on a
    busy machine. `completed`: every process got here (wait for the others first); after an error, only this
    process's group is destroyed. Nothing happens in a single process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def run_and_end_processes(run):
    """`run()`, then `end_processes` (a wrapper for the recipes' entry points)."""

    def wrapped():
        try:
            result = run()
        except BaseException:
            end_processes(completed=False)
            raise
        end_processes()
        return result

    return wrapped
