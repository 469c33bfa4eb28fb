import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _export_models import assert_packed_close
from safetensors import safe_open
from transformers import AutoModelForImageClassification

import hf_oscq
from hf_oscq.export.checkpoint import CheckpointFormatError, serialize_checkpoint
from hf_oscq.versions import INSTALL_HINT

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
# The same process, now importing hf_oscq after transformers' quantizer registry and timm: both register at once.
import torch
heavy = ("datasets", "torchvision", "matplotlib", "pandas", "gradio", "sklearn", "tensorboard")
before = {m for m in heavy if m in sys.modules}
import hf_oscq
inputs = {"vit": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
          "resnet": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
after = {"timm_model": timm.is_model("resnet18_cifar")}
for name, folder in (("vit", vit), ("resnet", resnet)):
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        after[name] = model(pixel_values=inputs[name]).logits.tolist()
after["added_heavy_modules"] = sorted({m for m in heavy if m in sys.modules} - before)
results["after_import"] = after
print(json.dumps(results))
"""


def test_loading_without_import_fails_loudly_naming_hf_oscq_and_works_after_it(vit_export, resnet_export):
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
    after = results.pop("after_import")
    assert after.pop("timm_model") is True and after.pop("added_heavy_modules") == []
    for name, (model, _), generator_seed, shape in (
        ("vit", vit_export, 1, (2, 1, 8, 8)),
        ("resnet", resnet_export, 2, (2, 3, 32, 32)),
    ):
        pixel_values = torch.randn(*shape, generator=torch.Generator().manual_seed(generator_seed))
        with torch.no_grad():
            expected = hf_oscq.quantize_model(model, 3)(pixel_values=pixel_values).logits
        torch.testing.assert_close(torch.tensor(after[name]), expected, rtol=0, atol=1e-5)
    assert results.pop("hf_oscq_imported") is False
    overlay = results.pop("timm_file_overlay")
    assert overlay.startswith("RuntimeError: Error(s) in loading state_dict"), overlay  # timm's strict load
    for case, outcome in results.items():
        assert outcome != "LOADED", case
        assert "import hf_oscq" in outcome, (case, outcome)
    for case in ("auto_vit", "vit_class_new_head", "pipeline"):  # transformers quotes the guard: how to install
        assert INSTALL_HINT in results[case], (case, results[case])


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
    _rewrite_config(folder, format_version=3)
    with pytest.raises(ValueError, match="format version 3.*reads versions 1, 2"):
        AutoModelForImageClassification.from_pretrained(folder)
    _rewrite_config(folder, format_version=2, bits=4)
    with pytest.raises(CheckpointFormatError, match="Bit-width mismatch: config.json says bits=4.*packed at '3'"):
        AutoModelForImageClassification.from_pretrained(folder)
    _rewrite_config(folder, bits=3, modules=["vit.layers.0.mlp.fc1"])  # scales on disk for unlisted modules
    with pytest.raises(CheckpointFormatError, match="does not list"):
        AutoModelForImageClassification.from_pretrained(folder)


FORMAT1_EXPORT = Path(__file__).resolve().parent / "data" / "format1_vit"


def test_an_export_written_before_quant_spec_still_loads_and_renders(tmp_path):
    import torch

    import hf_oscq
    from hf_oscq.hub.model_card import render_card_files

    manifest = hf_oscq.read_export_manifest(FORMAT1_EXPORT)
    assert manifest["versions"] is None and "granularity" not in manifest
    assert "granularity" not in json.loads((FORMAT1_EXPORT / "w3" / "config.json").read_text())["quantization_config"]
    parent = AutoModelForImageClassification.from_pretrained(FORMAT1_EXPORT / "fp").eval()
    loaded = AutoModelForImageClassification.from_pretrained(FORMAT1_EXPORT / "w3").eval()
    pixel_values = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_oscq.quantize_model(parent, 3)(pixel_values=pixel_values).logits
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, expected, rtol=0, atol=1e-6)
    shutil.copytree(FORMAT1_EXPORT, tmp_path / "export")
    readme = render_card_files(tmp_path / "export", "w3")["README.md"].decode()
    assert "Top-1 accuracy at 3 bits | 25.0 %" in readme and "Framework versions" not in readme
    assert "was not recorded with this export" in readme  # written before provenance was: its data unknown


def test_versions_are_recorded_in_manifest_metadata_config_and_cards(vit_export):
    import torch
    import transformers

    import hf_oscq
    from hf_oscq.hub.model_card import render_card_files

    _, out = vit_export
    versions = {"hf_oscq": hf_oscq.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    assert json.loads((out / "oscq_export.json").read_text())["versions"] == versions
    with safe_open(str(out / "w3" / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert {key: metadata[f"{key}_version"] for key in versions} == versions
    assert json.loads((out / "w3" / "config.json").read_text())["quantization_config"]["versions"] == versions
    readme = render_card_files(out, "w3")["README.md"].decode()
    assert f"Exported with hf_oscq {versions['hf_oscq']}, torch {versions['torch']}, transformers " in readme


def _edit_header(path: Path, edit) -> None:
    """Rewrites the safetensors header of `path` with `edit(header)` applied, keeping the data and the checksum."""
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size :])


def _swap_entries(first: str, second: str):
    def edit(header):
        header[first], header[second] = header[second], header[first]

    return edit


def _set_field(name: str, field: str, value):
    def edit(header):
        header[name][field] = value

    return edit


LAYER = "vit.encoder.layer.0"


@pytest.mark.parametrize(
    "edit",
    [
        _swap_entries(f"{LAYER}.layernorm_before.weight", f"{LAYER}.layernorm_after.weight"),  # same dtype and shape
        _swap_entries(f"{LAYER}.attention.attention.query.weight", f"{LAYER}.attention.attention.key.weight"),
        _set_field(f"{LAYER}.intermediate.dense.weight_scale", "dtype", "I32"),  # the same 4 bytes read as an int
        _set_field(f"{LAYER}.layernorm_before.bias", "shape", [2, 16]),
    ],
    ids=["swap_norms", "swap_packed", "scale_dtype", "shape"],
)
def test_any_header_edit_is_refused(vit_export, tmp_path, edit):
    # Swapping two entries swaps their offsets: the names read each other's bytes. safetensors itself refuses
    # offsets that overlap or leave gaps.
    folder = _copy_variant(vit_export[1], tmp_path)
    path = folder / "model.safetensors"
    _edit_header(path, edit)
    with safe_open(str(path), "pt") as handle:  # still a valid safetensors file, now describing another model
        assert handle.metadata()["oscq_sha256"]
    with pytest.raises(CheckpointFormatError, match="header or tensor data does not match its checksum"):
        AutoModelForImageClassification.from_pretrained(folder)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_attention_heads", 2),  # same tensor shapes, another computation
        ("layer_norm_eps", 0.1),
        ("hidden_act", "relu"),
        ("qkv_bias", False),
        ("id2label", {"0": "c", "1": "b", "2": "a"}),
        ("torch_dtype", "float16"),
        ("new_field", 1),
    ],
)
def test_any_architecture_config_edit_is_refused(vit_export, tmp_path, field, value):
    folder = _copy_variant(vit_export[1], tmp_path)
    _edit_config(folder, **{field: value})
    with pytest.raises(CheckpointFormatError, match=rf"config.json field '{field}(\.\w+)?' is .*exported with"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_informational_config_fields_may_change(vit_export, tmp_path):
    model, out = vit_export
    folder = _copy_variant(out, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["versions"] = {"hf_oscq": "0.0"}
    (folder / "config.json").write_text(json.dumps(config))
    _edit_config(folder, transformers_version="0.0", _name_or_path="elsewhere")
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    pixel_values = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_oscq.quantize_model(model, 3)(pixel_values=pixel_values).logits
        assert_packed_close(loaded(pixel_values=pixel_values).logits, expected)


def _rewrite_tensors(folder: Path, change) -> None:
    """Applies `change(tensors)` and writes the file again with a valid checksum, as a faulty writer would."""
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors)
    (folder / "model.safetensors").write_bytes(
        serialize_checkpoint(tensors, 3, json.loads((folder / "config.json").read_text()))
    )


SCALE = f"{LAYER}.intermediate.dense.weight_scale"


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (torch.tensor(float("nan")), "holds NaN or Inf"),
        (torch.tensor(float("inf")), "holds NaN or Inf"),
        (torch.tensor(float("-inf")), "holds NaN or Inf"),
        (torch.tensor(-0.01), "holds a negative value"),
        (torch.tensor(0.0), "is 0 where its codes are not all 0"),
        (torch.tensor(1, dtype=torch.int32), "dtype I32; format version 2 stores scales as F32 or F64"),
        (torch.tensor(0.01, dtype=torch.bfloat16), "dtype BF16; format version 2 stores scales as F32 or F64"),
    ],
    ids=["nan", "inf", "-inf", "negative", "zero", "int32", "bfloat16"],
)
def test_any_invalid_scale_is_refused(vit_export, tmp_path, scale, message):
    folder = _copy_variant(vit_export[1], tmp_path)
    _rewrite_tensors(folder, lambda tensors: tensors.update({SCALE: scale}))
    with pytest.raises(CheckpointFormatError, match=rf"Scale '{SCALE}' in .*{message}"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_zero_scales_of_all_zero_weights_and_channels_load(tmp_path):
    from _export_models import tiny_vit

    model = tiny_vit()
    with torch.no_grad():
        model.get_parameter("vit.layers.0.mlp.fc1.weight").zero_()
        model.get_parameter("vit.layers.1.mlp.fc1.weight")[3].zero_()  # one channel
    for per_channel in (False, True):
        out = hf_oscq.export_quantized(model, tmp_path / f"out{per_channel}", bits=(3,), per_channel=per_channel)
        loaded = AutoModelForImageClassification.from_pretrained(out / "w3").eval()
        expected = hf_oscq.quantize_model(model, 3, per_channel=per_channel)
        pixel_values = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert_packed_close(loaded(pixel_values=pixel_values).logits, expected(pixel_values=pixel_values).logits)


@pytest.mark.parametrize("granularity", ["per_channel", "group"])
def test_a_zero_scale_over_codes_is_refused_for_gpt2_conv1d_columns_too(tmp_path, granularity):
    """The zero-scale check covers every layout: GPT-2's Conv1D (output channels in dim 1) per channel and
    group-wise, as Linear weights; an all-zero output column (scale 0 over zero codes) still loads."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=40, n_positions=16)).eval()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, 5] = 0.0  # output column 5 of a Conv1D (in=32, out=128)
    spec = hf_oscq.QuantSpec(3, granularity, group_size=8 if granularity == "group" else None)
    out = hf_oscq.export_quantized(model, tmp_path / "export", spec=spec)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_packed_close(
            AutoModelForCausalLM.from_pretrained(out / "w3")(ids).logits,
            hf_oscq.quantize_model(model, spec=spec)(ids).logits,
        )
    folder = _copy_variant(out, tmp_path)
    key = "transformer.h.0.attn.c_attn.weight_scale"

    def zero_column(tensors):
        scale = tensors[key].clone()
        scale.reshape(96, -1)[7] = 0.0  # every scale of output column 7, whose codes are not all 0
        tensors[key] = scale

    _rewrite_tensors(folder, zero_column)
    with pytest.raises(CheckpointFormatError, match=rf"Scale '{key}' in .* is 0 where its codes are not all 0"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop(f"{LAYER}.layernorm_before.bias"), r"no tensor for \['vit.layers.0.layernorm_before.bias'\]"),
        (lambda t: t.pop("classifier.bias"), r"no tensor for \['classifier.bias'\]"),
        (
            lambda t: t.update({"classifier.bias": t["classifier.bias"].view(torch.int32)}),
            r"'classifier.bias' .* has dtype I32, but the model's 'classifier.bias' needs a float dtype",
        ),
    ],
    ids=["missing_norm", "missing_head_bias", "integer_bias"],
)
def test_every_tensor_the_model_expects_is_present_with_its_dtype(vit_export, tmp_path, change, message):
    folder = _copy_variant(vit_export[1], tmp_path)
    _rewrite_tensors(folder, change)
    with pytest.raises(CheckpointFormatError, match=message):
        AutoModelForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize(
    "spec",
    [hf_oscq.QuantSpec(3, "per_channel"), hf_oscq.QuantSpec(3, "group", group_size=4)],
    ids=["channel", "group"],
)
def test_zero_scales_are_checked_in_every_layout(tmp_path, spec):
    """The zero-scale rule (a scale is 0 only over all-zero codes) holds for every layout, GPT-2's Conv1D (output
    channels in dim 1) included, where it was skipped: an all-zero output column loads, a zero scale over non-zero
    codes is refused instead of zeroing those weights."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from hf_oscq.export.checkpoint import SCALE_SUFFIX, read_config

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12, n_positions=8, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:, 3] = 0  # output feature 3: every input feature 0
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(3,), spec=spec)
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        expected = hf_oscq.quantize_model(model, spec=spec)(ids).logits
        assert_packed_close(AutoModelForCausalLM.from_pretrained(out / "w3")(ids).logits, expected)
    folder = _copy_variant(out, tmp_path)
    key = "h.0.attn.c_attn.weight" + SCALE_SUFFIX
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    key = next(name for name in tensors if name.endswith(key))
    assert tensors[key][3].eq(0).all() and tensors[key][4].gt(0).all()  # one scale row per output feature
    tensors[key][4] = 0
    (folder / "model.safetensors").write_bytes(serialize_checkpoint(tensors, 3, read_config(folder)))
    with pytest.raises(CheckpointFormatError, match="is 0 where its codes are not all 0"):
        AutoModelForCausalLM.from_pretrained(folder)
