"""The worker process's lifecycle: NEW -> STARTING -> READY -> STOPPING -> STOPPED.

The model loads once, in the main process, before Celery consumes a single message. A
failure while starting leaves the process DEFUNCT; the Celery adapter then exits non-zero,
so nothing was reserved or acknowledged and a supervisor can restart it.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from worker.batcher import Batcher, BatchLimits
from worker.engine import Engine
from worker.errors import CaptionFailed, ConfigError
from worker.service import CaptionService
from worker.settings import Settings
from worker.storage import ObjectStore

log = logging.getLogger(__name__)

EXIT_HUNG = 4


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DEFUNCT = "defunct"


_ALLOWED = {
    State.NEW: {State.STARTING},
    State.STARTING: {State.READY, State.DEFUNCT},
    State.READY: {State.STOPPING, State.DEFUNCT},
    State.STOPPING: {State.STOPPED},
    State.STOPPED: set(),
    State.DEFUNCT: {State.STOPPING},
}


def load_factory(path: str) -> Callable[[Settings], Engine]:
    """Import ``module:function`` (CAPTION_ENGINE_FACTORY)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"CAPTION_ENGINE_FACTORY={path!r} must look like 'module:function'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"CAPTION_ENGINE_FACTORY={path!r} cannot be imported: {exc}") from None
    return cast(Callable[[Settings], Engine], factory)


class Lifecycle:
    """Owns the process's one CaptionService and its state transitions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = State.NEW
        self._service: CaptionService | None = None

    def _to(self, new: State) -> None:
        with self._lock:
            assert new in _ALLOWED[self.state], f"{self.state} -> {new}"
            self.state = new

    def start(self, settings: Settings, worker_name: str) -> CaptionService:
        """Check settings, load the model, prove it answers, start batching."""
        self._to(State.STARTING)
        if settings.ready_file:
            # A restarted container keeps the file of the process that died before it.
            Path(settings.ready_file).unlink(missing_ok=True)
        try:
            settings.check_visibility_timeout()
            started = time.perf_counter()
            engine = load_factory(settings.engine_factory)(settings)
            warm = engine.warm_up()
            log.info("warm-up caption answered in %.2fs", warm.seconds)
            batcher = Batcher(
                engine,
                BatchLimits(
                    max_batch=settings.max_batch,
                    wait_s=settings.batch_wait_ms / 1000,
                    linger_s=settings.batch_linger_ms / 1000,
                    token_budget=settings.batch_token_budget,
                    pad_ratio=settings.batch_pad_ratio,
                ),
            )
            batcher.start()
            self._service = CaptionService(
                settings, engine, ObjectStore(settings), batcher, worker_name
            )
            threading.Thread(
                target=self._watchdog, args=(batcher, settings), name="hang-watchdog", daemon=True
            ).start()
        except BaseException:
            self._to(State.DEFUNCT)
            raise
        self._to(State.READY)
        log.info(
            "caption worker ready: %s, model %s, max batch %d, started in %.1fs",
            worker_name,
            engine.name,
            settings.max_batch,
            time.perf_counter() - started,
        )
        return self._service

    def mark_consuming(self) -> None:
        """Write the ready file once the consumer is connected and the model has answered."""
        if self.state is State.READY and self._service is not None:
            ready_file = self._service.settings.ready_file
            if ready_file:
                Path(ready_file).write_text(f"{self._service.worker_name}\n")

    def _watchdog(self, batcher: Batcher, settings: Settings) -> None:
        """Exit the process when one generate call outlives every deadline in it.

        Rows stop at their deadline between decode steps, so only a stuck step can run
        this long; no thread can interrupt it, but a new process can take the tasks.
        """
        limit = settings.task_deadline_s + settings.hang_grace_s
        while self.state in (State.STARTING, State.READY):
            since = batcher.busy_since
            if since is not None and time.monotonic() - since > limit:
                self.state = State.DEFUNCT
                log.critical("a generate call has run for over %.0fs: exiting", limit)
                logging.shutdown()
                os._exit(EXIT_HUNG)
            time.sleep(min(5.0, limit / 10))

    def stop(self) -> None:
        """Let queued captions finish, then stop the batcher."""
        if self.state not in (State.READY, State.DEFUNCT):
            return
        self._to(State.STOPPING)
        if self._service is not None:
            if self._service.settings.ready_file:
                Path(self._service.settings.ready_file).unlink(missing_ok=True)
            self._service.batcher.stop(timeout=self._service.settings.task_deadline_s)
        self._to(State.STOPPED)
        log.info("caption worker stopped")

    @property
    def service(self) -> CaptionService:
        """The ready service; a task that arrives in any other state fails cleanly."""
        if self.state is not State.READY or self._service is None:
            raise CaptionFailed(f"the worker is not ready (state {self.state.value})")
        return self._service


lifecycle = Lifecycle()
