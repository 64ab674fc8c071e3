"""ObjectStore against real HTTP servers: moto's S3, and a fault-injecting S3 look-alike.

Every request goes over a loopback socket through boto3's real retry, timeout and streaming
code, so these tests pin what producers see when a store misbehaves.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support.fake_s3 import FakeS3Server, S3Handler, s3_error_xml
from worker.devtools.loopback import LoopbackS3
from worker.errors import (
    CaptionError,
    ImageAccessDenied,
    ImageNotFound,
    ImageTooLarge,
    StorageUnavailable,
)
from worker.settings import Settings
from worker.storage.s3 import ObjectStore, S3Location

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
CAP = 1 * MiB
MAX_ATTEMPTS = 3
SECRET = "fault-secret-DO-NOT-LEAK-0123456789"
FAULT_BUCKET = "faults"
SMALL_BODY = bytes(range(256)) * 40  # 10 KiB, every byte value
HUGE_BYTES = 32 * MiB  # above any loopback socket buffering, so a full send proves a full read
FILLER = b"\xab" * (64 * 1024)
STALL_S = 2.0


class FaultHandler(S3Handler):
    """Answers GET /faults/<key> by the key's name: each key is one way a store misbehaves."""

    server: FaultServer

    def do_GET(self) -> None:
        key = self.path.partition("?")[0].removeprefix(f"/{FAULT_BUCKET}/")
        count = self.server.record(key, {k.lower(): v for k, v in self.headers.items()})
        try:
            self._answer(key, count)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.server.write_errors[key] = exc
            self.close_connection = True
        finally:
            self.server.done[key].set()

    def _answer(self, key: str, count: int) -> None:
        if key == "ok":
            self._send(200, SMALL_BODY)
        elif key == "denied":
            self._send(403, s3_error_xml("AccessDenied", "Access Denied"))
        elif key == "slowdown":
            self._send(503, s3_error_xml("SlowDown", "Please reduce your request rate."))
        elif key == "flaky":  # two 503s, then the object
            if count <= 2:
                # Not a throttling code, so boto3 backs off ~50 ms, not ~1 s, between tries.
                self._send(503, s3_error_xml("ServiceUnavailable", "Please try again."))
            else:
                self._send(200, SMALL_BODY)
        elif key == "drop":  # close with RST before any response byte
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif key == "half":  # honest Content-Length, half the body, then close
            self.send_response(200)
            self.send_header("Content-Length", str(len(SMALL_BODY)))
            self.end_headers()
            self.wfile.write(SMALL_BODY[: len(SMALL_BODY) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif key == "stall":  # headers and a little body, then silence past the read timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(SMALL_BODY)))
            self.end_headers()
            self.wfile.write(SMALL_BODY[:1024])
            self.wfile.flush()
            time.sleep(STALL_S)
            self.wfile.write(SMALL_BODY[1024:])
        elif key == "huge":  # honest Content-Length far over the cap
            self.send_response(200)
            self.send_header("Content-Length", str(HUGE_BYTES))
            self.end_headers()
            self._stream(HUGE_BYTES, chunked=False)
        elif key == "chunked-huge":  # no Content-Length at all: only the bytes tell
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._stream(20 * MiB, chunked=True)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, s3_error_xml("NoSuchKey", "The specified key does not exist."))

    def _send(self, status: int, body: bytes) -> None:
        kind = "application/xml" if status >= 300 else "image/png"
        self.reply(status, body, [("Content-Type", kind)])

    def _stream(self, total: int, *, chunked: bool) -> None:
        sent = 0
        while sent < total:
            piece = FILLER[: total - sent]
            if chunked:
                self.wfile.write(b"%x\r\n" % len(piece))
            self.wfile.write(piece)
            if chunked:
                self.wfile.write(b"\r\n")
            sent += len(piece)
            self.server.bytes_sent[self.path] = sent


class FaultServer(FakeS3Server):
    """An S3 look-alike on 127.0.0.1 that misbehaves on purpose, per key."""

    def __init__(self) -> None:
        super().__init__(FaultHandler)
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes_sent: dict[str, int] = {}
        self.write_errors: dict[str, BaseException] = {}
        self.done: dict[str, threading.Event] = {}
        self.headers: dict[str, dict[str, str]] = {}

    def record(self, key: str, headers: dict[str, str]) -> int:
        with self.lock:
            self.requests[key] += 1
            self.headers[key] = headers
            self.done.setdefault(key, threading.Event()).clear()
            return self.requests[key]


@pytest.fixture()
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


def _isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """Point boto3 at ``endpoint`` and away from any real AWS config on this machine."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fault-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "s3_addressing_style": "path",
        "s3_connect_timeout_s": 2.0,
        "s3_read_timeout_s": 2.0,
        "s3_max_attempts": MAX_ATTEMPTS,
        "max_image_bytes": CAP,
        "allowed_buckets": (),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture()
def fault_store(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> ObjectStore:
    _isolate_aws_env(monkeypatch, tmp_path, fault_server.endpoint_url)
    return ObjectStore(_settings())


def _loc(key: str) -> S3Location:
    return S3Location(FAULT_BUCKET, key)


def _assert_no_secret(exc: BaseException) -> None:
    # The whole chain, as a log line would show it, not just the producer-visible message.
    text = "".join(traceback.format_exception(exc))
    assert SECRET not in text


# --- (a) moto's S3 server ----------------------------------------------------------------------


@pytest.fixture()
def moto_settings(s3_env: dict[str, str], bucket: str) -> Settings:
    return _settings(allowed_buckets=(bucket,), max_image_bytes=50 * MiB)


def test_uploaded_object_is_fetched_byte_exact(
    moto_settings: Settings, bucket: str, s3_client: Any
) -> None:
    data = bytes(range(256)) * 4099  # ~1 MiB, more than one read chunk, not a round size
    s3_client.put_object(Bucket=bucket, Key="dir/sub/img.png", Body=data)

    assert ObjectStore(moto_settings).fetch(S3Location(bucket, "dir/sub/img.png")) == data


def test_missing_key_is_not_found(moto_settings: Settings, bucket: str) -> None:
    loc = S3Location(bucket, "nope.png")
    with pytest.raises(ImageNotFound, match="does not exist") as info:
        ObjectStore(moto_settings).fetch(loc)
    assert str(loc) in str(info.value)
    assert "NoSuchKey" in str(info.value)


def test_missing_bucket_is_not_found(s3_env: dict[str, str]) -> None:
    loc = S3Location("no-such-bucket-here", "img.png")
    with pytest.raises(ImageNotFound, match="NoSuchBucket") as info:
        ObjectStore(_settings()).fetch(loc)
    assert str(loc) in str(info.value)


def test_bucket_off_the_allowlist_is_denied_without_a_request(
    s3_server: LoopbackS3, moto_settings: Settings, bucket: str, s3_client: Any
) -> None:
    other = f"{bucket}-other"
    s3_client.create_bucket(Bucket=other)
    s3_client.put_object(Bucket=other, Key="img.png", Body=b"exists")
    env = s3_server.env()
    client = boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    ).client("s3", endpoint_url=s3_server.endpoint_url)
    sent: list[str] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    store = ObjectStore(moto_settings, client=client)

    with pytest.raises(ImageAccessDenied, match="CAPTION_ALLOWED_BUCKETS"):
        store.fetch(S3Location(other, "img.png"))
    assert sent == []
    # The same client does reach the store for an allowed bucket: the hook does count.
    with pytest.raises(ImageNotFound):
        store.fetch(S3Location(bucket, "img.png"))
    assert len(sent) == 1


# --- (b) the fault-injecting server ------------------------------------------------------------


def test_fault_server_serves_a_plain_object(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    assert fault_store.fetch(_loc("ok")) == SMALL_BODY
    assert fault_server.requests["ok"] == 1
    headers = fault_server.headers["ok"]
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=fault-access-key/")
    assert SECRET not in str(headers)
    # Stores without flexible checksums (MinIO, older Ceph) must not be asked for them.
    assert "x-amz-checksum-mode" not in headers


def test_access_denied_fails_at_once_without_retries(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    with pytest.raises(ImageAccessDenied, match="AccessDenied") as info:
        fault_store.fetch(_loc("denied"))
    assert "s3://faults/denied" in str(info.value)
    assert fault_server.requests["denied"] == 1
    _assert_no_secret(info.value)


def test_slowdown_every_time_is_unavailable_after_max_attempts(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    with pytest.raises(StorageUnavailable, match="SlowDown") as info:
        fault_store.fetch(_loc("slowdown"))
    assert info.value.retryable
    assert fault_server.requests["slowdown"] == MAX_ATTEMPTS
    assert f"after {MAX_ATTEMPTS} attempt(s)" in str(info.value)
    _assert_no_secret(info.value)


def test_two_503s_then_success_returns_the_bytes(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    assert fault_store.fetch(_loc("flaky")) == SMALL_BODY
    assert fault_server.requests["flaky"] == 3


def test_connection_reset_before_a_response_is_unavailable_after_retries(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    with pytest.raises(StorageUnavailable, match="s3://faults/drop") as info:
        fault_store.fetch(_loc("drop"))
    assert info.value.retryable
    # A dropped connection is transient, so boto3 retried it like a 503.
    assert fault_server.requests["drop"] == MAX_ATTEMPTS
    _assert_no_secret(info.value)


def test_connection_closed_mid_body_is_unavailable(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    with pytest.raises(StorageUnavailable, match="s3://faults/half") as info:
        fault_store.fetch(_loc("half"))
    assert info.value.retryable
    assert "reading it" in str(info.value)
    _assert_no_secret(info.value)


def test_stalled_body_times_out_as_unavailable(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _isolate_aws_env(monkeypatch, tmp_path, fault_server.endpoint_url)
    store = ObjectStore(_settings(s3_read_timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="ReadTimeoutError") as info:
        store.fetch(_loc("stall"))
    # The read timeout bounds each socket read, so a stalled store cannot hold a task thread.
    assert time.monotonic() - started < STALL_S
    assert "while reading it" in str(info.value)
    assert fault_server.requests["stall"] == 1


def test_honest_length_over_the_cap_is_refused_unread(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match=f"{HUGE_BYTES} bytes") as info:
        fault_store.fetch(_loc("huge"))
    assert time.monotonic() - started < 2
    assert "CAPTION_MAX_IMAGE_BYTES" in str(info.value)
    assert fault_server.requests["huge"] == 1
    # We hung up: the server could not push the whole body into the socket.
    assert fault_server.done["huge"].wait(timeout=10), "server still sending: body not closed?"
    assert fault_server.bytes_sent.get("/faults/huge", 0) < HUGE_BYTES
    assert "huge" in fault_server.write_errors


def test_body_without_length_is_cut_at_the_cap_in_bounded_memory(
    fault_store: ObjectStore, fault_server: FaultServer
) -> None:
    fault_store.fetch(_loc("ok"))  # warm up: boto3 loads models lazily on the first call
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge, match="sent more than") as info:
            fault_store.fetch(_loc("chunked-huge"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * MiB, f"peak {peak / MiB:.1f} MiB while the cap is {CAP / MiB:.0f} MiB"
    assert str(CAP) in str(info.value)
    assert fault_server.done["chunked-huge"].wait(timeout=10)
    assert fault_server.bytes_sent.get("/faults/chunked-huge", 0) < 20 * MiB


def test_allowlist_is_checked_before_any_request(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _isolate_aws_env(monkeypatch, tmp_path, fault_server.endpoint_url)
    store = ObjectStore(_settings(allowed_buckets=("images",)))
    with pytest.raises(ImageAccessDenied, match="not in this worker's CAPTION_ALLOWED_BUCKETS"):
        store.fetch(_loc("ok"))
    assert sum(fault_server.requests.values()) == 0


def test_unreachable_endpoint_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _isolate_aws_env(monkeypatch, tmp_path, f"http://127.0.0.1:{port}")
    with pytest.raises(StorageUnavailable, match="AWS_ENDPOINT_URL_S3") as info:
        ObjectStore(_settings(s3_max_attempts=1)).fetch(_loc("ok"))
    assert f"127.0.0.1:{port}" in str(info.value)
    _assert_no_secret(info.value)


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("missing", ImageNotFound),
        ("denied", ImageAccessDenied),
        ("half", StorageUnavailable),
        ("huge", ImageTooLarge),
    ],
)
def test_each_outcome_maps_to_its_error_without_the_secret_key(
    fault_store: ObjectStore, key: str, error: type[CaptionError]
) -> None:
    with pytest.raises(CaptionError) as info:
        fault_store.fetch(_loc(key))
    assert type(info.value) is error
    assert f"s3://faults/{key}" in str(info.value)
    _assert_no_secret(info.value)
