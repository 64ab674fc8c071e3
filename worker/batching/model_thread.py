"""The thread that owns the model: start, stop, and the door rows come in by.

Both runners (the whole-batch ``Batcher`` and the ``SlotRunner``) are one of these: task
threads ``submit`` rows under the shared condition, and the runner's ``_loop`` takes them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

from worker.batching.rows import PendingRow
from worker.engine.base import CaptionOutput, Lane, PreparedInput, RunGuard, device_failed
from worker.errors import CaptionFailed
from worker.ops.metrics import NO_METRICS, MetricsHook


class ModelThread:
    """Start/stop of the model thread and row submission; subclasses run ``_loop``."""

    thread_name = "caption-model"

    def __init__(
        self,
        metrics: MetricsHook = NO_METRICS,
        on_device_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._metrics = metrics
        self._on_device_failure = on_device_failure
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        # monotonic start of the model call in progress, for the hang watchdog.
        self.busy_since: float | None = None

    def start(self) -> None:
        """Start the model thread."""
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the model thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted row, then stop the thread."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(
        self,
        item: PreparedInput,
        deadline: float,
        guard: RunGuard | None = None,
        lane: Lane = "interactive",
    ) -> Future[CaptionOutput]:
        """Queue one prepared row of ``lane``; the future resolves to its caption or a typed
        error. Interactive rows are taken before bulk rows (``worker.batching.policy``)."""
        future: Future[CaptionOutput] = Future()
        with self._cond:
            if not self._running:
                raise CaptionFailed("the worker is shutting down")
            self._enqueue(PendingRow(item, deadline, future, guard=guard, lane=lane))
            self._cond.notify_all()
        return future

    def _check_device(self, exc: BaseException) -> None:
        """Hand a failure of the device itself to ``on_device_failure`` (the worker exits
        there, so its unacknowledged tasks go to a healthy worker) before the rows of the
        failed call are failed or let go: their crash guards are still entered, so the
        exit counts against them as a crash would. Called first in every handler of a
        model call; any other error returns here and is the rows' own."""
        if self._on_device_failure is not None and device_failed(exc):
            self._on_device_failure(exc)

    def _enqueue(self, row: PendingRow) -> None:
        """Add a submitted row to the runner's queue (condition held)."""
        raise NotImplementedError

    def _loop(self) -> None:
        """Run rows until stopped and nothing is left."""
        raise NotImplementedError
