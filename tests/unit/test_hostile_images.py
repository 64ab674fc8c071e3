"""Hostile and odd image bytes: each gives a typed failure or a correct RGB image.

Ends with a seeded fuzz run over mutated small images of every allowed format.
"""

from __future__ import annotations

import concurrent.futures
import io
import random
import resource
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.support.images import encode
from worker.errors import ImageTooLarge, InvalidImage
from worker.images import MAX_ASPECT_RATIO, decode_image, fit_pixel_budget

CAP = 100_000_000  # the production default for CAPTION_MAX_DECODED_PIXELS
BUDGET = 1_048_576  # the production default for CAPTION_MAX_PIXELS
WHITE = (255, 255, 255)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header for a ``width`` x ``height`` RGB image with one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def photo(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 40, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def assert_rgb(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.mode == "RGB"
    assert image.size == size


# --- Decompression bombs and caps --------------------------------------------------------------


def test_bomb_header_is_too_large_quickly_and_without_decoding() -> None:
    bomb = png_claiming(100_000, 100_000)  # 10 gigapixels, ~30 GB if decoded
    assert len(bomb) < 400
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageTooLarge) as caught:
            decode_image(bomb, max_decoded_pixels=CAP)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5_000_000
    assert "100,000,000" in str(caught.value)  # names the cap the operator can change


def test_header_over_our_cap_but_under_pillows_limit_is_too_large() -> None:
    # 20000x4000 = 80 MP: Pillow alone would happily allocate it.
    with pytest.raises(ImageTooLarge, match=r"20000x4000 = 80,000,000 pixels.*1,000,000"):
        decode_image(png_claiming(20_000, 4_000), max_decoded_pixels=1_000_000)


def test_pillow_bomb_warning_neither_escapes_nor_overrides_our_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Shrink Pillow's own limit so a small image sits between its warning and error levels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    for fmt in ("PNG", "TIFF", "GIF"):
        data = encode(photo((60, 50)), fmt)  # 3,000 px: Pillow warns, our cap allows it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = decode_image(data, max_decoded_pixels=10_000)
        assert_rgb(out, (60, 50))
        assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(ImageTooLarge):  # past twice Pillow's limit it refuses regardless
        decode_image(encode(photo((100, 50)), "PNG"), max_decoded_pixels=10_000)


def test_zero_sized_header_is_invalid() -> None:
    with pytest.raises(InvalidImage):
        decode_image(png_claiming(0, 10), max_decoded_pixels=CAP)


# --- Broken and foreign bytes ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_file_is_invalid_not_padded(fmt: str, keep: float) -> None:
    data = encode(photo((256, 256)), fmt)
    with pytest.raises(InvalidImage) as caught:
        decode_image(data[: int(len(data) * keep)], max_decoded_pixels=CAP)
    assert "\\x" not in str(caught.value)


def test_jpeg_missing_only_its_end_marker_is_still_rejected() -> None:
    data = encode(photo(), "JPEG")
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[:-32], max_decoded_pixels=CAP)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(random.Random(5).randrange(256) for _ in range(4096)),
        b"hello, this is plain text\n" * 20,
        b"<!DOCTYPE html><html><body><img src=x></body></html>",
        b"\x89PNG\r\n\x1a\n",  # a signature and nothing else
        b"\xff\xd8\xff",  # a JPEG start and nothing else
    ],
    ids=["empty", "random", "text", "html", "png-signature-only", "jpeg-soi-only"],
)
def test_non_image_bytes_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage) as caught:
        decode_image(data, max_decoded_pixels=CAP)
    message = str(caught.value)
    assert message
    assert "BytesIO" not in message  # Pillow's own message names an object address
    assert len(message) < 300


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"%PDF-1.4\n1 0 obj <</Type /Catalog>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n", "PDF"),
        (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" '
            b'height="64"><rect width="64" height="64" fill="red"/></svg>',
            "SVG",
        ),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="5"/></svg>', "SVG"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS"),
    ],
    ids=["pdf", "svg-xml", "svg", "eps"],
)
def test_document_formats_are_refused_by_name(data: bytes, named: str) -> None:
    with pytest.raises(InvalidImage, match=named):
        decode_image(data, max_decoded_pixels=CAP)


