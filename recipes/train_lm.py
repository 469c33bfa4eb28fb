"""Train a causal language model with oscillation regularization, report its perplexity at every bit-width, export,
sample and publish it.

    python recipes/train_lm.py --config recipes/configs/lm_kjv_scratch.yaml          # offline, 2 CPU cores
    accelerate launch recipes/train_lm.py --config recipes/configs/lm_smollm2_finetune.yaml   # Hub model + data

Every Trainer flag and every osc_* flag can be given or overridden on the command line; see docs/RECIPES.md.
"""

from hf_oscq.scripts.lm_recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
