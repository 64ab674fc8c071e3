"""Results: a producer tells QUEUED from UNKNOWN, results expire, duplicates reuse the result.

One real ``celery worker`` process with the tiny SDNQ model serves the module, against a
private redis-server (never the shared one on 6379) and the loopback S3 server. A task is
submitted through ``CaptionClient`` before that worker exists, so the producer's view of a
task that is only queued is observed for real.
"""

from __future__ import annotations

import ast
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from tests.support.images import png_bytes
from tests.support.stack import WorkerStack
from tests.support.waits import TASK_TIMEOUT_S, wait_for_value, wait_until
from worker.client import CaptionClient, TaskStatus
from worker.devtools.loopback import LoopbackS3
from worker.devtools.processes import WorkerProcess
from worker.queue.keys import QUEUED_KEY, RESULT_META_KEY

pytestmark = pytest.mark.timeout(300)

RESULT_EXPIRES_S = 60  # the smallest the settings allow


@dataclass
class Results:
    """The module's stack and worker, and what a CaptionClient saw before the worker existed."""

    stack: WorkerStack
    client: CaptionClient
    worker: WorkerProcess
    image: str
    queued_id: str
    queued_seen: list[str]  # CaptionClient.status(queued_id).state, twice, a second apart
    waiting_before: int  # messages in the queue's Redis lists at that time
    unknown_id: str
    unknown_seen: str  # CaptionClient.status(unknown_id).state


@pytest.fixture(scope="module")
def results(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Results]:
    workdir = tmp_path_factory.mktemp("results")
    with WorkerStack(
        tiny_model_dir,
        s3_server,
        workdir,
        name="results",
        task_defaults={"max_new_tokens": 4},
        CAPTION_RESULT_EXPIRES_S=str(RESULT_EXPIRES_S),
    ) as stack:
        image = stack.upload("cat.png")
        stack.task_defaults["image"] = image
        client = stack.client(result_expires_s=RESULT_EXPIRES_S)
        try:
            # No worker consumes the queue yet.
            queued_id = client.submit(image, max_new_tokens=4)
            seen = [client.status(queued_id).state]
            time.sleep(1.0)
            seen.append(client.status(queued_id).state)
            waiting = stack.waiting()
            unknown_id = str(uuid.uuid4())
            unknown_seen = client.status(unknown_id).state

            worker = stack.start_worker("results")
            yield Results(
                stack=stack,
                client=client,
                worker=worker,
                image=image,
                queued_id=queued_id,
                queued_seen=seen,
                waiting_before=waiting,
                unknown_id=unknown_id,
                unknown_seen=unknown_seen,
            )
        finally:
            client.close()


def _status_when_done(client: CaptionClient, task_id: str, timeout_s: float) -> TaskStatus:
    return wait_for_value(
        lambda: client.status(task_id),
        lambda status: status.state in ("SUCCESS", "FAILURE"),
        timeout_s,
        f"task {task_id} finishes",
    )


def test_status_tells_a_queued_task_from_an_unknown_id(results: Results) -> None:
    # Before any worker existed: the task waited in the queue and was reported QUEUED,
    # while an id nobody ever sent was UNKNOWN.
    assert results.waiting_before == 1
    assert results.queued_seen == ["QUEUED", "QUEUED"]
    assert results.unknown_seen == "UNKNOWN"

    done = _status_when_done(results.client, results.queued_id, TASK_TIMEOUT_S)

    assert done.state == "SUCCESS", done
    assert done.result is not None
    assert done.result["image"] == results.image and done.result["text"]
    assert done.error_type is None
    # A running worker does not make a never-sent id look queued.
    assert results.client.status(results.unknown_id).state == "UNKNOWN"
    assert results.client.status(str(uuid.uuid4())).state == "UNKNOWN"


def test_results_expire_after_the_configured_ttl(results: Results) -> None:
    stack = results.stack
    ok = AsyncResult(results.client.submit(results.image, max_new_tokens=4), app=stack.producer)
    # The producer's QUEUED marker does not outlive a result either.
    queued_ttl = stack.backend().ttl(QUEUED_KEY.format(task_id=ok.id))
    missing = stack.send(image=f"s3://{stack.bucket}/no/such/key.png")
    assert ok.get(timeout=TASK_TIMEOUT_S)["text"]
    with pytest.raises(Exception) as failed:
        missing.get(timeout=TASK_TIMEOUT_S)
    assert type(failed.value).__name__ == "ImageNotFound"

    backend = stack.backend()
    for result, status in ((ok, "SUCCESS"), (missing, "FAILURE")):
        key = RESULT_META_KEY.format(task_id=result.id)
        assert json.loads(backend.get(key) or b"{}")["status"] == status
        ttl = backend.ttl(key)  # -1: no expiry, -2: no key
        assert 0 < ttl <= RESULT_EXPIRES_S, (status, ttl)
    assert 0 < queued_ttl <= RESULT_EXPIRES_S


def _runs(log: str, task_id: str) -> list[str]:
    """One entry per finished run of the task, in order: the logged return value of a
    success, or ``raised: ...`` for a failure."""
    pattern = re.compile(
        rf"Task caption\[{re.escape(task_id)}\] (?:succeeded in [^:]*s: |(raised))(.*)$"
    )
    return [
        f"raised{m.group(2)}" if m.group(1) else m.group(2)
        for line in log.splitlines()
        if (m := pattern.search(line))
    ]


def test_duplicate_delivery_returns_the_stored_result_unchanged(
    results: Results, s3_client: Any
) -> None:
    stack = results.stack
    s3_client.put_object(Bucket=stack.bucket, Key="dup.png", Body=png_bytes(color=(10, 160, 60)))
    kwargs = {"image": f"s3://{stack.bucket}/dup.png", "max_new_tokens": 6}
    first = stack.send(**kwargs)
    first_value = first.get(timeout=TASK_TIMEOUT_S)
    key = RESULT_META_KEY.format(task_id=first.id)
    stored_before = stack.backend().get(key)
    assert stored_before is not None
    # Recomputing is now impossible: the image is gone, so a fresh run would fail.
    s3_client.delete_object(Bucket=stack.bucket, Key="dup.png")

    again = stack.send(task_id=first.id, **kwargs)  # the same message delivered once more
    assert again.id == first.id
    wait_until(
        lambda: len(_runs(results.worker.log(), first.id)) >= 2,
        TASK_TIMEOUT_S,
        "the worker finishes the duplicate delivery",
    )

    log = results.worker.log()
    runs = _runs(log, first.id)
    assert len(runs) == 2, runs
    assert not runs[1].startswith("raised"), runs[1]  # it did not try to caption again
    assert f"task {first.id} already succeeded; returning the stored result" in log
    stored_after = stack.backend().get(key)
    assert stored_after == stored_before  # byte for byte, date_done included
    stored = json.loads(stored_after or b"{}")
    assert stored["status"] == "SUCCESS"
    assert stored["result"] == first_value
    # What the duplicate run returned is the stored result, not a recomputation: the
    # fields that differ between runs (seconds) or workers (worker, model_loaded_at) match.
    assert runs[1] == runs[0]
    returned = ast.literal_eval(runs[1])
    assert returned == first_value
    for name in ("worker", "seconds", "model_loaded_at", "text"):
        assert returned[name] == first_value[name], name
    assert AsyncResult(first.id, app=stack.producer).get(timeout=TASK_TIMEOUT_S) == first_value
    assert stack.waiting() == 0
