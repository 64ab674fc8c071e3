"""Heartbeat decisions with a scripted registry: when it may judge others, and what it survives."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from worker.ops.heartbeat import STEADY_BEATS, Heartbeat


class ScriptedRegistry:
    """Answers like WorkerRegistry; ``down`` makes every call fail like a lost Redis."""

    worker_id = "me/1"

    def __init__(self) -> None:
        self.down = False
        self.silent = ["gone/2"]
        self.dead_set: list[str] = []
        self.left = False

    def _check(self) -> None:
        if self.down:
            raise RedisConnectionError("connection refused")

    def beat(self) -> bool:
        self._check()
        return True

    def stale(self) -> list[str]:
        self._check()
        return list(self.silent)

    def declare_dead(self, worker_id: str) -> bool:
        self.silent.remove(worker_id)
        self.dead_set.append(worker_id)
        return True

    def dead(self) -> list[str]:
        return list(self.dead_set)

    def buried(self, worker_id: str) -> None:
        self.dead_set.remove(worker_id)

    def leave(self) -> None:
        self._check()
        self.left = True


def heartbeat(registry: ScriptedRegistry, **hooks: Any) -> tuple[Heartbeat, list[str]]:
    handed_back: list[str] = []
    beat = Heartbeat(
        registry,  # type: ignore[arg-type]
        60,
        on_dead=handed_back.append,
        on_fenced=lambda: None,
        **hooks,
    )
    return beat, handed_back


def test_after_a_redis_outage_the_count_of_steady_beats_starts_again() -> None:
    registry = ScriptedRegistry()
    beat, handed_back = heartbeat(registry)
    for _ in range(STEADY_BEATS - 1):
        beat.tick()
    registry.down = True
    beat.tick()  # fails: logged, not raised
    registry.down = False
    for _ in range(STEADY_BEATS - 1):
        beat.tick()
    assert handed_back == [], "every worker's beat is old after an outage: wait for theirs"
    beat.tick()
    assert handed_back == ["gone/2"]


def test_a_failing_beat_hook_does_not_stop_the_heartbeat() -> None:
    registry = ScriptedRegistry()
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("sync failed")

    beat, handed_back = heartbeat(registry, on_beat=[broken])
    for _ in range(STEADY_BEATS):
        beat.tick()
    assert len(calls) == STEADY_BEATS
    assert handed_back == ["gone/2"]


def test_a_hand_back_cut_short_is_taken_up_again_at_the_next_beat() -> None:
    registry = ScriptedRegistry()
    attempts: list[str] = []

    def flaky(worker_id: str) -> None:
        attempts.append(worker_id)
        if len(attempts) == 1:
            raise RedisConnectionError("lost mid-restore")

    beat = Heartbeat(registry, 60, on_dead=flaky, on_fenced=lambda: None)  # type: ignore[arg-type]
    for _ in range(STEADY_BEATS + 1):
        beat.tick()
    assert attempts == ["gone/2", "gone/2"]
    assert registry.dead_set == []


def test_stop_leaves_the_set_even_when_redis_is_away() -> None:
    registry = ScriptedRegistry()
    beat, _ = heartbeat(registry)
    registry.down = True
    beat.stop()  # logged, not raised: a shutdown must finish
    registry.down = False
    beat.stop()
    assert registry.left
