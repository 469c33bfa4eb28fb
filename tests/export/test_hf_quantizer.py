import json
from pathlib import Path

import pytest

from hf_oscq import OscqQuantizationConfig, QuantSpec
from hf_oscq.export.checkpoint import CheckpointFormatError

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
        ({"bits": 9}, "Invalid quantization_config in config.json: bits must be an integer between 2 and 8"),
        ({"granularity": "per_tensor", "per_channel": True}, "contradicts per_channel"),
        ({"modules": []}, "`modules` must be a non-empty list"),
        ({"format_version": 2, "versions": {"hf_oscq": "9.0"}}, r"version 2.*wrote it \(9.0\)"),
    ],
)
def test_invalid_configs_are_refused(fields, message):
    with pytest.raises(CheckpointFormatError, match=message):
        OscqQuantizationConfig(**{"bits": 3, "modules": ["fc"], **fields})
