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
from hf_oscq.cli import main as cli_main
from hf_oscq.quantization.packed_tensor import PackedWeight
from hf_oscq.scripts.data import HubUnreachableError
from hf_oscq.scripts.lm_recipe import parse_arguments, run_recipe
from hf_oscq.scripts.text import TokenBlocks, load_kjv

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
    record = json.loads((run / "cross_bit.json").read_text())
    table = record["runs"]["oscillation"]
    assert list(table) == ["fp", "w3", "w4"]
    for row in table.values():
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)
    # 4 blocks of 32 bytes, 31 predicted tokens each, from the held-out chapters
    measured = {"metric": "perplexity", "dataset": "kjv", "split": "every-20th-chapter", "examples": 4}
    assert record["provenance"]["oscillation"] == {**measured, "tokens": 124, "batchnorm": "none", "bn_samples": None}
    printed = (run / "cross_bit.md").read_text()
    assert printed.startswith("Perplexity (token-level, lower is better) on 4 examples (124 predicted tokens)")
    assert "| perplexity (token-level, lower is better) | fp | w3 | w4 |" in printed
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
    assert f"| Token-level perplexity at 4 bits | {table['w4']['perplexity']:.2f} |" in card
    # a language model's card speaks of text, and of steps where the run was set by max_steps
    assert "image" not in card.lower() and "| epochs |" not in card and "| max steps | 4 |" in card
    assert 'pipeline("text-generation"' in card and "group of 32 input features" in card
    assert (export / "w4" / "tokenizer.json").is_file() and (export / "w4" / "oscq_accuracy_vs_bits.png").is_file()
    # The run records its spec (group size included) next to its weights, so `hf-oscq export RUN --bits 4` exports it
    # group-wise as trained: the exported w4 loss is the Trainer's.
    record = json.loads((run / "training" / "oscillation" / "oscq_training.json").read_text())
    assert record["quant_spec"] == spec.to_dict() and record["quant_spec"]["group_size"] == 32
    assert json.loads((export / "oscq_export.json").read_text())["training"]["quant_spec"] == spec.to_dict()
    arguments = ["export", str(run / "training" / "oscillation"), "--bits", "4", "--output", str(tmp_path / "cli")]
    assert cli_main(arguments) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "cli" / "w4").eval()
    blocks = TokenBlocks(load_kjv().eval, tokenizer, 32, 4).blocks
    with torch.no_grad():
        loss = exported(input_ids=blocks, labels=blocks).loss.item()
    assert loss == pytest.approx(table["w4"]["loss"], rel=1e-5)


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
    (tmp_path / "FILE").write_text("")  # an output folder under a file: refused before the text or a model loads
    assert main(["--output_dir", str(tmp_path / "FILE" / "run"), "--use_cpu", "true"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"train_lm.py: error: --output_dir '{tmp_path / 'FILE' / 'run'}': '{tmp_path / 'FILE'}' is")


@needs_kjv
@pytest.mark.slow
def test_lm_recipe_exports_compressed_tensors(tmp_path):
    """`--export_format compressed-tensors`: the recipe's export holds compressed-tensors folders (loaded here by
    transformers' own quantizer) with the trained model's `quantize_model` logits, and its samples come from them."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors (Python >= 3.11) is not installed")
    arguments = [*TINY, "--max_steps", "2", "--export_bits", "4", "--export_format", "compressed-tensors"]
    recipe, training = parse_arguments([*arguments, "--output_dir", str(tmp_path / "run")])
    assert recipe.export_format == "compressed-tensors"
    run_recipe(recipe, training)
    export = tmp_path / "run" / "export"
    assert json.loads((export / "oscq_export.json").read_text())["format"] == "compressed-tensors"
    loaded = AutoModelForCausalLM.from_pretrained(export / "w4").eval()
    assert loaded.config.quantization_config.quant_method == "compressed-tensors"
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "training" / "oscillation").eval()
    ids = AutoTokenizer.from_pretrained(export / "w4")("And God said", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = quantize_model(trained, spec=training.quant_spec.with_bits(4))(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
    assert "w4" in json.loads((tmp_path / "run" / "samples.json").read_text())


def test_unknown_export_format_is_refused_when_parsing(tmp_path):
    with pytest.raises(ValueError, match="Unknown export format 'gguf'"):
        parse_arguments(["--export_format", "gguf", "--output_dir", str(tmp_path), "--use_cpu", "true"])
