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
finished shard claims the next shard number inside the same script and its worker sends that
shard, so at most W shard messages exist at once. Claims step over shards already done, so a
run rebuilt from S3 (``restore``) refills its window with the shards that still need work.

Leases: a worker running a shard holds ``caption:bulk:{run}:lease:{shard}`` (its worker id,
with a TTL of ``CAPTION_WORKER_DEAD_AFTER_S`` renewed every heartbeat interval). A second
delivery of a leased shard waits instead of running it twice, and ``resume`` re-sends only
shards that are neither done nor leased: work whose worker is gone.

Cancelling sets ``state`` to ``cancelled``: workers drop the run's queued shard messages as
they take them, running shards stop at their next item and save a checkpoint, and finished
shards claim no next one. ``resume`` sets it back to ``running``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from worker.errors import ConfigError
from worker.queue.keys import (
    BULK_DONE_KEY,
    BULK_LEASE_KEY,
    BULK_PROGRESS_KEY,
    BULK_RETRY_KEY,
    BULK_RUN_KEY,
    BULK_RUNS_KEY,
)
from worker.settings import Settings
from worker.storage.redis_client import is_redis_url, redis_client

#: Per-item counters a shard accumulates (``skipped`` is the plan's, fixed at submit).
COUNTERS = ("succeeded", "failed", "prompt_tokens", "generated_tokens")
#: Fields of the run's hash read back as integers.
INT_FIELDS = (
    "total", "to_caption", "skipped", "shards", "next_shard", "shards_done", "window",
    "max_new_tokens", *COUNTERS,
)  # fmt: skip
FLOAT_FIELDS = ("started_at", "finished_at", "cancelled_at")
PLANNING, RUNNING, DONE, CANCELLED = "planning", "running", "done", "cancelled"
#: States a run does not leave on its own.
#: States after which a run's numbers never change again.
FINAL_STATES = (DONE, CANCELLED)

# The next shard to send that is not done yet (-1: none left), advancing next_shard past it.
# KEYS[1] is the run hash, KEYS[2] the done bitmap.
_CLAIM_NEXT = """
local function claim_next()
  local shards = tonumber(redis.call('HGET', KEYS[1], 'shards'))
  local n = tonumber(redis.call('HGET', KEYS[1], 'next_shard'))
  while n < shards and redis.call('GETBIT', KEYS[2], n) == 1 do n = n + 1 end
  if n >= shards then
    redis.call('HSET', KEYS[1], 'next_shard', shards)
    return -1
  end
  redis.call('HSET', KEYS[1], 'next_shard', n + 1)
  return n
end
"""

# KEYS: run hash, done bitmap, progress hash, retry set. ARGV: shard, then counter
# name/value pairs. Returns {newly_done (1/0, -1: no such run), next shard to send (-1:
# none), run finished}.
# A cancelled run still counts a shard that finished, but sends no next one.
_FINISH_SHARD = (
    _CLAIM_NEXT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, -1, 0} end
if redis.call('SETBIT', KEYS[2], ARGV[1], 1) == 1 then return {0, -1, 0} end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
local shards = tonumber(redis.call('HGET', KEYS[1], 'shards'))
local done = redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
local nxt = -1
if redis.call('HGET', KEYS[1], 'state') ~= 'cancelled' then nxt = claim_next() end
local finished = 0
if done >= shards then finished = 1 end
return {1, nxt, finished}
"""
)

# KEYS: run hash, done bitmap. ARGV: how many. Claims up to that many shards to send.
_CLAIM = (
    _CLAIM_NEXT
    + """
