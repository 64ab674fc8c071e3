"""How long tests wait, and how: one place for the timeouts and polling loops."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery.result import AsyncResult

READY_TIMEOUT_S = 180.0  # a worker's model load and warm-up on a busy 2-core machine
TASK_TIMEOUT_S = 60.0  # one caption of the tiny model, queue wait included

T = TypeVar("T")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout_s``."""
    wait_for_value(lambda: None, lambda _: check(), timeout_s, what)


def wait_for_value(
    get: Callable[[], T],
    done: Callable[[T], bool],
    timeout_s: float,
    what: str,
    *,
    tick: Callable[[], None] | None = None,
    interval_s: float = 0.2,
) -> T:
    """Poll ``get()`` until ``done(value)``; return that value, or fail naming ``what``.

    ``tick`` runs before each poll (a supervisor restarting dead workers, say).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if tick is not None:
            tick()
        value = get()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what} (last seen: {value!r:.300})")
        time.sleep(interval_s)


def outcome(result: AsyncResult, timeout_s: float = TASK_TIMEOUT_S) -> tuple[str, Any]:
    """(state, result or exception) once the task has finished."""
    value = result.get(timeout=timeout_s, propagate=False, interval=0.2)
    return str(result.state), value


def failure_of(result: AsyncResult, timeout_s: float = TASK_TIMEOUT_S) -> BaseException:
    """The exception a producer sees for a task that must fail, within ``timeout_s``."""
    started = time.monotonic()
    state, value = outcome(result, timeout_s)
    assert time.monotonic() - started < timeout_s
    assert state == "FAILURE", (state, value)
    assert isinstance(value, BaseException), value
    return value
