"""The ``caption`` Celery task: a thin adapter around ``CaptionService``.

It adds what only the queue knows about: crash accounting (a task whose generate call
never returned ``CAPTION_MAX_DELIVERIES`` times is failed, and after one such crash it runs
alone, so neighbours that merely shared its batch are not blamed), a backstop on plain
deliveries for workers that die elsewhere, a stored result from an earlier delivery
(returned as is, so a duplicate never yields a second answer), and retries with backoff
for storage trouble.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Task, shared_task
from celery import states as celery_states
from redis.exceptions import RedisError

from worker.errors import InvalidRequest, StorageUnavailable, TooManyDeliveries
from worker.lifecycle import lifecycle

log = logging.getLogger(__name__)

CRASH_KEY = "caption:crashes:{task_id}:{retry}"
DELIVERY_KEY = "caption:deliveries:{task_id}:{retry}"
# Deliveries per CAPTION_MAX_DELIVERIES before a task fails however its workers died (a crash
# outside the model, say in an image decoder): looser than the crash limit, because tasks
# that were merely in flight when a neighbour killed the process are charged here too.
DELIVERY_BACKSTOP_FACTOR = 3
KEY_TTL_S = 7 * 86_400


@dataclass
class _CrashGuard:
    """Counts generate calls with this task in them that never returned (the worker died)."""

    client: Any
    key: str
    suspect: bool

    def enter(self) -> None:
        # Accounting must never cost a caption: with Redis briefly away (a restart), the
        # row still runs and only this one crash record is lost.
        try:
            self.client.pipeline().incr(self.key).expire(self.key, KEY_TTL_S).execute()
        except RedisError as exc:
            log.warning("crash accounting unavailable for %s: %s", self.key, exc)

    def exit(self) -> None:
        try:
            self.client.decr(self.key)
        except RedisError as exc:
            log.warning("crash accounting unavailable for %s: %s", self.key, exc)


def _crash_guard(task: Task, limit: int) -> _CrashGuard | None:
    client = getattr(task.backend, "client", None)
    if client is None:
        return None  # not a Redis result backend: no counter, redelivery limit not enforced
    names = {"task_id": task.request.id, "retry": task.request.retries or 0}
    key = CRASH_KEY.format(**names)
    deliveries_key = DELIVERY_KEY.format(**names)
    deliveries, _, crashes_raw = (
        client.pipeline().incr(deliveries_key).expire(deliveries_key, KEY_TTL_S).get(key).execute()
    )
    crashes = int(crashes_raw or 0)
    if int(deliveries) > limit * DELIVERY_BACKSTOP_FACTOR:
        raise TooManyDeliveries(
            f"task was delivered {deliveries} times without finishing; its workers keep "
            f"dying (backstop {DELIVERY_BACKSTOP_FACTOR} x CAPTION_MAX_DELIVERIES={limit})"
        )
    if crashes >= limit:
        raise TooManyDeliveries(
            f"the worker died {crashes} times while captioning this task (limit "
            f"CAPTION_MAX_DELIVERIES={limit}); the input likely crashes the model"
        )
    return _CrashGuard(client, key, suspect=crashes > 0)


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
    guard = _crash_guard(self, service.settings.max_deliveries)
    try:
        return service.caption(kwargs, guard=guard)
    except StorageUnavailable as exc:
        retries = self.request.retries or 0
        if retries >= service.settings.storage_retries:
            raise
        countdown = service.settings.storage_retry_backoff_s * 2**retries
        log.warning("storage unavailable (%s); retry %d in %.1fs", exc, retries + 1, countdown)
        raise self.retry(exc=exc, countdown=countdown, max_retries=None) from None
