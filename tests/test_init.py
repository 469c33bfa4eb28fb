"""`import hf_oscq`: light (no heavy module), every public name resolvable, and the loader, the image processor and
timm models registered as soon as transformers' registries and timm are imported later. (The other order, hf_oscq
imported after both, is checked with loading in tests/export/test_checkpoint.py, in its process that first loads
without hf_oscq.)"""

import json
import subprocess
import sys

import pytest

import hf_oscq

HEAVY = ("datasets", "timm", "torchvision", "matplotlib", "jinja2", "pandas", "gradio", "sklearn", "tensorboard")


def _run(lines: list[str]) -> dict:
    code = "\n".join(["import json, sys", "seen = {}", *lines, "print(json.dumps(seen))"])
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_import_is_light_and_registers_when_transformers_and_timm_come_later():
    seen = _run(
        [
            "import hf_oscq",
            f"seen['heavy'] = [m for m in {HEAVY!r} if m in sys.modules]",
            "seen['torch'] = 'torch' in sys.modules",
            "from hf_oscq.cli import build_parser",
            "build_parser()",
            "seen['cli'] = sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules)",
            "from transformers.quantizers import auto",
            "Q, C = auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING",
            "seen['registered'] = [Q['oscq'].__name__, C['oscq'].__name__]",
            "seen['timm_before'] = 'timm' in sys.modules",
            "import timm",
            "seen['timm_model'] = timm.is_model('resnet18_cifar')",
            "from transformers.models.auto import image_processing_auto as ipa",
            "seen['image_processor'] = ipa.get_image_processor_class_from_name('OscqImageProcessor').__name__",
        ]
    )
    assert seen == {
        "heavy": [],
        "torch": False,
        "cli": [],
        "registered": ["OscqHfQuantizer", "OscqQuantizationConfig"],
        "timm_before": False,
        "timm_model": True,
        "image_processor": "OscqImageProcessor",
    }


def test_public_names_resolve_and_are_listed():
    assert hf_oscq.__version__ == "0.1.0"
    for name in hf_oscq.__all__:
        assert getattr(hf_oscq, name) is not None, name
    assert set(hf_oscq.__all__) <= set(dir(hf_oscq))
    assert hf_oscq.quantize_model.__module__ == "hf_oscq.quantization.ptq"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hf_oscq.not_a_name  # noqa: B018


def test_every_source_folder_is_a_package_the_build_finds():
    from pathlib import Path

    from setuptools import find_packages

    root = Path(hf_oscq.__file__).resolve().parent
    folders = {p.parent for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    expected = sorted(".".join(("hf_oscq", *folder.relative_to(root).parts)) for folder in folders)
    assert sorted(find_packages(root.parent, include=["hf_oscq*"])) == expected
    assert (root / "templates" / "model_card.md").is_file() and (root / "templates" / "trainer_card.md").is_file()