@pytest.mark.parametrize("fmt", ["ICO", "PSD", "TGA", "PCX", "PPM"])
def test_formats_pillow_reads_but_we_do_not_allow_are_invalid(fmt: str) -> None:
    if fmt == "PSD":
        # Pillow cannot write PSD; a minimal header is enough for its reader.
        data = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 8, 8, 8, 3) + b"\x00" * 64
    else:
        data = encode(Image.new("RGB", (16, 16), "red"), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would take it
    with pytest.raises(InvalidImage):
        decode_image(data, max_decoded_pixels=CAP)


def test_format_comes_from_content_not_from_any_name() -> None:
    # We never see a file name: PNG bytes (whatever the object key says, e.g. photo.jpg)
    # decode as PNG, JPEG bytes as JPEG, and the two differ in what they preserve.
    source = photo()
    png = decode_image(encode(source, "PNG"), max_decoded_pixels=CAP)
    jpeg = decode_image(encode(source, "JPEG", quality=30), max_decoded_pixels=CAP)
    np.testing.assert_array_equal(np.asarray(png), np.asarray(source))  # lossless
    assert not np.array_equal(np.asarray(jpeg), np.asarray(source))  # lossy
    assert_rgb(jpeg, source.size)


# --- Odd but valid images ----------------------------------------------------------------------


def test_cmyk_jpeg_comes_out_rgb_with_the_right_colour() -> None:
    out = decode_image(
        encode(Image.new("CMYK", (32, 32), (0, 255, 0, 0)), "JPEG"), max_decoded_pixels=CAP
    )
    assert out.mode == "RGB"
    red, green, blue = out.getpixel((16, 16))
    assert red > 215
    assert green < 40
    assert blue > 215  # magenta


def test_palette_png_with_transparency_is_white_behind() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    image.paste(1, (2, 2, 6, 6))
    out = decode_image(encode(image, "PNG", transparency=0), max_decoded_pixels=CAP)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((4, 4)) == (0, 128, 0)


def test_sixteen_bit_png_is_not_washed_out() -> None:
    row = np.linspace(1_000, 3_000, 64).astype(np.uint16)  # dark 16-bit values
    out = decode_image(encode(Image.fromarray(np.tile(row, (8, 1))), "PNG"), max_decoded_pixels=CAP)
    values = np.asarray(out)[0, :, 0].astype(int)
    assert values.min() == 0
    assert values.max() == 255
    assert np.all(np.diff(values) >= 0)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("blue", "yellow", "red")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = decode_image(data, max_decoded_pixels=CAP)
    assert out.getpixel((16, 16)) == (0, 0, 255)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_is_upright(orientation: int) -> None:
    image = Image.new("RGB", (90, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 15, 15))  # white marker, stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(image, "JPEG", exif=exif, quality=95), max_decoded_pixels=CAP)
    expected_size = (90, 30) if orientation == 3 else (30, 90)
    assert out.size == expected_size
    # Where the stored top-left corner must end up once displayed correctly.
    corner = {3: (87, 27), 6: (27, 2), 8: (2, 87)}[orientation]
    assert out.getpixel(corner)[0] > 200
    assert out.getpixel((2, 2) if orientation != 8 else (27, 2))[0] < 50


def test_one_pixel_image() -> None:
    out = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), max_decoded_pixels=CAP)
    assert_rgb(out, (1, 1))
    assert fit_pixel_budget(out, BUDGET).size == (1, 1)


