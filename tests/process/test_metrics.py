"""Metrics and probes of a real ``celery worker`` process, read over HTTP as an operator would.

Each test runs a real worker with the tiny SDNQ model (``tests.support.faulty_engine`` for
the ``[slow]`` and ``[hang]`` markers), the loopback S3 server, the machine's Redis on a
queue of its own, and its endpoints on a free loopback port (``CAPTION_METRICS_PORT``).
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import WorkerStack
from tests.support.waits import READY_TIMEOUT_S, TASK_TIMEOUT_S, wait_for_value
from worker.devtools.loopback import LoopbackS3
from worker.devtools.processes import WorkerProcess
from worker.settings import DEADLINE_GRACE_S

Labels = dict[str, str]

GOOD_WITH_HEADER = 35  # sent with CaptionClient.submit, which stamps caption_sent_at
GOOD_WITHOUT_HEADER = 10  # sent with plain send_task: no queue-wait observation
MISSING = 3  # ImageNotFound
CORRUPT = 2  # InvalidImage
TOTAL = GOOD_WITH_HEADER + GOOD_WITHOUT_HEADER + MISSING + CORRUPT  # 50
# worker.queue.app.EXIT_START_FAILED; importing it here would configure Celery in-process.
EXIT_START_FAILED = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str] | None:
    """(status, body), or None while nothing listens on the port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def status(port: int, path: str) -> int | None:
    answer = get(port, path)
    return None if answer is None else answer[0]


def scrape(port: int) -> list[tuple[str, Labels, float]]:
    answer = get(port, "/metrics")
    assert answer is not None and answer[0] == 200, answer
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(answer[1])
        for s in family.samples
    ]


