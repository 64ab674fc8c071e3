"""Helpers for tests that drive a Batcher directly."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Any

import pytest

from worker.batcher import Batcher


def settle(batcher: Batcher, futures: Sequence[Future[Any]], timeout: float = 5.0) -> list[Any]:
    """Each future's result or exception; fails fast if the batcher thread has died."""
    end = time.monotonic() + timeout
    left = set(futures)
    while left:
        _, left = wait(left, timeout=0.05)
        thread = batcher._thread
        if left and thread is not None and not thread.is_alive():
            pytest.fail(f"the batcher thread died with {len(left)} task(s) still waiting")
        if left and time.monotonic() > end:
            pytest.fail(f"{len(left)} task(s) got no answer within {timeout}s")
    return [f.exception() or f.result() for f in futures]
