"""The pinned result, in-process: ``caption_locally`` builds the runtime a worker builds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support import pinned
from tests.support.images import png_bytes
from worker.runtime.local import caption_locally
from worker.settings import Settings


@pytest.mark.parametrize("engine", ["generate", "slots"])
def test_the_tiny_model_gives_the_pinned_result(
    engine: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Both engines: the slot engine's greedy captions are the reference engine's."""
    image = tmp_path / "pinned.png"
    image.write_bytes(png_bytes())
    settings = Settings(
        model=str(tiny_model_dir), dtype="float32", auto_download=False, engine=engine
    )
    for name in ("max_pixels", "min_pixels"):  # the defaults, not the environment's
        settings = settings.model_copy(update={name: Settings.model_fields[name].default})

    result = caption_locally(
        settings, str(image), pinned.KWARGS["prompt"], pinned.KWARGS["max_new_tokens"]
    )

    as_json = json.loads(json.dumps(result.to_json()))
    pinned.assert_pinned(as_json, model=str(tiny_model_dir.resolve()), image=str(image))
    assert as_json["worker"] == f"local/{os.getpid()}"
