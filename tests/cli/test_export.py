import errno
import json
import logging
import os

import pytest
import torch
from _export_models import assert_packed_close, tiny_vit
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

import hf_oscq
from hf_oscq.cli import main as cli_main


def test_cli_export_and_eval_digits(tmp_path, capsys):
    from hf_oscq.scripts.data import load_image_dataset
    from hf_oscq.training.metrics import evaluate_accuracy

    model = tiny_vit(num_channels=1, num_labels=10)
    model.save_pretrained(tmp_path / "ckpt")
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "2", "4", "--output", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "out"), "--dataset", "digits", "--max_eval_samples", "64"]) == 0
    table_line = capsys.readouterr().out.strip().splitlines()[-1]
    dataset = load_image_dataset("digits", max_eval_samples=64).eval
    expected = [evaluate_accuracy(model, dataset)["accuracy"]]
    expected += [evaluate_accuracy(hf_oscq.quantize_model(model, b), dataset)["accuracy"] for b in (2, 4)]
    assert table_line == "| out | " + " | ".join(f"{100 * a:.1f}" for a in expected) + " |"


@pytest.mark.parametrize("format", ["oscq", "compressed-tensors"])
def test_cli_export_refuses_a_quantized_checkpoint(tmp_path, capsys, format):
    """A w{b} folder of either format is refused as the input of an export, naming its quantization method."""
    spec = hf_oscq.QuantSpec(3, exclude_modules=["projection"])
    export = hf_oscq.export_quantized(tiny_vit(), tmp_path / "export", bits=(3,), spec=spec, format=format)
    capsys.readouterr()
    assert cli_main(["export", str(export / "w3"), "--output", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-oscq export: error: ") and err.count("\n") == 1
    assert f"is already a quantized checkpoint ({format}" in err and "export from the full-precision" in err
    assert not (tmp_path / "again").exists()


def test_cli_export_format_compressed_tensors(tmp_path, capsys):
    """`--format compressed-tensors`: the export holds compressed-tensors folders whose loaded logits and perplexity
    (`hf-oscq eval`) are those of hf_oscq's own format; a model it cannot hold fails with one line, before writing."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors (Python >= 3.11) is not installed")
    import shutil

    from _export_models import tiny_llama
    from transformers import AutoModelForCausalLM

    from hf_oscq.scripts.text import byte_tokenizer

    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    outputs = {}
    for format in ("oscq", "compressed-tensors"):
        outputs[format] = tmp_path / format
        argv = [
            "export",
            str(tmp_path / "ckpt"),
            "--bits",
            "4",
            "--group_size",
            "16",
            "--output",
            str(outputs[format]),
        ]
        assert cli_main([*argv, "--format", format]) == 0
    manifest = json.loads((outputs["compressed-tensors"] / "oscq_export.json").read_text())
    assert manifest["format"] == "compressed-tensors" and manifest["group_size"] == 16
    config = json.loads((outputs["compressed-tensors"] / "w4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    ids = torch.tensor([list(b"And God said")])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(out / "w4")(ids).logits for out in outputs.values()]
    assert_packed_close(logits[1], logits[0])  # compressed-tensors' dequantized float and hf_oscq's packed kernels
    if shutil.which("bible") is not None:  # Debian's bible-kjv: the perplexity of both exports
        tables = []
        for out in outputs.values():
            argv = ["eval", str(out), "--dataset", "kjv", "--block_size", "16", "--max_eval_samples", "2"]
            assert cli_main([*argv, "--output_json", str(tmp_path / "table.json"), "--no_record"]) == 0
            tables.append(json.loads((tmp_path / "table.json").read_text()))
        assert tables[0] == tables[1]
    capsys.readouterr()
    tiny_vit().save_pretrained(tmp_path / "vit")
    argv = ["export", str(tmp_path / "vit"), "--bits", "3", "--output", str(tmp_path / "x")]
    assert cli_main([*argv, "--format", "compressed-tensors"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("hf-oscq export: error: The compressed-tensors format holds quantized weights of Linear")
    assert "--exclude_modules" in err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # argparse names the choices
        cli_main([*argv, "--format", "gguf"])
    assert "invalid choice: 'gguf'" in capsys.readouterr().err


def test_cli_export_with_batchnorm_recalibration(tmp_path, capsys):
    from argparse import Namespace

    from hf_oscq.cli.export import export_calibration_batches

    torch.manual_seed(0)
    narrow = {"channels": (8, 16, 32, 64), "stem_width": 8, "in_chans": 1}
    config = TimmWrapperConfig(architecture="resnet18", num_labels=10, model_args=narrow)
    model = TimmWrapperForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    assert (
        cli_main(
            [
                "export",
                str(tmp_path / "ckpt"),
                "--bits",
                "3",
                "--output",
                str(tmp_path / "x"),
                "--bn_recalibration_samples",
                "32",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading progress bar
    assert err.startswith("hf-oscq export: error: TimmWrapperForImageClassification has BatchNorm layers")
    assert f"{tmp_path / 'ckpt'} records no training data" in err
    assert "--dataset NAME" in err and "--bn_recalibration_samples 0" in err
    assert not (tmp_path / "x").exists()
    arguments = ["--bn_recalibration_samples", "40", "--dataset", "digits", "--batch_size", "16"]
    output = ["--bits", "3", "--output", str(tmp_path / "out")]
    assert cli_main(["export", str(tmp_path / "ckpt"), *output, *arguments]) == 0
    written = json.loads((tmp_path / "out" / "w3" / "config.json").read_text())
    assert written["quantization_config"]["bn_recalibrated"] is True
    settings = Namespace(bn_recalibration_samples=40, dataset="digits", data_dir=None, batch_size=16, seed=None)
    batches, source = export_calibration_batches(settings)
    assert [len(batch["pixel_values"]) for batch in batches] == [16, 16, 8]  # exactly the 40 images asked for
    assert source == {"dataset": "digits", "seed": 42, "batch_size": 16}  # no --seed: the Trainer's default, 42
    manifest = json.loads((tmp_path / "out" / "oscq_export.json").read_text())
    assert manifest["bn_recalibration"] == {**source, "samples": 40}  # the CLI's draw: --seed's default, 42
    images = torch.randn(4, 1, 8, 8)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "w3").eval()
    recalibrated = hf_oscq.quantize_model(model, 3, calibration_batches=batches).eval()
    with torch.no_grad():
        logits = loaded(pixel_values=images).logits
        torch.testing.assert_close(logits, recalibrated(pixel_values=images).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(logits, hf_oscq.quantize_model(model, 3)(pixel_values=images).logits, atol=1e-3)


def test_cli_turns_package_errors_into_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert cli_main(["eval", str(missing), "--dataset", "digits"]) == 1
    err = capsys.readouterr().err
    assert err == f"hf-oscq eval: error: {missing} does not exist: pass an export folder or a checkpoint folder.\n"
    (tmp_path / "afile").write_text("")  # a file where a folder belongs is named as such, by eval and by export
    assert cli_main(["eval", str(tmp_path / "afile"), "--dataset", "digits"]) == 1
    assert capsys.readouterr().err.endswith(f"error: {tmp_path / 'afile'} is a file, not a folder: pass an export "
                                            "folder or a checkpoint folder.\n")  # fmt: skip
    assert cli_main(["export", str(tmp_path / "afile"), "--output", str(tmp_path / "out")]) == 1
    assert f"error: {tmp_path / 'afile'} is a file, not a folder: pass a folder" in capsys.readouterr().err
    with pytest.raises(hf_oscq.OscqError, match="is a file, not a folder: pass the directory"):
        hf_oscq.read_export_manifest(tmp_path / "afile")
    export = hf_oscq.export_quantized(tiny_vit(num_channels=1, num_labels=10), tmp_path / "export", bits=(3,))
    weights = export / "w3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    capsys.readouterr()
    assert cli_main(["eval", str(export / "w3"), "--dataset", "digits", "--max_eval_samples", "8"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("hf-oscq eval: error: ") and "truncated or corrupted" in err
    assert cli_main(["export", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"hf-oscq export: error: {tmp_path / 'nothing'} does not exist")
    assert (
        cli_main(["export", str(tmp_path / "nothing"), "--dataset", "nosuchds", "--output", str(tmp_path / "o")]) == 1
    )
    assert capsys.readouterr().err.startswith("hf-oscq export: error: Unknown dataset 'nosuchds': choose one of")
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"hf-oscq export: error: {tmp_path / 'empty'} has no config.json")


def _narrow_resnet(tmp_path):
    torch.manual_seed(0)
    narrow = {"channels": (8, 16, 32, 64), "stem_width": 8, "in_chans": 1}
    model = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="resnet18", num_labels=10, model_args=narrow)
    ).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model


def test_cli_export_defaults_re_estimate_batchnorm_on_the_recorded_training_data(tmp_path, capsys):
    from hf_oscq.quantization.batchnorm import calibration_batches
    from hf_oscq.scripts.data import load_image_dataset
    from hf_oscq.training.metrics import evaluate_accuracy

    model = _narrow_resnet(tmp_path)
    # what the recipes write next to a trained model (TRAINING_INFO_NAME)
    record = {"osc_method": "oscillation", "dataset": "digits", "hyperparameters": {"seed": 5}}
    (tmp_path / "ckpt" / "oscq_training.json").write_text(json.dumps(record | {"data_dir": None}))
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "oscq_export.json").read_text())
    assert manifest["has_batchnorm"] is True and manifest["bn_recalibrated"] is True
    assert manifest["training"] == record  # the recorded recipe travels into the export, the local data path does not
    assert manifest["bn_recalibration"] == {"samples": 512, "dataset": "digits", "seed": 5, "batch_size": 64}
    # The reference: 512 training images (the default), drawn with the recorded seed (the seeded permutation of
    # tests/quantization/test_batchnorm.py) from the run's own training split (digits split with the same seed),
    # BatchNorm re-estimated on them after rounding.
    batches = list(calibration_batches(load_image_dataset("digits", seed=5).train, 512, 64, seed=5))
    assert sum(len(batch["pixel_values"]) for batch in batches) == 512
    reference = hf_oscq.quantize_model(model, 3, calibration_batches=batches).eval()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "w3").eval()
    probe = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        logits = loaded(pixel_values=probe).logits
        torch.testing.assert_close(logits, reference(pixel_values=probe).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(logits, hf_oscq.quantize_model(model, 3)(pixel_values=probe).logits, atol=1e-3)
    # hf-oscq eval evaluates the files as written (re-estimated) and says how they were made
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "out"), "--dataset", "digits", "--max_eval_samples", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        "Quantized checkpoints: post-training rounding of the same full-precision weights, then BatchNorm "
        "re-estimation on 512 training images (the running statistics of the rounded network)."
    )
    # on the run's own test images: digits are split with the run's seed (5), as the recipe split them
    dataset = load_image_dataset("digits", seed=5, max_eval_samples=64).eval
    assert not torch.equal(  # another seed's test split, which holds some of this run's training images
        torch.stack([dataset[i]["pixel_values"] for i in range(8)]),
        torch.stack([load_image_dataset("digits", max_eval_samples=8).eval[i]["pixel_values"] for i in range(8)]),
    )
    expected = [evaluate_accuracy(m, dataset)["accuracy"] for m in (model, reference)]
    assert lines[-1] == "| out | " + " | ".join(f"{100 * a:.1f}" for a in expected) + " |"


def test_cli_export_re_estimates_as_the_recorded_run_did(tmp_path):
    """The recorded number of images, batch size, seed and training split (a recipe's subsample and held-out
    fraction) are the export's defaults; a flag still overrides them."""
    from hf_oscq.quantization.batchnorm import calibration_batches
    from hf_oscq.scripts.data import load_image_dataset

    model = _narrow_resnet(tmp_path)
    record = {
        "dataset": "digits",
        "osc_bn_recalibration_samples": 96,
        "max_train_samples": 600,
        "validation_fraction": 0.25,
        "hyperparameters": {"seed": 5, "eval_batch_size": 32},
    }
    (tmp_path / "ckpt" / "oscq_training.json").write_text(json.dumps(record))
    probe = torch.randn(4, 1, 8, 8)

    def exported(*flags):
        out = tmp_path / f"out{len(flags)}"
        assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(out), *flags]) == 0
        with torch.no_grad():
            return AutoModelForImageClassification.from_pretrained(out / "w3").eval()(pixel_values=probe).logits

    def reference(samples, batch_size):
        # the recipe's own training split: the first 600 images, then 25 % held out, both with the run's seed
        train = load_image_dataset("digits", seed=5, max_train_samples=600, validation_fraction=0.25).train
        assert len(train) == 450
        batches = list(calibration_batches(train, samples, batch_size, seed=5))
        assert sum(len(batch["pixel_values"]) for batch in batches) == samples
        with torch.no_grad():
            return hf_oscq.quantize_model(model, 3, calibration_batches=batches).eval()(pixel_values=probe).logits

    torch.testing.assert_close(exported(), reference(96, 32), rtol=0, atol=1e-5)
    torch.testing.assert_close(exported("--bn_recalibration_samples", "64"), reference(64, 32), rtol=0, atol=1e-5)
    assert not torch.allclose(reference(96, 32), reference(64, 32), atol=1e-4)  # the flag made a difference


