import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

import hf_oscq  # noqa: F401
from hf_oscq.scripts.data import load_image_dataset
from hf_oscq.scripts.recipe import parse_arguments
from hf_oscq.training.metrics import cross_bit_table

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_config_with_command_line_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": "digits",
                "osc_bits": 2,
                "learning_rate": 0.01,
                "baselines": ["qat"],
                "output_dir": str(tmp_path / "o"),
                "use_cpu": True,
            }
        )
    )
    recipe, training = parse_arguments(["--config", str(config), "--osc_bits", "4"], model="vit")
    assert (recipe.dataset, recipe.baselines, recipe.model) == ("digits", ["qat"], "vit")
    assert (training.osc_bits, training.learning_rate) == (4, 0.01)
    config.write_text(yaml.safe_dump({"osc_bitz": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['osc_bitz'\]"):
        parse_arguments(["--config", str(config)], model="vit")


def test_every_shipped_config_parses():
    from hf_oscq.scripts import lm_recipe

    for config in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        if config.name.startswith("lm_"):  # recipes/train_lm.py's
            _, training = lm_recipe.parse_arguments(["--config", str(config), "--use_cpu", "true"])
            assert training.osc_bits in range(2, 9), config.name
            continue
        model = "resnet18" if "resnet18" in config.name else "vit"
        recipe, training = parse_arguments(["--config", str(config), "--use_cpu"], model=model)
        assert recipe.model == model and training.osc_bits in range(2, 9), config.name


def test_cross_bit_table_from_metrics():
    metrics = {
        "test_accuracy": 0.9,
        "test_loss": 0.3,
        "test_w3_accuracy": 0.8,
        "test_w10_accuracy": 0.1,
        "test_runtime": 1.0,
        "test_w2_accuracy": 0.5,
    }
    assert cross_bit_table(metrics) == {
        "fp": {"accuracy": 0.9, "loss": 0.3},
        "w2": {"accuracy": 0.5},
        "w3": {"accuracy": 0.8},
        "w10": {"accuracy": 0.1},
    }


@pytest.mark.slow
def test_digits_recipe_end_to_end(tmp_path):
    output = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "recipes" / "train_vit.py"),
        "--config",
        str(ROOT / "recipes/configs/digits_demo.yaml"),
        "--max_steps",
        "6",
        "--logging_steps",
        "2",
        "--baselines",
        "qat",
        "none",
        "--output_dir",
        str(output),
        "--report_to",
        "tensorboard",
        "--osc_eval_bits",
        "3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((output / "cross_bit.json").read_text())
    tables = record["runs"]
    assert list(tables) == ["oscillation", "qat", "none"]
    assert all(list(table) == ["fp"] + [f"w{b}" for b in range(2, 9)] for table in tables.values())
    # what was measured, with every run's table: digits' 360 test images of the seed-42 split, no BatchNorm
    provenance = {"metric": "accuracy", "dataset": "digits", "split": "test (80/20 split, seed 0)", "examples": 360}
    provenance |= {"tokens": None, "batchnorm": "none", "bn_samples": None}
    assert record["provenance"] == dict.fromkeys(tables, provenance)
    # what it prints: that caption over one table (the runs were measured alike), one row per run in the docs' words
    caption = (
        "Top-1 accuracy (%) on 360 examples of the test (80/20 split, seed 0) split of digits; no BatchNorm layer"
    )
    assert result.stdout.count(caption) == 1 and result.stdout.count("| top-1 accuracy (%) | fp | w2 |") == 1
    for row in ("| oscillation regularizer @3 |", "| QAT @3 |", "| FP + PTQ |"):
        assert row in result.stdout and row in (output / "cross_bit.md").read_text()
    info = json.loads((output / "run_info.json").read_text())
    assert info["world_size"] == 1
    run = output / "training" / "oscillation"
    for name in ("weight_histogram.png", "oscillation_counts.png", "oscillations.json", "model.safetensors"):
        assert (run / name).is_file(), name
    assert list(run.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    export = output / "export"
    manifest = json.loads((export / "oscq_export.json").read_text())
    assert manifest["bits"] == list(range(2, 9))
    assert manifest["training"]["osc_method"] == "oscillation" and manifest["training"]["dataset"] == "digits"
    # scikit-learn's 1,797 digits, split 80/20 by `digits_splits`: 1,437 training and 360 test images
    assert (manifest["training"]["train_samples"], manifest["training"]["eval_samples"]) == (1437, 360)
    assert set(manifest["comparisons"]) == {"qat", "fp_ptq"}
    assert manifest["provenance"] == {"metrics": provenance, "comparisons": provenance}
    # Every exported variant loads and reproduces the accuracy measured before export.
    digits = load_image_dataset("digits")
    pixels = torch.stack([digits.eval[i]["pixel_values"] for i in range(len(digits.eval))])
    labels = np.array(digits.eval["labels"])
    raw = digits.eval.with_format()["pixel_values"]
    images = [Image.fromarray(np.asarray(image, dtype=np.uint8), "L") for image in raw]
    for variant in ["fp"] + [f"w{b}" for b in range(2, 9)]:
        assert (export / variant / "README.md").is_file()
        model = AutoModelForImageClassification.from_pretrained(export / variant).eval()
        with torch.no_grad():
            accuracy = float((model(pixel_values=pixels).logits.argmax(-1).numpy() == labels).mean())
        assert accuracy == pytest.approx(tables["oscillation"][variant]["accuracy"], abs=1e-9), variant
        # ... and so does `pipeline` on the test split as 8-bit images, through the saved image processor.
        results = pipeline("image-classification", model=str(export / variant))(images, top_k=1, batch_size=128)
        predicted = np.array([model.config.label2id[result[0]["label"]] for result in results])
        assert float((predicted == labels).mean()) == pytest.approx(accuracy, abs=1e-9), variant
        if variant != "fp":
            config = json.loads((export / variant / "config.json").read_text())
            assert config["quantization_config"]["bits"] == int(variant[1:])


class _RecordingHub:
    """Stands in for `HfApi` (the network client only): records the token it was built with and the commits."""

    instances = []

    def __init__(self, token=None):
        self.token = token
        self.commits = []
        _RecordingHub.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        pass

    def create_commit(self, repo_id, operations, **kwargs):
        self.commits.append(repo_id)

    def create_collection(self, title, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(slug="me/slug")

    def add_collection_item(self, *args, **kwargs):
        pass


def test_no_token_in_any_file_a_recipe_writes_and_its_push_uses_it(tmp_path, monkeypatch, caplog):
    import logging

    from hf_oscq.hub import push
    from hf_oscq.scripts.recipe import run_recipe

    token = "hf_recipe_secret_token_0123456789"
    monkeypatch.setattr(push, "HfApi", _RecordingHub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _RecordingHub.instances.clear()
    output = tmp_path / "run"
    arguments = ["--config", str(ROOT / "recipes/configs/digits_demo.yaml"), "--max_steps", "2", "--baselines"]
    arguments += ["oscillation", "--save_strategy", "steps", "--save_steps", "1", "--osc_eval_bits", "3"]
    arguments += ["--export_bits", "3", "--max_train_samples", "64", "--max_eval_samples", "32", "--report_to", "none"]
    arguments += ["--output_dir", str(output), "--hub_token", token, "--push_to_hub", "--hub_model_id", "me/digits"]
    recipe, training = parse_arguments(arguments, model="vit")
    with caplog.at_level(logging.DEBUG):
        run_recipe(recipe, training)
    saved_arguments = sorted(output.rglob("training_args.bin"))
    assert len(saved_arguments) >= 2  # the run's folder and its checkpoints
    files = [path for path in output.rglob("*") if path.is_file()]
    assert [path for path in files if token.encode() in path.read_bytes()] == []
    assert token not in caplog.text
    assert torch.load(saved_arguments[0], weights_only=False).hub_token is None
    assert [hub.token for hub in _RecordingHub.instances] == [token]
    assert _RecordingHub.instances[0].commits == ["me/digits", "me/digits-w3"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "bogus"], "--dataset must be one of"),
        (["--dataset", "cifar10", "--data_dir", "/nonexistent"], "leave --data_dir out to use the default source"),
    ],
)
def test_recipe_errors_are_one_line_with_exit_code_1(tmp_path, capsys, flags, message):
    from hf_oscq.scripts.recipe import main

    arguments = ["--config", str(ROOT / "recipes/configs/digits_demo.yaml"), "--output_dir", str(tmp_path), *flags]
    assert main("vit", arguments) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train_vit.py: error: ") and message in line


def _fashion_like_idx(folder: Path, train: int, test: int) -> Path:
    """Random 28x28 images and labels in Fashion-MNIST's IDX files (whose training split the recipes augment with a
    random crop)."""
    import gzip

    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, count in (("train", train), ("t10k", test)):
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (count, 28, 28))),
            ("labels-idx1", rng.integers(0, 10, count)),
        ):
            header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as handle:
                handle.write(header + array.astype(np.uint8).tobytes())
    return folder


