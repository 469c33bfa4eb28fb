"""Causal language models in OscillationTrainer: default selection, cross-bit loss and perplexity, DDP with a
selected weight the forward pass never uses."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from hf_oscq import OscillationConfig, OscillationTrainer, QuantSpec, quantize_model, select_weights

ROOT = Path(__file__).resolve().parents[2]
VOCAB, LENGTH = 24, 12


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, **common)
    small = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return (LlamaConfig if family == "llama" else Qwen2Config)(**small, **common)


def tiny_lm(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family))


LLAMA_BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LLAMA_BLOCK += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GPT2_BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.mark.parametrize(
    ("family", "prefix", "block"),
    [
        ("llama", "model.layers", LLAMA_BLOCK),
        ("qwen2", "model.layers", LLAMA_BLOCK),
        ("gpt2", "transformer.h", GPT2_BLOCK),
    ],
)
def test_default_selection_is_the_decoder_blocks_projections(family, prefix, block):
    model = tiny_lm(family)
    expected = [f"{prefix}.{layer}.{name}.weight" for layer in range(2) for name in block]
    assert list(select_weights(model)) == expected
    everything = select_weights(model, "all-layers")
    embedding = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    assert embedding in everything and set(expected) <= set(everything)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert ("lm_head.weight" in everything) != tied  # a tied head is its embedding, selected once
    if family == "gpt2":
        assert "transformer.wpe.weight" in everything


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _mean_loss(model, dataset: TokenWindows, batch: int) -> float:
    """Independent evaluation: the mean over batches of each batch's mean next-token cross-entropy."""
    losses = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            ids = dataset.ids[start : start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_trainer_reports_loss_and_perplexity_at_every_bit_width(family, tmp_path):
    model = tiny_lm(family)
    args = OscillationConfig(
        output_dir=str(tmp_path),
        osc_method="oscillation",
        osc_bits=4,
        osc_lambda=5.0,
        osc_group_size=8,
        osc_eval_bits=[2, 4],
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    evaluation = TokenWindows(8, seed=1)
    trainer = OscillationTrainer(
        model=model, args=args, train_dataset=TokenWindows(16, seed=0), eval_dataset=evaluation
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert _mean_loss(model, evaluation, 4) == pytest.approx(metrics["eval_loss"], rel=1e-5)
    for bits in (2, 4):
        rounded = quantize_model(model, spec=QuantSpec(bits, "group", group_size=8))
        assert _mean_loss(rounded, evaluation, 4) == pytest.approx(metrics[f"eval_w{bits}_loss"], rel=1e-5)
    for prefix in ("eval", "eval_w2", "eval_w4"):
        assert metrics[f"{prefix}_perplexity"] == pytest.approx(math.exp(metrics[f"{prefix}_loss"]), rel=1e-12)
    assert metrics["eval_w2_loss"] != metrics["eval_w4_loss"]


@pytest.mark.slow
def test_ddp_trains_a_selected_weight_the_forward_pass_never_uses(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = str(ROOT / "tests" / "_ddp_lm_worker.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    two = subprocess.run(
        [*launch, worker, str(tmp_path / "two"), "4"], capture_output=True, text=True, timeout=300, env=env
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, worker, str(tmp_path / "one"), "8"], capture_output=True, text=True, timeout=300, env=env
    )
    assert one.returncode == 0, one.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "tests"))
    from _ddp_lm_worker import build_model

    initial = build_model().state_dict()
    weights = [load_file(str(tmp_path / run / "weights.safetensors")) for run in ("one", "two")]
    unused = "model.unused_projection.weight"
    assert not torch.equal(weights[1][unused], initial[unused])  # moved by the penalty gradient alone
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp2_matches_one_process_with_the_same_global_batch(tmp_path):
    """Two FSDP2 processes (4 windows each) log the losses of one process with 8, save the same weights, and their
    cross-bit evaluation is the loss of the saved weights rounded to each bit width."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = str(ROOT / "tests" / "_fsdp_lm_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, str(tmp_path / "two")]
    two = subprocess.run([*command, "4", "fsdp"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    sys.path.insert(0, str(ROOT / "tests"))
    from _fsdp_lm_worker import TokenWindows as WorkerWindows
    from _fsdp_lm_worker import main

    main(tmp_path / "one", 8, "single")
    fsdp, single = (json.loads((tmp_path / run / "result.json").read_text()) for run in ("two", "one"))
    assert (fsdp["world_size"], fsdp["fsdp_version"], fsdp["sharded"]) == (2, 2, True)
    assert not single["sharded"]

    assert [entry["step"] for entry in fsdp["log"]] == [entry["step"] for entry in single["log"]] == [1, 2, 3]
    for expected, found in zip(single["log"], fsdp["log"]):
        assert found["osc_penalty"] > 0
        for key in ("loss", "task_loss", "osc_penalty"):
            assert found[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    saved, reference = (AutoModelForCausalLM.from_pretrained(tmp_path / run) for run in ("two", "one"))
    weights, expected = saved.state_dict(), reference.state_dict()
    assert weights.keys() == expected.keys()
    assert max((weights[name] - expected[name]).abs().max().item() for name in weights) < 1e-4  # 3 Adam steps

    evaluation = WorkerWindows(8, seed=1)  # the worker's evaluation windows
    metrics = fsdp["metrics"]
    assert metrics["eval_loss"] == pytest.approx(_mean_loss(saved, evaluation, 4), rel=1e-5)
    for bits in (2, 3):
        rounded = quantize_model(saved, spec=QuantSpec(bits, "group", group_size=8))
        assert metrics[f"eval_w{bits}_loss"] == pytest.approx(_mean_loss(rounded, evaluation, 4), rel=1e-5)
        assert metrics[f"eval_w{bits}_perplexity"] == pytest.approx(math.exp(metrics[f"eval_w{bits}_loss"]), rel=1e-12)
        assert metrics[f"eval_w{bits}_loss"] == pytest.approx(single["metrics"][f"eval_w{bits}_loss"], rel=1e-4)
    assert metrics["eval_w2_loss"] != metrics["eval_w3_loss"]


class PaddedWindows(torch.utils.data.Dataset):
    """Sequences of 3 to 12 tokens, right-padded to 12 (attention mask 0, label -100 on the padding)."""

    def __init__(self, lengths: list[int], seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.sequences = [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        ids = self.sequences[i]
        pad = LENGTH - len(ids)
        mask = torch.cat([torch.ones(len(ids), dtype=torch.long), torch.zeros(pad, dtype=torch.long)])
        labels = torch.cat([ids, torch.full((pad,), -100)])
        return {
            "input_ids": torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
            "attention_mask": mask,
            "labels": labels,
        }


def _token_level_perplexity(model, sequences: list[torch.Tensor]) -> tuple[float, int]:
    """Independent reference: each sequence alone, unpadded; exp(sum of next-token losses / number of tokens)."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            tokens += len(ids) - 1
    return math.exp(total / tokens), tokens


def test_perplexity_is_token_level_whatever_the_batch_size_and_padding(tmp_path):
    """`eval_perplexity` and `eval_w{b}_perplexity` are exp(sum of token losses / tokens) at evaluation batch sizes
    1, 2 and 3 over padded sequences of different lengths (a mean of batch means moves with the batch size), from
    clean state at every pass; `eval_tokens` and `eval_samples` count what was scored."""
    model = tiny_lm("llama")
    evaluation = PaddedWindows([12, 3, 9, 4, 12, 5, 7], seed=2)
    rounded = quantize_model(model, spec=QuantSpec(2))
    expected_fp, tokens = _token_level_perplexity(model, evaluation.sequences)
    expected_w2, _ = _token_level_perplexity(rounded, evaluation.sequences)
    for batch in (1, 2, 3):
        args = OscillationConfig(
            output_dir=str(tmp_path), osc_eval_bits=[2], per_device_eval_batch_size=batch, report_to=[],
            use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        metrics = OscillationTrainer(model=model, args=args, eval_dataset=evaluation).evaluate()
        assert metrics["eval_perplexity"] == pytest.approx(expected_fp, rel=1e-5), batch
        assert metrics["eval_w2_perplexity"] == pytest.approx(expected_w2, rel=1e-5), batch
        assert metrics["eval_loss"] == pytest.approx(math.log(expected_fp), rel=1e-5)
        assert (metrics["eval_tokens"], metrics["eval_samples"]) == (tokens, len(evaluation))
        assert "eval_w2_tokens" not in metrics


def test_trainer_card_of_a_language_model_reports_perplexity_with_what_it_was_measured_on(tmp_path):
    """The card `create_model_card` writes for a causal LM: a perplexity table (not "no accuracy"), captioned with
    the examples and tokens of the last evaluation; a run set by `max_steps` lists its steps, not the epochs."""
    model = tiny_lm("llama")
    evaluation = PaddedWindows([12, 3, 9], seed=2)
    args = OscillationConfig(
        output_dir=str(tmp_path), osc_eval_bits=[2], max_steps=5, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = OscillationTrainer(model=model, args=args, eval_dataset=evaluation)
    metrics = trainer.evaluate()
    trainer.create_model_card(dataset="acme/texts")
    card = (tmp_path / "README.md").read_text()
    assert "## Perplexity at every bit-width" in card
    assert (
        "Perplexity (token-level, lower is better) on 3 examples (21 predicted tokens) of an unrecorded split of "
        "acme/texts; no BatchNorm layer" in card
    )
    row = f"| {tmp_path.name} | {metrics['eval_perplexity']:.2f} | {metrics['eval_w2_perplexity']:.2f} |"
    assert "| perplexity (token-level, lower is better) | fp | w2 |" in card and row in card
    assert "| max_steps | `5` |" in card and "num_train_epochs" not in card
