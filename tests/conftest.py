"""Shared fixtures (real services on loopback, the tiny SDNQ model built once per run) and the
folder rule: everything under ``tests/process`` runs real processes and is marked ``slow``.

Folders go by cost: ``unit`` (no processes, no sockets), ``integration`` (real Redis, a real
S3 HTTP server or the tiny model, in this process), ``process`` (real ``celery worker`` or
CLI processes). ``pytest -m "not slow"`` runs the first two.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# sdnq's import-time torch.compile self-test costs ~20 s on a CPU and tests no feature here.
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

from worker.devtools.loopback import LoopbackS3

PROCESS_TESTS = Path(__file__).resolve().parent / "process"
SHARED_REDIS = "redis://127.0.0.1:6379"


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(PROCESS_TESTS):
            item.add_marker(pytest.mark.slow)


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
    from worker.devtools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis; missing it skips locally but fails in CI."""
    from worker.devtools.redis_server import redis_answers

    if not redis_answers(SHARED_REDIS):
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI at {SHARED_REDIS}")
        pytest.skip(f"no Redis at {SHARED_REDIS}")
    return SHARED_REDIS
