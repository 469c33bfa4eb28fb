import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _export_digests as export_digests
import pytest
import torch
from _export_models import ALL_BITS, logits_of, tiny_resnet18, tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification, ViTForImageClassification

import hf_oscq
from hf_oscq.evaluation import record_evaluation
from hf_oscq.export import checkpoint as checkpoint_module
from hf_oscq.export import writer as export_module
from hf_oscq.versions import library_versions

WEIGHTS = "model.safetensors"


def test_vit_reload_equals_quantize_model_at_every_bit_width(vit_export):
    model, out = vit_export
    pixel_values = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for bits in ALL_BITS:
        loaded = AutoModelForImageClassification.from_pretrained(out / f"w{bits}")
        assert isinstance(loaded, ViTForImageClassification)
        expected = logits_of(hf_oscq.quantize_model(model, bits), pixel_values)
        torch.testing.assert_close(logits_of(loaded, pixel_values), expected, rtol=0, atol=1e-5)
        # every quantized weight takes at most 2**b - 1 distinct values
        weight = loaded.get_parameter("vit.layers.0.mlp.fc1.weight")
        assert len(torch.unique(weight)) <= 2**bits - 1
    fp = AutoModelForImageClassification.from_pretrained(out / "fp")
    torch.testing.assert_close(logits_of(fp, pixel_values), logits_of(model, pixel_values), rtol=0, atol=0)


def test_timm_resnet18_reload_equals_quantize_model(resnet_export):
    model, out = resnet_export
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for bits in (2, 3, 8):
        loaded = AutoModelForImageClassification.from_pretrained(out / f"w{bits}")
        assert isinstance(loaded, TimmWrapperForImageClassification)
        assert loaded.config.architecture == "resnet18"
        expected = logits_of(hf_oscq.quantize_model(model, bits), pixel_values)
        torch.testing.assert_close(logits_of(loaded, pixel_values), expected, rtol=0, atol=1e-5)


def test_per_channel_and_batchnorm_recalibration(tmp_path):
    model = tiny_resnet18()
    generator = torch.Generator().manual_seed(3)
    batches = [{"pixel_values": torch.randn(size, 3, 32, 32, generator=generator)} for size in (8, 5)]
    out = hf_oscq.export_quantized(
        model,
        tmp_path / "out",
        bits=(3, 4),
        per_channel=True,
        calibration_batches=batches,
        calibration_source={"dataset": "gaussian noise", "seed": 3},
    )
    config = json.loads((out / "w4" / "config.json").read_text())["quantization_config"]
    assert config["per_channel"] is True and config["bn_recalibrated"] is True
    manifest = json.loads((out / "oscq_export.json").read_text())
    assert manifest["bn_recalibrated"] is True
    # 8 + 5 images, forwarded again at each bit-width
    assert manifest["bn_recalibration"] == {"samples": 13, "dataset": "gaussian noise", "seed": 3}
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    expected = hf_oscq.quantize_model(model, 4, per_channel=True, calibration_batches=batches)
    without_recalibration = hf_oscq.quantize_model(model, 4, per_channel=True)
    loaded = AutoModelForImageClassification.from_pretrained(out / "w4")
    torch.testing.assert_close(logits_of(loaded, pixel_values), logits_of(expected, pixel_values), rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(loaded, pixel_values), logits_of(without_recalibration, pixel_values))


