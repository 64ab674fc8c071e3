"""``caption-worker exporter`` as an operator runs it, scraped over HTTP while two real workers
drain 200 queued captions.

What an autoscaler reads must be what the broker holds at that moment: each scrape is
bracketed by two readings of Redis (the queue's lists and kombu's unacked hash, each in one
MULTI/EXEC), and the scrape's figures must lie between them. The queued work must fall as
the queue drains, and reach 0 when it is empty.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import WorkerStack
from tests.support.waits import READY_TIMEOUT_S, wait_until
from worker.devtools.loopback import LoopbackS3, free_port, terminate, wait_for_http
from worker.queue.keys import RATES_KEY, UNACKED_KEY, queue_lists

pytestmark = pytest.mark.timeout(240)

CLI = str(Path(sys.executable).with_name("caption-worker"))
TASKS = 200
NEW_TOKENS = 8
WORKERS = 2
# Every decode step of a [slow] batch sleeps this long: a batch of 8 takes about a second,
# so the 200 tasks drain over some seconds and many scrapes see the queue mid-way.
STEP_DELAY_S = "0.1"
SLOW_PROMPT = "[slow] Describe this image."
DEFAULT_RATE = 100.0  # the exporter's documented default, used while no worker reports one
# kombu's consumer BRPOPs a message and only then records it in the unacked hash, so for a
# moment it is in neither; each worker has one such message at most.
IN_FLIGHT = WORKERS


@dataclass(frozen=True)
class Held:
    """What Redis holds for the queue at one instant."""

    waiting: int
    reserved: int

    @property
    def total(self) -> int:
        return self.waiting + self.reserved


def held(stack: WorkerStack) -> Held:
    """The queue's lists and its share of the unacked hash, read in one transaction."""
    pipe = stack.broker().pipeline(transaction=True)
    for name in queue_lists(stack.queue):
        pipe.llen(name)
    pipe.hvals(UNACKED_KEY)
    *lengths, unacked = pipe.execute()
    mine = [v for v in unacked if json.loads(v)[2] == stack.queue]
    return Held(sum(int(n) for n in lengths), len(mine))


def reported_rates(stack: WorkerStack) -> list[float]:
    """The generated tokens per second each worker last reported, sorted."""
    reports = stack.broker().hvals(RATES_KEY)
    return sorted(float(json.loads(v)["generated_tokens_per_second"]) for v in reports)


