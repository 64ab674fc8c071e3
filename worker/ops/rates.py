"""Each worker's achieved generation rate, published for the queue exporter.

``caption-worker exporter`` turns queued tokens into queued GPU-seconds with the rate
workers really achieve, not a guess. Each heartbeat, ``RateReporter`` reads the worker's
``BusyClock`` and writes generated tokens per busy second over its recent window into
``RATES_KEY``. An idle worker keeps republishing its last measured rate (the capacity it
showed is still the best estimate); a worker that never generated publishes nothing.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from worker.ops.metrics import BusyClock
from worker.queue.keys import RATES_KEY

#: Readings kept: the rate spans this many beats (with 5 s beats, about the last minute of
#: busy time), so a change of prompt mix shows within a minute.
WINDOW_BEATS = 12
#: Less busy time than this in the window gives too noisy a rate to publish a new one.
MIN_BUSY_S = 1.0


class RateReporter:
    """A heartbeat hook: publish this worker's generated tokens per busy second."""

    def __init__(self, client: Any, worker_id: str, clock: BusyClock) -> None:
        self.client = client
        self.worker_id = worker_id
        self.clock = clock
        self._readings: deque[tuple[float, int]] = deque(maxlen=WINDOW_BEATS + 1)
        self.rate: float | None = None

    def __call__(self) -> None:
        """Take a reading; publish the windowed rate (or the last one while idle)."""
        self._readings.append(self.clock.reading())
        (busy0, tokens0), (busy1, tokens1) = self._readings[0], self._readings[-1]
        if busy1 - busy0 >= MIN_BUSY_S and tokens1 > tokens0:
            self.rate = (tokens1 - tokens0) / (busy1 - busy0)
        if self.rate is not None:
            value = {"generated_tokens_per_second": round(self.rate, 3), "at": time.time()}
            self.client.hset(RATES_KEY, self.worker_id, json.dumps(value))

    def forget(self, worker_id: str | None = None) -> None:
        """Remove a worker's rate (this one at shutdown, or a dead one)."""
        self.client.hdel(RATES_KEY, worker_id or self.worker_id)
