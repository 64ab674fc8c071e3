"""The hang watchdog: a model call that outlives every deadline in it ends the process.

Rows stop at their deadline between decode steps, so only a stuck step (a kernel or driver
that never returns) can run this long. No thread can interrupt it, but a new process can
take the tasks: the broker redelivers what this one never acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.engine.base import RowRunner

log = logging.getLogger(__name__)


class Watchdog:
    """Polls ``runner.busy_since`` and calls ``on_hung`` once a call runs past ``limit_s``."""

    def __init__(
        self,
        runner: RowRunner,
        limit_s: float,
        on_hung: Callable[[float], None],
        keep_watching: Callable[[], bool],
    ) -> None:
        self._runner = runner
        self._limit_s = limit_s
        self._on_hung = on_hung
        self._keep_watching = keep_watching
        self._thread = threading.Thread(target=self._loop, name="hang-watchdog", daemon=True)

    def start(self) -> None:
        """Start watching in a daemon thread."""
        self._thread.start()

    def hung_for(self, now: float | None = None, limit_s: float | None = None) -> float | None:
        """Seconds the current model call has run past the limit, or None.

        ``limit_s`` asks about another limit than the one that ends the process (the
        health check asks about the task deadline, well before the process ends).
        """
        since = self._runner.busy_since
        if since is None:
            return None
        limit = self._limit_s if limit_s is None else limit_s
        over = (time.monotonic() if now is None else now) - since - limit
        return over if over > 0 else None

    def _loop(self) -> None:
        while self._keep_watching():
            if self.hung_for() is not None:
                self._on_hung(self._limit_s)
                return
            time.sleep(min(5.0, self._limit_s / 10))
