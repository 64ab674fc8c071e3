"""Dynamic batching: one generate call for every compatible task that is waiting.

Task threads announce themselves with ``expect()`` when they start downloading, then
``submit()`` their prepared input and wait on a future. One batcher thread owns the model.
When the model is free it runs the waiting tasks at once unless more are on their way: a
task still preparing, or one that arrived within the last ``linger_s`` (a burst being
delivered by the broker). It never holds the oldest task longer than ``wait_s``, so a lone
task starts at once (after at most ``linger_s``) and a burst fills one batch instead of
being split by the broker's delivery pace.

Lanes: while an interactive row waits, the batch is formed for the interactive lane: the
wait counts only interactive rows on their way and interactive arrivals, and the batch is
headed and filled by interactive rows before bulk ones (``policy.select_batch``). A running
batch is never interrupted, so an interactive row waits at most for the batch in progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from worker.batching.model_thread import ModelThread
from worker.batching.policy import BatchLimits, lane_to_serve, select_batch, wait_before_batch
from worker.batching.rows import PendingRow, fail_row
from worker.engine.base import BatchEngine, Lane
from worker.errors import CaptionFailed, CaptionTimeout
from worker.ops.metrics import NO_METRICS, MetricsHook

log = logging.getLogger(__name__)


class Batcher(ModelThread):
    """Collects prepared inputs from task threads and runs them in shared generate calls."""

    thread_name = "caption-batcher"

    def __init__(
        self,
        model: BatchEngine,
        limits: BatchLimits,
        metrics: MetricsHook = NO_METRICS,
        on_device_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(metrics, on_device_failure)
        self._model = model
        self._limits = limits
        self._pending: list[PendingRow] = []
        # Per lane: rows being prepared (inside expect()) and the last arrival or announcement.
        self._preparing: dict[Lane, int] = {"interactive": 0, "bulk": 0}
        self._last_arrival: dict[Lane, float] = {"interactive": 0.0, "bulk": 0.0}
        # Lowered after an out-of-memory; the largest batch known to fit from then on.
        self.batch_cap = limits.max_batch

    @contextmanager
    def expect(self, lane: Lane = "interactive") -> Iterator[None]:
        """Mark a task as preparing an input, so a forming batch waits for it briefly."""
        with self._cond:
            self._preparing[lane] += 1
            self._last_arrival[lane] = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._preparing[lane] -= 1
                self._cond.notify_all()

    def _enqueue(self, row: PendingRow) -> None:
        self._pending.append(row)
        self._last_arrival[row.lane] = time.monotonic()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # keep the only model thread alive whatever happens
                self._check_device(exc)
                log.exception("batcher step failed")
                for entry in batch:
                    fail_row(entry, CaptionFailed(f"internal batching error: {exc!r}"))

    def _next_batch(self) -> list[PendingRow] | None:
        with self._cond:
            while not self._pending:
                if not self._running:
                    return None
                self._cond.wait()
            while self._running:
                pause = self._pause()
                if pause is None:
                    break
                self._cond.wait(pause)
            self._pending = self._live()
            batch = select_batch(self._pending, self.batch_cap, self._limits)
            chosen = {id(entry) for entry in batch}
            self._pending = [e for e in self._pending if id(e) not in chosen]
            # A running future can no longer be cancelled by its task thread.
            return [e for e in batch if e.future.set_running_or_notify_cancel()]

    def _pause(self) -> float | None:
        """How long to keep filling the batch (lock held), for the lane it is formed for.

        With an interactive row waiting, only interactive rows on their way hold the batch:
        an interactive row never waits for bulk rows. A bulk batch waits for rows of either
        lane (an interactive one would head it).
        """
        if lane_to_serve(self._pending) == "interactive":
            oldest = next(e.arrived for e in self._pending if e.lane == "interactive")
            last_arrival = self._last_arrival["interactive"]
            preparing = self._preparing["interactive"]
        else:
            oldest = self._pending[0].arrived
            last_arrival = max(self._last_arrival.values())
            preparing = sum(self._preparing.values())
        return wait_before_batch(
            now=time.monotonic(),
            oldest=oldest,
            last_arrival=last_arrival,
            preparing=preparing,
            waiting=len(self._pending),
            cap=self.batch_cap,
            limits=self._limits,
        )

    def _live(self) -> list[PendingRow]:
        """Waiting entries still worth running; expired ones fail, cancelled ones drop."""
        now = time.monotonic()
        live = []
        for entry in self._pending:
            if entry.future.cancelled():
                continue
            if entry.deadline <= now:
                fail_row(
                    entry, CaptionTimeout("the task deadline passed while it waited for the model")
                )
                continue
            live.append(entry)
        return live

    def _run(self, batch: list[PendingRow], top: bool = True) -> int:
        """Run a batch, splitting it on failure; return the most rows that ran in one call."""
        if not batch:
            return 0
        guards = [e.guard for e in batch if e.guard is not None]
        for guard in guards:
            guard.enter()
        self.busy_since = time.monotonic()
        self._metrics.rows_active(len(batch))
        started = time.perf_counter()
        try:
            try:
                outputs = self._model.generate([e.item for e in batch], [e.deadline for e in batch])
            except Exception as exc:
                self._check_device(exc)  # guards still entered: an exit counts as a crash
                raise
            finally:  # the call returned or raised: the process survived it
                for guard in guards:
                    guard.exit()
                # Every call counts, failed ones too: the model spent the time either way.
                self._metrics.rows_active(0)
                self._metrics.model_batch(len(batch))
                self._metrics.model_time(time.perf_counter() - started)
        except self._model.oom_errors as exc:
            self.busy_since = None
            return self._split_after_oom(batch, exc, top)
        except Exception as exc:
            self.busy_since = None
            if len(batch) == 1:
                log.exception("generate failed for one task")
                fail_row(batch[0], CaptionFailed(f"the model failed: {exc!r}"))
                return 0
            # Run each alone so one bad input cannot fail its neighbours.
            log.warning("generate failed for a batch of %d (%r); isolating", len(batch), exc)
            return max(self._run([entry], top=False) for entry in batch)
        self.busy_since = None
        for entry, output in zip(batch, outputs, strict=True):
            if output.finish_reason == "timeout":
                took = f"{output.seconds:.1f}s in the model"
                fail_row(entry, CaptionTimeout(f"captioning passed the task deadline ({took})"))
            elif not entry.future.done():
                entry.future.set_result(output)
        return len(batch)

    def _split_after_oom(self, batch: list[PendingRow], exc: BaseException, top: bool) -> int:
        self._model.release_memory()
        if len(batch) == 1:
            fail_row(batch[0], CaptionFailed(f"out of memory even as a batch of one: {exc}"))
            return 0
        half = len(batch) // 2
        fit = max(self._run(batch[:half], top=False), self._run(batch[half:], top=False))
        if top:
            # Remember what really fitted, not a guess: one input too large even alone
            # must not pin every later batch to size 1.
            self.batch_cap = min(self.batch_cap, max(fit, 1))
            log.warning("out of memory at batch %d; batch cap now %d", len(batch), self.batch_cap)
        return fit