def test_wide_banner_decodes_and_fits_at_aspect_limit() -> None:
    banner = Image.new("RGB", (20_000, 100), (0, 90, 0))
    out = fit_pixel_budget(decode_image(encode(banner, "PNG"), max_decoded_pixels=CAP), BUDGET)
    width, height = out.size
    assert width * height <= BUDGET
    assert width == MAX_ASPECT_RATIO * height
    assert out.getpixel((width // 2, height // 2)) == (0, 90, 0)
    assert out.getpixel((width // 2, 0)) == WHITE


# --- Fuzzing -----------------------------------------------------------------------------------

FUZZ_CAP = 1_000_000
FUZZ_BUDGET = 16_384
FUZZ_CASES = 3_000


def fuzz_seeds() -> list[bytes]:
    base = photo((64, 64), seed=3)
    frames = [base, base.transpose(Image.Transpose.ROTATE_90)]
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    gray16 = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    return [
        encode(base, "PNG"),
        encode(palette, "PNG", transparency=0),
        encode(gray16, "PNG"),
        encode(base, "PNG", save_all=True, append_images=frames[1:]),  # APNG
        encode(base, "JPEG", quality=80),
        encode(base, "JPEG", quality=80, progressive=True, exif=exif),
        encode(base.convert("CMYK"), "JPEG"),
        encode(base, "GIF", save_all=True, append_images=frames[1:], transparency=0),
        encode(base, "WEBP", quality=70),
        encode(base.convert("RGBA"), "WEBP", lossless=True),
        encode(base, "BMP"),
        encode(palette, "BMP"),
        encode(base, "TIFF"),
        encode(base, "TIFF", compression="tiff_lzw"),
        encode(base.convert("CMYK"), "TIFF", compression="tiff_deflate"),
    ]


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buffer = bytearray(data)
    applied = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["flip", "truncate", "insert", "delete", "header", "png-size"])
        applied.append(kind)
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                buffer[rng.randrange(len(buffer))] ^= rng.randint(1, 255)
        elif kind == "truncate":
            del buffer[rng.randrange(len(buffer)) :]
        elif kind == "insert":
            at = rng.randrange(len(buffer) + 1)
            buffer[at:at] = rng.randbytes(rng.randint(1, 64))
        elif kind == "delete":
            at = rng.randrange(len(buffer))
            del buffer[at : at + rng.randint(1, 64)]
        elif kind == "header":
            # Overwrite a size/offset-like field in the first 64 bytes with an extreme value.
            width = rng.choice([1, 2, 4])
            value = rng.choice([0, 1, 0xFF, 0x7F, 0xFFFF, 0x7FFF, 0xFFFFFFFF, rng.getrandbits(32)])
            raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, rng.choice(["little", "big"]))
            at = rng.randrange(max(1, min(len(buffer), 64)))
            buffer[at : at + width] = raw
        elif kind == "png-size" and buffer.startswith(b"\x89PNG") and len(buffer) >= 33:
            # Claim new dimensions with a valid CRC, so the reader trusts them.
            size = struct.pack(
                ">II", rng.choice([0, 1, 7, 64, 5_000, 70_000]), rng.randint(0, 3_000)
            )
            body = size + bytes(buffer[24:29])
            buffer[8:33] = png_chunk(b"IHDR", body)
        if not buffer:
            break
    return bytes(buffer), "+".join(applied)


def run_pipeline(data: bytes) -> Image.Image:
    return fit_pixel_budget(decode_image(data, max_decoded_pixels=FUZZ_CAP), FUZZ_BUDGET)


def test_fuzzed_images_fail_typed_or_decode_within_caps() -> None:
    seeds = fuzz_seeds()
    for seed in seeds:  # every seed must be valid, or the fuzzing proves little
        assert run_pipeline(seed).mode == "RGB"
    rng = random.Random(1234)
    failures: list[str] = []
    outcomes = {"ok": 0, "InvalidImage": 0, "ImageTooLarge": 0}
    peak_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.perf_counter()
    # Record rather than raise warnings: one escaping from Pillow would make the outcome
    # depend on the process's warning filters, and spam the worker's log in production.
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        for index in range(FUZZ_CASES):
            seed_index = index % len(seeds)
            data, how = mutate(seeds[seed_index], rng)
            case = f"case {index} (seed {seed_index}, {how})"
            try:
                out = run_pipeline(data)
            except (InvalidImage, ImageTooLarge) as exc:
                outcomes[type(exc).__name__] += 1
            except Exception as exc:  # the point is to see anything else that comes out
                failures.append(f"{case}: {exc!r}")
            else:
                outcomes["ok"] += 1
                try:
                    check_fuzz_success(out)
                except AssertionError as exc:
                    failures.append(f"{case}: {exc}")
            failures.extend(f"{case}: warning escaped: {w.message!r}" for w in escaped)
            escaped.clear()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_before
    assert not failures, f"{len(failures)} bad outcomes, first ones:\n" + "\n".join(failures[:10])
    # The mutations must exercise both paths, or the test would pass vacuously.
    assert outcomes["ok"] > 50, outcomes
    assert outcomes["InvalidImage"] > 200, outcomes
    assert outcomes["ImageTooLarge"] > 5, outcomes
    assert elapsed < 60, f"{FUZZ_CASES} cases took {elapsed:.1f}s"
    assert peak < 200_000_000, f"Python heap peaked at {peak / 1e6:.0f} MB"
    assert rss_growth_kib < 500_000, f"peak RSS grew by {rss_growth_kib / 1024:.0f} MiB"


def check_fuzz_success(out: Image.Image) -> None:
    width, height = out.size
    assert out.mode == "RGB", f"mode {out.mode}"
    assert width >= 1
    assert height >= 1
    assert width * height <= FUZZ_BUDGET, f"{width}x{height} over budget"
    assert max(width, height) <= MAX_ASPECT_RATIO * min(width, height), f"{width}x{height}"
    out.getpixel((width - 1, height - 1))  # pixels really are there


def test_concurrent_decodes_leave_warning_filters_as_they_were() -> None:
    # The worker decodes on many task threads; silencing Pillow must not leak or drop filters.
    exif = b"Exif\x00\x00MM\x00*\xff\xff\xff\xff"  # corrupt: Pillow warns while reading it
    inputs = [
        encode(photo((48, 48)), "JPEG", exif=exif),
        encode(photo((48, 48)), "TIFF"),
        png_claiming(64, 64),  # truncated pixel data: fails
    ]
    before = list(warnings.filters)

    def work(index: int) -> str:
        try:
            decode_image(inputs[index % len(inputs)], max_decoded_pixels=CAP)
        except InvalidImage:
            return "invalid"
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(600)))
    assert results.count("ok") == 400
    assert results.count("invalid") == 200
    assert warnings.filters == before
