"""Image classification datasets for the recipes, as `datasets.Dataset` splits yielding `pixel_values` and `labels`.

* `digits`: scikit-learn's bundled 8x8 digits (always offline).
* `fashion_mnist`: the IDX files of Debian's `dataset-fashion-mnist` (or any `data_dir`), else the Hub.
* `cifar10` (`uoft-cs/cifar10`) and `tiny-imagenet` (`zh-plus/tiny-imagenet`): the Hub, or a local copy in
  `data_dir` (a `save_to_disk` folder or parquet files with the Hub's columns).

Training splits are augmented (random crop with padding, horizontal flip where it suits the images); every split
is normalised with the statistics in `DatasetInfo`, which the saved image processor (`build_image_processor`) repeats
from any 8-bit image.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from torchvision.transforms import v2

from ..errors import OscqError, OscqValueError
from ..image_processing import to_model_image
from .dataset_errors import dataset_errors

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and its image processor need to know about a dataset.

    Images are 8-bit; a pixel value `p` becomes `(p / 255 - mean) / std` per channel. `background` is the gray level
    transparent pixels of an input are composited on (`to_model_image`): 0 for the digits and Fashion-MNIST, drawn
    on black, 255 (transformers' convention) for photos.
    """

    name: str
    image_size: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    background: int = 255
    hub_id: str | None = None
    image_column: str = "image"
    eval_split: str = "test"
    crop_padding: int = 4
    flip: bool = True


DATASETS = {
    "digits": DatasetInfo("digits", 8, 1, (0.5,), (0.5,), background=0, crop_padding=0, flip=False),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        28,
        1,
        (0.2860,),
        (0.3530,),
        background=0,
        hub_id="zalando-datasets/fashion_mnist",
        crop_padding=2,
        flip=False,
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        32,
        3,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        hub_id="uoft-cs/cifar10",
        image_column="img",
    ),
    "tiny-imagenet": DatasetInfo(
        "tiny-imagenet",
        64,
        3,
        (0.4802, 0.4481, 0.3975),
        (0.2770, 0.2691, 0.2821),
        hub_id="zh-plus/tiny-imagenet",
        eval_split="valid",
        crop_padding=8,
    ),
}


@dataclass
class ImageDataset:
    """Train and evaluation splits ready for the Trainer, with the label names and the dataset's `DatasetInfo`."""

    train: datasets.Dataset
    eval: datasets.Dataset
    label_names: list[str]
    info: DatasetInfo
    validation: datasets.Dataset | None = None


class HubUnreachableError(OscqError, RuntimeError):
    """A dataset or model that lives on the Hugging Face Hub could not be downloaded."""


def offline_hint() -> str:
    return (
        "Offline options: --dataset digits (scikit-learn's bundled digits), or --dataset fashion_mnist with the "
        f"Debian package dataset-fashion-mnist (IDX files in {FASHION_MNIST_DIR}) or --data_dir pointing at the "
        "four Fashion-MNIST IDX .gz files; for cifar10 / tiny-imagenet, --data_dir with a local copy (a folder "
        "written by datasets' save_to_disk, or the dataset's parquet files)."
    )


def load_image_dataset(
    name: str,
    data_dir: str | Path | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    validation_fraction: float = 0.0,
) -> ImageDataset:
    """Loads a dataset by name, with augmentation on the training split and normalisation on both.

    Args:
        name: one of `DATASETS` (`digits`, `fashion_mnist`, `cifar10`, `tiny-imagenet`).
        data_dir: a local copy: Fashion-MNIST IDX files, or for the Hub datasets a `save_to_disk` folder or a
            folder of parquet files. Without it, Fashion-MNIST is read from the Debian package when installed,
            and the Hub datasets are downloaded.
        seed: seed of the digits train/test split.
        max_train_samples: keep the first samples of the training split only (quick runs).
        max_eval_samples: the same for the evaluation split.
        validation_fraction: hold out this fraction of the training split (seeded) as `validation`, for model
            selection; 0 leaves `validation` at `None`.

    Returns:
        An `ImageDataset`.

    Raises:
        OscqValueError: for an unknown name or a local copy without the expected columns or splits.
        HubUnreachableError: when the dataset has to come from the Hub and the Hub cannot be reached.
    """
    train, test, label_names = raw_splits(name, data_dir, seed)
    info = DATASETS[name]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        test = test.select(range(min(max_eval_samples, len(test))))
    validation = None
    if validation_fraction > 0:
        held_out = train.train_test_split(test_size=validation_fraction, seed=seed)
        train, validation = held_out["train"], held_out["test"]
        validation.set_transform(_transform(info, train=False))
    train.set_transform(_transform(info, train=True))
    test.set_transform(_transform(info, train=False))
    return ImageDataset(train, test, label_names, info, validation)


