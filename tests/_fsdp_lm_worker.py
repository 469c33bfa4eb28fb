"""A few OscillationTrainer steps on a tiny Llama, started by tests/training/test_lm.py once as
`torchrun --nproc_per_node 2 tests/_fsdp_lm_worker.py OUT_DIR 4 fsdp` (FSDP2 through accelerate, gloo on CPU) and
once as a single process with the same global batch: `python tests/_fsdp_lm_worker.py OUT_DIR 8 single`.

The main process writes the logged losses and the cross-bit evaluation to OUT_DIR/result.json and the trained
weights (gathered by `save_model`) to OUT_DIR.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_oscq import OscillationConfig, OscillationTrainer
from hf_oscq.quantization.sharding import is_sharded
from hf_oscq.scripts.launch import end_processes

STEPS, LENGTH, VOCAB = 3, 12, 24


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))

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
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def main(out: Path, per_device_batch: int, mode: str) -> None:
    extra = {}
    if mode == "fsdp":
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    args = OscillationConfig(
        output_dir=str(out),
        osc_method="oscillation",
        osc_bits=3,
        osc_lambda=5.0,
        osc_group_size=8,
        osc_eval_bits=[2, 3],
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
        **extra,
    )
    if mode == "fsdp":
        # accelerate 1.15 runs FSDP only on accelerator devices: once the arguments are built the launcher type is
        # set to multi-GPU, and the processes still train on CPU with gloo (as tests/_fsdp_worker.py does).
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    trainer = OscillationTrainer(
        model=build_model(),
        args=args,
        train_dataset=TokenWindows(STEPS * 8, seed=0),
        eval_dataset=TokenWindows(8, seed=1),
    )
    trainer.train()
    trainer.save_model()
    result = {
        "world_size": args.world_size,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version if mode == "fsdp" else None,
        "sharded": is_sharded(trainer.model),
        "log": [entry for entry in trainer.state.log_history if "loss" in entry],
        "metrics": trainer.evaluate(),
    }
    if trainer.is_world_process_zero():
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    end_processes()  # no process group left for the interpreter's exit to abort
