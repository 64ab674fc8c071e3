"""Turn untrusted image bytes into an upright RGB PIL image the model can take."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import CaptionError, ImageTooLarge, InvalidImage

#: Pillow format names we decode; everything else (PDF, EPS, PSD, ICO, ...) is refused unparsed.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
#: Qwen's processor raises above 200:1; fit_pixel_budget pads anything wider than this.
MAX_ASPECT_RATIO = 100
#: Past this, a side shrinks below one pixel in any sane budget: nothing left to caption.
MAX_DECODE_ASPECT_RATIO = 10_000

_FORMATS = tuple(sorted(ALLOWED_FORMATS))
_WHITE = (255, 255, 255)
# Signatures of common formats we refuse, only to say what was sent instead of a bare "no".
_KNOWN_OTHERS = (
    (b"%PDF", "PDF"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"<svg", "SVG"), (b"<?xml", "XML/SVG"),
    (b"<!doctype html", "HTML"), (b"<html", "HTML"),
)  # fmt: skip
# warnings.catch_warnings swaps a process-wide filter list; two threads doing it at once can
# leak or lose filters, so every use here is serialised. Pixel decoding runs outside it, but
# for TIFF and for images past Pillow's own bomb limit.
_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_quiet() -> Iterator[None]:
    # Pillow warns about hostile input (corrupt EXIF or TIFF tags, malformed MPO/APNG, images
    # past its own ~89 MP MAX_IMAGE_PIXELS) and goes on. The outcome must not depend on the
    # process's warning filters (pytest turns them into errors), and our cap, checked from the
    # header, is the one that counts. Only warnings raised from PIL modules are silenced;
    # Pillow still raises DecompressionBombError past twice its limit.
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        yield


def decode_image(data: bytes, *, max_decoded_pixels: int) -> Image.Image:
    """Decode ``data`` to a fully loaded, upright, mode ``"RGB"`` image (first frame only).

    Raises ImageTooLarge when the header claims more than ``max_decoded_pixels`` pixels (no
    pixel is decoded then), InvalidImage for anything else that is not a whole image of an
    allowed format.
    """
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    what = "image"  # becomes e.g. "PNG image" once the header is identified
    try:
        with _pillow_quiet():
            image = Image.open(BytesIO(data), formats=_FORMATS)
        what = f"{image.format} image" if image.format else what
        _check_size(image.size, what, max_decoded_pixels)
        # Pillow can warn inside load() too: TIFF parses its EXIF directories there, and an
        # image past Pillow's own pixel limit meets the bomb check again (TIFF tiles).
        limit = Image.MAX_IMAGE_PIXELS
        quiet = image.format == "TIFF" or (limit is not None and math.prod(image.size) > limit)
        with _pillow_quiet() if quiet else contextlib.nullcontext():
            image.load()  # truncated data raises here: LOAD_TRUNCATED_IMAGES stays False
        with _pillow_quiet():
            _make_upright(image)
        return _to_rgb(image)
    except CaptionError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"{what} is too large to decode ({_clean(exc)}); "
            f"the limit is {max_decoded_pixels:,} decoded pixels"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(_unidentified(data)) from None
    except MemoryError:
        raise  # the worker is short of memory; the image itself passed the pixel cap
    except Exception as exc:  # any Pillow/numpy failure on hostile bytes means a bad image
        raise InvalidImage(f"could not decode {what}: {_clean(exc)}") from None


def _check_size(size: tuple[int, int], what: str, max_decoded_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{what} has no pixels ({width}x{height})")
    if width * height > max_decoded_pixels:
        raise ImageTooLarge(
            f"{what} is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_decoded_pixels:,} decoded pixels"
        )
    if max(width, height) > MAX_DECODE_ASPECT_RATIO * min(width, height):
        raise InvalidImage(
            f"{what} is {width}x{height}: aspect ratio above "
            f"{MAX_DECODE_ASPECT_RATIO}:1 leaves nothing to caption"
        )


def _make_upright(image: Image.Image) -> None:
    # Broken EXIF on an otherwise good image is common (camera firmware): keep the pixels as
    # stored rather than fail a caption over orientation. in_place, because the copying form
    # returns a full copy even when there is nothing to turn.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _stretch_to_l(image).convert("RGB")
    if mode == "La":  # premultiplied; Pillow has no direct La -> RGBA
        image, mode = image.convert("LA"), "LA"
    if "A" in mode or "a" in mode or "transparency" in image.info:
        # Transparent pixels carry arbitrary colour (often black): show them as white paper.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "RGB":
        return image
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX


def _stretch_to_l(image: Image.Image) -> Image.Image:
    # 16-bit and float data: convert("L") clips everything above 255 to white, so map the
    # values actually present onto 0..255 instead (a 12-bit scan uses the full range too).
    values = np.asarray(image)
    if values.dtype.kind == "f":  # float TIFFs can hold NaN and infinities: range of the rest
        finite = np.isfinite(values)
        low = float(values.min(where=finite, initial=np.inf))
        high = float(values.max(where=finite, initial=-np.inf))
    else:
        low, high = float(values.min()), float(values.max())
    if not high > low:  # flat (or all-NaN) image: keep its level on the type's natural scale
        level = low * 255.0 / 65535.0 if image.mode.startswith("I;16") else low
        return Image.new("L", image.size, round(min(max(level, 0.0), 255.0)) if high == low else 0)
    clean = np.nan_to_num(values.astype(np.float32), nan=low, posinf=high, neginf=low)
    scaled = (clean - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _unidentified(data: bytes) -> str:
    allowed = ", ".join(_FORMATS)
    head = data[:64].lstrip().lower()
    for magic, name in _KNOWN_OTHERS:
        if head.startswith(magic.lower()):
            return f"{name} is not an allowed image format (allowed: {allowed})"
    return f"not a recognised image ({len(data):,} bytes); allowed formats: {allowed}"


def _clean(exc: BaseException) -> str:
    # Pillow messages can quote header bytes; keep them printable and short.
    text = "".join(ch if ch.isprintable() else "?" for ch in str(exc))[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fit_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink ``image`` to at most ``max_pixels`` pixels, keeping its aspect ratio.

    Never upscales. An image more than MAX_ASPECT_RATIO:1 is padded with white, centred, to
    that ratio (the padding counts against the budget), so long banners still caption.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    width, height = image.size
    long_side, short_side = max(width, height), min(width, height)
    canvas_short = max(short_side, math.ceil(long_side / MAX_ASPECT_RATIO))
    # Size the padded canvas, not the content, so the padding cannot push past the budget.
    scale = min(1.0, math.sqrt(max_pixels / (long_side * canvas_short)))
    new_long = max(1, math.floor(long_side * scale))
    while True:  # rounding can overshoot by a pixel row or two; shrink until it fits
        content_short = max(1, round(short_side * new_long / long_side))
        new_canvas_short = max(content_short, math.ceil(new_long / MAX_ASPECT_RATIO))
        if new_long * new_canvas_short <= max_pixels or new_long == 1:
            break
        new_long -= 1
    if (new_long, new_canvas_short) == (long_side, short_side):
        return image
    landscape = width >= height
    content_size = (new_long, content_short) if landscape else (content_short, new_long)
    if content_size != image.size:
        # reducing_gap box-reduces by an integer factor first and finishes with Lanczos:
        # far faster on 100 MP inputs, with no visible difference at the output size.
        image = image.resize(content_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if new_canvas_short == content_short:
        return image
    canvas_size = (new_long, new_canvas_short) if landscape else (new_canvas_short, new_long)
    canvas = Image.new(image.mode, canvas_size, "white")
    canvas.paste(
        image, ((canvas_size[0] - content_size[0]) // 2, (canvas_size[1] - content_size[1]) // 2)
    )
    return canvas
