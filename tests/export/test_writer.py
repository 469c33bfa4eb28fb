import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import hf_oscq
from hf_oscq.export import writer as export_module
from hf_oscq.export.checkpoint import CheckpointFormatError, serialize_checkpoint
from hf_oscq.cli import main as cli_main

ALL_BITS = (2, 3, 4, 5, 6, 7, 8)


def tiny_vit(num_channels: int = 1, num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=num_channels,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def tiny_resnet18() -> TimmWrapperForImageClassification:
    """timm's resnet18 (BasicBlock, layers 2-2-2-2) with narrow channels, built from the config alone (no Hub)."""
    import timm

    torch.manual_seed(0)
    config = TimmWrapperConfig(
        architecture="resnet18",
        num_labels=5,
        model_args={"channels": (8, 16, 32, 64), "stem_width": 8},
        pretrained_cfg=timm.models.get_pretrained_cfg("resnet18").to_dict(),
    )
    model = TimmWrapperForImageClassification(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that re-estimating them changes the logits
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def _logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    model = tiny_vit()
    out = hf_oscq.export_quantized(model, tmp_path_factory.mktemp("vit") / "export", bits=ALL_BITS)
    return model, out


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory):
    model = tiny_resnet18()
    out = hf_oscq.export_quantized(model, tmp_path_factory.mktemp("resnet") / "export", bits=(2, 3, 8))
    return model, out


def test_vit_reload_equals_quantize_model_at_every_bit_width(vit_export):
    model, out = vit_export
    pixel_values = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for bits in ALL_BITS:
        loaded = AutoModelForImageClassification.from_pretrained(out / f"w{bits}")
        assert isinstance(loaded, ViTForImageClassification)
        expected = _logits(hf_oscq.quantize_model(model, bits), pixel_values)
        torch.testing.assert_close(_logits(loaded, pixel_values), expected, rtol=0, atol=1e-5)
        # every quantized weight takes at most 2**b - 1 distinct values
        weight = loaded.get_parameter("vit.layers.0.mlp.fc1.weight")
        assert len(torch.unique(weight)) <= 2**bits - 1
    fp = AutoModelForImageClassification.from_pretrained(out / "fp")
    torch.testing.assert_close(_logits(fp, pixel_values), _logits(model, pixel_values), rtol=0, atol=0)


def test_timm_resnet18_reload_equals_quantize_model(resnet_export):
    model, out = resnet_export
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for bits in (2, 3, 8):
        loaded = AutoModelForImageClassification.from_pretrained(out / f"w{bits}")
        assert isinstance(loaded, TimmWrapperForImageClassification)
        assert loaded.config.architecture == "resnet18"
        expected = _logits(hf_oscq.quantize_model(model, bits), pixel_values)
        torch.testing.assert_close(_logits(loaded, pixel_values), expected, rtol=0, atol=1e-5)


def test_per_channel_and_batchnorm_recalibration(tmp_path):
    model = tiny_resnet18()
    generator = torch.Generator().manual_seed(3)
    batches = [{"pixel_values": torch.randn(8, 3, 32, 32, generator=generator)} for _ in range(2)]
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(4,), per_channel=True, calibration_batches=batches)
    config = json.loads((out / "w4" / "config.json").read_text())["quantization_config"]
    assert config["per_channel"] is True and config["bn_recalibrated"] is True
    assert json.loads((out / "oscq_export.json").read_text())["bn_recalibrated"] is True
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    expected = hf_oscq.quantize_model(model, 4, per_channel=True, calibration_batches=batches)
    without_recalibration = hf_oscq.quantize_model(model, 4, per_channel=True)
    loaded = AutoModelForImageClassification.from_pretrained(out / "w4")
    torch.testing.assert_close(_logits(loaded, pixel_values), _logits(expected, pixel_values), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(loaded, pixel_values), _logits(without_recalibration, pixel_values))


def test_calibration_callable_returning_none_means_plain_rounding(tmp_path):
    model = tiny_resnet18()  # has BatchNorm; OscillationTrainer.calibration_batches returns None with 0 samples
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(4,), calibration_batches=lambda: None)
    assert json.loads((out / "oscq_export.json").read_text())["bn_recalibrated"] is False
    assert json.loads((out / "w4" / "config.json").read_text())["quantization_config"]["bn_recalibrated"] is False
    pixel_values = torch.randn(2, 3, 32, 32)
    loaded = AutoModelForImageClassification.from_pretrained(out / "w4")
    expected = _logits(hf_oscq.quantize_model(model, 4), pixel_values)
    torch.testing.assert_close(_logits(loaded, pixel_values), expected, rtol=0, atol=1e-5)


