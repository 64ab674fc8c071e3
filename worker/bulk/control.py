"""Operating runs: start a planned run, resume it (also after Redis lost it), cancel, list.

What ``caption-worker bulk submit|resume|cancel|list`` do once their arguments are parsed.
Shard messages go through a ``ShardSender`` (a producer-only Celery app on the broker);
the run's record is ``worker.bulk.state.RunState`` on the result-backend Redis, and its
files are ``worker.bulk.runfiles.RunFiles`` in S3.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from worker.bulk.errors import InvalidBulkOption, SourceNotFound
from worker.bulk.layout import RunLayout
from worker.bulk.runfiles import RunFiles, layout_of
from worker.bulk.state import CANCELLED, DONE, PLANNING, RunState, ShardCounts
from worker.bulk.status import finish_run, resolve_run, status_from_record

#: Shard messages queued at once unless ``--window`` says otherwise.
DEFAULT_WINDOW = 16


class ShardSender:
    """Sends shard messages through a Celery app; a context manager that closes the app it
    made (``for_broker``), never one it was given."""

    def __init__(self, app: Any, *, owned: bool = False) -> None:
        self._app = app
        self._owned = owned
        self.sent = 0

    @classmethod
    def for_broker(cls, broker_url: str) -> ShardSender:
        """A producer-only app on ``broker_url`` (JSON messages, no result backend)."""
        from celery import Celery

        app = Celery("caption-bulk", broker=broker_url)
        app.conf.update(task_serializer="json", accept_content=["json"])
        return cls(app, owned=True)

    def send(self, queue: str, run_id: str, shard: int, run_uri: str) -> None:
        from worker.queue.bulk_task import send_shard

        send_shard(self._app, queue, run_id, shard, run_uri)
        self.sent += 1

    def __enter__(self) -> ShardSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owned:
            self._app.close()


def start_run(
    ledger: RunState,
    files: RunFiles,
    sender: ShardSender,
    *,
    counts: dict[str, int],
    queue: str,
    window: int,
    max_new_tokens: int | None = None,
) -> int:
    """Record a planned run and queue its first window of shards; how many were queued.
    A run with nothing to caption is finished at once (its manifest written)."""
    run_id = files.layout.run_id
    shards = ledger.create(
        run_id, output=files.uri, queue=queue, counts=counts, window=window,
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    if not counts["shards"]:
        finish_run(files, ledger)
        return 0
    for shard in shards:
        sender.send(queue, run_id, shard, files.uri)
    return len(shards)


@dataclass(frozen=True)
class ResumeResult:
    """What ``bulk resume`` did."""

    run_id: str
    state: str
    sent: int  # shard messages queued
    retrying: int  # finished shards whose failed items are captioned again
    restored: bool  # Redis had no record: it was rebuilt from the run's files

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "state": self.state, "sent": self.sent,
            "retrying": self.retrying, "restored": self.restored,
        }  # fmt: skip


def resume_run(
    run: str,
    ledger: RunState,
    s3_client: Any,
    sender: ShardSender,
    *,
    retry_failed: bool = False,
    window: int = DEFAULT_WINDOW,
) -> ResumeResult:
    """Re-queue a run's shards that are neither done nor held by a live worker.

    ``run`` is a run id or the run's s3:// URI; with the URI a run Redis lost is rebuilt
    from its files first (``window`` applies to such a run). ``retry_failed`` also makes
    every finished shard with ``error`` lines caption those items again, into the same
    run. A done run without ``retry_failed`` is left as it is.
    """
    run_id, layout = resolve_run(run)
    record = ledger.snapshot(run_id)
    # A run Redis lost, or one whose submit died between planning and starting it (its
    # record still says planning), is rebuilt from its files.
    restored = record is None or record.get("state") == PLANNING
    if record is not None:
        layout = _layout(record, layout)
    elif layout is None:
        raise SourceNotFound(
            f"Redis has no record of run {run_id}; give the run's s3:// URI to resume it "
            "from its files"
        )
    files = RunFiles(s3_client, layout)
    run_json = files.run_json()
    if run_json is None:
        raise SourceNotFound(f"{files.uri}run.json does not exist: not a planned run")
    outputs = files.output_counts() if restored or retry_failed else {}
    if restored:
        _restore(ledger, files, run_json, outputs, window)
    state = ledger.state(run_id)
    retry = _reopen_failed(ledger, run_id, outputs) if retry_failed else set()
    if state == DONE and not retry:
        return ResumeResult(run_id, DONE, 0, 0, restored)
    queue = str(run_json["queue"])
    # Reopened shards all go now, whatever the window: each is a short pass over failures.
    shards = sorted(set(ledger.resume(run_id)) | retry)
    for shard in shards:
        sender.send(queue, run_id, shard, files.uri)
    snapshot = ledger.snapshot(run_id) or {}
    if not shards and int(snapshot.get("shards_done", 0)) >= int(snapshot.get("shards", 0)):
        finish_run(files, ledger, run_json)  # every output exists: the run only needed ending
    return ResumeResult(
        run_id, ledger.state(run_id) or "unknown", len(shards), len(retry), restored
    )


def _layout(record: dict[str, Any], given: RunLayout | None) -> RunLayout:
    layout = layout_of(str(record["output"]))
    if given is not None and given != layout:
        raise InvalidBulkOption(f"run {layout.run_id} is recorded at {layout.uri}, not {given.uri}")
    return layout


def _restore(
    ledger: RunState,
    files: RunFiles,
    run: dict[str, Any],
    outputs: dict[int, ShardCounts],
    window: int,
) -> None:
    counts = run["counts"]
    shards = int(counts["shards"])
    done = {shard: partial for shard, partial in outputs.items() if shard < shards}
    ledger.restore(
        files.layout.run_id,
        output=files.uri,
        queue=str(run["queue"]),
        counts={name: int(counts[name]) for name in ("total", "to_caption", "skipped", "shards")},
        window=window,
        done=done,
        started_at=_created_at(run),
        max_new_tokens=int(run["max_new_tokens"]),
    )


def _created_at(run: dict[str, Any]) -> float | None:
    """When submit planned the run (run.json ``created_at``), so a rebuilt run's rate and
    seconds count from its real start."""
    try:
        return datetime.fromisoformat(str(run["created_at"])).timestamp()
    except (KeyError, ValueError):
        return None


def _reopen_failed(ledger: RunState, run_id: str, outputs: dict[int, ShardCounts]) -> set[int]:
    """Reopen every done shard whose output has ``error`` lines; the reopened shards."""
    return {
        shard
        for shard, partial in outputs.items()
        if partial.failed and ledger.reopen(run_id, shard, partial.to_json())
    }


def cancel_run(run: str, ledger: RunState) -> str:
    """Cancel a running run; its state afterwards (``cancelled``, or ``done`` when it had
    already finished)."""
    run_id, _ = resolve_run(run)
    if ledger.cancel(run_id):
        return CANCELLED
    state = ledger.state(run_id)
    if state is None:
        raise SourceNotFound(f"Redis has no record of run {run_id}; nothing to cancel")
    return state


def list_runs(ledger: RunState) -> list[dict[str, Any]]:
    """The status of every run this Redis knows, newest first."""
    statuses = []
    for run_id in sorted(ledger.run_ids(), reverse=True):
        record = ledger.snapshot(run_id)
        if record is not None:
            statuses.append(status_from_record(run_id, record))
    return statuses
