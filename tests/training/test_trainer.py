import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    ProgressCallback,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)

from hf_oscq import (
    OscillationConfig,
    OscillationTrainer,
    OscqValueError,
    compute_accuracy,
    oscillation_penalty,
    quantize_model,
)


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n, size=16, channels=3, classes=4, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, channels, size, size, generator=generator)
        self.y = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=4,
    )
    return ViTForImageClassification(config)


def tiny_timm_resnet():
    torch.manual_seed(0)
    config = TimmWrapperConfig(
        architecture="resnet18", num_labels=4, model_args={"channels": (8, 16, 32, 64), "stem_width": 8}
    )
    return TimmWrapperForImageClassification(config)


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, pixel_values, labels=None):
        logits = self.body(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def make_trainer(model, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        osc_eval_bits=[2, 3],
        seed=0,
    )
    settings.update(overrides)
    return OscillationTrainer(
        model=model,
        args=OscillationConfig(**settings),
        train_dataset=RandomImages(48),
        eval_dataset=RandomImages(24, seed=1),
        compute_metrics=accuracy,
    )


@pytest.mark.parametrize("build", [tiny_vit, tiny_timm_resnet, lambda: PlainNet()], ids=["vit", "timm", "plain"])
@pytest.mark.parametrize("method", ["oscillation", "qat", "none"])
def test_every_mode_trains_and_logs(build, method, tmp_path):
    model = build()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(model, tmp_path, osc_method=method)
    trainer.train()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
    assert [name for name, _ in model.named_parameters()] == list(before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("task_loss" in entry for entry in logs)
    assert all(("osc_penalty" in entry) == (method == "oscillation") for entry in logs)


def test_logged_penalty_and_loss_follow_the_formula(tmp_path):
    model = tiny_vit()
    expected_penalty = float(oscillation_penalty(model, 3).detach())
    trainer = make_trainer(model, tmp_path, max_steps=1, osc_lambda=4.0)
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["osc_penalty"] == pytest.approx(expected_penalty, rel=1e-5)
    assert log["loss"] == pytest.approx(log["task_loss"] + 4.0 * log["osc_penalty"], rel=1e-5)


@pytest.mark.parametrize("normalization", ["layer_mean", "global_mean"])
def test_logged_penalty_follows_the_chosen_normalization(tmp_path, normalization):
    model = tiny_vit()
    expected_penalty = float(oscillation_penalty(model, 3, normalization=normalization).detach())
    trainer = make_trainer(model, tmp_path, max_steps=1, osc_lambda=4.0, osc_penalty_normalization=normalization)
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["osc_penalty"] == pytest.approx(expected_penalty, rel=1e-5)
    assert log["loss"] == pytest.approx(log["task_loss"] + 4.0 * log["osc_penalty"], rel=1e-5)


def test_zero_lambda_equals_plain_training(tmp_path):
    runs = {}
    for method, kwargs in {"none": {}, "oscillation": {"osc_lambda": 0.0}}.items():
        model = tiny_vit()
        trainer = make_trainer(model, tmp_path / method, osc_method=method, **kwargs)
        trainer.train()
        runs[method] = ([e["loss"] for e in trainer.state.log_history if "loss" in e], model.state_dict())
    assert runs["none"][0] == runs["oscillation"][0]
    for name, tensor in runs["none"][1].items():
        assert torch.equal(tensor, runs["oscillation"][1][name])


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    states, logs = [], []
    for batch, accumulation in [(8, 1), (4, 2)]:
        model = tiny_vit()
        trainer = make_trainer(
            model,
            tmp_path / str(batch),
            max_steps=1,
            osc_lambda=50.0,
            optim="sgd",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        states.append(model.state_dict())
        logs.append([entry for entry in trainer.state.log_history if "loss" in entry][0])
    for key in ("loss", "task_loss", "osc_penalty"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5)
    for name, tensor in states[0].items():
        torch.testing.assert_close(states[1][name], tensor, rtol=1e-5, atol=1e-6)


def test_evaluation_reports_every_bit_and_restores_weights(tmp_path):
    model = tiny_vit()
    trainer = make_trainer(model, tmp_path, osc_eval_bits=[2, 4, 8])
    trainer.train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    metrics = trainer.evaluate()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert {"eval_accuracy", "eval_w2_accuracy", "eval_w4_accuracy", "eval_w8_accuracy", "eval_w2_loss"} <= set(
        metrics
    )
    dataset = trainer.eval_dataset
    for bits in (2, 4, 8):
        with torch.no_grad():
            logits = quantize_model(model, bits).eval()(pixel_values=dataset.x).logits
        expected = float((logits.argmax(-1) == dataset.y).float().mean())
        assert metrics[f"eval_w{bits}_accuracy"] == pytest.approx(expected)


def test_classifiers_default_to_the_evaluate_accuracy_and_other_models_to_none(tmp_path):
    model = tiny_vit()
    args = make_trainer(model, tmp_path, osc_eval_bits=[3]).args
    dataset = RandomImages(24, seed=1)
    trainer = OscillationTrainer(model=model, args=args, eval_dataset=dataset)
    assert trainer.compute_metrics is compute_accuracy
    metrics = trainer.evaluate()
    for prefix, evaluated in (("eval", model), ("eval_w3", quantize_model(model, 3))):
        with torch.no_grad():
            predicted = evaluated.eval()(pixel_values=dataset.x).logits.argmax(-1)
        hits = sum(int(p == y) for p, y in zip(predicted.tolist(), dataset.y.tolist()))
        assert metrics[f"{prefix}_accuracy"] == hits / 24
    assert OscillationTrainer(model=PlainNet(), args=args).compute_metrics is None


def test_best_model_selected_on_quantized_accuracy(tmp_path):
    model = tiny_vit()
    trainer = make_trainer(
        model,
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        metric_for_best_model="eval_w2_accuracy",
        load_best_model_at_end=True,
        save_total_limit=1,
    )
    trainer.train()
    scores = [entry["eval_w2_accuracy"] for entry in trainer.state.log_history if "eval_w2_accuracy" in entry]
    assert len(scores) == 4
    assert trainer.state.best_metric == max(scores)
    best = ViTForImageClassification.from_pretrained(trainer.state.best_model_checkpoint)
    for name, tensor in best.state_dict().items():  # the best checkpoint's weights really are loaded
        assert torch.equal(model.state_dict()[name], tensor)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    full = tiny_vit()
    make_trainer(full, tmp_path / "full", max_steps=4).train()
    interrupted = make_trainer(tiny_vit(), tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2)
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    record = json.loads((checkpoint / "oscq_training.json").read_text())
    assert (record["osc_method"], record["quant_spec"]["bits"]) == ("oscillation", 3)
    resumed_model = tiny_vit()
    resumed = make_trainer(resumed_model, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in full.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


# (change, as the record describes the checkpoint, as it describes the new run)
SPEC_CHANGES = [
    ({"osc_bits": 4}, "osc_bits=3", "osc_bits=4"),
    ({"osc_method": "qat"}, "osc_method='oscillation'", "osc_method='qat'"),
    ({"osc_per_channel": True}, "osc_bits=3, per_tensor", "osc_bits=3, per_channel"),
    ({"osc_group_size": 1}, "osc_bits=3, per_tensor", "osc_bits=3, group_size=1"),
    ({"osc_target_modules": ["classifier"]}, "target_modules=None", "target_modules=['classifier']"),
    ({"osc_exclude_modules": ["classifier"]}, "exclude_modules=None", "exclude_modules=['classifier']"),
]


def test_resuming_a_checkpoint_of_another_method_or_spec_is_refused(tmp_path, caplog):
    """Every checkpoint records the method and spec it was trained with (oscq_training.json, written on save);
    resuming it under another one (bits, method, granularity, group size, target or exclude modules), by path or with
    `resume_from_checkpoint=True`, is refused naming both, before anything is loaded; `osc_allow_spec_change=True`
    resumes it anyway, saying so."""
    settings = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "save_strategy": "steps", "save_steps": 1}
    make_trainer(tiny_vit(), tmp_path, **settings).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    for change, recorded, current in SPEC_CHANGES:
        for resume in (str(checkpoint), True):
            with pytest.raises(OscqValueError) as raised:
                make_trainer(tiny_vit(), tmp_path, **settings, **change).train(resume_from_checkpoint=resume)
            message = str(raised.value)
            assert message.startswith(f"The checkpoint '{checkpoint}' was trained with "), message
            assert message.index(recorded) < message.index("but this run is set to") < message.index(current), message
            assert "osc_allow_spec_change=True" in message
    allowed = make_trainer(tiny_vit(), tmp_path, **settings, osc_bits=4, osc_allow_spec_change=True)
    with caplog.at_level("WARNING", logger="hf_oscq.training.run_record"):
        allowed.train(resume_from_checkpoint=str(checkpoint))
    assert f"Resuming {checkpoint}, trained with osc_method='oscillation', osc_bits=3" in caplog.text


def test_bf16_autocast_trains(tmp_path):
    trainer = make_trainer(tiny_vit(), tmp_path, bf16=True, osc_lambda=2.0)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(np.isfinite([entry["loss"], entry["osc_penalty"]]).all() for entry in logs)


def test_qat_model_saves_and_reloads_with_unchanged_names(tmp_path):
    model = tiny_vit()
    trainer = make_trainer(model, tmp_path, osc_method="qat")
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = ViTForImageClassification.from_pretrained(str(tmp_path / "saved"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)


def test_bad_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="OscillationConfig"):
        OscillationTrainer(model=tiny_vit(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    with pytest.raises(ValueError, match="No weights selected"):
        make_trainer(tiny_vit(), tmp_path, osc_target_modules=["nothing_like_this"])


def test_a_group_size_that_does_not_fit_a_layer_fails_at_construction_naming_it(tmp_path):
    """Not at the first evaluation with "a weight of shape [4, 37]": the Trainer checks the group size against every
    selected layer when it is built, naming the layer, its input features and `osc_group_size`."""
    with pytest.raises(OscqValueError) as raised:
        make_trainer(tiny_vit(), tmp_path, osc_group_size=8)
    assert str(raised.value).startswith(
        "osc_group_size=8 does not divide the 37 input features of layer 'vit.layers.0.mlp.fc2' (weight shape "
        "[32, 37])"
    )


def test_nan_weights_stop_training_with_the_parameter_name(tmp_path):
    model = tiny_vit()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'classifier.weight' contains NaN or Inf"):
        make_trainer(model, tmp_path).train()


def test_batchnorm_recalibration_in_cross_bit_evaluation(tmp_path):
    model = tiny_timm_resnet()
    trainer = make_trainer(model, tmp_path, osc_bn_recalibration_samples=20, per_device_eval_batch_size=8)
    trainer.train()
    batches = list(trainer.calibration_batches())
    assert [len(batch["pixel_values"]) for batch in batches] == [8, 8, 4]  # exactly the 20 images asked for
    again = list(trainer.calibration_batches())
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(batches, again))
    metrics = trainer.evaluate()
    assert trainer.bn_recalibration_samples == 20
    dataset = trainer.eval_dataset
    for bits in (2, 3):
        quantized = quantize_model(model, bits, calibration_batches=batches).eval()
        with torch.no_grad():
            logits = quantized(pixel_values=dataset.x).logits
        expected = float((logits.argmax(-1) == dataset.y).float().mean())
        assert metrics[f"eval_w{bits}_accuracy"] == pytest.approx(expected)
    # each evaluation counts its own re-estimation: none without bit-widths, none with plain rounding
    trainer.args.osc_eval_bits = []
    trainer.evaluate()
    assert trainer.bn_recalibration_samples == 0
    trainer.args.osc_eval_bits, trainer.args.osc_bn_recalibration_samples = [3], 0
    trainer.evaluate()
    assert trainer.bn_recalibration_samples == 0


def test_batchnorm_models_are_re_estimated_by_default(tmp_path):
    model = tiny_timm_resnet()
    trainer = make_trainer(model, tmp_path, per_device_eval_batch_size=8)
    assert trainer.args.osc_bn_recalibration_samples == 512
    trainer.create_model_card()  # before any evaluation: the setting
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| BatchNorm re-estimation after rounding | 512 training images |" in card
    trainer.train()
    batches = list(trainer.calibration_batches())
    # 512 > 48 training images: every image once, in the seeded order
    assert sorted(torch.cat([batch["labels"] for batch in batches]).tolist()) == sorted(
        trainer.train_dataset.y.tolist()
    )
    metrics = trainer.evaluate()
    assert trainer.bn_recalibration_samples == len(trainer.train_dataset) == 48
    trainer.create_model_card()  # after it: the images it forwarded
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| BatchNorm re-estimation after rounding | 48 training images |" in card
    dataset = trainer.eval_dataset
    for bits in (2, 3):
        with torch.no_grad():
            recalibrated = quantize_model(model, bits, calibration_batches=batches).eval()(pixel_values=dataset.x)
            plain = quantize_model(model, bits).eval()(pixel_values=dataset.x)
        expected = float((recalibrated.logits.argmax(-1) == dataset.y).float().mean())
        assert metrics[f"eval_w{bits}_accuracy"] == pytest.approx(expected)
        assert not torch.allclose(recalibrated.logits, plain.logits, atol=1e-3)


def test_batchnorm_model_without_training_data_names_both_ways_out(tmp_path):
    trainer = OscillationTrainer(
        model=tiny_timm_resnet(),
        args=OscillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, osc_eval_bits=[3]),
        eval_dataset=RandomImages(8),
        compute_metrics=accuracy,
    )
    with pytest.raises(ValueError, match=r"no train_dataset.*train_dataset=\.\.\..*osc_bn_recalibration_samples=0"):
        trainer.evaluate()
    trainer.args.osc_bn_recalibration_samples = 0  # plain rounding, the paper's PTQ
    assert "eval_w3_accuracy" in trainer.evaluate()


def test_default_batchnorm_samples_do_not_warn_for_a_model_without_batchnorm(tmp_path, recwarn):
    trainer = make_trainer(tiny_vit(), tmp_path)
    assert trainer.calibration_batches() is None
    trainer.evaluate()
    assert trainer.bn_recalibration_samples == 0
    assert not [w for w in recwarn if "osc_bn_recalibration_samples" in str(w.message)]


def test_batchnorm_samples_for_a_model_without_batchnorm_warn(tmp_path):
    with pytest.warns(UserWarning, match="osc_bn_recalibration_samples=16 is ignored: the model has no BatchNorm"):
        make_trainer(tiny_vit(), tmp_path, osc_bn_recalibration_samples=16)


def _independent_accuracy(model, dataset: RandomImages) -> float:
    with torch.no_grad():
        predicted = model.eval()(pixel_values=dataset.x).logits.argmax(-1)
    return sum(int(p == y) for p, y in zip(predicted.tolist(), dataset.y.tolist())) / len(dataset)


@pytest.mark.parametrize("given", [None, "compute_accuracy", "classification_metrics"])
def test_batch_eval_metrics_work_with_cross_bit_evaluation_from_clean_state(given, tmp_path):
    """`batch_eval_metrics=True` with the default metric, `compute_accuracy` passed by hand and
    `classification_metrics()`: every bit-width's accuracy is a count over the whole set (an uneven last batch of
    10 images in batches of 3), also when a batch of an interrupted evaluation was left in the metric's state."""
    from hf_oscq import classification_metrics

    model = tiny_vit()
    args = OscillationConfig(
        output_dir=str(tmp_path), osc_eval_bits=[2, 4], batch_eval_metrics=True, per_device_eval_batch_size=3,
        report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    dataset = RandomImages(10, seed=1)
    metric = {None: None, "compute_accuracy": compute_accuracy, "classification_metrics": classification_metrics()}
    trainer = OscillationTrainer(model=model, args=args, eval_dataset=dataset, compute_metrics=metric[given])
    # an evaluation interrupted after its first batch: 4 wrong predictions left behind
    from transformers import EvalPrediction

    leftover = EvalPrediction(predictions=np.eye(4)[[0, 0, 0, 0]], label_ids=np.array([1, 1, 1, 1]))
    trainer.compute_metrics(leftover, compute_result=False)
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == _independent_accuracy(model, dataset)
    for bits in (2, 4):
        assert metrics[f"eval_w{bits}_accuracy"] == _independent_accuracy(quantize_model(model, bits), dataset)
    assert metrics["eval_samples"] == 10


def test_push_to_hub_writes_a_card_with_method_citation_and_cross_bit_table(tmp_path, monkeypatch):
    """`trainer.push_to_hub()` up to the network: only the Hub calls themselves are stubbed."""
    from huggingface_hub import HfApi, ModelCard

    from hf_oscq.paper import CITATION

    calls = []
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **k: calls.append(("create_repo", repo_id)) or type("Url", (), {"repo_id": repo_id})(),
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: calls.append(("upload_folder", k["folder_path"])))
    trainer = make_trainer(tiny_vit(), tmp_path, osc_lambda=2.5, hub_model_id="acme/tiny-vit-osc", hub_token="x")
    metrics = trainer.evaluate()
    trainer.push_to_hub()
    assert calls == [("create_repo", "acme/tiny-vit-osc"), ("upload_folder", trainer.args.output_dir)]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"hf_oscq", "quantization"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "oscillation regularizer" in card.text and "at 3 bits (`osc_lambda = 2.5`)" in card.text
    assert CITATION in card.text
    row = next(line for line in card.text.splitlines() if line.startswith("| tiny-vit-osc |"))
    expected = [metrics["eval_accuracy"], metrics["eval_w2_accuracy"], metrics["eval_w3_accuracy"]]
    assert row == "| tiny-vit-osc | " + " | ".join(f"{100 * value:.1f}" for value in expected) + " |"
    assert "| fp | w2 | w3 |" in card.text
    import torch as torch_module
    import transformers

    assert f"torch {torch_module.__version__}, transformers {transformers.__version__}" in card.text


class _ProgressSpy(TrainerCallback):
    """Reads the ProgressCallback's evaluation bar after each prediction step (callbacks run in order, so after it)."""

    def __init__(self, callbacks):
        self.progress = next(c for c in callbacks if isinstance(c, ProgressCallback))
        self.evaluations, self.current = [], []

    def on_prediction_step(self, args, state, control, **kwargs):
        bar = self.progress.prediction_bar
        self.current.append((bar.n, bar.total))

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations.append(self.current)
        self.current = []


def test_evaluation_progress_subset_of_bits_during_training_and_figures_in_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = make_trainer(
        tiny_vit(),
        tmp_path,
        osc_eval_bits=[2, 3],
        osc_intermediate_eval_bits=[3],
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=8,
        disable_tqdm=False,
        report_to=["tensorboard"],
    )
    spy = _ProgressSpy(trainer.callback_handler.callbacks)
    trainer.callback_handler.callbacks.append(spy)
    trainer.train()
    trainer.evaluate()
    batches = -(-24 // 8)  # eval set of 24 images, batches of 8
    during, at_end = batches * 2, batches * 3  # fp + w3 during training; fp + w2 + w3 at the last step and after
    expected = [[(n, total) for n in range(1, total + 1)] for total in (during, during, at_end, at_end)]
    assert spy.evaluations == expected
    evaluations = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert [(e["step"], "eval_w2_accuracy" in e, "eval_w3_accuracy" in e) for e in evaluations] == [
        (1, False, True),
        (2, False, True),
        (3, True, True),
        (3, True, True),
    ]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("eval/accuracy_vs_bits")
    assert [image.step for image in images] == [1, 2, 3, 3]
    # plot_accuracy_vs_bits' 6.4 x 4.4 inches, which add_figure renders at matplotlib's default 100 dpi
    assert (images[0].width, images[0].height) == (640, 440)


def test_intermediate_bits_are_validated(tmp_path):
    with pytest.raises(OscqValueError, match=r"osc_intermediate_eval_bits \[4\] are not in osc_eval_bits \[2, 3\]"):
        OscillationConfig(output_dir=str(tmp_path), osc_eval_bits=[2, 3], osc_intermediate_eval_bits=[3, 4])
    with pytest.raises(OscqValueError, match="add 2 to osc_intermediate_eval_bits"):
        OscillationConfig(
            output_dir=str(tmp_path),
            osc_eval_bits=[2, 3],
            osc_intermediate_eval_bits=[3],
            metric_for_best_model="eval_w2_accuracy",
        )


def _columns_dataset(image_column: str, label_column: str):
    import datasets

    images = RandomImages(16)
    return datasets.Dataset.from_dict({image_column: images.x.numpy(), label_column: images.y.numpy()})


def test_missing_model_columns_get_a_hint(tmp_path):
    # A transform reading a column that the Trainer removes (remove_unused_columns=True, the default).
    transformed = _columns_dataset("image", "labels")
    transformed.set_transform(
        lambda batch: {"pixel_values": torch.tensor(np.array(batch["image"])), "labels": batch["labels"]}
    )
    trainer = make_trainer(PlainNet(), tmp_path)
    trainer.train_dataset = transformed
    with pytest.raises(OscqValueError, match=r"reads the column 'image'.*pass remove_unused_columns=False"):
        trainer.train()
    # Labels under a name the Trainer does not pass on.
    renamed = _columns_dataset("pixel_values", "target").with_format("torch")
    trainer = make_trainer(tiny_vit(), tmp_path)
    trainer.train_dataset = renamed
    with pytest.raises(
        OscqValueError, match=r"no \['labels'\]: name the dataset's label column `labels`.*\['target'\]"
    ):
        trainer.train()


class PoisonAt(TrainerCallback):
    """Writes NaN into one parameter when step `step` ends, as a diverging update would."""

    def __init__(self, name, step):
        self.name, self.step = name, step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_parameter(self.name).view(-1)[0] = float("nan")


class NanImageAt(RandomImages):
    def __init__(self, n, index):
        super().__init__(n)
        self.x[index] = float("nan")


@pytest.mark.parametrize("method", ["oscillation", "qat", "none"])
@pytest.mark.parametrize(
    "name",
    ["vit.layers.0.mlp.fc1.weight", "vit.layers.1.layernorm_before.weight", "vit.layers.0.attention.q_proj.bias"],
    ids=["quantized_weight", "norm", "bias"],
)
def test_non_finite_weight_stops_training_in_every_mode_naming_the_parameter(method, name, tmp_path):
    trainer = make_trainer(tiny_vit(), tmp_path, osc_method=method, max_steps=5)
    assert name in dict(trainer.model.named_parameters())
    trainer.add_callback(PoisonAt(name, step=2))
    with pytest.raises(ValueError, match=rf"'{name}' contains NaN or Inf"):
        trainer.train()
    assert trainer.state.global_step == 2  # step 3 saw the NaN weight and did not update anything
    others = [p for n, p in trainer.model.named_parameters() if n != name]
    assert all(bool(torch.isfinite(p).all()) for p in others)


@pytest.mark.parametrize("method", ["oscillation", "qat", "none"])
def test_non_finite_loss_stops_training_in_every_mode(method, tmp_path):
    trainer = make_trainer(tiny_vit(), tmp_path, osc_method=method, max_steps=5, dataloader_drop_last=True)
    trainer.train_dataset = NanImageAt(48, index=0)  # one NaN image, in the first shuffled batch that holds it
    with pytest.raises(
        ValueError, match=r"Training stopped at step \d+: the loss is nan while every weight is finite"
    ):
        trainer.train()
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


class SignImages(torch.utils.data.Dataset):
    """Random images whose class is the sign of their first pixel (centred, so that its mean is 0)."""

    def __init__(self, n, seed=0):
        self.x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        self.x[:, 0, 0, 0] -= self.x[:, 0, 0, 0].mean()
        self.y = (self.x[:, 0, 0, 0] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class SignNet(nn.Module):
    """Logits (-x, x) of the first pixel x through BatchNorm (no affine), whose running mean of the first logit is
    `stale_mean`: at 0 it classifies by the sign of x; at 4 (statistics that never settled) almost all as class 1."""

    def __init__(self, stale_mean):
        super().__init__()
        self.linear = nn.Linear(1, 2, bias=False)  # weights -1 and 1: exact at every bit-width
        self.norm = nn.BatchNorm1d(2, affine=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.norm.running_mean.copy_(torch.tensor([stale_mean, 0.0]))

    def forward(self, pixel_values, labels=None):
        logits = self.norm(self.linear(pixel_values[:, 0, 0, :1]))
        if labels is None:  # BatchNorm re-estimation forwards images alone
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize(("stale_mean", "warned"), [(4.0, True), (0.0, False)])
def test_evaluation_warns_when_full_precision_trails_8_bits_for_stale_batchnorm_statistics(
    tmp_path, caplog, stale_mean, warned
):
    trainer = OscillationTrainer(
        model=SignNet(stale_mean),
        args=OscillationConfig(
            output_dir=str(tmp_path), osc_method="none", osc_eval_bits=[8], report_to="none", use_cpu=True
        ),
        train_dataset=SignImages(64),
        eval_dataset=SignImages(64, seed=1),
        compute_metrics=accuracy,
    )
    with caplog.at_level("WARNING", logger="hf_oscq.quantization.batchnorm"):
        metrics = trainer.evaluate()
    assert metrics["eval_w8_accuracy"] > 0.9  # re-estimated on the training images: means near 0
    assert (metrics["eval_accuracy"] < 0.75) is warned
    assert ("BatchNorm running statistics training left do not fit the weights" in caplog.text) is warned
