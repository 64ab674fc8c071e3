"""A running shard's lease, renewed from a daemon thread while the shard runs.

The lease says "a live worker has this shard" (``worker.bulk.state``): it carries the
worker's id and a TTL of ``CAPTION_WORKER_DEAD_AFTER_S``, renewed every
``CAPTION_HEARTBEAT_INTERVAL_S``, the same timings the worker heartbeat uses, so a SIGKILLed
worker's shard is free for ``bulk resume`` at the moment its worker counts as dead. The
renewal has its own thread (not the shard's loop), because one slow batch must not let the
lease lapse. A lease that could not be renewed because another worker took it (this one was
stalled past the TTL) sets ``lost``: the shard stops at its next item instead of writing
output the other worker is also writing.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Protocol

log = logging.getLogger(__name__)


class LeaseLedger(Protocol):
    """The lease half of ``RunState``."""

    def acquire(self, run_id: str, shard: int, holder: str, ttl_s: float) -> str | None: ...

    def renew(self, run_id: str, shard: int, holder: str, ttl_s: float) -> bool: ...

    def release(self, run_id: str, shard: int, holder: str) -> None: ...


class ShardLease:
    """Hold one shard's lease: ``acquire`` first, then use as a context manager."""

    def __init__(
        self,
        ledger: LeaseLedger,
        run_id: str,
        shard: int,
        holder: str,
        *,
        ttl_s: float,
        renew_every_s: float,
    ) -> None:
        self._ledger = ledger
        self._run_id = run_id
        self._shard = shard
        self.holder = holder
        self._ttl_s = ttl_s
        self._every_s = renew_every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> str | None:
        """Take the lease; the id of the live worker holding it instead, if any."""
        return self._ledger.acquire(self._run_id, self._shard, self.holder, self._ttl_s)

    def __enter__(self) -> ShardLease:
        self._thread = threading.Thread(target=self._loop, name=f"lease-{self._shard}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._every_s + 5)
        try:
            self._ledger.release(self._run_id, self._shard, self.holder)
        except Exception as error:  # it expires on its own; resume waits for that
            log.warning("could not release the lease of shard %d: %s", self._shard, error)

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                held = self._ledger.renew(self._run_id, self._shard, self.holder, self._ttl_s)
            except Exception as error:  # Redis blinked: the next renewal may still be in time
                log.warning("lease of shard %d not renewed: %s", self._shard, error)
                continue
            if not held:
                log.error(
                    "lost the lease of bulk run %s shard %d (this worker stalled past its "
                    "TTL); stopping the shard",
                    self._run_id,
                    self._shard,
                )
                self.lost = True
                return
