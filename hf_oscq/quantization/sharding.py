"""Weights split across processes by FSDP2 (`fully_shard`): the local rows and the process groups holding the rest.

FSDP2 stores each parameter as a `DTensor` sharded on dim 0; between forward passes a process holds only its rows.
The quantizer's scale `max|W|` and the penalty's sums are over the whole tensor, so each is computed on the local
rows and then reduced across the shard group. Outside FSDP every function here is the identity.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..errors import OscqValueError

if TYPE_CHECKING:
    from .spec import QuantSpec

ProcessGroups = tuple  # of torch.distributed.ProcessGroup; empty when the tensor is whole on this process


def _loaded(module: str, name: str) -> type | None:
    """`module.name` if `module` was imported, else `None`.

    A tensor can only be a `DTensor` (a module an `FSDPModule`) once torch.distributed.tensor (fsdp) was imported,
    so checking `sys.modules` keeps their import, which costs seconds, off the path of every non-distributed user.
    """
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _dtensor() -> type | None:
    return _loaded("torch.distributed.tensor", "DTensor")


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
    dtensor = _dtensor()
    if dtensor is None or not isinstance(weight, dtensor):
        return LocalShard(weight, weight.numel(), ())
    groups = []
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard(0):
            raise OscqValueError(
                f"hf_oscq supports weights sharded by rows (FSDP2's Shard(0), optionally replicated as in HSDP); got "
                f"placements {weight.placements}. Tensor parallelism is not supported: shard the model with "
                "fully_shard (accelerate's fsdp_version: 2) only."
            )
        groups.append(weight.device_mesh.get_group(mesh_dim))
    return LocalShard(weight.to_local(), weight.numel(), tuple(groups))


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter of `model` is a `DTensor` (FSDP2 or another torch.distributed sharding)."""
    dtensor = _dtensor()
    return dtensor is not None and any(isinstance(parameter, dtensor) for parameter in model.parameters())


def reshard(model: nn.Module) -> None:
    """Puts every FSDP2 module of `model` in its sharded state, so that its parameters are the sharded `DTensor`s.

    FSDP2 leaves the root module's parameters gathered after a forward pass without backward (evaluation); reading
    or rounding them then would miss the sharded copy that the next forward pass gathers from.
    """
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def scale_process_groups(shard: LocalShard, spec: QuantSpec) -> ProcessGroups:
    """The process groups one scale group of `shard`'s weight spans: all of the shard's for one scale per tensor,
    none per channel or group (FSDP2 splits by rows, so every output channel of a weight whose output dim is 0 lies
    on one process; `check_shard_layout` refuses the others)."""
    return shard.groups if spec.per_tensor else ()


def check_shard_layout(shard: LocalShard, spec: QuantSpec, out_dim: int, name: str = "") -> None:
    """Refuses per-channel or group-wise scales on a row-sharded weight whose output channels are its columns
    (GPT-2's `Conv1D`): each of its scale groups would span every process.

    Raises:
        OscqValueError: naming the weight and the fixes.
    """
    if shard.groups and not spec.per_tensor and out_dim != 0:
        raise OscqValueError(
            f"Weight {name or '(unnamed)'!r} stores its output channels in dim {out_dim} (GPT-2's Conv1D), and FSDP2 "
            f"shards it by rows, so its {spec.granularity} scales would span every process. Use DDP (accelerate "
            "launch --multi_gpu) or granularity='per_tensor' for this model, or exclude the layer."
        )


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
    if not batches:
        return reduced
    import torch.distributed as dist

    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    for (tensor_groups, _), indices in batches.items():
        sizes = [reduced[i].numel() for i in indices]
        flat = torch.cat([reduced[i].reshape(-1) for i in indices])
        for group in tensor_groups:
            dist.all_reduce(flat, op=reduce_op, group=group)
        for i, part in zip(indices, flat.split(sizes)):
            reduced[i] = part.reshape(reduced[i].shape)
    return reduced


class _SumAcrossShards(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every process gets the sum over the whole tensor, and the
    gradient of a function of that sum reaches each process's rows once (the function is the same on every
    process, so summing its gradients across them would count it once per process)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
        return all_reduce([tensor.clone()], [groups], "sum")[0]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def sum_across_shards(tensor: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """`tensor` (partial sums over a weight's local rows) summed across the processes of `groups`, differentiable:
    its backward hands each process the gradient of the whole-tensor sum for its own rows (`LocalShard.groups`;
    empty groups: `tensor` itself)."""
    return _SumAcrossShards.apply(tensor, groups) if groups else tensor


def gather(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from each process's rows `local`, sharded like the weight `like` (collective on every
    process of its mesh); `local` itself when `like` is not sharded."""
    dtensor = _dtensor()
    if dtensor is None or not isinstance(like, dtensor):
        return local
    sharded = dtensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
    return sharded.full_tensor()
