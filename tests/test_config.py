import pytest
from transformers import HfArgumentParser

from hf_oscq import OscillationConfig


def test_cli_parsing():
    (config,) = HfArgumentParser(OscillationConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "out",
            "--osc_method",
            "qat",
            "--osc_bits",
            "2",
            "--osc_target_modules",
            "conv1",
            "fc",
            "--osc_eval_bits",
            "4",
            "2",
            "--osc_per_channel",
            "true",
            "--report_to",
            "none",
        ]
    )
    assert (config.osc_method, config.osc_bits, config.osc_per_channel) == ("qat", 2, True)
    assert config.osc_target_modules == ["conv1", "fc"]
    assert config.osc_eval_bits == [2, 4]


def test_defaults_and_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("output_dir: out\nosc_lambda: 10.0\nosc_exclude_modules: [head]\nreport_to: none\n")
    (config,) = HfArgumentParser(OscillationConfig).parse_yaml_file(str(path))
    assert config.osc_method == "oscillation" and config.osc_bits == 3 and config.osc_lambda == 10.0
    assert config.osc_exclude_modules == ["head"]
    assert config.osc_eval_bits == [2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("osc_method", "ptq", "osc_method must be one of"),
        ("osc_bits", 1, "between 2 and 8"),
        ("osc_bits", 9, "between 2 and 8"),
        ("osc_bits", 2.5, "between 2 and 8"),
        ("osc_eval_bits", [2, 12], "between 2 and 8"),
        ("osc_lambda", -1.0, "osc_lambda must be a finite number >= 0"),
        ("osc_lambda", float("nan"), "osc_lambda must be a finite number >= 0"),
        ("osc_bn_recalibration_samples", -5, "osc_bn_recalibration_samples must be >= 0"),
    ],
)
def test_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        OscillationConfig(output_dir="out", report_to="none", **{field: value})


def test_qat_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="activation \(gradient\) checkpointing"):
        OscillationConfig(output_dir="out", report_to="none", osc_method="qat", activation_checkpointing=True)


def test_sharded_training_is_refused():
    with pytest.raises(ValueError, match="does not support FSDP"):
        OscillationConfig(output_dir="out", report_to="none", fsdp="full_shard", use_cpu=True)
