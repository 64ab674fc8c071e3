"""Each worker process's operations endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

A small WSGI app served from a daemon thread on ``CAPTION_METRICS_PORT`` (all interfaces).
It starts before the model loads, so ``/readyz`` answers 503 while the worker starts, and
it serves until the process exits, so ``/readyz`` answers 503 while a warm shutdown drains.

- ``/metrics``: the process's Prometheus registry (prometheus_client's exposition, with
  OpenMetrics negotiation and gzip).
- ``/healthz``: 200 ``ok``, or 503 with the reason the process should be replaced.
- ``/readyz``: 200 ``ready``, or 503 with the reason it should not be sent work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from worker.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from worker.runtime.lifecycle import Lifecycle
    from worker.settings import Settings

log = logging.getLogger(__name__)

#: A probe: None when all is well, else the reason it is not (the 503 body).
Check = Callable[[], str | None]


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow scrape never delays a probe."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log: probes every few seconds would drown the worker's own lines."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = (body + "\n").encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]


def _probe(check: Check, ok: str, start_response: StartResponse) -> list[bytes]:
    try:
        problem = check()
    except Exception as exc:  # a probe that cannot decide says "no", it never errors
        problem = f"the check failed: {exc!r}"
    if problem is None:
        return _text(start_response, "200 OK", ok)
    return _text(start_response, "503 Service Unavailable", problem)


def operations_app(
    registry: CollectorRegistry, ready: Check, healthy: Check
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """The WSGI app: ``/metrics`` from ``registry``, ``/readyz`` and ``/healthz`` from the
    checks, 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = metrics(environ, start_response)
            return body
        if path == "/readyz":
            return _probe(ready, "ready", start_response)
        if path == "/healthz":
            return _probe(healthy, "ok", start_response)
        return _text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz")

    return app


class OpsServer:
    """The endpoints on ``host:port`` (port 0: any free port), served from a daemon thread."""

    def __init__(
        self,
        port: int,
        registry: CollectorRegistry,
        ready: Check,
        healthy: Check,
        host: str = "0.0.0.0",
    ) -> None:
        self._server = make_server(
            host,
            port,
            operations_app(registry, ready, healthy),
            server_class=_Server,
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        """Serve in the background until ``close`` or the end of the process."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()


def serve_operations(settings: Settings, lifecycle: Lifecycle) -> OpsServer | None:
    """Start the endpoints for ``lifecycle`` on ``CAPTION_METRICS_PORT``; None when it is 0.

    A port that is taken stops the process when it was set explicitly (a scraper would
    read another process's numbers under this one's name); the default is best effort, so
    a second worker started by hand on one host still serves, without endpoints.
    """
    port = settings.metrics_port
    if port == 0:
        return None
    try:
        server = OpsServer(
            port, lifecycle.metrics.registry, lifecycle.not_ready, lifecycle.unhealthy
        )
    except OSError as exc:
        if "metrics_port" in settings.model_fields_set:
            raise ConfigError(
                f"CAPTION_METRICS_PORT={port} cannot be served ({exc.strerror or exc}); "
                "give each worker process its own port, or 0 to turn the endpoints off"
            ) from None
        log.warning(
            "metrics and health endpoints off: default port %d is taken (%s); "
            "set CAPTION_METRICS_PORT",
            port,
            exc.strerror or exc,
        )
        return None
    log.info("metrics and health endpoints on port %d: /metrics /healthz /readyz", port)
    return server.start()
