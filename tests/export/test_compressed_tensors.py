"""`export_quantized(..., format="compressed-tensors")` (hf_oscq/export/compressed_tensors.py): folders that
transformers loads with the compressed-tensors package, in a process that never imports hf_oscq, with exactly
`quantize_model`'s logits.

Coverage of the round trip (one subprocess, tests/_ct_loader.py, loads every folder; it fails if any hf_oscq module
was imported):
* a tiny Llama with tied input / output embeddings (hidden size 32): group-wise (16) at every bit-width 2..8,
  per-channel at 3, 4 and 6 bits, per-tensor at 2, 5 and 8 bits (every bit-width in two granularities), one weight row
  all zeros (an all-zero scale group); greedy `generate` and the text-generation `pipeline`;
* GPT-2 with an untied `lm_head` (its only Linear layer: every block is a Conv1D), group-wise at every bit-width 2..8;
* the tiny ViT without its patch-embedding convolution, per-channel at every bit-width 2..8, and the
  image-classification `pipeline` with its saved image processor;
* timm's ResNet-18 through transformers' TimmWrapper (checkpoint names without the `timm_model.` prefix), its
  classifier `fc` per-tensor at every bit-width 2..8, BatchNorm statistics re-estimated after rounding.

What the format or its loaders cannot hold is refused before anything is written, each with one line naming the
layers and the way out: convolutions (ResNet-18's and the ViT's default selection), GPT-2's Conv1D, embeddings (a
language model's "all-layers"), a Linear weight tied to the embeddings (GPT-2's and the Llama's `lm_head`), the timm
architecture only hf_oscq defines (`resnet18_cifar`), an unknown format, a missing compressed-tensors package.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _export_models import tiny_gpt2, tiny_llama, tiny_resnet18, tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import ViTImageProcessor

import hf_oscq

pytest.importorskip("compressed_tensors", reason="compressed-tensors (Python >= 3.11, extra 'serve') is not installed")
from hf_oscq.errors import OscqValueError
from hf_oscq.export import compressed_tensors
from hf_oscq.export.folder import ExportFolderError, read_export_manifest, verify_checkpoint_folder
from hf_oscq.export.formats import COMPRESSED_TENSORS_FORMAT
from hf_oscq.quantization.primitives import quantize_codes
from hf_oscq.scripts.text import byte_tokenizer

CT = COMPRESSED_TENSORS_FORMAT
LOADER = Path(__file__).resolve().parents[1] / "_ct_loader.py"
PROMPT = "And God said"
GENERATED_TOKENS = 6
LLAMA_EXPORTS = {  # granularity -> (group size, bit-widths)
    "group": (16, (2, 3, 4, 5, 6, 7, 8)),
    "per_channel": (None, (3, 4, 6)),
    "per_tensor": (None, (2, 5, 8)),
}


def _spec(bits, granularity="per_tensor", group_size=None, target=None, exclude=None):
    return hf_oscq.QuantSpec(bits, granularity, target, exclude, group_size)


EVERY_BIT_WIDTH = tuple(range(2, 9))


def _packed_keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return sorted(key for key in handle.keys() if key.endswith(".weight_packed"))


class _Cases:
    """The exports, their inputs and hf_oscq's logits, written for the loader process."""

    def __init__(self, root: Path):
        self.root, self.cases, self.expected, self.exports = root, [], {}, {}

    def add(self, name, model, out, spec, bits, auto_class, inputs, calibration=None, **extra):
        with torch.no_grad():
            reference = hf_oscq.quantize_model(model, spec=spec.with_bits(bits), calibration_batches=calibration)
            self.expected[name] = reference(**inputs).logits
            self.expected[name + "/fp"] = model(**inputs).logits
            if extra.get("generate"):
                tokens = reference.generate(inputs["input_ids"], max_new_tokens=extra["generate"], do_sample=False)
                self.expected[name + "/generated"] = tokens[0]
        path = self.root / f"{name.replace('/', '_')}.safetensors"
        save_file({key: value.contiguous() for key, value in inputs.items()}, str(path))
        folder = out / f"w{bits}"
        self.cases.append(
            {"name": name, "folder": str(folder), "auto_class": auto_class, "inputs": str(path), **extra}
        )
        self.exports[name] = (model, folder, spec.with_bits(bits))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Exports every model, then loads them all in one process without hf_oscq: `(cases, results, logits)`."""
    root = tmp_path_factory.mktemp("ct")
    cases = _Cases(root)
    tokenizer = byte_tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]

    llama = tiny_llama()
    with torch.no_grad():
        llama.model.layers[0].self_attn.q_proj.weight[3].zero_()  # an all-zero scale group at every granularity
    for granularity, (group_size, widths) in LLAMA_EXPORTS.items():
        spec = _spec(widths[0], granularity, group_size)
        out = hf_oscq.export_quantized(
            llama, root / f"llama_{granularity}", bits=widths, spec=spec, tokenizer=tokenizer, format=CT
        )
        for bits in widths:
            extra = {}
            if granularity == "group" and bits == 4:
                extra = {"generate": GENERATED_TOKENS, "pipeline": "text-generation", "prompt": PROMPT}
            name = f"llama/{granularity}/w{bits}"
            cases.add(name, llama, out, spec, bits, "AutoModelForCausalLM", {"input_ids": ids}, **extra)

    gpt2 = tiny_gpt2(tie_word_embeddings=False)
    spec = _spec(4, "group", 16, target="lm_head")
    out = hf_oscq.export_quantized(gpt2, root / "gpt2", bits=EVERY_BIT_WIDTH, spec=spec, format=CT)
    gpt2_ids = torch.tensor([[1, 7, 3, 9, 4]])
    for bits in EVERY_BIT_WIDTH:
        cases.add(f"gpt2/w{bits}", gpt2, out, spec, bits, "AutoModelForCausalLM", {"input_ids": gpt2_ids})

    vit = tiny_vit(num_channels=3)
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    spec = _spec(2, "per_channel", exclude="projection")
    out = hf_oscq.export_quantized(
        vit, root / "vit", bits=EVERY_BIT_WIDTH, spec=spec, image_processor=processor, format=CT
    )
    from PIL import Image

    image_path = root / "image.png"
    pixels = torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(image_path)
    inputs = {"pixel_values": processor(images=Image.open(image_path), return_tensors="pt")["pixel_values"]}
    for bits in EVERY_BIT_WIDTH:
        extra = {"pipeline": "image-classification", "image": str(image_path)} if bits == 6 else {}
        cases.add(f"vit/w{bits}", vit, out, spec, bits, "AutoModelForImageClassification", inputs, **extra)

    resnet = tiny_resnet18()
    calibration = [
        {"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(s))} for s in (3, 4)
    ]
    spec = _spec(3, target="fc")
    out = hf_oscq.export_quantized(
        resnet, root / "resnet", bits=EVERY_BIT_WIDTH, spec=spec, calibration_batches=calibration, format=CT
    )
    pixel_values = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))}
    for bits in EVERY_BIT_WIDTH:
        cases.add(
            f"resnet/w{bits}", resnet, out, spec, bits, "AutoModelForImageClassification", pixel_values, calibration
        )

    (root / "cases.json").write_text(json.dumps(cases.cases))
    results_path = root / "results.json"
    done = subprocess.run(
        [sys.executable, str(LOADER), str(root / "cases.json"), str(results_path), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cases, json.loads(results_path.read_text()), load_file(str(results_path.with_suffix(".safetensors")))


def test_loading_process_never_imports_hf_oscq(loaded):
    _, results, _ = loaded
    assert results["hf_oscq_modules"] == []


def test_every_folder_loads_with_quantize_model_logits_exactly(loaded):
    """Every case of the module docstring: the loaded logits equal hf_oscq's bit for bit, the rounding changed them
    (they differ from full precision), and compressed-tensors quantized exactly the exported modules on load."""
    cases, results, logits = loaded
    assert len(cases.cases) == sum(len(widths) for _, widths in LLAMA_EXPORTS.values()) + 3 * len(EVERY_BIT_WIDTH)
    for case in cases.cases:
        name = case["name"]
        assert torch.equal(logits[name], cases.expected[name]), name
        assert not torch.equal(cases.expected[name], cases.expected[name + "/fp"]), name
        model, folder, spec = cases.exports[name]
        selected = [key.removesuffix(".weight") for key in hf_oscq.select_weights(model, spec=spec)]
        assert results[name]["quantized_modules"] == sorted(selected), name


def test_generate_and_text_generation_pipeline_match_hf_oscq(loaded):
    """Greedy decoding of the loaded w4 equals hf_oscq's quantized model token for token; the pipeline's text is the
    prompt and those tokens, decoded by the tokenizer saved in the folder."""
    cases, results, _ = loaded
    name = "llama/group/w4"
    expected = cases.expected[name + "/generated"].tolist()
    prompt = byte_tokenizer()(PROMPT)["input_ids"]
    assert expected[: len(prompt)] == prompt and len(expected) > len(prompt)
    assert results[name]["generated"] == expected
    assert results[name]["pipeline"] == byte_tokenizer().decode(expected, skip_special_tokens=True)


def test_image_classification_pipeline_scores_hf_oscq_logits(loaded):
    cases, results, _ = loaded
    probabilities = cases.expected["vit/w6"][0].softmax(-1)
    model = cases.exports["vit/w6"][0]
    top = probabilities.topk(3)
    expected = [(model.config.id2label[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
    got = [(row["label"], row["score"]) for row in results["vit/w6"]["pipeline"]]
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], rel=1e-6)


def test_folders_hold_packed_codes_of_the_format(loaded):
    """Each quantized Linear is stored as compressed-tensors' three tensors: int32 words holding the codes
    `quantize_codes` gives (unpacked by compressed-tensors' own helper), the scales (1 for an all-zero group) and the
    weight's shape; config.json carries compressed-tensors' quantization_config with the spec's strategy, group size
    and bit-width and the float Linear layers in `ignore`."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    cases, _, _ = loaded
    strategies = {"per_tensor": "tensor", "per_channel": "channel", "group": "group"}
    for name in ("llama/group/w3", "llama/per_channel/w6", "llama/per_tensor/w5", "gpt2/w7", "resnet/w3"):
        model, folder, spec = cases.exports[name]
        quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert quantization["quant_method"] == CT and quantization["format"] == "pack-quantized"
        assert quantization["quantization_status"] == "compressed"
        (group,) = quantization["config_groups"].values()
        assert group["targets"] == ["Linear"] and group["input_activations"] is None
        wanted = {
            "num_bits": spec.bits,
            "type": "int",
            "symmetric": True,
            "strategy": strategies[spec.granularity],
            "group_size": spec.group_size,
            "dynamic": False,
        }
        assert {key: group["weights"][key] for key in wanted} == wanted
        selected = hf_oscq.select_weights(model, spec=spec)
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        assert quantization["ignore"] == [n for n in linear if f"{n}.weight" not in selected]
        tensors = load_file(str(folder / "model.safetensors"))
        for weight_name, weight in selected.items():
            stored = weight_name.removeprefix("timm_model.").removesuffix(".weight")
            codes, scale = quantize_codes(weight, spec=spec, out_dim=0)
            assert tensors[f"{stored}.weight_packed"].dtype == torch.int32
            assert tensors[f"{stored}.weight_shape"].tolist() == list(weight.shape)
            unpacked = unpack_from_int32(tensors[f"{stored}.weight_packed"], spec.bits, weight.shape)
            assert torch.equal(unpacked, codes)
            assert codes.abs().max() <= spec.max_code  # hf_oscq's grid, one level short of the format's lowest
            stored_scale = tensors[f"{stored}.weight_scale"].reshape(-1)
            assert torch.equal(stored_scale, torch.where(scale == 0, 1.0, scale).reshape(-1))
            assert f"{stored}.weight" not in tensors


def test_all_zero_scale_group_is_stored_with_scale_one(loaded):
    cases, _, _ = loaded
    _, folder, spec = cases.exports["llama/per_channel/w4"]
    tensors = load_file(str(folder / "model.safetensors"))
    scale = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert scale.shape == (32, 1) and scale[3].item() == 1.0 and (scale[torch.arange(32) != 3] < 1).all()


def test_manifest_records_the_format_and_versions_and_push_checks_accept_it(loaded):
    cases, _, _ = loaded
    out = cases.exports["llama/group/w4"][1].parent
    manifest = read_export_manifest(out)
    assert manifest["format"] == CT and manifest["group_size"] == 16 and manifest["bits"] == [2, 3, 4, 5, 6, 7, 8]
    import compressed_tensors as library

    assert manifest["versions"]["compressed_tensors"] == library.__version__
    for variant in ("fp", "w2", "w7"):
        verify_checkpoint_folder(out / variant)
    from hf_oscq.hub.push import plan_push

    plan = plan_push(cases.exports["gpt2/w4"][1].parent, "me/tiny-gpt2")  # every folder checked, cards rendered
    assert [repo.repo_id for repo in plan.repos] == ["me/tiny-gpt2", *(f"me/tiny-gpt2-w{b}" for b in EVERY_BIT_WIDTH)]
    files = {planned.path_in_repo for planned in plan.repos[1].files}
    assert {"README.md", "config.json", "model.safetensors"} <= files


def _copy_export(out: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(out, tmp_path / out.name))


def test_folder_checks_catch_a_damaged_compressed_tensors_export(loaded, tmp_path):
    cases, _, _ = loaded
    out = _copy_export(cases.exports["gpt2/w4"][1].parent, tmp_path)
    weights = out / "w4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportFolderError, match="does not match its checksum"):
        verify_checkpoint_folder(out / "w4")
    config_path = out / "w7" / "config.json"
    config = json.loads(config_path.read_text())
    config["n_embd"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportFolderError, match="field 'n_embd' is 64"):
        verify_checkpoint_folder(out / "w7")
    config["n_embd"] = 32
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportFolderError, match="says num_bits 3, expected 7"):
        read_export_manifest(out)


