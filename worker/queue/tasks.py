"""The ``caption`` Celery task: a thin adapter around ``CaptionService``.

It adds what only the queue knows about: the service travels with the Celery app (the
worker's ``CaptionApp``), crash accounting per delivery, a stored result from an earlier
delivery (returned as is, so a duplicate never yields a second answer), retries with
backoff for errors marked ``retryable``, and cleanup: once the result is stored, the task's
counters and QUEUED marker are deleted, so Redis keeps one key per finished task. Every run
is counted in the worker's metrics by outcome, with its queue wait when the message says
when it was sent.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, shared_task
from celery import states as celery_states
from celery.exceptions import Retry

from worker.client import SENT_AT_HEADER
from worker.contract import TASK_NAME, parse_request
from worker.errors import CaptionError, CaptionFailed, InvalidRequest
from worker.ops.metrics import MetricsHook, Outcome, queue_wait_seconds
from worker.queue.crash import CrashGuard, admit_delivery, forget
from worker.runtime.lifecycle import Lifecycle
from worker.settings import get_settings

log = logging.getLogger(__name__)


def lifecycle_of(app: Any) -> Lifecycle:
    """The lifecycle the worker's app carries; a task on any other app cannot run."""
    lifecycle = getattr(app, "lifecycle", None)
    if not isinstance(lifecycle, Lifecycle):
        raise CaptionFailed("this Celery app does not run the caption worker")
    return lifecycle


def _stored_success(task: Task) -> Any:
    meta = task.backend.get_task_meta(task.request.id)
    if meta.get("status") == celery_states.SUCCESS:
        return meta.get("result")
    return None


def _crash_guard(task: Task, limit: int) -> CrashGuard | None:
    client = getattr(task.backend, "client", None)
    if client is None:
        return None  # not a Redis result backend: no counter, redelivery limit not enforced
    return admit_delivery(client, task.request.id, task.request.retries or 0, limit)


class CaptionTask(Task):  # type: ignore[misc]
    """The task class: deletes per-task bookkeeping once the outcome is stored."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Any,
        kwargs: Any,
        einfo: Any,
    ) -> None:
        # Celery calls this after the result is stored, for SUCCESS and FAILURE only.
        client = getattr(self.backend, "client", None)
        if client is not None:
            forget(client, task_id, self.request.retries or 0, finished=True)


def _observe_queue_wait(task: Task, metrics: MetricsHook) -> None:
    request = task.request
    # Only a first delivery of a first attempt: a retry's or a redelivery's wait since the
    # original send includes backoff or a dead worker's time, not the queue's.
    if (request.retries or 0) or (request.delivery_info or {}).get("redelivered"):
        return
    wait = queue_wait_seconds(request.get(SENT_AT_HEADER), time.time())
    if wait is not None:
        metrics.queue_waited(wait)


@shared_task(name=TASK_NAME, bind=True, base=CaptionTask)  # type: ignore[untyped-decorator]
def caption(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Caption ``kwargs["image"]``; see the task contract in the README."""
    lifecycle = lifecycle_of(self.app)
    started = time.perf_counter()
    queue = (self.request.delivery_info or {}).get("routing_key") or get_settings().queue
    _observe_queue_wait(self, lifecycle.metrics)
    outcome: Outcome = "failure"
    error: BaseException | None = None
    try:
        result = _caption(self, lifecycle, args, kwargs)
        outcome = "success"
        return result
    except Retry:
        outcome = "retry"
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        # Counted before Celery stores the outcome, so a scrape after a result is visible
        # already includes it.
        lifecycle.metrics.task_finished(queue, outcome, time.perf_counter() - started, error)


def _caption(
    task: Task, lifecycle: Lifecycle, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The task's work: parse, duplicate check, crash guard, caption, retry."""
    service = lifecycle.service
    settings = service.settings
    if args:
        raise InvalidRequest("the caption task takes keyword arguments only")
    request = parse_request(kwargs, settings)
    service.validate(request)  # a request refused here never counts as a delivery
    earlier = _stored_success(task)
    if earlier is not None:
        log.info("task %s already succeeded; returning the stored result", task.request.id)
        return dict(earlier)
    guard = _crash_guard(task, settings.max_deliveries)
    try:
        return service.caption(request, guard=guard).to_json()
    except CaptionError as exc:
        retries = task.request.retries or 0
        if not exc.retryable or retries >= settings.storage_retries:
            raise
        countdown = settings.storage_retry_backoff_s * 2**retries
        client = getattr(task.backend, "client", None)
        if client is not None:  # this attempt is over; the retry counts afresh
            forget(client, task.request.id, retries, finished=False)
        log.warning("%s (%s); retry %d in %.1fs", type(exc).__name__, exc, retries + 1, countdown)
        raise task.retry(exc=exc, countdown=countdown, max_retries=None) from None