def split_name(info: DatasetInfo, seed: int = 0) -> str:
    """The name of a recipe dataset's evaluation split as a `Provenance` records it: the Hub's (`test`, `valid`), or
    for a dataset split here by seed (`digits`), the seed too."""
    return info.eval_split if info.hub_id else f"{info.eval_split} (80/20 split, seed {seed})"


def check_dataset_name(name: str) -> None:
    """Raises `OscqValueError` naming the choices when `name` is not one of `DATASETS`."""
    if name not in DATASETS:
        raise OscqValueError(
            f"Unknown dataset {name!r}: choose one of {sorted(DATASETS)} (digits is bundled, fashion_mnist reads "
            "local IDX files or the Hub, the others come from the Hub)."
        )


def raw_splits(
    name: str, data_dir: str | Path | None = None, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """`(train, evaluation split, label names)` of a dataset of `DATASETS`, with columns `pixel_values` (images as
    stored: arrays or PIL images) and `labels`, without any transform. Arguments as in `load_image_dataset`.

    Raises:
        OscqValueError: for an unknown name or a local copy without the expected columns or splits.
        HubUnreachableError: when the dataset has to come from the Hub and the Hub cannot be reached.
    """
    check_dataset_name(name)
    if name == "digits":
        return *digits_splits(seed), [str(i) for i in range(10)]
    if name == "fashion_mnist" and (idx_dir := _idx_dir(data_dir)) is not None:
        return *_fashion_mnist_idx(idx_dir), list(FASHION_MNIST_LABELS)
    return _load_hub_schema(DATASETS[name], data_dir)


def digits_splits(seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A fixed 80/20 train/test split of scikit-learn's 1797 digits, as (8, 8) 8-bit grayscale images.

    scikit-learn's 0..16 ink levels `x` become the pixel values `round(x * 255 / 16)` (0, 16, 32, ..., 239, 255):
    all 17 levels kept, on the 0..255 scale of every other 8-bit image, so a digit saved as a PNG and read back
    through the saved image processor is exactly the training input. The splits carry no transform:
    `load_image_dataset("digits")` adds the normalisation.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    images = np.rint(digits.data.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    return tuple(
        datasets.Dataset.from_dict({"pixel_values": images[part], "labels": digits.target[part].astype(np.int64)})
        for part in (order[:cut], order[cut:])
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (`.gz` or plain), the format of MNIST and Fashion-MNIST, as an unsigned-byte array.

    Raises:
        OscqValueError: when the file is not an unsigned-byte IDX file or its size does not match its header.
    """
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise OscqValueError(f"{path} is not an unsigned-byte IDX file (magic 0x0000080N expected).")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise OscqValueError(f"{path}: header says shape {shape} but the file holds {data.size} values (truncated?).")
    return data.reshape(shape)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_dir(data_dir: str | Path | None) -> Path | None:
    """`data_dir` (by default the Debian package's folder) if it holds the four Fashion-MNIST IDX files, else None."""
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    return folder if all(_idx_file(folder, stem) for pair in _IDX_FILES.values() for stem in pair) else None


def _fashion_mnist_idx(folder: Path) -> tuple[datasets.Dataset, datasets.Dataset]:
    splits = []
    for images_stem, labels_stem in _IDX_FILES.values():
        images, labels = read_idx(_idx_file(folder, images_stem)), read_idx(_idx_file(folder, labels_stem))
        if images.ndim != 3 or len(images) != len(labels):
            raise OscqValueError(f"{folder}: {images_stem} holds {images.shape}, {labels_stem} holds {labels.shape}.")
        splits.append(datasets.Dataset.from_dict({"pixel_values": images, "labels": labels.astype(np.int64)}))
    logger.info("Fashion-MNIST from the IDX files in %s", folder)
    return splits[0], splits[1]


def _load_hub_schema(info: DatasetInfo, data_dir: str | Path | None):
    """The dataset in the Hub's schema (an image column and `label`), from `data_dir` or the Hub."""
    if data_dir is not None:
        loaded = _load_local(Path(data_dir))
    else:
        loaded = _load_from_hub(info)
    splits = {}
    for split in ("train", info.eval_split):
        if split not in loaded:
            raise OscqValueError(f"{info.name}: split {split!r} missing; found {list(loaded)}.")
        dataset = loaded[split]
        columns = {info.image_column, "label"}
        if not columns <= set(dataset.column_names):
            raise OscqValueError(
                f"{info.name} needs the columns {sorted(columns)} (the Hub's schema of {info.hub_id}); "
                f"the {split!r} split has {dataset.column_names}."
            )
        dataset = dataset.select_columns(sorted(columns)).rename_columns(
            {info.image_column: "pixel_values", "label": "labels"}
        )
        splits[split] = dataset
    feature = splits["train"].features["labels"]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if names is None:
        names = [str(i) for i in range(max(splits["train"]["labels"]) + 1)]
    return splits["train"], splits[info.eval_split], names


def _load_local(folder: Path) -> datasets.DatasetDict:
    if not folder.is_dir():
        raise OscqValueError(
            f"--data_dir {folder} is not a folder: pass a folder holding the dataset (a save_to_disk folder or "
            "parquet files; for fashion_mnist, its four IDX files), or leave --data_dir out to use the default source."
        )
    fix = "pass a save_to_disk folder or the dataset's parquet files, as the Hub holds them."
    if (folder / "dataset_dict.json").is_file():
        with dataset_errors(f"--data_dir {folder}", fix):
            return datasets.load_from_disk(str(folder))
    parquet = sorted(folder.rglob("*.parquet"))
    if not parquet:
        raise OscqValueError(
            f"--data_dir {folder} holds neither a save_to_disk dataset (dataset_dict.json) nor parquet files."
        )
    # Split from the file name, as the Hub names them: train-00000-of-00001.parquet, test-..., valid-...
    files: dict[str, list[str]] = {}
    for path in parquet:
        split = path.stem.split("-")[0]
        files.setdefault(split, []).append(str(path))
    with dataset_errors(f"--data_dir {folder}", fix):
        return datasets.load_dataset("parquet", data_files=files)


def _load_from_hub(info: DatasetInfo) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(info.hub_id)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        raise HubUnreachableError(
            f"Could not download {info.hub_id!r} ({info.name}) from the Hugging Face Hub: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. {offline_hint()}"
        ) from None


def _transform(info: DatasetInfo, train: bool):
    """A `set_transform` function: images -> normalised float tensors, with augmentation for training."""
    steps: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=False)]
    if train and info.crop_padding:
        steps.append(v2.RandomCrop(info.image_size, padding=info.crop_padding))
    if train and info.flip:
        steps.append(v2.RandomHorizontalFlip())
    # On raw pixel values, as the image processor's fused rescale and normalize: (p / 255 - mean) / std
    steps.append(v2.Normalize([m * 255 for m in info.mean], [s * 255 for s in info.std]))
    pipeline = v2.Compose(steps)
    mode = "L" if info.num_channels == 1 else "RGB"

    def transform(batch: dict) -> dict:
        images = []
        for image in batch["pixel_values"]:
            if hasattr(image, "convert"):  # PIL image (Tiny ImageNet mixes grayscale and RGB)
                image = to_model_image(image, mode, info.background)
            else:  # an array (H, W) from the IDX files or the digits
                image = torch.as_tensor(np.asarray(image, dtype=np.uint8)).unsqueeze(0)
            images.append(pipeline(image))
        return {"pixel_values": images, "labels": batch["labels"]}

    return transform
