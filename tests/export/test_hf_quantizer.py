import json
import math
from pathlib import Path

import pytest
import torch
from _export_models import assert_packed_close, logits_of, tiny_resnet18, tiny_vit
from _format1 import write_format1_checkpoint
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import EntryNotFoundError
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTModel,
)

import hf_oscq
from hf_oscq import OscqQuantizationConfig, OscqValueError, QuantSpec
from hf_oscq.export.checkpoint import SCALE_SUFFIX, CheckpointFormatError, read_config, serialize_checkpoint
from hf_oscq.quantization.packed_tensor import PackedWeight

FORMAT1_CONFIG = Path(__file__).resolve().parent / "data" / "format1_vit" / "w3" / "config.json"


def test_config_is_built_from_and_gives_back_the_spec():
    spec = QuantSpec(4, "per_channel", ("all-weights",), ("classifier",))
    config = OscqQuantizationConfig.from_spec(spec, ["vit.layers.0.mlp.fc1"], bn_recalibrated=True)
    assert config.spec == spec and config.per_channel is True and config.bits == 4
    written = config.to_dict()
    assert written["quant_method"] == "oscq" and "dequantize" not in written
    assert OscqQuantizationConfig.from_dict(json.loads(json.dumps(written))).spec == spec


def test_config_of_the_first_format_reads_as_a_spec():
    stored = json.loads(FORMAT1_CONFIG.read_text())["quantization_config"]
    assert "granularity" not in stored and "versions" not in stored
    config = OscqQuantizationConfig.from_dict(stored)
    assert config.spec == QuantSpec(3) and config.granularity == "per_tensor" and config.versions == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bits": 9}, "bits must be an integer between 2 and 8"),
        ({"granularity": "per_tensor", "per_channel": True}, "contradicts per_channel"),
        ({"granularity": "group", "group_size": 0}, "needs group_size, a positive integer"),
        ({"modules": []}, "`modules` must be a non-empty list"),
    ],
)
def test_invalid_configs_are_refused_naming_where_they_came_from(fields, message):
    """A bad value read from a checkpoint's config.json names config.json (a `CheckpointFormatError`); the same value
    passed as an argument names `OscqQuantizationConfig`, never config.json."""
    with pytest.raises(CheckpointFormatError, match=f"Invalid quantization_config in config.json: .*{message}"):
        OscqQuantizationConfig.from_dict({"quant_method": "oscq", "bits": 3, "modules": ["fc"], **fields})
    with pytest.raises(OscqValueError, match=f"^OscqQuantizationConfig: .*{message}") as raised:
        OscqQuantizationConfig(**{"bits": 3, "modules": ["fc"], **fields})
    assert not isinstance(raised.value, CheckpointFormatError) and "config.json" not in str(raised.value)


def test_a_config_of_another_format_version_is_refused():
    with pytest.raises(CheckpointFormatError, match=r"version 3.*wrote it \(9.0\)"):
        OscqQuantizationConfig(bits=3, modules=["fc"], format_version=3, versions={"hf_oscq": "9.0"})


# Loading exported folders through transformers: packed weights in memory, round trips, quantizing on load,
# dtypes, tied weights, backbone and new-head loads, `dequantize`, `pipeline`.

PIXELS = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tie_word_embeddings
    # "all-layers": the token embedding (tied to lm_head) quantized too, which a language model's default leaves out
    folder = tmp_path_factory.mktemp("gpt2") / "export"
    return model, hf_oscq.export_quantized(model, folder, bits=(3,), target_modules="all-layers")


def _file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def _packed_parameters(model) -> dict[str, PackedWeight]:
    return {name: p for name, p in model.named_parameters() if isinstance(p, PackedWeight)}


def _assert_same_tensors(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and first[key].shape == second[key].shape, key
        as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (first[key], second[key])]
        assert torch.equal(*as_bytes), key


