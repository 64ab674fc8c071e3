"""One caption task from request to result: validate, fetch, decode, batch, report.

This is the domain side of the ``caption`` task; the Celery adapter in ``worker.tasks``
only adds delivery counting and retries around it.
"""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from worker.batcher import Batcher, RunGuard
from worker.engine import Engine
from worker.errors import CaptionTimeout, ModelMismatch
from worker.images import decode_image, fit_pixel_budget
from worker.request import parse_request
from worker.settings import DEADLINE_GRACE_S, Settings
from worker.storage import ObjectStore, S3Location


@dataclass
class CaptionService:
    """Everything a task needs, built once per worker process."""

    settings: Settings
    engine: Engine
    store: ObjectStore
    batcher: Batcher
    worker_name: str

    def caption(
        self, kwargs: dict[str, Any], data: bytes | None = None, guard: RunGuard | None = None
    ) -> dict[str, Any]:
        """Caption the image a task names and return the contract's result object.

        ``data`` supplies the image bytes directly (local captions); tasks leave it None
        and the image is fetched from the S3 URI in ``kwargs["image"]``.
        """
        deadline = time.monotonic() + self.settings.task_deadline_s
        request = parse_request(kwargs, self.settings)
        if request.model is not None and not self.engine.resolved.matches(request.model):
            raise ModelMismatch(
                f"this worker serves {self.engine.name!r}, not {request.model!r}; "
                "route the task to a queue whose workers load that model"
            )
        location = S3Location.parse(request.image) if data is None else None
        with self.batcher.expect():
            if location is not None:
                data = self.store.fetch(location)
            assert data is not None
            image = decode_image(data, max_decoded_pixels=self.settings.max_decoded_pixels)
            original_size = image.size
            image = fit_pixel_budget(image, request.max_pixels)
            prepared = self.engine.prepare(
                image,
                request.prompt,
                max_new_tokens=request.max_new_tokens,
                options=request.options,
                max_pixels=request.max_pixels,
                min_pixels=min(self.settings.min_pixels, request.max_pixels),
            )
            future = self.batcher.submit(prepared, deadline, guard)
        try:
            output = future.result(timeout=deadline - time.monotonic() + DEADLINE_GRACE_S)
        except FutureTimeout:
            future.cancel()
            raise CaptionTimeout(
                f"no caption within the {self.settings.task_deadline_s:g}s task deadline"
            ) from None
        provenance = self.engine.provenance
        return {
            "text": output.text,
            "model": self.engine.name,
            "image": request.image,
            "prompt_tokens": output.prompt_tokens,
            "generated_tokens": output.generated_tokens,
            "finish_reason": output.finish_reason,
            "seconds": round(output.seconds, 4),
            "batch_size": output.batch_size,
            "worker": self.worker_name,
            "image_size": list(original_size),
            "model_image_size": list(prepared.image_size),
            "model_revision": provenance.get("revision"),
            "quantization": provenance.get("quantization"),
            "dtype": provenance.get("dtype"),
            "versions": provenance.get("versions"),
            "model_loaded_at": self.engine.loaded_at,
        }
