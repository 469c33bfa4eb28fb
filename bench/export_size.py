"""Checkpoint sizes of every w{b} export against fp32 and fp16, and export time for all seven bit-widths; for
language models, both export formats side by side (hf_oscq's and compressed-tensors'), with the weight bytes a loaded
model holds.

Models: timm's ResNet-18 through transformers' TimmWrapper (full size with the ImageNet stem, 10 classes, random
weights: sizes and times do not depend on the values) and the micro ViT of the digits demo, in hf_oscq's format; the
language-model recipe's tiny decoder (hidden size 128, 4 layers, byte-level vocabulary, tied embeddings) and a
Llama-style decoder of hidden size 1024 (2 layers, MLP 4096, 8192 tokens), group-wise (32 input features a scale,
the recipe's), in both formats. Held in memory: the bytes of the parameters and buffers of the w4 folder loaded with
transformers after one forward pass (compressed-tensors unpacks its weights to float on the first one). Writes
bench/results/export_size.json.

    python bench/export_size.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TimmWrapperForImageClassification, ViTForImageClassification

import hf_oscq
from hf_oscq.export.folder import weights_size
from hf_oscq.versions import library_versions

BITS = hf_oscq.DEFAULT_EVAL_BITS
RESULTS = Path(__file__).parent / "results" / "export_size.json"
LABELS = [str(i) for i in range(10)]


def resnet18() -> TimmWrapperForImageClassification:
    return hf_oscq.build_resnet18(hf_oscq.DATASETS["cifar10"], LABELS, cifar_stem=False).eval()


def tiny_vit() -> ViTForImageClassification:
    return hf_oscq.build_vit(hf_oscq.DATASETS["digits"], LABELS, size="micro").eval()


def measure(name: str, model, workdir: Path) -> dict:
    weights = hf_oscq.select_weights(model)
    quantized_fp32 = sum(w.numel() * 4 for w in weights.values())
    model.half().save_pretrained(workdir / f"{name}-fp16")
    fp16 = weights_size(workdir / f"{name}-fp16")
    model.float()
    start = time.perf_counter()
    # sizes only: BatchNorm re-estimation changes statistics, not bytes
    out = hf_oscq.export_quantized(model, workdir / name, bits=BITS, plain_rounding=True)
    seconds = time.perf_counter() - start
    sizes = json.loads((out / "oscq_export.json").read_text())["sizes_bytes"]
    fp32 = sizes["fp"]
    rows = {}
    for b in BITS:
        size = sizes[f"w{b}"]
        rows[f"w{b}"] = {
            "bytes": size,
            "vs_fp32": size / fp32,
            "vs_fp16": size / fp16,
            "quantized_tensors_vs_fp32": sum(hf_oscq.packed_size(w.numel(), b) for w in weights.values())
            / quantized_fp32,
        }
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_parameters": sum(w.numel() for w in weights.values()),
        "fp32_bytes": fp32,
        "fp16_bytes": fp16,
        "variants": rows,
        "export_seconds_all_bits": seconds,
    }


def lm_tiny():
    from hf_oscq.scripts.lm_recipe import LM_SIZES
    from hf_oscq.scripts.text import byte_tokenizer

    return _decoder(len(byte_tokenizer()), **LM_SIZES["tiny"])


def decoder_1024():
    return _decoder(8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16)


def _decoder(vocab_size: int, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, max_position_embeddings=256, **sizes)
    return LlamaForCausalLM(config).eval()


def held_bytes(folder: Path) -> int:
    """Bytes of the parameters and buffers of `folder` loaded with transformers, after one forward pass."""
    from transformers import AutoModelForCausalLM

    from hf_oscq.quantization.packed_tensor import PackedWeight

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        parts = [tensor.packed, tensor.scale] if isinstance(tensor, PackedWeight) else [tensor]
        for part in parts:
            if part.untyped_storage().data_ptr() not in seen:
                seen.add(part.untyped_storage().data_ptr())
                total += part.untyped_storage().nbytes()
    return total


def measure_formats(name: str, model, workdir: Path) -> dict:
    """Both formats of one language model at every bit-width, group-wise 32: bytes on disk, and held when loaded."""
    spec = hf_oscq.QuantSpec(BITS[0], "group", group_size=32)
    entry = {"parameters": sum(p.numel() for p in model.parameters()), "group_size": 32, "formats": {}}
    for format in hf_oscq.EXPORT_FORMATS:
        start = time.perf_counter()
        out = hf_oscq.export_quantized(model, workdir / f"{name}-{format}", bits=BITS, spec=spec, format=format)
        seconds = time.perf_counter() - start
        sizes = json.loads((out / "oscq_export.json").read_text())["sizes_bytes"]
        entry["fp32_bytes"] = sizes["fp"]
        entry["formats"][format] = {
            "variants": {f"w{b}": {"bytes": sizes[f"w{b}"], "vs_fp32": sizes[f"w{b}"] / sizes["fp"]} for b in BITS},
            "w4_held_bytes": held_bytes(out / "w4"),
            "export_seconds_all_bits": seconds,
        }
    entry["fp32_held_bytes"] = held_bytes(out / "fp")
    return entry


DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "EXPORT.md"
BEGIN = "<!-- BEGIN GENERATED: bench/export_size.py -->"
END = "<!-- END GENERATED: bench/export_size.py -->"


def formats_markdown(results: dict) -> str:
    """The language models' table of docs/EXPORT.md ("Deploy"): bytes on disk of each format at each bit-width as a
    fraction of fp32, and the weight bytes the loaded w4 holds in transformers."""
    bits = results["bits"]
    lines = [
        "| model | format | " + " | ".join(f"w{b}" for b in bits) + " | w4 held in transformers |",
        "|---|---|" + "---|" * (len(bits) + 1),
    ]
    for name, entry in results["language_models"].items():
        for format, row in entry["formats"].items():
            cells = [f"{row['variants'][f'w{b}']['vs_fp32']:.3f}" for b in bits]
            held = row["w4_held_bytes"] / entry["fp32_held_bytes"]
            lines.append(
                f"| {name} ({entry['parameters'] / 1e6:.1f}M) | {format} | " + " | ".join(cells) + f" | {held:.3f} |"
            )
    return "\n".join(lines)


def write_document(table: str, document: Path = DOCUMENT) -> None:
    """Puts `table` between the generated-block markers of `document`, keeping the text around them."""
    text = document.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{document} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    document.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    import compressed_tensors

    results = {
        "bits": list(BITS),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "versions": {**library_versions(), "compressed_tensors": compressed_tensors.__version__},
        "models": {},
        "language_models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("resnet18", resnet18), ("tiny_vit", tiny_vit)):
            results["models"][name] = measure(name, build(), Path(tmp))
        for name, build in (("lm_tiny", lm_tiny), ("decoder_1024", decoder_1024)):
            results["language_models"][name] = measure_formats(name, build(), Path(tmp))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for name, entry in results["models"].items():
        sys.stdout.write(
            f"{name}: fp32 {entry['fp32_bytes']} B, fp16 {entry['fp16_bytes']} B, "
            f"export of {len(BITS)} bit-widths {entry['export_seconds_all_bits']:.2f} s\n"
        )
        for variant, row in entry["variants"].items():
            sys.stdout.write(
                f"  {variant}: {row['bytes']} B = {row['vs_fp32']:.3f} x fp32, {row['vs_fp16']:.3f} x fp16 "
                f"(quantized tensors {row['quantized_tensors_vs_fp32']:.4f} x fp32)\n"
            )
    for name, entry in results["language_models"].items():
        sys.stdout.write(f"{name}: fp32 {entry['fp32_bytes']} B on disk, {entry['fp32_held_bytes']} B held\n")
        for format, row in entry["formats"].items():
            sizes = ", ".join(f"{v} {r['vs_fp32']:.3f}" for v, r in row["variants"].items())
            sys.stdout.write(
                f"  {format}: x fp32 on disk {sizes}; w4 held {row['w4_held_bytes']} B "
                f"({row['w4_held_bytes'] / entry['fp32_held_bytes']:.3f} x fp32)\n"
            )
    write_document(formats_markdown(results))
    sys.stdout.write(f"wrote {RESULTS} and the table of {DOCUMENT}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("export_size.py", main))
