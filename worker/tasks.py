"""The ``caption`` Celery task: a thin adapter around ``CaptionService``.

It adds what only the queue knows about: how often this message was delivered (a task
that keeps killing its worker is failed after ``CAPTION_MAX_DELIVERIES``), a stored result
from an earlier delivery (returned as is, so a duplicate never yields a second answer),
and retries with backoff for storage trouble.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery import states as celery_states

from worker.errors import InvalidRequest, StorageUnavailable, TooManyDeliveries
from worker.lifecycle import lifecycle

log = logging.getLogger(__name__)

DELIVERY_KEY = "caption:deliveries:{task_id}:{retry}"


def _count_delivery(task: Task, limit: int) -> None:
    client = getattr(task.backend, "client", None)
    if client is None:
        return  # not a Redis result backend: no counter, redelivery limit not enforced
    key = DELIVERY_KEY.format(task_id=task.request.id, retry=task.request.retries or 0)
    count = int(client.incr(key))
    client.expire(key, 7 * 86_400)
    if count > limit:
        raise TooManyDeliveries(
            f"task was delivered {count} times and every earlier attempt died with its "
            f"worker (limit CAPTION_MAX_DELIVERIES={limit}); the input likely crashes the model"
        )


def _stored_success(task: Task) -> Any:
    meta = task.backend.get_task_meta(task.request.id)
    if meta.get("status") == celery_states.SUCCESS:
        return meta.get("result")
    return None


@shared_task(name="caption", bind=True)  # type: ignore[untyped-decorator]
def caption(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Caption ``kwargs["image"]``; see the task contract in the README."""
    service = lifecycle.service
    if args:
        raise InvalidRequest("the caption task takes keyword arguments only")
    earlier = _stored_success(self)
    if earlier is not None:
        log.info("task %s already succeeded; returning the stored result", self.request.id)
        return dict(earlier)
    _count_delivery(self, service.settings.max_deliveries)
    try:
        return service.caption(kwargs)
    except StorageUnavailable as exc:
        retries = self.request.retries or 0
        if retries >= service.settings.storage_retries:
            raise
        countdown = service.settings.storage_retry_backoff_s * 2**retries
        log.warning("storage unavailable (%s); retry %d in %.1fs", exc, retries + 1, countdown)
        raise self.retry(exc=exc, countdown=countdown, max_retries=None) from None
