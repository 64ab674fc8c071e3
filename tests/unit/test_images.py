"""Unit behaviour of worker.images: decoding to upright RGB and fitting the pixel budget."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.images import encode
from worker.errors import ImageTooLarge, InvalidImage
from worker.images import ALLOWED_FORMATS, MAX_ASPECT_RATIO, decode_image, fit_pixel_budget

CAP = 10_000_000
WHITE = (255, 255, 255)


def decode(data: bytes) -> Image.Image:
    return decode_image(data, max_decoded_pixels=CAP)


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image).astype(int)


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 3) -> None:
    assert len(actual) == len(expected)
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (
        f"{actual} is not within {tolerance} of {expected}"
    )


def test_allowed_formats_are_the_documented_six() -> None:
    assert frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}) == ALLOWED_FORMATS


def test_rgb_png_passes_through_pixel_exact() -> None:
    rng = np.random.default_rng(7)
    array = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(array), "PNG"))
    assert out.mode == "RGB"
    assert out.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(out), array)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_every_allowed_format_decodes_to_loaded_rgb(fmt: str) -> None:
    out = decode(encode(Image.new("RGB", (30, 20), (200, 40, 40)), fmt))
    assert out.mode == "RGB"
    assert out.size == (30, 20)
    assert_close(out.getpixel((15, 10)), (200, 40, 40), tolerance=12)


def test_bilevel_and_grayscale_become_rgb() -> None:
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.putpixel((3, 3), 1)
    out = decode(encode(bilevel, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((3, 3)) == WHITE

    gray = decode(encode(Image.new("L", (8, 8), 77), "PNG"))
    assert gray.mode == "RGB"
    assert gray.getpixel((4, 4)) == (77, 77, 77)


def test_palette_without_transparency_keeps_its_colours() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 200] + [0] * 762)
    out = decode(encode(image, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 200)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_transparent_palette_pixel_becomes_white_not_black(fmt: str) -> None:
    image = Image.new("P", (4, 4), 0)  # index 0 is black and transparent
    image.putpalette([0, 0, 0, 10, 20, 200] + [0] * 762)
    image.putpixel((1, 1), 1)
    out = decode(encode(image, fmt, transparency=0))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 1)) == (10, 20, 200)


def test_rgba_composites_over_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    image.putpixel((2, 0), (0, 0, 255, 255))  # opaque blue
    out = decode(encode(image, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert_close(out.getpixel((1, 0)), (255, 127, 127), tolerance=2)
    assert out.getpixel((2, 0)) == (0, 0, 255)


@pytest.mark.parametrize(("mode", "fmt"), [("LA", "PNG"), ("PA", "TIFF")])
def test_gray_and_palette_alpha_composite_over_white(mode: str, fmt: str) -> None:
    image = Image.new(mode, (2, 1))
    if mode == "PA":
        image.putpalette([0, 0, 0, 40, 40, 40] + [0] * 762)
        image.putpixel((0, 0), (0, 0))
        image.putpixel((1, 0), (1, 255))
    else:
        image.putpixel((0, 0), (0, 0))
        image.putpixel((1, 0), (40, 255))
    out = decode(encode(image, fmt))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (40, 40, 40)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_pure_cyan_comes_out_cyan(fmt: str) -> None:
    out = decode(encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), fmt))
    assert out.mode == "RGB"
    red, green, blue = out.getpixel((8, 8))
    assert red < 40
    assert green > 215
    assert blue > 215


def test_ycbcr_tiff_converts_colorimetrically() -> None:
    red = Image.new("RGB", (8, 8), (220, 30, 30)).convert("YCbCr")
    out = decode(encode(red, "TIFF"))
    assert out.mode == "RGB"
    assert_close(out.getpixel((4, 4)), (220, 30, 30), tolerance=4)


def test_lab_tiff_converts_to_srgb() -> None:
    # L=255, a=b=128 is white; a strongly positive a* is red.
    white = decode(encode(Image.new("LAB", (4, 4), (255, 128, 128)), "TIFF"))
    assert_close(white.getpixel((0, 0)), WHITE)
    red = decode(encode(Image.new("LAB", (4, 4), (138, 208, 195)), "TIFF"))
    r, g, b = red.getpixel((0, 0))
    assert r > 200
    assert g < 60
    assert b < 60


def gradient16(width: int = 64, height: int = 8, top: int = 4095) -> np.ndarray[Any, Any]:
    row = np.linspace(0, top, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


def assert_is_left_to_right_gradient(out: Image.Image) -> None:
    assert out.mode == "RGB"
    row = pixels(out)[0, :, 0]
    assert row[0] == 0
    assert row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 32  # a real gradient, not a clipped two-tone image


def test_sixteen_bit_png_keeps_its_gradient() -> None:
    # A 12-bit scan stored in 16 bits: convert("L") would clip almost all of it to white.
    out = decode(encode(Image.fromarray(gradient16()), "PNG"))
    assert_is_left_to_right_gradient(out)
    assert (pixels(out) == 255).mean() < 0.1


def test_big_endian_sixteen_bit_tiff_keeps_its_gradient() -> None:
    # Built from raw bytes: Pillow 13's convert("I;16B") from I;16 clips values to 0..255.
    array = gradient16(top=65535)
    image = Image.frombytes(
        "I;16B", (array.shape[1], array.shape[0]), array.astype(">u2").tobytes()
    )
    out = decode(encode(image, "TIFF"))
    assert_is_left_to_right_gradient(out)


def test_thirty_two_bit_int_tiff_is_scaled_to_its_range() -> None:
    row = np.linspace(-5_000, 1_000_000, 64).astype(np.int32)
    out = decode(encode(Image.fromarray(np.tile(row, (4, 1))), "TIFF"))
    assert_is_left_to_right_gradient(out)


def test_float_tiff_is_scaled_to_its_range_and_ignores_nan() -> None:
    values = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (4, 1))
    values[2, 5] = np.nan
    values[3, 7] = np.inf
    out = decode(encode(Image.fromarray(values), "TIFF"))
    assert_is_left_to_right_gradient(out)


def test_flat_sixteen_bit_image_keeps_its_level() -> None:
    full = decode(encode(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG"))
    empty = decode(encode(Image.fromarray(np.zeros((4, 4), np.uint16)), "PNG"))
    assert full.getpixel((0, 0)) == WHITE
    assert empty.getpixel((0, 0)) == (0, 0, 0)


def marked_landscape() -> Image.Image:
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red marker in the stored top-left corner
    return image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_six_comes_out_upright(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90 degrees clockwise to display
    options: dict[str, Any] = {"exif": exif}
    if fmt == "WEBP":
        options["lossless"] = True
    out = decode(encode(marked_landscape(), fmt, **options))
    assert out.size == (40, 80)
    # Turned clockwise, the stored top-left corner is now the top-right one.
    assert_close(out.getpixel((out.width - 3, 2)), (255, 0, 0), tolerance=12)
    assert_close(out.getpixel((2, 2)), (0, 0, 255), tolerance=12)


def test_broken_exif_keeps_the_image_as_stored() -> None:
    data = encode(marked_landscape(), "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    out = decode(data)
    assert out.size == (80, 40)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    options: dict[str, Any] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        options["lossless"] = True
    out = decode(encode(frames[0], fmt, **options))
    assert out.mode == "RGB"
    assert out.getpixel((8, 8)) == (255, 0, 0)


def test_one_by_one_is_valid() -> None:
    out = decode(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"))
    assert out.size == (1, 1)
    assert out.getpixel((0, 0)) == (9, 8, 7)


def test_pixel_cap_is_checked_against_width_times_height() -> None:
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert decode_image(data, max_decoded_pixels=5_000).size == (100, 50)
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(data, max_decoded_pixels=4_999)
    assert "100x50" in str(caught.value)
    assert "4,999" in str(caught.value)


def test_absurd_aspect_ratio_is_invalid_with_the_size_named() -> None:
    with pytest.raises(InvalidImage, match="20001x1"):
        decode(encode(Image.new("L", (20_001, 1)), "PNG"))


def test_refused_format_is_named_in_the_message() -> None:
    with pytest.raises(InvalidImage, match="PDF is not an allowed image format"):
        decode(b"%PDF-1.4\n%%EOF\n")


def test_downscale_fits_budget_and_keeps_aspect() -> None:
    out = fit_pixel_budget(Image.new("RGB", (4000, 2000), (10, 200, 10)), 1_000_000)
    width, height = out.size
    assert width * height <= 1_000_000
    assert width * height > 990_000  # uses the budget, not a needlessly small size
    assert abs(width / height - 2.0) < 0.01
    assert_close(out.getpixel((width // 2, height // 2)), (10, 200, 10))


def test_downscale_of_portrait_keeps_orientation() -> None:
    out = fit_pixel_budget(Image.new("RGB", (300, 900)), 30_000)
    assert out.width < out.height
    assert out.width * out.height <= 30_000
    assert abs(out.height / out.width - 3.0) < 0.05


def test_small_image_is_never_upscaled() -> None:
    image = Image.new("RGB", (100, 50), (1, 2, 3))
    out = fit_pixel_budget(image, 1_000_000)
    assert out.size == (100, 50)
    assert out.getpixel((50, 25)) == (1, 2, 3)


def test_banner_is_padded_white_to_aspect_limit_with_content_kept() -> None:
    banner = Image.new("RGB", (20_000, 100), (200, 0, 0))
    out = fit_pixel_budget(banner, 1_048_576)
    width, height = out.size
    assert width * height <= 1_048_576
    assert width == MAX_ASPECT_RATIO * height  # exactly 100:1
    middle = pixels(out)[:, width // 2]
    red_rows = np.flatnonzero((middle == (200, 0, 0)).all(axis=1))
    white_rows = np.flatnonzero((middle == 255).all(axis=1))
    assert len(red_rows) == height // 2  # 200:1 content fills half of the 100:1 canvas
    assert red_rows[0] == len(white_rows) // 2  # centred between two white bands
    assert len(red_rows) + len(white_rows) == height


def test_tall_strip_is_padded_sideways() -> None:
    out = fit_pixel_budget(Image.new("RGB", (3, 1_000), (0, 0, 0)), 1_000_000)
    assert out.size == (10, 1_000)  # no downscale needed, just padded to 100:1
    assert out.getpixel((0, 500)) == WHITE
    assert out.getpixel((5, 500)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("size", "budget"),
    [((20_000, 100), 1_024), ((10_000, 1), 1_024), ((1, 9_999), 5), ((7, 5), 1), ((999, 2), 50)],
)
def test_budget_and_aspect_hold_at_extremes(size: tuple[int, int], budget: int) -> None:
    out = fit_pixel_budget(Image.new("RGB", size), budget)
    width, height = out.size
    assert width >= 1
    assert height >= 1
    assert width * height <= budget
    if budget >= MAX_ASPECT_RATIO:
        assert max(width, height) <= MAX_ASPECT_RATIO * min(width, height)


def test_budget_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        fit_pixel_budget(Image.new("RGB", (2, 2)), 0)


def test_all_nan_float_image_decodes_black_instead_of_failing() -> None:
    values = np.full((4, 4), np.nan, dtype=np.float32)
    out = decode(encode(Image.fromarray(values), "TIFF"))
    assert out.getpixel((0, 0)) == (0, 0, 0)