def test_cli_export_of_a_batchnorm_model_without_data_fails_and_plain_rounding_is_one_flag_away(
    tmp_path, capsys, caplog
):
    model = _narrow_resnet(tmp_path)
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading progress bar
    assert err == (
        "hf-oscq export: error: TimmWrapperForImageClassification has BatchNorm layers, whose running statistics "
        "rounding invalidates (plain rounding can cost most of the accuracy at 2 or 3 bits, so it is never done "
        f"silently): {tmp_path / 'ckpt'} records no training data to re-estimate them on: pass --dataset NAME (and "
        "--data_dir for a local copy) to re-estimate them on its training images, or --bn_recalibration_samples 0 for "
        "plain rounding (the paper's PTQ)."
    )
    assert not (tmp_path / "out").exists()
    plain = ["--bn_recalibration_samples", "0"]
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(tmp_path / "out"), *plain]) == 0
    manifest = json.loads((tmp_path / "out" / "oscq_export.json").read_text())
    assert manifest["has_batchnorm"] is True and manifest["bn_recalibrated"] is False
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "w3").eval()
    probe = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = hf_oscq.quantize_model(model, 3)(pixel_values=probe).logits
        torch.testing.assert_close(loaded(pixel_values=probe).logits, expected, rtol=0, atol=1e-5)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="hf_oscq.cli.export"):
        assert cli_main(["eval", str(tmp_path / "out"), "--dataset", "digits", "--max_eval_samples", "8"]) == 0
    warned = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warned == [
        "w3: BatchNorm statistics were not re-estimated after rounding (plain rounding, the paper's PTQ), which "
        "costs accuracy at low bit-widths; `hf-oscq export` without --bn_recalibration_samples 0 re-estimates them."
    ]
    assert (
        capsys.readouterr()
        .out.strip()
        .splitlines()[0]
        .startswith(
            "Quantized checkpoints: plain post-training rounding of the same full-precision weights (the paper's PTQ)"
        )
    )


