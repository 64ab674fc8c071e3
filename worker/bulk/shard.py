"""Execute one shard of a bulk run: caption its items in order into one output file.

The domain side of the ``caption_bulk_shard`` task (``worker.queue.bulk_task`` is the Celery
adapter). Items go through the same ``CaptionService`` pieces as single captions (validate,
fetch, prepare, the runner), in the ``bulk`` lane, so interactive captions on the same
worker go first. Downloads and preparation run in a small thread pool ahead of the model, so
the runner always has the next rows; results are collected in input order, one output line
per item. An item's failure (a missing or corrupt image, a timeout) is that item's ``error``
line, never the shard's failure; only the run's own files failing stops a shard.

Progress is checkpointed to ``shards/N.checkpoint.jsonl`` every ``checkpoint_every`` items;
a shard started again (a dead worker's redelivery, a paused shard) resumes after its
checkpoint. A shard whose output exists and is counted does nothing. A shard runs under a
lease (``worker.bulk.lease``), so two deliveries of it never caption it at once; a cancelled
run's shards stop at their next item. Sidecars (``worker.bulk.sidecars``) are written before
the checkpoint or output that records their lines.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from worker.bulk.errors import SourceNotFound
from worker.bulk.identity import RunConfig
from worker.bulk.lease import LeaseLedger, ShardLease
from worker.bulk.plan import WRITE_ALLOWLIST, check_bucket
from worker.bulk.retries import with_retries
from worker.bulk.runfiles import Line, RunFiles
from worker.bulk.sidecars import SidecarTarget, SidecarWriter
from worker.bulk.state import CANCELLED, DONE, PLANNING, ShardCounts, ShardFinish
from worker.bulk.status import finish_run
from worker.contract import CaptionRequest, GenerationOptions, parse_request
from worker.engine.base import CaptionOutput
from worker.errors import CaptionError, CaptionFailed
from worker.runtime.service import CaptionService
from worker.settings import Settings
from worker.storage.s3 import S3Location

log = logging.getLogger(__name__)

#: Items between two checkpoints of a shard.
CHECKPOINT_EVERY = 100
#: Downloads (and image preparation) running ahead of the model per shard.
DOWNLOAD_WORKERS = 8


class Ledger(LeaseLedger, Protocol):
    """Where a run's counters, done shards and leases are kept
    (``worker.bulk.state.RunState``)."""

    def is_done(self, run_id: str, shard: int) -> bool: ...

    def state(self, run_id: str) -> str | None: ...

    def retrying(self, run_id: str, shard: int) -> bool: ...

    def checkpoint(self, run_id: str, shard: int, counts: dict[str, int]) -> None: ...

    def finish_shard(self, run_id: str, shard: int, counts: dict[str, int]) -> ShardFinish: ...

    def mark_done(self, run_id: str, finished_at: float) -> None: ...

    def snapshot(self, run_id: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class RunPlan:
    """What a worker needs from run.json to caption a run's items."""

    config: RunConfig
    config_hash: str
    queue: str
    shards: int

    @classmethod
    def from_json(cls, run: dict[str, Any]) -> RunPlan:
        config = RunConfig(
            model=run["model"],
            revision=run.get("revision"),
            prompt=run["prompt"],
            max_new_tokens=int(run["max_new_tokens"]),
            options=GenerationOptions(**run["generation"]),
            max_pixels=int(run["max_pixels"]),
        )
        return cls(config, str(run["config_hash"]), str(run["queue"]), int(run["counts"]["shards"]))

    def item_config(self, item: Line) -> str:
        """The config hash an item's output line records (what later runs match on)."""
        prompt, tokens = item.get("prompt"), item.get("max_new_tokens")
        if prompt is None and tokens is None:
            return self.config_hash
        return self.config.item_config(prompt, tokens)

    def arguments(self, item: Line) -> dict[str, Any]:
        """The item as ``caption`` task arguments (validated by ``parse_request``)."""
        options = {k: v for k, v in vars(self.config.options).items() if v is not None}
        if not options.get("do_sample"):
            options.pop("do_sample", None)
        prompt = item.get("prompt")
        tokens = item.get("max_new_tokens")
        return {
            "image": item["image"],
            "prompt": self.config.prompt if prompt is None else prompt,
            "max_new_tokens": self.config.max_new_tokens if tokens is None else tokens,
            "model": self.config.model,
            "max_pixels": self.config.max_pixels,
            **options,
        }


def _line(item: Line, plan: RunPlan, status: str) -> Line:
    return {
        "id": item["id"],
        "image": item["image"],
        "etag": item.get("etag"),
        "status": status,
        "text": None,
        "finish_reason": None,
        "prompt_tokens": None,
        "generated_tokens": None,
        "model": plan.config.model,
        "config": plan.item_config(item),
        "error": None,
    }


