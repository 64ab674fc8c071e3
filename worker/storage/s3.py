"""Fetch image bytes from S3-compatible storage, capped in size, with errors producers can act on.

Endpoint, credentials and region follow boto3's own variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ...). Messages carry the s3:// URI, the store's error
code and message, and the endpoint without user info; never botocore's text or a credential.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as URLLib3HTTPError

from worker.errors import (
    CaptionError,
    ImageAccessDenied,
    ImageNotFound,
    ImageTooLarge,
    InvalidRequest,
    StorageUnavailable,
)
from worker.settings import Settings

SCHEME = "s3://"
#: Bytes asked of the socket per read; the last read of a capped body asks for less.
CHUNK_BYTES = 1024 * 1024
MAX_KEY_BYTES = 1024  # S3's limit on a key's UTF-8 length

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_RE = re.compile(r"\d+\.\d+\.\d+\.\d+")

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)
#: Hints for codes whose fix is on the worker's side, not the producer's.
_HINTS = {
    "InvalidAccessKeyId": "the store does not know the worker's AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "check the worker's AWS_SECRET_ACCESS_KEY",
    "RequestTimeTooSkewed": "the worker's clock is off; sync it (NTP)",
    "AuthorizationHeaderMalformed": "check AWS_REGION against the bucket's region",
    "PermanentRedirect": "the bucket lives elsewhere; check AWS_REGION / AWS_ENDPOINT_URL_S3",
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a boto3 profile",
    "EndpointConnectionError": "check AWS_ENDPOINT_URL_S3 and the network",
    "ConnectTimeoutError": "check AWS_ENDPOINT_URL_S3 and the network",
}


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class S3Location:
    """One object in one bucket, as named by an ``s3://bucket/key`` URI."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """Split ``s3://bucket/key/with/slashes``; raise InvalidRequest for anything else."""
        if not isinstance(uri, str):
            raise InvalidRequest(
                f"image URI must be a string like s3://bucket/key, not {uri!r:.80}"
            )
        shown = _short(repr(uri))
        if not uri.startswith(SCHEME):
            raise InvalidRequest(f"image URI {shown} must start with {SCHEME} (s3://bucket/key)")
        bucket, slash, key = uri[len(SCHEME) :].partition("/")
        if not bucket:
            raise InvalidRequest(f"image URI {shown} names no bucket (s3://bucket/key)")
        if not slash or not key:
            raise InvalidRequest(f"image URI {shown} names no object key (s3://bucket/key)")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket or _IPV4_RE.fullmatch(bucket):
            raise InvalidRequest(
                f"image URI {shown}: {_short(bucket, 80)!r} is not a valid S3 bucket name "
                "(3-63 lowercase letters, digits, '.' or '-', starting and ending with a "
                "letter or digit, no '..', not an IP address)"
            )
        try:
            key_bytes = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidRequest(f"image URI {shown}: the key is not valid Unicode") from None
        if key_bytes > MAX_KEY_BYTES:
            raise InvalidRequest(
                f"image URI {shown}: the key is {key_bytes} bytes, S3 allows {MAX_KEY_BYTES}"
            )
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def s3_client(settings: Settings, *, max_pool_connections: int = 10) -> Any:
    """A boto3 S3 client with this project's timeouts, retries and compatibility settings.

    Thread-safe; ``max_pool_connections`` bounds the requests it runs at once.
    """
    config = Config(
        # botocore's "max_attempts" key counts retries AFTER the first request;
        # "total_max_attempts" counts requests, which is what CAPTION_S3_MAX_ATTEMPTS
        # means (ge=1). Standard mode retries 5xx, throttling and connection errors.
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        s3={"addressing_style": settings.s3_addressing_style},
        # Newer botocore sends and checks CRC checksums by default; MinIO and older
        # Ceph reject or omit them, so only do so where the API requires it.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max_pool_connections,
    )
    # Clients are thread-safe, sessions are not, so the session lives only long enough to
    # build the client.
    return boto3.session.Session().client("s3", config=config)


