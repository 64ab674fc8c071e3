"""Crash accounting: count deliveries and model calls that never returned, per task attempt.

A task whose model call never returned ``CAPTION_MAX_DELIVERIES`` times is failed with
``TooManyDeliveries``; after one such crash it runs alone, so neighbours that merely shared
its batch are not blamed. A looser backstop on plain deliveries catches workers that die
elsewhere (say, in an image decoder). Counters live in the result backend's Redis, only
while they matter: ``forget`` deletes them when the attempt ends, so a finished task leaves
nothing behind but its result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from worker.errors import TooManyDeliveries
from worker.queue.keys import COUNTER_TTL_S, CRASH_KEY, DELIVERY_KEY, QUEUED_KEY

log = logging.getLogger(__name__)

# Deliveries per CAPTION_MAX_DELIVERIES before a task fails however its workers died: looser
# than the crash limit, because tasks that were merely in flight when a neighbour killed the
# process are charged here too.
DELIVERY_BACKSTOP_FACTOR = 3


@dataclass
class CrashGuard:
    """A task's crash counter, raised while its row is inside a model call (a RunGuard)."""

    client: Any
    key: str
    suspect: bool

    def enter(self) -> None:
        # Accounting must never cost a caption: with Redis briefly away (a restart), the
        # row still runs and only this one crash record is lost.
        try:
            self.client.pipeline().incr(self.key).expire(self.key, COUNTER_TTL_S).execute()
        except RedisError as exc:
            log.warning("crash accounting unavailable for %s: %s", self.key, exc)

    def exit(self) -> None:
        try:
            self.client.decr(self.key)
        except RedisError as exc:
            log.warning("crash accounting unavailable for %s: %s", self.key, exc)


def admit_delivery(client: Any, task_id: str, retry: int, limit: int) -> CrashGuard:
    """Count this delivery; raise TooManyDeliveries if the task keeps killing workers."""
    names = {"task_id": task_id, "retry": retry}
    key = CRASH_KEY.format(**names)
    deliveries_key = DELIVERY_KEY.format(**names)
    deliveries, _, crashes_raw = (
        client.pipeline()
        .incr(deliveries_key)
        .expire(deliveries_key, COUNTER_TTL_S)
        .get(key)
        .execute()
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
    return CrashGuard(client, key, suspect=crashes > 0)


def forget(client: Any, task_id: str, retry: int, *, finished: bool) -> None:
    """Delete an attempt's counters (and, when the task is finished, its QUEUED marker)."""
    keys = [key.format(task_id=task_id, retry=retry) for key in (CRASH_KEY, DELIVERY_KEY)]
    if finished:
        keys.append(QUEUED_KEY.format(task_id=task_id))
    try:
        client.delete(*keys)
    except RedisError as exc:  # the keys expire on their own; never fail a task over them
        log.warning("could not delete counters of task %s: %s", task_id, exc)
