"""`to_model_image` per PIL mode against known pixel values, and `OscqImageProcessor` against hand-computed inputs."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from hf_oscq import OscqImageProcessor, OscqValueError, to_model_image
from hf_oscq.image_processing import luma

ORIENTATION = 0x0112


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def test_l_and_rgb_pass_through_and_gray_rgb_keeps_its_values():
    gray = np.array([[0, 1, 127], [128, 254, 255]], dtype=np.uint8)
    image = to_model_image(PIL.Image.fromarray(gray, "L"), "L")
    assert image.mode == "L" and np.array_equal(pixels(image), gray)
    as_rgb = to_model_image(PIL.Image.fromarray(gray, "L"), "RGB")
    assert as_rgb.mode == "RGB" and np.array_equal(pixels(as_rgb), np.repeat(gray[..., None], 3, -1))
    # A gray RGB image (the pipeline hands every image over as RGB) comes back to the same gray levels.
    assert np.array_equal(pixels(to_model_image(as_rgb, "L")), gray)


def test_color_to_gray_is_itu_601_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    got = pixels(to_model_image(PIL.Image.fromarray(rgb, "RGB"), "L"))
    # L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded: 76.245, 149.685, 29.07, 18.15
    assert got.tolist() == [[76, 150, 29, 18]]


@pytest.mark.parametrize(("background", "mode"), [(0, "L"), (255, "L"), (0, "RGB"), (255, "RGB")])
def test_alpha_is_composited_on_the_background(background, mode):
    rgba = np.array([[[200, 200, 200, 255], [200, 200, 200, 0], [100, 100, 100, 51]]], dtype=np.uint8)
    got = pixels(to_model_image(PIL.Image.fromarray(rgba, "RGBA"), mode, background))
    # out = color * a + background * (1 - a), a = alpha / 255: 200; background; 100 * 0.2 + background * 0.8
    expected = np.array([200, background, 20 + 0.8 * background])
    got = got.reshape(3, -1)
    assert got[:2].tolist() == [[expected[0]] * got.shape[1], [expected[1]] * got.shape[1]]
    assert np.abs(got[2] - expected[2]).max() <= 1  # PIL's integer compositing rounds


def test_la_and_palette_transparency_use_the_background():
    la = np.array([[[90, 255], [90, 0]]], dtype=np.uint8)
    assert pixels(to_model_image(PIL.Image.fromarray(la, "LA"), "L", 0)).tolist() == [[90, 0]]
    assert pixels(to_model_image(PIL.Image.fromarray(la, "LA"), "L", 255)).tolist() == [[90, 255]]
    palette = PIL.Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putdata([1, 2, 0])
    assert pixels(to_model_image(palette, "RGB")).tolist() == [[[255, 0, 0], [0, 0, 255], [0, 0, 0]]]
    palette.info["transparency"] = 0  # palette entry 0 is transparent
    assert pixels(to_model_image(palette, "RGB", 255))[0, 2].tolist() == [255, 255, 255]
    assert pixels(to_model_image(palette, "L", 255)).tolist() == [[76, 29, 255]]


def test_cmyk_and_bilevel():
    cmyk = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [255, 0, 0, 0]]], dtype=np.uint8)
    got = pixels(to_model_image(PIL.Image.fromarray(cmyk, "CMYK"), "RGB"))
    assert got.tolist() == [[[255, 255, 255], [0, 0, 0], [0, 255, 255]]]  # white, black, cyan
    bilevel = PIL.Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L").convert("1")
    assert pixels(to_model_image(bilevel, "L")).tolist() == [[0, 255]]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    # 65535 -> 255: v * 255 / 65535 = v / 257, rounded: 0, 1, 3.89 -> 4, 128, 255
    expected = [[0, 1, 4, 128, 255]]
    image = PIL.Image.fromarray(values)
    assert image.mode == "I;16"
    assert pixels(to_model_image(image, "L")).tolist() == expected
    image.save(tmp_path / "16bit.png")  # a real 16-bit PNG, as a user uploads it
    reopened = PIL.Image.open(tmp_path / "16bit.png")
    assert reopened.mode in ("I;16", "I") and pixels(to_model_image(reopened, "L")).tolist() == expected
    as_rgb = pixels(to_model_image(reopened, "RGB"))
    assert as_rgb[..., 0].tolist() == expected and (as_rgb == as_rgb[..., :1]).all()


def test_32_bit_integers_are_read_on_the_16_bit_scale_and_clipped_outside_it():
    image = PIL.Image.fromarray(np.array([[-5, 0, 514, 65535, 70000]], dtype=np.int32), "I")
    assert pixels(to_model_image(image, "L")).tolist() == [[0, 0, 2, 255, 255]]


def test_float_images_in_0_1_are_scaled():
    image = PIL.Image.fromarray(np.array([[0.0, 0.2, 0.502, 1.0, 1.5, -0.1]], dtype=np.float32), "F")
    # v * 255: 0, 51, 128.01, 255, clipped 382.5, clipped -25.5
    assert pixels(to_model_image(image, "L")).tolist() == [[0, 51, 128, 255, 255, 0]]


def _upright() -> np.ndarray:
    """A 16 x 32 (H x W) image: white 8 x 8 block in the top-left corner, gray elsewhere."""
    image = np.full((16, 32), 60, dtype=np.uint8)
    image[:8, :8] = 255
    return image


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(image_format):
    upright = _upright()
    # Orientation 6: the stored pixels are the upright image turned 90 degrees counter-clockwise; a viewer turns
    # them clockwise back.
    stored = np.rot90(upright, k=1)
    exif = PIL.Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(stored), "L").save(buffer, image_format, exif=exif, quality=100)
    opened = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    assert opened.size == (16, 32)  # (W, H) as stored: sideways
    got = to_model_image(opened, "L")
    assert got.size == (32, 16)
    assert np.abs(pixels(got) - upright.astype(np.int64)).max() <= 4  # JPEG at quality 100 is nearly exact
    assert np.array_equal(pixels(to_model_image(got, "L")), pixels(got))  # turned once, never twice


def test_bad_settings_are_refused():
    image = PIL.Image.new("L", (2, 2))
    with pytest.raises(OscqValueError, match="'L' .* or 'RGB'"):
        to_model_image(image, "CMYK")
    with pytest.raises(OscqValueError, match="0..255"):
        to_model_image(image, "L", background=300)
    with pytest.raises(OscqValueError, match="1 or 3 channels"):
        OscqImageProcessor(num_channels=2)


def test_luma_of_uint8_tensors_equals_pil():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.asarray(PIL.Image.fromarray(rgb, "RGB").convert("L"))
    got = luma(torch.from_numpy(rgb).permute(2, 0, 1))
    assert got.shape == (1, 5, 7) and torch.equal(got[0], torch.tensor(expected))
    floats = luma(torch.tensor([[[1.0]], [[2.0]], [[4.0]]]))
    assert floats.item() == pytest.approx(0.299 + 2 * 0.587 + 4 * 0.114)


def _processor(num_channels: int, background: int) -> OscqImageProcessor:
    return OscqImageProcessor(
        num_channels=num_channels,
        background=background,
        size={"height": 4, "width": 4},
        rescale_factor=1 / 255,
        image_mean=[0.25] * num_channels,
        image_std=[0.5] * num_channels,
    )


def test_processor_round_trips_through_auto_image_processor(tmp_path):
    _processor(1, 0).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is OscqImageProcessor
    assert (loaded.num_channels, loaded.background, loaded.image_mean, loaded.size.height) == (1, 0, (0.25,), 4)


@pytest.mark.parametrize("num_channels", [1, 3])
def test_processor_output_is_normalised_model_mode_pixels(num_channels):
    processor = _processor(num_channels, background=0)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # one transparent pixel: black background
    got = processor(PIL.Image.fromarray(rgba, "RGBA"), return_tensors="pt")["pixel_values"][0]
    gray = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)  # 123.8 -> 124
    raw = torch.tensor([gray] if num_channels == 1 else [200.0, 100.0, 50.0]).view(-1, 1, 1).expand(-1, 4, 4).clone()
    raw[:, 0, 0] = 0
    expected = (raw / 255 - 0.25) / 0.5
    assert got.shape == (num_channels, 4, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_processor_adapts_the_channels_of_arrays():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    got = _processor(1, 0)(rgb, return_tensors="pt", input_data_format="channels_last")["pixel_values"][0]
    gray = torch.tensor(np.asarray(PIL.Image.fromarray(rgb, "RGB").convert("L")), dtype=torch.float32)
    torch.testing.assert_close(got[0], (gray / 255 - 0.25) / 0.5, rtol=0, atol=1e-6)
    gray_array = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    got = _processor(3, 0)(gray_array, return_tensors="pt", input_data_format="channels_first")["pixel_values"][0]
    assert got.shape == (3, 4, 4) and torch.equal(got[0], got[2])
