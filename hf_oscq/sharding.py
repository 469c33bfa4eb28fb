"""Weights split across processes by FSDP2 (`fully_shard`): the local rows and the process groups holding the rest.

FSDP2 stores each parameter as a `DTensor` sharded on dim 0; between forward passes a process holds only its rows.
The quantizer's scale `max|W|` and the penalty's sums are over the whole tensor, so each is computed on the local
rows and then reduced across the shard group. Outside FSDP every function here is the identity.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds of torch without distributed support
    FSDPModule = DTensor = None

ProcessGroups = tuple  # of torch.distributed.ProcessGroup; empty when the tensor is whole on this process


class LocalShard(NamedTuple):
    """This process's part of a weight."""

    local: torch.Tensor  # the rows held here (the weight itself when it is not sharded); differentiable
    numel: int  # elements of the whole tensor
    groups: ProcessGroups  # the process groups across which the rows are split


def local_shard(weight: torch.Tensor) -> LocalShard:
    """The rows of `weight` held by this process, and the groups that hold the others.

    Raises:
        ValueError: for a `DTensor` split other than by rows (tensor parallelism) or holding partial sums.
    """
    if DTensor is None or not isinstance(weight, DTensor):
        return LocalShard(weight, weight.numel(), ())
    groups = []
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard(0):
            raise ValueError(
                f"hf_oscq supports weights sharded by rows (FSDP2's Shard(0), optionally replicated as in HSDP); got "
                f"placements {weight.placements}. Tensor parallelism is not supported: shard the model with "
                "fully_shard (accelerate's fsdp_version: 2) only."
            )
        groups.append(weight.device_mesh.get_group(mesh_dim))
    return LocalShard(weight.to_local(), weight.numel(), tuple(groups))


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter of `model` is a `DTensor` (FSDP2 or another torch.distributed sharding)."""
    return DTensor is not None and any(isinstance(parameter, DTensor) for parameter in model.parameters())


def reshard(model: nn.Module) -> None:
    """Puts every FSDP2 module of `model` in its sharded state, so that its parameters are the sharded `DTensor`s.

    FSDP2 leaves the root module's parameters gathered after a forward pass without backward (evaluation); reading
    or rounding them then would miss the sharded copy that the next forward pass gathers from.
    """
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def current_weights(model: nn.Module, owners: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The weights of `owners` (from `selection.weight_owners`) as registered now, `model` being in its sharded
    state."""
    reshard(model)
    return {name: module.weight for name, module in owners.items()}


def all_reduce(tensors: Sequence[torch.Tensor], groups: Sequence[ProcessGroups], op: str) -> list[torch.Tensor]:
    """Reduces each tensor across its process groups (`op` "sum" or "max"), one collective per distinct group.

    Args:
        tensors: 1-d tensors (one per weight).
        groups: the process groups of each tensor, as in `LocalShard.groups`; empty for a whole tensor.
        op: "sum" or "max".

    Returns:
        The reduced tensors, in order (the inputs themselves where there is nothing to reduce).
    """
    reduced = list(tensors)
    batches: dict[tuple[ProcessGroups, torch.dtype], list[int]] = defaultdict(list)
    for index, tensor_groups in enumerate(groups):
        if tensor_groups:
            batches[tensor_groups, reduced[index].dtype].append(index)
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    for (tensor_groups, _), indices in batches.items():
        sizes = [reduced[i].numel() for i in indices]
        flat = torch.cat([reduced[i].reshape(-1) for i in indices])
        for group in tensor_groups:
            dist.all_reduce(flat, op=reduce_op, group=group)
        for i, part in zip(indices, flat.split(sizes)):
            reduced[i] = part.reshape(reduced[i].shape)
    return reduced


def gather(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from each process's rows `local`, sharded like the weight `like` (collective on every
    process of its mesh); `local` itself when `like` is not sharded."""
    if DTensor is None or not isinstance(like, DTensor):
        return local
    sharded = DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
    return sharded.full_tensor()
