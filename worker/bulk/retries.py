"""Retrying a store that fails for a while, for the work a bulk shard does inside one task:
an image download, a sidecar upload. ``StorageUnavailable`` (and any retryable
CaptionError) is retried ``retries`` times, waiting ``backoff_s * 2**attempt`` between
tries; anything else, or the last failure, is raised."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from worker.errors import CaptionError

log = logging.getLogger(__name__)

T = TypeVar("T")


def with_retries(
    call: Callable[[], T],
    *,
    retries: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, tried again after a retryable CaptionError."""
    attempt = 0
    while True:
        try:
            return call()
        except CaptionError as exc:
            if not exc.retryable or attempt >= retries:
                raise
            delay = backoff_s * 2**attempt
            attempt += 1
            log.warning("%s (%s); retry %d in %.1fs", type(exc).__name__, exc, attempt, delay)
            sleep(delay)