def test_loaded_weights_stay_packed_and_take_b_over_32_of_fp32(vit_export):
    model, out = vit_export
    selected = hf_oscq.select_weights(model)
    for bits in (2, 3, 4, 8):
        loaded = AutoModelForImageClassification.from_pretrained(out / f"w{bits}")
        packed = _packed_parameters(loaded)
        assert loaded.is_quantized and len(packed) == len(selected)
        for name, weight in packed.items():
            assert weight.shape == selected[name].shape and weight.dtype == torch.float32 and weight.bits == bits
        # memory held: ceil(n * b / 8) code bytes plus one float32 scale per tensor, nothing else
        expected = sum(math.ceil(w.numel() * bits / 8) + 4 for w in selected.values())
        assert sum(weight.storage_bytes for weight in packed.values()) == expected
        fp32 = sum(4 * w.numel() for w in selected.values())
        assert expected <= fp32 * bits / 32 * 1.03
        assert_packed_close(logits_of(loaded, PIXELS), logits_of(hf_oscq.quantize_model(model, bits), PIXELS))


def test_save_pretrained_writes_the_same_tensors_and_config(vit_export, tmp_path):
    model, out = vit_export
    loaded = AutoModelForImageClassification.from_pretrained(out / "w3")
    loaded.save_pretrained(tmp_path / "saved")
    exported, exported_metadata = _file_tensors(out / "w3" / "model.safetensors")
    saved, saved_metadata = _file_tensors(tmp_path / "saved" / "model.safetensors")
    _assert_same_tensors(saved, exported)
    assert saved_metadata == exported_metadata  # format version, bit-width, checksum of the same tensor data
    assert json.loads((tmp_path / "saved/config.json").read_text()) == json.loads((out / "w3/config.json").read_text())
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    assert len(_packed_parameters(reloaded)) == len(_packed_parameters(loaded))
    torch.testing.assert_close(logits_of(reloaded, PIXELS), logits_of(loaded, PIXELS), rtol=0, atol=0)


