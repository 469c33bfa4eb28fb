"""A few OscillationTrainer steps on a tiny Llama with a selected weight that the forward pass never uses; started
by tests/training/test_lm.py once as `accelerate launch --multi_gpu --num_processes 2` (DDP, gloo on CPU) and once
as a single process with the same global batch: `python tests/_ddp_lm_worker.py OUT_DIR PER_DEVICE_BATCH`.

The main process writes the trained weights to OUT_DIR/weights.safetensors.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_oscq import OscillationConfig, OscillationTrainer
from hf_oscq.scripts.launch import end_processes

STEPS, GLOBAL_BATCH, LENGTH, VOCAB = 3, 8, 12, 24


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    model.model.unused_projection = nn.Linear(16, 16, bias=False)  # selected by default, never called
    return model


def main(out: Path, per_device_batch: int) -> None:
    torch.set_num_threads(1)
    args = OscillationConfig(
        output_dir=str(out),
        osc_method="oscillation",
        osc_bits=3,
        osc_lambda=20.0,
        osc_group_size=8,
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
    )
    model = build_model()
    trainer = OscillationTrainer(model=model, args=args, train_dataset=TokenWindows(STEPS * GLOBAL_BATCH))
    trainer.train()
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().contiguous() for name, p in model.named_parameters()}
        save_file(weights, str(out / "weights.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    end_processes()  # no process group left for the interpreter's exit to abort