class Exporter:
    """A ``caption-worker exporter`` process for the stack's queue, scraped over HTTP."""

    def __init__(self, stack: WorkerStack, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        command = [CLI, "exporter", "--queue", stack.queue, "--port", str(self.port)]
        self.proc = subprocess.Popen(
            command, env={**os.environ, **stack.env()}, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}/metrics"

    def wait_ready(self) -> Exporter:
        wait_for_http(self.url, 60, self.proc)
        return self

    def scrape(self) -> dict[str, float]:
        """One scrape: sample name (with its one label value, if any) -> value."""
        with urllib.request.urlopen(self.url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                label = ",".join(sample.labels.values())
                samples[f"{sample.name}[{label}]" if label else sample.name] = sample.value
        return samples

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        code = terminate(self.proc, timeout_s=15)
        self._log.close()
        return code


@pytest.fixture()
def stack(tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path) -> Iterator[WorkerStack]:
    with WorkerStack(tiny_model_dir, s3_server, tmp_path, name="exporter", faulty=True) as stack:
        yield stack


@pytest.fixture()
def exporter(stack: WorkerStack, tmp_path: Path) -> Iterator[Exporter]:
    proc = Exporter(stack, tmp_path / "exporter.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_the_exporter_reports_what_redis_holds_while_workers_drain_the_queue(
    stack: WorkerStack, exporter: Exporter
) -> None:
    empty = exporter.scrape()
    assert empty["caption_exporter_up"] == 1.0
    assert empty[f"caption_queue_waiting[{stack.queue}]"] == 0.0

    # 200 tasks queued by the bundled producer, which stamps each with caption_sent_at.
    image = stack.upload("exporter.png")
    client = stack.client()
    first_sent = time.time()
    try:
        for _ in range(TASKS):
            client.submit(image, prompt=SLOW_PROMPT, max_new_tokens=NEW_TOKENS)
    finally:
        client.close()

    queued = exporter.scrape()
    age = time.time() - first_sent
    assert queued[f"caption_queue_waiting[{stack.queue}]"] == TASKS
    assert queued[f"caption_queue_reserved[{stack.queue}]"] == 0
    assert 0 < queued[f"caption_queue_oldest_age_seconds[{stack.queue}]"] <= age
    assert queued["caption_exporter_rate_source[default]"] == 1.0  # no worker has run yet
    assert queued["caption_worker_tokens_per_second"] == DEFAULT_RATE
    assert queued[f"caption_queued_work_seconds[{stack.queue}]"] == pytest.approx(
        TASKS * NEW_TOKENS / DEFAULT_RATE
    )

    workers = [
        stack.worker(f"w{i}", FAULT_STEP_DELAY_S=STEP_DELAY_S, OMP_NUM_THREADS="1").start()
        for i in range(WORKERS)
    ]
    for proc in workers:
        proc.wait_ready(READY_TIMEOUT_S)

    readings: list[tuple[Held, dict[str, float], Held]] = []
    deadline = time.monotonic() + 120
    while True:
        before = held(stack)
        scraped = exporter.scrape()
        after = held(stack)
        readings.append((before, scraped, after))
        if before.total == after.total == 0:
            break
        assert time.monotonic() < deadline, f"not drained: {after}\n{exporter.log()[-3000:]}"
        time.sleep(0.25)

    for before, scraped, after in readings:
        waiting = scraped[f"caption_queue_waiting[{stack.queue}]"]
        reserved = scraped[f"caption_queue_reserved[{stack.queue}]"]
        work = scraped[f"caption_queued_work_seconds[{stack.queue}]"]
        rate = scraped["caption_worker_tokens_per_second"]
        where = f"before {before}, scraped {waiting:g}+{reserved:g}, after {after}"
        assert scraped["caption_exporter_up"] == 1.0
        # Nothing is handed back in this run, so the lists only shrink: no slack at all.
        assert after.waiting <= waiting <= before.waiting, where
        assert after.total - IN_FLIGHT <= waiting + reserved <= before.total + IN_FLIGHT, where
        # Every message was costed (200 < the sample of 1,000), each at its 8 tokens.
        assert work * rate == pytest.approx((waiting + reserved) * NEW_TOKENS), where
        if scraped["caption_exporter_rate_source[default]"] == 1.0:
            assert rate == DEFAULT_RATE
        oldest = scraped[f"caption_queue_oldest_age_seconds[{stack.queue}]"]
        assert 0 <= oldest <= time.time() - first_sent, where
        if waiting == 0:
            assert oldest == 0, where

    works = [scraped[f"caption_queued_work_seconds[{stack.queue}]"] for _, scraped, _ in readings]
    tokens = [
        s[f"caption_queued_work_seconds[{stack.queue}]"] * s["caption_worker_tokens_per_second"]
        for _, s, _ in readings
    ]
    mid_way = [w for w in works if 0 < w < works[0]]
    summary = f"{len(readings)} scrapes, work seconds {[round(w, 2) for w in works]}"
    print(f"\n{summary}")
    # It falls as the queue drains: seen at several levels on the way, its tokens never
    # rising by more than the messages kombu briefly holds outside both lists and hash. (The
    # seconds also follow the rate: when the workers' first reports replace the default, the
    # same tokens become more seconds, since this CPU model is slower than 100 tokens/s.)
    assert works[0] <= TASKS * NEW_TOKENS / DEFAULT_RATE, summary
    assert len(set(mid_way)) >= 3, summary
    for earlier, later in itertools.pairwise(tokens):
        assert later <= earlier + IN_FLIGHT * NEW_TOKENS + 1e-6, summary
    last = readings[-1][1]
    for name in ("waiting", "reserved", "oldest_age_seconds"):
        assert last[f"caption_queue_{name}[{stack.queue}]"] == 0.0, name
    assert works[-1] == 0.0
    assert stack.leftovers() == {"queued": 0, "unacked": 0, "unacked_index": 0}

    # The workers report the rate they achieved with their heartbeat (idle, they repeat the
    # last one): the exporter now divides by the median of those reports.
    wait_until(lambda: len(reported_rates(stack)) == WORKERS, 30, "both workers' rates")
    rates_before = reported_rates(stack)
    scraped = exporter.scrape()
    assert reported_rates(stack) == rates_before
    assert scraped["caption_exporter_rate_source[measured]"] == 1.0
    assert scraped["caption_exporter_rate_reports"] == WORKERS
    assert scraped["caption_worker_tokens_per_second"] == pytest.approx(
        statistics.median(rates_before)
    )
    assert exporter.scrape()["caption_exporter_scrape_errors_total"] == 0.0
    assert exporter.stop() == 0, exporter.log()[-3000:]


def test_a_broker_that_is_not_redis_stops_the_exporter_with_one_line() -> None:
    env = {**os.environ, "CAPTION_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    out = subprocess.run(
        [CLI, "exporter", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "CAPTION_BROKER_URL must be redis://" in out.stderr
    assert "Traceback" not in out.stderr
