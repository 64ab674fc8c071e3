"""``caption-worker exporter``: the queue-side scaling signal, read from the broker at each scrape.

One exporter runs per deployment (not per worker) and serves Prometheus on ``/metrics``. It
holds no state between scrapes: every scrape reads the Redis broker (a custom Collector, not
a polling loop), so a number is never older than the scrape that reported it.

For each queue it reports what is waiting (kombu's Redis lists for the queue), what workers
have taken but not acknowledged (kombu's ``unacked`` hash), the age of the oldest waiting
message (from its ``caption_sent_at`` header), and the queued and reserved work in
GPU-seconds of one worker: requested tokens over the generated-tokens-per-second rate that
workers report in ``RATES_KEY`` (their median), or a conservative default when none has.

The module is layered for testing: ``parse_message``, ``allocate_sample``,
``queue_figures`` and ``select_rate`` turn raw Redis data into figures and touch no socket;
``read_broker`` is the only Redis I/O; ``QueueCollector`` turns one reading into metric
families; ``run_exporter`` serves them. docs/exporter.md has the metrics and the formulas.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, Literal, Protocol

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.client import SENT_AT_HEADER
from worker.contract import DEFAULT_MAX_NEW_TOKENS, SHARD_TASK_NAME
from worker.errors import ConfigError
from worker.ops.http import OpsServer
from worker.queue.keys import RATES_KEY, UNACKED_KEY, queue_lists
from worker.settings import Settings
from worker.storage.redis_client import redis_client

log = logging.getLogger(__name__)

DEFAULT_PORT = 9640
#: Messages costed per queue and scrape; beyond this the token sum is scaled up.
DEFAULT_SAMPLE = 1_000
#: Generated tokens per second of one worker when no worker has reported a fresh rate.
#: Conservative on purpose (a low rate asks for more workers, never fewer): the default
#: model (Qwen3-VL-32B shape, SDNQ uint4, batches of 32, 128 tokens) measured 118 tokens/s
#: on an H100 (docs/batching.md), rounded down.
DEFAULT_TOKENS_PER_SECOND = 100.0
#: A worker's reported rate counts while its ``at`` is this close to now.
RATE_MAX_AGE_S = 300.0
#: Socket timeouts for the broker: a hung Redis fails the scrape well inside Prometheus's
#: default 10 s scrape timeout instead of hanging it.
REDIS_TIMEOUT_S = 5.0

RateSource = Literal["measured", "default"]
RATE_SOURCES: tuple[RateSource, ...] = ("measured", "default")


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """What the exporter needs from one broker message.

    ``parsed`` is False when the task's arguments could not be read (not JSON, compressed,
    another serializer, a damaged body); such a message still counts, at the default cost.
    """

    parsed: bool
    max_new_tokens: int | None = None  # the kwarg as sent, when it is an integer
    sent_at: float | None = None  # the producer's ``caption_sent_at`` header
    routing_keys: frozenset[str] = frozenset()
    task: str | None = None  # the task name header


UNPARSED = Message(parsed=False)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _timestamp(value: object) -> float | None:
    """A Unix time from a JSON header value, or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _task_kwargs(envelope: dict[str, Any]) -> dict[str, Any] | None:
    """The task's keyword arguments from a kombu envelope, or None if they cannot be read.

    Celery protocol 2 bodies are ``[args, kwargs, embed]``; protocol 1 bodies are a dict with
    ``kwargs``. kombu's Redis transport stores the body base64-encoded.
    """
    headers = _dict(envelope.get("headers"))
    properties = _dict(envelope.get("properties"))
    body = envelope.get("body")
    # Compressed or non-JSON bodies (pickle, msgpack) are not read: this process runs no
    # deserializer it does not need.
    if envelope.get("content-type") != "application/json" or headers.get("compression"):
        return None
    if not isinstance(body, str):
        return None
    try:
        if properties.get("body_encoding") == "base64":
            encoding = str(envelope.get("content-encoding") or "utf-8")
            body = base64.b64decode(body, validate=True).decode(encoding)
        payload = json.loads(body)
    except (ValueError, LookupError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    if isinstance(payload, list) and len(payload) == 3 and isinstance(payload[1], dict):
        return payload[1]
    if isinstance(payload, dict) and isinstance(payload.get("kwargs"), dict):
        return dict(payload["kwargs"])
    return None


def _from_envelope(envelope: dict[str, Any], extra_routing_key: object = None) -> Message:
    headers = _dict(envelope.get("headers"))
    delivery_info = _dict(_dict(envelope.get("properties")).get("delivery_info"))
    keys = {k for k in (delivery_info.get("routing_key"), extra_routing_key) if isinstance(k, str)}
    sent_at = _timestamp(headers.get(SENT_AT_HEADER))
    task = headers.get("task") if isinstance(headers.get("task"), str) else None
    kwargs = _task_kwargs(envelope)
    if kwargs is None:
        return Message(parsed=False, sent_at=sent_at, routing_keys=frozenset(keys), task=task)
    tokens = kwargs.get("max_new_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        tokens = None
    return Message(True, tokens, sent_at, frozenset(keys), task)


def _json(raw: bytes | str) -> object:
    try:
        return json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None


def parse_message(raw: bytes | str) -> Message:
    """A message as kombu's Redis transport stores it in a queue list; never raises."""
    envelope = _json(raw)
    return _from_envelope(envelope) if isinstance(envelope, dict) else UNPARSED


def parse_unacked(raw: bytes | str) -> Message | None:
    """A value of kombu's ``unacked`` hash (JSON ``[message, exchange, routing_key]``).

    None when not even its routing key can be read: it cannot be assigned to a queue.
    """
    entry = _json(raw)
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    envelope, _exchange, routing_key = entry
    message = _from_envelope(_dict(envelope), routing_key)
    return message if message.routing_keys else None


@dataclass(frozen=True)
class TokenPolicy:
    """How many tokens a message asks for, as the worker's ``parse_request`` decides it."""

    default: int  # what a task without ``max_new_tokens`` (or with null) gets
    limit: int  # CAPTION_MAX_NEW_TOKENS_LIMIT

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenPolicy:
        """The policy of workers configured like this process (``parse_request``'s rule)."""
        limit = settings.max_new_tokens_limit
        return cls(default=min(DEFAULT_MAX_NEW_TOKENS, limit), limit=limit)

    def tokens(self, message: Message) -> int:
        """Requested tokens; the default for anything a worker would not accept as given.

        A request over the limit fails at once on a worker; it is costed at the default
        rather than trusted, so one bad producer cannot inflate the scaling signal. A bulk
        shard message costs nothing here: its run's remaining items are a ``WorkSource``
        (``worker.bulk.work``), costed by what the run has left rather than per message.
        """
        if message.task == SHARD_TASK_NAME:
            return 0
        requested = message.max_new_tokens
        if requested is None or not 1 <= requested <= self.limit:
            return self.default
        return requested


# --- figures from raw data ----------------------------------------------------------------


def allocate_sample(lengths: Sequence[int], budget: int) -> list[int]:
    """Messages to read from each list: all when they fit ``budget``, else shares of it.

    Each list's share is proportional to its length, and a non-empty list gets at least one
    (so its oldest message is seen); the total may then exceed ``budget`` by the number of
    lists (four per queue).
    """
    total = sum(lengths)
    if total <= budget:
        return list(lengths)
    return [min(n, max(1, budget * n // total)) if n else 0 for n in lengths]


def scaled_tokens(sampled: Sequence[int], waiting: int, default: int) -> float:
    """Tokens of ``waiting`` messages estimated from the costs of a sample of them.

    The sample's sum scaled by waiting / sampled; with no sample (the lists emptied between
    counting and reading), every waiting message costs the default.
    """
    if not sampled:
        return float(waiting * default)
    return sum(sampled) * waiting / len(sampled)


@dataclass(frozen=True)
class QueueFigures:
    """What one scrape reports for one queue."""

    queue: str
    waiting: int
    reserved: int
    oldest_age_s: float
    sampled: int
    unparsed: int  # sampled or reserved messages whose arguments could not be read
    work_tokens: float  # queued (estimated from the sample) plus reserved

    def work_seconds(self, tokens_per_second: float) -> float:
        """The work in GPU-seconds of one worker at ``tokens_per_second``."""
        return self.work_tokens / tokens_per_second


def queue_figures(
    queue: str,
    waiting: int,
    samples: Sequence[bytes | str],
    reserved: Sequence[Message],
    policy: TokenPolicy,
    now: float,
) -> QueueFigures:
    """Figures for one queue from its waiting count, a sample read from the oldest end of
    its lists, and its reserved (unacknowledged) messages.

    The oldest age comes from the sample, which holds each non-empty list's oldest
    messages; messages without a ``caption_sent_at`` header are skipped, and a clock behind
    the producer's counts as age 0.
    """
    sampled = [parse_message(raw) for raw in samples]
    sent = [m.sent_at for m in sampled if m.sent_at is not None]
    oldest_age = max(0.0, now - min(sent)) if sent and waiting else 0.0
    queued = scaled_tokens([policy.tokens(m) for m in sampled], waiting, policy.default)
    in_hand = sum(policy.tokens(m) for m in reserved)
    return QueueFigures(
        queue=queue,
        waiting=waiting,
        reserved=len(reserved),
        oldest_age_s=oldest_age,
        sampled=len(sampled),
        unparsed=sum(not m.parsed for m in [*sampled, *reserved]),
        work_tokens=queued + in_hand,
    )


def reserved_by_queue(
    unacked: Iterable[bytes | str], queues: Sequence[str]
) -> dict[str, list[Message]]:
    """kombu's unacked entries, grouped by the queue their routing key names.

    The hash is shared by every queue on the broker; entries of other queues (and ones whose
    routing key cannot be read) are left out.
    """
    grouped: dict[str, list[Message]] = {queue: [] for queue in queues}
    for raw in unacked:
        message = parse_unacked(raw)
        if message is None:
            continue
        for queue in queues:
            if queue in message.routing_keys:
                grouped[queue].append(message)
                break
    return grouped


@dataclass(frozen=True)
class RateChoice:
    """The generated-tokens-per-second rate the work is divided by, and where it came from."""

    tokens_per_second: float
    source: RateSource
    workers: int  # fresh worker reports behind a measured rate; 0 for the default


def select_rate(
    reports: Iterable[bytes | str],
    now: float,
    default: float,
    max_age_s: float = RATE_MAX_AGE_S,
) -> RateChoice:
    """The median of the workers' fresh reports (the values of ``RATES_KEY``), else
    ``default``. Fresh: ``at`` within ``max_age_s`` of now, either side, so a worker whose
    clock runs a little ahead still counts.

    Reports that are not JSON ``{"generated_tokens_per_second": > 0, "at": time}`` are
    ignored; a median keeps one worker on a slow or throttled GPU from steering the fleet.
    """
    fresh: list[float] = []
    for raw in reports:
        report = _dict(_json(raw))
        rate = _timestamp(report.get("generated_tokens_per_second"))
        at = _timestamp(report.get("at"))
        if rate is None or rate <= 0 or at is None:
            continue
        if abs(now - at) <= max_age_s:
            fresh.append(rate)
    if not fresh:
        return RateChoice(default, "default", 0)
    return RateChoice(float(statistics.median(fresh)), "measured", len(fresh))


# --- the broker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerReading:
    """Raw broker data for a scrape: counts, unacked entries and rates from one transaction,
    then a sample of each queue's messages."""

    waiting: dict[str, int]  # queue -> messages in all its lists
    samples: dict[str, list[bytes]]  # queue -> messages read from the oldest ends
    unacked: list[bytes]  # every value of kombu's unacked hash
    rates: dict[bytes, bytes]  # RATES_KEY: worker id -> JSON report


def read_broker(client: redis.Redis, queues: Sequence[str], sample: int) -> BrokerReading:
    """Read what the figures need in two round trips; raises ``redis.RedisError``.

    Counts, the unacked hash and the rates come from one MULTI/EXEC, so waiting and
    reserved are one instant's. The sample follows in a second round trip (its size depends
    on the counts); messages taken in between only make it smaller. kombu LPUSHes and
    BRPOPs, so the oldest messages are at the tail: ``LRANGE list -n -1``.
    """
    lists = {queue: queue_lists(queue) for queue in queues}
    pipe = client.pipeline(transaction=True)
    for names in lists.values():
        for name in names:
            pipe.llen(name)
    pipe.hvals(UNACKED_KEY)
    pipe.hgetall(RATES_KEY)
    *counts, unacked, rates = pipe.execute()
    replies = iter(counts)
    lengths = {queue: [int(next(replies)) for _ in names] for queue, names in lists.items()}

    pipe = client.pipeline(transaction=False)
    reads: list[str] = []
    for queue, names in lists.items():
        for name, take in zip(names, allocate_sample(lengths[queue], sample), strict=True):
            if take:
                pipe.lrange(name, -take, -1)
                reads.append(queue)
    samples: dict[str, list[bytes]] = {queue: [] for queue in queues}
    for queue, messages in zip(reads, pipe.execute() if reads else [], strict=True):
        samples[queue].extend(messages)
    return BrokerReading(
        waiting={queue: sum(n) for queue, n in lengths.items()},
        samples=samples,
        unacked=list(unacked),
        rates=dict(rates),
    )


def broker_client(settings: Settings) -> redis.Redis:
    """A client for the broker database: the worker's TLS verification, short timeouts."""
    if not settings.broker_is_redis:
        raise ConfigError(
            "caption-worker exporter reads kombu's Redis lists: CAPTION_BROKER_URL must be "
            "redis://, rediss:// or unix:// (for RabbitMQ, use its own Prometheus exporter)"
        )
    client: redis.Redis = redis_client(
        settings.broker_url,
        settings.redis_ca_certs,
        timeout_s=REDIS_TIMEOUT_S,
        health_check_interval=30,
        # No retries inside a scrape: redis-py's default backoff spends seconds on a down
        # server, and the next scrape is the retry.
        retry=Retry(NoBackoff(), 0),
    )
    return client


# --- more work than the broker holds --------------------------------------------------------


class WorkSource(Protocol):
    """Queued GPU work kept outside the broker's lists, in generated tokens.

    Bulk runs are one (``worker.bulk.work.BulkRunsSource``): their remaining items are added
    to the broker's work in ``caption_queued_work_seconds``. A source that raises fails
    the scrape like an unreachable broker (``caption_exporter_up`` 0).
    """

    def queued_tokens(self, client: Any, queue: str, now: float) -> float:
        """Tokens still to generate for ``queue``."""
        ...


# --- the collector ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExporterOptions:
    """What ``caption-worker exporter`` was asked to serve."""

    queues: tuple[str, ...]
    port: int = DEFAULT_PORT
    sample: int = DEFAULT_SAMPLE
    tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND
    sources: tuple[WorkSource, ...] = field(default=())


@dataclass(frozen=True)
class Scrape:
    """One successful scrape's figures."""

    queues: list[QueueFigures]
    rate: RateChoice


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class QueueCollector(Collector):
    """Reads the broker at every scrape and reports the queues' depth and work.

    When the broker cannot be read, only ``caption_exporter_up`` (0), the error counter and
    the scrape duration are reported: the queue series go absent rather than to 0, so an
    autoscaler keeps its last decision instead of scaling a busy fleet to zero.
    """

    def __init__(
        self,
        client: redis.Redis,
        options: ExporterOptions,
        policy: TokenPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._options = options
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()  # the HTTP server scrapes from one thread per request
        self._errors = 0
        self._failing = False

    @property
    def errors(self) -> int:
        """Scrapes that could not read the broker since start."""
        return self._errors

    def describe(self) -> Iterator[Metric]:
        """The families, without reading the broker (registration must not need Redis)."""
        yield from self._families(None, 0.0)

    def collect(self) -> Iterator[Metric]:
        """Read the broker now and report what it holds."""
        started = time.perf_counter()
        scrape = self.scrape()
        yield from self._families(scrape, time.perf_counter() - started)

    def scrape(self) -> Scrape | None:
        """This moment's figures, or None (counted and logged) when the broker fails."""
        try:
            scrape = self._read()
        except Exception as exc:  # a scrape answers whatever goes wrong; up=0 says so
            with self._lock:
                self._errors += 1
                first = not self._failing
                self._failing = True
            if first:
                log.warning(
                    "cannot read the broker, reporting caption_exporter_up 0: %s: %s",
                    type(exc).__name__,
                    exc,
                )
            return None
        with self._lock:
            recovered, self._failing = self._failing, False
        if recovered:
            log.info("the broker answers again")
        return scrape

    def _read(self) -> Scrape:
        options = self._options
        reading = read_broker(self._client, options.queues, options.sample)
        now = self._clock()
        reserved = reserved_by_queue(reading.unacked, options.queues)
        figures = []
        for queue in options.queues:
            base = queue_figures(
                queue,
                reading.waiting[queue],
                reading.samples[queue],
                reserved[queue],
                self._policy,
                now,
            )
            extra = sum(s.queued_tokens(self._client, queue, now) for s in options.sources)
            figures.append(replace(base, work_tokens=base.work_tokens + extra))
        rate = select_rate(reading.rates.values(), now, options.tokens_per_second)
        return Scrape(figures, rate)

    def _families(self, scrape: Scrape | None, seconds: float) -> Iterator[Metric]:
        up = _gauge("caption_exporter_up", "1 when this scrape read the broker, 0 when not.")
        up.add_metric([], 0.0 if scrape is None else 1.0)
        yield up
        errors = CounterMetricFamily(
            "caption_exporter_scrape_errors", "Scrapes that could not read the broker."
        )
        errors.add_metric([], float(self._errors))
        yield errors
        duration = _gauge(
            "caption_exporter_scrape_duration_seconds", "Time this scrape spent reading."
        )
        duration.add_metric([], seconds)
        yield duration
        yield from self._queue_families(scrape)
        yield from self._rate_families(scrape)

    def _queue_families(self, scrape: Scrape | None) -> Iterator[Metric]:
        specs: list[tuple[str, str, Callable[[QueueFigures, RateChoice], float]]] = [
            (
                "caption_queue_waiting",
                "Messages in the queue's Redis lists (base and priority), not yet delivered.",
                lambda f, _: f.waiting,
            ),
            (
                "caption_queue_reserved",
                "Messages delivered to a worker and not yet acknowledged (kombu's unacked).",
                lambda f, _: f.reserved,
            ),
            (
                "caption_queue_oldest_age_seconds",
                "Age of the oldest waiting message, from its caption_sent_at header; 0 if none.",
                lambda f, _: f.oldest_age_s,
            ),
            (
                "caption_queued_work_seconds",
                "Waiting and reserved work in GPU-seconds of one worker: requested tokens "
                "over caption_worker_tokens_per_second.",
                lambda f, r: f.work_seconds(r.tokens_per_second),
            ),
            (
                "caption_queue_sampled_messages",
                "Waiting messages costed this scrape; the token sum is scaled to all waiting.",
                lambda f, _: f.sampled,
            ),
            (
                "caption_queue_unparsed_messages",
                "Sampled or reserved messages whose arguments could not be read (costed at "
                "the default max_new_tokens).",
                lambda f, _: f.unparsed,
            ),
        ]
        for name, doc, value in specs:
            family = _gauge(name, doc, ["queue"])
            if scrape is not None:
                for figures in scrape.queues:
                    family.add_metric([figures.queue], float(value(figures, scrape.rate)))
            yield family

    def _rate_families(self, scrape: Scrape | None) -> Iterator[Metric]:
        rate = _gauge(
            "caption_worker_tokens_per_second",
            "Generated tokens per second of one worker that the work is divided by.",
        )
        source = _gauge(
            "caption_exporter_rate_source",
            "1 for where caption_worker_tokens_per_second came from: measured (median of the "
            "workers' fresh reports) or default (--tokens-per-second).",
            ["source"],
        )
        reports = _gauge(
            "caption_exporter_rate_reports", "Fresh worker rate reports behind the median."
        )
        if scrape is not None:
            rate.add_metric([], scrape.rate.tokens_per_second)
            for name in RATE_SOURCES:
                source.add_metric([name], 1.0 if scrape.rate.source == name else 0.0)
            reports.add_metric([], float(scrape.rate.workers))
        yield rate
        yield source
        yield reports


# --- the process ----------------------------------------------------------------------------


def exporter_registry(collector: QueueCollector) -> CollectorRegistry:
    """A registry with only the exporter's series (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry


def _always_ok() -> str | None:
    return None


def serve_exporter(settings: Settings, options: ExporterOptions) -> OpsServer:
    """Start serving ``/metrics`` (and ``/healthz``, ``/readyz``) on ``options.port``.

    Both probes answer 200 while the process runs, even when Redis is down: restarting the
    exporter would not bring Redis back, and ``caption_exporter_up`` says it. Raises
    ConfigError for a broker that is not Redis or a port that cannot be served.
    """
    collector = QueueCollector(
        broker_client(settings), options, TokenPolicy.from_settings(settings)
    )
    try:
        server = OpsServer(options.port, exporter_registry(collector), _always_ok, _always_ok)
    except OSError as exc:
        raise ConfigError(
            f"the exporter cannot serve port {options.port} ({exc.strerror or exc}); "
            "choose another with --port"
        ) from None
    return server.start()


def run_exporter(settings: Settings, options: ExporterOptions) -> int:
    """Serve until SIGTERM or SIGINT; the process's exit code."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = serve_exporter(settings, options)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info(
        "exporter on port %d /metrics for queues %s (sample %d, default %.0f tokens/s)",
        server.port,
        ", ".join(options.queues),
        options.sample,
        options.tokens_per_second,
    )
    stop.wait()
    server.close()
    return 0
