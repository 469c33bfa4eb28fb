"""The paper's models as transformers classes: ResNet-18 (timm, through `TimmWrapperForImageClassification`) and a
tiny ViT (`ViTForImageClassification`), plus the image processor saved next to them.

Tiny ViT (`tiny_vit_config`, size "tiny"): hidden size 192, 6 layers, 3 heads, MLP 768, no dropout, CLS token
pooling; patches of 4 pixels on 32x32 (64 tokens) and 28x28 (49 tokens), 8 on 64x64 (64 tokens), 2 on 8x8 (16
tokens). Size "micro" (hidden 64, 2 layers, 4 heads, MLP 128) is the quick CPU model of the digits demo.

Fine-tuned tiny ViT (`pretrained=True`): timm's ViT-Ti/16 (hidden size 192, 12 layers, 3 heads, MLP 768) with its
ImageNet weights, through `TimmWrapperForImageClassification`; timm resamples the patch embedding to the patch size
above and the position embeddings to the token grid, and the classifier is new.

ResNet-18 with `cifar_stem=True` is timm's `resnet18` with a 3x3 stride-1 first convolution and no max-pool,
defined in `hf_oscq.timm_models` and registered in timm as `resnet18_cifar` as soon as timm is imported after
`import hf_oscq`, so `import hf_oscq` is all a saved model needs.
"""

from __future__ import annotations

from transformers import (
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from ..errors import OscqValueError
from ..image_processing import OscqImageProcessor
from ..timm_models import CIFAR_RESNET18
from .data import DatasetInfo, HubUnreachableError

MODEL_NAMES = ("vit", "resnet18")
PRETRAINED_RESNET18 = "timm/resnet18.a1_in1k"
PRETRAINED_VIT = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
VIT_SIZES = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768},
    "micro": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
}
_PATCH_SIZES = {8: 2, 28: 4, 32: 4, 64: 8}


def _labels(label_names: list[str]) -> dict:
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _patch_size(info: DatasetInfo, patch_size: int | None) -> int:
    patch_size = patch_size or _PATCH_SIZES.get(info.image_size) or max(1, info.image_size // 8)
    if info.image_size % patch_size:
        raise OscqValueError(
            f"patch_size {patch_size} does not divide the image size {info.image_size}: pick a divisor of it."
        )
    return patch_size


def _unreachable(weights: str, error: OSError) -> HubUnreachableError:
    return HubUnreachableError(
        f"--pretrained needs the ImageNet weights {weights!r} from the Hugging Face Hub, which could not be reached "
        f"({str(error).splitlines()[0]}). Train from scratch (drop --pretrained) or run where the Hub is reachable "
        "(a cached download also works offline)."
    )


def tiny_vit_config(
    info: DatasetInfo, label_names: list[str], size: str = "tiny", patch_size: int | None = None
) -> ViTConfig:
    """The ViTConfig of the paper's tiny ViT for a dataset (see the module docstring for the exact numbers).

    Args:
        info: the dataset's `DatasetInfo` (image size and channels).
        label_names: class names, in label order.
        size: "tiny" or "micro".
        patch_size: patch side in pixels; must divide the image size. Default: 2 / 4 / 4 / 8 pixels for images of
            8 / 28 / 32 / 64 pixels, else an eighth of the side.
    """
    if size not in VIT_SIZES:
        raise OscqValueError(f"Unknown ViT size {size!r}: choose one of {sorted(VIT_SIZES)}.")
    patch_size = _patch_size(info, patch_size)
    return ViTConfig(
        image_size=info.image_size,
        patch_size=patch_size,
        num_channels=info.num_channels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **VIT_SIZES[size],
        **_labels(label_names),
    )


def build_vit(
    info: DatasetInfo, label_names: list[str], size: str = "tiny", patch_size: int | None = None
) -> ViTForImageClassification:
    """A randomly initialised tiny ViT for the dataset."""
    return ViTForImageClassification(tiny_vit_config(info, label_names, size, patch_size))


def build_pretrained_vit(
    info: DatasetInfo, label_names: list[str], patch_size: int | None = None, weights_file: str | None = None
) -> TimmWrapperForImageClassification:
    """The tiny ViT for fine-tuning: ViT-Ti/16 with its ImageNet weights, adapted to the dataset's images.

    Args:
        info: the dataset's `DatasetInfo` (RGB images).
        label_names: class names, in label order.
        patch_size: as in `tiny_vit_config`; the pretrained 16x16 patch embedding is resampled to it.
        weights_file: a local safetensors copy of `PRETRAINED_VIT`'s weights instead of the Hub download.

    Raises:
        HubUnreachableError: when the weights cannot be downloaded.
        OscqValueError: for images that are not RGB.
    """
    import timm

    if info.num_channels != 3:
        raise OscqValueError(f"ImageNet weights need RGB images; {info.name} has {info.num_channels} channel(s).")
    architecture = PRETRAINED_VIT.split("/")[1].split(".")[0]
    model_args = {"img_size": info.image_size, "patch_size": _patch_size(info, patch_size)}
    local = {"file": weights_file, "custom_load": False} if weights_file else None
    try:
        pretrained = timm.create_model(
            PRETRAINED_VIT.split("/")[1],
            pretrained=True,
            num_classes=len(label_names),
            pretrained_cfg_overlay=local,
            **model_args,
        )
    except OSError as error:
        raise _unreachable(PRETRAINED_VIT, error) from None
    model = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture=architecture, model_args=model_args, **_labels(label_names))
    )
    model.timm_model.load_state_dict(pretrained.state_dict())
    return model


