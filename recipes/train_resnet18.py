"""Train ResNet-18 (timm) with oscillation regularization, evaluate it at every bit-width, export and publish it.

    accelerate launch recipes/train_resnet18.py --config recipes/configs/resnet18_cifar10_scratch.yaml [--flag value]
    accelerate launch recipes/train_resnet18.py --config recipes/configs/resnet18_cifar10_finetune.yaml

Every Trainer flag and every osc_* flag can be given or overridden on the command line; see docs/RECIPES.md.
"""

from hf_oscq.scripts.recipe import main

if __name__ == "__main__":
    raise SystemExit(main(model="resnet18"))
