"""Fake S3 endpoints on loopback: a threaded HTTP server and a handler base for S3 look-alikes.

The fault-injecting store (storage tests) and the recording proxy in front of moto (security
tests) both build on these.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


def s3_error_xml(code: str, message: str, request_id: str = "fake-req") -> bytes:
    """An S3 error document, as boto3 parses it into a ClientError."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()


class S3Handler(BaseHTTPRequestHandler):
    """Quiet HTTP/1.1 (keep-alive) handler with a bounded wait for a stuck client."""

    protocol_version = "HTTP/1.1"  # keep-alive, and chunked encoding is allowed
    timeout = 10  # a stuck client must not keep a handler thread forever

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def reply(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Send a whole response with an honest Content-Length."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeS3Server(ThreadingHTTPServer):
    """A threaded HTTP server on a free 127.0.0.1 port, served from a daemon thread."""

    daemon_threads = True

    def __init__(self, handler: type[S3Handler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name=type(self).__name__, daemon=True
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
