"""A small real export folder for the hub and model-card tests: a tiny seeded ResNet, evaluated, exported at 3 bits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import ResNetConfig, ResNetForImageClassification

import hf_oscq

BITS = (2, 3, 4)
# what the fixture's metrics are measured on: 64 random images, plain rounding
PROVENANCE = hf_oscq.Provenance("accuracy", "digits", "test", examples=64, batchnorm="plain")
TRAINING = {
    "osc_method": "oscillation",
    "osc_bits": 3,
    "osc_lambda": 1.0,
    "dataset": "digits",
    "model": "ResNet (2 stages, 8 and 16 channels)",
    "hyperparameters": {"learning_rate": 0.003, "num_train_epochs": 15, "per_device_train_batch_size": 64, "seed": 0},
    "command": "python recipes/train_vit.py --config recipes/configs/digits_demo.yaml",
}


def tiny_model() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return ResNetForImageClassification(config).eval()


def _accuracy_on(inputs: torch.Tensor, labels: torch.Tensor):
    def evaluate(model) -> dict[str, float]:
        with torch.no_grad():
            return {"accuracy": float((model(pixel_values=inputs).logits.argmax(-1) == labels).float().mean())}

    return evaluate


def _write_by_contract(model, root: Path, bits, metrics, training, comparisons) -> None:
    """The contract's folder layout, written with core functions (used until hf_oscq.export_quantized exists)."""
    model.save_pretrained(root / "fp")
    modules = [name.removesuffix(".weight") for name in hf_oscq.select_weights(model)]
    for b in bits:
        folder = root / f"w{b}"
        hf_oscq.quantize_model(model, b).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "oscq",
            "bits": b,
            "per_channel": False,
            "modules": modules,
            "format_version": 1,
            "bn_recalibrated": False,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    sizes = {v: sum(p.stat().st_size for p in (root / v).iterdir()) for v in ["fp"] + [f"w{b}" for b in bits]}
    manifest = {
        "format_version": 1,
        "bits": list(bits),
        "per_channel": False,
        "target_modules": None,
        "exclude_modules": None,
        "bn_recalibrated": False,
        "sizes_bytes": sizes,
        "metrics": metrics,
        "training": training,
        "comparisons": comparisons,
    }
    (root / "oscq_export.json").write_text(json.dumps(manifest, indent=2))


def build_export(root: Path, with_results: bool = True, bits: tuple[int, ...] = BITS) -> Path:
    """Exports the tiny model to `root`; with `with_results`, measured cross-bit metrics, comparisons and recipe."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    evaluate = _accuracy_on(inputs, labels)
    metrics = hf_oscq.cross_bit_evaluate(model, evaluate, bits=bits) if with_results else None
    comparisons = None
    if with_results:
        baseline = tiny_model()
        with torch.no_grad():
            baseline.classifier[1].weight.mul_(-1)  # a different model with the same architecture
        comparisons = {"qat": hf_oscq.cross_bit_evaluate(baseline, evaluate, bits=bits), "fp_ptq": metrics}
    training = TRAINING if with_results else None
    if hasattr(hf_oscq, "export_quantized"):
        # plain rounding, like the metrics above (the model has BatchNorm)
        hf_oscq.export_quantized(
            model,
            root,
            bits=bits,
            metrics=metrics,
            training=training,
            comparisons=comparisons,
            plain_rounding=True,
            provenance=PROVENANCE if with_results else None,
        )
    else:
        _write_by_contract(model, root, bits, metrics, training, comparisons)
    return root
