"""The worker process's lifecycle: NEW -> STARTING -> READY -> STOPPING -> STOPPED.

The model loads once, in the main process, before the queue consumes a single message. A
failure while starting leaves the process DEFUNCT; the Celery adapter then exits non-zero,
so nothing was reserved or acknowledged and a supervisor can restart it. Every state change
goes through one table; a change it does not allow raises ``LifecycleError``.

The lifecycle also answers the two probes an orchestrator asks (``/readyz``, ``/healthz``
in ``worker.ops.http``) and owns the process's metrics, which it hands to the runtime.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from pathlib import Path

from worker.errors import CaptionFailed, LifecycleError
from worker.ops.metrics import Metrics
from worker.runtime.bootstrap import Runtime, build_runtime, load_engine
from worker.runtime.service import CaptionService
from worker.runtime.watchdog import Watchdog
from worker.settings import DEADLINE_GRACE_S, Settings

log = logging.getLogger(__name__)

EXIT_HUNG = 4
# The device failed (a sticky CUDA error): this process can caption nothing more.
EXIT_DEVICE_FAILED = 6


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DEFUNCT = "defunct"


ALLOWED: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.DEFUNCT}),
    State.READY: frozenset({State.STOPPING, State.DEFUNCT}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
    State.DEFUNCT: frozenset({State.STOPPING}),
}


class Lifecycle:
    """Owns the process's one Runtime and its state transitions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = State.NEW
        self._settings: Settings | None = None
        self._runtime: Runtime | None = None
        self._watchdog: Watchdog | None = None
        self._consuming = False  # the consumer is connected (Celery's worker_ready)
        self._draining = False  # a warm shutdown has begun (Celery's worker_shutting_down)
        self.metrics = Metrics()
        self.metrics.watch_ready(lambda: self.not_ready() is None)

    @property
    def state(self) -> State:
        return self._state

    def _to(self, new: State) -> None:
        with self._lock:
            if new not in ALLOWED[self._state]:
                raise LifecycleError(f"worker cannot go from {self._state.value} to {new.value}")
            self._state = new

    def start(self, settings: Settings, worker_name: str) -> CaptionService:
        """Check settings, load the model, prove it answers, start the model thread."""
        self._to(State.STARTING)
        self._settings = settings
        self.metrics.serve_queue(settings.queue)
        if settings.ready_file:
            # A restarted container keeps the file of the process that died before it.
            Path(settings.ready_file).unlink(missing_ok=True)
        try:
            settings.check_visibility_timeout()
            started = time.perf_counter()
            engine = load_engine(settings)
            warm = engine.warm_up()
            log.info("warm-up caption answered in %.2fs", warm.seconds)
            runtime = build_runtime(
                settings,
                worker_name,
                engine=engine,
                metrics=self.metrics,
                on_device_failure=self._device_failed,
            ).start()
            self._runtime = runtime
            self._watchdog = Watchdog(
                runtime.runner,
                settings.task_deadline_s + settings.hang_grace_s,
                on_hung=self._hung,
                keep_watching=lambda: self._state in (State.STARTING, State.READY),
            )
            self._watchdog.start()
        except BaseException:
            self._to(State.DEFUNCT)
            raise
        self._to(State.READY)
        log.info(
            "caption worker ready: %s, model %s, %s of %d rows, started in %.1fs",
            worker_name,
            engine.info.name,
            type(runtime.runner).__name__,
            settings.model_rows,
            time.perf_counter() - started,
        )
        return runtime.service

    def _hung(self, limit_s: float) -> None:
        try:
            self._to(State.DEFUNCT)
        except LifecycleError:
            return  # already stopping: the shutdown path owns the process now
        log.critical("a generate call has run for over %.0fs: exiting", limit_s)
        _exit_now(EXIT_HUNG)

    def _device_failed(self, exc: BaseException) -> None:
        """Exit at once, acknowledging nothing: the broker hands this worker's tasks to a
        healthy one, and the supervisor starts a fresh process (a new CUDA context). The
        rows of the failed call count it as a crash, so one input that breaks the device
        every time fails with TooManyDeliveries like any other poison task."""
        with contextlib.suppress(LifecycleError):
            self._to(State.DEFUNCT)
        log.critical("the device failed (%s: %s): exiting", type(exc).__name__, exc)
        _exit_now(EXIT_DEVICE_FAILED)

    def mark_consuming(self) -> None:
        """Write the ready file once the consumer is connected and the model has answered."""
        if self._state is State.READY and self._runtime is not None and not self._draining:
            self._consuming = True
            ready_file = self._runtime.settings.ready_file
            if ready_file:
                Path(ready_file).write_text(f"{self._runtime.service.worker_name}\n")

    def begin_shutdown(self) -> None:
        """A warm shutdown has begun: stop reporting ready while in-flight captions finish."""
        self._draining = True
        self._remove_ready_file()

    def not_ready(self) -> str | None:
        """Why the worker should not be sent work now, or None when it is ready.

        Ready means: the model answered its warm-up caption, the consumer is connected, no
        shutdown has begun, and the process is healthy.
        """
        if self._draining:
            return "shutting down"
        if self._state is not State.READY:
            return str(self._state.value)
        if not self._consuming:
            return "model loaded, consumer not connected yet"
        return self.unhealthy()

    def unhealthy(self) -> str | None:
        """Why the process should be replaced, or None while it is healthy.

        Loading the model and shutting down are healthy; a dead model thread, a model call
        running past the task deadline (a stuck kernel or driver; the watchdog ends the
        process later, at the hang grace) and a failed start are not.
        """
        state, runtime, watchdog = self._state, self._runtime, self._watchdog
        if state is State.DEFUNCT:
            return "defunct: the start failed or a model call hung"
        if runtime is None or watchdog is None:
            return None
        if state is State.READY and not runtime.runner.is_alive():
            return "the model thread has died"
        # Rows stop at their deadline between decode steps; one step is covered by the grace.
        limit = runtime.settings.task_deadline_s + DEADLINE_GRACE_S
        if watchdog.hung_for(limit_s=limit) is not None:
            return f"a model call has run for over {limit:g}s, past every task deadline in it"
        return None

    def _remove_ready_file(self) -> None:
        if self._settings is not None and self._settings.ready_file:
            Path(self._settings.ready_file).unlink(missing_ok=True)

    def stop(self) -> None:
        """Let queued captions finish, then stop the model thread."""
        self._draining = True
        if self._state not in (State.READY, State.DEFUNCT):
            return
        self._to(State.STOPPING)
        self._remove_ready_file()
        if self._runtime is not None:
            settings = self._runtime.settings
            self._runtime.stop(timeout=settings.task_deadline_s)
        self._to(State.STOPPED)
        log.info("caption worker stopped")

    @property
    def service(self) -> CaptionService:
        """The ready service; a task that arrives in any other state fails cleanly."""
        if self._state is not State.READY or self._runtime is None:
            raise CaptionFailed(f"the worker is not ready (state {self._state.value})")
        return self._runtime.service


def _exit_now(code: int) -> None:
    """End the process at once, acknowledging nothing: flush the logs for at most 2 s (a
    stalled stderr must not keep a broken worker alive), then ``os._exit``."""
    flusher = threading.Thread(target=logging.shutdown, name="exit-log-flush", daemon=True)
    flusher.start()
    flusher.join(2.0)
    os._exit(code)