def build_resnet18(
    info: DatasetInfo, label_names: list[str], cifar_stem: bool = True, pretrained: bool = False
) -> TimmWrapperForImageClassification:
    """ResNet-18 from timm as a transformers model, randomly initialised or from ImageNet weights.

    Args:
        info: the dataset's `DatasetInfo`.
        label_names: class names, in label order.
        cifar_stem: 3x3 stride-1 first convolution and no max-pool (for 32x32 and smaller images).
        pretrained: start from timm's ImageNet weights (`timm/resnet18.a1_in1k`, downloaded from the Hub); the
            classifier is new, and so is the first convolution with `cifar_stem`.

    Raises:
        HubUnreachableError: with `pretrained` when the Hub cannot be reached.
        OscqValueError: with `pretrained` and images that are not RGB.
    """
    architecture = CIFAR_RESNET18 if cifar_stem else "resnet18"
    model_args = {"in_chans": info.num_channels} if info.num_channels != 3 else None
    if not pretrained:
        config = TimmWrapperConfig(architecture=architecture, model_args=model_args, **_labels(label_names))
        return TimmWrapperForImageClassification(config)
    if info.num_channels != 3:
        raise OscqValueError(f"ImageNet weights need RGB images; {info.name} has {info.num_channels} channel(s).")
    try:
        config = TimmWrapperConfig.from_pretrained(PRETRAINED_RESNET18, **_labels(label_names))
        config.architecture = architecture
        return TimmWrapperForImageClassification.from_pretrained(
            PRETRAINED_RESNET18, config=config, ignore_mismatched_sizes=True
        )
    except OSError as error:
        raise _unreachable(PRETRAINED_RESNET18, error) from None


def build_model(
    name: str,
    info: DatasetInfo,
    label_names: list[str],
    *,
    vit_size: str = "tiny",
    patch_size: int | None = None,
    cifar_stem: bool = True,
    pretrained: bool = False,
) -> PreTrainedModel:
    """`build_vit` (`build_pretrained_vit` with `pretrained`) or `build_resnet18` by name ("vit" or "resnet18")."""
    if name == "vit":
        if not pretrained:
            return build_vit(info, label_names, vit_size, patch_size)
        if vit_size != "tiny":
            raise OscqValueError(f"ImageNet weights exist for --vit_size tiny only (ViT-Ti/16), got {vit_size!r}.")
        return build_pretrained_vit(info, label_names, patch_size)
    if name == "resnet18":
        return build_resnet18(info, label_names, cifar_stem, pretrained)
    raise OscqValueError(f"Unknown model {name!r}: choose one of {MODEL_NAMES}.")


def build_image_processor(info: DatasetInfo) -> ViTImageProcessor:
    """The image processor that turns an 8-bit image of any mode into the model's inputs exactly as the dataset's
    evaluation split prepares them: resize to the dataset's side, rescale by 1/255, normalise with its mean and std.

    RGB datasets get transformers' `ViTImageProcessor` (which composites transparency on white); 1-channel ones, or
    a dataset drawn on another background, `OscqImageProcessor`, which converts every image with `to_model_image`.
    """
    settings = {
        "do_resize": True,
        "size": {"height": info.image_size, "width": info.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(info.mean),
        "image_std": list(info.std),
    }
    if info.num_channels == 3 and info.background == 255:
        return ViTImageProcessor(do_convert_rgb=True, **settings)
    return OscqImageProcessor(num_channels=info.num_channels, background=info.background, **settings)
