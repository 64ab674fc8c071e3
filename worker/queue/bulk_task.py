"""The ``caption_bulk_shard`` Celery task: a thin adapter around ``worker.bulk.shard``.

It adds what only the queue knows: the service and Redis connection travel with the worker's
app, the next shard of the window is sent through Celery, a retryable failure of the run's
own files is retried with backoff, and a shard that must stop early (the worker is shutting
down, or the shard has run so long that the broker would hand it to another worker) is sent
again as a continuation that resumes after its checkpoint. The task stores no result
(``ignore_result``): a run's state lives in its own Redis hash and in S3.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from typing import Any

from celery import Celery, Task, shared_task
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from worker.bulk.runfiles import RunFiles, layout_of
from worker.bulk.shard import DOWNLOAD_WORKERS, execute_shard
from worker.bulk.state import RUNNING, RunState
from worker.contract import SHARD_TASK_NAME
from worker.errors import CaptionError, CaptionFailed, InvalidRequest
from worker.queue.tasks import lifecycle_of
from worker.settings import DEADLINE_GRACE_S, Settings
from worker.storage.s3 import s3_client

log = logging.getLogger(__name__)


def send_shard(
    app: Celery,
    queue: str,
    run_id: str,
    shard: int,
    run_uri: str,
    *,
    countdown: float | None = None,
) -> None:
    """Queue one shard message (no result is kept, so nothing subscribes to one)."""
    kwargs = {"run_id": run_id, "shard": shard, "run_uri": run_uri}
    app.send_task(
        SHARD_TASK_NAME, kwargs=kwargs, queue=queue, ignore_result=True, countdown=countdown
    )


def shard_budget_s(settings: Settings) -> float:
    """How long a shard may keep starting items: past this, with its last items' deadline,
    grace and margin, the broker would hand the unacknowledged message to another worker
    (Redis' visibility timeout, RabbitMQ's consumer timeout)."""
    limit = (
        settings.visibility_timeout_s
        if settings.broker_is_redis
        else settings.amqp_consumer_timeout_s
    )
    reserve = settings.task_deadline_s + DEADLINE_GRACE_S + settings.visibility_margin_s
    return max(limit - reserve, 1.0)


_client_lock = threading.Lock()


def _run_files_client(settings: Settings) -> Any:
    # One client per process for run files, shared by every shard's threads. Building one
    # loads botocore's S3 model (~0.5 s on a busy CPU): the lock has the first shards of a
    # window wait for one build instead of each doing its own.
    with _client_lock:
        return _build_run_files_client(settings)


@functools.cache
def _build_run_files_client(settings: Settings) -> Any:
    return s3_client(settings, max_pool_connections=DOWNLOAD_WORKERS + 4)


def _redis(task: Task) -> Any:
    client = getattr(task.backend, "client", None)
    if client is None:
        raise CaptionFailed("bulk runs need a Redis result backend (CAPTION_RESULT_BACKEND)")
    return client


# max_retries=None: no Celery cap; the task bounds its own retries by CAPTION_STORAGE_RETRIES.
@shared_task(  # type: ignore[untyped-decorator]
    name=SHARD_TASK_NAME, bind=True, ignore_result=True, track_started=False, acks_late=True,
    max_retries=None,
)  # fmt: skip
def caption_bulk_shard(self: Task, *args: Any, run_id: str, shard: int, run_uri: str) -> None:
    """Caption shard ``shard`` of the bulk run in ``run_uri`` (docs/bulk.md)."""
    lifecycle = lifecycle_of(self.app)
    service = lifecycle.service
    settings = service.settings
    if args:
        raise InvalidRequest("the caption_bulk_shard task takes keyword arguments only")
    layout = layout_of(run_uri)
    if layout.run_id != run_id:
        raise InvalidRequest(f"run_uri {run_uri!r} is not the directory of run {run_id!r}")
    files = RunFiles(_run_files_client(settings), layout)
    ledger = RunState(_redis(self))
    stop_at = time.monotonic() + shard_budget_s(settings)

    def should_stop() -> bool:
        return lifecycle.not_ready() is not None or time.monotonic() > stop_at

    def enqueue(next_shard: int, queue: str) -> None:
        send_shard(self.app, queue, run_id, next_shard, run_uri)

    def again(countdown: float | None = None) -> None:
        queue = (self.request.delivery_info or {}).get("routing_key") or settings.bulk_queue
        send_shard(self.app, queue, run_id, shard, run_uri, countdown=countdown)

    started = time.monotonic()
    try:
        report = execute_shard(
            service, files, ledger, shard,
            enqueue=enqueue, should_stop=should_stop,
        )  # fmt: skip
    except (CaptionError, RedisError, OperationalError) as exc:
        # The run's own files failing, or Redis or the broker blinking: retry with backoff
        # (the shard resumes after its checkpoint); a permanent failure is recorded.
        retryable = not isinstance(exc, CaptionError) or exc.retryable
        retries = self.request.retries or 0
        if retryable and retries < settings.storage_retries:
            countdown = settings.storage_retry_backoff_s * 2**retries
            log.warning(
                "bulk run %s shard %d: %s (%s); retry %d in %.1fs",
                run_id, shard, type(exc).__name__, exc, retries + 1, countdown,
            )  # fmt: skip
            raise self.retry(exc=exc, countdown=countdown) from None
        with contextlib.suppress(RedisError):
            ledger.record_error(run_id, shard, f"{type(exc).__name__}: {exc}")
        raise
    seconds = time.monotonic() - started
    if report.status == "busy":
        # Another execution runs this shard (a duplicate from `bulk resume`, or this is a
        # dead worker's redelivery that came before its lease lapsed): a fresh message
        # looks again once the lease could have lapsed; by then the shard is done, or free.
        countdown = settings.worker_dead_after_s + 1
        log.info(
            "bulk run %s shard %d is held by %s; looking again in %.0fs",
            run_id, shard, report.holder, countdown,
        )  # fmt: skip
        again(countdown)
        return
    if report.status == "lost":
        log.warning("bulk run %s shard %d continues elsewhere; this execution stops", run_id, shard)
        return
    if report.status == "cancelled":
        if ledger.state(run_id) == RUNNING:
            # Resumed while this execution was stopping: resume saw the shard leased and
            # left it to this execution, so it goes on from its checkpoint.
            again()
            return
        log.info("bulk run %s is cancelled: shard %d stopped after %d items",
                 run_id, shard, report.items)  # fmt: skip
        return
    if report.status == "paused":
        log.info(
            "bulk run %s shard %d paused after %d items; sent again to resume", run_id, shard,
            report.items,
        )  # fmt: skip
        again()
        return
    log.info(
        "bulk run %s shard %d %s: %d items (%d captioned now) in %.1fs%s",
        run_id, shard, report.status, report.items, report.captioned, seconds,
        "; the run is done" if report.run_finished else "",
    )  # fmt: skip