def test_push_to_hub_uploads_the_packed_format(vit_export, monkeypatch):
    _, out = vit_export
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):  # the network call: keep what would be sent
        for operation in operations:
            uploaded[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()

    def load_card(*args, **kwargs):
        raise EntryNotFoundError("new repository")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", load_card)
    AutoModelForImageClassification.from_pretrained(out / "w3").push_to_hub("org/vit-w3")
    assert json.loads(uploaded["config.json"]) == json.loads((out / "w3/config.json").read_text())
    header = int.from_bytes(uploaded["model.safetensors"][:8], "little")
    exported = (out / "w3/model.safetensors").read_bytes()
    assert uploaded["model.safetensors"][8 + header :] == exported[8 + int.from_bytes(exported[:8], "little") :]


def test_quantize_on_load_equals_export_then_load(vit_export, tmp_path):
    model, out = vit_export
    config = OscqQuantizationConfig(bits=3)
    quantized = AutoModelForImageClassification.from_pretrained(out / "fp", quantization_config=config)
    assert len(_packed_parameters(quantized)) == len(hf_oscq.select_weights(model))
    exported = AutoModelForImageClassification.from_pretrained(out / "w3")
    torch.testing.assert_close(logits_of(quantized, PIXELS), logits_of(exported, PIXELS), rtol=0, atol=0)
    quantized.save_pretrained(tmp_path / "saved")
    _assert_same_tensors(_file_tensors(tmp_path / "saved/model.safetensors")[0],
                         _file_tensors(out / "w3/model.safetensors")[0])  # fmt: skip
    with pytest.raises(ValueError, match="needs a bit-width"):
        AutoModelForImageClassification.from_pretrained(out / "fp", quantization_config=OscqQuantizationConfig())


def test_dequantize_gives_the_plain_float_model(vit_export, tmp_path):
    model, out = vit_export
    loaded = AutoModelForImageClassification.from_pretrained(out / "w3")
    tensors, _ = _file_tensors(out / "w3" / "model.safetensors")
    dequantized = loaded.dequantize()
    assert not _packed_parameters(dequantized) and not hasattr(dequantized.config, "quantization_config")
    # independent of the runtime: the reference unpacking of the file's codes times the stored scale
    codes = hf_oscq.unpack_codes(tensors["vit.encoder.layer.0.intermediate.dense.weight"], 3, (37, 32))
    scale = tensors["vit.encoder.layer.0.intermediate.dense.weight" + SCALE_SUFFIX]
    weight = dequantized.get_parameter("vit.layers.0.mlp.fc1.weight")
    assert type(weight) is torch.nn.Parameter and torch.equal(weight.detach(), codes.float() * scale)
    direct = AutoModelForImageClassification.from_pretrained(
        out / "w3", quantization_config=OscqQuantizationConfig(dequantize=True)
    )
    assert not _packed_parameters(direct) and not getattr(direct, "is_quantized", False)
    for name, parameter in direct.named_parameters():
        assert torch.equal(parameter, dequantized.get_parameter(name)), name
    torch.testing.assert_close(
        logits_of(dequantized, PIXELS), logits_of(hf_oscq.quantize_model(model, 3), PIXELS), rtol=0, atol=0
    )
    dequantized.save_pretrained(tmp_path / "float")  # an ordinary float checkpoint now
    assert "quantization_config" not in json.loads((tmp_path / "float/config.json").read_text())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_floating_parameter_loads_in_the_requested_dtype(vit_export, dtype):
    _, out = vit_export
    loaded = AutoModelForImageClassification.from_pretrained(out / "w3", dtype=dtype)
    assert {p.dtype for p in loaded.parameters() if p.is_floating_point()} == {dtype}
    assert {b.dtype for b in loaded.buffers() if b.is_floating_point()} <= {dtype}
    logits = logits_of(loaded, PIXELS.to(dtype))
    assert logits.dtype == dtype and bool(torch.isfinite(logits).all())
    tensors, _ = _file_tensors(out / "w3" / "model.safetensors")
    codes = hf_oscq.unpack_codes(tensors["vit.encoder.layer.0.intermediate.dense.weight"], 3, (37, 32))
    scale = tensors["vit.encoder.layer.0.intermediate.dense.weight" + SCALE_SUFFIX]
    weight = loaded.get_parameter("vit.layers.0.mlp.fc1.weight")
    assert torch.equal(weight.dequantize(), (codes.float() * scale).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_export_loads_as_quantize_model(dtype, tmp_path):
    model = tiny_vit().to(dtype)
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(8,), per_channel=True)
    tensors, _ = _file_tensors(out / "w8" / "model.safetensors")
    assert {t.dtype for k, t in tensors.items() if k.endswith(SCALE_SUFFIX)} == {torch.float32}
    loaded = AutoModelForImageClassification.from_pretrained(out / "w8", dtype=dtype)
    expected = hf_oscq.quantize_model(model, 8, per_channel=True)
    for name, weight in _packed_parameters(loaded).items():
        assert torch.equal(weight.dequantize(), expected.get_parameter(name)), name
    pixels = PIXELS.to(dtype)
    torch.testing.assert_close(logits_of(loaded, pixels), logits_of(expected, pixels), rtol=0, atol=0)


def test_old_float16_scales_below_the_smallest_normal_are_refused(vit_export, tmp_path):
    _, out = vit_export
    folder = tmp_path / "w3"
    folder.mkdir()
    for path in (out / "w3").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors, _ = _file_tensors(out / "w3" / "model.safetensors")
    key = "vit.encoder.layer.0.intermediate.dense.weight" + SCALE_SUFFIX
    tensors[key] = torch.tensor(1e-6, dtype=torch.float16)  # what earlier exports stored for tiny float16 weights
    write_format1_checkpoint(folder, tensors, 3)
    with pytest.raises(CheckpointFormatError, match="below 6.1e-05"):
        AutoModelForImageClassification.from_pretrained(folder)
    (folder / "config.json").write_bytes((out / "w3" / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(serialize_checkpoint(tensors, 3, read_config(folder)))
    with pytest.raises(CheckpointFormatError, match=r"dtype F16; format version 2 stores scales as F32 or F64"):
        AutoModelForImageClassification.from_pretrained(folder)  # format version 2 never writes float16 scales


def test_tied_embeddings_are_stored_once_and_load_tied(gpt2_export, tmp_path):
    model, out = gpt2_export
    tensors, _ = _file_tensors(out / "w3" / "model.safetensors")
    assert not any(key.startswith("lm_head") for key in tensors)  # no float32 copy of the tied head
    assert tensors["transformer.wte.weight"].dtype == torch.uint8
    loaded = AutoModelForCausalLM.from_pretrained(out / "w3")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert isinstance(loaded.lm_head.weight, PackedWeight)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    expected = hf_oscq.quantize_model(model, 3, target_modules="all-layers")
    with torch.no_grad():
        assert_packed_close(loaded(ids).logits, expected(ids).logits)
        generated = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, expected.generate(ids[:1], max_new_tokens=4, do_sample=False))
    loaded.save_pretrained(tmp_path / "saved")
    _assert_same_tensors(_file_tensors(tmp_path / "saved/model.safetensors")[0], tensors)
    on_load = AutoModelForCausalLM.from_pretrained(
        out / "fp", quantization_config=OscqQuantizationConfig(bits=3, target_modules="all-layers")
    )
    assert on_load.lm_head.weight is on_load.transformer.wte.weight
    with torch.no_grad():
        assert_packed_close(on_load(ids).logits, expected(ids).logits)
    on_load.save_pretrained(tmp_path / "on_load")  # lists the tied weight once, as the file holds it
    assert (
        read_config(tmp_path / "on_load")["quantization_config"]["modules"]
        == read_config(out / "w3")["quantization_config"]["modules"]
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "on_load")
    with torch.no_grad():
        assert_packed_close(reloaded(ids).logits, expected(ids).logits)


def test_a_tied_llama_quantized_on_load_reloads_after_save_pretrained_from_every_save_path(tmp_path):
    """A Llama with `tie_word_embeddings=True` and `all-layers` (embedding and lm_head both selected, one tensor):
    every save path (export_quantized; save_pretrained of the exported model loaded; save_pretrained of the model
    quantized on load) writes a config listing what the file holds, and reloads to the same logits as
    `quantize_model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    out = hf_oscq.export_quantized(model, tmp_path / "export", bits=(3,), target_modules="all-layers")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_oscq.quantize_model(model, 3, target_modules="all-layers")(ids).logits
    on_load = AutoModelForCausalLM.from_pretrained(
        out / "fp", quantization_config=OscqQuantizationConfig(bits=3, target_modules="all-layers")
    )
    for name, saved in (("export", out / "w3"), ("exported_resaved", None), ("on_load", None)):
        if name == "exported_resaved":
            saved = tmp_path / name
            AutoModelForCausalLM.from_pretrained(out / "w3").save_pretrained(saved)
        elif name == "on_load":
            saved = tmp_path / name
            on_load.save_pretrained(saved)
        modules = read_config(saved)["quantization_config"]["modules"]
        packed = {key.removesuffix(".weight" + SCALE_SUFFIX) for key in _file_tensors(saved / "model.safetensors")[0]
                  if key.endswith(SCALE_SUFFIX)}  # fmt: skip
        assert set(modules) == packed and "lm_head" not in modules, name
        reloaded = AutoModelForCausalLM.from_pretrained(saved)
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight, name
        with torch.no_grad():
            assert_packed_close(reloaded(ids).logits, expected)


def test_backbone_and_new_head_load_as_from_a_float_checkpoint(vit_export):
    model, out = vit_export
    expected = hf_oscq.quantize_model(model, 3)
    backbone = AutoModel.from_pretrained(out / "w3")
    assert isinstance(backbone, ViTModel)
    assert isinstance(backbone.get_parameter("layers.0.mlp.fc1.weight"), PackedWeight)
    with torch.no_grad():
        assert_packed_close(
            backbone(pixel_values=PIXELS).last_hidden_state, expected.vit(pixel_values=PIXELS).last_hidden_state
        )
    new_head = AutoModelForImageClassification.from_pretrained(out / "w3", num_labels=5, ignore_mismatched_sizes=True)
    assert type(new_head.classifier.weight) is torch.nn.Parameter and new_head.classifier.weight.shape == (5, 32)
    assert isinstance(new_head.get_parameter("vit.layers.0.mlp.fc1.weight"), PackedWeight)
    assert logits_of(new_head, PIXELS).shape == (3, 5)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForImageClassification.from_pretrained(out / "w3", num_labels=5)


def test_timm_backbone_loads(tmp_path):
    model = tiny_resnet18()
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(3,), plain_rounding=True)
    backbone = AutoModel.from_pretrained(out / "w3")
    packed = _packed_parameters(backbone)
    assert "timm_model.conv1.weight" in packed and "timm_model.fc.weight" not in packed
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = backbone(pixel_values=pixels).pooler_output
        expected = hf_oscq.quantize_model(model, 3).timm_model.forward_head(
            hf_oscq.quantize_model(model, 3).timm_model.forward_features(pixels), pre_logits=True
        )
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_pipeline_runs_on_a_packed_model(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor, pipeline

    model = tiny_vit(num_channels=3)
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(3,), image_processor=processor)
    image = Image.fromarray((torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    packed = pipeline("image-classification", model=str(out / "w3"))
    assert isinstance(packed.model.get_parameter("vit.layers.0.mlp.fc1.weight"), PackedWeight)
    expected = pipeline("image-classification", model=hf_oscq.quantize_model(model, 3), image_processor=processor)
    assert packed(image) == expected(image)


@pytest.mark.parametrize(
    "spec", [QuantSpec(3, "group", group_size=8), QuantSpec(4, "per_channel")], ids=["group8", "per_channel"]
)
def test_gpt2_group_and_channel_scales_follow_conv1d_columns_through_export_and_load(gpt2_export, tmp_path, spec):
    model, _ = gpt2_export
    out = hf_oscq.export_quantized(model, tmp_path / "export", spec=spec)
    variant = out / f"w{spec.bits}"
    tensors, _ = _file_tensors(variant / "model.safetensors")
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in=32, out=96)
    groups = 32 // spec.group_size if spec.group_size else 1
    assert tensors["transformer.h.0.attn.c_attn.weight" + SCALE_SUFFIX].reshape(96, -1).shape == (96, groups)
    # the stored scale of output column c, group j is max |W[j*g:(j+1)*g, c]| / top
    top = 2 ** (spec.bits - 1) - 1
    want = c_attn.detach().T.reshape(96, groups, -1).abs().amax(dim=2) / top
    stored = tensors["transformer.h.0.attn.c_attn.weight" + SCALE_SUFFIX].reshape(96, groups)
    torch.testing.assert_close(stored, want, rtol=0, atol=0)
    assert json.loads((variant / "config.json").read_text())["quantization_config"]["scale_axis"] == "output"
    loaded = AutoModelForCausalLM.from_pretrained(variant)
    assert loaded.transformer.h[0].attn.c_attn.weight.out_dim == 1
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = hf_oscq.quantize_model(model, spec=spec)
    with torch.no_grad():
        assert_packed_close(loaded(ids).logits, expected(ids).logits)
    on_load = AutoModelForCausalLM.from_pretrained(
        out / "fp", quantization_config=OscqQuantizationConfig.from_spec(spec)
    )
    with torch.no_grad():
        assert_packed_close(on_load(ids).logits, expected(ids).logits)
    # a checkpoint written before scales followed Conv1D's output columns is refused, not misread
    config = json.loads((variant / "config.json").read_text())
    del config["quantization_config"]["scale_axis"]
    (variant / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="ran along its input features"):
        AutoModelForCausalLM.from_pretrained(variant)


def test_quantize_on_load_checks_every_setting_before_loading_and_names_the_argument(vit_export, tmp_path):
    """Quantize-on-load refuses before any weight is read, naming the argument: a group size that does not divide a
    layer's input features (the layer and its features named; transformers' generic conversion error before), and a
    weight holding NaN (named, raised as itself once loading is over)."""
    model, out = vit_export
    config = OscqQuantizationConfig(bits=3, granularity="group", group_size=16)
    with pytest.raises(OscqValueError) as raised:
        AutoModelForImageClassification.from_pretrained(out / "fp", quantization_config=config)
    assert str(raised.value).startswith(
        "from_pretrained(..., quantization_config=OscqQuantizationConfig(group_size=16)) does not divide the 37 input "
        "features of layer 'vit.layers.0.mlp.fc2' (weight shape [32, 37])"
    )
    broken = tiny_vit()
    with torch.no_grad():
        broken.get_parameter("vit.layers.1.mlp.fc1.weight")[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "nan")
    with pytest.raises(OscqValueError, match=r"Weight 'vit.(encoder.layer|layers).1.*' contains NaN or Inf"):
        AutoModelForImageClassification.from_pretrained(
            tmp_path / "nan", quantization_config=OscqQuantizationConfig(bits=3)
        )


def test_corrupted_codes_raise_the_loaders_error_from_from_pretrained(vit_export, tmp_path):
    """A packed weight whose codes no export writes fails `from_pretrained` with the loader's own
    `CheckpointFormatError` naming the weight, not transformers' generic "issues during automatic conversion"."""
    _, out = vit_export
    folder = tmp_path / "w3"
    folder.mkdir()
    for path in (out / "w3").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors, _ = _file_tensors(out / "w3" / "model.safetensors")
    tensors["classifier.weight"] = torch.full_like(tensors["classifier.weight"], 0xFF)
    (folder / "model.safetensors").write_bytes(serialize_checkpoint(tensors, 3, read_config(folder)))
    expected = "^The packed weight 'classifier.weight' is invalid: its codes hold the value 7"
    with pytest.raises(CheckpointFormatError, match=expected):
        AutoModelForImageClassification.from_pretrained(folder)


def test_quantize_on_load_of_a_batchnorm_model_follows_the_export_rule(tmp_path):
    """A BatchNorm model quantized on load is refused with the rule and message export uses (its statistics would be
    stale), naming the ways out; `plain_rounding=True` asks for plain rounding explicitly and gives
    `quantize_model`'s model, and the option is not saved."""
    from hf_oscq.quantization.batchnorm import batchnorm_refusal

    model = tiny_resnet18()
    model.save_pretrained(tmp_path / "fp")
    with pytest.raises(OscqValueError) as on_load:
        AutoModelForImageClassification.from_pretrained(
            tmp_path / "fp", quantization_config=OscqQuantizationConfig(bits=2)
        )
    with pytest.raises(OscqValueError) as exported:
        hf_oscq.export_quantized(model, tmp_path / "out", bits=(2,))
    rule = str(batchnorm_refusal("TimmWrapperForImageClassification", "")).rstrip()
    assert str(on_load.value).startswith(rule) and str(exported.value).startswith(rule)
    assert "plain_rounding=True" in str(on_load.value) and "hf-oscq export FOLDER --dataset NAME" in str(on_load.value)
    plain = AutoModelForImageClassification.from_pretrained(
        tmp_path / "fp", quantization_config=OscqQuantizationConfig(bits=2, plain_rounding=True)
    )
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert_packed_close(logits_of(plain, pixels), logits_of(hf_oscq.quantize_model(model, 2), pixels))
    assert "plain_rounding" not in plain.config.quantization_config.to_dict()


def _independent_bytes(model, bits: int, selected: dict, buffers: bool = True) -> int:
    """Bytes a packed model holds, counted from the float model: ceil(n * b / 8) code bytes and 4 bytes per float32
    scale for each packed weight, 4 bytes per element of every other distinct parameter (and buffer)."""
    total, seen = 0, set()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    if buffers:
        tensors |= dict(model.named_buffers())
    for name, tensor in tensors.items():
        if tensor.untyped_storage().data_ptr() in seen:
            continue  # tied weights: held once
        seen.add(tensor.untyped_storage().data_ptr())
        if name in selected:
            total += math.ceil(tensor.numel() * bits / 8) + 4  # one scale per tensor (the default spec)
        else:
            total += tensor.element_size() * tensor.numel()
    return total


def test_memory_footprint_counts_what_the_packed_weights_hold(vit_export, gpt2_export):
    """`get_memory_footprint()` (with and without buffers) and transformers' per-weight size estimate of loaded
    packed models: a ViT, and GPT-2 whose packed embedding is tied to lm_head (held once); back to the float size
    after `dequantize()`."""
    for (model, out), bits, auto, target in (
        (vit_export, 2, AutoModelForImageClassification, None),
        (vit_export, 5, AutoModelForImageClassification, None),
        (gpt2_export, 3, AutoModelForCausalLM, "all-layers"),
    ):
        if not (out / f"w{bits}").is_dir():
            continue
        loaded = auto.from_pretrained(out / f"w{bits}")
        selected = hf_oscq.select_weights(model, target_modules=target)
        assert loaded.get_memory_footprint() == _independent_bytes(model, bits, selected)
        assert loaded.get_memory_footprint(return_buffers=False) == _independent_bytes(model, bits, selected, False)
        float_bytes = _independent_bytes(model, 32, {})  # every weight 4 bytes an element
        assert loaded.get_memory_footprint() < float_bytes
        name = next(iter(selected))
        size = loaded.hf_quantizer.param_element_size(loaded, name, loaded.get_parameter(name))
        assert size == bits / 8
        assert loaded.dequantize().get_memory_footprint() == float_bytes


CASTS = {
    "half": (lambda m: m.half(), torch.float16),
    "float": (lambda m: m.float(), torch.float32),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "double": (lambda m: m.double(), torch.float64),
    "to(dtype)": (lambda m: m.to(torch.float16), torch.float16),
    "to(dtype=)": (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16),
    "type": (lambda m: m.type(torch.float16), torch.float16),
}


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_every_cast_method_keeps_the_weights_packed_and_gives_their_values_in_that_dtype(vit_export, cast):
    """`.half()`, `.float()`, `.bfloat16()`, `.double()` and `.to(dtype)` of a loaded packed model: each packed
    weight dequantizes to the file's codes times its scale (float32 product) in the new dtype, every other tensor is
    cast, and the logits are those of `quantize_model`'s model cast the same way."""
    model, out = vit_export
    apply, dtype = CASTS[cast]
    loaded = apply(AutoModelForImageClassification.from_pretrained(out / "w3"))
    tensors, _ = _file_tensors(out / "w3" / "model.safetensors")
    codes = hf_oscq.unpack_codes(tensors["vit.encoder.layer.0.intermediate.dense.weight"], 3, (37, 32))
    scale = tensors["vit.encoder.layer.0.intermediate.dense.weight" + SCALE_SUFFIX]
    weight = loaded.get_parameter("vit.layers.0.mlp.fc1.weight")
    assert isinstance(weight, PackedWeight) and weight.dtype == dtype and weight.scale.dtype == torch.float32
    assert torch.equal(weight.dequantize(), (codes.float() * scale).to(dtype))
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    expected = hf_oscq.quantize_model(model, 3).to(dtype)
    for name, parameter in loaded.named_parameters():
        if not isinstance(parameter, PackedWeight):
            assert torch.equal(parameter, expected.get_parameter(name)), name
    pixels = PIXELS.to(dtype)
    if dtype == torch.float32:  # the compiled kernels' summation order
        assert_packed_close(logits_of(loaded, pixels), logits_of(expected, pixels))
    else:  # other dtypes compute on the dequantized weights, as the float model does
        assert torch.equal(logits_of(loaded, pixels), logits_of(expected, pixels))


_LOAD_STATE_DICT = """
import json, sys
{first_import}
state = torch.load(sys.argv[1])  # torch's defaults: weights_only=True
from hf_oscq.quantization.packed_tensor import PackedWeight
packed = {{name: value for name, value in state.items() if isinstance(value, PackedWeight)}}
reference = torch.load(sys.argv[2])
print(json.dumps({{
    "packed": sorted(packed),
    "bits": sorted({{value.bits for value in packed.values()}}),
    "values": all(torch.equal(value.dequantize(), reference[name]) for name, value in packed.items()),
    "others": all(torch.equal(state[name], value) for name, value in reference.items() if name not in packed),
}}))
"""


def test_a_saved_state_dict_loads_with_torch_defaults_in_a_fresh_process(gpt2_export, tmp_path):
    """`torch.save(model.state_dict())` of a loaded packed model (tied packed embedding and lm_head) loads with
    `torch.load`'s defaults (weights_only=True) in a new process, whichever of torch and hf_oscq is imported first,
    and `load_state_dict` puts it back into a packed model."""
    import subprocess
    import sys

    _, out = gpt2_export
    loaded = AutoModelForCausalLM.from_pretrained(out / "w3")
    state = loaded.state_dict()
    torch.save(state, tmp_path / "packed.pt")
    torch.save(
        {k: v.dequantize() if isinstance(v, PackedWeight) else v for k, v in state.items()}, tmp_path / "values.pt"
    )
    for first_import in ("import hf_oscq, torch", "import torch, hf_oscq"):
        completed = subprocess.run(
            [sys.executable, "-c", _LOAD_STATE_DICT.format(first_import=first_import), str(tmp_path / "packed.pt"),
             str(tmp_path / "values.pt")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-2000:]
        seen = json.loads(completed.stdout.strip().splitlines()[-1])
        assert seen == {
            "packed": sorted(name for name, value in state.items() if isinstance(value, PackedWeight)),
            "bits": [3],
            "values": True,
            "others": True,
        }
    restored = AutoModelForCausalLM.from_pretrained(out / "w3")
    restored.load_state_dict(torch.load(tmp_path / "packed.pt"))
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, loaded(ids).logits)