def test_cli_export_eval_and_push_plan_of_a_causal_lm(tmp_path, capsys):
    import math
    import shutil

    import pytest
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from hf_oscq import QuantSpec
    from hf_oscq.hub.push import plan_push
    from hf_oscq.scripts.text import TokenBlocks, byte_tokenizer, load_kjv

    if shutil.which("bible") is None:
        pytest.skip("Debian packages bible-kjv, bible-kjv-text")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=257, bos_token_id=256, eos_token_id=256
    )
    model = GPT2LMHeadModel(config).eval()
    tokenizer = byte_tokenizer()
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--group_size", "8", "--output", str(out)]) == 0
    assert (out / "w3" / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out / "w3")
    expected = hf_oscq.quantize_model(model, spec=QuantSpec(3, "group", group_size=8))
    ids = torch.tensor([list(b"And God said")])
    with torch.no_grad():
        assert_packed_close(loaded(ids).logits, expected(ids).logits)
    capsys.readouterr()
    argv = ["eval", str(out), "--dataset", "kjv", "--block_size", "16", "--max_eval_samples", "4"]
    assert cli_main([*argv, "--output_json", str(tmp_path / "table.json")]) == 0
    recorded = json.loads((tmp_path / "table.json").read_text())
    table = recorded["table"]
    # 4 blocks of 16 bytes of the held-out chapters, 15 predicted tokens each
    assert recorded["provenance"] == {
        "metric": "perplexity", "dataset": "kjv", "split": "every-20th-chapter", "examples": 4, "tokens": 60,
        "batchnorm": "none", "bn_samples": None,
    }  # fmt: skip
    blocks = TokenBlocks(load_kjv().eval, tokenizer, 16, 4).blocks
    for name, reference in (("fp", model), ("w3", expected)):
        with torch.no_grad():  # mean next-token cross-entropy over the 4 x 15 predicted tokens, by hand
            logits = reference(input_ids=blocks).logits[:, :-1]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            loss = -log_probs.gather(-1, blocks[:, 1:, None]).mean().item()
        assert table[name]["loss"] == pytest.approx(loss, rel=1e-5)
        assert table[name]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    printed = capsys.readouterr().out
    assert (
        f"| {table['w3']['perplexity']:.2f} |" in printed
        and "| perplexity (token-level, lower is better) |" in printed
    )
    assert "Perplexity (token-level, lower is better) on 4 examples (60 predicted tokens)" in printed
    plan = plan_push(out, "someone/tiny-gpt2")
    for repo in plan.repos:
        assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= {f.path_in_repo for f in repo.files}


