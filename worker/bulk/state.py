"""A bulk run's state in Redis: its counters, which shards are done, the window of shards sent.

Key names are in ``worker.queue.keys``; this module takes a redis-py client (the worker's
result-backend connection, or one the CLI opens) and imports neither Celery nor kombu.

Counters are exact however shards are retried: a shard's counters move into the run's hash
in the same Lua script that sets its bit in the done bitmap, and only when that bit was
clear, so a shard finished twice (a late redelivery) counts once. While a shard runs, its
counters as of its last checkpoint are one field of the progress hash (overwritten, never
added), so a shard taken over from a dead worker is not counted twice either; status adds
the progress hash to the finished shards' counters.

The window: ``create`` marks the first W shards as sent (``next_shard`` = W); each newly
finished shard claims the next shard number with ``HINCRBY next_shard 1`` inside the same
script and its worker sends that shard, so at most W shard messages exist at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from worker.errors import ConfigError
from worker.queue.keys import BULK_DONE_KEY, BULK_PROGRESS_KEY, BULK_RUN_KEY, BULK_RUNS_KEY
from worker.settings import Settings

#: Per-item counters a shard accumulates (``skipped`` is the plan's, fixed at submit).
COUNTERS = ("succeeded", "failed", "prompt_tokens", "generated_tokens")
#: Fields of the run's hash read back as integers.
INT_FIELDS = (
    "total", "to_caption", "skipped", "shards", "next_shard", "shards_done", *COUNTERS,
)  # fmt: skip
FLOAT_FIELDS = ("started_at", "finished_at")
RUNNING, DONE = "running", "done"

# KEYS: run hash, done bitmap, progress hash. ARGV: shard, then counter name/value pairs.
# Returns {newly_done (1/0, -1: no such run), next shard to send (-1: none), run finished}.
_FINISH_SHARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, -1, 0} end
if redis.call('SETBIT', KEYS[2], ARGV[1], 1) == 1 then return {0, -1, 0} end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[3], ARGV[1])
local shards = tonumber(redis.call('HGET', KEYS[1], 'shards'))
local done = redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
local nxt = -1
if tonumber(redis.call('HGET', KEYS[1], 'next_shard')) < shards then
  nxt = redis.call('HINCRBY', KEYS[1], 'next_shard', 1) - 1
end
local finished = 0
if done >= shards then finished = 1 end
return {1, nxt, finished}
"""


@dataclass
class ShardCounts:
    """Counters of a shard's output lines."""

    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @classmethod
    def of(cls, lines: list[dict[str, Any]]) -> ShardCounts:
        counts = cls()
        for line in lines:
            if line.get("status") == "ok":
                counts.succeeded += 1
                counts.prompt_tokens += int(line.get("prompt_tokens") or 0)
                counts.generated_tokens += int(line.get("generated_tokens") or 0)
            elif line.get("status") == "error":
                counts.failed += 1
        return counts

    def to_json(self) -> dict[str, int]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
        }


