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

from worker.devstack import LoopbackS3  # noqa: E402


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
