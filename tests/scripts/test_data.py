import gzip

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_oscq.scripts.data import DATASETS, FASHION_MNIST_DIR, HubUnreachableError, load_image_dataset, read_idx


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return tmp_path


def test_read_idx_round_trip_and_truncation(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    with gzip.open(tmp_path / "bad.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + np.asarray([5], dtype=">u4").tobytes() + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_from_data_dir(idx_dir):
    data = load_image_dataset("fashion_mnist", data_dir=idx_dir)
    assert (len(data.train), len(data.eval)) == (6, 4)
    assert data.label_names[9] == "Ankle boot"
    raw = read_idx(idx_dir / "t10k-images-idx3-ubyte.gz")[1].astype(np.float32)
    expected = (raw / 255 - 0.2860) / 0.3530
    sample = data.eval[1]
    assert sample["labels"] == 1
    torch.testing.assert_close(sample["pixel_values"][0], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # Training images are randomly cropped with 2 pixels of zero padding: every value is an input value or padding.
    train_raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")[0].astype(np.float32)
    allowed = np.append((train_raw.ravel() / 255 - 0.2860) / 0.3530, -0.2860 / 0.3530)
    values = data.train[0]["pixel_values"].numpy().ravel()
    assert data.train[0]["pixel_values"].shape == (1, 28, 28)
    assert np.abs(values[:, None] - allowed[None]).min(axis=1).max() < 1e-5


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    data = load_image_dataset("fashion_mnist", max_train_samples=10)
    assert (len(data.train), len(data.eval)) == (10, 10000)
    assert data.eval[0]["pixel_values"].shape == (1, 28, 28)


def test_digits_are_normalised_to_minus_one_one():
    from sklearn.datasets import load_digits

    data = load_image_dataset("digits", validation_fraction=0.25)
    assert (len(data.train), len(data.validation), len(data.eval)) == (1077, 360, 360)
    pixels = torch.stack([data.eval[i]["pixel_values"] for i in range(len(data.eval))])
    assert pixels.shape == (360, 1, 8, 8) and pixels.min() == -1 and pixels.max() == 1
    raw = load_digits().data.reshape(-1, 8, 8)
    order = np.random.default_rng(0).permutation(1797)
    # The 0..16 ink levels x as 8-bit pixels p = round(x * 255 / 16), normalised (p / 255 - 0.5) / 0.5.
    expected = np.round(raw[order[1437]] * 255 / 16) / 127.5 - 1
    torch.testing.assert_close(pixels[0, 0], torch.tensor(expected, dtype=torch.float32))


def _cifar_like(image_column, size, names, gray_first=False):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(3)]
    if gray_first:
        images[0] = images[0].convert("L")
    features = datasets.Features({image_column: datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({image_column: images, "label": [0, 1, 2]}, features=features), images


def test_cifar10_schema_from_save_to_disk(tmp_path):
    split, images = _cifar_like("img", 32, ["airplane", "automobile", "bird"])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "cifar"))
    data = load_image_dataset("cifar10", data_dir=tmp_path / "cifar")
    assert data.label_names == ["airplane", "automobile", "bird"]
    info = DATASETS["cifar10"]
    expected = (
        torch.tensor(np.asarray(images[2]), dtype=torch.float32).permute(2, 0, 1) / 255
        - torch.tensor(info.mean)[:, None, None]
    ) / torch.tensor(info.std)[:, None, None]
    torch.testing.assert_close(data.eval[2]["pixel_values"], expected, rtol=1e-5, atol=1e-5)
    assert data.eval[2]["labels"] == 2 and data.train[0]["pixel_values"].shape == (3, 32, 32)


def test_tiny_imagenet_schema_from_parquet(tmp_path):
    split, _ = _cifar_like("image", 64, ["n01443537", "n01629819", "n01641577"], gray_first=True)
    split.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    split.to_parquet(str(tmp_path / "valid-00000-of-00001.parquet"))
    data = load_image_dataset("tiny-imagenet", data_dir=tmp_path)
    assert len(data.train) == 3 and len(data.eval) == 3
    gray = data.eval[0]["pixel_values"]
    assert gray.shape == (3, 64, 64)  # a grayscale image is converted to RGB
    info = DATASETS["tiny-imagenet"]
    raw = gray * torch.tensor(info.std)[:, None, None] + torch.tensor(info.mean)[:, None, None]
    torch.testing.assert_close(raw[0], raw[1])
    torch.testing.assert_close(raw[1], raw[2])


def test_wrong_schema_is_a_clear_error(tmp_path):
    split, _ = _cifar_like("image", 32, ["a", "b", "c"])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"needs the columns \['img', 'label'\]"):
        load_image_dataset("cifar10", data_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_image_dataset("imagenet")


def test_hub_unreachable_names_the_offline_options(monkeypatch):
    def unreachable(*args, **kwargs):  # the network call, as datasets raises it without a connection
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for name in ("cifar10", "tiny-imagenet"):
        with pytest.raises(HubUnreachableError) as caught:
            load_image_dataset(name)
        message = str(caught.value)
        for option in ("--dataset digits", "--dataset fashion_mnist", "dataset-fashion-mnist", "--data_dir"):
            assert option in message
        assert DATASETS[name].hub_id in message