def test_batchnorm_model_without_calibration_data_is_refused_and_nothing_is_written(tmp_path):
    model = tiny_resnet18()  # has BatchNorm
    previous = hf_oscq.export_quantized(tiny_vit(), tmp_path / "out", bits=(2,))
    before = _tree_digest(previous)
    # OscillationTrainer.calibration_batches returns None with osc_bn_recalibration_samples=0
    for calibration in (None, lambda: None):
        with pytest.raises(ValueError, match=r"has BatchNorm layers.*calibration_batches=.*plain_rounding=True"):
            hf_oscq.export_quantized(model, tmp_path / "out", bits=(4,), calibration_batches=calibration)
    assert _tree_digest(previous) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plain_rounding_is_one_flag_away(tmp_path):
    model = tiny_resnet18()  # has BatchNorm; plain rounding is the paper's PTQ
    out = hf_oscq.export_quantized(
        model, tmp_path / "out", bits=(4,), calibration_batches=lambda: None, plain_rounding=True
    )
    manifest = json.loads((out / "oscq_export.json").read_text())
    assert manifest["has_batchnorm"] is True
    assert manifest["bn_recalibrated"] is False and manifest["bn_recalibration"] is None
    assert json.loads((out / "w4" / "config.json").read_text())["quantization_config"]["bn_recalibrated"] is False
    pixel_values = torch.randn(2, 3, 32, 32)
    loaded = AutoModelForImageClassification.from_pretrained(out / "w4")
    expected = logits_of(hf_oscq.quantize_model(model, 4), pixel_values)
    torch.testing.assert_close(logits_of(loaded, pixel_values), expected, rtol=0, atol=1e-5)


def test_layout_config_and_manifest(vit_export):
    model, out = vit_export
    assert sorted(p.name for p in out.iterdir()) == ["fp", "oscq_export.json"] + [f"w{b}" for b in ALL_BITS]
    modules = [name.removesuffix(".weight") for name in hf_oscq.select_weights(model)]
    manifest = json.loads((out / "oscq_export.json").read_text())
    assert manifest["format_version"] == 2 and manifest["bits"] == list(ALL_BITS)
    assert (
        manifest["metrics"] is None and manifest["bn_recalibrated"] is False and manifest["bn_recalibration"] is None
    )
    for bits in ALL_BITS:
        folder = out / f"w{bits}"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        config = json.loads((folder / "config.json").read_text())
        quantization = config["quantization_config"]
        assert quantization["quant_method"] == "oscq" and quantization["bits"] == bits
        assert quantization["modules"] == modules and quantization["format_version"] == 2
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
    original = checkpoint_module.serialize_checkpoint  # what the packed save path writes each file with

    def fail_at_five_bits(tensors, bits, *config):
        if bits == 5:
            raise OSError("disk full")
        return original(tensors, bits, *config)

    monkeypatch.setattr(checkpoint_module, "serialize_checkpoint", fail_at_five_bits)
    with torch.no_grad():
        model.classifier.weight.mul_(-1)  # the new export would differ from the old one
    with pytest.raises(OSError, match="disk full"):
        hf_oscq.export_quantized(model, out, bits=(2, 5))
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    monkeypatch.setattr(checkpoint_module, "serialize_checkpoint", original)
    hf_oscq.export_quantized(model, out, bits=(2, 5))  # a successful export replaces the previous one
    after = _tree_digest(out)
    assert after.keys() == before.keys() and after["w5/model.safetensors"] != before["w5/model.safetensors"]


