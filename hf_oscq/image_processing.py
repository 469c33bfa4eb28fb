"""Images of any PIL mode turned into what a model reads, and the image processor that does it for 1-channel models.

`to_model_image` is the one conversion from an uploaded or dataset image to the model's input mode: EXIF orientation
applied, 16-bit and float pixels scaled onto 0..255 (not clipped), transparent pixels composited on the dataset's
background, colour converted to grayscale with PIL's ITU-R 601-2 luma. The recipes' datasets, `OscqImageProcessor`
and the Space all call it, so a training image, a `pipeline` input and an upload mean the same to the model.

RGB models keep transformers' own `ViTImageProcessor`; `OscqImageProcessor` exists because no transformers image
processor turns images into one channel, and `pipeline("image-classification")` hands every image over as RGB.
`import hf_oscq` registers it with `AutoImageProcessor` (by its class name, `image_processor_type` in
`preprocessor_config.json`) as soon as transformers' image processor registry is imported.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import ViTImageProcessor
from transformers.image_utils import ChannelDimension
from transformers.processing_utils import ImagesKwargs

from .errors import OscqValueError

ModelMode = Literal["L", "RGB"]

# PIL modes read as 16-bit unsigned integers: "I" holds 32-bit integers, but 16-bit PNGs and TIFFs open as "I" in
# some Pillow versions, so its values are read on the same 0..65535 scale.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def to_model_image(image: PIL.Image.Image, mode: ModelMode = "RGB", background: int = 255) -> PIL.Image.Image:
    """Converts a PIL image of any mode to the 8-bit mode a model reads, keeping the image's real range.

    * EXIF orientation is applied (a phone photo reads upright).
    * 16-bit modes (`I;16*`, and `I`, read as 0..65535) are scaled by 255 / 65535, float images (`F`, read as
      0..1) by 255, then rounded; values outside those ranges are clipped.
    * Transparency (`RGBA`, `LA`, `PA`, `P` with a transparent colour) is composited on `background`:
      `out = color * a + background * (1 - a)` with `a = alpha / 255`.
    * Everything else (`1`, `P`, `CMYK`, `YCbCr`, ...) goes through PIL's RGB conversion; `L` is PIL's ITU-R 601-2
      luma `L = R * 299/1000 + G * 587/1000 + B * 114/1000`, so a gray RGB image keeps its values exactly.

    Args:
        image: a PIL image of any mode.
        mode: `"L"` for 1-channel models, `"RGB"` for 3-channel ones.
        background: gray level 0..255 behind transparent pixels: 0 (black) for datasets drawn on black like the
            digits and Fashion-MNIST, 255 (white, transformers' convention) for photos.

    Returns:
        A new `L` or `RGB` image of the same size (sides swapped by a 90-degree EXIF rotation).

    Raises:
        OscqValueError: for a `mode` other than `L` / `RGB` or a `background` outside 0..255.
    """
    if mode not in ("L", "RGB"):
        raise OscqValueError(f"mode={mode!r}: a model reads 'L' (1 channel) or 'RGB' (3 channels) images.")
    if not 0 <= background <= 255:
        raise OscqValueError(f"background={background}: give a gray level in 0..255 (0 black, 255 white).")
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _gray_from_array(np.asarray(image, dtype=np.float64) * (255 / 65535))
    elif image.mode == "F":
        image = _gray_from_array(np.asarray(image, dtype=np.float64) * 255)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def _gray_from_array(values: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def luma(pixels: torch.Tensor) -> torch.Tensor:
    """PIL's ITU-R 601-2 luma of channels-first RGB pixels `(..., 3, H, W)`, as `(..., 1, H, W)`.

    uint8 pixels follow PIL's integer arithmetic (`(R * 19595 + G * 38470 + B * 7471 + 2**15) >> 16`), so the result
    equals `PIL.Image.convert("L")`; floating pixels use the weights 0.299, 0.587, 0.114.
    """
    if pixels.dtype == torch.uint8:
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int64).view(3, 1, 1)
        total = (pixels.to(torch.int64) * weights).sum(-3, keepdim=True) + (1 << 15)
        return (total >> 16).to(torch.uint8)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=pixels.dtype).view(3, 1, 1)
    return (pixels * weights).sum(-3, keepdim=True)


class OscqImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_channels (`int`, *optional*, defaults to `self.num_channels`):
        Channels the model reads: 1 (grayscale) or 3 (RGB).
    background (`int`, *optional*, defaults to `self.background`):
        Gray level 0..255 that transparent pixels are composited on.
    """

    num_channels: int
    background: int


class OscqImageProcessor(ViTImageProcessor):
    """`ViTImageProcessor` (resize, rescale, normalize) that first converts every image with `to_model_image`.

    PIL images of any mode become the model's mode (`num_channels`: 1 -> `L`, 3 -> `RGB`) with their real range.
    Arrays and tensors are taken as raw pixel values (channels first or last); 3-channel ones given to a 1-channel
    processor become their `luma`, 1-channel ones given to a 3-channel processor are repeated.

    Args:
        num_channels: 1 or 3, the channels the model reads.
        background: gray level 0..255 behind transparent pixels (see `to_model_image`).
        **kwargs: `ViTImageProcessor`'s settings (`size`, `rescale_factor`, `image_mean`, `image_std`, ...).
    """

    valid_kwargs = OscqImageProcessorKwargs
    num_channels = 3
    background = 255

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.num_channels not in (1, 3):
            raise OscqValueError(f"num_channels={self.num_channels}: OscqImageProcessor prepares 1 or 3 channels.")
        if not 0 <= self.background <= 255:
            raise OscqValueError(f"background={self.background}: give a gray level in 0..255 (0 black, 255 white).")

    def process_image(self, image, *args, input_data_format=None, num_channels=None, background=None, **kwargs):
        num_channels = self.num_channels if num_channels is None else num_channels
        if isinstance(image, PIL.Image.Image):
            mode = "L" if num_channels == 1 else "RGB"
            converted = to_model_image(image, mode, self.background if background is None else background)
            image, input_data_format = np.array(converted), ChannelDimension.LAST
        kwargs["do_convert_rgb"] = False  # the channels are decided below, for PIL images by to_model_image
        pixels = super().process_image(image, *args, input_data_format=input_data_format, **kwargs)
        channels = pixels.shape[-3]
        if channels == num_channels:
            return pixels
        if num_channels == 1 and channels == 3:
            return luma(pixels)
        if num_channels == 3 and channels == 1:
            return pixels.expand(3, *pixels.shape[-2:]).contiguous()
        raise OscqValueError(
            f"An image with {channels} channels cannot be prepared for a {num_channels}-channel model: pass a PIL "
            "image (any mode) or an array with 1 or 3 channels."
        )


def register_image_processor(image_processing_auto) -> None:
    """Makes `AutoImageProcessor` (and so `pipeline`) find `OscqImageProcessor` by the name saved in
    `preprocessor_config.json`. transformers looks registered processors up by class name; the key "oscq" only has to
    be unique, since the models using this processor keep their own config classes (ViT, timm)."""
    image_processing_auto.AutoImageProcessor.register(
        "oscq", image_processor_classes={"torchvision": OscqImageProcessor}, exist_ok=True
    )
