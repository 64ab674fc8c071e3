"""Verified TLS to Redis: ``rediss://`` with the server's CA captions end to end; with another
CA nothing is published or consumed.

A private TLS-only redis-server (no plaintext listener) serves the module; each test runs its
own real ``celery worker`` process with the tiny SDNQ model and the loopback S3 server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.stack import WorkerStack
from tests.support.tls import TlsFiles, make_tls_files
from tests.support.waits import READY_TIMEOUT_S, outcome, wait_until
from worker.devtools.loopback import LoopbackS3
from worker.devtools.redis_server import RedisServer

pytestmark = pytest.mark.timeout(300)

#: Publish one task with certificate verification against the CA in argv[2]; print the
#: exception chain and exit 1 if publishing fails, exit 0 if it was sent.
_PUBLISH_ONCE = """
import ssl, sys
from celery import Celery
url, ca = sys.argv[1], sys.argv[2]
app = Celery("producer", broker=url)
app.conf.update(broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca})
try:
    app.send_task("caption", kwargs={"image": "s3://b/k.png"}, retry=False, ignore_result=True)
except Exception as exc:
    chain = exc
    while chain is not None:
        print(f"{type(chain).__name__}: {chain}")
        chain = chain.__cause__ or chain.__context__
    sys.exit(1)
print("sent")
"""


def _need(reason: str) -> NoReturn:
    """Skip for a missing prerequisite locally; in CI (env CI set) fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(
    tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    try:
        server = RedisServer(
            tmp_path_factory.mktemp("tls-redis"), appendonly=False, tls=tls_files.server()
        )
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        _need(f"this redis-server cannot serve TLS: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def tls_stack(
    tls_redis: RedisServer, tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> Iterator[WorkerStack]:
    """A queue on the TLS server; the producer trusts the server's real CA."""
    with WorkerStack(
        tiny_model_dir,
        s3_server,
        tmp_path,
        name="tls",
        redis=tls_redis,
        task_defaults={"max_new_tokens": 4},
    ) as stack:
        stack.task_defaults["image"] = stack.upload("cat.png")
        yield stack


def test_rediss_with_the_servers_ca_captions_end_to_end(
    tls_stack: WorkerStack, tls_files: TlsFiles, tls_redis: RedisServer
) -> None:
    worker = tls_stack.start_worker("tls", CAPTION_REDIS_CA_CERTS=str(tls_files.ca))
    state, value = outcome(tls_stack.send())
    log = worker.log()
    assert state == "SUCCESS", (value, log[-3000:])
    assert value["image"] == tls_stack.task_defaults["image"] and value["text"]
    assert f"rediss://127.0.0.1:{tls_redis.port}" in log
    assert "CERTIFICATE_VERIFY_FAILED" not in log


def test_rediss_with_another_ca_fails_verification_and_runs_nothing(
    tls_stack: WorkerStack, tls_files: TlsFiles, tmp_path: Path
) -> None:
    # A producer process that trusts the impostor CA cannot even publish. (A fresh process:
    # kombu's process-wide producer pool is keyed without the SSL options, so in this
    # process an earlier test's verified connection to the same server would be reused.)
    publish = subprocess.run(
        [
            sys.executable,
            "-c",
            _PUBLISH_ONCE,
            tls_stack.env()["CAPTION_BROKER_URL"],
            str(tls_files.impostor_ca),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert publish.returncode == 1, (publish.stdout, publish.stderr[-2000:])
    assert "CERTIFICATE_VERIFY_FAILED" in publish.stdout, publish.stdout

    # A task waits in the queue (published with the right CA) for a worker that trusts the
    # impostor CA: the worker must refuse the server's certificate and take nothing.
    waiting = tls_stack.send()
    worker = tls_stack.worker("impostor", CAPTION_REDIS_CA_CERTS=str(tls_files.impostor_ca))
    worker.start()
    wait_until(
        lambda: "CERTIFICATE_VERIFY_FAILED" in worker.log() or worker.proc.poll() is not None,
        READY_TIMEOUT_S,
        "the worker logs a certificate verification failure",
    )
    assert "CERTIFICATE_VERIFY_FAILED" in worker.log(), worker.log()[-3000:]
    time.sleep(3.0)  # room for a wrongly successful connection to take the task
    assert worker.proc is not None and worker.proc.poll() is None  # still retrying
    state = tls_stack.meta(waiting.id)["status"]
    queued = tls_stack.waiting()
    log = worker.log()
    worker.stop(timeout_s=20)

    assert state == "PENDING"
    assert queued == 1
    assert f"Task caption[{waiting.id}]" not in log
    assert "certificate verify failed" in log
