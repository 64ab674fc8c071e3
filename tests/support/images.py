"""Test images."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    """``image`` saved in ``fmt`` (Pillow's save options), as the bytes a store would hold."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_bytes(
    size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    """A small PNG with some structure in it (the defaults are the pinned result's image)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle(
        (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(20, 20, 220)
    )
    return encode(image)
