"""The whole path: S3 upload -> send_task -> a separate worker process -> result in Redis.

The producer side uses only ``celery.Celery(...).send_task`` and ``AsyncResult``, as a web
backend in another codebase would. The worker uses the machine's shared Redis, on a queue of
its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import pinned
from tests.support.stack import AMQP_URL, WorkerStack
from tests.support.waits import TASK_TIMEOUT_S, failure_of, wait_until
from worker.devtools.loopback import LoopbackS3
from worker.queue.keys import DELIVERY_KEY, RESULT_META_KEY

CONTRACT_FIELDS = {
    "text": str,
    "model": str,
    "image": str,
    "prompt_tokens": int,
    "generated_tokens": int,
    "finish_reason": str,
    "seconds": float,
    "batch_size": int,
    "worker": str,
}
CLI = str(Path(sys.executable).with_name("caption-worker"))


@pytest.fixture(scope="module", params=["redis", "amqp"])
def stack(
    request: pytest.FixtureRequest,
    tiny_model_dir: Path,
    s3_server: LoopbackS3,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerStack]:
    """One worker per broker: Redis, and RabbitMQ with results in Redis."""
    workdir = tmp_path_factory.mktemp("e2e")
    broker = {"CAPTION_BROKER_URL": AMQP_URL} if request.param == "amqp" else {}
    with WorkerStack(
        tiny_model_dir, s3_server, workdir, name="e2e", redis=redis_url, **broker
    ) as stack:
        stack.start_worker("e2e")
        yield stack


def test_caption_success_carries_the_whole_contract(
    stack: WorkerStack, tiny_model_dir: Path
) -> None:
    uri = stack.upload("cats/one.png")

    result = stack.send(image=uri, max_new_tokens=8).get(timeout=TASK_TIMEOUT_S)

    for field, kind in CONTRACT_FIELDS.items():
        assert isinstance(result[field], kind), (field, result)
    assert result["text"].strip()
    assert result["model"] == str(tiny_model_dir.resolve())
    assert result["image"] == uri
    assert result["finish_reason"] in ("stop", "length")
    assert 1 <= result["generated_tokens"] <= 8
    assert result["prompt_tokens"] > 0
    assert result["batch_size"] >= 1
    assert result["image_size"] == [96, 64]
    assert result["quantization"]["quant_method"] == "sdnq"


def test_the_tiny_model_gives_the_pinned_result_json(
    stack: WorkerStack, tiny_model_dir: Path
) -> None:
    uri = stack.upload("pinned.png")

    task = stack.send(image=uri, **pinned.KWARGS)
    result = task.get(timeout=TASK_TIMEOUT_S)

    model = str(tiny_model_dir.resolve())
    pinned.assert_pinned(result, model=model, image=uri)
    # What the result backend stores, byte for byte, parsed with its key order.
    raw = stack.backend().get(RESULT_META_KEY.format(task_id=task.id))
    assert raw is not None
    stored = json.loads(raw)
    assert stored["status"] == "SUCCESS"
    pinned.assert_pinned(stored["result"], model=model, image=uri)
    assert stored["result"] == result
    assert result["worker"].startswith("e2e@")


def test_same_request_gives_same_caption(stack: WorkerStack) -> None:
    uri = stack.upload("same.png")
    first, second = (stack.send(image=uri, max_new_tokens=6) for _ in range(2))
    assert first.get(timeout=TASK_TIMEOUT_S)["text"] == second.get(timeout=TASK_TIMEOUT_S)["text"]


def test_missing_key_fails_with_image_not_found(stack: WorkerStack) -> None:
    exc = failure_of(stack.send(image=f"s3://{stack.bucket}/no/such/key.png"), 20)
    assert type(exc).__name__ == "ImageNotFound"
    assert "no/such/key.png" in str(exc)


def test_non_image_object_fails_with_invalid_image(stack: WorkerStack) -> None:
    uri = stack.upload("notes.txt", b"hello world")
    exc = failure_of(stack.send(image=uri), 20)
    assert type(exc).__name__ == "InvalidImage"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"image": "s3://bkt/k.png", "colour": "red"}, "unknown argument 'colour'"),
        ({"image": "s3://bkt/k.png", "max_new_tokens": "12"}, "max_new_tokens"),
        ({"image": "s3://bkt/k.png", "max_new_tokens": 0}, "max_new_tokens"),
        ({"image": 42}, "image"),
        ({"prompt": "no image"}, "image"),
        ({"image": None}, "image"),
        ({"image": "https://example.com/cat.png"}, "s3://"),
    ],
)
def test_bad_arguments_fail_with_invalid_request(
    stack: WorkerStack, kwargs: dict[str, Any], needle: str
) -> None:
    exc = failure_of(stack.send(**kwargs), 20)
    assert type(exc).__name__ == "InvalidRequest"
    assert needle in str(exc)


def test_null_optional_arguments_mean_not_given(stack: WorkerStack) -> None:
    uri = stack.upload("nulls.png")
    nulls = {"prompt": None, "do_sample": None, "seed": None, "max_pixels": None, "model": None}
    given = stack.send(image=uri, max_new_tokens=6, **nulls)
    plain = stack.send(image=uri, max_new_tokens=6)
    with_nulls, without = given.get(timeout=TASK_TIMEOUT_S), plain.get(timeout=TASK_TIMEOUT_S)
    assert with_nulls["text"] == without["text"]
    assert with_nulls["prompt_tokens"] == without["prompt_tokens"]  # the default prompt


def test_a_refused_request_leaves_no_delivery_counter(stack: WorkerStack) -> None:
    # Requests are checked before crash accounting: nothing to count for a task that can
    # never run, so no caption:deliveries key is ever written for it.
    refused = [
        stack.send(image="s3://bkt/k.png", colour="red"),
        stack.send(prompt="no image"),
        stack.send(image="https://example.com/k.png"),
        stack.send(image="s3://bkt/k.png", model="someone/other-model"),
    ]
    kinds = [type(failure_of(task, 20)).__name__ for task in refused]
    assert kinds == ["InvalidRequest", "InvalidRequest", "InvalidRequest", "ModelMismatch"]
    backend = stack.backend()
    assert [backend.exists(DELIVERY_KEY.format(task_id=t.id, retry=0)) for t in refused] == [0] * 4


def test_a_finished_task_leaves_only_its_result_in_redis(stack: WorkerStack) -> None:
    """Counters and the client's QUEUED marker go once the outcome is stored."""
    client = stack.client()
    try:
        ok = client.submit(stack.upload("counted.png"), max_new_tokens=2)
        missing = client.submit(f"s3://{stack.bucket}/no/such.png", max_new_tokens=2)
        assert client.result(ok, timeout=TASK_TIMEOUT_S)["generated_tokens"] == 2
        failed = failure_of(stack.producer.AsyncResult(missing), TASK_TIMEOUT_S)
        assert type(failed).__name__ == "ImageNotFound"
        states = [client.status(ok).state, client.status(missing).state]
    finally:
        client.close()
    assert states == ["SUCCESS", "FAILURE"]
    backend = stack.backend()
    for task_id in (ok, missing):  # a success and a final failure alike
        # The worker deletes them right after storing the outcome the client just read.
        wait_until(lambda t=task_id: stack.bookkeeping(t) == [], 10, f"{task_id} cleaned up")
        assert backend.exists(RESULT_META_KEY.format(task_id=task_id)) == 1


