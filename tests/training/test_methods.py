"""The method registry and the peer methods in OscillationTrainer: KURE, multi-bit joint QAT and oscillation
dampening train, log, evaluate at every bit-width, export and render cards like the paper's three methods; each
loss is checked against an independent computation of the same step; DDP gives the single-process result."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import AutoModelForImageClassification

from hf_oscq import (
    OSC_METHODS,
    OscillationConfig,
    OscqValueError,
    export_quantized,
    fake_quantize,
    get_method,
    kurtosis_penalty,
    register_method,
    select_weights,
)
from hf_oscq.quantization.dampening import dampening_penalty
from hf_oscq.training.methods import MethodLoss, TrainingMethod, method_sentence, run_label, trained_how
from hf_oscq.training.methods.dampening import dampening_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer import make_trainer, tiny_timm_resnet, tiny_vit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("kure", "multibit_qat", "dampening")


def _config(**overrides) -> OscillationConfig:
    return OscillationConfig(**{"output_dir": "out", "report_to": "none", "use_cpu": True, **overrides})


def _first_log(trainer) -> dict:
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


def _task_loss(model, batch, weights=None) -> float:
    with torch.no_grad():
        params = dict(model.named_parameters()) | (weights or {})
        return float(functional_call(model, params, (), batch)["loss"])


def _first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_the_registry_names_every_method_and_refuses_unknown_ones():
    assert OSC_METHODS == ("oscillation", "qat", "none", "kure", "multibit_qat", "dampening")
    labels = {name: (run_label(name), run_label(name, short=True)) for name in OSC_METHODS}
    assert labels["kure"] == ("KURE", "KURE") and labels["multibit_qat"] == ("multi-bit QAT", "Multi-bit QAT")
    assert labels["dampening"] == ("oscillation dampening", "Dampening")
    assert run_label("fp_ptq") == "FP + PTQ" and get_method("none").comparison_key == "fp_ptq"
    assert [get_method(name).quantized_forward for name in OSC_METHODS] == [False, True, False, False, True, True]
    with pytest.raises(OscqValueError, match=r"osc_method must be one of \('oscillation', 'qat', 'none', 'kure'"):
        _config(osc_method="kurtosis")
    for spelled, meant in (("KURE", "kure"), ("Multibit-QAT", "multibit_qat"), (" Dampening ", "dampening")):
        with pytest.raises(OscqValueError, match=f"got {spelled!r}. Did you mean {meant!r}"):
            _config(osc_method=spelled)
    assert (
        trained_how("unknown") == "with hf_oscq"
        and method_sentence({"osc_method": "x"}) == "Trained with osc_method='x'."
    )


def test_each_method_has_its_own_lambda_default_and_warns_for_settings_it_ignores():
    assert [_config(osc_method=name).osc_lambda for name in ("oscillation", "kure", "dampening")] == [10.0, 1.0, 10.0]
    assert _config(osc_method="kure", osc_lambda=0.1).osc_lambda == 0.1
    with pytest.warns(UserWarning, match="osc_lambda=3.0 is ignored with osc_method='multibit_qat'"):
        _config(osc_method="multibit_qat", osc_lambda=3.0)
    with pytest.warns(UserWarning, match=r"osc_multibit_bits=\[2, 3\] is ignored with osc_method='kure'"):
        _config(osc_method="kure", osc_multibit_bits=[2, 3])
    with pytest.warns(UserWarning, match="osc_penalty_normalization='global_mean' is ignored with osc_method='qat'"):
        _config(osc_method="qat", osc_penalty_normalization="global_mean")
    main = _config(osc_lambda=30.0, osc_penalty_normalization="global_mean", osc_bits=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recipe's baseline: no setting of the main method is reported as ignored
        baseline = main.for_method("kure", output_dir="b")
    assert (baseline.osc_method, baseline.osc_lambda, baseline.osc_bits) == ("kure", 1.0, 2)
    assert baseline.osc_penalty_normalization == "layer_mean" and baseline.output_dir == "b"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"osc_method": "multibit_qat", "osc_multibit_bits": [2, 9]}, "Invalid osc_multibit_bits"),
        ({"osc_method": "multibit_qat", "osc_multibit_bits": []}, "osc_multibit_bits must list"),
        ({"osc_method": "kure", "osc_kurtosis_target": 0.5}, "Invalid osc_kurtosis_target"),
        ({"osc_method": "dampening", "osc_dampening_schedule": "linear"}, "osc_dampening_schedule must be one of"),
        ({"osc_method": "multibit_qat", "gradient_checkpointing": True}, "osc_method='multibit_qat' does not support"),
        ({"osc_method": "dampening", "gradient_checkpointing": True}, "osc_method='dampening' does not support"),
    ],
)
def test_invalid_method_settings_are_refused_at_configuration(settings, message):
    with pytest.raises(OscqValueError, match=message):
        _config(**settings)


def test_multibit_bits_are_sorted_and_deduplicated():
    assert _config(osc_method="multibit_qat", osc_multibit_bits=[8, 2, 8, 4]).osc_multibit_bits == [2, 4, 8]


def test_kure_step_loss_is_the_task_loss_plus_lambda_times_the_kurtosis_penalty(tmp_path):
    model = tiny_vit()
    trainer = make_trainer(model, tmp_path, osc_method="kure", osc_lambda=0.7, max_steps=1)
    batch = _first_batch(trainer)
    expected_penalty = float(kurtosis_penalty(model).detach())
    expected_task = _task_loss(model, batch)
    trainer.train()
    log = _first_log(trainer)
    assert log["kurtosis_penalty"] == pytest.approx(expected_penalty, rel=1e-5)
    assert log["task_loss"] == pytest.approx(expected_task, rel=1e-5)
    assert log["loss"] == pytest.approx(expected_task + 0.7 * expected_penalty, rel=1e-5)


def test_multibit_step_loss_is_the_mean_of_the_fake_quantized_task_losses(tmp_path):
    model = tiny_vit()
    trainer = make_trainer(model, tmp_path, osc_method="multibit_qat", osc_multibit_bits=[2, 4, 8], max_steps=1)
    batch = _first_batch(trainer)
    selected = select_weights(model)
    losses = {
        bits: _task_loss(model, batch, {name: fake_quantize(w, bits) for name, w in selected.items()})
        for bits in (2, 4, 8)
    }
    trainer.train()
    log = _first_log(trainer)
    for bits, loss in losses.items():
        assert log[f"task_loss_w{bits}"] == pytest.approx(loss, rel=1e-5)
    assert log["loss"] == log["task_loss"] == pytest.approx(sum(losses.values()) / 3, rel=1e-5)
    assert losses[2] != losses[8]


def test_dampening_weight_follows_the_reference_cosine_ramp():
    assert [dampening_weight(2.0, progress, "cosine") for progress in (0.0, 0.25)] == [0.0, 0.0]
    assert dampening_weight(2.0, 0.625, "cosine") == pytest.approx(1.0)  # halfway up the cosine
    assert dampening_weight(2.0, 0.25 + 0.75 / 3, "cosine") == pytest.approx(2.0 * (1 - math.cos(math.pi / 3)) / 2)
    assert dampening_weight(2.0, 1.0, "cosine") == pytest.approx(2.0)
    assert dampening_weight(2.0, 0.1, "constant") == 2.0


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_dampening_step_loss_is_the_qat_loss_plus_the_scheduled_penalty(tmp_path, schedule):
    model = tiny_vit()
    trainer = make_trainer(
        model, tmp_path, osc_method="dampening", osc_lambda=5.0, osc_dampening_schedule=schedule, max_steps=1
    )
    batch = _first_batch(trainer)
    selected = select_weights(model)
    expected_task = _task_loss(model, batch, {name: fake_quantize(w, 3) for name, w in selected.items()})
    expected_penalty = float(dampening_penalty(model, 3).detach())
    trainer.train()
    log = _first_log(trainer)
    weight = 5.0 if schedule == "constant" else 0.0  # the cosine ramp starts at 0
    assert log["task_loss"] == pytest.approx(expected_task, rel=1e-5)
    assert log["dampening_penalty"] == pytest.approx(expected_penalty, rel=1e-5)
    assert log["loss"] == pytest.approx(expected_task + weight * expected_penalty, rel=1e-5)


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("build", [tiny_vit, tiny_timm_resnet], ids=["vit", "timm"])
def test_every_peer_trains_evaluates_every_bit_width_and_exports(tmp_path, method, build):
    model = build()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(model, tmp_path, osc_method=method, max_steps=2, osc_eval_bits=[2, 3, 4, 5, 6, 7, 8])
    trainer.train()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    metrics = trainer.evaluate()
    for bits in range(2, 9):
        assert 0 <= metrics[f"eval_w{bits}_accuracy"] <= 1 and math.isfinite(metrics[f"eval_w{bits}_loss"])
    export = export_quantized(
        model,
        tmp_path / "export",
        bits=(3,),
        calibration_batches=trainer.calibration_batches,
        training=trainer.args.method_settings(),
    )
    loaded = AutoModelForImageClassification.from_pretrained(export / "w3")
    assert loaded.config.quantization_config.bits == 3
    from hf_oscq import write_model_cards

    write_model_cards(export)
    card = (export / "fp" / "README.md").read_text()
    assert get_method(method).sentence(trainer.args.method_settings()) in card
    assert trained_how(method) in (export / "w3" / "README.md").read_text()


def test_a_registered_method_is_usable_everywhere(tmp_path, monkeypatch):
    """Adding a method is one `TrainingMethod` subclass and one `register_method` call: config, Trainer, labels and
    cards know it without another change."""
    from hf_oscq.training import methods

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))  # registered for this test only

    class WeightDecayTerm(TrainingMethod):
        name = "l2_term"
        label = "an L2 term"
        short_label = "L2"
        trained_how = "with an L2 term"
        default_lambda = 0.5

        def loss(self, step):
            loss, outputs = step.task_loss()
            penalty = sum(weight.square().sum() for weight in step.weights().values())
            return MethodLoss(loss, outputs, {"l2_penalty": (penalty, step.args.osc_lambda)})

    register_method(WeightDecayTerm())
    model = tiny_vit()
    trainer = make_trainer(model, tmp_path, osc_method="l2_term", max_steps=1)
    expected = float(sum(w.detach().square().sum() for w in select_weights(model).values()))
    trainer.train()
    log = _first_log(trainer)
    assert log["l2_penalty"] == pytest.approx(expected, rel=1e-5)
    assert log["loss"] == pytest.approx(log["task_loss"] + 0.5 * expected, rel=1e-5)
    assert run_label("l2_term") == "an L2 term" and trained_how("l2_term") == "with an L2 term"
    with pytest.raises(OscqValueError, match="registered already"):

        class Other(WeightDecayTerm):
            pass

        register_method(Other())


@pytest.mark.slow
def test_peers_under_ddp_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    worker = str(ROOT / "tests" / "_ddp_methods_worker.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    two = subprocess.run(
        [*launch, worker, str(tmp_path / "two"), "4", *PEERS], capture_output=True, text=True, timeout=300, env=env
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, worker, str(tmp_path / "one"), "8", *PEERS],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "tests"))
    from _ddp_lm_worker import build_model

    initial = build_model().state_dict()
    unused = "model.unused_projection.weight"
    for method in PEERS:
        weights = [load_file(str(tmp_path / run / method / "weights.safetensors")) for run in ("one", "two")]
        logs = [json.loads((tmp_path / run / method / "log.json").read_text()) for run in ("one", "two")]
        for name in weights[0]:
            torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-5, msg=f"{method} {name}")
        for expected, found in zip(*logs):
            assert found["loss"] == pytest.approx(expected["loss"], rel=1e-5), method
        # a selected weight the forward pass never uses: moved by a penalty gradient alone, untouched by QAT losses
        assert torch.equal(weights[1][unused], initial[unused]) == (method == "multibit_qat"), method
    assert {"task_loss_w2", "task_loss_w4"} <= set(logs_of(tmp_path / "two" / "multibit_qat"))


def logs_of(folder: Path) -> dict:
    return json.loads((folder / "log.json").read_text())[0]


def test_cards_and_the_space_show_a_curve_for_every_method():
    """An export's `comparisons` keyed by every method's comparison key: the cards' comparison table and the Space's
    accuracy view name each run by its method's label."""
    sys.path.insert(0, str(ROOT / "space"))
    from oscq_space.families import Family
    from oscq_space.figures import accuracy_table, family_tables

    from hf_oscq.hub.card_facts import comparison_tables

    table = {"fp": {"accuracy": 0.9}, "w2": {"accuracy": 0.5}}
    comparisons = {get_method(name).comparison_key: table for name in OSC_METHODS if name != "oscillation"}
    measured = {"metric": "accuracy", "dataset": "local", "split": "test", "examples": 10, "batchnorm": "none"}
    manifest = {
        "metrics": table,
        "training": {"osc_method": "oscillation"},
        "comparisons": comparisons,
        "provenance": {"metrics": measured, "comparisons": measured},  # measured alike: one table, one plot
    }
    assert list(comparison_tables(manifest)) == [
        "oscillation regularizer (this model)",
        "QAT",
        "FP + PTQ",
        "KURE",
        "multi-bit QAT",
        "oscillation dampening",
    ]
    family = Family(name="Oscillation · run", method="Oscillation", record=manifest)
    headers, rows = accuracy_table(family_tables(family, qualify=False))
    assert [row[0] for row in rows] == ["Oscillation", "QAT", "FP + PTQ", "KURE", "Multi-bit QAT", "Dampening"]
    assert headers == ["run", "full precision", "2 bits"] and rows[3][1:] == [90.0, 50.0]