def test_cli_export_checks_every_bit_width_before_loading_anything(tmp_path, capsys):
    """`--bits 3 9` fails on the 9 at once: the checkpoint (here a config without weights) is never loaded."""
    (tmp_path / "ckpt").mkdir()
    tiny_vit().config.save_pretrained(tmp_path / "ckpt")
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "9", "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (
        "hf-oscq export: error: bits must be an integer between 2 and 8 (2 = ternary, 8 = 255 levels), got 9.\n"
    )
    assert not (tmp_path / "out").exists()


def test_eval_of_a_re_estimated_export_warns_when_full_precision_trails_8_bits(tmp_path, caplog, monkeypatch):
    from hf_oscq.cli.eval import _recipe_processor
    from hf_oscq.evaluation import evaluate_folder, load_eval_dataset
    from hf_oscq.training import metrics

    _narrow_resnet(tmp_path)
    dataset = load_eval_dataset("digits", max_samples=8)
    # the scores of a short run: full precision with the statistics training left, which never settled, and the
    # 8-bit checkpoint with statistics re-estimated after rounding
    quantized = lambda model: getattr(model.config, "quantization_config", None) is not None  # noqa: E731
    monkeypatch.setattr(
        metrics, "evaluate_model", lambda model, batches: {"accuracy": 0.9 if quantized(model) else 0.2}
    )
    out = tmp_path / "out"
    command = ["export", str(tmp_path / "ckpt"), "--bits", "8", "--dataset", "digits", "--output", str(out)]
    assert cli_main([*command, "--bn_recalibration_samples", "64"]) == 0
    with caplog.at_level(logging.WARNING, logger="hf_oscq.quantization.batchnorm"):
        table = evaluate_folder(out, dataset, 8, _recipe_processor("digits"))
    assert table == {"fp": {"accuracy": 0.2}, "w8": {"accuracy": 0.9}}
    assert "Full precision scores 20.0 % accuracy and 8 bits 90.0 %: the BatchNorm" in caplog.text


