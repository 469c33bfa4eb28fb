"""Pinned bytes of exports: digests of every tensor and of the format metadata of a few seeded tiny exports.

`tests/export/data/export_digests.json` was written by `python tests/_export_digests.py --write` with the writer at
commit 33cd5f5 (the export that packed its tensors by hand, before the packed-weight codec); the writer must keep
producing the same bytes for the same model. What is pinned, per checkpoint folder `w{b}`:

* every tensor of model.safetensors: name, dtype, shape and the SHA-256 of its bytes;
* the safetensors header without its metadata (tensor order and offsets) and the tensor data section, as SHA-256s;
* the metadata without the fields that name library versions (`hf_oscq_version`, `torch_version`,
  `transformers_version`), the checksum (`oscq_sha256`, a digest of a header that holds those versions) and the
  config record (`oscq_config`, checked against config.json by every load);
* the `quantization_config` of config.json without its `versions`; the rest of config.json must equal the `fp/`
  config.json of the same export with the guarded fields put back (so a transformers release that adds a config
  field does not move the pin);
* the SHA-256 of the whole model.safetensors with the library versions it was written with: compared only when the
  same versions run (the checksum in the header covers them; the config record covers config.json's guarded fields,
  whose message on how to install hf_oscq moves it too).

Weights are drawn from a seeded generator after the model is built, so that a change of a library's weight
initialization does not move the pin either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

import hf_oscq
from hf_oscq.versions import library_versions

DIGESTS = Path(__file__).resolve().parent / "export" / "data" / "export_digests.json"
UNPINNED_METADATA = ("hf_oscq_version", "torch_version", "transformers_version", "oscq_sha256", "oscq_config")


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fills every float parameter and buffer from a seeded generator (running variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1.5 + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
    )
    return _seeded(ViTForImageClassification(config), 1)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=48, n_positions=16, bos_token_id=0, eos_token_id=0)
    return _seeded(GPT2LMHeadModel(config), 2)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=16,
    )
    return _seeded(LlamaForCausalLM(config), 3)


def _resnet():
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(
        architecture="resnet18",
        num_labels=4,
        model_args={"channels": (8, 8, 16, 16), "stem_width": 8},
        pretrained_cfg=timm.models.get_pretrained_cfg("resnet18").to_dict(),
    )
    return _seeded(TimmWrapperForImageClassification(config), 4)


def _calibration():
    generator = torch.Generator().manual_seed(5)
    return [{"pixel_values": torch.randn(4, 3, 16, 16, generator=generator)} for _ in range(2)]


# name -> (model builder, export_quantized keyword arguments). Together: per-tensor, per-channel and group-wise
# scales; Linear, Conv2d and Embedding weights (out_dim 0) and GPT-2's Conv1D (out_dim 1); tied embeddings stored
# once (GPT-2 "all-layers"); BatchNorm statistics re-estimated with the quantized weights (ResNet-18).
CASES = {
    "vit_per_tensor": (_vit, {"bits": (2, 3, 4, 5, 6, 7, 8)}),
    "vit_per_channel": (_vit, {"bits": (3, 8), "per_channel": True}),
    "gpt2_all_layers_per_tensor": (_gpt2, {"bits": (3, 6), "target_modules": "all-layers"}),
    "gpt2_all_layers_group8": (
        _gpt2,
        {"bits": (2, 5), "spec": "group8_all_layers"},
    ),
    "gpt2_per_channel": (_gpt2, {"bits": (4, 7), "per_channel": True}),
    "llama_group16": (_llama, {"bits": (2, 3, 4, 8), "spec": "group16"}),
    "resnet18_batchnorm_per_channel": (
        _resnet,
        {"bits": (3, 4), "per_channel": True, "calibration_batches": "calibration"},
    ),
}


def export_case(name: str, root: Path) -> Path:
    """Exports case `name` into `root/name`; returns the export folder."""
    build, options = CASES[name]
    options = dict(options)
    spec = options.pop("spec", None)
    if spec == "group8_all_layers":
        options["spec"] = hf_oscq.QuantSpec(options["bits"][0], "group", ("all-layers",), group_size=8)
    elif spec == "group16":
        options["spec"] = hf_oscq.QuantSpec(options["bits"][0], "group", group_size=16)
    if options.get("calibration_batches") == "calibration":
        options["calibration_batches"] = _calibration()
    return hf_oscq.export_quantized(build(), root / name, **options)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def variant_digest(folder: Path) -> dict:
    """What is pinned of one `w{b}` folder (see the module docstring)."""
    blob = (folder / "model.safetensors").read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    metadata = header.pop("__metadata__")
    tensors = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            tensors[key] = {"dtype": str(tensor.dtype), "shape": list(tensor.shape), "sha256": _sha256(raw)}
    config = json.loads((folder / "config.json").read_text())
    quantization = dict(config["quantization_config"])
    quantization.pop("versions", None)
    return {
        "files": sorted(path.name for path in folder.iterdir()),
        "tensors": tensors,
        "header_sha256": _sha256(json.dumps(header, sort_keys=True).encode()),
        "data_sha256": _sha256(blob[8 + size :]),
        "metadata": {key: value for key, value in sorted(metadata.items()) if key not in UNPINNED_METADATA},
        "quantization_config": quantization,
        "file_sha256": _sha256(blob),
    }


def export_digest(export_dir: Path) -> dict:
    """`{variant: variant_digest}` for every `w{b}` folder of an export."""
    return {
        folder.name: variant_digest(folder)
        for folder in sorted(export_dir.iterdir())
        if folder.is_dir() and folder.name.startswith("w")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {DIGESTS}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        record = {
            "versions": library_versions(),
            "cases": {name: export_digest(export_case(name, Path(root))) for name in CASES},
        }
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.write:
        DIGESTS.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
