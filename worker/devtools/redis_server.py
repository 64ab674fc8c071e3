"""A private ``redis-server`` on a free loopback port: for the demo and the benchmark when no
Redis answers, and for tests that stop or restart Redis (the shared one is never touched).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from worker.devtools.loopback import free_port, terminate
from worker.errors import ConfigError


@dataclass(frozen=True)
class RedisTls:
    """Certificate files for a TLS-only server; clients verify it against ``ca_file``."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class RedisServer:
    """redis-server in a child process; ``restart()`` keeps its data dir (AOF if enabled).

    ``password`` adds ``requirepass``; ``tls`` makes it TLS-only (no plaintext listener).
    ``url`` carries both (``redis://:password@...`` or ``rediss://...``), without a database.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        appendonly: bool = True,
        port: int | None = None,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        scheme = "rediss" if tls else "redis"
        auth = f":{password}@" if password else ""
        self.url = f"{scheme}://{auth}127.0.0.1:{self.port}"
        self.log_path = data_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _args(self) -> list[str]:
        args = [
            "redis-server", "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
        ]  # fmt: skip
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:  # --port 0: no plaintext listener to fall back to
            args += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout_s: float = 15) -> RedisServer:
        """Start the server and wait until it answers PING.

        Raises RuntimeError with the server's log if it exits at start (say, a build without
        TLS support), TimeoutError if it never answers.
        """
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT)
        client = self.client(socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited at start:\n{self.log()[-1500:]}"
                    )
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} did not start:\n{self.log()[-1500:]}")

    def log(self) -> str:
        """Everything the server has printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its AOF first)."""
        if self._proc is not None:
            terminate(self._proc, timeout_s=15)
        self._proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down for ``down_s`` seconds, start again on the same port and data."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def client(self, db: int = 0, **extra: Any) -> redis.Redis:
        """A client for one of the server's databases (password and TLS applied)."""
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca_file), "ssl_cert_reqs": "required"}
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=self.password, **tls, **extra
        )

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def reachable_redis(url: str, stack: ExitStack, data_dir: Path) -> str:
    """``url`` if Redis answers there, else the URL of a private server started on ``stack``.

    Raises ConfigError naming both ways out when neither is possible.
    """
    if redis_answers(url):
        return url
    if shutil.which("redis-server") is None:
        raise ConfigError(
            f"cannot reach Redis at {url} and redis-server is not installed; start a Redis "
            "(`redis-server --daemonize yes`) or point CAPTION_BROKER_URL at yours"
        )
    server = stack.enter_context(RedisServer(data_dir, appendonly=False))
    print(f"no Redis at {url}: started a private redis-server at {server.url}", file=sys.stderr)
    return f"{server.url}/0"
