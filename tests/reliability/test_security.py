"""Security: the bucket allowlist, secrets kept out of logs and results, verified TLS to Redis,
and request limits.

The process-level tests run real ``celery worker`` processes with the tiny SDNQ model and the
loopback S3 server, against private redis-servers (one with ``requirepass``, one TLS-only),
never the shared Redis on 6379. The unit tests check the same limits in-process.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
import redis
from celery.result import AsyncResult

from tests.conftest import png_bytes, producer, worker_env
from tests.support.processes import pythonpath, wait_until
from worker.devstack import LoopbackS3, WorkerProcess, free_port
from worker.errors import InvalidRequest
from worker.request import parse_request
from worker.settings import Settings
from worker.storage import S3Location

READY_TIMEOUT_S = 180.0  # model load on a busy 2-core machine
TASK_TIMEOUT_S = 60.0
# Distinctive limits, so a number in a message can only be the limit.
MAX_PROMPT_CHARS = 173
MAX_NEW_TOKENS_LIMIT = 61
NON_S3_URIS = [
    "http://example.com/cat.png",
    "https://example.com/cat.png",
    "file:///etc/passwd",
]


def _need(reason: str) -> NoReturn:
    """Skip for a missing prerequisite locally; in CI (env CI set) fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def _outcome(result: AsyncResult, timeout_s: float = TASK_TIMEOUT_S) -> tuple[str, Any]:
    """(state, result or exception) once the task has finished."""
    value = result.get(timeout=timeout_s, propagate=False, interval=0.2)
    return result.state, value


def _failure(result: AsyncResult) -> BaseException:
    state, value = _outcome(result)
    assert state == "FAILURE", (state, value)
    assert isinstance(value, BaseException)
    return value


# --- Unit level: request limits and URI schemes ------------------------------------------------


def _limits() -> Settings:
    return Settings(max_prompt_chars=MAX_PROMPT_CHARS, max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT)


def test_prompt_at_the_limit_is_accepted() -> None:
    prompt = "é" * MAX_PROMPT_CHARS  # characters, not UTF-8 bytes, are counted
    request = parse_request({"image": "s3://bkt/k.png", "prompt": prompt}, _limits())
    assert request.prompt == prompt


@pytest.mark.parametrize("length", [MAX_PROMPT_CHARS + 1, 1_000_000])
def test_prompt_over_the_limit_is_invalid_and_names_the_limit(length: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"image": "s3://bkt/k.png", "prompt": "x" * length}, _limits())
    message = str(caught.value)
    assert "prompt" in message
    assert str(MAX_PROMPT_CHARS) in message
    assert len(message) < 300  # the prompt is not echoed into results and logs


def test_max_new_tokens_at_the_limit_is_accepted() -> None:
    kwargs = {"image": "s3://bkt/k.png", "max_new_tokens": MAX_NEW_TOKENS_LIMIT}
    assert parse_request(kwargs, _limits()).max_new_tokens == MAX_NEW_TOKENS_LIMIT


@pytest.mark.parametrize("tokens", [MAX_NEW_TOKENS_LIMIT + 1, 2**31])
def test_max_new_tokens_over_the_limit_is_invalid_and_names_the_limit(tokens: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"image": "s3://bkt/k.png", "max_new_tokens": tokens}, _limits())
    message = str(caught.value)
    assert "max_new_tokens" in message
    assert str(MAX_NEW_TOKENS_LIMIT) in message


@pytest.mark.parametrize("uri", NON_S3_URIS)
def test_non_s3_uri_is_invalid(uri: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        S3Location.parse(uri)
    assert "s3://" in str(caught.value)


# --- Process level: helpers --------------------------------------------------------------------


class PrivateRedis:
    """A redis-server child process started with extra arguments (requirepass, TLS-only)."""

    def __init__(
        self, data_dir: Path, port: int, args: list[str], client_kwargs: dict[str, Any]
    ) -> None:
        if shutil.which("redis-server") is None:
            _need("redis-server is not installed")
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.port = port
        self.args = args
        self.client_kwargs = client_kwargs
        self.log_path = data_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15) -> PrivateRedis:
        """Start; raise RuntimeError with the server's log if it exits or never answers."""
        args = [
            "redis-server", "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "no", *self.args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = self.client(socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self.log()[-1500:]}")
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING:\n{self.log()[-1500:]}")

    def client(self, db: int = 0, **extra: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, **self.client_kwargs, **extra)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


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


def _queue_length(client: redis.Redis, queue: str) -> int:
    """Messages still waiting in the queue's Redis lists (not reserved by any worker)."""
    keys = [k for k in client.scan_iter(match=f"{queue}*") if client.type(k) == b"list"]
    return sum(int(client.llen(k)) for k in keys)


