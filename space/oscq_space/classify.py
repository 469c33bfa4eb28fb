"""Classify one image with every checkpoint of a family: top-k labels, probabilities and latency per bit-width."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from hf_oscq import OscqImageProcessor, to_model_image

from .families import Family

MAX_PIXELS = 25_000_000  # larger uploads are refused before decoding (a 5000 x 5000 photo is still fine)
LATENCY_WARMUP = 2  # untimed forwards per checkpoint before timing (allocations, lazy initialisation)
LATENCY_REPEATS = 15  # timed rounds; the median is reported
EXIF_ORIENTATION = 0x0112


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


def image_mode(image_processor) -> tuple[str, int]:
    """`(mode, background)` that a family's saved image processor prepares images in: `OscqImageProcessor` says so
    (`L` for 1-channel models); transformers' own processors read RGB with transparency on white."""
    if isinstance(image_processor, OscqImageProcessor):
        return ("L" if image_processor.num_channels == 1 else "RGB"), image_processor.background
    return "RGB", 255


def conversion_notes(image: PIL.Image.Image, mode: str, background: int) -> list[str]:
    """What `to_model_image` will do to `image`, in words for the page."""
    notes = []
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        notes.append("turned upright as its EXIF orientation says")
    if image.mode.startswith("I"):
        notes.append("16-bit pixels scaled to 0..255")
    elif image.mode == "F":
        notes.append("floating-point pixels (0..1) scaled to 0..255")
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        notes.append(f"transparent pixels composited on {'black' if background == 0 else 'white'}")
    if image.mode != mode:
        notes.append(f"converted from {image.mode} to {'grayscale' if mode == 'L' else 'RGB'}")
    return notes


def load_image(path: str | Path | None, mode: str = "RGB", background: int = 255) -> tuple[PIL.Image.Image, list[str]]:
    """Opens an upload and converts it to what the model reads with `hf_oscq.to_model_image`: upright, in the
    model's mode (`L` or `RGB`), 16-bit and float pixels scaled to 0..255, transparency composited on `background`.

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
    return to_model_image(image, mode, background), conversion_notes(image, mode, background)


def classify(family: Family, image: PIL.Image.Image, top_k: int = 5) -> list[Prediction]:
    """Runs every loaded checkpoint of `family` on `image`, preprocessed by the family's saved image processor.

    Latency is measured as a benchmark would: `LATENCY_WARMUP` untimed forwards per checkpoint, then
    `LATENCY_REPEATS` rounds that time one forward of each checkpoint in turn (so a burst of load on the machine
    hits every checkpoint alike); the reported value is each checkpoint's median.

    Returns:
        One `Prediction` per loaded checkpoint, full precision first.

    Raises:
        InputError: when the family has no image processor to prepare the image with.
    """
    if family.image_processor is None:
        raise InputError(f"{family.name} was exported without an image processor, so images cannot be prepared.")
    pixel_values = family.image_processor(images=image, return_tensors="pt")["pixel_values"]
    variants = family.loaded
    logits, timings = {}, {variant.name: [] for variant in variants}
    with torch.inference_mode():
        for variant in variants:
            for _ in range(LATENCY_WARMUP):
                logits[variant.name] = variant.model(pixel_values=pixel_values).logits[0]
        for _ in range(LATENCY_REPEATS):
            for variant in variants:
                start = time.perf_counter()
                variant.model(pixel_values=pixel_values)
                timings[variant.name].append(1000 * (time.perf_counter() - start))
    predictions = []
    for variant in variants:
        probabilities = logits[variant.name].float().softmax(-1)
        values, indices = probabilities.topk(min(top_k, probabilities.numel()))
        labels = variant.model.config.id2label
        top = [(str(labels.get(int(i), int(i))), float(v)) for v, i in zip(values, indices, strict=True)]
        latency = statistics.median(timings[variant.name])
        predictions.append(Prediction(variant.name, variant.bits, variant.size_bytes, latency, top))
    return predictions
