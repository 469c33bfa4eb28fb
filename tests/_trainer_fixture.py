"""One small OscillationTrainer run (tiny ViT on digits, oscillation tracker on), built the same way by a single
process in tests/test_sharding.py and by each FSDP2 process in tests/_fsdp_worker.py."""

import numpy as np
import torch

from hf_oscq import OscillationConfig, OscillationTrainer
from hf_oscq.scripts.data import load_image_dataset
from hf_oscq.scripts.models import build_vit
from hf_oscq.training.tracking import OscillationTracker, add_oscillation_tracker

STEPS = 4
GLOBAL_BATCH = 16


def _accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def build_config(output_dir, method: str, per_device_batch: int = GLOBAL_BATCH, **extra) -> OscillationConfig:
    settings = dict(
        output_dir=str(output_dir),
        osc_method=method,
        osc_bits=3,
        osc_lambda=5.0 if method == "oscillation" else 0.0,  # only the regularizer uses it
        osc_eval_bits=[3],
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return OscillationConfig(**{**settings, **extra})


def build_trainer(args: OscillationConfig) -> OscillationTrainer:
    digits = load_image_dataset("digits", max_train_samples=256, max_eval_samples=64)
    torch.manual_seed(0)
    model = build_vit(digits.info, digits.label_names, size="micro")
    trainer = OscillationTrainer(
        model=model, args=args, train_dataset=digits.train, eval_dataset=digits.eval, compute_metrics=_accuracy
    )
    add_oscillation_tracker(trainer, OscillationTracker(bits=3))
    return trainer
