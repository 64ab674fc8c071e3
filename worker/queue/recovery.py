"""Crash recovery on a Redis broker: a dead worker's deliveries go back to the queue in seconds.

kombu's Redis transport keeps every delivered, unacknowledged message in the ``unacked``
hash and restores one only after the visibility timeout, which must exceed the longest
task (an hour by default). It cannot tell a dead worker's message from a slow one's. So
each worker mirrors the delivery tags it holds into a Redis set (``HeldDeliveries``), and
when its heartbeat stops, a live worker restores exactly those tags (``DeliveryRestorer``)
through kombu's own ``restore_by_tag``: a WATCHed transaction that re-queues a message
only while it is still unacknowledged, so a late acknowledgement and a second restorer
both make it a no-op. The visibility timeout stays as the backstop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from worker.queue.keys import HELD_KEY, LIVENESS_TTL_S

log = logging.getLogger(__name__)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def celery_held_tags() -> set[str]:
    """Delivery tags of every message this Celery worker holds (reserved, running, waiting
    for an ETA)."""
    from celery.worker import state

    tags = set()
    for request in list(state.requests.values()):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            tags.add(str(tag))
    return tags


class HeldDeliveries:
    """The delivery tags one worker holds, mirrored into ``caption:held:<worker>``.

    ``received`` adds a tag the moment a message arrives; ``sync`` (each heartbeat)
    reconciles with what the worker really holds. A tag leaves the set only after two
    syncs in a row found it gone: a message that arrived between reading the worker's
    state and writing the set, or one whose acknowledgement is still on its way, is kept.
    Restoring an acknowledged tag is harmless; forgetting a held one costs the visibility
    timeout.
    """

    def __init__(self, client: Any, worker_id: str, current: Callable[[], set[str]]) -> None:
        self.client = client
        self.key = HELD_KEY.format(worker=worker_id)
        self._current = current
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._gone_once: set[str] = set()

    def received(self, tag: str) -> None:
        """Record a delivery as soon as the consumer has it."""
        with self._lock:
            self._known.add(tag)
        self.client.pipeline().sadd(self.key, tag).expire(self.key, LIVENESS_TTL_S).execute()

    def sync(self) -> None:
        """Add what the worker holds and the set lacks; drop what has been gone twice."""
        current = self._current()
        with self._lock:
            new = current - self._known
            self._known |= current
            gone = self._known - current
            drop = gone & self._gone_once
            self._gone_once = gone - drop
            self._known -= drop
        pipe = self.client.pipeline()
        if new:
            pipe.sadd(self.key, *new)
        if drop:
            pipe.srem(self.key, *drop)
        pipe.expire(self.key, LIVENESS_TTL_S)
        pipe.execute()

    def clear(self) -> None:
        """A clean stop: kombu has handed back what was not run; nothing is held."""
        self.client.delete(self.key)


class DeliveryRestorer:
    """Re-queues a dead worker's unacknowledged deliveries through a kombu Redis channel.

    Call it with the dead worker's id (``Heartbeat``'s ``on_dead``). Safe to repeat and to
    run in two workers at once.
    """

    def __init__(self, channel: Any, client: Any) -> None:
        self.qos = channel.qos
        self.client = client

    def __call__(self, worker_id: str) -> int:
        """Restore the worker's held deliveries; the number put back on their queues."""
        key = HELD_KEY.format(worker=worker_id)
        tags = sorted(_text(t) for t in self.client.smembers(key))
        restored = 0
        for tag in tags:
            # Only for the log line: restore_by_tag itself re-checks inside its transaction.
            if self.client.hexists(self.qos.unacked_key, tag):
                restored += 1
            self.qos.restore_by_tag(tag, client=self.client)
        self.client.delete(key)
        if tags:
            log.warning(
                "handed back %d unacknowledged deliveries of dead worker %s (%d it held had "
                "finished)",
                restored,
                worker_id,
                len(tags) - restored,
            )
        return restored
