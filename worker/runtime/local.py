"""Caption one image in-process, without a broker: ``caption-worker caption``.

It builds the same runtime a worker builds (engine, batcher, image guards), so what a model
does here is what it does behind the queue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.batching.policy import BatchLimits
from worker.contract import CaptionResult, parse_request
from worker.errors import ImageNotFound, ImageTooLarge
from worker.runtime.bootstrap import build_runtime
from worker.settings import Settings


def caption_locally(
    settings: Settings, source: str, prompt: str | None, max_new_tokens: int
) -> CaptionResult:
    """Load the model, caption ``source`` (file path or s3:// URI), return the result."""
    data: bytes | None = None
    if not source.startswith("s3://"):
        path = Path(source)
        if not path.is_file():
            raise ImageNotFound(f"{source} is not a file")
        if path.stat().st_size > settings.max_image_bytes:
            raise ImageTooLarge(f"{source} is larger than CAPTION_MAX_IMAGE_BYTES")
        data = path.read_bytes()
    kwargs: dict[str, Any] = {"image": source, "max_new_tokens": max_new_tokens}
    if prompt is not None:
        kwargs["prompt"] = prompt
    request = parse_request(kwargs, settings)
    runtime = build_runtime(
        settings, f"local/{os.getpid()}", limits=BatchLimits(max_batch=1)
    ).start()
    try:
        return runtime.service.caption(request, data=data)
    finally:
        runtime.stop()
