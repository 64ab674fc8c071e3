"""The whole path: S3 upload -> send_task -> a separate worker process -> result in Redis.

The producer side uses only ``celery.Celery(...).send_task`` and ``AsyncResult``, as a web
backend in another codebase would.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from tests.conftest import png_bytes, producer, worker_env
from worker.devstack import LoopbackS3, WorkerProcess

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


@pytest.fixture(scope="module")
def stack(
    tiny_model_dir: Path,
    s3_server: LoopbackS3,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    queue = f"e2e-{uuid.uuid4().hex[:8]}"
    env = worker_env(model_dir=tiny_model_dir, s3=s3_server, redis_base=redis_url, queue=queue)
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with WorkerProcess(env, log) as proc:
        app = producer(env)
        yield {"env": env, "app": app, "queue": queue, "bucket": bucket, "proc": proc}
        app.close()


def send(stack: dict[str, Any], **kwargs: Any) -> AsyncResult:
    return stack["app"].send_task("caption", kwargs=kwargs, queue=stack["queue"])


def failure_of(result: AsyncResult, timeout: float = 20) -> BaseException:
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        result.get(timeout=timeout, propagate=True)
    assert time.monotonic() - started < timeout
    assert result.state == "FAILURE"
    return info.value


def test_caption_success_carries_the_whole_contract(
    stack: dict[str, Any], s3_server: LoopbackS3, tiny_model_dir: Path
) -> None:
    s3_server.client().put_object(Bucket=stack["bucket"], Key="cats/one.png", Body=png_bytes())
    uri = f"s3://{stack['bucket']}/cats/one.png"

    result = send(stack, image=uri, max_new_tokens=8).get(timeout=60)

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


def test_same_request_gives_same_caption(stack: dict[str, Any], s3_server: LoopbackS3) -> None:
    s3_server.client().put_object(Bucket=stack["bucket"], Key="same.png", Body=png_bytes())
    uri = f"s3://{stack['bucket']}/same.png"
    first, second = (send(stack, image=uri, max_new_tokens=6) for _ in range(2))
    assert first.get(timeout=60)["text"] == second.get(timeout=60)["text"]


def test_missing_key_fails_with_image_not_found(stack: dict[str, Any]) -> None:
    exc = failure_of(send(stack, image=f"s3://{stack['bucket']}/no/such/key.png"))
    assert type(exc).__name__ == "ImageNotFound"
    assert "no/such/key.png" in str(exc)


def test_non_image_object_fails_with_invalid_image(
    stack: dict[str, Any], s3_server: LoopbackS3
) -> None:
    s3_server.client().put_object(Bucket=stack["bucket"], Key="notes.txt", Body=b"hello world")
    exc = failure_of(send(stack, image=f"s3://{stack['bucket']}/notes.txt"))
    assert type(exc).__name__ == "InvalidImage"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"image": "s3://bkt/k.png", "colour": "red"}, "unknown argument 'colour'"),
        ({"image": "s3://bkt/k.png", "max_new_tokens": "12"}, "max_new_tokens"),
        ({"image": "s3://bkt/k.png", "max_new_tokens": 0}, "max_new_tokens"),
        ({"image": 42}, "image"),
        ({"prompt": "no image"}, "image"),
        ({"image": "https://example.com/cat.png"}, "s3://"),
    ],
)
def test_bad_arguments_fail_with_invalid_request(
    stack: dict[str, Any], kwargs: dict[str, Any], needle: str
) -> None:
    exc = failure_of(send(stack, **kwargs))
    assert type(exc).__name__ == "InvalidRequest"
    assert needle in str(exc)


def test_wrong_model_fails_with_model_mismatch(stack: dict[str, Any]) -> None:
    exc = failure_of(send(stack, image="s3://bkt/k.png", model="someone/other-model"))
    assert type(exc).__name__ == "ModelMismatch"


def test_model_loads_once_before_any_task(
    tiny_model_dir: Path, s3_server: LoopbackS3, redis_url: str, tmp_path: Path
) -> None:
    queue = f"once-{uuid.uuid4().hex[:8]}"
    env = worker_env(model_dir=tiny_model_dir, s3=s3_server, redis_base=redis_url, queue=queue)
    bucket = f"once-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="a.png", Body=png_bytes())
    app = producer(env)
    # Tasks wait in the queue before any worker exists.
    pending = [
        app.send_task(
            "caption", kwargs={"image": f"s3://{bucket}/a.png", "max_new_tokens": 4}, queue=queue
        )
        for _ in range(6)
    ]
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        results = [r.get(timeout=90) for r in pending]
        log = worker.log()
    finally:
        worker.stop()
        app.close()
    assert log.count("model loaded:") == 1
    assert log.index("model loaded:") < log.index("caption worker ready") < log.index("received")
    assert len({r["model_loaded_at"] for r in results}) == 1
    assert len({r["worker"] for r in results}) == 1


def test_cli_submit_waits_for_the_caption(stack: dict[str, Any], s3_server: LoopbackS3) -> None:
    import json
    import os
    import subprocess
    import sys

    s3_server.client().put_object(Bucket=stack["bucket"], Key="cli.png", Body=png_bytes())
    cli = str(Path(sys.executable).with_name("caption-worker"))
    uri = f"s3://{stack['bucket']}/cli.png"
    out = subprocess.run(
        [cli, "submit", uri, "--max-new-tokens", "5", "--wait", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **stack["env"]},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["image"] == uri and result["text"].strip() and result["id"]
    status = subprocess.run(
        [cli, "status", result["id"]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **stack["env"]},
    )
    assert json.loads(status.stdout)["state"] == "SUCCESS"
