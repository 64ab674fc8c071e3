"""Crash accounting and the task adapter's edges, with fakes instead of Redis and Celery."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from worker.errors import CaptionFailed
from worker.queue.crash import CrashGuard
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
