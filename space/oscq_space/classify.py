"""Classify one image with every checkpoint of a family: top-k labels, probabilities and latency per bit-width."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .families import Family

MAX_PIXELS = 25_000_000  # larger uploads are refused before decoding (a 5000 x 5000 photo is still fine)
LATENCY_REPEATS = 3


class InputError(Exception):
    """An upload the app cannot use; the message is shown on the page as is."""


@dataclass
class Prediction:
    """What one checkpoint says about the image."""

    variant: str
    bits: int | None
    size_bytes: int | None
    latency_ms: float
    top: list[tuple[str, float]]


def load_image(path: str | Path | None, num_channels: int) -> tuple[PIL.Image.Image, list[str]]:
    """Opens an upload and converts it to what the model reads: grayscale for 1 channel, RGB for 3.

    Transparent pixels become black, the background of the digits and Fashion-MNIST images the demo models
    learned from.

    Returns:
        `(image, notes)`: the converted image and human-readable notes on the conversions made.

    Raises:
        InputError: for no file, a file that is not an image, or an image over `MAX_PIXELS` pixels.
    """
    if path is None:
        raise InputError("Upload an image or pick one of the examples first.")
    try:
        image = PIL.Image.open(path)  # reads the header only: the size is checked before any decoding
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        name = Path(str(path)).name
        raise InputError(f"{name} is not an image this app can read; upload a PNG, JPEG or WebP.") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InputError(
            f"The image is {width} x {height} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels. "
            "Upload a smaller image: the models read 8 x 8 to 224 x 224 pixels anyway."
        )
    try:
        image.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise InputError(f"The image could not be decoded ({error}); upload another file.") from None
    notes = []
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = PIL.Image.alpha_composite(background, rgba)
        notes.append("transparent pixels were filled with black")
    target = "L" if num_channels == 1 else "RGB"
    if image.mode != target:
        notes.append(f"converted from {image.mode} to {'grayscale' if target == 'L' else 'RGB'}")
        image = image.convert(target)
    return image, notes


def preprocess(image_processor, image: PIL.Image.Image) -> torch.Tensor:
    """`pixel_values` for one 8-bit image, from the saved image processor.

    A processor saved for raw values in another range (the 0..16 digits: `rescale_factor=1/16`) gets the image
    mapped onto that range first, so an ordinary PNG means the same to it as a training image.
    """
    factor = getattr(image_processor, "rescale_factor", None)
    if getattr(image_processor, "do_rescale", False) and factor and not math.isclose(factor, 1 / 255):
        pixels = np.asarray(image, dtype=np.float32) / (255 * factor)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        inputs = image_processor(images=pixels, input_data_format="channels_last", return_tensors="pt")
    else:
        inputs = image_processor(images=image, return_tensors="pt")
    return inputs["pixel_values"]


def classify(family: Family, image: PIL.Image.Image, top_k: int = 5) -> list[Prediction]:
    """Runs every loaded checkpoint of `family` on `image`, preprocessed by the family's saved image processor.

    Returns:
        One `Prediction` per loaded checkpoint, full precision first; latency is the median of a few forwards.

    Raises:
        InputError: when the family has no image processor to prepare the image with.
    """
    if family.image_processor is None:
        raise InputError(f"{family.name} was exported without an image processor, so images cannot be prepared.")
    pixel_values = preprocess(family.image_processor, image)
    predictions = []
    with torch.inference_mode():
        for variant in family.loaded:
            timings = []
            for _ in range(LATENCY_REPEATS):
                start = time.perf_counter()
                logits = variant.model(pixel_values=pixel_values).logits[0]
                timings.append(1000 * (time.perf_counter() - start))
            probabilities = logits.float().softmax(-1)
            values, indices = probabilities.topk(min(top_k, probabilities.numel()))
            labels = variant.model.config.id2label
            top = [(str(labels.get(int(i), int(i))), float(v)) for v, i in zip(values, indices, strict=True)]
            latency = statistics.median(timings)
            predictions.append(Prediction(variant.name, variant.bits, variant.size_bytes, latency, top))
    return predictions
