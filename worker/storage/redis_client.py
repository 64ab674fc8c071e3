"""redis-py clients for this project's own reads of Redis (the exporter, bulk runs), with the
TLS verification the worker's Celery connections use (``celeryconfig``): a ``rediss://``
server's certificate is always checked, against ``CAPTION_REDIS_CA_CERTS`` when set."""

from __future__ import annotations

from typing import Any

import redis

#: URL schemes redis-py connects to.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis server (TCP, TLS or a Unix socket)."""
    return url.startswith(REDIS_SCHEMES)


def redis_client(url: str, ca_certs: str | None, *, timeout_s: float, **options: Any) -> Any:
    """A client for ``url`` with connect and read timeouts of ``timeout_s``; ``options`` go
    to redis-py as they are (``retry``, ``health_check_interval``, ...)."""
    tls: dict[str, Any] = {}
    if url.startswith("rediss://"):
        tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": ca_certs}
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **tls, **options
    )
