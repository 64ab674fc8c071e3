"""The worker's metrics: one hook the runners, the service and the task report to.

``MetricsHook`` is the surface every component calls; ``Metrics`` records it as Prometheus
series in a registry of its own (so several workers in one test process never collide), and
``NO_METRICS`` drops it, for local captions and the benchmark. Series follow Prometheus
conventions: base units (seconds, bytes), ``_total`` counters, and no per-task labels, so a
fleet's cardinality does not grow with its traffic.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.engine.base import Lane
from worker.errors import PRODUCER_VISIBLE

if TYPE_CHECKING:
    from worker.engine.base import ModelInfo

Outcome = Literal["success", "failure", "retry"]

#: The failure type of an exception that is none of the documented error classes (a bug).
INTERNAL_FAILURE = "Internal"
_DOCUMENTED = frozenset(cls.__name__ for cls in PRODUCER_VISIBLE)

# Seconds: from a tiny model on a CPU (tens of ms) to a 32B batch on a busy GPU (minutes).
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class MetricsHook(Protocol):
    """What the worker's components report, whoever records it."""

    def task_finished(
        self, queue: str, outcome: Outcome, seconds: float, error: BaseException | None = None
    ) -> None:
        """One task run ended (success, failure or retry), ``seconds`` after it started."""

    def queue_waited(self, seconds: float) -> None:
        """A task started ``seconds`` after its producer sent it."""

    def model_batch(self, rows: int) -> None:
        """Rows in one model call (a generate call, or one decode step of the slot engine)."""

    def model_time(self, seconds: float) -> None:
        """Seconds in the model: one generate call, or one row's time in the slot engine."""

    def rows_active(self, rows: int) -> None:
        """Rows the model holds right now."""

    def caption_delivered(self, lane: Lane, prompt_tokens: int, generated_tokens: int) -> None:
        """A caption was produced for a task of ``lane``."""

    def model_loaded(self, info: ModelInfo) -> None:
        """The model that serves, once it is loaded."""


class NullMetrics:
    """A ``MetricsHook`` that records nothing."""

    def task_finished(
        self, queue: str, outcome: Outcome, seconds: float, error: BaseException | None = None
    ) -> None:
        pass

    def queue_waited(self, seconds: float) -> None:
        pass

    def model_batch(self, rows: int) -> None:
        pass

    def model_time(self, seconds: float) -> None:
        pass

    def rows_active(self, rows: int) -> None:
        pass

    def caption_delivered(self, lane: Lane, prompt_tokens: int, generated_tokens: int) -> None:
        pass

    def model_loaded(self, info: ModelInfo) -> None:
        pass


NO_METRICS: MetricsHook = NullMetrics()


def failure_type(error: BaseException) -> str:
    """The ``type`` label of a failure: the documented error class name, else ``Internal``."""
    name = type(error).__name__
    return name if name in _DOCUMENTED else INTERNAL_FAILURE


def quantization_label(quantization: dict[str, Any] | None) -> str:
    """A checkpoint's quantization in one short label, e.g. ``sdnq-uint4-svd32``.

    A weight form other than the stored one is appended (``sdnq-uint4-svd32 as bf16``);
    an unquantized checkpoint is ``none``.
    """
    if not quantization or not quantization.get("quant_method"):
        return "none"
    parts = [str(quantization["quant_method"])]
    if quantization.get("weights_dtype"):
        parts.append(str(quantization["weights_dtype"]))
    if quantization.get("use_svd"):
        parts.append(f"svd{quantization.get('svd_rank', '')}")
    label = "-".join(parts)
    served = quantization.get("served_as")
    if served and served != quantization["quant_method"]:
        label += f" as {served}"
    return label


