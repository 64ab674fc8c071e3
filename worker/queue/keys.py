"""Every Redis key name this project reads or writes, and the broker's own it inspects.

Producers in other languages rely on some of these (``QUEUED_KEY``); tests and operators
look at the rest. Keep names here so a rename is one edit.
"""

from __future__ import annotations

#: Set by ``CaptionClient.submit`` with the result TTL; its presence turns PENDING into QUEUED.
#: Deleted when the task ends: from then on its result answers.
QUEUED_KEY = "caption:queued:{task_id}"
#: Model calls with this task in them that never returned (the worker died inside them).
CRASH_KEY = "caption:crashes:{task_id}:{retry}"
#: Deliveries of this task attempt, however the workers that took it ended.
DELIVERY_KEY = "caption:deliveries:{task_id}:{retry}"
#: A backstop only: the task deletes both counters when it ends (success, final failure or
#: retry), so they exist only while a delivery may still follow. This expiry covers tasks
#: whose messages were lost with a broker.
COUNTER_TTL_S = 7 * 86_400

#: Live workers: a sorted set of worker id -> the Redis server time of its last heartbeat.
WORKERS_KEY = "caption:workers"
#: Workers declared dead whose work is not yet handed back (worker id -> time declared);
#: an entry leaves once a live worker has finished handing its work back.
DEAD_KEY = "caption:workers:dead"
#: The broker deliveries (kombu delivery tags) a worker holds, so a live worker can hand
#: them back to the queue once the holder's heartbeat stops.
HELD_KEY = "caption:held:{worker}"
#: Set when a worker is declared dead and its deliveries are handed back; a worker that
#: finds its own (it was only stalled) exits instead of acknowledging work others now hold.
FENCE_KEY = "caption:fenced:{worker}"
#: What each worker achieves, for the exporter's queued-work estimate: worker id -> JSON
#: ``{"generated_tokens_per_second": float, "at": unix seconds}``, written with each beat.
RATES_KEY = "caption:workers:rates"
#: How long a fence and an orphaned held set outlive their worker.
LIVENESS_TTL_S = 86_400

#: Celery's Redis result backend: one key per finished task.
RESULT_META_KEY = "celery-task-meta-{task_id}"
#: kombu's Redis transport: delivered but unacknowledged messages, and their delivery times.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: kombu's Redis transport keeps priority levels as extra lists next to the queue's own.
PRIORITY_SEPARATOR = "\x06\x16"


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu uses for one queue: the base list and its priority lists."""
    return [queue] + [f"{queue}{PRIORITY_SEPARATOR}{level}" for level in (3, 6, 9)]


#: A bulk run's state (docs/bulk.md, "Execution"): a hash with ``state`` (running, done,
#: cancelled),
#: the plan's counts, the counters of finished shards, ``next_shard`` (shards sent so far)
#: and ``shards_done``. Kept until deleted: a run's record is small and status reads it.
BULK_RUN_KEY = "caption:bulk:{run_id}"
#: Run ids this Redis knows (a set).
BULK_RUNS_KEY = "caption:bulk:runs"
#: A bitmap: bit N is set once shard N's output is written and counted.
BULK_DONE_KEY = "caption:bulk:{run_id}:done"
#: Shards in progress: shard number -> JSON counters as of its last checkpoint (the entry
#: goes when the shard finishes and its counters move into the run's hash).
BULK_PROGRESS_KEY = "caption:bulk:{run_id}:progress"
#: The lease of a running shard: the holding worker's id, with a TTL its holder renews every
#: heartbeat interval. A shard whose lease is gone while it is not done has no live worker.
BULK_LEASE_KEY = "caption:bulk:{run_id}:lease:{shard}"
#: Shards reopened by ``bulk resume --retry-failed``: their next execution captions the
#: failed items of their existing output again (a set; a shard leaves it when it finishes).
BULK_RETRY_KEY = "caption:bulk:{run_id}:retry"
