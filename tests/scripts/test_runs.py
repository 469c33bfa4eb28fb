"""The runs of a recipe: each method's Trainer arguments and its row label, shared by both recipes and the bench."""

import warnings
from pathlib import Path

import pytest

from hf_oscq import OscillationConfig, OscqValueError
from hf_oscq.scripts.runs import check_baselines, run_arguments, run_tag


def _main(**overrides) -> OscillationConfig:
    settings = dict(output_dir="out", report_to="none", use_cpu=True, osc_lambda=30.0, osc_bits=2)
    return OscillationConfig(**{**settings, **overrides})


def test_the_main_run_keeps_its_settings_and_baselines_get_their_own_defaults():
    main = _main(osc_penalty_normalization="global_mean", metric_for_best_model="eval_w2_accuracy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = {method: run_arguments(main, Path("run"), method) for method in ("oscillation", "kure", "none", "qat")}
    assert runs["oscillation"].osc_lambda == 30.0 and runs["oscillation"].osc_penalty_normalization == "global_mean"
    assert runs["kure"].osc_lambda == 1.0 and runs["kure"].osc_penalty_normalization == "layer_mean"
    assert all(run.osc_bits == 2 and not run.push_to_hub for run in runs.values())
    assert runs["kure"].output_dir == str(Path("run") / "training" / "kure")
    assert runs["none"].metric_for_best_model == "accuracy"  # FP + PTQ selects on full precision (eval_accuracy)
    assert runs["qat"].metric_for_best_model == "eval_w2_accuracy"
    tags = {method: run_tag(run) for method, run in runs.items()}
    assert tags == {
        "oscillation": "oscillation regularizer @2",
        "kure": "KURE (lambda 1.0)",
        "none": "FP + PTQ",
        "qat": "QAT @2",
    }
    assert run_tag(_main(osc_method="multibit_qat", osc_lambda=None)) == "multi-bit QAT {2,4,8}"


def test_unknown_baselines_are_named():
    check_baselines(["qat", "kure", "multibit_qat", "dampening"])
    with pytest.raises(OscqValueError, match=r"--baselines takes osc_methods .*got \['kurtosis'\]"):
        check_baselines(["kure", "kurtosis"])