def test_replacing_an_export_names_what_the_previous_one_held_that_the_new_one_lacks(tmp_path, caplog):
    model = tiny_vit()
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(2, 3, 4, 8))
    record_evaluation(
        out, {"fp": {"accuracy": 0.5}}, hf_oscq.Provenance("accuracy", "digits", "test", 8, batchnorm="none")
    )
    with caplog.at_level("WARNING", logger="hf_oscq.export.writer"):
        hf_oscq.export_quantized(model, out, bits=(2, 3))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fp", "w2", "w3"]
    (record,) = [r for r in caplog.records if r.name == "hf_oscq.export.writer" and r.levelname == "WARNING"]
    assert record.getMessage() == (
        f"Replaced the previous export in {out}: its w4, w8 checkpoints are gone; "
        "its evaluation on 'digits' is dropped."
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_oscq.export.writer"):
        hf_oscq.export_quantized(model, out, bits=(2, 3))  # the same variants again: nothing is lost, no warning
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


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
    with pytest.raises(ValueError, match=r"calibration_source=\.\.\.\) must be JSON-serializable"):
        hf_oscq.export_quantized(
            tiny_resnet18(),
            tmp_path / "c",
            bits=(3,),
            calibration_batches=[{"pixel_values": torch.randn(2, 3, 32, 32)}],
            calibration_source={"seed": object()},
        )
    assert not any((tmp_path / name).exists() for name in "abc")


def _export_pausing_at(stage: str, out: Path, marker: Path) -> None:
    """The body of the killed export process: exports another model into `out` and waits at `stage`."""
    torch.set_num_threads(1)
    if stage in ("moved_aside", "renamed"):
        export_module._exchange = lambda first, second: False  # a system without an atomic exchange

    def pause(name: str) -> None:
        if name == stage:
            written = marker.with_name(marker.name + ".partial")
            written.write_text(name)
            os.replace(written, marker)  # the test sees the marker only once it is complete
            time.sleep(600)  # killed here by the test

    export_module._stage = pause
    model = tiny_vit()
    with torch.no_grad():
        model.classifier.weight.mul_(-1)
    hf_oscq.export_quantized(model, out, bits=(2, 5))


KILL_STAGES = (
    "staging_created",
    "fp_written",
    "w2_written",
    "manifest_written",
    "exchanged",
    "moved_aside",
    "renamed",
)


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_export_killed_at_every_stage_leaves_a_complete_export_at_out(tmp_path, stage):
    import multiprocessing

    out = tmp_path / "out"
    hf_oscq.export_quantized(tiny_vit(), out, bits=(2, 5))
    before = _tree_digest(out)
    marker = tmp_path.parent / f"{tmp_path.name}.marker"
    # A forked process (torch and transformers already imported), killed with SIGKILL: no handler, no cleanup runs.
    child = multiprocessing.get_context("fork").Process(target=_export_pausing_at, args=(stage, out, marker))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.read_text() == stage
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    assert leftovers and all(name.startswith((".out.tmp-", ".out.old-")) for name in leftovers), leftovers
    if stage == "moved_aside":  # no atomic exchange: the previous export waits aside for the next export
        assert not out.exists()
    elif stage in ("exchanged", "renamed"):  # the new export is complete in place
        after = _tree_digest(out)
        assert after.keys() == before.keys() and after["w5/model.safetensors"] != before["w5/model.safetensors"]
    else:
        assert _tree_digest(out) == before
    # The next export into OUT puts a previous export aside back and removes every leftover before it writes:
    # made to fail here, it leaves the previous export (restored) exactly as it was, and nothing else.
    expected = _tree_digest(out) if out.exists() else before
    original = checkpoint_module.serialize_checkpoint

    def disk_full(*args):
        raise OSError("disk full")

    checkpoint_module.serialize_checkpoint = disk_full
    try:
        with pytest.raises(OSError, match="disk full"):
            hf_oscq.export_quantized(tiny_vit(), out, bits=(2, 5))
    finally:
        checkpoint_module.serialize_checkpoint = original
    assert _tree_digest(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    AutoModelForImageClassification.from_pretrained(out / "w5")


def test_a_running_export_keeps_its_staging_folder(tmp_path):
    out = tmp_path / "out"
    hf_oscq.export_quantized(tiny_vit(), out, bits=(2,))
    busy = tmp_path / ".out.tmp-running"
    busy.mkdir()
    stale = tmp_path / ".out.tmp-killed"
    stale.mkdir()
    (stale / "partial").write_bytes(b"x")
    held = export_module._lock(busy)  # as a running export holds its own
    try:
        removed = export_module.clean_interrupted_exports(out)
    finally:
        os.close(held)
    assert removed == [stale] and busy.is_dir() and not stale.exists()


def test_a_model_exports_the_same_tensors_however_it_was_obtained(tmp_path):
    """A TimmWrapper model built from its config and the same model reloaded with `from_pretrained` (which remembers
    the names of the checkpoint it came from) write the same tensors under the same names, timm's own."""
    model = tiny_resnet18()
    model.save_pretrained(tmp_path / "saved")
    reloaded = TimmWrapperForImageClassification.from_pretrained(tmp_path / "saved").eval()
    fresh, again = (
        load_file(
            hf_oscq.export_quantized(candidate, tmp_path / name, bits=(3,), plain_rounding=True) / "w3" / WEIGHTS
        )
        for name, candidate in (("fresh", model), ("reloaded", reloaded))
    )
    assert fresh.keys() == again.keys()
    assert {"conv1.weight", "conv1.weight_scale", "bn1.running_var", "fc.weight"} <= fresh.keys()
    assert not any(name.startswith("timm_model.") for name in fresh)
    for name, tensor in fresh.items():
        assert torch.equal(again[name], tensor), name


def test_a_checkpoint_is_the_same_bytes_in_every_process():
    """safetensors writes header metadata in a hash-map order that changes from process to process: the checkpoint
    bytes must not (its metadata is written in key order)."""
    script = (
        "import sys, torch\n"
        "from hf_oscq.export.checkpoint import serialize_checkpoint\n"
        "tensors = {'w': torch.arange(6, dtype=torch.uint8), 'w_scale': torch.tensor(0.5)}\n"
        "sys.stdout.buffer.write(serialize_checkpoint(tensors, 3, {'model_type': 'vit', 'hidden_size': 8}))\n"
    )
    blobs = [subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout for _ in range(3)]
    assert blobs[0] == blobs[1] == blobs[2]
    header = json.loads(blobs[0][8 : 8 + int.from_bytes(blobs[0][:8], "little")])
    assert len(header["__metadata__"]) >= 7  # format, version, bits, three library versions, config, checksum
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_a_one_shot_generator_of_calibration_batches_is_refused_before_writing(tmp_path):
    """export_quantized re-estimates BatchNorm at each bit-width: a generator would be empty from the second on, so
    it is refused up front, saying what to pass; nothing is written. One bit-width may take a generator."""

    model = tiny_resnet18()
    batches = [
        {"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    with pytest.raises(hf_oscq.OscqValueError, match="re-iterable .* or a callable returning fresh batches"):
        hf_oscq.export_quantized(model, tmp_path / "out", bits=(2, 3), calibration_batches=(b for b in batches))
    assert not (tmp_path / "out").exists()
    hf_oscq.export_quantized(model, tmp_path / "one", bits=(3,), calibration_batches=(b for b in batches))
    assert json.loads((tmp_path / "one" / "oscq_export.json").read_text())["bn_recalibration"]["samples"] == 8


@pytest.mark.parametrize("case", sorted(export_digests.CASES))
def test_exports_are_the_bytes_pinned_before_the_codec(tmp_path, case):
    """Every tensor, the tensor order and offsets, the format metadata and the quantization_config of seeded tiny
    exports are the ones the writer at 33cd5f5 produced (tests/_export_digests.py says what is pinned and why).

    Covered: per-tensor, per-channel and group-wise scales; Linear, Conv2d and Embedding weights (out_dim 0) and
    GPT-2's Conv1D (out_dim 1); tied embeddings stored once; BatchNorm statistics re-estimated at each bit-width;
    bit-widths 2 to 8. The whole file's bytes are compared too where the same library versions run (the header's
    checksum covers the versions).
    """
    pinned = json.loads(export_digests.DIGESTS.read_text())
    out = export_digests.export_case(case, tmp_path)
    found = export_digests.export_digest(out)
    assert found.keys() == pinned["cases"][case].keys()
    fp_config = json.loads((out / "fp" / "config.json").read_text())
    same_versions = pinned["versions"] == library_versions()
    for variant, expected in pinned["cases"][case].items():
        actual = found[variant]
        assert actual["files"] == expected["files"], variant
        assert actual["tensors"] == expected["tensors"], variant
        for key in ("header_sha256", "data_sha256", "metadata", "quantization_config"):
            assert actual[key] == expected[key], (variant, key)
        if same_versions:
            assert actual["file_sha256"] == expected["file_sha256"], variant
        config = json.loads((out / variant / "config.json").read_text())
        guarded = config.pop("quantization_config")["guarded_fields"]
        for field, value in guarded.items():
            config.pop(field) if value is None else config.update({field: value})
        assert config == fp_config, variant