@dataclass(frozen=True)
class ShardFinish:
    """What finishing one shard did to its run."""

    counted: bool  # False: the shard was already done (or the run is unknown to Redis)
    next_shard: int | None  # the shard this worker must now send, if any
    run_finished: bool  # this was the run's last shard: write the manifest
    known: bool = True  # False: Redis has no record of the run


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RunState:
    """One Redis' record of bulk runs."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._finish = client.register_script(_FINISH_SHARD)

    @staticmethod
    def _keys(run_id: str) -> tuple[str, str, str]:
        return (
            BULK_RUN_KEY.format(run_id=run_id),
            BULK_DONE_KEY.format(run_id=run_id),
            BULK_PROGRESS_KEY.format(run_id=run_id),
        )

    def create(
        self,
        run_id: str,
        *,
        output: str,
        queue: str,
        counts: dict[str, int],
        window: int,
        started_at: float | None = None,
    ) -> list[int]:
        """Record a planned run and claim its first window; return the shards to send now.

        A run with no shard (everything skipped) is recorded as done at once.
        """
        shards = int(counts["shards"])
        first = min(max(window, 1), shards)
        now = time.time() if started_at is None else started_at
        record: dict[str, Any] = {
            "state": RUNNING if shards else DONE,
            "output": output,
            "queue": queue,
            "total": int(counts["total"]),
            "to_caption": int(counts["to_caption"]),
            "skipped": int(counts["skipped"]),
            "shards": shards,
            "next_shard": first,
            "shards_done": 0,
            "started_at": now,
            **dict.fromkeys(COUNTERS, 0),
        }
        if not shards:
            record["finished_at"] = now
        run_key, _, _ = self._keys(run_id)
        pipe = self._client.pipeline()
        pipe.hset(run_key, mapping=record)
        pipe.sadd(BULK_RUNS_KEY, run_id)
        pipe.execute()
        return list(range(first))

    def is_done(self, run_id: str, shard: int) -> bool:
        """Whether shard ``shard`` of the run was finished and counted."""
        _, done_key, _ = self._keys(run_id)
        return bool(self._client.getbit(done_key, shard))

    def checkpoint(self, run_id: str, shard: int, counts: dict[str, int]) -> None:
        """Record a running shard's counters so far (replacing its previous ones)."""
        _, _, progress_key = self._keys(run_id)
        self._client.hset(progress_key, str(shard), json.dumps(counts))

    def finish_shard(self, run_id: str, shard: int, counts: dict[str, int]) -> ShardFinish:
        """Count a finished shard once, and claim the next shard of the window."""
        args: list[Any] = [shard]
        for name in COUNTERS:
            args += [name, int(counts.get(name, 0))]
        counted, nxt, finished = (int(v) for v in self._finish(keys=self._keys(run_id), args=args))
        if counted < 0:
            return ShardFinish(False, None, False, known=False)
        return ShardFinish(bool(counted), nxt if nxt >= 0 else None, bool(finished))

    def record_error(self, run_id: str, shard: int, message: str) -> None:
        """A shard failed as a whole (its run files could not be read or written): keep
        the last such error on the run, for status."""
        run_key, _, _ = self._keys(run_id)
        if self._client.exists(run_key):
            self._client.hset(run_key, "error", f"shard {shard}: {message}"[:1_000])

    def mark_done(self, run_id: str, finished_at: float) -> None:
        """The run's last shard is done and its manifest written."""
        run_key, _, _ = self._keys(run_id)
        self._client.hset(run_key, mapping={"state": DONE, "finished_at": finished_at})

    def snapshot(self, run_id: str) -> dict[str, Any] | None:
        """The run's hash with counters of running shards added; None if Redis has none."""
        run_key, _, progress_key = self._keys(run_id)
        pipe = self._client.pipeline()
        pipe.hgetall(run_key)
        pipe.hvals(progress_key)
        raw, progress = pipe.execute()
        if not raw:
            return None
        record: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        for name in INT_FIELDS:
            if name in record:
                record[name] = int(record[name])
        for name in FLOAT_FIELDS:
            if name in record:
                record[name] = float(record[name])
        for value in progress:
            try:
                partial = json.loads(_text(value))
            except ValueError:
                continue
            for name in COUNTERS:
                record[name] = record.get(name, 0) + int(partial.get(name, 0))
        return record


def redis_for(settings: Settings) -> Any:
    """A client for the result-backend Redis, where runs are recorded (TLS verified as the
    worker verifies it); ConfigError when the result backend is not Redis."""
    import redis

    url = settings.result_backend
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            "bulk runs keep their state in Redis: CAPTION_RESULT_BACKEND must be redis://, "
            "rediss:// or unix://"
        )
    tls: dict[str, Any] = {}
    if url.startswith("rediss://"):
        tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": settings.redis_ca_certs}
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, **tls)