def test_cards_say_which_stack_loads_each_format(loaded):
    from hf_oscq.hub.model_card import render_model_card

    cases, _, _ = loaded
    out = cases.exports["llama/group/w4"][1].parent
    w4 = str(render_model_card(out, "w4", repo_id="me/tiny-llama"))
    assert "pip install transformers compressed-tensors" in w4 and "import hf_oscq" not in w4
    assert "compressed-tensors `pack-quantized`" in w4 and "vllm serve me/tiny-llama-w4" in w4
    assert "- compressed-tensors" in w4  # the Hub tag
    assert "vllm serve" not in str(render_model_card(out, "w3"))  # vLLM's kernels take 4 and 8 bits
    per_tensor = cases.exports["llama/per_tensor/w8"][1].parent
    assert "vllm serve" not in str(render_model_card(per_tensor, "w8"))  # and per-channel or group-wise scales
    fp = str(render_model_card(out, "fp"))
    assert "The quantized versions of this model are in the\ncompressed-tensors format" in fp
    assert "pip install transformers compressed-tensors" in fp and "import hf_oscq" not in fp
    resnet = str(render_model_card(cases.exports["resnet/w3"][1].parent, "w3"))
    assert "import hf_oscq" not in resnet and "`fc`" in resnet


@pytest.mark.parametrize(
    ("build", "spec", "message"),
    [
        (tiny_resnet18, _spec(3), r"21 selected layers are not Linear: timm_model.conv1 \(Conv2d\)"),
        (tiny_vit, _spec(3), r"1 selected layer is not Linear: vit.embeddings.patch_embeddings.projection \(Conv2d\)"),
        (tiny_gpt2, _spec(3), r"8 selected layers are not Linear: transformer.h.0.attn.c_attn \(Conv1D\)"),
        (tiny_gpt2, _spec(3, target="all-layers"), r"layers are not Linear: transformer.wte \(Embedding\)"),
        (
            tiny_llama,
            _spec(3, target="all-layers"),
            r"1 selected layer is not Linear: model.embed_tokens \(Embedding\)",
        ),
        (tiny_gpt2, _spec(3, target="lm_head"), r"The weight of lm_head and transformer.wte is one tied parameter"),
        (
            tiny_llama,
            _spec(3, target="lm_head"),
            r"The weight of lm_head and model.embed_tokens is one tied parameter",
        ),
    ],
)
def test_what_the_format_cannot_hold_is_refused_and_nothing_is_written(tmp_path, build, spec, message):
    """Conv2d (ResNet-18, the ViT's patch embedding), GPT-2's Conv1D, Embedding and a Linear tied to an embedding:
    one line naming the layers and `exclude_modules`; the output folder is not created and no staging is left."""
    with pytest.raises(OscqValueError, match=message) as caught:
        hf_oscq.export_quantized(build(), tmp_path / "out", bits=(3,), spec=spec, plain_rounding=True, format=CT)
    text = str(caught.value)
    assert "\n" not in text and ("exclude_modules=[...]" in text) and "format='oscq'" in text
    assert list(tmp_path.iterdir()) == []