local claimed = {}
for _ = 1, tonumber(ARGV[1]) do
  local n = claim_next()
  if n < 0 then break end
  claimed[#claimed + 1] = n
end
return claimed
"""
)

# KEYS: run hash, done bitmap, retry set. ARGV: shard, then counter name/value pairs to
# take back. Makes a done shard not done again and marks it for a retry of its failed items;
# 0 if it was not done.
_REOPEN = """
if redis.call('SETBIT', KEYS[2], ARGV[1], 0) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], -tonumber(ARGV[i + 1])) end
redis.call('HINCRBY', KEYS[1], 'shards_done', -1)
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# KEYS: done bitmap, progress hash. ARGV: shard, counters JSON. A checkpoint of a shard
# that is already done (another execution finished it) is not recorded: its counters are in
# the run's hash already.
_CHECKPOINT = """
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: the lease. ARGV: holder, TTL (ms). Returns the holder found, or false once held.
# Each execution of a shard has its own holder id, so two executions never share a lease,
# not even two task threads of one worker.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1]) or ''
"""

# KEYS: the lease. ARGV: holder, TTL (ms) or 0 to release. 1 when this holder holds it
# (a lease that lapsed while nobody took it is taken again), 0 when another worker does.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if not holder and tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
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

    def __add__(self, other: ShardCounts) -> ShardCounts:
        return ShardCounts(
            self.succeeded + other.succeeded,
            self.failed + other.failed,
            self.prompt_tokens + other.prompt_tokens,
            self.generated_tokens + other.generated_tokens,
        )

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
        self._claim = client.register_script(_CLAIM)
        self._reopen = client.register_script(_REOPEN)
        self._checkpoint = client.register_script(_CHECKPOINT)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    @property
    def client(self) -> Any:
        """The redis-py client this record is read and written through."""
        return self._client

    @staticmethod
    def _keys(run_id: str) -> tuple[str, str, str]:
        return (
            BULK_RUN_KEY.format(run_id=run_id),
            BULK_DONE_KEY.format(run_id=run_id),
            BULK_PROGRESS_KEY.format(run_id=run_id),
        )

    @staticmethod
    def _retry_key(run_id: str) -> str:
        return BULK_RETRY_KEY.format(run_id=run_id)

    def begin(self, run_id: str, *, output: str, queue: str) -> None:
        """Record a run whose plan is being written (``create`` follows once it is)."""
        run_key, _, _ = self._keys(run_id)
        pipe = self._client.pipeline()
        record = {"state": PLANNING, "output": output, "queue": queue, "started_at": time.time()}
        pipe.hset(run_key, mapping=record)
        pipe.sadd(BULK_RUNS_KEY, run_id)
        pipe.execute()

    def forget(self, run_id: str) -> None:
        """Remove every key of a run (its planning failed; nothing else refers to it)."""
        run_key, done_key, progress_key = self._keys(run_id)
        pipe = self._client.pipeline()
        pipe.delete(run_key, done_key, progress_key, self._retry_key(run_id))
        pipe.srem(BULK_RUNS_KEY, run_id)
        pipe.execute()

    @staticmethod
    def _record(
        *,
        output: str,
        queue: str,
        counts: dict[str, int],
        window: int,
        next_shard: int,
        started_at: float | None,
        max_new_tokens: int | None,
    ) -> dict[str, Any]:
        """A run's hash as recorded at its start (no shard counted yet)."""
        shards = int(counts["shards"])
        now = time.time() if started_at is None else started_at
        record: dict[str, Any] = {
            "state": RUNNING if shards else DONE,
            "output": output,
            "queue": queue,
            "total": int(counts["total"]),
            "to_caption": int(counts["to_caption"]),
            "skipped": int(counts["skipped"]),
            "shards": shards,
            "next_shard": next_shard,
            "shards_done": 0,
            "window": max(window, 1),
            "started_at": now,
            **dict.fromkeys(COUNTERS, 0),
        }
        if not shards:
            record["finished_at"] = now
        if max_new_tokens is not None:
            record["max_new_tokens"] = max_new_tokens
        return record

    def create(
        self,
        run_id: str,
        *,
        output: str,
        queue: str,
        counts: dict[str, int],
        window: int,
        started_at: float | None = None,
        max_new_tokens: int | None = None,
    ) -> list[int]:
        """Record a planned run and claim its first window; return the shards to send now.

        A run with no shard (everything skipped) is recorded as done at once.
        ``max_new_tokens`` (the run's cap) costs its items until some are captioned.
        """
        shards = int(counts["shards"])
        first = min(max(window, 0), shards)
        record = self._record(
            output=output, queue=queue, counts=counts, window=window, next_shard=first,
            started_at=started_at, max_new_tokens=max_new_tokens,
        )  # fmt: skip
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
        """Record a running shard's counters so far (replacing its previous ones); nothing
        once the shard is done."""
        _, done_key, progress_key = self._keys(run_id)
        self._checkpoint(keys=[done_key, progress_key], args=[shard, json.dumps(counts)])

    def retrying(self, run_id: str, shard: int) -> bool:
        """Whether the shard was reopened to caption its failed items again."""
        return bool(self._client.sismember(self._retry_key(run_id), shard))

    def finish_shard(self, run_id: str, shard: int, counts: dict[str, int]) -> ShardFinish:
        """Count a finished shard once, and claim the next shard of the window."""
        args: list[Any] = [shard]
        for name in COUNTERS:
            args += [name, int(counts.get(name, 0))]
        keys = [*self._keys(run_id), self._retry_key(run_id)]
        counted, nxt, finished = (int(v) for v in self._finish(keys=keys, args=args))
        if counted < 0:
            return ShardFinish(False, None, False, known=False)
        return ShardFinish(bool(counted), nxt if nxt >= 0 else None, bool(finished))

    def record_error(self, run_id: str, shard: int, message: str) -> None:
        """A shard failed as a whole (its run files could not be read or written): keep
        the last such error on the run, for status."""
        run_key, _, _ = self._keys(run_id)
        if self._client.exists(run_key):
            self._client.hset(run_key, "error", f"shard {shard}: {message}"[:1_000])

    def run_ids(self) -> list[str]:
        """Every run id this Redis knows."""
        return [_text(v) for v in self._client.smembers(BULK_RUNS_KEY)]

    def running_on(self, queue: str) -> list[str]:
        """Ids of the running runs whose shards go to ``queue``."""
        run_ids = self.run_ids()
        pipe = self._client.pipeline()
        for run_id in run_ids:
            pipe.hmget(BULK_RUN_KEY.format(run_id=run_id), "state", "queue")
        return [
            run_id
            for run_id, (state, run_queue) in zip(run_ids, pipe.execute(), strict=True)
            if state is not None and _text(state) == RUNNING
            and run_queue is not None and _text(run_queue) == queue
        ]  # fmt: skip

    def state(self, run_id: str) -> str | None:
        """The run's state (running, done, cancelled); None when Redis has no record."""
        run_key, _, _ = self._keys(run_id)
        value = self._client.hget(run_key, "state")
        return None if value is None else _text(value)

    def cancel(self, run_id: str, at: float | None = None) -> bool:
        """Cancel a running run; False when it is not running (done, cancelled, unknown)."""
        if self.state(run_id) != RUNNING:
            return False
        run_key, _, _ = self._keys(run_id)
        now = time.time() if at is None else at
        self._client.hset(run_key, mapping={"state": CANCELLED, "cancelled_at": now})
        return True

    def acquire(self, run_id: str, shard: int, holder: str, ttl_s: float) -> str | None:
        """Take shard ``shard``'s lease for ``holder``; the other holder's id when it is
        held by a live one (then this holder must not run it)."""
        key = BULK_LEASE_KEY.format(run_id=run_id, shard=shard)
        other = self._acquire(keys=[key], args=[holder, max(int(ttl_s * 1000), 1)])
        return None if other is None else _text(other)

    def renew(self, run_id: str, shard: int, holder: str, ttl_s: float) -> bool:
        """Extend a held lease; False when ``holder`` no longer holds it."""
        key = BULK_LEASE_KEY.format(run_id=run_id, shard=shard)
        return bool(self._renew(keys=[key], args=[holder, max(int(ttl_s * 1000), 1)]))

    def release(self, run_id: str, shard: int, holder: str) -> None:
        """Give a lease back (only ``holder``'s own)."""
        self._renew(keys=[BULK_LEASE_KEY.format(run_id=run_id, shard=shard)], args=[holder, 0])

    def reopen(self, run_id: str, shard: int, counts: dict[str, int]) -> bool:
        """Make a done shard not done, taking its counters back out of the run (its failed
        items are about to be captioned again); False when it was not done."""
        args: list[Any] = [shard]
        for name in COUNTERS:
            args += [name, int(counts.get(name, 0))]
        run_key, done_key, _ = self._keys(run_id)
        keys = [run_key, done_key, self._retry_key(run_id)]
        return bool(self._reopen(keys=keys, args=args))

    def resume(self, run_id: str) -> list[int]:
        """Set the run running again and return the shards to send again: those already
        sent that are neither done nor leased (their worker is gone, or the run was
        cancelled before they ran), then new ones up to the run's window."""
        run_key, done_key, _ = self._keys(run_id)
        pipe = self._client.pipeline()
        pipe.hset(run_key, "state", RUNNING)
        pipe.hdel(run_key, "finished_at", "cancelled_at")
        pipe.hget(run_key, "next_shard")
        pipe.hget(run_key, "window")
        pipe.get(done_key)
        _, _, sent, window, bitmap = pipe.execute()
        sent = int(sent or 0)
        orphans = [shard for shard in range(sent) if not _bit(bitmap, shard)]
        leased = self._leased(run_id, orphans)
        resend = [shard for shard in orphans if shard not in leased]
        # Top the window up: a chain cut short (a worker died between counting a shard and
        # sending the next) leaves fewer shards in flight than the run asked for.
        missing = int(window or 1) - len(orphans)
        if missing > 0:
            resend += self.claim(run_id, missing)
        return resend

    def claim(self, run_id: str, count: int) -> list[int]:
        """Claim up to ``count`` shards not yet sent (nor done) for sending."""
        run_key, done_key, _ = self._keys(run_id)
        return [int(n) for n in self._claim(keys=[run_key, done_key], args=[count])]

    def _leased(self, run_id: str, shards: list[int]) -> set[int]:
        pipe = self._client.pipeline()
        for shard in shards:
            pipe.exists(BULK_LEASE_KEY.format(run_id=run_id, shard=shard))
        return {shard for shard, held in zip(shards, pipe.execute(), strict=True) if held}

    def restore(
        self,
        run_id: str,
        *,
        output: str,
        queue: str,
        counts: dict[str, int],
        window: int,
        done: dict[int, ShardCounts],
        started_at: float | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        """Record a run Redis lost, from its files: ``done`` holds the counters of the shards
        whose output exists. One transaction, so a shard finishing meanwhile is counted on
        top of it, never overwritten. Nothing is sent yet: ``resume`` fills the window."""
        total = sum(done.values(), ShardCounts())
        record = self._record(
            output=output, queue=queue, counts=counts, window=window, next_shard=0,
            started_at=started_at, max_new_tokens=max_new_tokens,
        )  # fmt: skip
        record.update(shards_done=len(done), **total.to_json())
        run_key, done_key, progress_key = self._keys(run_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(run_key, done_key, progress_key, self._retry_key(run_id))
        pipe.hset(run_key, mapping=record)
        for shard in done:
            pipe.setbit(done_key, shard, 1)
        pipe.sadd(BULK_RUNS_KEY, run_id)
        pipe.execute()

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


def _bit(bitmap: bytes | None, n: int) -> bool:
    """Bit ``n`` of a Redis bitmap read with GET (bit 0 is the first byte's high bit)."""
    if not bitmap or n // 8 >= len(bitmap):
        return False
    return bool(bitmap[n // 8] & (0x80 >> (n % 8)))


def redis_for(settings: Settings, timeout_s: float = 30.0, **options: Any) -> Any:
    """A client for the result-backend Redis, where runs are recorded (TLS verified as the
    worker verifies it; ``options`` go to redis-py); ConfigError when the result backend is
    not Redis."""
    if not is_redis_url(settings.result_backend):
        raise ConfigError(
            "bulk runs keep their state in Redis: CAPTION_RESULT_BACKEND must be redis://, "
            "rediss:// or unix://"
        )
    return redis_client(
        settings.result_backend, settings.redis_ca_certs, timeout_s=timeout_s, **options
    )