@pytest.mark.parametrize(
    "command, flag, value, minimum",
    [
        ("export", "bn_recalibration_samples", "-1", 0),
        ("export", "batch_size", "0", 1),
        ("eval", "batch_size", "0", 1),
        ("eval", "max_eval_samples", "0", 1),
    ],
)
def test_negative_or_zero_counts_fail_before_anything_is_loaded(tmp_path, capsys, command, flag, value, minimum):
    missing = tmp_path / "no-such-checkpoint"  # checked first: loading it would fail with another message
    target = ["--output", str(tmp_path / "out")] if command == "export" else ["--dataset", "digits"]
    assert cli_main([command, str(missing), *target, f"--{flag}", value]) == 1
    err = capsys.readouterr().err
    assert err == f"hf-oscq {command}: error: --{flag} must be at least {minimum}, got {value}.\n"
    assert not (tmp_path / "out").exists()


def test_cli_export_output_problems_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """`--output` under a file (directly or higher up) and on a folder that cannot be written (tests run as root:
    `os.access` reports a read-only file system) fail before the model loads: one line, exit 1, nothing written."""
    tiny_vit().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "FILE").write_text("")
    for output, message in (
        (tmp_path / "FILE" / "sub", f"'{tmp_path / 'FILE'}' is a file, where a folder belongs"),
        (tmp_path / "FILE" / "a" / "b", f"'{tmp_path / 'FILE'}' is a file, where a folder belongs"),
    ):
        capsys.readouterr()
        assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(output)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("hf-oscq export: error: --output ") and message in err and err.count("\n") == 1, err
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"the folder '{tmp_path}' cannot be written (read-only file system" in err and err.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["FILE", "ckpt"]


