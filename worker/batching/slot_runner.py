"""The model thread for the slot engine: rows join between decode steps and leave when done.

Task threads ``submit`` prepared rows as they do to the batcher. Between any two decode
steps the thread admits waiting rows into free slots, decodes one step for every live row,
resolves the rows that finished, and ends rows whose deadline passed. Nothing waits for a
batch to fill: a row that arrives mid-decode starts at the next step.

Crash accounting works as with the batcher: a row's guard is entered when it is admitted
and left when it finishes, and a suspect row (an earlier model call with it never
returned) runs with no other row beside it.

Lanes: free slots go to waiting interactive rows first, then to bulk rows, and interactive
rows are prefilled first. Running rows are never preempted: when every slot holds a bulk
row, a waiting interactive row takes the next slot that frees. A bulk row too long for a
slot (it would run alone, holding every slot) waits while any interactive row waits or runs.

Metrics: each decode step reports its live rows (``model_batch``), and each finished row its
time in the engine from prefill to last token (``model_time``), which is the part of a
caption's latency the model owns; a step's own time belongs to no one caption.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from worker.batching.model_thread import ModelThread
from worker.batching.policy import lanes_first
from worker.batching.rows import PendingRow, fail_row
from worker.engine.base import CaptionOutput, Lane
from worker.engine.slot_engine import SlotEngine
from worker.errors import CaptionFailed, CaptionTimeout
from worker.ops.metrics import NO_METRICS, MetricsHook

log = logging.getLogger(__name__)

# Rows prefilled together differ in prompt length by at most this factor (left padding).
PREFILL_PAD_RATIO = 2.0


class SlotRunner(ModelThread):
    """Feeds a ``SlotEngine`` from task threads (a ``RowRunner``)."""

    thread_name = "caption-slots"

    def __init__(
        self,
        engine: SlotEngine,
        metrics: MetricsHook = NO_METRICS,
        on_device_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(metrics, on_device_failure)
        self._engine = engine
        self._pending: deque[PendingRow] = deque()
        self._live: dict[int, PendingRow] = {}
        # Lowered after an out-of-memory: the most rows known to fit together, and the most
        # rows prefilled in one batch.
        self.row_cap = engine.slots
        self.prefill_cap = engine.slots

    @contextmanager
    def expect(self, lane: Lane = "interactive") -> Iterator[None]:
        """Rows join at any step, so nothing waits for rows still on their way."""
        yield

    def _enqueue(self, row: PendingRow) -> None:
        self._pending.append(row)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._pending and not self._live:
                    self._cond.wait()
                if not self._pending and not self._live:
                    return
                admitted = self._take()
            try:
                self._admit(admitted)
                self._step()
                self._expire()
            except Exception as exc:  # keep the only model thread alive whatever happens
                self._check_device(exc)
                log.exception("slot step failed")
                self._fail_live(CaptionFailed(f"internal slot engine error: {exc!r}"))
            self._metrics.rows_active(len(self._live))

    def _take(self) -> list[PendingRow]:
        """Waiting rows to admit now: interactive rows, then bulk rows, each oldest first
        (lock held)."""
        now = time.monotonic()
        if any(e.suspect for e in self._live.values()):
            return []  # a suspect row runs with nothing beside it
        room = min(len(self._engine.free_slots()), self.row_cap - len(self._live), self.prefill_cap)
        taken: list[PendingRow] = []
        slotted = 0  # taken rows that will occupy a slot (the rest run alone)
        gone: set[int] = set()  # ids of rows leaving the queue: taken, cancelled, expired
        # A row that runs alone holds every slot for its whole caption: no bulk row does so
        # while an interactive row waits or runs.
        interactive = any(e.lane == "interactive" for e in self._live.values())
        for entry in lanes_first(self._pending):
            if entry.future.cancelled():
                gone.add(id(entry))
                continue
            if entry.deadline <= now:
                fail_row(entry, CaptionTimeout("the task deadline passed while it waited"))
                gone.add(id(entry))
                continue
            interactive = interactive or entry.lane == "interactive"
            if entry.suspect and (taken or self._live):
                # It runs alone once the rows before it have left; nothing of its lane
                # overtakes it, or steady traffic would keep it waiting forever.
                break
            fits = self._engine.fits(entry.item)
            if fits and slotted >= room:
                continue
            if not fits and entry.lane == "bulk" and interactive:
                continue
            gone.add(id(entry))
            # A row put back after an out-of-memory is already running.
            if entry.future.running() or entry.future.set_running_or_notify_cancel():
                taken.append(entry)
                slotted += fits
                if entry.suspect:
                    break
        self._pending = deque(e for e in self._pending if id(e) not in gone)
        return taken

    def _admit(self, entries: list[PendingRow]) -> None:
        """Prefill the rows that fit a slot, in groups of similar length; run the rest alone."""
        fitting: list[PendingRow] = []
        for entry in entries:
            if self._engine.fits(entry.item):
                fitting.append(entry)
            else:
                log.info("a row of %d tokens runs alone", entry.item.prompt_tokens)
                self._run_alone(entry)
        # Interactive rows first, so they are in the first prefill; then by prompt length.
        fitting.sort(key=lambda e: (e.lane != "interactive", e.prompt_tokens))
        group: list[PendingRow] = []
        shortest = longest = 0
        for entry in fitting:
            # Bound the padding a left-padded prefill batch wastes, as the batcher does.
            lo = min(shortest, entry.prompt_tokens) if group else entry.prompt_tokens
            hi = max(longest, entry.prompt_tokens)
            if group and hi > PREFILL_PAD_RATIO * lo:
                self._prefill(group)
                group = []
                lo = hi = entry.prompt_tokens
            group.append(entry)
            shortest, longest = lo, hi
        if group:
            self._prefill(group)

    def _run_alone(self, entry: PendingRow) -> None:
        self._metrics.rows_active(len(self._live) + 1)
        self._enter([entry])
        try:
            output = self._engine.run_alone(entry.item, entry.deadline)
        except self._engine.oom_errors as exc:
            self._leave([entry])
            self._engine.release_memory()
            fail_row(entry, CaptionFailed(f"out of memory even as the only row: {exc}"))
            return
        except Exception as exc:
            self._check_device(exc)
            self._leave([entry])
            log.exception("generate failed for a row run alone")
            fail_row(entry, CaptionFailed(f"the model failed: {exc!r}"))
            return
        finally:
            self.busy_since = None
        self._finish(entry, output)

    def _prefill(self, entries: list[PendingRow]) -> None:
        slots = self._engine.free_slots()[: len(entries)]
        self._enter(entries)
        try:
            outputs = self._engine.admit_many(
                [(slot, e.item) for slot, e in zip(slots, entries, strict=True)]
            )
        except self._engine.oom_errors as exc:
            self._leave(entries)
            self._engine.release_memory()
            self._after_oom(entries, exc)
            return
        except Exception as exc:
            self._check_device(exc)
            self._leave(entries)
            if len(entries) > 1:  # run each alone so one bad input cannot fail the others
                log.warning("prefill failed for %d rows (%r); isolating", len(entries), exc)
                for entry in entries:
                    self._prefill([entry])
                return
            log.exception("prefill failed for one row")
            fail_row(entries[0], CaptionFailed(f"the model failed: {exc!r}"))
            return
        finally:
            self.busy_since = None
        for slot, entry, output in zip(slots, entries, outputs, strict=True):
            if output is None:
                self._live[slot] = entry
            else:
                self._finish(entry, output)

    def _after_oom(self, entries: list[PendingRow], exc: BaseException) -> None:
        """Retry later with less in memory; fail a row only if it does not fit alone."""
        if len(entries) == 1 and not self._live:
            fail_row(entries[0], CaptionFailed(f"out of memory even as the only row: {exc}"))
            return
        if len(entries) > 1:
            self.prefill_cap = max(1, len(entries) // 2)
        else:
            self.row_cap = max(1, len(self._live))
        log.warning(
            "out of memory admitting %d rows; at most %d rows, %d per prefill now",
            len(entries),
            self.row_cap,
            self.prefill_cap,
        )
        with self._cond:
            self._pending.extendleft(reversed(entries))

    def _step(self) -> None:
        if not self._live:
            return
        self._metrics.model_batch(len(self._live))
        self.busy_since = time.monotonic()
        try:
            finished = self._engine.step()
        finally:
            self.busy_since = None
        for slot, output in finished:
            self._finish(self._live.pop(slot), output)

    def _expire(self) -> None:
        now = time.monotonic()
        for slot, entry in list(self._live.items()):
            if entry.deadline <= now or entry.future.cancelled():
                self._finish(self._live.pop(slot), self._engine.stop_row(slot, "timeout"))

    def _finish(self, entry: PendingRow, output: CaptionOutput) -> None:
        self._leave([entry])
        # A row's whole time in the engine, prefill to last token: the slot engine has no
        # per-call time that belongs to any one caption.
        self._metrics.model_time(output.seconds)
        if output.finish_reason == "timeout":
            took = f"{output.seconds:.1f}s in the model"
            fail_row(entry, CaptionTimeout(f"captioning passed the task deadline ({took})"))
        elif not entry.future.done():
            entry.future.set_result(output)

    def _enter(self, entries: list[PendingRow]) -> None:
        for entry in entries:
            if entry.guard is not None:
                entry.guard.enter()
        self.busy_since = time.monotonic()

    def _leave(self, entries: list[PendingRow]) -> None:
        for entry in entries:
            if entry.guard is not None:
                entry.guard.exit()

    def _fail_live(self, exc: BaseException) -> None:
        for slot, entry in list(self._live.items()):
            self._engine.stop_row(slot, "timeout")
            self._leave([entry])
            fail_row(self._live.pop(slot), exc)