def test_wrong_model_fails_with_model_mismatch(stack: WorkerStack) -> None:
    exc = failure_of(stack.send(image="s3://bkt/k.png", model="someone/other-model"), 20)
    assert type(exc).__name__ == "ModelMismatch"


def test_model_loads_once_before_any_task(
    tiny_model_dir: Path, s3_server: LoopbackS3, redis_url: str, tmp_path: Path
) -> None:
    with WorkerStack(tiny_model_dir, s3_server, tmp_path, name="once", redis=redis_url) as once:
        uri = once.upload("a.png")
        # Tasks wait in the queue before any worker exists.
        pending = [once.send(image=uri, max_new_tokens=4) for _ in range(6)]
        worker = once.worker("once").start()
        results = [r.get(timeout=90) for r in pending]
        log = worker.log()
    assert log.count("model loaded:") == 1
    assert log.index("model loaded:") < log.index("caption worker ready") < log.index("received")
    assert len({r["model_loaded_at"] for r in results}) == 1
    assert len({r["worker"] for r in results}) == 1


def test_cli_submit_waits_for_the_caption(stack: WorkerStack) -> None:
    uri = stack.upload("cli.png")
    env = {**os.environ, **stack.env()}
    out = subprocess.run(
        [CLI, "submit", uri, "--max-new-tokens", "5", "--wait", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["image"] == uri and result["text"].strip() and result["id"]
    status = subprocess.run(
        [CLI, "status", result["id"]], capture_output=True, text=True, timeout=60, env=env
    )
    assert json.loads(status.stdout)["state"] == "SUCCESS"