def ok_line(item: Line, plan: RunPlan, output: CaptionOutput) -> Line:
    """The output line of a captioned item."""
    line = _line(item, plan, "ok")
    line.update(
        text=output.text,
        finish_reason=output.finish_reason,
        prompt_tokens=output.prompt_tokens,
        generated_tokens=output.generated_tokens,
    )
    return line


def error_line(item: Line, plan: RunPlan, exc: BaseException) -> Line:
    """The output line of an item that failed: the contract's error name and message."""
    if not isinstance(exc, CaptionError):
        exc = CaptionFailed(f"{type(exc).__name__}: {exc}")
    line = _line(item, plan, "error")
    line["error"] = {"type": type(exc).__name__, "message": str(exc)}
    return line


def resume_from(checkpoint: list[Line] | None, items: list[Line]) -> list[Line]:
    """The checkpoint's lines when they are a prefix of the shard's items, else none."""
    if not checkpoint or len(checkpoint) > len(items):
        return []
    if any(line.get("id") != item["id"] for line, item in zip(checkpoint, items, strict=False)):
        return []
    return list(checkpoint)


_Row = tuple["Future[CaptionOutput]", float]


@dataclass
class ShardCaptioner:
    """Captions a shard's items through a ``CaptionService`` in the bulk lane, in order."""

    service: CaptionService
    plan: RunPlan
    workers: int = DOWNLOAD_WORKERS
    sleep: Callable[[float], None] = time.sleep
    #: Rows started and not yet collected; default twice the batch, at least ``workers``.
    in_flight: int | None = None

    def run(
        self,
        items: list[Line],
        done: list[Line],
        *,
        checkpoint: Callable[[list[Line]], None] | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> tuple[list[Line], bool]:
        """Caption ``items`` after the ``done`` lines; return every line and whether the
        shard is complete (False: ``should_stop`` said so and the rest was left)."""
        lines = list(done)
        limit = self.in_flight or max(2 * self.service.settings.model_rows, self.workers)
        pending: deque[tuple[Line, Future[_Row]]] = deque()
        since = 0
        stopped = False

        def collect() -> None:
            nonlocal since
            item, started = pending.popleft()
            lines.append(self._finish(item, started))
            since += 1
            if checkpoint is not None and since >= checkpoint_every and len(lines) < len(items):
                checkpoint(list(lines))
                since = 0

        with ThreadPoolExecutor(self.workers, thread_name_prefix="bulk-fetch") as pool:
            try:
                for item in items[len(done) :]:
                    if should_stop():
                        stopped = True
                        break
                    pending.append((item, pool.submit(self._start, item)))
                    while len(pending) >= limit:
                        collect()
                while pending:
                    collect()
            finally:
                for _, started in pending:
                    started.cancel()
        return lines, not stopped

    def _request(self, item: Line) -> tuple[CaptionRequest, S3Location]:
        request = parse_request(self.plan.arguments(item), self.service.settings)
        location = self.service.validate(request)
        assert location is not None  # not a local caption
        return request, location

    def _start(self, item: Line) -> _Row:
        """Validate, fetch (retrying a failing store), prepare and submit one item."""
        service = self.service
        settings = service.settings
        request, location = self._request(item)

        def submit() -> _Row:
            with service.runner.expect("bulk"):
                data = service.store.fetch(location)
                prepared, _ = service.prepare(request, data)
                deadline = time.monotonic() + settings.task_deadline_s
                return service.runner.submit(prepared, deadline, None, "bulk"), deadline

        return with_retries(
            submit,
            retries=settings.storage_retries,
            backoff_s=settings.storage_retry_backoff_s,
            sleep=self.sleep,
        )

    def _finish(self, item: Line, started: Future[_Row]) -> Line:
        try:
            future, deadline = started.result()
            output = self.service.wait_for(future, deadline)
        except Exception as exc:
            return error_line(item, self.plan, exc)
        self.service.metrics.caption_delivered(
            "bulk", output.prompt_tokens, output.generated_tokens
        )
        return ok_line(item, self.plan, output)


ShardStatus = Literal["done", "already-done", "paused", "cancelled", "busy", "lost"]

#: Seconds between two looks at the run's state (is it cancelled?) while a shard runs.
STATE_POLL_S = 2.0


@dataclass(frozen=True)
class ShardReport:
    """What one execution of a shard did."""

    status: ShardStatus
    items: int  # lines in the shard's output (or checkpoint, when paused or cancelled)
    captioned: int  # items captioned by this execution
    counts: ShardCounts
    next_shard: int | None = None
    run_finished: bool = False
    holder: str | None = None  # "busy": the live worker that holds the shard's lease


@dataclass(frozen=True)
class LeaseTimes:
    """A shard lease's TTL and renewal interval (the worker heartbeat's timings)."""

    ttl_s: float
    renew_every_s: float

    @classmethod
    def of(cls, settings: Settings) -> LeaseTimes:
        return cls(settings.worker_dead_after_s, settings.heartbeat_interval_s)


def execute_shard(
    service: CaptionService,
    files: RunFiles,
    ledger: Ledger,
    shard: int,
    *,
    enqueue: Callable[[int, str], None],
    checkpoint_every: int = CHECKPOINT_EVERY,
    workers: int = DOWNLOAD_WORKERS,
    should_stop: Callable[[], bool] = lambda: False,
) -> ShardReport:
    """Run shard ``shard`` of the run in ``files`` to its output file, count it, and send
    the next shard of the window (``enqueue(shard, queue)``); the run's last shard writes
    manifest.json.

    The shard runs under a lease held for this execution (``service.worker_name`` and a
    random suffix): a shard another execution holds is left to it (status ``busy``); one
    whose lease was taken from it stops without saving (``lost``). A cancelled run's shard
    stops (status ``cancelled``, after a checkpoint when it had started). A shard that
    ``bulk resume --retry-failed`` reopened (it is in the run's retry set) captions the
    ``error`` items of its existing output again and rewrites the output.

    Raises a CaptionError when the run's own files cannot be read or written (the adapter
    retries a retryable one); items never raise.
    """
    run_id = files.layout.run_id
    if ledger.is_done(run_id, shard):
        log.info("bulk run %s shard %d is already done; nothing to do", run_id, shard)
        _end_if_complete(files, ledger)
        return ShardReport("already-done", 0, 0, ShardCounts())
    if ledger.state(run_id) == CANCELLED:
        log.info("bulk run %s is cancelled; shard %d dropped", run_id, shard)
        return ShardReport("cancelled", 0, 0, ShardCounts())
    check_bucket(
        files.layout.bucket, service.settings.output_buckets, "bulk run output", WRITE_ALLOWLIST
    )
    times = LeaseTimes.of(service.settings)
    # Each execution holds the lease under its own id: two deliveries of one shard in two
    # task threads of the same worker must not both run it.
    holder = f"{service.worker_name}/{uuid.uuid4().hex[:8]}"
    lease = ShardLease(
        ledger, run_id, shard, holder, ttl_s=times.ttl_s, renew_every_s=times.renew_every_s
    )
    other = lease.acquire()
    if other is not None:
        log.info("bulk run %s shard %d is held by %s", run_id, shard, other or "another worker")
        return ShardReport("busy", 0, 0, ShardCounts(), holder=other)
    with lease:
        if ledger.is_done(run_id, shard):  # finished between the first look and the lease
            return ShardReport("already-done", 0, 0, ShardCounts())
        cancelled = _CancelWatch(ledger, run_id)
        job = _ShardJob(service, files, ledger, shard, workers)

        def stop() -> bool:
            return should_stop() or lease.lost or cancelled()

        retry = ledger.retrying(run_id, shard)
        lines, captioned, complete = job.run(retry, checkpoint_every, stop, lambda: lease.lost)
        if not complete:
            status: ShardStatus = "paused"
            if lease.lost:
                status = "lost"
            elif cancelled.seen:
                status = "cancelled"
            return ShardReport(status, len(lines), captioned, ShardCounts.of(lines))
        counts = ShardCounts.of(lines)
        finish = ledger.finish_shard(run_id, shard, counts.to_json())
    if not finish.known:
        log.warning("bulk run %s is unknown to Redis; shard %d written, not counted", run_id, shard)
    if finish.next_shard is not None:
        enqueue(finish.next_shard, job.plan.queue)
    if finish.run_finished:
        finish_run(files, ledger, job.run_json)
    return ShardReport(
        "done", len(lines), captioned, counts, finish.next_shard, finish.run_finished
    )


def _end_if_complete(files: RunFiles, ledger: Ledger) -> None:
    """Write the manifest of a run whose shards are all counted but which is not marked done
    (the worker that counted the last shard failed to write it, and this is its retry)."""
    record = ledger.snapshot(files.layout.run_id)
    if record is None or record.get("state") in (DONE, PLANNING):
        return
    if int(record.get("shards_done", 0)) >= int(record.get("shards", 0)) > 0:
        finish_run(files, ledger)


class _CancelWatch:
    """Whether the run was cancelled, read from Redis at most every STATE_POLL_S."""

    def __init__(self, ledger: Ledger, run_id: str, clock: Callable[[], float] = time.monotonic):
        self._ledger = ledger
        self._run_id = run_id
        self._clock = clock
        self._next = clock() + STATE_POLL_S
        self.seen = False

    def __call__(self) -> bool:
        if not self.seen and self._clock() >= self._next:
            self._next = self._clock() + STATE_POLL_S
            try:
                self.seen = self._ledger.state(self._run_id) == CANCELLED
            except Exception as exc:  # Redis blinked: look again next time
                log.warning("could not read the state of bulk run %s: %s", self._run_id, exc)
        return self.seen


class _ShardJob:
    """One shard's items through the captioner into its output (or a checkpoint)."""

    def __init__(
        self,
        service: CaptionService,
        files: RunFiles,
        ledger: Ledger,
        shard: int,
        workers: int,
    ) -> None:
        self.files = files
        self.ledger = ledger
        self.shard = shard
        run = files.run_json()
        if run is None:
            raise SourceNotFound(f"{files.uri}run.json does not exist; the run was never planned")
        self.run_json = run
        self.plan = RunPlan.from_json(run)
        self.captioner = ShardCaptioner(service, self.plan, workers=workers)
        target = SidecarTarget.of_run(run)
        settings = service.settings
        self.sidecars = (
            None
            if target is None
            else SidecarWriter(
                files.client,
                target,
                allowed=settings.output_buckets,
                retries=settings.storage_retries,
                backoff_s=settings.storage_retry_backoff_s,
            )
        )

    def run(
        self,
        retry_failed: bool,
        checkpoint_every: int,
        stop: Callable[[], bool],
        lost: Callable[[], bool],
    ) -> tuple[list[Line], int, bool]:
        """The shard's lines, how many were captioned now, and whether it is complete
        (its output written). A shard whose lease was ``lost`` saves nothing: another
        worker now runs it."""
        existing = self.files.output(self.shard)
        if existing is not None and not retry_failed:
            return existing, 0, True  # written before its count landed: only count it
        items = self.files.inputs(self.shard)
        if items is None:
            where = f"{self.files.uri}{self.files.layout.input(self.shard)}"
            raise SourceNotFound(f"{where} does not exist")
        if existing is not None:
            return self._retry(existing, items, stop)
        done = resume_from(self.files.checkpoint(self.shard), items)
        if done:
            log.info(
                "bulk run %s shard %d resumes after item %d",
                self.files.layout.run_id, self.shard, len(done),
            )  # fmt: skip
        # Lines whose sidecars are written (a failed sidecar has turned its line into an
        # error line here); checkpoints and the output are built from this prefix.
        saved = list(done)

        def save(partial: list[Line]) -> None:
            if lost():
                return
            saved.extend(self._sidecars(partial[len(saved) :]))
            self.files.write_checkpoint(self.shard, saved)
            self.ledger.checkpoint(
                self.files.layout.run_id, self.shard, ShardCounts.of(saved).to_json()
            )

        lines, complete = self.captioner.run(
            items, done, checkpoint=save, checkpoint_every=checkpoint_every, should_stop=stop
        )
        captioned = len(lines) - len(done)
        if not complete:
            save(lines)
            return saved, captioned, False
        saved.extend(self._sidecars(lines[len(saved) :]))
        self.files.write_output(self.shard, saved)
        self.files.delete_checkpoint(self.shard)
        return saved, captioned, True

    def _retry(
        self, existing: list[Line], items: list[Line], stop: Callable[[], bool]
    ) -> tuple[list[Line], int, bool]:
        """Caption the ``error`` items of a finished shard again, in place; a stopped retry
        leaves the output as it was (the next execution retries again)."""
        failed = {line["id"] for line in existing if line.get("status") == "error"}
        again = [item for item in items if item["id"] in failed]
        kept = [line for line in existing if line.get("status") != "error"]
        run_id = self.files.layout.run_id
        self.ledger.checkpoint(run_id, self.shard, ShardCounts.of(kept).to_json())
        fresh, complete = self.captioner.run(again, [], should_stop=stop)
        if not complete:
            return existing, 0, False
        by_id = {line["id"]: line for line in self._sidecars(fresh)}
        lines = [by_id.get(line["id"], line) for line in existing]
        self.files.write_output(self.shard, lines)
        log.info(
            "bulk run %s shard %d: %d failed items captioned again, %d now ok",
            run_id, self.shard, len(again),
            sum(1 for line in by_id.values() if line.get("status") == "ok"),
        )  # fmt: skip
        return lines, len(again), True

    def _sidecars(self, lines: list[Line]) -> list[Line]:
        return lines if self.sidecars is None else self.sidecars.write(lines)
