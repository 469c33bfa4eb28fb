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

    image = Image.fromarray(np.asarray(digits_splits()[1][0]["pixel_values"], dtype=np.uint8), "L")
    got = build_image_processor(DATASETS["digits"])(image, return_tensors="pt")
    torch.testing.assert_close(got["pixel_values"][0], digits.eval[0]["pixel_values"])


def test_digits_are_8_bit_images_of_sklearns_0_to_16_levels():
    from sklearn.datasets import load_digits

    from hf_oscq.scripts.data import digits_splits

    train, test = digits_splits()
    images = np.concatenate([np.asarray(split["pixel_values"], dtype=np.int64) for split in (train, test)])
    levels = np.unique(images)
    assert levels.tolist() == [round(x * 255 / 16) for x in range(17)]  # 0, 16, 32, ..., 239, 255
    raw = np.unique(load_digits().data.reshape(-1, 8, 8).sum(axis=(1, 2)))
    assert np.array_equal(np.unique((np.searchsorted(levels, images)).sum(axis=(1, 2))), raw)  # levels kept


def _modes(gray: np.ndarray) -> dict[str, Image.Image]:
    """One 8-bit grayscale image written in several PIL modes, each holding the same picture."""
    la = np.stack([gray, np.full_like(gray, 255)], axis=-1)
    palette = Image.fromarray(gray, "L").convert("P")
    return {
        "L": Image.fromarray(gray, "L"),
        "RGB": Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB"),
        "LA": Image.fromarray(la, "LA"),
        "RGBA": Image.fromarray(gray, "L").convert("RGBA"),
        "P": palette,
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "F": Image.fromarray(gray.astype(np.float32) / 255, "F"),
    }


@pytest.mark.parametrize("name", ["digits", "fashion_mnist"])
def test_saved_processor_reproduces_the_evaluation_tensors_from_images_of_any_mode(name, tmp_path):
    from hf_oscq.scripts.data import _idx_dir

    if name == "fashion_mnist" and _idx_dir(None) is None:
        pytest.skip("Fashion-MNIST IDX files not installed (Debian package dataset-fashion-mnist)")
    data = load_image_dataset(name, max_eval_samples=50)
    build_image_processor(data.info).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    raw = data.eval.with_format()
    for index in range(len(raw)):
        gray = np.asarray(raw[index]["pixel_values"], dtype=np.uint8)
        expected = data.eval[index]["pixel_values"]
        for mode, image in _modes(gray).items():
            got = processor(image, return_tensors="pt")["pixel_values"][0]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f"{name} #{index} as {mode}")


def _train_briefly(model, data, steps: int = 10):
    """A few Adam steps on the training split, so the model's predictions depend on the image."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [data.train[(64 * step + i) % len(data.train)] for i in range(64)]
        inputs = torch.stack([example["pixel_values"] for example in batch])
        labels = torch.tensor([example["labels"] for example in batch])
        model(pixel_values=inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _pipeline_matches_dataset(data, model, tmp_path, batch_size=64):
    """The `pipeline` on the eval split as 8-bit RGB PIL images (what it makes of any file) against the model on the
    dataset's tensors: the same prediction for every image, hence the same accuracy."""
    from transformers import pipeline

    processor = build_image_processor(data.info)  # plain rounding: the preprocessing is what is compared here
    out = hf_oscq.export_quantized(
        model.eval(), tmp_path / "export", bits=(3,), image_processor=processor, plain_rounding=True
    )
    folder = out / "w3"
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    tensors = torch.stack([data.eval[i]["pixel_values"] for i in range(len(data.eval))])
    labels = np.asarray(data.eval["labels"])
    with torch.no_grad():
        expected = torch.cat([loaded(pixel_values=chunk).logits.argmax(-1) for chunk in tensors.split(256)]).numpy()
    classify = pipeline("image-classification", model=str(folder))
    raw = data.eval.with_format()["pixel_values"]
    images = [Image.fromarray(np.asarray(image, dtype=np.uint8), "L").convert("RGB") for image in raw]
    results = classify(images, top_k=1, batch_size=batch_size)
    names = [name for name, _ in sorted(loaded.config.label2id.items(), key=lambda item: item[1])]
    got = np.array([names.index(result[0]["label"]) for result in results])
    assert len(set(expected.tolist())) >= 3, "a model predicting one class would make the comparison empty"
    np.testing.assert_array_equal(got, expected)
    return float((got == labels).mean()), float((expected == labels).mean())


@pytest.mark.parametrize("model_name", ["vit", "resnet18"])
def test_pipeline_on_a_digits_export_equals_the_model_on_the_dataset(model_name, tmp_path):
    data = load_image_dataset("digits")
    model = build_model(model_name, data.info, data.label_names, vit_size="micro")
    pipeline_accuracy, dataset_accuracy = _pipeline_matches_dataset(data, model, tmp_path)
    assert pipeline_accuracy == dataset_accuracy


@pytest.mark.slow
def test_pipeline_on_a_fashion_mnist_export_equals_the_model_on_the_dataset(tmp_path):
    from hf_oscq.scripts.data import _idx_dir

    if _idx_dir(None) is None:
        pytest.skip("Fashion-MNIST IDX files not installed (Debian package dataset-fashion-mnist)")
    # The first 1000 of the 10,000 test images: the whole split takes minutes through the pipeline on 2 cores.
    data = load_image_dataset("fashion_mnist", max_eval_samples=1000)
    model = _train_briefly(build_model("vit", data.info, data.label_names, vit_size="micro"), data)
    pipeline_accuracy, dataset_accuracy = _pipeline_matches_dataset(data, model, tmp_path, batch_size=256)
    assert len(data.eval) == 1000 and pipeline_accuracy == dataset_accuracy


def test_rgb_processor_converts_8_bit_modes_as_to_model_image_does():
    """RGB datasets keep transformers' ViTImageProcessor: for 8-bit images of any mode it prepares what the datasets'
    `to_model_image` conversion gives (transparency on white)."""
    from hf_oscq import to_model_image

    info = DATASETS["cifar10"]
    processor = build_image_processor(info)
    assert type(processor).__name__ == "ViTImageProcessor"
    rgba = np.random.default_rng(2).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    images = {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": Image.fromarray(rgba[..., 2:], "LA"),
        "L": Image.fromarray(rgba[..., 0], "L"),
        "P": Image.fromarray(rgba[..., :3], "RGB").quantize(64),
        "CMYK": Image.fromarray(rgba, "CMYK"),
    }
    mean, std = torch.tensor(info.mean)[:, None, None], torch.tensor(info.std)[:, None, None]
    for mode, image in images.items():
        converted = torch.tensor(np.asarray(to_model_image(image, "RGB", 255)), dtype=torch.float32).permute(2, 0, 1)
        got = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(got, (converted / 255 - mean) / std, rtol=0, atol=1e-5, msg=mode)