def test_layout_config_and_manifest(vit_export):
    model, out = vit_export
    assert sorted(p.name for p in out.iterdir()) == ["fp", "oscq_export.json"] + [f"w{b}" for b in ALL_BITS]
    modules = [name.removesuffix(".weight") for name in hf_oscq.select_weights(model)]
    manifest = json.loads((out / "oscq_export.json").read_text())
    assert manifest["format_version"] == 1 and manifest["bits"] == list(ALL_BITS)
    assert manifest["metrics"] is None and manifest["bn_recalibrated"] is False
    for bits in ALL_BITS:
        folder = out / f"w{bits}"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        config = json.loads((folder / "config.json").read_text())
        quantization = config["quantization_config"]
        assert quantization["quant_method"] == "oscq" and quantization["bits"] == bits
        assert quantization["modules"] == modules and quantization["format_version"] == 1
        assert manifest["sizes_bytes"][f"w{bits}"] == (folder / "model.safetensors").stat().st_size
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            assert handle.metadata()["oscq_bits"] == str(bits)
            codes = handle.get_tensor("vit.encoder.layer.0.intermediate.dense.weight")  # legacy name on disk
            scale = handle.get_tensor("vit.encoder.layer.0.intermediate.dense.weight_scale")
            bias = handle.get_tensor("vit.encoder.layer.0.intermediate.dense.bias")
        weight = model.get_parameter("vit.layers.0.mlp.fc1.weight")
        assert codes.dtype == torch.uint8 and codes.shape == (math.ceil(37 * 32 * bits / 8),)
        top = 2 ** (bits - 1) - 1
        torch.testing.assert_close(scale, weight.detach().abs().max() / top, rtol=0, atol=0)
        torch.testing.assert_close(bias, model.get_parameter("vit.layers.0.mlp.fc1.bias").detach(), rtol=0, atol=0)


def test_quantized_tensors_take_b_over_32_of_fp32(vit_export):
    model, out = vit_export
    weights = hf_oscq.select_weights(model)
    fp32_bytes = sum(w.numel() * 4 for w in weights.values())
    expected_packed = {b: sum(math.ceil(w.numel() * b / 8) for w in weights.values()) for b in ALL_BITS}
    other_bytes = sum(t.numel() * 4 for n, t in model.state_dict().items() if n not in weights)
    fp_size = (out / "fp" / "model.safetensors").stat().st_size
    for bits in ALL_BITS:
        path = out / f"w{bits}" / "model.safetensors"
        with safe_open(str(path), "pt") as handle:
            packed = sum(
                handle.get_tensor(k).numel() for k in handle.keys() if handle.get_slice(k).get_dtype() == "U8"
            )
        assert packed == expected_packed[bits]
        assert packed <= fp32_bytes * bits / 32 + len(weights)  # b/32 of fp32, plus at most one padding byte each
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        assert path.stat().st_size == header + packed + 4 * len(weights) + other_bytes  # + one fp32 scale each
        assert path.stat().st_size < fp_size


_NO_IMPORT_SCRIPT = r"""
import json, sys
results = {}
def attempt(name, load):
    try:
        load()
        results[name] = "LOADED"
    except Exception as error:
        results[name] = f"{type(error).__name__}: {error}"
vit, resnet = sys.argv[1], sys.argv[2]
from transformers import AutoModelForImageClassification, ViTForImageClassification, pipeline
import timm
attempt("auto_vit", lambda: AutoModelForImageClassification.from_pretrained(vit))
attempt("auto_resnet", lambda: AutoModelForImageClassification.from_pretrained(resnet))
attempt("vit_class_new_head", lambda: ViTForImageClassification.from_pretrained(
    vit, num_labels=7, ignore_mismatched_sizes=True))
attempt("pipeline", lambda: pipeline("image-classification", model=vit))
attempt("timm_local_dir", lambda: timm.create_model("local-dir:" + resnet, pretrained=True))
attempt("timm_local_dir_config_only", lambda: timm.create_model("local-dir:" + resnet))
attempt("timm_file_overlay", lambda: timm.create_model(
    "resnet18", pretrained=True, pretrained_cfg_overlay={"file": resnet + "/model.safetensors"},
    channels=(8, 16, 32, 64), stem_width=8, num_classes=5))
results["hf_oscq_imported"] = "hf_oscq" in sys.modules
print(json.dumps(results))
"""


