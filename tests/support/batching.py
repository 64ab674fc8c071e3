"""Helpers for tests that drive a row runner (a Batcher, a SlotRunner) directly."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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
def running(engine: Any, stop_timeout: float = 5.0, **limits: Any) -> Iterator[Batcher]:
    """A started Batcher over ``engine`` with ``BatchLimits(**limits)``; stopped on exit."""
    batcher = Batcher(engine, BatchLimits(**limits))
    batcher.start()
    try:
        yield batcher
    finally:
        batcher.stop(timeout=stop_timeout)
