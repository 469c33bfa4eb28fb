"""The language-model recipe end to end, offline: train, cross-bit perplexity, export, load, generate, cards."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _export_models import assert_packed_close
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_oscq import quantize_model
from hf_oscq.quantization.packed_tensor import PackedWeight
from hf_oscq.scripts.data import HubUnreachableError
from hf_oscq.scripts.lm_recipe import parse_arguments, run_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
needs_kjv = pytest.mark.skipif(shutil.which("bible") is None, reason="Debian packages bible-kjv, bible-kjv-text")
TINY = [
    "--dataset", "kjv", "--lm_size", "micro", "--block_size", "32", "--max_train_blocks", "64",
    "--max_eval_blocks", "4", "--max_steps", "4", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "4", "--osc_method", "oscillation", "--osc_bits", "4", "--osc_group_size", "32",
    "--osc_lambda", "1", "--osc_eval_bits", "4", "--export_bits", "3", "4", "--max_new_tokens", "6",
    "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true",
    "--learning_rate", "0.003",
]  # fmt: skip


@needs_kjv
@pytest.mark.slow
def test_tiny_lm_recipe_trains_exports_loads_and_generates_offline(tmp_path):
    recipe, training = parse_arguments([*TINY, "--output_dir", str(tmp_path / "run")])
    summary = run_recipe(recipe, training)
    run, export = tmp_path / "run", tmp_path / "run" / "export"
    table = json.loads((run / "cross_bit.json").read_text())["oscillation"]
    assert list(table) == ["fp", "w3", "w4"]
    for row in table.values():
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)
    assert summary["export_dir"] == str(export)
    trained = AutoModelForCausalLM.from_pretrained(run / "training" / "oscillation").eval()
    spec = training.quant_spec
    tokenizer = AutoTokenizer.from_pretrained(export / "w4")
    ids = tokenizer("And God said, Let there be light", return_tensors="pt")["input_ids"]
    for bits in (3, 4):
        loaded = AutoModelForCausalLM.from_pretrained(export / f"w{bits}").eval()
        assert isinstance(loaded.model.layers[0].self_attn.q_proj.weight, PackedWeight)
        expected = quantize_model(trained, spec=spec.with_bits(bits))
        with torch.no_grad():
            assert_packed_close(loaded(ids).logits, expected(ids).logits)
            generated = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert torch.equal(
                generated,
                expected.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id),
            )
    samples = json.loads((run / "samples.json").read_text())
    prompt_ids = tokenizer(samples["prompt"], return_tensors="pt")["input_ids"]
    w3 = AutoModelForCausalLM.from_pretrained(export / "w3").eval()
    with torch.no_grad():
        continuation = w3.generate(prompt_ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert samples["w3"] == tokenizer.decode(continuation[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    generator = pipeline("text-generation", model=str(export / "w4"))
    text = generator("And God said", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("And God said") and len(text) > len("And God said")
    card = (export / "w4" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "text-generation"
    result = metadata["model-index"][0]["results"][0]["metrics"][0]
    assert result["type"] == "perplexity" and result["value"] == pytest.approx(table["w4"]["perplexity"])
    assert f"| Test perplexity at 4 bits | {table['w4']['perplexity']:.2f} |" in card
    assert 'pipeline("text-generation"' in card and "group of 32 input features" in card
    assert (export / "w4" / "tokenizer.json").is_file() and (export / "w4" / "oscq_accuracy_vs_bits.png").is_file()


def test_hub_model_offline_fails_with_the_clear_message(tmp_path):
    recipe, training = parse_arguments(
        ["--model_name_or_path", "HuggingFaceTB/SmolLM2-135M", "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    with pytest.raises(HubUnreachableError, match="drop --model_name_or_path"):
        run_recipe(recipe, training)
    assert not any(tmp_path.iterdir())


def test_recipe_configs_parse(tmp_path):
    for name in ("lm_kjv_scratch", "lm_smollm2_finetune"):
        recipe, training = parse_arguments(["--config", str(CONFIGS / f"{name}.yaml"), "--use_cpu", "true"])
        assert training.quant_spec.granularity == "group" and training.osc_bits == 4
        assert recipe.baselines == ["qat", "none"]


def test_lm_recipe_errors_are_one_line_with_exit_code_1(tmp_path, capsys):
    from hf_oscq.scripts.lm_recipe import main

    assert main(["--dataset", "bogus", "--output_dir", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "train_lm.py: error: --dataset is 'kjv', or 'hub' with --dataset_name NAME; got 'bogus'."
