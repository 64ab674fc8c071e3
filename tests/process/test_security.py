"""Security with a real worker: the bucket allowlist, request limits, and secrets kept out of
logs, results and Redis.

One real ``celery worker`` process serves the module: the tiny SDNQ model, a password-protected
private redis-server (never the shared Redis on 6379), DEBUG logs, and the loopback S3 server
behind a proxy that records every request the worker makes. The same limits are checked
in-process in ``tests/unit``; ``test_security_tls`` covers ``rediss://``.
"""

from __future__ import annotations

import http.client
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery.result import AsyncResult

from tests.support.fake_s3 import FakeS3Server, S3Handler, s3_error_xml
from tests.support.images import png_bytes
from tests.support.stack import WorkerStack
from tests.support.waits import outcome as _outcome
from worker.devtools.loopback import LoopbackS3
from worker.devtools.processes import WorkerProcess
from worker.devtools.redis_server import RedisServer

pytestmark = pytest.mark.timeout(300)

# Distinctive limits, so a number in a message can only be the limit.
MAX_PROMPT_CHARS = 173
MAX_NEW_TOKENS_LIMIT = 61
NON_S3_URIS = [
    "http://example.com/cat.png",
    "https://example.com/cat.png",
    "file:///etc/passwd",
]


def _failure(result: AsyncResult) -> BaseException:
    state, value = _outcome(result)
    assert state == "FAILURE", (state, value)
    assert isinstance(value, BaseException)
    return value


