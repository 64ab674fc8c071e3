"""Operating runs (worker.bulk.control) when the run is not what the operator thinks: an
unknown id, a directory without a plan, a finished run. Real Redis, real moto S3."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from worker.bulk.control import cancel_run, list_runs, resume_run
from worker.bulk.errors import InvalidBulkOption, SourceNotFound
from worker.bulk.state import RunState
from worker.queue.keys import BULK_RUN_KEY, BULK_RUNS_KEY

COUNTS = {"total": 4, "to_caption": 4, "skipped": 0, "shards": 2}


class RecordingSender:
    """What resume would queue (no broker needed: nothing may be sent in these cases)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []

    def send(self, queue: str, run_id: str, shard: int, run_uri: str) -> None:
        self.sent.append((queue, run_id, shard))


@pytest.fixture()
def ledger(redis_url: str) -> Iterator[RunState]:
    client = redis.Redis.from_url(f"{redis_url}/1")
    state = RunState(client)
    known = set(state.run_ids())
    yield state
    for run_id in set(state.run_ids()) - known:
        client.delete(BULK_RUN_KEY.format(run_id=run_id))
        client.srem(BULK_RUNS_KEY, run_id)
    client.close()


def new_id() -> str:
    return f"20990101-000000-{uuid.uuid4().hex[:6]}"


def test_resume_of_an_id_redis_does_not_know_asks_for_the_runs_uri(
    ledger: RunState, s3_client: Any
) -> None:
    sender = RecordingSender()
    with pytest.raises(SourceNotFound, match="give the run's s3:// URI"):
        resume_run(new_id(), ledger, s3_client, sender)  # type: ignore[arg-type]
    with pytest.raises(InvalidBulkOption, match="neither a run id"):
        resume_run("last-tuesday", ledger, s3_client, sender)  # type: ignore[arg-type]
    assert sender.sent == []


def test_resume_of_a_directory_without_a_plan_records_and_sends_nothing(
    ledger: RunState, s3_client: Any, bucket: str
) -> None:
    run_id, sender = new_id(), RecordingSender()
    with pytest.raises(SourceNotFound, match=r"run\.json does not exist"):
        resume_run(f"s3://{bucket}/runs/{run_id}/", ledger, s3_client, sender)  # type: ignore[arg-type]
    assert ledger.snapshot(run_id) is None and sender.sent == []


def test_a_finished_run_is_left_alone_by_resume_and_cancel(
    ledger: RunState, s3_client: Any, bucket: str
) -> None:
    run_id, sender = new_id(), RecordingSender()
    uri = f"s3://{bucket}/runs/{run_id}/"
    s3_client.put_object(Bucket=bucket, Key=f"runs/{run_id}/run.json",
                         Body=b'{"queue": "q", "counts": {"shards": 2}}')  # fmt: skip
    ledger.create(run_id, output=uri, queue="q", counts=COUNTS, window=2)
    for shard in (0, 1):
        ledger.finish_shard(run_id, shard, {"succeeded": 2})
    ledger.mark_done(run_id, 1.0)
    result = resume_run(run_id, ledger, s3_client, sender)  # type: ignore[arg-type]
    assert (result.state, result.sent) == ("done", 0) and sender.sent == []
    assert cancel_run(run_id, ledger) == "done"  # nothing to cancel: it stays done
    with pytest.raises(SourceNotFound, match="nothing to cancel"):
        cancel_run(new_id(), ledger)
    assert [(s["run_id"], s["state"]) for s in list_runs(ledger) if s["run_id"] == run_id] == [
        (run_id, "done")
    ]