class Metrics:
    """A ``MetricsHook`` recording Prometheus series in its own ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.tasks = Counter(
            "caption_tasks", "Task runs by outcome.", ["queue", "outcome"], registry=reg
        )
        self.failures = Counter(
            "caption_failures",
            "Failed tasks by error class (the name producers see).",
            ["type"],
            registry=reg,
        )
        self.queue_wait = Histogram(
            "caption_queue_wait_seconds",
            "From the producer's send timestamp (message header caption_sent_at) to task start.",
            buckets=SECONDS_BUCKETS,
            registry=reg,
        )
        self.task_seconds = Histogram(
            "caption_task_seconds",
            "From task start to its end (download, queue for the model, generation).",
            buckets=SECONDS_BUCKETS,
            registry=reg,
        )
        self.generate_seconds = Histogram(
            "caption_generate_seconds",
            "Time in the model: one generate call (CAPTION_ENGINE=generate), or one row from "
            "prefill to its last token (CAPTION_ENGINE=slots).",
            buckets=SECONDS_BUCKETS,
            registry=reg,
        )
        self.batch_rows = Histogram(
            "caption_batch_rows",
            "Rows per generate call (generate) or per decode step (slots).",
            buckets=ROWS_BUCKETS,
            registry=reg,
        )
        self.tokens = Counter(
            "caption_tokens", "Tokens of delivered captions.", ["kind"], registry=reg
        )
        self.images = Counter("caption_images", "Images captioned.", ["lane"], registry=reg)
        self.rows = Gauge("caption_rows_active", "Rows the model holds now.", registry=reg)
        self.model_info = Gauge(
            "caption_model_info",
            "The model this worker serves (always 1).",
            ["model", "revision", "quantization", "dtype"],
            registry=reg,
        )
        self.ready = Gauge(
            "caption_worker_ready",
            "1 while the worker has answered its warm-up caption and consumes the queue.",
            registry=reg,
        )
        # Present from the start, so a dashboard sums to 0 rather than to "no data".
        for kind in ("prompt", "generated"):
            self.tokens.labels(kind=kind)
        for lane in ("interactive", "bulk"):
            self.images.labels(lane=lane)
        # Every failure type too: rate() sees no increase in a series' first sample, so a
        # series born at its first failure would hide that failure from the dashboard.
        for failure in (*sorted(_DOCUMENTED), INTERNAL_FAILURE):
            self.failures.labels(type=failure)
        reg.register(_GpuMemory())
        self.busy = BusyClock()

    def serve_queue(self, queue: str) -> None:
        """Create the queue's outcome series at 0 before its first task (see failures)."""
        for outcome in ("success", "failure", "retry"):
            self.tasks.labels(queue=queue, outcome=outcome)

    def watch_ready(self, ready: Callable[[], bool]) -> None:
        """Read ``caption_worker_ready`` from ``ready()`` at each scrape."""
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    # MetricsHook.
    def task_finished(
        self, queue: str, outcome: Outcome, seconds: float, error: BaseException | None = None
    ) -> None:
        self.tasks.labels(queue=queue, outcome=outcome).inc()
        self.task_seconds.observe(seconds)
        if outcome == "failure" and error is not None:
            self.failures.labels(type=failure_type(error)).inc()

    def queue_waited(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def model_batch(self, rows: int) -> None:
        self.batch_rows.observe(rows)

    def model_time(self, seconds: float) -> None:
        self.generate_seconds.observe(seconds)

    def rows_active(self, rows: int) -> None:
        self.rows.set(rows)
        self.busy.rows(rows)

    def caption_delivered(self, lane: Lane, prompt_tokens: int, generated_tokens: int) -> None:
        self.images.labels(lane=lane).inc()
        self.tokens.labels(kind="prompt").inc(prompt_tokens)
        self.tokens.labels(kind="generated").inc(generated_tokens)
        self.busy.generated(generated_tokens)

    def model_loaded(self, info: ModelInfo) -> None:
        provenance = info.provenance
        self.model_info.clear()  # one model per process: a reload replaces the series
        self.model_info.labels(
            model=info.name,
            revision=str(provenance.get("revision") or ""),
            quantization=quantization_label(provenance.get("quantization")),
            dtype=str(provenance.get("dtype") or ""),
        ).set(1)


class BusyClock:
    """Seconds the model held rows and the tokens it generated meanwhile.

    Their ratio is the rate this worker achieves while working, which is what queued work
    drains at; tokens per wall second would read low whenever the queue ran dry.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._seconds = 0.0
        self._tokens = 0

    def rows(self, rows: int, now: float | None = None) -> None:
        """The model now holds ``rows`` rows."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if rows > 0 and self._since is None:
                self._since = now
            elif rows == 0 and self._since is not None:
                self._seconds += now - self._since
                self._since = None

    def generated(self, tokens: int) -> None:
        """A caption of ``tokens`` generated tokens was delivered."""
        with self._lock:
            self._tokens += tokens

    def reading(self, now: float | None = None) -> tuple[float, int]:
        """(busy seconds, generated tokens) since the process started."""
        now = time.monotonic() if now is None else now
        with self._lock:
            open_span = now - self._since if self._since is not None else 0.0
            return self._seconds + open_span, self._tokens


def queue_wait_seconds(sent_at: object, now: float) -> float | None:
    """Seconds since a ``caption_sent_at`` header value (Unix seconds), or None if unusable.

    A clock behind the producer's gives a small negative wait, counted as 0.
    """
    if isinstance(sent_at, bool) or not isinstance(sent_at, int | float):
        return None
    if not math.isfinite(sent_at):
        return None
    return max(0.0, now - float(sent_at))


class _GpuMemory(Collector):
    """``caption_gpu_memory_bytes{kind}``: torch's CUDA allocator, read at each scrape.

    Summed over the visible devices (one with ``caption-worker worker``, several with
    ``CAPTION_MEMORY_MODE=balanced``). Absent until this process has initialised CUDA, so a
    scrape never creates a CUDA context or imports torch, and absent on a CPU worker.
    """

    NAME = "caption_gpu_memory_bytes"
    HELP = "CUDA memory: allocated and reserved by torch, and the devices' total."

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["kind"])

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None:
            return
        try:
            if not torch.cuda.is_initialized():
                return
            devices = range(torch.cuda.device_count())
            values = {
                "allocated": sum(torch.cuda.memory_allocated(d) for d in devices),
                "reserved": sum(torch.cuda.memory_reserved(d) for d in devices),
                "total": sum(torch.cuda.get_device_properties(d).total_memory for d in devices),
            }
        except Exception:  # a scrape must never fail because the driver is in trouble
            return
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["kind"])
        for kind, value in values.items():
            family.add_metric([kind], float(value))
        yield family
