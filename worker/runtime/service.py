"""One caption from request to result: fetch, decode, prepare, run, report.

This is the domain side of the ``caption`` task; the Celery adapter in ``worker.queue``
parses the kwargs and adds delivery counting and retries around it. The same object serves
local captions and the benchmark, so what a model does there is what it does behind the
queue.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from worker.contract import CaptionRequest, CaptionResult
from worker.engine.base import (
    CaptionEngine,
    CaptionOutput,
    Lane,
    PreparedInput,
    RowRunner,
    RunGuard,
)
from worker.errors import CaptionTimeout, ModelMismatch
from worker.images import decode_image, fit_pixel_budget
from worker.ops.metrics import NO_METRICS, MetricsHook
from worker.settings import DEADLINE_GRACE_S, Settings
from worker.storage.s3 import ObjectStore, S3Location


@dataclass
class CaptionService:
    """Everything a caption needs, built once per worker process (see ``bootstrap``)."""

    settings: Settings
    engine: CaptionEngine
    store: ObjectStore
    runner: RowRunner
    worker_name: str
    metrics: MetricsHook = NO_METRICS

    def validate(self, request: CaptionRequest, *, local: bool = False) -> S3Location | None:
        """Refuse a request this worker cannot serve, before any work; its S3 location.

        ``local``: the image bytes come with the request (local captions), not from S3.
        """
        info = self.engine.info
        if request.model is not None and not info.resolved.matches(request.model):
            raise ModelMismatch(
                f"this worker serves {info.name!r}, not {request.model!r}; "
                "route the task to a queue whose workers load that model"
            )
        return None if local else S3Location.parse(request.image)

    def prepare(
        self, request: CaptionRequest, data: bytes
    ) -> tuple[PreparedInput, tuple[int, int]]:
        """Decode, guard and resize the image, then build the model row.

        Returns the row and the image's stored size (width, height).
        """
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
        return prepared, original_size

    def wait_for(self, future: Future[CaptionOutput], deadline: float) -> CaptionOutput:
        """A submitted row's output; CaptionTimeout (and the row cancelled) once its
        deadline, plus one decode step of grace, has passed."""
        try:
            return future.result(timeout=deadline - time.monotonic() + DEADLINE_GRACE_S)
        except FutureTimeout:
            future.cancel()
            raise CaptionTimeout(
                f"no caption within the {self.settings.task_deadline_s:g}s task deadline"
            ) from None

    def caption(
        self,
        request: CaptionRequest,
        data: bytes | None = None,
        guard: RunGuard | None = None,
        lane: Lane = "interactive",
    ) -> CaptionResult:
        """Caption the image a request names.

        ``data`` supplies the image bytes directly (local captions); tasks leave it None
        and the image is fetched from the request's S3 URI. ``lane`` is who waits for it: the
        runner takes interactive rows before bulk rows, and the metrics count it by lane.
        """
        deadline = time.monotonic() + self.settings.task_deadline_s
        location = self.validate(request, local=data is not None)
        with self.runner.expect(lane):
            if location is not None:
                data = self.store.fetch(location)
            if data is None:  # unreachable: either bytes were given or fetched
                raise ValueError("no image bytes")
            prepared, original_size = self.prepare(request, data)
            future = self.runner.submit(prepared, deadline, guard, lane)
        output = self.wait_for(future, deadline)
        self.metrics.caption_delivered(lane, output.prompt_tokens, output.generated_tokens)
        info = self.engine.info
        provenance = info.provenance
        return CaptionResult(
            text=output.text,
            model=info.name,
            image=request.image,
            prompt_tokens=output.prompt_tokens,
            generated_tokens=output.generated_tokens,
            finish_reason=output.finish_reason,
            seconds=round(output.seconds, 4),
            batch_size=output.batch_size,
            worker=self.worker_name,
            image_size=original_size,
            model_image_size=prepared.image_size,
            model_revision=provenance.get("revision"),
            quantization=provenance.get("quantization"),
            dtype=provenance.get("dtype"),
            versions=provenance.get("versions"),
            model_loaded_at=info.loaded_at,
        )
