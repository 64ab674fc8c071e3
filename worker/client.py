"""Producer API: enqueue caption tasks and read their results.

Only Celery and the broker/backend URLs are needed; this module never loads a model.
A producer in another codebase can do the same with ``Celery(...).send_task("caption",
kwargs=...)``; ``submit`` additionally records that the id was queued, so ``status`` can
tell a task still waiting in the queue from an id nobody ever sent, and stamps the message
with its send time (``SENT_AT_HEADER``), from which workers measure queue wait.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from worker.contract import TASK_NAME
from worker.queue.keys import QUEUED_KEY
from worker.settings import Settings

#: Message header: when the producer sent the task, in seconds since the Unix epoch (a JSON
#: number). Workers observe ``caption_queue_wait_seconds`` from it; see docs/contract.md.
SENT_AT_HEADER = "caption_sent_at"


@dataclass(frozen=True)
class TaskStatus:
    """Where a task stands: QUEUED, STARTED, RETRY, SUCCESS, FAILURE or UNKNOWN."""

    task_id: str
    state: str
    result: dict[str, Any] | None = None
    error_type: str | None = None
    error: str | None = None


class CaptionClient:
    """Submit caption tasks and poll them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery(
            "caption-client", broker=settings.broker_url, backend=settings.result_backend
        )
        self.app.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_expires=settings.result_expires_s,
            broker_connection_retry_on_startup=True,
            # A task-sent event, so monitors (Flower, celery-exporter) count tasks from the
            # moment they are queued, not only once a worker takes them.
            task_send_sent_event=True,
        )

    def submit(self, image: str, **options: Any) -> str:
        """Enqueue one caption task and return its id."""
        task_id = str(uuid.uuid4())
        client = getattr(self.app.backend, "client", None)
        queued = QUEUED_KEY.format(task_id=task_id)
        # Marked before sending: a task that finishes at once deletes the marker, and a
        # marker written after that would outlive its task.
        if client is not None:
            client.set(queued, "1", ex=self.settings.result_expires_s)
        try:
            self.app.send_task(
                TASK_NAME,
                kwargs={"image": image, **options},
                queue=self.settings.queue,
                task_id=task_id,
                headers={SENT_AT_HEADER: time.time()},
            )
        except BaseException:
            if client is not None:
                client.delete(queued)
            raise
        return task_id

    def status(self, task_id: str) -> TaskStatus:
        """The task's state; PENDING is reported as QUEUED or UNKNOWN."""
        res = AsyncResult(task_id, app=self.app)
        state = res.state
        if state == "PENDING":
            client = getattr(self.app.backend, "client", None)
            queued = client is not None and client.exists(QUEUED_KEY.format(task_id=task_id))
            return TaskStatus(task_id, "QUEUED" if queued else "UNKNOWN")
        if state == "SUCCESS":
            return TaskStatus(task_id, state, result=res.result)
        if state in ("FAILURE", "RETRY"):
            exc = res.result
            return TaskStatus(task_id, state, error_type=type(exc).__name__, error=str(exc))
        return TaskStatus(task_id, state)

    def result(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the caption; raises the task's typed error, or TimeoutError."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        res = AsyncResult(task_id, app=self.app)
        try:
            value = res.get(timeout=timeout, interval=0.2)
        except CeleryTimeout:
            raise TimeoutError(f"task {task_id} not finished within {timeout}s") from None
        return dict(value)

    def close(self) -> None:
        """Release broker and backend connections."""
        self.app.close()
