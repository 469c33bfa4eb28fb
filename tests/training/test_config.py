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
    path.write_text("output_dir: out\nosc_lambda: 30.0\nosc_exclude_modules: [head]\nreport_to: none\n")
    (config,) = HfArgumentParser(OscillationConfig).parse_yaml_file(str(path))
    assert config.osc_method == "oscillation" and config.osc_bits == 3 and config.osc_lambda == 30.0
    # the documented default: the paper's normalization with lambda 10 (docs/RESULTS.md, the pilot)
    default = OscillationConfig(output_dir="out", report_to="none")
    assert (default.osc_lambda, default.osc_penalty_normalization) == (10.0, "layer_mean")
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
        ("osc_penalty_normalization", "sum", "Invalid osc_penalty_normalization"),
    ],
)
def test_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        OscillationConfig(output_dir="out", report_to="none", **{field: value})


def test_qat_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="activation \(gradient\) checkpointing"):
        OscillationConfig(output_dir="out", report_to="none", osc_method="qat", activation_checkpointing=True)


def test_fsdp2_is_accepted_and_other_weight_sharding_refused(monkeypatch):
    config = OscillationConfig(output_dir="out", report_to="none", fsdp=True, use_cpu=True)
    assert config.fsdp_plugin_args["fsdp_version"] == 2  # the Trainer's default FSDP version
    with pytest.raises(ValueError, match="FSDP version 2 \\(fully_shard\\) only, got fsdp_version 1"):
        OscillationConfig(output_dir="out", report_to="none", fsdp=True, fsdp_config={"version": 1}, use_cpu=True)
    with monkeypatch.context() as env:  # an `accelerate launch` FSDP config without fsdp_version means FSDP1
        env.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(ValueError, match="got fsdp_version 1"):
            OscillationConfig(output_dir="out", report_to="none", use_cpu=True)
        env.setenv("FSDP_VERSION", "2")
        OscillationConfig(output_dir="out", report_to="none", use_cpu=True)
    with monkeypatch.context() as env:
        env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
        with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO-3"):
            OscillationConfig(output_dir="out", report_to="none", use_cpu=True)


def test_qat_refuses_fsdp_activation_checkpointing():
    with pytest.raises(ValueError, match="activation \(gradient\) checkpointing"):
        OscillationConfig(
            output_dir="out",
            report_to="none",
            osc_method="qat",
            fsdp=True,
            use_cpu=True,
            fsdp_config={"activation_checkpointing": True},
        )
    OscillationConfig(  # the penalty is computed outside the forward pass: recomputation does not affect it
        output_dir="out", report_to="none", fsdp=True, use_cpu=True, fsdp_config={"activation_checkpointing": True}
    )


def test_every_osc_field_is_documented_under_parameters():
    import dataclasses
    import re

    fields = [field.name for field in dataclasses.fields(OscillationConfig) if field.name.startswith("osc_")]
    assert len(fields) == 15  # 12 + the peers: osc_kurtosis_target, osc_multibit_bits, osc_dampening_schedule
    parameters = OscillationConfig.__doc__.split("Parameters:")[1]
    documented = re.findall(r"^ {8}(osc_\w+) \(`[^`]+`", parameters, flags=re.MULTILINE)
    assert sorted(documented) == sorted(fields)


def test_quant_spec_is_built_from_the_osc_fields():
    from hf_oscq import QuantSpec

    config = OscillationConfig(
        output_dir="out",
        report_to="none",
        osc_bits=2,
        osc_per_channel=True,
        osc_target_modules=["fc"],
        osc_exclude_modules=["head"],
    )
    assert config.quant_spec == QuantSpec(2, "per_channel", ("fc",), ("head",))
    assert OscillationConfig(output_dir="out", report_to="none").quant_spec == QuantSpec(3)
    with pytest.raises(ValueError, match="exclude_modules must be a module name"):
        OscillationConfig(output_dir="out", report_to="none", osc_exclude_modules=[""])


def test_ignored_osc_lambda_warns():
    import warnings

    with pytest.warns(UserWarning, match="osc_lambda=30.0 is ignored with osc_method='qat'"):
        OscillationConfig(output_dir="out", report_to="none", osc_method="qat", osc_lambda=30.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="osc_lambda")  # default, zero, or the method using it: no warning
        OscillationConfig(output_dir="out", report_to="none", osc_method="qat")
        OscillationConfig(output_dir="out", report_to="none", osc_method="none", osc_lambda=0.0)
        OscillationConfig(output_dir="out", report_to="none", osc_lambda=30.0)
        OscillationConfig(output_dir="out", report_to="none", osc_method="none", osc_lambda=10.0)
