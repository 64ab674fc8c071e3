"""Crash accounting and the task adapter's edges, with fakes instead of Redis and Celery."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from worker.errors import CaptionFailed
from worker.queue.crash import CrashGuard, forget
from worker.queue.tasks import lifecycle_of


class _DownRedis:
    def pipeline(self) -> _DownRedis:
        return self

    def incr(self, key: str) -> _DownRedis:
        return self

    def expire(self, key: str, ttl: int) -> _DownRedis:
        return self

    def execute(self) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def decr(self, key: str) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def delete(self, *keys: str) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


class _Deleting:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def delete(self, *keys: str) -> None:
        self.deleted += keys


def test_crash_accounting_never_fails_a_caption_when_redis_is_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = CrashGuard(_DownRedis(), "caption:crashes:abc:0", suspect=False)
    guard.enter()
    guard.exit()
    assert caplog.text.count("crash accounting unavailable") == 2


def test_a_task_on_an_app_without_a_lifecycle_fails_cleanly() -> None:
    class PlainApp:  # any Celery app that is not the caption worker's
        pass

    with pytest.raises(CaptionFailed, match="does not run the caption worker"):
        lifecycle_of(PlainApp())


def test_an_ended_attempt_forgets_its_counters_and_a_finished_task_its_marker() -> None:
    retried = _Deleting()
    forget(retried, "abc", 1, finished=False)
    assert sorted(retried.deleted) == ["caption:crashes:abc:1", "caption:deliveries:abc:1"]
    finished = _Deleting()
    forget(finished, "abc", 2, finished=True)
    assert sorted(finished.deleted) == [
        "caption:crashes:abc:2",
        "caption:deliveries:abc:2",
        "caption:queued:abc",
    ]


def test_forgetting_never_fails_a_task_when_redis_is_away(caplog: pytest.LogCaptureFixture) -> None:
    forget(_DownRedis(), "abc", 0, finished=True)
    assert "could not delete counters of task abc" in caplog.text
