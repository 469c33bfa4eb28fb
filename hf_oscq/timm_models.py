"""timm architectures hf_oscq defines: `resnet18_cifar`, ResNet-18 for small images (3x3 stride-1 stem
convolution, no max-pool; He et al.'s CIFAR variant).

Exported CIFAR ResNet-18 checkpoints name it in their config, so timm must know it when they load: `import hf_oscq`
registers it as soon as timm is imported (by transformers' TimmWrapper or anyone else), never importing timm itself.
"""

from __future__ import annotations

import inspect
from types import ModuleType

CIFAR_RESNET18 = "resnet18_cifar"


def register_timm_models(timm: ModuleType | None = None) -> None:
    """Registers `resnet18_cifar` with timm (once; called with the timm module by the import hook)."""
    if timm is None:
        import timm
    if timm.is_model(CIFAR_RESNET18):
        return
    from timm.models import register_model
    from timm.models.resnet import BasicBlock, ResNet
    from torch import nn

    resnet_arguments = set(inspect.signature(ResNet.__init__).parameters) - {"self", "block", "layers"}

    def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
        """ResNet-18 for small images: 3x3 stride-1 stem convolution, no max-pool (He et al.'s CIFAR variant)."""
        if pretrained:
            from .errors import OscqValueError

            raise OscqValueError("resnet18_cifar has no timm weights: use build_resnet18(..., pretrained=True).")
        # timm's factory also passes its own options (pretrained_cfg, cache_dir, ...): keep the model's arguments.
        kwargs = {key: value for key, value in kwargs.items() if key in resnet_arguments}
        model = ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)
        model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model

    register_model(resnet18_cifar)
