"""Heartbeat, fencing and delivery hand-back against a real (private) Redis and kombu.

Each test runs its own redis-server: the worker set is one global key, and a test that
declared the shared server's workers dead would hand back other tests' tasks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from worker.devtools.redis_server import RedisServer
from worker.ops.heartbeat import STEADY_BEATS, Heartbeat, WorkerRegistry
from worker.queue.keys import DEAD_KEY, HELD_KEY, WORKERS_KEY
from worker.queue.recovery import DeliveryRestorer, HeldDeliveries

QUEUE = "liveness-test"


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture()
def client(server: RedisServer) -> redis.Redis:
    return server.client()


def registry(client: redis.Redis, worker_id: str, dead_after_s: float = 1.0) -> WorkerRegistry:
    return WorkerRegistry(client, worker_id, dead_after_s)


def test_a_silent_worker_is_declared_dead_once_and_fenced(client: redis.Redis) -> None:
    a, b, c = (registry(client, name) for name in ("a/1", "b/2", "c/3"))
    assert a.beat() and b.beat() and c.beat()
    assert b.stale() == [] and set(b.last_beats()) == {"a/1", "b/2", "c/3"}

    time.sleep(1.2)
    assert b.beat() and c.beat()  # only a is silent
    assert b.stale() == ["a/1"] and c.stale() == ["a/1"]
    assert b.declare_dead("a/1") is True
    assert c.declare_dead("a/1") is False, "a second worker must not declare it again"
    assert b.dead() == ["a/1"] and set(b.last_beats()) == {"b/2", "c/3"}

    # a was only stalled: its next beat finds the fence and does not re-register it.
    assert a.beat() is False
    assert "a/1" not in b.last_beats()
    b.buried("a/1")
    assert client.zcard(DEAD_KEY) == 0


def test_a_worker_that_beat_again_is_not_declared_dead(client: redis.Redis) -> None:
    a, b = registry(client, "a/1"), registry(client, "b/2")
    a.beat()
    time.sleep(1.2)
    stale = b.stale()
    a.beat()  # a beats between b's look and b's claim
    assert stale == ["a/1"]
    assert b.declare_dead("a/1") is False
    assert a.beat() is True


def test_heartbeat_hands_back_the_dead_only_after_steady_contact(client: redis.Redis) -> None:
    dead: list[str] = []
    registry(client, "gone/1").beat()
    time.sleep(1.2)
    heartbeat = Heartbeat(
        registry(client, "live/2"), 60, on_dead=dead.append, on_fenced=lambda: None
    )
    for _ in range(STEADY_BEATS - 1):
        heartbeat.tick()
    assert dead == [], "a worker just back in contact must give others time to beat"
    heartbeat.tick()
    assert dead == ["gone/1"]
    heartbeat.tick()
    assert dead == ["gone/1"], "a worker is handed back once"
    assert client.zrange(WORKERS_KEY, 0, -1) == [b"live/2"]


def test_heartbeat_thread_keeps_beating_and_leaves_on_stop(client: redis.Redis) -> None:
    heartbeat = Heartbeat(
        registry(client, "w/1"), 0.1, on_dead=lambda _: None, on_fenced=lambda: None
    ).start()
    first = client.zscore(WORKERS_KEY, "w/1")
    time.sleep(0.5)
    later = client.zscore(WORKERS_KEY, "w/1")
    heartbeat.stop()
    assert first is not None and later is not None and later > first
    assert client.zscore(WORKERS_KEY, "w/1") is None


def test_a_fenced_heartbeat_stops_and_reports(client: redis.Redis) -> None:
    fenced: list[bool] = []
    stalled = registry(client, "stalled/1")
    stalled.beat()
    time.sleep(1.2)
    other = registry(client, "other/2")
    other.beat()
    assert other.declare_dead("stalled/1")
    heartbeat = Heartbeat(
        stalled, 60, on_dead=lambda _: None, on_fenced=lambda: fenced.append(True)
    )
    heartbeat.tick()
    assert fenced == [True]


# --- held deliveries and hand-back through kombu ---------------------------------------------


def test_held_deliveries_follow_what_the_worker_holds(client: redis.Redis) -> None:
    holding: set[str] = set()
    held = HeldDeliveries(client, "w/1", lambda: set(holding))
    key = HELD_KEY.format(worker="w/1")

    held.received("t1")  # arrived; the worker's state does not list it yet
    held.sync()
    assert client.smembers(key) == {b"t1"}, "a tag just received survives one sync"
    holding.update({"t1", "t2"})  # t2 reached the state without a received() call
    held.sync()
    assert client.smembers(key) == {b"t1", b"t2"}
    holding.discard("t1")  # t1 finished
    held.sync()
    assert client.smembers(key) == {b"t1", b"t2"}, "kept until gone two syncs in a row"
    held.sync()
    assert client.smembers(key) == {b"t2"}
    held.clear()
    assert not client.exists(key)


def _publish(connection: Connection, body: dict[str, Any]) -> None:
    exchange = Exchange(QUEUE, type="direct")
    queue = Queue(QUEUE, exchange, routing_key=QUEUE)
    with connection.Producer() as producer:
        producer.publish(body, exchange=exchange, routing_key=QUEUE, declare=[queue])


def test_restorer_requeues_only_unacknowledged_deliveries_once(server: RedisServer) -> None:
    url = f"{server.url}/0"
    with Connection(url) as consumer_conn, Connection(url) as restorer_conn:
        for n in range(3):
            _publish(consumer_conn, {"n": n})
        queue = consumer_conn.SimpleQueue(QUEUE)
        taken = [queue.get(timeout=5) for _ in range(3)]
        taken[0].ack()  # finished before its worker died
        client = server.client()
        held = HeldDeliveries(client, "dead/1", set)
        for message in taken:
            held.received(message.delivery_tag)
        assert client.llen(QUEUE) == 0 and client.hlen("unacked") == 2

        channel = restorer_conn.default_channel
        with channel.conn_or_acquire() as restorer_client:
            pass
        restore = DeliveryRestorer(channel, restorer_client)
        assert restore("dead/1") == 2
        assert restore("dead/1") == 0, "a second hand-back finds nothing to restore"
        # A hand-back cut short (the set survived) and run again by another worker:
        for message in taken:
            held.received(message.delivery_tag)
        assert restore("dead/1") == 0

        assert client.llen(QUEUE) == 2 and client.hlen("unacked") == 0
        again = [queue.get(timeout=5) for _ in range(2)]
        assert sorted(m.payload["n"] for m in again) == [1, 2]
        assert all(m.delivery_info.get("redelivered") for m in again)
        for message in again:
            message.ack()
        assert not client.exists(HELD_KEY.format(worker="dead/1"))
        queue.close()
