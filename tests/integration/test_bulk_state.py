"""A bulk run's Redis state (worker.bulk.state) against a real Redis: the window, counting
each shard once, progress of running shards, and status built from it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.bulk.state import RunState, ShardCounts
from worker.bulk.status import status_from_record
from worker.queue.keys import (
    BULK_DONE_KEY,
    BULK_LEASE_KEY,
    BULK_PROGRESS_KEY,
    BULK_RUN_KEY,
    BULK_RUNS_KEY,
)

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


def lease_key(run_id: str, shard: int) -> str:
    return BULK_LEASE_KEY.format(run_id=run_id, shard=shard)


def test_a_lease_keeps_a_second_worker_off_the_shard_until_it_is_released_or_lapses(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    state.create(run_id, output="s3://b/r/", queue="q", counts=COUNTS, window=2)
    try:
        assert state.acquire(run_id, 0, "host-a/1", ttl_s=30) is None
        # Every execution has its own id: a second one, even with the same id, waits.
        assert state.acquire(run_id, 0, "host-a/1", ttl_s=30) == "host-a/1"
        assert state.acquire(run_id, 0, "host-b/2", ttl_s=30) == "host-a/1"
        assert state.renew(run_id, 0, "host-a/1", ttl_s=30)
        assert not state.renew(run_id, 0, "host-b/2", ttl_s=30)
        state.release(run_id, 0, "host-b/2")  # not its lease: nothing happens
        assert client.get(lease_key(run_id, 0)) == b"host-a/1"
        state.release(run_id, 0, "host-a/1")
        assert state.acquire(run_id, 0, "host-b/2", ttl_s=0.2) is None
        time.sleep(0.4)  # host-b stalled past its TTL: the shard is free again
        assert state.acquire(run_id, 0, "host-c/3", ttl_s=30) is None
        assert not state.renew(run_id, 0, "host-b/2", ttl_s=30)  # and host-b knows it lost it
    finally:
        client.delete(lease_key(run_id, 0))


def test_resume_resends_only_shards_neither_done_nor_leased_and_refills_the_window(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    counts = {**COUNTS, "shards": 6}
    assert state.create(run_id, output="s3://b/r/", queue="q", counts=counts, window=3) == [0, 1, 2]
    state.finish_shard(run_id, 0, shard_counts(2))  # claims 3
    state.acquire(run_id, 1, "live/1", ttl_s=30)  # shard 1 runs on a live worker
    try:
        # Shards 2 and 3 are sent, not done and not leased: their worker died, or their
        # messages wait in the queue (a duplicate then finds the shard leased or done).
        assert state.resume(run_id) == [2, 3]
        record = state.snapshot(run_id) or {}
        assert record["state"] == "running" and record["next_shard"] == 4
    finally:
        client.delete(lease_key(run_id, 1))


def test_a_cancelled_run_counts_finishing_shards_but_sends_none_until_resumed(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    counts = {**COUNTS, "shards": 5}
    state.create(run_id, output="s3://b/r/", queue="q", counts=counts, window=2)
    assert state.cancel(run_id) and state.state(run_id) == "cancelled"
    assert not state.cancel(run_id)  # already cancelled
    finished = state.finish_shard(run_id, 0, shard_counts(3))
    assert finished.counted and finished.next_shard is None
    status = status_from_record(run_id, state.snapshot(run_id) or {})
    assert status["state"] == "cancelled" and status["succeeded"] == 3
    assert status["eta_seconds"] is None
    # Resume: shard 1 (sent, never run) goes again, and the window of 2 is refilled.
    assert state.resume(run_id) == [1, 2]
    assert state.state(run_id) == "running"


def test_reopening_a_finished_shard_takes_its_counts_back_for_a_second_pass(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    state.create(run_id, output="s3://b/r/", queue="q", counts=COUNTS, window=4)
    for shard in range(4):
        state.finish_shard(run_id, shard, shard_counts(2, 1))
    assert state.reopen(run_id, 2, shard_counts(2, 1))
    assert not state.reopen(run_id, 2, shard_counts(2, 1))  # not done any more: no-op
    assert state.retrying(run_id, 2) and not state.retrying(run_id, 1)
    record = state.snapshot(run_id) or {}
    assert (record["succeeded"], record["failed"], record["shards_done"]) == (6, 3, 3)
    again = state.finish_shard(run_id, 2, shard_counts(3, 0))  # the failed item now ok
    assert again.counted and again.run_finished and again.next_shard is None
    assert not state.retrying(run_id, 2)
    record = state.snapshot(run_id) or {}
    assert (record["succeeded"], record["failed"]) == (9, 3)


def test_a_run_restored_from_its_files_sends_only_shards_without_output(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    counts = {**COUNTS, "shards": 6}
    done = {0: ShardCounts(2, 0, 20, 2), 1: ShardCounts(1, 1, 10, 1), 3: ShardCounts(2)}
    state.checkpoint(run_id, 4, shard_counts(9))  # a progress entry from before the loss
    state.restore(
        run_id, output="s3://b/r/", queue="q", counts=counts, window=2, done=done,
        started_at=1_000.0,
    )  # fmt: skip
    record = state.snapshot(run_id) or {}
    assert (record["succeeded"], record["failed"], record["shards_done"]) == (5, 1, 3)
    assert record["started_at"] == 1_000.0  # the run's real start: its rate stays honest
    assert state.resume(run_id) == [2, 4]  # shard 3 is done: the window steps over it
    finished = state.finish_shard(run_id, 2, shard_counts(2))
    assert finished.next_shard == 5


def test_a_run_being_planned_shows_as_planning_until_created_and_a_failed_plan_is_forgotten(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    state.begin(run_id, output="s3://b/r/", queue="q")
    status = status_from_record(run_id, state.snapshot(run_id) or {})
    assert (status["state"], status["total"], status["remaining"]) == ("planning", 0, 0)
    assert run_id in state.run_ids() and state.running_on("q") == []
    state.create(run_id, output="s3://b/r/", queue="q", counts=COUNTS, window=2)
    assert state.state(run_id) == "running" and state.running_on("q") == [run_id]

    other = f"{run_id}x"
    state.begin(other, output="s3://b/o/", queue="q")
    state.forget(other)
    assert state.snapshot(other) is None and other not in state.run_ids()


def test_a_checkpoint_of_a_shard_already_done_elsewhere_is_not_counted(
    client: redis.Redis, run_id: str
) -> None:
    state = RunState(client)
    state.create(run_id, output="s3://b/r/", queue="q", counts=COUNTS, window=4)
    state.finish_shard(run_id, 0, shard_counts(3))
    state.checkpoint(run_id, 0, shard_counts(2))  # a stalled execution's late checkpoint
    record = state.snapshot(run_id) or {}
    assert record["succeeded"] == 3
