"""A loopback S3 server for the demo, the benchmark and the tests: no cloud needed.

``LoopbackS3`` runs moto's S3 server as a real HTTP process on 127.0.0.1, so boto3 talks to
it exactly as it would to MinIO or AWS. moto is part of the ``test`` extra.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "loopback-access-key",
    "AWS_SECRET_ACCESS_KEY": "loopback-secret-key",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM a child process, SIGKILL it if it is still there after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until any HTTP answer arrives; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an HTTP error status still means the server is up
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing answered at {url} within {timeout_s:g}s")


class LoopbackS3:
    """An S3-compatible HTTP server (moto) in a child process on a free loopback port."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LoopbackS3:
        """Start the server and wait until it answers HTTP."""
        log = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **FAKE_CREDENTIALS},
        )
        wait_for_http(self.endpoint_url, timeout_s=30, proc=self._proc)
        return self

    def stop(self) -> None:
        """Stop the server; its buckets go with it."""
        if self._proc is not None:
            terminate(self._proc, timeout_s=10)
        self._proc = None

    def env(self) -> dict[str, str]:
        """The boto3 environment variables that point a process at this server."""
        return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def client(self) -> Any:
        """A boto3 S3 client for this server (for uploads in demos and tests)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=FAKE_CREDENTIALS["AWS_REGION"],
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def __enter__(self) -> LoopbackS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
