"""A private ``redis-server`` on a free loopback port: for the demo and the benchmark when no
Redis answers, and for tests that stop or restart Redis (the shared one is never touched).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import redis

from worker.devtools.loopback import free_port
from worker.errors import ConfigError


class RedisServer:
    """redis-server in a child process; ``restart()`` keeps its data dir (AOF if enabled)."""

    def __init__(self, data_dir: Path, *, appendonly: bool = True, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
        ]  # fmt: skip
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its AOF first)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=15)
        self._proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down for ``down_s`` seconds, start again on the same port and data."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def client(self, db: int = 0) -> redis.Redis:
        """A client for one of the server's databases."""
        return redis.Redis(port=self.port, db=db)

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
