"""The pinned result: what the tiny model (seed 0) answers for the standard test image.

Measured with the code before the package restructure: the same task must give the same
result JSON, key order included. Settings: the tiny model in float32, CAPTION_MAX_PIXELS and
CAPTION_MIN_PIXELS at their defaults; image ``png_bytes()``; the kwargs below.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

KWARGS = {"prompt": "Describe this image.", "max_new_tokens": 12}
KEYS = [
    "text",
    "model",
    "image",
    "prompt_tokens",
    "generated_tokens",
    "finish_reason",
    "seconds",
    "batch_size",
    "worker",
    "image_size",
    "model_image_size",
    "model_revision",
    "quantization",
    "dtype",
    "versions",
    "model_loaded_at",
]
STABLE = {
    "text": "MgeMgeMgeyelMgeK bryel",
    "prompt_tokens": 103,
    "generated_tokens": 12,
    "finish_reason": "length",
    "batch_size": 1,
    "image_size": [96, 64],
    "model_image_size": [320, 224],
    "model_revision": None,
    "quantization": {
        "quant_method": "sdnq",
        "weights_dtype": "uint4",
        "use_svd": True,
        "svd_rank": 8,
        # Added with weight forms (a contract addition): which form served the caption.
        "served_as": "sdnq",
    },
    "dtype": "float32",
}


def assert_pinned(result: dict[str, Any], *, model: str, image: str) -> None:
    """``result`` (as parsed from JSON, order kept) is the pinned result for ``image``."""
    assert list(result) == KEYS
    assert {k: result[k] for k in STABLE} == STABLE
    assert (result["model"], result["image"]) == (model, image)
    # Per run or per process: only their types are pinned.
    assert type(result["seconds"]) is float and result["seconds"] > 0
    assert type(result["worker"]) is str and result["worker"]
    assert type(result["model_loaded_at"]) is float
    # The versions of this environment, in this order.
    names = ("torch", "transformers", "sdnq", "accelerate")
    assert result["versions"] == {name: metadata.version(name) for name in names}
    assert list(result["versions"]) == list(names)