class _StoreProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: StoreProxy

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.server.record(self.path)
        if "/fault/" in self.path:
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                b"<Message>Please try again.</Message><RequestId>proxy</RequestId></Error>"
            )
            self._reply(503, [("Content-Type", "application/xml")], body)
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
            self._reply(response.status, passed, body)
        finally:
            upstream.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class StoreProxy(ThreadingHTTPServer):
    """Forwards S3 GETs to moto and records their paths; keys under ``fault/`` answer 503."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _StoreProxyHandler)
        self.upstream_host = urlsplit(upstream).netloc
        self._lock = threading.Lock()
        self._paths: list[str] = []
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name="s3-proxy", daemon=True
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, path: str) -> None:
        with self._lock:
            self._paths.append(path.partition("?")[0])

    def paths(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def start(self) -> StoreProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


# --- Process level: allowlist, secrets, request limits -----------------------------------------


@dataclass
class SecureStack:
    """One worker with an allowlist, DEBUG logs, a password-protected Redis and an S3 proxy."""

    env: dict[str, str]
    redis: PrivateRedis
    proxy: StoreProxy
    worker: WorkerProcess
    app: Any
    queue: str
    allowed: str  # bucket on the allowlist, with cat.png
    also_allowed: str  # on the allowlist too; never used by any task
    denied: str  # a real bucket with cat.png, not on the allowlist
    redis_password: str
    aws_secret: str

    def send(self, **kwargs: Any) -> AsyncResult:
        kwargs.setdefault("max_new_tokens", 4)
        return self.app.send_task("caption", kwargs=kwargs, queue=self.queue)


@pytest.fixture(scope="module")
def secure(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureStack]:
    base = tmp_path_factory.mktemp("security")
    # Only [a-z0-9-]: any form a URL or log could quote them in contains them verbatim.
    redis_password = f"redis-pw-{secrets.token_hex(16)}"
    aws_secret = f"aws-secret-{secrets.token_hex(16)}"
    tag = uuid.uuid4().hex[:8]
    allowed, also_allowed, denied = f"sec-ok-{tag}", f"sec-also-{tag}", f"sec-no-{tag}"
    s3 = s3_server.client()
    for bucket in (allowed, denied):
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="cat.png", Body=png_bytes())
    port = free_port()
    server = PrivateRedis(
        base / "redis",
        port,
        ["--port", str(port), "--requirepass", redis_password],
        {"password": redis_password},
    ).start()
    proxy = StoreProxy(s3_server.endpoint_url).start()
    queue = f"sec-{tag}"
    env = worker_env(
        model_dir=tiny_model_dir,
        s3=s3_server,
        redis_base=f"redis://:{redis_password}@127.0.0.1:{port}",
        queue=queue,
        PYTHONPATH=pythonpath(),
        AWS_ENDPOINT_URL_S3=proxy.endpoint_url,
        AWS_SECRET_ACCESS_KEY=aws_secret,
        CAPTION_LOG_LEVEL="DEBUG",
        CAPTION_ALLOWED_BUCKETS=f"{allowed},{also_allowed}",
        CAPTION_MAX_PROMPT_CHARS=str(MAX_PROMPT_CHARS),
        CAPTION_MAX_NEW_TOKENS_LIMIT=str(MAX_NEW_TOKENS_LIMIT),
        # A storage fault: two requests per attempt, one task retry, then FAILURE.
        CAPTION_S3_MAX_ATTEMPTS="2",
        CAPTION_STORAGE_RETRIES="1",
        CAPTION_STORAGE_RETRY_BACKOFF_S="0.2",
    )
    worker = WorkerProcess(env, base / "worker.log")
    app = producer(env)
    try:
        worker.start().wait_ready(READY_TIMEOUT_S)
        yield SecureStack(
            env=env,
            redis=server,
            proxy=proxy,
            worker=worker,
            app=app,
            queue=queue,
            allowed=allowed,
            also_allowed=also_allowed,
            denied=denied,
            redis_password=redis_password,
            aws_secret=aws_secret,
        )
    finally:
        worker.stop(timeout_s=30)
        app.close()
        proxy.stop()
        server.stop()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- Process level: rediss:// with certificate verification ------------------------------------


@dataclass
class TlsFiles:
    ca: Path  # signed the server's certificate
    impostor_ca: Path  # same subject name, another key: must not be trusted
    cert: Path
    key: Path


def _make_tls_files(directory: Path) -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "caption test CA")])

    def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = make_ca()
    _, impostor_cert = make_ca()
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca=directory / "ca.pem",
        impostor_ca=directory / "impostor-ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
    )
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.impostor_ca.write_bytes(impostor_cert.public_bytes(pem))
    files.cert.write_bytes(server_cert.public_bytes(pem))
    files.key.write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


@dataclass
class TlsStack:
    files: TlsFiles
    redis: PrivateRedis
    base: Path

    @property
    def redis_base(self) -> str:
        return f"rediss://127.0.0.1:{self.redis.port}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    base = tmp_path_factory.mktemp("tls")
    files = _make_tls_files(base)
    port = free_port()
    # TLS only (--port 0): there is no plaintext listener to fall back to.
    args = [
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(files.cert), "--tls-key-file", str(files.key),
        "--tls-ca-cert-file", str(files.ca), "--tls-auth-clients", "no",
    ]  # fmt: skip
    verify = {"ssl": True, "ssl_ca_certs": str(files.ca), "ssl_cert_reqs": "required"}
    server = PrivateRedis(base / "redis", port, args, verify)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        _need(f"this redis-server cannot serve TLS: {exc}")
    try:
        yield TlsStack(files, server, base)
    finally:
        server.stop()


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


def _tls_producer(env: dict[str, str], ca: Path) -> Any:
    app = producer(env)
    verify = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    app.conf.update(broker_use_ssl=verify, redis_backend_use_ssl=verify)
    return app


def _tls_env(
    tls: TlsStack, tiny_model_dir: Path, s3_server: LoopbackS3, ca: Path
) -> tuple[dict[str, str], str]:
    tag = uuid.uuid4().hex[:8]
    bucket = f"tls-{tag}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="cat.png", Body=png_bytes())
    env = worker_env(
        model_dir=tiny_model_dir,
        s3=s3_server,
        redis_base=tls.redis_base,
        queue=f"tls-{tag}",
        PYTHONPATH=pythonpath(),
        CAPTION_REDIS_CA_CERTS=str(ca),
    )
    return env, f"s3://{bucket}/cat.png"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rediss_with_the_servers_ca_captions_end_to_end(
    tls: TlsStack, tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> None:
    env, image = _tls_env(tls, tiny_model_dir, s3_server, tls.files.ca)
    app = _tls_producer(env, tls.files.ca)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.start().wait_ready(READY_TIMEOUT_S)
        result = app.send_task(
            "caption", kwargs={"image": image, "max_new_tokens": 4}, queue=env["CAPTION_QUEUE"]
        )
        state, value = _outcome(result)
        log = worker.log()
    finally:
        worker.stop(timeout_s=30)
        app.close()
    assert state == "SUCCESS", (value, log[-3000:])
    assert value["image"] == image and value["text"]
    assert f"rediss://127.0.0.1:{tls.redis.port}" in log
    assert "CERTIFICATE_VERIFY_FAILED" not in log


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rediss_with_another_ca_fails_verification_and_runs_nothing(
    tls: TlsStack, tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> None:
    env, image = _tls_env(tls, tiny_model_dir, s3_server, tls.files.impostor_ca)
    queue = env["CAPTION_QUEUE"]
    kwargs = {"image": image, "max_new_tokens": 4}

    # A producer process that trusts the impostor CA cannot even publish. (A fresh process:
    # kombu's process-wide producer pool is keyed without the SSL options, so in this
    # process an earlier test's verified connection to the same server would be reused.)
    publish = subprocess.run(
        [
            sys.executable,
            "-c",
            _PUBLISH_ONCE,
            env["CAPTION_BROKER_URL"],
            str(tls.files.impostor_ca),
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
    right = _tls_producer(env, tls.files.ca)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        waiting = right.send_task("caption", kwargs=kwargs, queue=queue)
        worker.start()
        wait_until(
            lambda: "CERTIFICATE_VERIFY_FAILED" in worker.log() or worker.proc.poll() is not None,
            READY_TIMEOUT_S,
            "the worker logs a certificate verification failure",
        )
        assert "CERTIFICATE_VERIFY_FAILED" in worker.log(), worker.log()[-3000:]
        time.sleep(3.0)  # room for a wrongly successful connection to take the task
        assert worker.proc is not None and worker.proc.poll() is None  # still retrying
        state = right.backend.get_task_meta(waiting.id, cache=False)["status"]
        queued = _queue_length(tls.redis.client(0), queue)
        log = worker.log()
    finally:
        worker.stop(timeout_s=20)
        right.close()
    assert state == "PENDING"
    assert queued == 1
    assert f"Task caption[{waiting.id}]" not in log
    assert "certificate verify failed" in log
