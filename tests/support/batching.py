"""Helpers for tests that drive a row runner (a Batcher, a SlotRunner) directly."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from typing import Any

import pytest

from worker.batching.batcher import Batcher
from worker.batching.policy import BatchLimits
from worker.engine.base import RowRunner


def settle(runner: RowRunner, futures: Sequence[Future[Any]], timeout: float = 5.0) -> list[Any]:
    """Each future's result or exception; fails fast if the runner's model thread has died."""
    end = time.monotonic() + timeout
    left = set(futures)
    while left:
        _, left = wait(left, timeout=0.05)
        if left and not runner.is_alive():
            pytest.fail(f"the model thread died with {len(left)} task(s) still waiting")
        if left and time.monotonic() > end:
            pytest.fail(f"{len(left)} task(s) got no answer within {timeout}s")
    return [f.exception() or f.result() for f in futures]


@contextmanager
def running(
    engine: Any,
    stop_timeout: float = 5.0,
    on_device_failure: Callable[[BaseException], None] | None = None,
    **limits: Any,
) -> Iterator[Batcher]:
    """A started Batcher over ``engine`` with ``BatchLimits(**limits)``; stopped on exit."""
    batcher = Batcher(engine, BatchLimits(**limits), on_device_failure=on_device_failure)
    batcher.start()
    try:
        yield batcher
    finally:
        batcher.stop(timeout=stop_timeout)


class RecordingGuard:
    """Records crash accounting the way the Celery task's guard does: how often the row
    entered a model call, and how many it is inside now."""

    def __init__(self, suspect: bool = False) -> None:
        self.suspect = suspect
        self.inside = 0
        self.entered = 0

    def enter(self) -> None:
        self.inside += 1
        self.entered += 1

    def exit(self) -> None:
        self.inside -= 1