def _dump(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key of one database with all its contents, as raw bytes."""
    out: dict[bytes, bytes] = {}
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        if kind == b"string":
            out[key] = client.get(key) or b""
        elif kind == b"hash":
            out[key] = b"\n".join(k + b"=" + v for k, v in client.hgetall(key).items())
        elif kind == b"list":
            out[key] = b"\n".join(client.lrange(key, 0, -1))
        elif kind == b"set":
            out[key] = b"\n".join(sorted(client.smembers(key)))
        elif kind == b"zset":
            out[key] = b"\n".join(client.zrange(key, 0, -1))
    return out


class _StoreProxyHandler(S3Handler):
    server: StoreProxy

    def do_GET(self) -> None:
        self.server.record(self.path)
        if "/fault/" in self.path:
            body = s3_error_xml("ServiceUnavailable", "Please try again.", request_id="proxy")
            self.reply(503, body, [("Content-Type", "application/xml")])
            return
        upstream = http.client.HTTPConnection(self.server.upstream_host, timeout=10)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            upstream.request("GET", self.path, headers=headers)
            response = upstream.getresponse()
            body = response.read()
            passed = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
                and k.lower() not in ("server", "date")
            ]
            self.reply(response.status, body, passed)
        finally:
            upstream.close()


class StoreProxy(FakeS3Server):
    """Forwards S3 GETs to moto and records their paths; keys under ``fault/`` answer 503."""

    def __init__(self, upstream: str) -> None:
        super().__init__(_StoreProxyHandler)
        self.upstream_host = urlsplit(upstream).netloc
        self._lock = threading.Lock()
        self._paths: list[str] = []

    def record(self, path: str) -> None:
        with self._lock:
            self._paths.append(path.partition("?")[0])

    def paths(self) -> list[str]:
        with self._lock:
            return list(self._paths)


@dataclass
class SecureStack:
    """One worker with an allowlist, DEBUG logs, a password-protected Redis and an S3 proxy."""

    stack: WorkerStack
    redis: RedisServer
    proxy: StoreProxy
    worker: WorkerProcess
    allowed: str  # bucket on the allowlist, with cat.png
    also_allowed: str  # on the allowlist too; never used by any task
    denied: str  # a real bucket with cat.png, not on the allowlist
    redis_password: str
    aws_secret: str

    @property
    def app(self) -> Any:
        return self.stack.producer

    def send(self, **kwargs: Any) -> AsyncResult:
        return self.stack.send(**kwargs)


@pytest.fixture(scope="module")
def secure(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureStack]:
    base = tmp_path_factory.mktemp("security")
    # Only [a-z0-9-]: any form a URL or log could quote them in contains them verbatim.
    redis_password = f"redis-pw-{secrets.token_hex(16)}"
    aws_secret = f"aws-secret-{secrets.token_hex(16)}"
    s3 = s3_server.client()
    with (
        RedisServer(base / "redis", appendonly=False, password=redis_password) as server,
        StoreProxy(s3_server.endpoint_url) as proxy,
        WorkerStack(
            tiny_model_dir,
            s3_server,
            base,
            name="sec-ok",
            redis=server,
            task_defaults={"max_new_tokens": 4},
            AWS_ENDPOINT_URL_S3=proxy.endpoint_url,
            AWS_SECRET_ACCESS_KEY=aws_secret,
            CAPTION_LOG_LEVEL="DEBUG",
            CAPTION_MAX_PROMPT_CHARS=str(MAX_PROMPT_CHARS),
            CAPTION_MAX_NEW_TOKENS_LIMIT=str(MAX_NEW_TOKENS_LIMIT),
            # A storage fault: two requests per attempt, one task retry, then FAILURE.
            CAPTION_S3_MAX_ATTEMPTS="2",
            CAPTION_STORAGE_RETRIES="1",
            CAPTION_STORAGE_RETRY_BACKOFF_S="0.2",
        ) as stack,
    ):
        # Names that do not contain each other, so a message naming one cannot show another.
        tag = stack.bucket.rsplit("-", 1)[1]
        allowed, also_allowed, denied = stack.bucket, f"sec-also-{tag}", f"sec-no-{tag}"
        s3.create_bucket(Bucket=denied)
        for bucket in (allowed, denied):
            s3.put_object(Bucket=bucket, Key="cat.png", Body=png_bytes())
        worker = stack.start_worker("secure", CAPTION_ALLOWED_BUCKETS=f"{allowed},{also_allowed}")
        yield SecureStack(
            stack=stack,
            redis=server,
            proxy=proxy,
            worker=worker,
            allowed=allowed,
            also_allowed=also_allowed,
            denied=denied,
            redis_password=redis_password,
            aws_secret=aws_secret,
        )


@pytest.mark.timeout(300)
def test_bucket_off_the_allowlist_is_denied_without_naming_the_allowed_ones(
    secure: SecureStack, s3_client: Any
) -> None:
    ok_uri = f"s3://{secure.allowed}/cat.png"
    denied_uri = f"s3://{secure.denied}/cat.png"
    assert s3_client.head_object(Bucket=secure.denied, Key="cat.png")  # exists in the store

    ok = secure.send(image=ok_uri)
    denied = secure.send(image=denied_uri)

    state, value = _outcome(ok)
    assert state == "SUCCESS", value
    assert value["image"] == ok_uri and value["text"]
    exc = _failure(denied)
    assert type(exc).__name__ == "ImageAccessDenied"
    message = str(exc)
    assert denied_uri in message
    meta = secure.app.backend.get_task_meta(denied.id, cache=False)
    for shown in (message, meta["traceback"] or ""):
        assert secure.allowed not in shown and secure.also_allowed not in shown
    paths = secure.proxy.paths()
    assert f"/{secure.allowed}/cat.png" in paths
    # Refused by the worker itself: the store never saw a request for the denied bucket.
    assert not [p for p in paths if p.startswith(f"/{secure.denied}/")]


@pytest.mark.timeout(300)
def test_worker_rejects_over_limit_requests_and_non_s3_uris(
    secure: SecureStack, s3_client: Any
) -> None:
    for key in ("limits/prompt.png", "limits/tokens.png"):
        s3_client.put_object(Bucket=secure.allowed, Key=key, Body=png_bytes())
    long_prompt = secure.send(
        image=f"s3://{secure.allowed}/limits/prompt.png", prompt="p" * (MAX_PROMPT_CHARS + 1)
    )
    many_tokens = secure.send(
        image=f"s3://{secure.allowed}/limits/tokens.png", max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1
    )
    non_s3 = {uri: secure.send(image=uri) for uri in NON_S3_URIS}

    for result, needle in ((long_prompt, "prompt"), (many_tokens, "max_new_tokens")):
        exc = _failure(result)
        assert type(exc).__name__ == "InvalidRequest", exc
        assert needle in str(exc)
    assert str(MAX_PROMPT_CHARS) in str(long_prompt.result)
    assert str(MAX_NEW_TOKENS_LIMIT) in str(many_tokens.result)
    for uri, result in non_s3.items():
        exc = _failure(result)
        assert type(exc).__name__ == "InvalidRequest", (uri, exc)
        assert "s3://" in str(exc)
        assert "root:" not in str(exc)  # nothing of /etc/passwd was read
    # Rejected before any download.
    assert not [p for p in secure.proxy.paths() if "/limits/" in p]


@pytest.mark.timeout(300)
def test_credentials_never_reach_logs_or_results(secure: SecureStack) -> None:
    expected = {
        f"s3://{secure.allowed}/cat.png": "SUCCESS",
        f"s3://{secure.allowed}/no/such/key.png": "ImageNotFound",
        f"s3://{secure.denied}/cat.png": "ImageAccessDenied",
        f"s3://{secure.allowed}/fault/cat.png": "StorageUnavailable",
        "https://example.com/cat.png": "InvalidRequest",
    }
    results = {uri: secure.send(image=uri) for uri in expected}
    for uri, result in results.items():
        state, value = _outcome(result)
        got = state if state == "SUCCESS" else type(value).__name__
        assert got == expected[uri], (uri, state, value)
    # The storage fault went through boto3's retries and one task retry.
    assert secure.proxy.paths().count(f"/{secure.allowed}/fault/cat.png") >= 4

    log = secure.worker.log()
    # The log is worth searching: DEBUG output, the Redis endpoint, every failure's traceback.
    assert "DEBUG/" in log
    assert f"127.0.0.1:{secure.redis.port}" in log
    for name in ("ImageNotFound", "ImageAccessDenied", "StorageUnavailable", "Traceback"):
        assert name in log, name
    backend = secure.redis.client(db=1)
    metas = {
        key: value for key, value in _dump(backend).items() if key.startswith(b"celery-task-meta-")
    }
    stored = {key.decode().removeprefix("celery-task-meta-") for key in metas}
    assert {str(r.id) for r in results.values()} <= stored
    failed = [str(r.id) for uri, r in results.items() if expected[uri] != "SUCCESS"]
    for task_id in failed:  # failure messages and tracebacks are stored for producers
        meta = json.loads(metas[f"celery-task-meta-{task_id}".encode()])
        assert meta["status"] == "FAILURE" and meta["traceback"].startswith("Traceback"), meta

    for secret in (secure.redis_password, secure.aws_secret):
        assert not [line[:300] for line in log.splitlines() if secret in line]
        assert not [key for key, value in metas.items() if secret.encode() in value]
        for db in (0, 1):  # the queue, unacked messages, counters: anything the worker wrote
            everything = _dump(secure.redis.client(db=db))
            assert not [k for k, v in everything.items() if secret.encode() in k + v], db
    for result in results.values():
        assert secure.aws_secret not in repr(result.result)
        assert secure.redis_password not in repr(result.result)
