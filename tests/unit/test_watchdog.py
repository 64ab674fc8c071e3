"""The hang watchdog against a fake runner: a model call past its limit ends the process once."""

from __future__ import annotations

import threading
import time

from worker.runtime.watchdog import Watchdog

LIMIT_S = 0.5  # polls every LIMIT_S / 10


class FakeRunner:
    def __init__(self, busy_since: float | None) -> None:
        self.busy_since = busy_since


class Calls:
    def __init__(self) -> None:
        self.limits: list[float] = []
        self.called = threading.Event()

    def __call__(self, limit_s: float) -> None:
        self.limits.append(limit_s)
        self.called.set()


def watch(runner: FakeRunner, keep: threading.Event | None = None) -> tuple[Watchdog, Calls]:
    calls = Calls()
    if keep is None:
        keep = threading.Event()
        keep.set()
    dog = Watchdog(runner, LIMIT_S, on_hung=calls, keep_watching=keep.is_set)  # type: ignore[arg-type]
    return dog, calls


def test_hung_for_measures_past_the_limit() -> None:
    dog, _ = watch(FakeRunner(busy_since=100.0))
    assert dog.hung_for(now=100.0 + LIMIT_S) is None
    assert dog.hung_for(now=100.2) is None
    assert dog.hung_for(now=100.0 + LIMIT_S + 2) == 2.0
    idle, _ = watch(FakeRunner(busy_since=None))
    assert idle.hung_for(now=1e9) is None


def test_a_call_past_the_limit_calls_on_hung_once_and_stops_watching() -> None:
    runner = FakeRunner(busy_since=time.monotonic() - 60)
    dog, calls = watch(runner)
    dog.start()
    assert calls.called.wait(5)
    dog._thread.join(5)
    assert not dog._thread.is_alive()  # it returned after the one call
    assert calls.limits == [LIMIT_S]


def test_idle_or_quick_calls_are_left_alone() -> None:
    runner = FakeRunner(busy_since=None)
    keep = threading.Event()
    keep.set()
    dog, calls = watch(runner, keep)
    dog.start()
    time.sleep(LIMIT_S)
    runner.busy_since = time.monotonic()  # a call that has just begun
    time.sleep(LIMIT_S / 2)
    runner.busy_since = None
    time.sleep(LIMIT_S)
    keep.clear()
    dog._thread.join(5)
    assert not dog._thread.is_alive()
    assert calls.limits == []


def test_no_call_once_keep_watching_is_false() -> None:
    keep = threading.Event()  # not set: the worker is stopping
    dog, calls = watch(FakeRunner(busy_since=time.monotonic() - 60), keep)
    dog.start()
    dog._thread.join(5)
    assert not dog._thread.is_alive()
    assert calls.limits == []
