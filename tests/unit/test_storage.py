"""S3Location parsing, the bucket allowlist, and ObjectStore's error mapping (stubbed boto3)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ResponseStreamingError
from botocore.stub import Stubber
from urllib3.exceptions import ProtocolError

from worker.errors import (
    CaptionError,
    ImageAccessDenied,
    ImageNotFound,
    ImageTooLarge,
    InvalidRequest,
    StorageUnavailable,
)
from worker.settings import Settings
from worker.storage.s3 import ObjectStore, S3Location

CAP = 1000
LOC = S3Location("images", "cats/tabby.png")
PARAMS = {"Bucket": "images", "Key": "cats/tabby.png"}


# --- S3Location --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "key"),
    [
        ("s3://images/cat.png", "images", "cat.png"),
        ("s3://my.bucket-01/a/b/c/cat.png", "my.bucket-01", "a/b/c/cat.png"),
        ("s3://abc/k", "abc", "k"),
        ("s3://images//leading-slash.png", "images", "/leading-slash.png"),
        ("s3://images/with space/and?query#frag", "images", "with space/and?query#frag"),
        ("s3://images/ünïcødé/猫.png", "images", "ünïcødé/猫.png"),
        ("s3://images/dir/", "images", "dir/"),
        (f"s3://{'b' * 63}/k", "b" * 63, "k"),
    ],
)
def test_parse_accepts_s3_uris(uri: str, bucket: str, key: str) -> None:
    loc = S3Location.parse(uri)
    assert (loc.bucket, loc.key) == (bucket, key)
    assert str(loc) == uri


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "must start with s3://"),
        ("images/cat.png", "must start with s3://"),
        ("https://images/cat.png", "must start with s3://"),
        ("S3://images/cat.png", "must start with s3://"),
        (" s3://images/cat.png", "must start with s3://"),
        ("s3://", "names no bucket"),
        ("s3:///cat.png", "names no bucket"),
        ("s3://images", "names no object key"),
        ("s3://images/", "names no object key"),
        ("s3://Images/cat.png", "not a valid S3 bucket name"),
        ("s3://im_ages/cat.png", "not a valid S3 bucket name"),
        ("s3://ab/cat.png", "not a valid S3 bucket name"),
        (f"s3://{'b' * 64}/cat.png", "not a valid S3 bucket name"),
        ("s3://-images/cat.png", "not a valid S3 bucket name"),
        ("s3://images-/cat.png", "not a valid S3 bucket name"),
        ("s3://my..images/cat.png", "not a valid S3 bucket name"),
        ("s3://192.168.10.1/cat.png", "not a valid S3 bucket name"),
        (f"s3://images/{'k' * 1025}", "S3 allows 1024"),
        (f"s3://images/{'é' * 513}", "S3 allows 1024"),  # 1026 UTF-8 bytes
        ("s3://images/bad\ud800key", "not valid Unicode"),
    ],
)
def test_parse_rejects_anything_else(uri: str, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason) as info:
        S3Location.parse(uri)
    assert repr(uri)[:40] in str(info.value)  # the producer sees which URI was wrong


@pytest.mark.parametrize("value", [None, 42, b"s3://images/cat.png"])
def test_parse_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidRequest, match="must be a string"):
        S3Location.parse(value)


# --- ObjectStore with a stubbed client ---------------------------------------------------------


def _client() -> Any:
    return boto3.session.Session(
        aws_access_key_id="unit-key", aws_secret_access_key="unit-secret", region_name="us-east-1"
    ).client("s3")


def _settings(**overrides: Any) -> Settings:
    return Settings(**{"max_image_bytes": CAP, "allowed_buckets": (), **overrides})


@pytest.fixture()
def stubbed() -> Iterator[tuple[ObjectStore, Stubber]]:
    client = _client()
    with Stubber(client) as stubber:
        yield ObjectStore(_settings(), client=client), stubber
        stubber.assert_no_pending_responses()


class RecordingBody:
    """A response body that serves ``data`` and records how it was used."""

    def __init__(self, data: bytes = b"", error: Exception | None = None) -> None:
        self._stream = io.BytesIO(data)
        self._error = error
        self.reads: list[int | None] = []
        self.closed = False

    def read(self, amt: int | None = None) -> bytes:
        self.reads.append(amt)
        if self._error is not None:
            raise self._error
        return self._stream.read(amt)

    def close(self) -> None:
        self.closed = True

    @property
    def consumed(self) -> int:
        return self._stream.tell()


def test_check_allowed_with_an_empty_allowlist_allows_every_bucket() -> None:
    ObjectStore(_settings(), client=_client()).check_allowed(S3Location("anything", "k"))


def test_check_allowed_enforces_a_non_empty_allowlist() -> None:
    store = ObjectStore(_settings(allowed_buckets=("images", "thumbs")), client=_client())
    store.check_allowed(S3Location("thumbs", "k"))
    with pytest.raises(ImageAccessDenied, match="CAPTION_ALLOWED_BUCKETS") as info:
        store.check_allowed(S3Location("secrets", "k"))
    assert "s3://secrets/k" in str(info.value)
    assert "thumbs" not in str(info.value)  # other bucket names are not leaked to producers


def test_allowlist_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_ALLOWED_BUCKETS", "images, thumbs")
    store = ObjectStore(Settings(), client=_client())
    store.check_allowed(S3Location("thumbs", "k"))
    with pytest.raises(ImageAccessDenied):
        store.check_allowed(S3Location("other", "k"))


def test_fetch_returns_the_body_and_closes_it(stubbed: tuple[ObjectStore, Stubber]) -> None:
    store, stubber = stubbed
    body = RecordingBody(b"x" * CAP)  # exactly the cap is allowed
    stubber.add_response("get_object", {"Body": body, "ContentLength": CAP}, PARAMS)
    assert store.fetch(LOC) == b"x" * CAP
    assert body.closed


@pytest.mark.parametrize(
    ("code", "status", "error", "text"),
    [
        ("NoSuchKey", 404, ImageNotFound, "s3://images/cats/tabby.png does not exist (NoSuchKey)"),
        ("NoSuchBucket", 404, ImageNotFound, "there is no bucket 'images' (NoSuchBucket)"),
        ("404", 404, ImageNotFound, "does not exist (404)"),
        ("AccessDenied", 403, ImageAccessDenied, "denied by the store (AccessDenied)"),
        ("403", 403, ImageAccessDenied, "denied by the store (403)"),
        ("InvalidAccessKeyId", 403, ImageAccessDenied, "AWS_ACCESS_KEY_ID"),
        ("SignatureDoesNotMatch", 403, ImageAccessDenied, "AWS_SECRET_ACCESS_KEY"),
        ("SlowDown", 503, StorageUnavailable, "answered SlowDown (HTTP 503)"),
        ("InternalError", 500, StorageUnavailable, "answered InternalError (HTTP 500)"),
        ("RequestTimeout", 400, StorageUnavailable, "answered RequestTimeout"),
        ("RequestTimeTooSkewed", 403, StorageUnavailable, "clock"),
        ("SomethingNew", 400, StorageUnavailable, "answered SomethingNew (HTTP 400)"),
    ],
)
def test_store_errors_map_to_caption_errors(
    stubbed: tuple[ObjectStore, Stubber],
    code: str,
    status: int,
    error: type[CaptionError],
    text: str,
) -> None:
    store, stubber = stubbed
    stubber.add_client_error(
        "get_object", code, "store says no", http_status_code=status, expected_params=PARAMS
    )
    with pytest.raises(CaptionError) as info:
        store.fetch(LOC)
    assert type(info.value) is error
    assert text in str(info.value)
    assert "s3://images/cats/tabby.png" in str(info.value)
    assert info.value.retryable is (error is StorageUnavailable)
    assert "unit-secret" not in str(info.value)


def test_advertised_length_over_the_cap_fails_without_reading(
    stubbed: tuple[ObjectStore, Stubber],
) -> None:
    store, stubber = stubbed
    body = RecordingBody(b"x" * (CAP + 1))
    stubber.add_response("get_object", {"Body": body, "ContentLength": CAP + 1}, PARAMS)
    with pytest.raises(ImageTooLarge, match=f"is {CAP + 1} bytes, over .* cap of {CAP} bytes"):
        store.fetch(LOC)
    assert body.reads == []
    assert body.closed


def test_body_longer_than_advertised_is_cut_at_the_cap(
    stubbed: tuple[ObjectStore, Stubber],
) -> None:
    store, stubber = stubbed
    body = RecordingBody(b"x" * (50 * CAP))
    stubber.add_response("get_object", {"Body": body, "ContentLength": 10}, PARAMS)
    with pytest.raises(ImageTooLarge, match=f"sent more than .* cap of {CAP} bytes"):
        store.fetch(LOC)
    assert body.consumed == CAP + 1  # never buffers more than one byte past the cap
    assert body.closed


@pytest.mark.parametrize(
    "failure",
    [
        ResponseStreamingError(error="Connection broken: IncompleteRead"),
        ProtocolError("Connection broken", ConnectionResetError(104, "reset")),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
def test_failure_while_reading_the_body_is_unavailable(
    stubbed: tuple[ObjectStore, Stubber], failure: Exception
) -> None:
    store, stubber = stubbed
    body = RecordingBody(error=failure)
    stubber.add_response("get_object", {"Body": body, "ContentLength": 100}, PARAMS)
    with pytest.raises(StorageUnavailable, match="while reading it after 0 bytes") as info:
        store.fetch(LOC)
    assert type(failure).__name__ in str(info.value)
    assert info.value.__cause__ is failure
    assert body.closed


# --- URIs that are not S3 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri", ["http://example.com/cat.png", "https://example.com/cat.png", "file:///etc/passwd"]
)
def test_non_s3_uri_is_invalid(uri: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        S3Location.parse(uri)
    assert "s3://" in str(caught.value)