def test_a_batchnorm_recipe_its_export_and_hf_oscq_export_re_estimate_alike(tmp_path, capsys):
    """On augmented training images, the recipe's evaluation (the cards' numbers), its export and a later
    `hf-oscq export` of the trained model re-estimate BatchNorm identically: the two exports hold the same tensors, and
    `hf-oscq eval` scores the export at the numbers its manifest and cards carry. Asked for more images than the
    training split holds (500 of 96), all 96 are forwarded, and the table's caption and both manifests say 96 (the
    subset of a larger split: tests/quantization/test_batchnorm.py and the CLI and Trainer tests)."""
    requested, forwarded = 500, 96
    from safetensors.torch import load_file

    from hf_oscq.cli import main as cli_main
    from hf_oscq.scripts.recipe import run_recipe

    data_dir = _fashion_like_idx(tmp_path / "idx", train=96, test=32)
    output = tmp_path / "run"
    arguments = ["--dataset", "fashion_mnist", "--data_dir", str(data_dir), "--max_steps", "2", "--baselines"]
    arguments += ["oscillation", "--osc_eval_bits", "2", "--export_bits", "2"]
    arguments += ["--osc_bn_recalibration_samples", str(requested), "--per_device_train_batch_size", "16"]
    arguments += ["--per_device_eval_batch_size", "16", "--report_to", "none"]
    summary = run_recipe(*parse_arguments([*arguments, "--output_dir", str(output), "--use_cpu"], model="resnet18"))
    assert summary["table"].startswith(
        "Top-1 accuracy (%) on 32 examples of the test split of zalando-datasets/fashion_mnist; BatchNorm statistics "
        f"re-estimated after rounding on {forwarded} training images. Columns: full precision (fp)"
    )
    again = tmp_path / "again"
    assert cli_main(["export", str(output / "training" / "oscillation"), "--bits", "2", "--output", str(again)]) == 0
    for folder in (output / "export", again):  # the recipe's seed (TrainingArguments' default) and eval batch size
        recorded = json.loads((folder / "oscq_export.json").read_text())["bn_recalibration"]
        assert recorded == {"samples": forwarded, "dataset": "fashion_mnist", "seed": 42, "batch_size": 16}
    written, rewritten = (load_file(folder / "w2" / "model.safetensors") for folder in (output / "export", again))
    assert written.keys() == rewritten.keys()
    assert sum(name.endswith("running_var") for name in written) == 20  # ResNet-18's BatchNorm layers
    for name, tensor in written.items():
        torch.testing.assert_close(rewritten[name], tensor, rtol=0, atol=1e-6, msg=name)
    capsys.readouterr()
    command = ["eval", str(output / "export"), "--dataset", "fashion_mnist", "--data_dir", str(data_dir)]
    assert cli_main([*command, "--no_record", "--output_json", str(tmp_path / "eval.json")]) == 0
    manifest = json.loads((output / "export" / "oscq_export.json").read_text())
    # measured as the recipe measured it: the same provenance, so the cards may set both side by side
    assert json.loads((tmp_path / "eval.json").read_text())["provenance"] == manifest["provenance"]["metrics"]
    expected = [100 * manifest["metrics"][variant]["accuracy"] for variant in ("fp", "w2")]
    assert (
        capsys.readouterr().out.strip().splitlines()[-1]
        == "| export | " + " | ".join(f"{value:.1f}" for value in expected) + " |"
    )
