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
checkpoint. A shard whose output exists and is counted does nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from worker.bulk.errors import SourceNotFound
from worker.bulk.identity import RunConfig
from worker.bulk.plan import WRITE_ALLOWLIST, check_bucket
from worker.bulk.runfiles import Line, RunFiles
from worker.bulk.state import ShardCounts, ShardFinish
from worker.bulk.status import finish_run
from worker.contract import CaptionRequest, GenerationOptions, parse_request
from worker.engine.base import CaptionOutput
from worker.errors import CaptionError, CaptionFailed
from worker.runtime.service import CaptionService
from worker.storage.s3 import S3Location

log = logging.getLogger(__name__)

#: Items between two checkpoints of a shard.
CHECKPOINT_EVERY = 100
#: Downloads (and image preparation) running ahead of the model per shard.
DOWNLOAD_WORKERS = 8


class Ledger(Protocol):
    """Where a run's counters and done shards are kept (``worker.bulk.state.RunState``)."""

    def is_done(self, run_id: str, shard: int) -> bool: ...

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
        limit = self.in_flight or max(2 * self.service.settings.max_batch, self.workers)
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
        attempt = 0
        while True:
            try:
                with service.runner.expect("bulk"):
                    data = service.store.fetch(location)
                    prepared, _ = service.prepare(request, data)
                    deadline = time.monotonic() + settings.task_deadline_s
                    return service.runner.submit(prepared, deadline, None, "bulk"), deadline
            except CaptionError as exc:
                if not exc.retryable or attempt >= settings.storage_retries:
                    raise
                delay = settings.storage_retry_backoff_s * 2**attempt
                attempt += 1
                log.warning("%s (%s); retry %d in %.1fs", type(exc).__name__, exc, attempt, delay)
                self.sleep(delay)

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


ShardStatus = Literal["done", "already-done", "paused"]


@dataclass(frozen=True)
class ShardReport:
    """What one execution of a shard did."""

    status: ShardStatus
    items: int  # lines in the shard's output (or checkpoint, when paused)
    captioned: int  # items captioned by this execution
    counts: ShardCounts
    next_shard: int | None = None
    run_finished: bool = False


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

    Raises a CaptionError when the run's own files cannot be read or written (the adapter
    retries a retryable one); items never raise.
    """
    run_id = files.layout.run_id
    if ledger.is_done(run_id, shard):
        log.info("bulk run %s shard %d is already done; nothing to do", run_id, shard)
        return ShardReport("already-done", 0, 0, ShardCounts())
    check_bucket(
        files.layout.bucket, service.settings.output_buckets, "bulk run output", WRITE_ALLOWLIST
    )
    run = files.run_json()
    if run is None:
        raise SourceNotFound(f"{files.uri}run.json does not exist; the run was never planned")
    plan = RunPlan.from_json(run)
    lines = files.output(shard)
    captioned = 0
    if lines is None:
        items = files.inputs(shard)
        if items is None:
            raise SourceNotFound(f"{files.uri}{files.layout.input(shard)} does not exist")
        done = resume_from(files.checkpoint(shard), items)
        if done:
            log.info("bulk run %s shard %d resumes after item %d", run_id, shard, len(done))

        def save(partial: list[Line]) -> None:
            files.write_checkpoint(shard, partial)
            ledger.checkpoint(run_id, shard, ShardCounts.of(partial).to_json())

        captioner = ShardCaptioner(service, plan, workers=workers)
        lines, complete = captioner.run(
            items, done, checkpoint=save, checkpoint_every=checkpoint_every, should_stop=should_stop
        )
        captioned = len(lines) - len(done)
        if not complete:
            save(lines)
            return ShardReport("paused", len(lines), captioned, ShardCounts.of(lines))
        files.write_output(shard, lines)
        files.delete_checkpoint(shard)
    counts = ShardCounts.of(lines)
    finish = ledger.finish_shard(run_id, shard, counts.to_json())
    if not finish.known:
        log.warning("bulk run %s is unknown to Redis; shard %d written, not counted", run_id, shard)
    if finish.next_shard is not None:
        enqueue(finish.next_shard, plan.queue)
    if finish.run_finished:
        finish_run(files, ledger, run)
    return ShardReport(
        "done", len(lines), captioned, counts, finish.next_shard, finish.run_finished
    )
