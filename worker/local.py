"""Caption one image in-process, without a broker: ``caption-worker caption``.

It runs the same service a worker runs (engine, batcher, image guards), so what a model
does here is what it does behind the queue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.batcher import Batcher, BatchLimits
from worker.errors import ImageNotFound, ImageTooLarge
from worker.lifecycle import load_factory
from worker.service import CaptionService
from worker.settings import Settings
from worker.storage import ObjectStore


def caption_locally(
    settings: Settings, source: str, prompt: str | None, max_new_tokens: int
) -> dict[str, Any]:
    """Load the model, caption ``source`` (file path or s3:// URI), return the result."""
    data: bytes | None = None
    if not source.startswith("s3://"):
        path = Path(source)
        if not path.is_file():
            raise ImageNotFound(f"{source} is not a file")
        if path.stat().st_size > settings.max_image_bytes:
            raise ImageTooLarge(f"{source} is larger than CAPTION_MAX_IMAGE_BYTES")
        data = path.read_bytes()
    engine = load_factory(settings.engine_factory)(settings)
    batcher = Batcher(engine, BatchLimits(max_batch=1))
    batcher.start()
    try:
        service = CaptionService(
            settings, engine, ObjectStore(settings), batcher, f"local/{os.getpid()}"
        )
        kwargs: dict[str, Any] = {"image": source, "max_new_tokens": max_new_tokens}
        if prompt is not None:
            kwargs["prompt"] = prompt
        return service.caption(kwargs, data=data)
    finally:
        batcher.stop()
