import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, TimmWrapperConfig

import hf_oscq  # noqa: F401  (registers resnet18_cifar with timm, as a user's `import hf_oscq` does)
from hf_oscq.scripts.data import DATASETS, HubUnreachableError, load_image_dataset
from hf_oscq.scripts.models import (
    build_image_processor,
    build_model,
    build_pretrained_vit,
    build_resnet18,
    tiny_vit_config,
)

LABELS = [f"class{i}" for i in range(10)]


def test_resnet18_cifar_stem_and_save_load_round_trip(tmp_path):
    model = build_resnet18(DATASETS["cifar10"], LABELS, cifar_stem=True).eval()
    conv = model.timm_model.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.timm_model.maxpool, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # ResNet-18 with a 3x3 stem, 10 classes
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.id2label[3] == "class3"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)


def test_resnet18_imagenet_stem_and_grayscale():
    model = build_resnet18(DATASETS["cifar10"], LABELS, cifar_stem=False)
    assert model.timm_model.conv1.kernel_size == (7, 7) and isinstance(model.timm_model.maxpool, nn.MaxPool2d)
    gray = build_resnet18(DATASETS["fashion_mnist"], LABELS)
    assert gray.timm_model.conv1.in_channels == 1
    assert gray(pixel_values=torch.randn(2, 1, 28, 28)).logits.shape == (2, 10)


def test_pretrained_without_hub_is_a_clear_error(monkeypatch):
    def unreachable(*args, **kwargs):  # the download, as huggingface_hub reports a missing connection
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(TimmWrapperConfig, "from_pretrained", unreachable)
    with pytest.raises(HubUnreachableError, match="drop --pretrained"):
        build_resnet18(DATASETS["cifar10"], LABELS, pretrained=True)
    with pytest.raises(HubUnreachableError, match="vit_tiny_patch16_224.augreg_in21k_ft_in1k"):
        build_model("vit", DATASETS["cifar10"], LABELS, pretrained=True)  # HF_HUB_OFFLINE: timm's download fails
    with pytest.raises(ValueError, match="need RGB images"):
        build_model("vit", DATASETS["fashion_mnist"], LABELS, pretrained=True)
    with pytest.raises(ValueError, match="--vit_size tiny only"):
        build_model("vit", DATASETS["cifar10"], LABELS, vit_size="micro", pretrained=True)


def test_pretrained_vit_takes_the_imagenet_weights_and_adapts_the_patch_grid(tmp_path):
    torch.manual_seed(0)
    imagenet = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # stands in for the Hub download
    save_file(imagenet.state_dict(), str(tmp_path / "vit_tiny.safetensors"))
    model = build_pretrained_vit(DATASETS["cifar10"], LABELS, weights_file=str(tmp_path / "vit_tiny.safetensors"))
    vit = model.timm_model
    assert vit.patch_embed.proj.weight.shape == (192, 3, 4, 4)  # 16x16 patches resampled to 4x4
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 192)  # class token + an 8x8 grid instead of 14x14
    torch.testing.assert_close(vit.pos_embed[:, 0], imagenet.pos_embed[:, 0], rtol=0, atol=0)
    for name in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "norm.weight"):
        assert torch.equal(vit.get_parameter(name), imagenet.get_parameter(name)), name
    assert vit.head.weight.shape == (10, 192)  # a new classifier
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model.eval()(pixels).logits)


@pytest.mark.parametrize(
    ("dataset", "patch", "tokens"),
    [("cifar10", 4, 64), ("fashion_mnist", 4, 49), ("digits", 2, 16), ("tiny-imagenet", 8, 64)],
)
def test_tiny_vit_config(dataset, patch, tokens):
    info = DATASETS[dataset]
    config = tiny_vit_config(info, LABELS)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        192,
        6,
        3,
        768,
    )
    assert (config.patch_size, config.num_channels, config.image_size) == (patch, info.num_channels, info.image_size)
    model = build_model("vit", info, LABELS, vit_size="micro")
    pixels = torch.randn(2, info.num_channels, info.image_size, info.image_size)
    hidden = model.vit(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (2, tokens + 1, 64)  # patches + CLS


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="does not divide"):
        tiny_vit_config(DATASETS["fashion_mnist"], LABELS, patch_size=3)


def test_image_processor_reproduces_the_evaluation_transform(tmp_path):
    processor = build_image_processor(DATASETS["cifar10"])
    processor.save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    info = DATASETS["cifar10"]
    expected = (
        torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
        - torch.tensor(info.mean)[:, None, None]
    ) / torch.tensor(info.std)[:, None, None]
    got = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    digits = load_image_dataset("digits")
    from hf_oscq.scripts.data import digits_splits

    raw = np.asarray(digits_splits()[1][0]["pixel_values"], dtype=np.float32)[None]
    got = build_image_processor(DATASETS["digits"])(raw, return_tensors="pt", input_data_format="channels_first")
    torch.testing.assert_close(got["pixel_values"][0], digits.eval[0]["pixel_values"])
