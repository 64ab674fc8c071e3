"""The Celery worker's heartbeat and crash recovery, wired to its broker.

With a Redis broker each worker process beats, mirrors the deliveries it holds, and hands
back the deliveries of workers whose beat stopped (``worker.ops.heartbeat``,
``worker.queue.recovery``). With RabbitMQ the broker itself returns a dead consumer's
messages when its connection drops, so nothing is started.

The broker may be unreachable when the worker starts (a Redis restarting while pods
start): Celery's consumer keeps retrying then, and so does this, from a thread of its own,
so the worker starts either way and the heartbeat begins once the broker answers.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from worker.ops.heartbeat import Heartbeat, WorkerRegistry
from worker.ops.metrics import BusyClock
from worker.ops.rates import RateReporter
from worker.queue.recovery import DeliveryRestorer, HeldDeliveries, celery_held_tags
from worker.settings import Settings

log = logging.getLogger(__name__)

#: Exit code of a worker that finds it was declared dead while it was only stalled.
EXIT_FENCED = 5


def _fenced() -> None:
    log.critical(
        "this worker was declared dead (no heartbeat) and its deliveries were handed to "
        "others: exiting without acknowledging them"
    )
    logging.shutdown()
    os._exit(EXIT_FENCED)


class Liveness:
    """A worker's heartbeat, the deliveries it mirrors and its rate reports.

    ``start`` returns at once; a background thread connects to the broker (retrying every
    heartbeat interval) and then starts beating. It owns its broker connection: kombu
    channels are not shared between threads, and this one serves the heartbeat thread (and,
    for single commands through redis-py's thread-safe pool, the consumer).
    """

    def __init__(self, app: Any, settings: Settings, worker_id: str, clock: BusyClock) -> None:
        self._app = app
        self._settings = settings
        self._worker_id = worker_id
        self._clock = clock
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._connection: Any = None
        self.heartbeat: Heartbeat | None = None
        self.held: HeldDeliveries | None = None
        self.rates: RateReporter | None = None

    def start(self) -> Liveness:
        """Connect and start beating, in the background."""
        threading.Thread(target=self._connect_and_beat, name="liveness", daemon=True).start()
        return self

    def _connect_and_beat(self) -> None:
        interval = self._settings.heartbeat_interval_s
        while not self._stopped.is_set():
            connection = self._app.connection_for_write()
            try:
                connection.ensure_connection(max_retries=1)
                channel = connection.default_channel
                with channel.conn_or_acquire() as client:
                    pass  # the channel's pooled client stays usable after the block
                break
            except Exception as exc:  # the consumer reports the outage too; retry quietly
                connection.release()
                log.warning("heartbeat waits for the broker: %s", exc)
                self._stopped.wait(interval)
        else:
            return
        with self._lock:
            if self._stopped.is_set():
                connection.release()
                return
            self._connection = connection
            self._begin(channel, client)

    def _begin(self, channel: Any, client: Any) -> None:
        settings, worker_id = self._settings, self._worker_id
        held = HeldDeliveries(client, worker_id, celery_held_tags)
        rates = RateReporter(client, worker_id, self._clock)
        restore = DeliveryRestorer(channel, client)

        def bury(dead_id: str) -> None:
            restore(dead_id)
            rates.forget(dead_id)

        self.held, self.rates = held, rates
        self.heartbeat = Heartbeat(
            WorkerRegistry(client, worker_id, settings.worker_dead_after_s),
            settings.heartbeat_interval_s,
            on_dead=bury,
            on_fenced=_fenced,
            on_beat=[held.sync, rates],
        ).start()
        log.info(
            "heartbeat every %gs; workers silent for %gs are declared dead",
            settings.heartbeat_interval_s,
            settings.worker_dead_after_s,
        )

    def received(self, delivery_tag: str) -> None:
        """The consumer took a message: record it before any work on it starts."""
        held = self.held
        if held is None:
            return  # not connected yet: the first beat's sync records what is held
        try:
            held.received(delivery_tag)
        except Exception as exc:  # the next beat's sync records it; never refuse a task
            log.warning("could not record delivery %s: %s", delivery_tag, exc)

    def stop(self) -> None:
        """A clean shutdown: stop beating, leave the worker set, forget held deliveries."""
        with self._lock:
            self._stopped.set()
            if self.heartbeat is None or self.held is None or self.rates is None:
                return
            self.heartbeat.stop(leave=True)
            try:
                self.held.clear()
                self.rates.forget()
            except Exception as exc:  # the exporter ignores stale rates; the set expires
                log.warning("could not clear held deliveries or rate: %s", exc)
            self._connection.release()


def start_liveness(
    app: Any, settings: Settings, worker_id: str, clock: BusyClock
) -> Liveness | None:
    """Start the heartbeat for a worker on a Redis broker; None for other brokers.

    Each beat also publishes the rate ``clock`` shows (for the exporter).
    """
    if not settings.broker_is_redis:
        return None
    return Liveness(app, settings, worker_id, clock).start()
