"""The achieved-rate reading a worker publishes for the exporter."""

from __future__ import annotations

import json
from typing import Any

from worker.ops.metrics import BusyClock, Metrics
from worker.ops.rates import RateReporter
from worker.queue.keys import RATES_KEY


class HashOnly:
    """The two Redis hash commands the reporter uses, in memory."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}

    def hset(self, key: str, field: str, value: str) -> None:
        self.hashes.setdefault(key, {})[field] = value

    def hdel(self, key: str, field: str) -> None:
        self.hashes.get(key, {}).pop(field, None)


def published(client: HashOnly, worker: str = "w/1") -> Any:
    raw = client.hashes.get(RATES_KEY, {}).get(worker)
    return None if raw is None else json.loads(raw)["generated_tokens_per_second"]


def test_busy_clock_counts_only_time_with_rows() -> None:
    clock = BusyClock()
    clock.rows(4, now=10.0)
    clock.rows(2, now=11.0)  # still busy
    clock.rows(0, now=12.0)
    clock.rows(0, now=50.0)  # idle time does not count
    clock.rows(1, now=60.0)
    assert clock.reading(now=60.5) == (2.5, 0)


def test_metrics_feed_the_busy_clock() -> None:
    metrics = Metrics()
    metrics.rows_active(3)
    metrics.caption_delivered("interactive", prompt_tokens=100, generated_tokens=40)
    metrics.rows_active(0)
    busy, tokens = metrics.busy.reading()
    assert tokens == 40 and busy > 0


def test_reporter_publishes_tokens_per_busy_second_and_keeps_it_while_idle() -> None:
    clock = BusyClock()
    client = HashOnly()
    reporter = RateReporter(client, "w/1", clock)
    reporter()
    assert published(client) is None, "nothing generated yet: no rate to publish"

    clock.rows(8, now=0.0)
    clock.generated(300)
    clock.rows(0, now=2.0)  # 300 tokens in 2 busy seconds
    reporter()
    assert published(client) == 150.0

    reporter()  # idle: the last measured capacity still stands
    assert published(client) == 150.0
    reporter.forget()
    assert published(client) is None
