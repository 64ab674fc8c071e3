"""The exporter's collector against a private redis-server, with messages a real Celery producer
sent and a real kombu consumer took without acknowledging.

What an operator reads on ``/metrics`` must be what Redis holds: waiting is the sum of the
queue's lists, reserved is the queue's share of kombu's ``unacked`` hash, and the oldest age
and the work follow the messages' headers and arguments. An unreachable Redis is a scrape
that answers ``caption_exporter_up 0``, never an exception.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Queue
from prometheus_client.parser import text_string_to_metric_families

from worker.bulk.state import RunState
from worker.bulk.work import BulkRunsSource
from worker.client import SENT_AT_HEADER
from worker.devtools.loopback import free_port
from worker.devtools.redis_server import RedisServer
from worker.ops.exporter import (
    DEFAULT_TOKENS_PER_SECOND,
    ExporterOptions,
    QueueCollector,
    TokenPolicy,
    broker_client,
    exporter_registry,
    serve_exporter,
)
from worker.queue.keys import RATES_KEY, UNACKED_KEY, queue_lists
from worker.settings import Settings

QUEUE, OTHER = "exporter-captions", "exporter-other"
RUN_ID = "20260101-000000-aaaaaa"
POLICY = TokenPolicy(default=512, limit=4096)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        yield server


@pytest.fixture()
def broker(server: RedisServer) -> redis.Redis:
    return server.client(0)


@pytest.fixture()
def producer(server: RedisServer) -> Iterator[Celery]:
    app = Celery("exporter-producer", broker=f"{server.url}/0")
    app.conf.update(task_serializer="json", accept_content=["json"])
    yield app
    app.close()


def send(
    producer: Celery,
    queue: str,
    sent_at: float | None = None,
    priority: int | None = None,
    **kwargs: Any,
) -> str:
    """A caption task sent as a producer sends it; the header only when ``sent_at`` is set.

    kombu's Redis transport puts a message with a priority in one of the queue's extra lists.
    """
    headers = {SENT_AT_HEADER: sent_at} if sent_at is not None else {}
    result = producer.send_task(
        "caption",
        kwargs={"image": "s3://photos/cat.jpg", **kwargs},
        queue=queue,
        headers=headers,
        priority=priority,
    )
    return str(result.id)


def take(conn: Connection, queue: str, count: int) -> None:
    """A kombu consumer takes ``count`` messages and does not acknowledge them.

    They stay in kombu's unacked hash while ``conn`` is open (closing it hands them back).
    """
    bound = Queue(queue, routing_key=queue)(conn.default_channel)
    for _ in range(count):
        assert bound.get(no_ack=False) is not None


def in_redis(broker: redis.Redis, queue: str) -> tuple[int, list[dict[str, Any]]]:
    """What Redis holds for ``queue``: messages in its lists, and its unacked messages."""
    waiting = sum(int(broker.llen(name)) for name in queue_lists(queue))
    entries = [json.loads(v) for v in broker.hvals(UNACKED_KEY)]
    return waiting, [message for message, _, key in entries if key == queue]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(collector: QueueCollector) -> Samples:
    """One scrape through a registry, as the HTTP endpoint does it: every sample it gave."""
    registry = exporter_registry(collector)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture()
def loaded(server: RedisServer, producer: Celery) -> Iterator[dict[str, float]]:
    """Both queues loaded: base and priority lists, with and without headers; some taken
    by a consumer that holds them for the whole test.

    Yields each stamped message's send time by task id.
    """
    now = time.time()
    stamps: dict[str, float] = {}
    for i in range(12):
        at = now - 100 + i
        stamps[send(producer, QUEUE, at, max_new_tokens=8 * (i + 1))] = at
    send(producer, QUEUE)  # no header, default tokens
    for i in range(3):  # priority lists
        at = now - 200 + i
        stamps[send(producer, QUEUE, at, max_new_tokens=64, priority=9)] = at
    for _ in range(5):
        send(producer, OTHER, now - 1_000, max_new_tokens=1_000)
    with Connection(f"{server.url}/0") as conn:
        take(conn, QUEUE, 4)
        take(conn, OTHER, 2)
        yield stamps


def test_waiting_and_reserved_are_what_redis_holds(
    server: RedisServer, broker: redis.Redis, loaded: dict[str, float]
) -> None:
    collector = QueueCollector(broker, ExporterOptions((QUEUE, OTHER)), POLICY)
    samples = scrape(collector)

    for queue in (QUEUE, OTHER):
        waiting, reserved = in_redis(broker, queue)
        assert value(samples, "caption_queue_waiting", queue=queue) == waiting
        assert value(samples, "caption_queue_reserved", queue=queue) == len(reserved)
    assert value(samples, "caption_queue_waiting", queue=QUEUE) == 16 - 4
    assert value(samples, "caption_queue_reserved", queue=QUEUE) == 4
    assert sum(int(broker.llen(name)) for name in queue_lists(QUEUE)[1:]) == 3, "priority lists"
    assert value(samples, "caption_exporter_up") == 1.0
    assert value(samples, "caption_exporter_scrape_errors_total") == 0.0


def test_oldest_age_and_work_follow_the_messages(
    server: RedisServer, broker: redis.Redis, loaded: dict[str, float]
) -> None:
    now = time.time()
    collector = QueueCollector(broker, ExporterOptions((QUEUE,)), POLICY, clock=lambda: now)
    samples = scrape(collector)

    _, reserved = in_redis(broker, QUEUE)
    taken = {message["headers"]["id"] for message in reserved}
    oldest = min(at for task, at in loaded.items() if task not in taken)
    assert value(samples, "caption_queue_oldest_age_seconds", queue=QUEUE) == pytest.approx(
        now - oldest
    )
    # Every message was costed (16 < the sample): the work is the sum of requested tokens,
    # the unstamped one at the default, waiting and reserved alike.
    tokens = sum(8 * (i + 1) for i in range(12)) + 512 + 3 * 64
    assert value(samples, "caption_queue_sampled_messages", queue=QUEUE) == 12
    assert value(samples, "caption_queued_work_seconds", queue=QUEUE) == pytest.approx(
        tokens / DEFAULT_TOKENS_PER_SECOND
    )
    assert value(samples, "caption_worker_tokens_per_second") == DEFAULT_TOKENS_PER_SECOND
    assert value(samples, "caption_exporter_rate_source", source="default") == 1.0
    assert value(samples, "caption_exporter_rate_source", source="measured") == 0.0


def test_measured_worker_rates_replace_the_default(
    broker: redis.Redis, loaded: dict[str, float]
) -> None:
    now = time.time()
    reports = {"gpu0@a": (200.0, now - 2), "gpu1@a": (400.0, now - 9), "gone@b": (5.0, now - 900)}
    for worker, (rate, at) in reports.items():
        broker.hset(RATES_KEY, worker, json.dumps({"generated_tokens_per_second": rate, "at": at}))
    samples = scrape(QueueCollector(broker, ExporterOptions((QUEUE,)), POLICY))

    assert value(samples, "caption_worker_tokens_per_second") == 300.0  # median of the fresh two
    assert value(samples, "caption_exporter_rate_source", source="measured") == 1.0
    assert value(samples, "caption_exporter_rate_source", source="default") == 0.0
    assert value(samples, "caption_exporter_rate_reports") == 2.0
    tokens = sum(8 * (i + 1) for i in range(12)) + 512 + 3 * 64
    assert value(samples, "caption_queued_work_seconds", queue=QUEUE) == pytest.approx(
        tokens / 300.0
    )


def test_a_long_queue_is_costed_from_a_sample_scaled_to_its_length(
    broker: redis.Redis, producer: Celery
) -> None:
    for i in range(60):
        send(producer, QUEUE, time.time(), max_new_tokens=16, priority=9 if i % 4 == 0 else None)
    samples = scrape(QueueCollector(broker, ExporterOptions((QUEUE,), sample=6), POLICY))

    # 45 in the base list, 15 in a priority list: 6 shared in proportion, 4 + 1.
    assert value(samples, "caption_queue_sampled_messages", queue=QUEUE) == 5
    assert value(samples, "caption_queue_waiting", queue=QUEUE) == 60
    assert value(samples, "caption_queued_work_seconds", queue=QUEUE) == pytest.approx(
        60 * 16 / DEFAULT_TOKENS_PER_SECOND
    )


def test_an_empty_queue_reports_zeros(broker: redis.Redis) -> None:
    samples = scrape(QueueCollector(broker, ExporterOptions((QUEUE,)), POLICY))
    for name in (
        "caption_queue_waiting",
        "caption_queue_reserved",
        "caption_queue_oldest_age_seconds",
        "caption_queued_work_seconds",
    ):
        assert value(samples, name, queue=QUEUE) == 0.0, name


def test_redis_going_away_is_up_0_and_coming_back_is_up_1(
    server: RedisServer, broker: redis.Redis, loaded: dict[str, float]
) -> None:
    client = broker_client(Settings(broker_url=f"{server.url}/0"))
    collector = QueueCollector(client, ExporterOptions((QUEUE,)), POLICY)
    assert value(scrape(collector), "caption_exporter_up") == 1.0

    server.stop()
    for errors in (1.0, 2.0):
        started = time.monotonic()
        samples = scrape(collector)
        assert time.monotonic() - started < 1.0, "a down broker must fail the scrape at once"
        assert value(samples, "caption_exporter_up") == 0.0
        assert value(samples, "caption_exporter_scrape_errors_total") == errors
        # The queue series are absent, not 0: an autoscaler must not read "empty".
        assert value(samples, "caption_queue_waiting", queue=QUEUE) is None
        assert value(samples, "caption_queued_work_seconds", queue=QUEUE) is None

    server.start()  # no AOF: it comes back empty
    samples = scrape(collector)
    assert value(samples, "caption_exporter_up") == 1.0
    assert value(samples, "caption_queue_waiting", queue=QUEUE) == 0.0
    assert value(samples, "caption_exporter_scrape_errors_total") == 2.0


def test_the_endpoint_answers_200_with_up_0_when_redis_is_unreachable() -> None:
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    server = serve_exporter(settings, ExporterOptions((QUEUE,), port=free_port()))
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=15) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        server.close()
    samples = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert samples["caption_exporter_up"] == 0.0
    assert samples["caption_exporter_scrape_errors_total"] == 1.0
    assert "caption_queue_waiting" not in samples


def test_a_bulk_queue_is_costed_by_its_runs_remaining_items_not_its_messages(
    server: RedisServer, broker: redis.Redis, producer: Celery
) -> None:
    bulk = "exporter-bulk"
    results = server.client(1)
    state = RunState(results)
    counts = {"total": 1_000, "to_caption": 900, "skipped": 100, "shards": 9}
    for shard in state.create(
        RUN_ID, output="s3://b/r/", queue=bulk, counts=counts, window=4, max_new_tokens=64
    ):
        producer.send_task(
            "caption_bulk_shard", kwargs={"run_id": RUN_ID, "shard": shard, "run_uri": "x"},
            queue=bulk,
        )  # fmt: skip
    # Another run on another queue, and a finished one on this queue, cost nothing here.
    state.create("20260101-000000-bbbbbb", output="s3://b/o/", queue="other", counts=counts,
                 window=1, max_new_tokens=64)  # fmt: skip
    state.create("20260101-000000-cccccc", output="s3://b/d/", queue=bulk,
                 counts={**counts, "shards": 0}, window=1)  # fmt: skip
    options = ExporterOptions((bulk,), sources=(BulkRunsSource(results, default_tokens=512),))

    def work() -> float | None:
        return value(
            scrape(QueueCollector(broker, options, POLICY)),
            "caption_queued_work_seconds",
            queue=bulk,
        )

    assert in_redis(broker, bulk)[0] == 4
    # 900 items to go at the run's max_new_tokens; the 4 shard messages add nothing.
    assert work() == pytest.approx(900 * 64 / DEFAULT_TOKENS_PER_SECOND)
    # 100 captioned at 10 tokens each (a checkpoint of a running shard counts): the rest is
    # costed at what the run actually generates.
    state.checkpoint(RUN_ID, 0, {"succeeded": 100, "failed": 0, "prompt_tokens": 0,
                                 "generated_tokens": 1_000})  # fmt: skip
    assert work() == pytest.approx(800 * 10 / DEFAULT_TOKENS_PER_SECOND)
    state.cancel(RUN_ID)
    assert work() == 0.0
