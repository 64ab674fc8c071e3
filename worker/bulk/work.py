"""Bulk runs' remaining items as queued GPU work, for the exporter's scaling signal.

A bulk queue holds only a window of shard messages, however many items a run has left, so
its messages say little about the work behind them. This source (the exporter's
``WorkSource``) reads each running run's record instead and costs its remaining items in
generated tokens: the run's observed tokens per captioned item once it has captioned
``MIN_OBSERVED`` items, its ``max_new_tokens`` before that. The exporter costs shard
messages at 0 tokens, so nothing is counted twice.
"""

from __future__ import annotations

from typing import Any

from worker.bulk.state import RunState
from worker.bulk.status import status_from_record

#: Captioned items a run needs before its own average replaces its max_new_tokens.
MIN_OBSERVED = 20


def tokens_per_item(record: dict[str, Any], default: int) -> float:
    """Generated tokens one more item of the run is expected to cost."""
    succeeded = int(record.get("succeeded", 0))
    if succeeded >= MIN_OBSERVED:
        return int(record.get("generated_tokens", 0)) / succeeded
    return float(record.get("max_new_tokens") or default)


class BulkRunsSource:
    """Remaining items of the running runs on a queue, in generated tokens."""

    def __init__(self, client: Any, default_tokens: int) -> None:
        self._state = RunState(client)
        self._default = default_tokens

    def queued_tokens(self, client: Any, queue: str, now: float) -> float:
        """Tokens still to generate for the runs whose shards go to ``queue`` (``client``,
        the broker, is not used: runs live in the result backend)."""
        total = 0.0
        for run_id in self._state.running_on(queue):
            record = self._state.snapshot(run_id)
            if record is None:
                continue  # deleted between the two reads
            remaining = status_from_record(run_id, record, now)["remaining"]
            total += remaining * tokens_per_item(record, self._default)
        return total