@pytest.mark.parametrize(
    ("failing", "error", "message"),
    [
        ("tempfile.mkdtemp", errno.EROFS, "is on a read-only file system: write to a folder on a writable disk"),
        ("hf_oscq.export.hf_quantizer.finish_saved_folder", errno.ENOSPC, "no space left on the device"),
    ],
    ids=["read_only", "disk_full"],
)
def test_cli_export_failing_to_write_is_one_line_and_keeps_the_previous_export(
    tmp_path, capsys, monkeypatch, failing, error, message
):
    """A write that fails after the model has loaded (the staging folder on a read-only file system, a full disk
    while writing a variant) is one line naming the path, exit 1; the previous export is left as it was and nothing
    is left beside it."""
    tiny_vit().save_pretrained(tmp_path / "ckpt")
    arguments = ["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(tmp_path / "out")]
    assert cli_main(arguments) == 0
    before = {path: path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()}

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error), str(tmp_path / "out"))

    monkeypatch.setattr(failing, fail)
    capsys.readouterr()
    assert cli_main(arguments) == 1
    (line,) = capsys.readouterr().err.splitlines()[-1:]  # after the weights' loading progress bar
    assert line.startswith(f"hf-oscq export: error: Cannot write the export {tmp_path / 'out'}: ") and message in line
    assert line.endswith(f"Nothing was written; the previous export in {tmp_path / 'out'} is unchanged.")
    assert {path: path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt", "out"]


def test_cli_export_names_the_layer_a_group_size_does_not_fit(tmp_path, capsys):
    """`--group_size` is checked against every selected layer before anything is written, naming the first layer it
    does not divide, its input features and the flag (the same check as the Trainer, export_quantized and
    quantize-on-load, each naming its own argument)."""
    tiny_vit().save_pretrained(tmp_path / "ckpt")  # intermediate size 37: fc2 has 37 input features
    capsys.readouterr()
    arguments = [
        "export",
        str(tmp_path / "ckpt"),
        "--bits",
        "3",
        "--group_size",
        "16",
        "--output",
        str(tmp_path / "o"),
    ]
    assert cli_main(arguments) == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(
        "hf-oscq export: error: --group_size=16 does not divide the 37 input features of layer "
        "'vit.layers.0.mlp.fc2' (weight shape [32, 37]) (and 1 more layers)"
    )
    assert "the largest that does here is 1" in line and not (tmp_path / "o").exists()


def _group_trained_run(tmp_path):
    """A tiny ViT trained 2 steps by OscillationTrainer with group-wise scales of 16 at 4 bits, saved with
    `save_model`, and its evaluation (eval_w4_loss) on 16 images."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    model = ViTForImageClassification(config)
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"pixel_values": torch.randn(1, 8, 8, generator=generator), "labels": int(label)}
        for label in torch.randint(0, 3, (32,), generator=generator)
    ]
    args = hf_oscq.OscillationConfig(
        output_dir=str(tmp_path / "run"), osc_bits=4, osc_group_size=16, osc_eval_bits=[4], max_steps=2,
        per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = hf_oscq.OscillationTrainer(model=model, args=args, train_dataset=rows[:16], eval_dataset=rows[16:])
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    return rows[16:], metrics


def test_cli_export_of_a_run_uses_its_recorded_spec_and_gives_the_trainers_loss(tmp_path, capsys):
    """A run trained with `osc_group_size=16` and exported with `hf-oscq export RUN --bits 4` (no spec flags) is
    exported group-wise as it was trained (its oscq_training.json, written by `save_model`): the exported w4
    checkpoint's loss on the evaluation images is the Trainer's `eval_w4_loss`. A flag repeating the recorded spec is
    accepted; one contradicting it (`--per_channel`, another `--group_size`, `--target_modules`) is one line naming
    both."""
    evaluation, metrics = _group_trained_run(tmp_path)
    record = json.loads((tmp_path / "run" / "oscq_training.json").read_text())
    assert record["quant_spec"]["granularity"] == "group" and record["quant_spec"]["group_size"] == 16
    assert cli_main(["export", str(tmp_path / "run"), "--bits", "4", "--output", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "oscq_export.json").read_text())
    assert (manifest["granularity"], manifest["group_size"]) == ("group", 16)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "w4").eval()
    pixel_values = torch.stack([row["pixel_values"] for row in evaluation])
    labels = torch.tensor([row["labels"] for row in evaluation])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(loaded(pixel_values=pixel_values).logits, labels).item()
    assert loss == pytest.approx(metrics["eval_w4_loss"], rel=1e-5, abs=1e-6)
    repeated = ["--group_size", "16", "--output", str(tmp_path / "again")]
    assert cli_main(["export", str(tmp_path / "run"), "--bits", "4", *repeated]) == 0
    for flags in (["--per_channel"], ["--group_size", "32"], ["--target_modules", "classifier"]):
        capsys.readouterr()
        assert cli_main(["export", str(tmp_path / "run"), "--bits", "4", *flags, "--output", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "asks for osc_method='oscillation', osc_bits=4" in err, err
        assert "was trained with osc_method='oscillation', osc_bits=4, group_size=16" in err and flags[0] in err
        assert not (tmp_path / "x").exists()
    capsys.readouterr()  # the message names the trained bit-width, whatever --bits asks for
    assert (
        cli_main(
            ["export", str(tmp_path / "run"), "--bits", "2", "3", "--per_channel", "--output", str(tmp_path / "x")]
        )
        == 1
    )
    assert "asks for osc_method='oscillation', osc_bits=4, per_channel" in capsys.readouterr().err
    # --exclude_modules leaves more layers in float (what the compressed-tensors format needs of a conv model): the
    # other layers keep the run's group-wise spec
    assert cli_main(["export", str(tmp_path / "run"), "--bits", "4", "--exclude_modules", "classifier", "--output",
                     str(tmp_path / "narrower")]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "narrower" / "oscq_export.json").read_text())
    assert (manifest["granularity"], manifest["group_size"], manifest["exclude_modules"]) == (
        "group",
        16,
        ["classifier"],
    )
    modules = json.loads((tmp_path / "narrower" / "w4" / "config.json").read_text())["quantization_config"]["modules"]
    assert modules and "classifier" not in modules
    for group_size in ("0", "-3"):
        assert (
            cli_main(["export", str(tmp_path / "run"), "--group_size", group_size, "--output", str(tmp_path / "x")])
            == 1
        )
        assert f"--group_size must be a positive number of input features per scale, got {group_size}." in (
            capsys.readouterr().err
        )


@pytest.mark.parametrize("content", ['{"osc_bits": ', "[1, 2]"])
def test_cli_export_of_a_run_with_a_damaged_record_is_refused(tmp_path, capsys, content):
    """A run folder whose oscq_training.json is truncated or not a JSON object is refused naming the file: the check
    of the run's spec is never skipped silently (it was: the flags then overrode the spec the run trained with)."""
    tiny_vit().save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "oscq_training.json").write_text(content)
    capsys.readouterr()
    argv = ["export", str(tmp_path / "run"), "--per_channel", "--output", str(tmp_path / "out")]
    assert cli_main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("hf-oscq export: error: ") and str(tmp_path / "run" / "oscq_training.json") in line
    assert not (tmp_path / "out").exists()
