"""Worker liveness: a heartbeat every few seconds, and what happens when one stops.

Every worker process beats into one sorted set (worker id -> Redis server time of its last
beat, so hosts' clocks never matter). A worker whose beat is older than ``dead_after_s`` is
dead: the first live worker to claim it (an atomic script, so exactly one does) fences it
and hands its work to ``on_dead``. Crash recovery restores its broker deliveries this way;
bulk shard leases can hang off the same beat.

Two guards keep a live worker's work where it is:
- The beat runs in its own thread, apart from the model thread, so a slow batch never
  silences it.
- A worker claims others only after ``STEADY_BEATS`` beats in a row succeeded: after a
  Redis outage every worker's last beat is old, and the first one back must give the rest
  time to beat again before it judges them.
A worker that was declared dead while merely stalled (stopped by a debugger, frozen VM)
finds its fence at its next beat and calls ``on_fenced``: its work now runs elsewhere, so
it must not acknowledge any of it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from worker.queue.keys import DEAD_KEY, FENCE_KEY, LIVENESS_TTL_S, WORKERS_KEY

log = logging.getLogger(__name__)

#: Consecutive successful beats before this worker may declare others dead.
STEADY_BEATS = 3

# Both scripts read the server's TIME and then write. Redis before 7 refuses writes after a
# non-deterministic command unless the script asks for effect replication first; on 7 the
# call is a no-op (effects are always replicated).

# KEYS: the workers set, this worker's fence. ARGV: worker id. -1 when fenced.
_BEAT = """
redis.replicate_commands()
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
return 1
"""

# KEYS: the workers set, the dead set, the candidate's fence. ARGV: candidate id, dead
# after (s), fence TTL (s). 1 when the candidate was declared dead by this call; 0 when it
# beat again in the meantime or another worker declared it first.
_DECLARE = """
redis.replicate_commands()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if now - tonumber(score) < tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WorkerRegistry:
    """The live-worker set in one Redis, seen from one worker."""

    def __init__(self, client: Any, worker_id: str, dead_after_s: float) -> None:
        self.client = client
        self.worker_id = worker_id
        self.dead_after_s = dead_after_s
        self._beat = client.register_script(_BEAT)
        self._declare = client.register_script(_DECLARE)

    def beat(self) -> bool:
        """Record a beat now; False when this worker has been fenced (declared dead)."""
        fence = FENCE_KEY.format(worker=self.worker_id)
        return int(self._beat(keys=[WORKERS_KEY, fence], args=[self.worker_id])) == 1

    def last_beats(self) -> dict[str, float]:
        """Every registered worker's last beat, in Redis server seconds."""
        beats = self.client.zrange(WORKERS_KEY, 0, -1, withscores=True)
        return {_text(worker): float(at) for worker, at in beats}

    def stale(self) -> list[str]:
        """Other workers whose last beat is older than ``dead_after_s``."""
        seconds, micros = self.client.time()
        cutoff = seconds + micros / 1e6 - self.dead_after_s
        found = self.client.zrangebyscore(WORKERS_KEY, "-inf", f"({cutoff}")
        return [w for w in map(_text, found) if w != self.worker_id]

    def declare_dead(self, worker_id: str) -> bool:
        """Move a still-silent ``worker_id`` to the dead set and fence it (exactly once)."""
        fence = FENCE_KEY.format(worker=worker_id)
        args = [worker_id, self.dead_after_s, LIVENESS_TTL_S]
        return int(self._declare(keys=[WORKERS_KEY, DEAD_KEY, fence], args=args)) == 1

    def dead(self) -> list[str]:
        """Workers declared dead whose work has not been handed back yet."""
        return [_text(w) for w in self.client.zrange(DEAD_KEY, 0, -1)]

    def buried(self, worker_id: str) -> None:
        """``worker_id``'s work is handed back: forget it."""
        self.client.zrem(DEAD_KEY, worker_id)

    def leave(self) -> None:
        """Remove this worker from the set (a clean stop: nothing of it needs restoring)."""
        self.client.zrem(WORKERS_KEY, self.worker_id)


class Heartbeat:
    """A daemon thread that beats, keeps ``on_beat`` hooks in step, and finds the dead.

    ``on_beat`` hooks run after each successful beat (a worker's held deliveries are
    synced there). ``on_dead(worker_id)`` hands a dead worker's work back; it must be
    idempotent, because a hand-back cut short (this worker died too) is taken up again by
    whichever live worker reaps next, and two may reap at once. ``on_fenced`` runs when
    this worker finds it was declared dead.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        interval_s: float,
        *,
        on_dead: Callable[[str], object],
        on_fenced: Callable[[], None],
        on_beat: list[Callable[[], None]] | None = None,
    ) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self._on_dead = on_dead
        self._on_fenced = on_fenced
        self._on_beat = list(on_beat or [])
        self._stop = threading.Event()
        self._steady = 0
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Beat once now (so the worker is registered before it takes work), then go on."""
        self.tick()
        self._thread.start()
        return self

    def stop(self, *, leave: bool = True) -> None:
        """Stop beating; ``leave`` removes this worker from the set (a clean shutdown)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)
        if leave:
            try:
                self.registry.leave()
            except RedisError as exc:
                log.warning("could not deregister worker %s: %s", self.registry.worker_id, exc)

    def tick(self) -> None:
        """One beat, its hooks, and (once contact is steady) the search for dead workers."""
        try:
            alive = self.registry.beat()
        except RedisError as exc:
            self._steady = 0
            log.warning("heartbeat failed: %s", exc)
            return
        if not alive:
            self._stop.set()
            self._on_fenced()
            return
        self._steady += 1
        for hook in self._on_beat:
            self._guarded(hook)
        if self._steady >= STEADY_BEATS:
            self._guarded(self._reap)

    def _reap(self) -> None:
        for worker_id in self.registry.stale():
            if self.registry.declare_dead(worker_id):
                log.warning("worker %s stopped beating: handing its work back", worker_id)
        for worker_id in self.registry.dead():
            self._on_dead(worker_id)
            self.registry.buried(worker_id)

    def _guarded(self, step: Callable[[], None]) -> None:
        # A failed hook must not stop the beat: a live worker that stops beating loses its
        # deliveries to others.
        try:
            step()
        except RedisError as exc:
            log.warning("heartbeat step %s failed: %s", getattr(step, "__name__", step), exc)
        except Exception:
            log.exception("heartbeat step %s failed", getattr(step, "__name__", step))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()
