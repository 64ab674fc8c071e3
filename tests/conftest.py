"""Shared fixtures: real services on loopback, and the tiny SDNQ model built once per run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# sdnq's import-time torch.compile self-test costs ~20 s on a CPU and tests no feature here.
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

from worker.devstack import LoopbackS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackS3]:
    """A real S3 HTTP server (moto) on a loopback port for the whole test session."""
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with LoopbackS3(log_path=log) as server:
        yield server


@pytest.fixture()
def s3_env(s3_server: LoopbackS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3 in this process at the loopback S3 server."""
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture()
def bucket(s3_server: LoopbackS3) -> str:
    """A fresh, empty bucket on the loopback S3 server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_client(s3_server: LoopbackS3) -> Any:
    """A boto3 client for uploads to the loopback S3 server."""
    return s3_server.client()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL, SDNQ uint4+SVD, saved like a hub repo; built once per run."""
    from worker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen3-vl")


SHARED_REDIS = "redis://127.0.0.1:6379"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis; missing it skips locally but fails in CI."""
    import redis

    try:
        redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI: {exc}")
        pytest.skip(f"no Redis at {SHARED_REDIS}: {exc}")
    return SHARED_REDIS


def worker_env(
    *, model_dir: Path, s3: LoopbackS3, redis_base: str, queue: str, **extra: str
) -> dict[str, str]:
    """Environment for a worker process and its producer: tiny model, loopback S3, Redis."""
    env = {
        **s3.env(),
        "CAPTION_BROKER_URL": f"{redis_base}/0",
        "CAPTION_RESULT_BACKEND": f"{redis_base}/1",
        "CAPTION_QUEUE": queue,
        "CAPTION_MODEL": str(model_dir),
        "CAPTION_DTYPE": "float32",
        "CAPTION_AUTO_DOWNLOAD": "false",
        "CAPTION_MAX_BATCH": "8",
        "CAPTION_TASK_DEADLINE_S": "60",
        "CAPTION_VISIBILITY_TIMEOUT_S": "300",
        "SDNQ_USE_TORCH_COMPILE": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "2",
    }
    env.update(extra)
    return env


def producer(env: dict[str, str]) -> Any:
    """A producer as a web backend would build it: Celery and two URLs, no ``worker`` import."""
    from celery import Celery

    app = Celery(
        "producer", broker=env["CAPTION_BROKER_URL"], backend=env["CAPTION_RESULT_BACKEND"]
    )
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return app


def png_bytes(
    size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    """A small PNG with some structure in it."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle(
        (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(20, 20, 220)
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
