"""hf_oscq on weights sharded by FSDP2 (two processes, gloo on CPU) against single-process references."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_worker import BITS, STRENGTH, batches, build_net
from _penalty_reference import reference_numpy
from _trainer_fixture import STEPS, build_config, build_trainer
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call
from transformers import AutoModelForImageClassification

import hf_oscq  # noqa: F401  (loads the exported checkpoints)
from hf_oscq import QuantSpec, fake_quantize, kurtosis_penalty, oscillation_penalty, quantize_model, select_weights
from hf_oscq.quantization.dampening import weights_dampening_penalty
from hf_oscq.quantization.sharding import all_reduce, gather, is_sharded, local_shard
from hf_oscq.scripts.data import load_image_dataset

WORKER = Path(__file__).resolve().parents[1] / "_fsdp_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _torchrun(scenario: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), scenario, str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_plain_tensors_are_their_own_shard():
    weight = torch.randn(3, 2)
    shard = local_shard(weight)
    assert shard.local is weight and shard.numel == 6 and shard.groups == ()
    assert gather(weight, weight) is weight and not is_sharded(nn.Linear(2, 3))
    values = [torch.ones(2), torch.zeros(1)]
    assert all(a is b for a, b in zip(all_reduce(values, [(), ()], "max"), values))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun("functional", out)
    return load_file(str(out / "functional.safetensors"))


def _grads(net):
    grads = {name: parameter.grad.clone() for name, parameter in net.named_parameters() if parameter.grad is not None}
    net.zero_grad(set_to_none=True)
    return grads


def _assert_grads(sharded, prefix, expected):
    found = {key.split("/", 2)[-1]: value for key, value in sharded.items() if key.startswith(prefix + "/")}
    assert set(found) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(found[name], grad, rtol=1e-5, atol=1e-7, msg=f"{prefix} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("per_channel", [False, True])
def test_penalty_of_sharded_weights_equals_the_whole_model_penalty(sharded, per_channel):
    net = build_net()
    penalty = oscillation_penalty(net, BITS, per_channel=per_channel)  # the autograd reference, on whole tensors
    penalty.backward()
    values = sharded[f"penalty_values/{per_channel}"]
    torch.testing.assert_close(values, penalty.detach().expand(2), rtol=1e-6, atol=0)  # on every process
    # Each process's rows received the gradient of the whole penalty, including the scale path of a peak tied
    # across the two shards (layer 2) and a process without rows (layer 4).
    _assert_grads(sharded, f"penalty_grad/{per_channel}", _grads(net))


@pytest.mark.slow
@pytest.mark.parametrize("per_channel", [False, True])
def test_global_mean_of_sharded_weights_divides_by_the_whole_model_size(sharded, per_channel):
    weights = select_weights(build_net())
    value, grads = reference_numpy(
        [w.detach().double().numpy() for w in weights.values()], BITS, per_channel, "global_mean"
    )
    values = sharded[f"penalty_values_global_mean/{per_channel}"]
    torch.testing.assert_close(values, torch.full((2,), value, dtype=torch.float32), rtol=1e-6, atol=0)
    expected = {name: torch.from_numpy(grad).float() for name, grad in zip(weights, grads)}
    _assert_grads(sharded, f"penalty_grad_global_mean/{per_channel}", expected)


@pytest.mark.slow
def test_training_step_gradient_is_the_mean_task_gradient_plus_the_penalty_gradient(sharded):
    net = build_net()
    inputs, targets = batches()
    for rank in range(2):  # FSDP2 averages the task gradient over the processes' batches
        (nn.functional.mse_loss(net(inputs[rank]), targets[rank]) / 2).backward()
    (STRENGTH * oscillation_penalty(net, BITS)).backward()  # counted once, not averaged
    _assert_grads(sharded, "step_grad", _grads(net))


@pytest.mark.slow
def test_qat_under_fsdp2_fake_quantizes_whole_tensors(sharded):
    net = build_net()
    inputs, targets = batches()
    selected = select_weights(net)
    for rank in range(2):
        weights = {name: fake_quantize(weight, BITS) for name, weight in selected.items()}
        output = functional_call(net, weights, (inputs[rank],))
        (nn.functional.mse_loss(output, targets[rank]) / 2).backward()
    _assert_grads(sharded, "qat_grad", _grads(net))


@pytest.mark.slow
def test_ptq_rounds_sharded_weights_and_restores_them(sharded):
    net = build_net()
    inputs, _ = batches()
    with torch.no_grad():
        torch.testing.assert_close(sharded["fp_output"], net(inputs[0]))
        torch.testing.assert_close(sharded["ptq_output"], quantize_model(net, BITS)(inputs[0]), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(sharded["ptq_output"], sharded["fp_output"])
        torch.testing.assert_close(sharded["restored_output"], sharded["fp_output"], rtol=0, atol=0)
    assert torch.equal(sharded["restored_weight"], net[2].weight.detach())


@pytest.mark.slow
def test_a_nan_in_one_shard_stops_every_process_with_the_weight_name(sharded):
    assert sharded["nan_raised"].tolist() == [1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oscillation", "qat"])
def test_trainer_with_fsdp2_matches_one_process_with_the_same_global_batch(tmp_path, method):
    _torchrun(method, tmp_path / "fsdp")
    result = json.loads((tmp_path / "fsdp" / method / "result.json").read_text())
    assert result["world_size"] == 2 and result["fsdp_version"] == 2

    single = build_trainer(build_config(tmp_path / "single", method))
    single.train()
    metrics = single.evaluate()
    log = [entry for entry in single.state.log_history if "loss" in entry]

    assert len(log) == len(result["log"]) == STEPS
    keys = ["loss", "task_loss", "osc_fraction", "osc_frequency"]
    keys += ["osc_penalty"] if method == "oscillation" else []
    for expected, found in zip(log, result["log"]):
        for key in keys:
            assert found[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    for key in ("eval_loss", "eval_accuracy", "eval_w3_loss", "eval_w3_accuracy"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-4), key
    saved = type(single.model).from_pretrained(tmp_path / "fsdp" / method).state_dict()  # gathered by save_model
    reference = single.model.state_dict()
    assert saved.keys() == reference.keys()
    assert max((saved[name] - reference[name]).abs().max().item() for name in saved) < 1e-4  # 4 Adam steps
    assert result["tracker_updates"] == STEPS + 1
    assert json.loads((tmp_path / "fsdp" / method / "oscillations.json").read_text())["updates"] == STEPS + 1
    assert (tmp_path / "fsdp" / method / "oscillation_counts.png").read_bytes()[:4] == b"\x89PNG"
    # FSDP2 checkpoints: each process saves the tracker state of its rows; a resumed run continues it exactly.
    for rank in range(2):
        assert (tmp_path / "fsdp" / method / "checkpoint-2" / f"oscillation_tracker-rank{rank}.safetensors").is_file()
    if method == "oscillation":
        resumed = type(single.model).from_pretrained(tmp_path / "fsdp" / "resumed").state_dict()
        assert max((resumed[name] - saved[name]).abs().max().item() for name in saved) < 1e-6
        assert [entry["step"] for entry in result["resumed_log"]] == [1, 2, 3, 4]  # 1-2 restored from the checkpoint
        for expected, found in zip(result["log"], result["resumed_log"]):
            for key in keys:
                assert found[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_recipe_with_fsdp2_exports_the_whole_model(tmp_path):
    _torchrun("recipe", tmp_path)
    run = tmp_path / "run"
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    table = json.loads((run / "cross_bit.json").read_text())["runs"]["oscillation"]  # measured on the sharded model
    digits = load_image_dataset("digits", max_eval_samples=64)
    pixels = torch.stack([digits.eval[i]["pixel_values"] for i in range(len(digits.eval))])
    labels = torch.tensor(digits.eval["labels"])
    for variant in ("fp", "w2", "w3"):
        model = AutoModelForImageClassification.from_pretrained(run / "export" / variant).eval()
        with torch.no_grad():
            accuracy = float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())
        assert accuracy == pytest.approx(table[variant]["accuracy"], abs=1e-9), variant


def test_row_sharded_conv1d_with_channel_or_group_scales_is_refused_naming_the_weight():
    from hf_oscq import QuantSpec
    from hf_oscq.errors import OscqValueError
    from hf_oscq.quantization.sharding import LocalShard, check_shard_layout

    shard = LocalShard(torch.zeros(3, 8), 48, ("a process group",))  # rows split across processes
    for spec in (QuantSpec(3, "per_channel"), QuantSpec(3, "group", group_size=4)):
        with pytest.raises(OscqValueError, match="'h.0.attn.c_attn.weight' stores its output channels in dim 1"):
            check_shard_layout(shard, spec, 1, "h.0.attn.c_attn.weight")
        check_shard_layout(shard, spec, 0, "fc.weight")  # rows are output channels: every scale on one process
    check_shard_layout(shard, QuantSpec(3), 1, "c_attn.weight")  # one scale per tensor, reduced across shards
    check_shard_layout(LocalShard(torch.zeros(6, 8), 48, ()), QuantSpec(3, "per_channel"), 1, "c_attn.weight")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, penalty_of",
    [
        ("kurtosis", lambda net: kurtosis_penalty(net)),
        ("dampening", lambda net: weights_dampening_penalty(select_weights(net), QuantSpec(BITS))),
        (
            "dampening_channel",
            lambda net: weights_dampening_penalty(select_weights(net), QuantSpec(BITS, "per_channel")),
        ),
    ],
)
def test_peer_penalties_of_sharded_weights_equal_the_whole_model_penalty(sharded, name, penalty_of):
    """KURE's moments and the dampening term's scale and sums cover whole tensors: every process gets the penalty
    of the whole model, and its rows the gradient of it (uneven shards, a process without rows)."""
    net = build_net()
    penalty = penalty_of(net)
    penalty.backward()
    torch.testing.assert_close(sharded[f"{name}_values"], penalty.detach().float().expand(2), rtol=1e-5, atol=0)
    _assert_grads(sharded, f"{name}_grad", _grads(net))
