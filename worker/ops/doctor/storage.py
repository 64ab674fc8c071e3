"""S3: each allowed bucket, and the ``--object`` an operator names, with the worker's
credentials; one attempt per request and all at once, so a dead store costs one timeout."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from worker.errors import CaptionError
from worker.ops.doctor.background import Background, as_list, collect, network_limit
from worker.ops.doctor.inputs import DoctorOptions
from worker.ops.doctor.report import CheckResult, Status, one_line, safe_url
from worker.settings import Settings


def s3_client(settings: Settings, timeout_s: float) -> Any:
    """A boto3 S3 client with the worker's endpoint, credentials and addressing style, but
    one attempt and short timeouts: doctor must answer in seconds, not retry for minutes."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        s3={"addressing_style": settings.s3_addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", config=config)


def _endpoint(client: Any) -> str:
    url = str(getattr(client.meta, "endpoint_url", "") or "the default AWS endpoint")
    return safe_url(url)


@dataclass(frozen=True)
class _S3Problem:
    """A failed S3 request: what kind of failure, and one sentence saying where to look."""

    kind: Literal["missing", "denied", "other"]
    message: str


def _s3_problem(exc: Exception, what: str, client: Any) -> _S3Problem:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return _S3Problem(
            "other",
            f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or a boto3 profile or instance role)",
        )
    if not isinstance(exc, ClientError):
        return _S3Problem(
            "other",
            f"{what}: cannot reach the store at {_endpoint(client)} "
            f"({type(exc).__name__}: {one_line(exc)}); check AWS_ENDPOINT_URL_S3 and the network",
        )
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(exc.response.get("Error", {}).get("Code") or status)
    if status == 404 or code in {"NoSuchBucket", "NoSuchKey", "NotFound", "404"}:
        return _S3Problem("missing", f"{what} does not exist at {_endpoint(client)} ({code})")
    if status == 403:
        return _S3Problem(
            "denied",
            f"{what}: the store at {_endpoint(client)} denied access ({code}); check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy",
        )
    return _S3Problem(
        "other",
        f"{what}: the store at {_endpoint(client)} answered {code} (HTTP {status}); check "
        "the store's health and AWS_REGION",
    )


def check_bucket(client: Any, bucket: str) -> CheckResult:
    """HEAD one allowed bucket with the worker's credentials."""
    name = f"s3 bucket {bucket}"
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        problem = _s3_problem(exc, f"s3://{bucket}", client)
        if problem.kind == "denied":
            # HeadBucket needs s3:ListBucket, which a caption worker never uses: a read-only
            # GetObject policy is enough, so a denial here is not proof the worker is blind.
            return CheckResult(
                name,
                Status.WARN,
                f"s3://{bucket}: HeadBucket denied at {_endpoint(client)}; the credentials "
                "are wrong or lack s3:ListBucket (workers need only s3:GetObject): confirm "
                f"with --object s3://{bucket}/<key>",
            )
        if problem.kind == "missing":
            fix = "; fix CAPTION_ALLOWED_BUCKETS or AWS_ENDPOINT_URL_S3"
            return CheckResult(name, Status.FAIL, problem.message + fix)
        return CheckResult(name, Status.FAIL, problem.message)
    return CheckResult(name, Status.OK, f"s3://{bucket} is reachable at {_endpoint(client)}")


def check_object(
    client: Any, uri: str, allowed_buckets: Sequence[str], max_image_bytes: int
) -> CheckResult:
    """HEAD one object: it exists, the worker may read it, and it is under the byte cap."""
    from worker.storage.s3 import S3Location

    try:
        loc = S3Location.parse(uri)
    except CaptionError as exc:
        return CheckResult("s3 object", Status.FAIL, f"--object: {exc}")
    if allowed_buckets and loc.bucket not in allowed_buckets:
        return CheckResult(
            "s3 object",
            Status.FAIL,
            f"{loc}: bucket {loc.bucket!r} is not in CAPTION_ALLOWED_BUCKETS, so the worker "
            "refuses it; add the bucket there",
        )
    try:
        head = client.head_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:
        problem = _s3_problem(exc, str(loc), client)
        fix = "; check the key and the bucket" if problem.kind == "missing" else ""
        return CheckResult("s3 object", Status.FAIL, problem.message + fix)
    size = int(head.get("ContentLength", 0))
    if size > max_image_bytes:
        return CheckResult(
            "s3 object",
            Status.FAIL,
            f"{loc} is {size} bytes, over CAPTION_MAX_IMAGE_BYTES={max_image_bytes}: tasks "
            "for it fail with ImageTooLarge; raise the cap or shrink the image",
        )
    return CheckResult(
        "s3 object",
        Status.OK,
        f"{loc} is readable ({size} bytes, within CAPTION_MAX_IMAGE_BYTES={max_image_bytes})",
    )


def s3_checks(settings: Settings, options: DoctorOptions) -> list[CheckResult]:
    """One line per allowed bucket and one for ``--object``; a SKIP line when neither."""
    if not settings.allowed_buckets and options.object_uri is None:
        return [
            CheckResult(
                "s3",
                Status.SKIP,
                "no CAPTION_ALLOWED_BUCKETS and no --object: pass --object s3://bucket/key "
                "to test that the worker's credentials can read an image",
            )
        ]
    client = s3_client(settings, options.timeout_s)
    calls: list[tuple[str, Callable[[], CheckResult]]] = [
        (f"s3 bucket {bucket}", partial(check_bucket, client, bucket))
        for bucket in settings.allowed_buckets
    ]
    if options.object_uri is not None:
        uri, allowed, cap = options.object_uri, settings.allowed_buckets, settings.max_image_bytes
        calls.append(("s3 object", partial(check_object, client, uri, allowed, cap)))
    # All at once (boto3 clients are thread-safe): a dead endpoint costs one timeout, not
    # one per bucket.
    running = [(name, Background(as_list(call))) for name, call in calls]
    deadline = time.monotonic() + network_limit(options.timeout_s)
    return [line for name, task in running for line in collect([name], task, deadline)]
