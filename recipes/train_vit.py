"""Train the tiny ViT with oscillation regularization, evaluate it at every bit-width, export and publish it.

    accelerate launch recipes/train_vit.py --config recipes/configs/vit_cifar10_scratch.yaml [--flag value ...]
    python recipes/train_vit.py --config recipes/configs/digits_demo.yaml   # bundled digits, 2 CPU cores

Every Trainer flag (--learning_rate, --report_to tensorboard, ...) and every osc_* flag can be given or overridden
on the command line; see docs/RECIPES.md.
"""

from hf_oscq.scripts.recipe import main

if __name__ == "__main__":
    raise SystemExit(main(model="vit"))
