"""A bulk run's Redis state (worker.bulk.state) against a real Redis: the window, counting
each shard once, progress of running shards, and status built from it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.bulk.state import RunState
from worker.bulk.status import status_from_record
from worker.queue.keys import BULK_DONE_KEY, BULK_PROGRESS_KEY, BULK_RUN_KEY, BULK_RUNS_KEY

COUNTS = {"total": 12, "to_caption": 10, "skipped": 2, "shards": 4}


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{redis_url}/1")
    yield client
    client.close()


@pytest.fixture()
def run_id(client: redis.Redis) -> Iterator[str]:
    run_id = f"20260101-000000-{uuid.uuid4().hex[:6]}"
    yield run_id
    for key in (BULK_RUN_KEY, BULK_DONE_KEY, BULK_PROGRESS_KEY):
        client.delete(key.format(run_id=run_id))
    client.srem(BULK_RUNS_KEY, run_id)


def shard_counts(succeeded: int, failed: int = 0) -> dict[str, int]:
    return {
        "succeeded": succeeded, "failed": failed,
        "prompt_tokens": 10 * succeeded, "generated_tokens": succeeded,
    }  # fmt: skip


def test_the_window_sends_each_shard_once_and_the_last_one_finishes_the_run(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    first = state.create(run_id, output="s3://b/r/", queue="q", counts=COUNTS, window=2)
    assert first == [0, 1]
    assert client.sismember(BULK_RUNS_KEY, run_id)
    finished = [state.finish_shard(run_id, shard, shard_counts(3)) for shard in (1, 0)]
    assert [f.next_shard for f in finished] == [2, 3]
    assert not any(f.run_finished for f in finished)
    # A late redelivery of a finished shard counts nothing and sends nothing.
    again = state.finish_shard(run_id, 1, shard_counts(3))
    assert (again.counted, again.next_shard, again.run_finished) == (False, None, False)
    state.finish_shard(run_id, 3, shard_counts(1))
    last = state.finish_shard(run_id, 2, shard_counts(0, 3))
    assert last.counted and last.next_shard is None and last.run_finished
    assert state.is_done(run_id, 2) and not state.is_done(run_id, 7)
    record = state.snapshot(run_id)
    assert record is not None
    assert (record["succeeded"], record["failed"], record["shards_done"]) == (7, 3, 4)
    assert record["prompt_tokens"] == 70 and record["state"] == "running"
    state.mark_done(run_id, record["started_at"] + 5)
    status = status_from_record(run_id, state.snapshot(run_id) or {})
    assert status["state"] == "done" and status["remaining"] == 0
    assert status["images_per_second"] == 2.0 and status["eta_seconds"] == 0.0


def test_running_shards_count_as_of_their_checkpoint_and_never_twice(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    state.create(run_id, output="s3://b/r/", queue="q", counts=COUNTS, window=16)
    state.checkpoint(run_id, 0, shard_counts(2))
    state.checkpoint(run_id, 0, shard_counts(3))  # a later checkpoint replaces the earlier
    state.checkpoint(run_id, 1, shard_counts(1, 1))
    record = state.snapshot(run_id) or {}
    assert (record["succeeded"], record["failed"]) == (4, 1)
    state.finish_shard(run_id, 0, shard_counts(3))  # its progress becomes its final count
    record = state.snapshot(run_id) or {}
    assert (record["succeeded"], record["failed"], record["next_shard"]) == (4, 1, 4)
    status = status_from_record(run_id, record, now=record["started_at"] + 2)
    assert status["remaining"] == 5 and status["images_per_second"] == 2.5
    assert status["eta_seconds"] == 2.0


def test_a_run_with_nothing_to_caption_is_done_at_once_and_unknown_runs_are_none(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    empty = {**COUNTS, "to_caption": 0, "shards": 0}
    assert state.create(run_id, output="s3://b/r/", queue="q", counts=empty, window=16) == []
    assert (state.snapshot(run_id) or {})["state"] == "done"
    other = f"{run_id}x"
    assert state.snapshot(other) is None
    assert not state.finish_shard(other, 0, shard_counts(1)).known
    assert not client.exists(BULK_RUN_KEY.format(run_id=other))
    client.delete(BULK_DONE_KEY.format(run_id=other))
