"""What a run records next to its weights (oscq_training.json) and how resuming and export read it."""

import json

import pytest

from hf_oscq import OscillationConfig, OscqValueError, QuantSpec
from hf_oscq.training.run_record import check_resume, recorded_spec, write_run_record


def _args(tmp_path, **changes):
    return OscillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **changes)


def test_saving_again_keeps_what_a_recipe_added_to_the_same_run(tmp_path):
    args = _args(tmp_path, osc_bits=4, osc_group_size=32, seed=3)
    recipe = {"osc_method": "oscillation", "quant_spec": args.quant_spec.to_dict(), "dataset": "digits",
              "hyperparameters": {"learning_rate": 0.01, "seed": 3}}  # fmt: skip
    (tmp_path / "oscq_training.json").write_text(json.dumps(recipe))
    write_run_record(tmp_path, args)
    record = json.loads((tmp_path / "oscq_training.json").read_text())
    assert record["dataset"] == "digits" and record["hyperparameters"]["learning_rate"] == 0.01
    assert recorded_spec(record) == QuantSpec(4, "group", group_size=32) and record["hyperparameters"]["seed"] == 3
    write_run_record(tmp_path, _args(tmp_path, osc_bits=3))  # another run: nothing of the old record is kept
    record = json.loads((tmp_path / "oscq_training.json").read_text())
    assert "dataset" not in record and recorded_spec(record) == QuantSpec(3)


def test_records_without_a_spec_resume_as_they_are_and_invalid_ones_are_named(tmp_path):
    (tmp_path / "oscq_training.json").write_text(json.dumps({"osc_method": "qat", "osc_bits": 3}))  # older hf_oscq
    assert recorded_spec({"osc_bits": 3}) is None
    check_resume(tmp_path, _args(tmp_path, osc_bits=4))  # nothing recorded to compare with
    with pytest.raises(OscqValueError, match="records an invalid quantization spec: bits must be an integer"):
        recorded_spec({"quant_spec": {"bits": 9}})


def test_a_damaged_record_is_named_by_its_readers_and_replaced_by_the_run_that_saves(tmp_path):
    """A truncated oscq_training.json: resuming from the folder is refused naming the file (the spec check is not
    skipped), and the Trainer's next save writes its own record over it."""
    (tmp_path / "oscq_training.json").write_text('{"osc_bits": ')
    with pytest.raises(OscqValueError, match="oscq_training.json cannot be read as JSON"):
        check_resume(tmp_path, _args(tmp_path))
    write_run_record(tmp_path, _args(tmp_path, osc_bits=4))
    assert recorded_spec(json.loads((tmp_path / "oscq_training.json").read_text())) == QuantSpec(4)
