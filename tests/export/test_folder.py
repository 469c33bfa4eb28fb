import json
from pathlib import Path

import pytest
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    GPT2Config,
    TimmWrapperForImageClassification,
)

from hf_oscq import ExportFolderError, QuantSpec, auto_class_for
from hf_oscq.export.folder import export_spec, read_manifest, task_for, variant_folders, variants

FORMAT1_EXPORT = Path(__file__).resolve().parent / "data" / "format1_vit"


def test_auto_class_is_decided_by_the_architecture():
    assert auto_class_for({"architectures": ["ViTForImageClassification"]}) is AutoModelForImageClassification
    assert auto_class_for({"architectures": [TimmWrapperForImageClassification.__name__]}) is (
        AutoModelForImageClassification
    )
    assert auto_class_for(GPT2Config(architectures=["GPT2LMHeadModel"])) is AutoModelForCausalLM  # by mapping
    assert auto_class_for({"architectures": ["LlamaForCausalLM"]}) is AutoModelForCausalLM
    assert task_for({"architectures": ["LlamaForCausalLM"]}) == ("text-generation", "AutoModelForCausalLM")
    assert auto_class_for({}) is AutoModel
    assert auto_class_for(FORMAT1_EXPORT / "w3") is AutoModelForImageClassification  # from the folder's config.json


def test_variants_and_spec_of_an_export(tmp_path):
    manifest = read_manifest(FORMAT1_EXPORT)
    assert variants(manifest) == ["fp", "w3"] and export_spec(manifest, 3) == QuantSpec(3)
    assert list(variant_folders(FORMAT1_EXPORT)) == ["fp", "w3"]
    assert variant_folders(FORMAT1_EXPORT / "w3") == {"w3": FORMAT1_EXPORT / "w3"}
    for name in ("w10", "w2", "fp", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert list(variant_folders(tmp_path)) == ["fp", "w2", "w10"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportFolderError, match="holds neither config.json nor fp/ or w{b}/"):
        variant_folders(tmp_path / "empty")


def test_manifest_of_another_format_names_the_version_that_wrote_it(tmp_path):
    (tmp_path / "oscq_export.json").write_text(json.dumps({"format_version": 3, "versions": {"hf_oscq": "0.9"}}))
    with pytest.raises(
        ExportFolderError, match=r"format_version 3; this hf_oscq reads versions 1, 2\. .*wrote it \(0\.9\)"
    ):
        read_manifest(tmp_path)