class ObjectStore:
    """Reads whole objects from one S3-compatible store, never more than the byte cap."""

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self._settings = settings
        # One client per process, shared by the task threads.
        self._client: Any = client if client is not None else s3_client(settings)

    def check_allowed(self, loc: S3Location) -> None:
        """Raise ImageAccessDenied if an allowlist is set and does not name the bucket."""
        allowed = self._settings.allowed_buckets
        if allowed and loc.bucket not in allowed:
            # The allowlist itself is not quoted: producers need not learn other bucket names.
            raise ImageAccessDenied(
                f"{loc}: bucket {loc.bucket!r} is not in this worker's CAPTION_ALLOWED_BUCKETS"
            )

    def fetch(self, loc: S3Location) -> bytes:
        """The object's bytes; raise a CaptionError subclass on every failure."""
        self.check_allowed(loc)
        cap = self._settings.max_image_bytes
        try:
            response = self._client.get_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exc:
            raise self._client_error(loc, exc) from exc
        except BotoCoreError as exc:
            raise self._transport_error(loc, exc, "requesting it") from exc
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if length is not None and length > cap:
                # Refuse before reading: closing the body drops the connection unread.
                raise ImageTooLarge(
                    f"{loc} is {length} bytes, over this worker's cap of {cap} bytes "
                    "(CAPTION_MAX_IMAGE_BYTES)"
                )
            return self._read_capped(loc, body, cap)
        finally:
            body.close()

    def _read_capped(self, loc: S3Location, body: Any, cap: int) -> bytes:
        # Content-Length may be absent (chunked encoding) or wrong, so the cap is enforced on
        # bytes actually received. Asking for at most cap + 1 - received bytes keeps the
        # buffer at cap + 1 bytes at worst, whatever the server sends.
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                chunk = body.read(min(CHUNK_BYTES, cap + 1 - received))
            except (BotoCoreError, URLLib3HTTPError, OSError) as exc:
                # Resets, timeouts and short bodies surface here, after get_object returned,
                # so boto3's own retries never saw them.
                raise self._transport_error(loc, exc, f"reading it after {received} bytes") from exc
            if not chunk:
                return b"".join(chunks)
            received += len(chunk)
            if received > cap:
                raise ImageTooLarge(
                    f"{loc} sent more than this worker's cap of {cap} bytes "
                    "(CAPTION_MAX_IMAGE_BYTES); stopped reading"
                )
            chunks.append(chunk)

    def _client_error(self, loc: S3Location, exc: ClientError) -> CaptionError:
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        code = str(error.get("Code") or status or "unknown")
        hint = _HINTS.get(code)
        if code == "NoSuchBucket":
            return ImageNotFound(
                f"{loc} does not exist: there is no bucket {loc.bucket!r} ({code})"
            )
        if code in NOT_FOUND_CODES or (status == 404 and code not in DENIED_CODES):
            return ImageNotFound(f"{loc} does not exist ({code})")
        if code in DENIED_CODES or (status == 403 and hint is None):
            return ImageAccessDenied(
                f"access to {loc} denied by the store ({code}): "
                + (hint or "check the bucket policy and the worker's credentials")
            )
        attempts = int(meta.get("RetryAttempts", 0)) + 1
        message = _short(str(error.get("Message") or ""), 120)
        return StorageUnavailable(
            f"{loc}: the store answered {code}"
            + (f" (HTTP {status})" if status else "")
            + f" after {attempts} attempt(s)"
            + (f" ({message!r})" if message else "")
            + f"; {hint or 'retry later'}"
        )

    def _transport_error(self, loc: S3Location, exc: Exception, doing: str) -> CaptionError:
        name = type(exc).__name__
        return StorageUnavailable(
            f"{loc}: {name} from the store at {self._endpoint()} while {doing}; "
            + _HINTS.get(name, "retry later")
        )

    def _endpoint(self) -> str:
        url = str(getattr(self._client.meta, "endpoint_url", "") or "(default endpoint)")
        parts = urlsplit(url)
        if "@" in parts.netloc:  # never echo user:password@ from an endpoint URL
            url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        return url
