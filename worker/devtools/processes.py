"""A real ``celery worker`` process running the caption app, for demo, bench and tests.

It starts exactly the command ``caption-worker worker`` starts per device, with its log in
a file and a ready file to wait on.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from worker.devtools.loopback import terminate
from worker.queue.launcher import worker_command


class WorkerProcess:
    """A real ``celery worker`` process running the caption app, with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, node: str = "caption@%h") -> None:
        self.ready_file = log_path.with_name(log_path.name + ".ready")
        self.env = {**os.environ, "CAPTION_READY_FILE": str(self.ready_file), **env}
        self.log_path = log_path
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the process (the model loads in it before it consumes)."""
        self.ready_file.unlink(missing_ok=True)
        queue = self.env.get("CAPTION_QUEUE", "captions")
        level = self.env.get("CAPTION_LOG_LEVEL", "INFO")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                worker_command(queue, self.node, level),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # signals from the terminal stay with the parent
            )
        return self

    def log(self) -> str:
        """Everything the worker has printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout_s: float = 120) -> WorkerProcess:
        """Block until the worker's ready file appears; raise with its log if it died."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited with code {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready within {timeout_s:g}s:\n{self.log()[-4000:]}")

    def signal(self, signum: int) -> None:
        """Send a signal to the worker process."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 60) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        return terminate(self.proc, timeout_s)

    def __enter__(self) -> WorkerProcess:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop(timeout_s=10)  # never leave a half-started worker behind
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
