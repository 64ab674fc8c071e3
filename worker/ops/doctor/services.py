"""The broker and the result backend: each answers within the timeout, or says why not."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from worker.ops.doctor.report import CheckResult, Status, one_line, safe_url
from worker.storage.redis_client import is_redis_url


def check_broker(url: str, ssl_options: Mapping[str, Any] | None, timeout_s: float) -> CheckResult:
    """Connect to the broker (Redis or AMQP) the way Celery does, once, within the timeout."""
    from kombu.connection import Connection

    connection: Any = Connection  # kombu's signatures are untyped
    started = time.perf_counter()
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    ssl = dict(ssl_options or {}) or False
    try:
        with connection(url, connect_timeout=timeout_s, ssl=ssl, transport_options=options) as conn:
            # One attempt: doctor reports, the worker is the one that keeps retrying.
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
    except Exception as exc:
        return CheckResult(
            "broker",
            Status.FAIL,
            f"cannot connect to {safe_url(url)} ({one_line(exc)}); start the broker or fix "
            "CAPTION_BROKER_URL (host, port, password, TLS)",
        )
    elapsed_ms = (time.perf_counter() - started) * 1000
    return CheckResult("broker", Status.OK, f"{safe_url(url)} answered in {elapsed_ms:.0f} ms")


def check_result_backend(
    url: str, ssl_options: Mapping[str, Any] | None, timeout_s: float
) -> CheckResult:
    """PING the Redis result backend within the timeout."""
    import redis

    if not is_redis_url(url):
        return CheckResult(
            "result backend",
            Status.FAIL,
            f"{safe_url(url)} is not a Redis URL; the worker keeps results and delivery "
            "counters in Redis: set CAPTION_RESULT_BACKEND=redis://host:port/db",
        )
    started = time.perf_counter()
    kwargs: dict[str, Any] = dict(ssl_options or {}) if url.startswith("rediss://") else {}
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, **kwargs
        )
        with client:
            client.ping()
    except Exception as exc:
        return CheckResult(
            "result backend",
            Status.FAIL,
            f"cannot reach Redis at {safe_url(url)} ({one_line(exc)}); start it or fix "
            "CAPTION_RESULT_BACKEND (host, port, password, CAPTION_REDIS_CA_CERTS for TLS)",
        )
    elapsed_ms = (time.perf_counter() - started) * 1000
    return CheckResult(
        "result backend", Status.OK, f"{safe_url(url)} answered PING in {elapsed_ms:.0f} ms"
    )
