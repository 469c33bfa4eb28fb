import json

import pytest
import torch

from hf_oscq import OscillationConfig, OscillationTrainer
from hf_oscq.scripts.data import load_image_dataset
from hf_oscq.scripts.models import build_vit
from hf_oscq.training.tracking import STATE_FILE, OscillationCounter, OscillationTracker, add_oscillation_tracker

# Hand-made code sequences (time along the rows) and their oscillations, counted by hand:
#   [0, 1, 0, 1, 1]  : +1, -1 (osc), +1 (osc), 0        -> 2, at t = 2, 3
#   [0, 1, 2, 1, 2]  : +1, +1, -1 (osc), +1 (osc)       -> 2, at t = 3, 4
#   [0, 1, 1, 0, 0]  : +1, 0, -1 (osc, vs the last non-zero change), 0  -> 1, at t = 3
#   [0, 0, -1, -2, -3]: 0, -1, -1, -1                    -> 0
#   [3, -3, 3, -3, 3]: every change reverses            -> 3, at t = 2, 3, 4
SEQUENCES = torch.tensor([[0, 1, 0, 1, 1], [0, 1, 2, 1, 2], [0, 1, 1, 0, 0], [0, 0, -1, -2, -3], [3, -3, 3, -3, 3]])
OSCILLATION_STEPS = [{2, 3}, {3, 4}, {3}, set(), {2, 3, 4}]


def test_counter_against_a_hand_made_code_sequence():
    counter = OscillationCounter(momentum=0.01)
    for t in range(SEQUENCES.shape[1]):
        counter.update({"w": SEQUENCES[:, t].to(torch.int8)})
    assert counter.counts().tolist() == [len(steps) for steps in OSCILLATION_STEPS]
    # Frequency: EMA with momentum 0.01 of the indicator, over the 4 updates after the first.
    expected = []
    for steps in OSCILLATION_STEPS:
        frequency = 0.0
        for t in range(1, 5):
            frequency = 0.99 * frequency + 0.01 * (t in steps)
        expected.append(frequency)
    torch.testing.assert_close(counter.state["w"]["frequency"], torch.tensor(expected))
    summary = counter.summary()
    assert summary["osc_fraction"] == pytest.approx(4 / 5)
    assert summary["osc_frequency"] == pytest.approx(sum(expected) / 5)


def test_counter_save_load_round_trip(tmp_path):
    counter = OscillationCounter()
    for t in range(3):
        counter.update({"a.weight": SEQUENCES[:, t], "b.weight": SEQUENCES[:2, t].reshape(1, 2)})
    counter.save(tmp_path)
    restored = OscillationCounter(momentum=0.5)
    restored.load(tmp_path)
    assert restored.momentum == 0.01 and restored.updates == 3
    for name, entry in counter.state.items():
        for key, value in entry.items():
            assert torch.equal(restored.state[name][key], value)
    assert not any(path.suffix in (".bin", ".pt", ".pkl") for path in tmp_path.iterdir())


def _trainer(output_dir, max_steps, save_steps):
    digits = load_image_dataset("digits", max_train_samples=256, max_eval_samples=32)
    torch.manual_seed(0)
    args = OscillationConfig(
        output_dir=str(output_dir),
        osc_bits=3,
        osc_lambda=1.0,
        osc_eval_bits=[3],
        max_steps=max_steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=save_steps,
        save_strategy="steps",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = OscillationTrainer(
        model=build_vit(digits.info, digits.label_names, size="micro"), args=args, train_dataset=digits.train
    )
    tracker = add_oscillation_tracker(trainer, OscillationTracker(bits=3))
    return trainer, tracker


def test_tracker_logs_saves_figures_and_survives_resume(tmp_path):
    trainer, tracker = _trainer(tmp_path / "full", max_steps=6, save_steps=3)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 6 and all("osc_fraction" in entry and "osc_frequency" in entry for entry in logged)
    assert tracker.counter.updates == 7  # the reference codes + one update per step
    assert (tmp_path / "full" / "checkpoint-3" / STATE_FILE).is_file()
    for figure in ("weight_histogram.png", "oscillation_counts.png"):
        assert (tmp_path / "full" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "full" / "oscillations.json").read_text())
    assert summary["osc_fraction"] == pytest.approx(float((tracker.counter.counts() > 0).float().mean()))

    # Stop after 3 steps, resume from the checkpoint in a new process-like trainer: same counts as uninterrupted.
    trainer, _ = _trainer(tmp_path / "resumed", max_steps=6, save_steps=3)
    trainer.args.max_steps = 3
    trainer.train()
    trainer, resumed = _trainer(tmp_path / "resumed", max_steps=6, save_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.counter.updates == 7
    assert tracker.counter.counts().sum() > 0
    assert torch.equal(resumed.counter.counts(), tracker.counter.counts())