def value(samples: list[tuple[str, Labels, float]], name: str, **labels: str) -> float | None:
    """The one sample named ``name`` whose labels include ``labels``, or None."""
    found = [v for n, have, v in samples if n == name and labels.items() <= have.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def wait_all(stack: WorkerStack, ids: list[str], timeout_s: float) -> list[dict[str, Any]]:
    return wait_for_value(
        lambda: [stack.meta(task_id) for task_id in ids],
        lambda metas: all(m["status"] in ("SUCCESS", "FAILURE") for m in metas),
        timeout_s,
        f"{len(ids)} tasks finish",
        interval_s=0.3,
    )


@pytest.fixture()
def stack(
    tiny_model_dir: Path, s3_server: LoopbackS3, redis_url: str, tmp_path: Path
) -> Iterator[WorkerStack]:
    with WorkerStack(
        tiny_model_dir,
        s3_server,
        tmp_path,
        name="metrics",
        redis=redis_url,
        faulty=True,
        task_defaults={"max_new_tokens": 4},
    ) as stack:
        stack.task_defaults["image"] = stack.upload("plain.png")
        yield stack


@pytest.mark.timeout(300)
def test_a_workers_metrics_and_readiness_from_start_to_sigterm(
    stack: WorkerStack, tiny_model_dir: Path
) -> None:
    port = free_port()
    worker = stack.worker("metrics", CAPTION_METRICS_PORT=str(port), FAULT_STEP_DELAY_S="0.5")

    # Start: the endpoints answer while the model loads, 503 until it has answered.
    worker.start()
    starting: list[int] = []

    def readiness() -> int | None:
        code = status(port, "/readyz")
        if code is not None:
            starting.append(code)
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
        return code

    wait_for_value(readiness, lambda code: code == 200, READY_TIMEOUT_S, "/readyz 200")
    ready_file_then = worker.ready_file.exists()
    assert starting[0] == 503, starting
    assert ready_file_then

    # Serve 50 tasks: 45 captions, 3 missing objects, 2 corrupt images.
    image = stack.task_defaults["image"]
    corrupt = stack.upload("corrupt.png", b"\x89PNG\r\n\x1a\n but not really a PNG")
    client = stack.client()
    try:
        ids = [client.submit(image, max_new_tokens=4) for _ in range(GOOD_WITH_HEADER)]
        ids += [str(stack.send().id) for _ in range(GOOD_WITHOUT_HEADER)]
        ids += [
            client.submit(f"s3://{stack.bucket}/missing-{i}.png", max_new_tokens=4)
            for i in range(MISSING)
        ]
        ids += [client.submit(corrupt, max_new_tokens=4) for _ in range(CORRUPT)]
        metas = wait_all(stack, ids, TASK_TIMEOUT_S * 2)
    finally:
        client.close()
    samples = scrape(port)
    health = get(port, "/healthz")

    results = [m["result"] for m in metas if m["status"] == "SUCCESS"]
    failures = sorted(type(m["result"]).__name__ for m in metas if m["status"] == "FAILURE")
    assert len(results) == TOTAL - MISSING - CORRUPT, metas
    assert failures == ["ImageNotFound"] * MISSING + ["InvalidImage"] * CORRUPT

    queue = stack.queue
    assert value(samples, "caption_tasks_total", queue=queue, outcome="success") == 45
    assert value(samples, "caption_tasks_total", queue=queue, outcome="failure") == 5
    assert value(samples, "caption_tasks_total", queue=queue, outcome="retry") == 0
    assert value(samples, "caption_failures_total", type="ImageNotFound") == MISSING
    assert value(samples, "caption_failures_total", type="InvalidImage") == CORRUPT
    assert value(samples, "caption_task_seconds_count") == TOTAL
    # Only the messages stamped with caption_sent_at have a queue wait, each a sane one.
    waited = value(samples, "caption_queue_wait_seconds_count")
    assert waited == GOOD_WITH_HEADER + MISSING + CORRUPT
    assert 0 <= (value(samples, "caption_queue_wait_seconds_sum") or 0) < waited * 60
    # The slot engine counts the live rows of each decode step: a row takes part in one step
    # per token after its first (its prefill chooses that one). The warm-up caption is not
    # counted. Its time in the engine is observed once per row.
    row_steps = sum(r["generated_tokens"] - 1 for r in results)
    assert value(samples, "caption_batch_rows_sum") == row_steps
    steps = value(samples, "caption_batch_rows_count")
    assert steps is not None and row_steps / 8 <= steps <= row_steps  # CAPTION_SLOTS=8
    assert value(samples, "caption_generate_seconds_count") == 45
    assert value(samples, "caption_images_total", lane="interactive") == 45
    assert value(samples, "caption_tokens_total", kind="prompt") == sum(
        r["prompt_tokens"] for r in results
    )
    assert value(samples, "caption_tokens_total", kind="generated") == sum(
        r["generated_tokens"] for r in results
    )
    assert value(samples, "caption_rows_active") == 0
    assert value(samples, "caption_worker_ready") == 1
    assert value(samples, "caption_model_info", model=str(tiny_model_dir), dtype="float32") == 1
    assert value(samples, "caption_gpu_memory_bytes", kind="allocated") is None  # a CPU worker
    assert health == (200, "ok\n")

    # SIGTERM with a caption in flight: not ready at once, the caption still finishes.
    slow = str(stack.send(prompt="[slow] Describe this image.", max_new_tokens=8).id)
    wait_for_value(
        lambda: stack.meta(slow)["status"], lambda s: s == "STARTED", 30, "the slow task starts"
    )
    time.sleep(0.5)  # into its generate call (8 steps of 0.5 s)
    worker.signal(signal.SIGTERM)
    draining = wait_for_value(
        lambda: get(port, "/readyz"), lambda a: a is None or a[0] == 503, 5, "/readyz 503"
    )
    draining_health = status(port, "/healthz")
    code = worker.wait(60)
    slow_meta = stack.meta(slow)

    assert draining == (503, "shutting down\n")  # answered, so the process was still up
    assert draining_health == 200  # draining is healthy: a liveness probe must not kill it
    assert slow_meta["status"] == "SUCCESS", slow_meta
    assert code == 0, worker.log()[-3000:]
    assert not worker.ready_file.exists()


@pytest.mark.timeout(240)
def test_healthz_turns_503_while_a_model_call_hangs_before_the_watchdog_acts(
    stack: WorkerStack,
) -> None:
    deadline_s, hang_grace_s = 4.0, 60.0  # the watchdog would end the process after 64 s
    port = free_port()
    worker: WorkerProcess = stack.start_worker(
        "hung",
        CAPTION_METRICS_PORT=str(port),
        CAPTION_TASK_DEADLINE_S=f"{deadline_s:g}",
        CAPTION_HANG_GRACE_S=f"{hang_grace_s:g}",
    )
    assert worker.proc is not None
    before = (status(port, "/healthz"), status(port, "/readyz"))

    started = time.monotonic()
    hung = str(stack.send(prompt="[hang] Describe this image.").id)
    unhealthy = wait_for_value(
        lambda: get(port, "/healthz"),
        lambda a: a is not None and a[0] == 503,
        deadline_s + DEADLINE_GRACE_S + 20,
        "/healthz 503",
    )
    unhealthy_s = time.monotonic() - started
    alive = worker.proc.poll() is None
    ready = status(port, "/readyz")
    hung_meta = wait_for_value(
        lambda: stack.meta(hung), lambda m: m["status"] == "FAILURE", 15, "the hung task fails"
    )
    print(f"/healthz 503 {unhealthy_s:.1f}s after the hung task was sent")

    assert before == (200, 200)
    assert unhealthy is not None and "past every task deadline" in unhealthy[1], unhealthy
    # Not before the model call outlived the deadline and its one-step grace.
    assert unhealthy_s >= deadline_s + DEADLINE_GRACE_S
    assert alive  # seen while the process lives: the watchdog acts only at the hang grace
    assert ready == 503
    assert type(hung_meta["result"]).__name__ == "CaptionTimeout"


@pytest.mark.timeout(120)
def test_a_taken_metrics_port_stops_the_worker_before_it_loads_the_model(
    stack: WorkerStack,
) -> None:
    with socket.socket() as holder:  # another process's endpoints on the same host
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        worker = stack.worker("clash", CAPTION_METRICS_PORT=str(port)).start()
        code = worker.wait(90)
    log = worker.log()

    assert code == EXIT_START_FAILED, log[-2000:]
    assert f"cannot start: ConfigError: CAPTION_METRICS_PORT={port} cannot be served" in log
    assert "model loaded" not in log
