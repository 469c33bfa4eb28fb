"""Runs hf_oscq on a model sharded with FSDP2 (`fully_shard`, gloo on CPU); started by tests/test_sharding.py as
`torchrun --nproc_per_node 2 tests/_fsdp_worker.py SCENARIO OUT_DIR`.

Rank 0 writes what the processes computed (whole tensors, gathered) to OUT_DIR; the test compares it with
single-process references.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import fully_shard

from hf_oscq import (
    QuantSpec,
    fake_quantized_forward,
    fused_oscillation_penalty,
    kurtosis_penalty,
    output_dim,
    quantized_weights,
    select_weights,
)
from hf_oscq.quantization.dampening import weights_dampening_penalty
from hf_oscq.quantization.sharding import reshard
from hf_oscq.scripts.launch import end_processes

BITS, STRENGTH = 3, 0.7


def build_net() -> nn.Sequential:
    """9, 5 and 1 output rows: uneven shards, and a process without rows for the last layer. The largest magnitude
    of the middle layer appears twice, in rows held by different processes (a tie across shards)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 1))
    with torch.no_grad():
        net[2].weight[0, 0], net[2].weight[4, 8] = 1.5, -1.5
    return net


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """One batch per process (inputs, targets), the same in every run."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 6, generator=generator), torch.randn(2, 4, 1, generator=generator)


def shard(net: nn.Sequential) -> nn.Sequential:
    fully_shard(net[0])
    fully_shard(net[2])
    fully_shard(net)  # the root holds the last layer
    return net


def gradients(net: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    found = {
        f"{prefix}/{name}": parameter.grad.full_tensor()
        for name, parameter in net.named_parameters()
        if parameter.grad is not None
    }
    net.zero_grad(set_to_none=True)
    return found


def functional(out: Path) -> None:
    rank = dist.get_rank()
    net = shard(build_net())
    inputs, targets = batches()
    results = {}
    for normalization, tag in (("layer_mean", ""), ("global_mean", "_global_mean")):
        for per_channel in (False, True):
            weights = select_weights(net)
            penalty = fused_oscillation_penalty(
                weights,
                BITS,
                per_channel,
                normalization=normalization,
                out_dims=[output_dim(net.get_submodule(name.rpartition(".")[0])) for name in weights],
            )
            penalty.backward()
            values = [torch.zeros(1) for _ in range(dist.get_world_size())]
            dist.all_gather(values, penalty.detach().reshape(1))
            results[f"penalty_values{tag}/{per_channel}"] = torch.cat(values)
            results.update(gradients(net, f"penalty_grad{tag}/{per_channel}"))

    # The peers' penalties: KURE's kurtosis penalty and Nagel et al.'s dampening term, reduced across the shards.
    for name, penalty_of in (
        ("kurtosis", lambda: kurtosis_penalty(net)),
        ("dampening", lambda: weights_dampening_penalty(select_weights(net), QuantSpec(BITS))),
        ("dampening_channel", lambda: weights_dampening_penalty(select_weights(net), QuantSpec(BITS, "per_channel"))),
    ):
        penalty = penalty_of()
        penalty.backward()
        values = [torch.zeros(1) for _ in range(dist.get_world_size())]
        dist.all_gather(values, penalty.detach().float().reshape(1))
        results[f"{name}_values"] = torch.cat(values)
        results.update(gradients(net, f"{name}_grad"))

    # A training step: the rows' penalty gradient plus the task gradient FSDP2 averages over the processes.
    penalty = fused_oscillation_penalty(select_weights(net), BITS)
    loss = nn.functional.mse_loss(net(inputs[rank]), targets[rank]) + STRENGTH * penalty
    loss.backward()
    results.update(gradients(net, "step_grad"))

    reshard(net)
    with fake_quantized_forward(net, select_weights(net), BITS):
        qat_output = net(inputs[rank])
    nn.functional.mse_loss(qat_output, targets[rank]).backward()
    results.update(gradients(net, "qat_grad"))

    with torch.no_grad():
        results["fp_output"] = net(inputs[0])  # leaves the root's weights gathered, as an evaluation does
        with quantized_weights(net, BITS):
            results["ptq_output"] = net(inputs[0])
        results["restored_output"] = net(inputs[0])
    reshard(net)
    results["restored_weight"] = net[2].weight.full_tensor()

    with torch.no_grad():
        if rank == 1:
            net[2].weight.to_local()[0, 0] = float("nan")
    try:
        fused_oscillation_penalty(select_weights(net), BITS)
        raised = torch.zeros(1)
    except ValueError as error:
        raised = torch.ones(1) if "'2.weight' contains NaN" in str(error) else torch.full((1,), 2.0)
    flags = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, raised)
    results["nan_raised"] = torch.cat(flags)
    if rank == 0:
        save_file({key: value.contiguous() for key, value in results.items()}, str(out / "functional.safetensors"))


def trainer(out: Path, method: str) -> None:
    """OscillationTrainer with accelerate's FSDP2 integration, plus (oscillation) a run resumed from its step-2
    checkpoint. accelerate 1.15 runs FSDP only on accelerator devices, so once the arguments are built the launcher
    type is set to multi-GPU; the processes still train on CPU with gloo."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    sys.path.insert(0, str(Path(__file__).parent))
    from _trainer_fixture import build_config, build_trainer

    def fsdp_trainer(folder: Path, **extra):
        fsdp = {"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"]}
        args = build_config(folder, method, per_device_batch=8, fsdp=True, fsdp_config=fsdp, **extra)
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        return build_trainer(args)

    run = fsdp_trainer(out / method, save_strategy="steps", save_steps=2)
    run.train()
    run.save_model()
    result = {
        "world_size": run.args.world_size,
        "fsdp_version": run.accelerator.state.fsdp_plugin.fsdp_version,
        "log": [entry for entry in run.state.log_history if "loss" in entry],
        "metrics": run.evaluate(),
        "tracker_updates": run.callback_handler.callbacks[1].counter.updates,
    }
    if method == "oscillation":
        checkpoint = str(out / method / "checkpoint-2")
        resumed = fsdp_trainer(out / "resumed", resume_from_checkpoint=checkpoint)  # as the recipes pass it
        resumed.train(resume_from_checkpoint=checkpoint)
        resumed.save_model()
        result["resumed_log"] = [entry for entry in resumed.state.log_history if "loss" in entry]
    if run.is_world_process_zero():
        (out / method / "result.json").write_text(json.dumps(result))
    dist.barrier()


def recipe(out: Path) -> None:
    """`recipes/train_vit.py`'s pipeline with FSDP2 from a YAML config: train, cross-bit test table, export."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from hf_oscq.scripts import recipe as pipeline

    class FsdpOnCpuTrainer(pipeline.OscillationTrainer):
        def __init__(self, *args, **kwargs):
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # see trainer()
            super().__init__(*args, **kwargs)

    pipeline.OscillationTrainer = FsdpOnCpuTrainer
    config = out / "fsdp.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "fsdp": True,
                "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"]},
                "use_cpu": True,
                "dataset": "digits",
                "vit_size": "micro",
                "max_steps": 3,
                "per_device_train_batch_size": 8,
                "osc_eval_bits": [3],
                "export_bits": [2, 3],
                "max_eval_samples": 64,
                "report_to": "none",
                "eval_strategy": "no",
                "save_strategy": "no",
                "seed": 0,
                "disable_tqdm": True,
            }
        )
    )
    pipeline.main("vit", ["--config", str(config), "--output_dir", str(out / "run")])


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    if scenario == "functional":
        functional(folder)
    elif scenario == "recipe":
        recipe(folder)
    else:
        trainer(folder, scenario)
    end_processes()  # every process got here: no process group left for the interpreter's exit to abort