def test_loading_without_import_fails_loudly_naming_hf_oscq(vit_export, resnet_export):
    vit_folder, resnet_folder = vit_export[1] / "w3", resnet_export[1] / "w3"
    completed = subprocess.run(
        [sys.executable, "-c", _NO_IMPORT_SCRIPT, str(vit_folder), str(resnet_folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results.pop("hf_oscq_imported") is False
    overlay = results.pop("timm_file_overlay")
    assert overlay.startswith("RuntimeError: Error(s) in loading state_dict"), overlay  # timm's strict load
    for case, outcome in results.items():
        assert outcome != "LOADED", case
        assert "import hf_oscq" in outcome, (case, outcome)


def _copy_variant(out: Path, tmp_path: Path, bits: int = 3) -> Path:
    folder = tmp_path / f"w{bits}"
    shutil.copytree(out / f"w{bits}", folder)
    return folder


def _rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_truncated_and_corrupted_files_are_rejected(vit_export, tmp_path):
    folder = _copy_variant(vit_export[1], tmp_path)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) - 100])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupted"):
        AutoModelForImageClassification.from_pretrained(folder)
    flipped = bytearray(original)
    flipped[-50] ^= 0xFF  # one byte of tensor data
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointFormatError, match="does not match its checksum"):
        AutoModelForImageClassification.from_pretrained(folder)
    weights.write_bytes(original[:5])
    with pytest.raises(CheckpointFormatError, match="not a readable safetensors file"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_codes_shape_not_matching_config_is_rejected(vit_export, tmp_path):
    folder = _copy_variant(vit_export[1], tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    key = "vit.encoder.layer.0.intermediate.dense.weight"
    tensors[key] = tensors[key][:-1]  # consistent file (valid checksum), wrong number of codes
    (folder / "model.safetensors").write_bytes(serialize_checkpoint(tensors, 3))
    with pytest.raises(CheckpointFormatError, match=r"vit.layers.0.mlp.fc1.weight.*shape \[443\].*\[444\]"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_unknown_format_version_and_bit_width_mismatch_are_rejected(vit_export, tmp_path):
    folder = _copy_variant(vit_export[1], tmp_path)
    _rewrite_config(folder, format_version=2)
    with pytest.raises(ValueError, match="format version 2.*reads version 1"):
        AutoModelForImageClassification.from_pretrained(folder)
    _rewrite_config(folder, format_version=1, bits=4)
    with pytest.raises(CheckpointFormatError, match="Bit-width mismatch: config.json says bits=4.*packed at '3'"):
        AutoModelForImageClassification.from_pretrained(folder)
    _rewrite_config(folder, bits=3, modules=["vit.layers.0.mlp.fc1"])  # scales on disk for unlisted modules
    with pytest.raises(CheckpointFormatError, match="does not list"):
        AutoModelForImageClassification.from_pretrained(folder)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_failed_export_leaves_previous_export_intact(tmp_path, monkeypatch):
    model = tiny_vit()
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(2, 5))
    before = _tree_digest(out)
    original = export_module.serialize_checkpoint

    def fail_at_five_bits(tensors, bits):
        if bits == 5:
            raise OSError("disk full")
        return original(tensors, bits)

    monkeypatch.setattr(export_module, "serialize_checkpoint", fail_at_five_bits)
    with torch.no_grad():
        model.classifier.weight.mul_(-1)  # the new export would differ from the old one
    with pytest.raises(OSError, match="disk full"):
        hf_oscq.export_quantized(model, out, bits=(2, 5))
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    monkeypatch.setattr(export_module, "serialize_checkpoint", original)
    hf_oscq.export_quantized(model, out, bits=(2, 5))  # a successful export replaces the previous one
    after = _tree_digest(out)
    assert after.keys() == before.keys() and after["w5/model.safetensors"] != before["w5/model.safetensors"]


def test_export_refuses_a_foreign_folder_and_bad_arguments(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an hf_oscq export"):
        hf_oscq.export_quantized(tiny_vit(), foreign, bits=(3,))
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="bits must be an integer"):
        hf_oscq.export_quantized(tiny_vit(), tmp_path / "a", bits=(1,))
    with pytest.raises(ValueError, match="JSON-serializable"):
        hf_oscq.export_quantized(tiny_vit(), tmp_path / "b", bits=(3,), metrics={"fp": {"accuracy": object()}})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


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


def test_cli_export_refuses_a_quantized_checkpoint(vit_export, tmp_path, capsys):
    assert cli_main(["export", str(vit_export[1] / "w3"), "--output", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-oscq export: error: ") and "already a quantized export" in err and err.count("\n") == 1
    assert not (tmp_path / "again").exists()


def test_cli_export_with_batchnorm_recalibration(tmp_path, capsys):
    from argparse import Namespace

    from hf_oscq.cli.export import export_calibration_batches

    torch.manual_seed(0)
    narrow = {"channels": (8, 16, 32, 64), "stem_width": 8, "in_chans": 1}
    config = TimmWrapperConfig(architecture="resnet18", num_labels=10, model_args=narrow)
    model = TimmWrapperForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "ckpt"), "--bits", "3", "--output", str(tmp_path / "x"),
                     "--bn_recalibration_samples", "32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-oscq export: error: --bn_recalibration_samples needs --dataset") and err.count("\n") == 1
    arguments = ["--bn_recalibration_samples", "40", "--dataset", "digits", "--batch_size", "16"]
    output = ["--bits", "3", "--output", str(tmp_path / "out")]
    assert cli_main(["export", str(tmp_path / "ckpt"), *output, *arguments]) == 0
    written = json.loads((tmp_path / "out" / "w3" / "config.json").read_text())
    assert written["quantization_config"]["bn_recalibrated"] is True
    settings = Namespace(bn_recalibration_samples=40, dataset="digits", data_dir=None, batch_size=16, seed=42)
    batches = export_calibration_batches(settings)
    assert [len(batch["pixel_values"]) for batch in batches] == [16, 16, 16]
    images = torch.randn(4, 1, 8, 8)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "w3").eval()
    recalibrated = hf_oscq.quantize_model(model, 3, calibration_batches=batches).eval()
    with torch.no_grad():
        logits = loaded(pixel_values=images).logits
        torch.testing.assert_close(logits, recalibrated(pixel_values=images).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(logits, hf_oscq.quantize_model(model, 3)(pixel_values=images).logits, atol=1e-3)