def test_a_refused_or_failed_export_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    model = tiny_llama()
    out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(3,), format=CT)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OscqValueError, match="not Linear"):
        hf_oscq.export_quantized(model, out, bits=(4,), spec=_spec(4, target="all-layers"), format=CT)
    calls = []

    def fail_on_second_bit_width(weight, spec, scheme):
        calls.append(spec.bits)
        if spec.bits == 5:
            raise RuntimeError("disk full")
        return compress(weight, spec, scheme)

    compress = compressed_tensors.compress_weight
    monkeypatch.setattr(compressed_tensors, "compress_weight", fail_on_second_bit_width)
    with pytest.raises(RuntimeError, match="disk full"):
        hf_oscq.export_quantized(model, out, bits=(4, 5), format=CT)
    assert 4 in calls and 5 in calls
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cifar_resnet_architecture_only_hf_oscq_defines_is_refused(tmp_path):
    model = tiny_resnet18()
    model.config.architecture = "resnet18_cifar"
    with pytest.raises(OscqValueError, match="'resnet18_cifar', an architecture hf_oscq defines"):
        hf_oscq.export_quantized(
            model, tmp_path / "out", bits=(3,), spec=_spec(3, target="fc"), plain_rounding=True, format=CT
        )


def test_unknown_format_and_missing_library_are_one_line_errors(tmp_path, monkeypatch):
    model = tiny_llama()
    with pytest.raises(OscqValueError, match="Unknown export format 'gguf'"):
        hf_oscq.export_quantized(model, tmp_path / "out", bits=(3,), format="gguf")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(OscqValueError, match=r"pip install compressed-tensors \(or hf_oscq\[serve\]\)"):
        hf_oscq.export_quantized(model, tmp_path / "out", bits=(3,), format=CT)
    assert not (tmp_path / "out").exists()


def test_half_precision_model_is_exported_with_a_warning(tmp_path, caplog):
    model = tiny_llama().to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="hf_oscq.export.compressed_tensors"):
        out = hf_oscq.export_quantized(model, tmp_path / "out", bits=(4,), format=CT)
    assert "torch.bfloat16" in caplog.text and "rounding of each scale" in caplog.text
    assert len(_packed_keys(out / "w4")) == 14


def test_recipes_refuse_a_model_the_format_cannot_hold_before_training():
    from hf_oscq.export.compressed_tensors import check_export_fits

    check_export_fits(tiny_resnet18(), _spec(3), "oscq")  # hf_oscq's format holds every layer type
    check_export_fits(tiny_llama(), _spec(3), CT)  # the decoder's Linear layers
    with pytest.raises(OscqValueError, match="not Linear"):
        check_export_fits(tiny_resnet18(), _spec(3), CT)
