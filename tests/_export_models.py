"""Tiny seeded models the export, checkpoint and CLI tests quantize: a ViT and timm's ResNet-18 (narrow)."""

import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, ViTConfig, ViTForImageClassification

ALL_BITS = (2, 3, 4, 5, 6, 7, 8)


def tiny_vit(num_channels: int = 1, num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=num_channels,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def tiny_resnet18() -> TimmWrapperForImageClassification:
    """timm's resnet18 (BasicBlock, layers 2-2-2-2) with narrow channels, built from the config alone (no Hub)."""
    import timm

    torch.manual_seed(0)
    config = TimmWrapperConfig(
        architecture="resnet18",
        num_labels=5,
        model_args={"channels": (8, 16, 32, 64), "stem_width": 8},
        pretrained_cfg=timm.models.get_pretrained_cfg("resnet18").to_dict(),
    )
    model = TimmWrapperForImageClassification(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that re-estimating them changes the logits
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits
