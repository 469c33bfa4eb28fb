"""A few OscillationTrainer steps of each peer method on a tiny Llama with a selected weight the forward pass never
uses; started by tests/training/test_methods.py once as `accelerate launch --multi_gpu --num_processes 2` (DDP,
gloo on CPU) and once as a single process with the same global batch:
`python tests/_ddp_methods_worker.py OUT_DIR PER_DEVICE_BATCH METHOD...`.

For each method the main process writes the trained weights to OUT_DIR/METHOD/weights.safetensors and the training
log to OUT_DIR/METHOD/log.json.
"""

import json
import sys
from pathlib import Path

import torch
from _ddp_lm_worker import GLOBAL_BATCH, STEPS, TokenWindows, build_model
from safetensors.torch import save_file

from hf_oscq import OscillationConfig, OscillationTrainer

SETTINGS = {
    "kure": {"osc_lambda": 0.5},
    "multibit_qat": {"osc_multibit_bits": [2, 4]},
    "dampening": {"osc_lambda": 50.0, "osc_dampening_schedule": "constant"},
}


def train(out: Path, per_device_batch: int, method: str) -> None:
    args = OscillationConfig(
        output_dir=str(out / method),
        osc_method=method,
        osc_bits=3,
        osc_eval_bits=[3],
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
        **SETTINGS[method],
    )
    model = build_model()
    trainer = OscillationTrainer(model=model, args=args, train_dataset=TokenWindows(STEPS * GLOBAL_BATCH))
    trainer.train()
    if trainer.is_world_process_zero():
        (out / method).mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().contiguous() for name, p in model.named_parameters()}
        save_file(weights, str(out / method / "weights.safetensors"))
        log = [entry for entry in trainer.state.log_history if "loss" in entry]
        (out / method / "log.json").write_text(json.dumps(log))


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[3:]:
        train(Path(sys.argv[1]), int(sys.argv[2]), name)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
