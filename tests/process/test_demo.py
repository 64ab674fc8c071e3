"""``make demo`` (``caption-worker demo``) on a machine without a Redis where it is configured.

It starts a private redis-server when nothing answers at ``CAPTION_BROKER_URL`` and prints a
caption; with no redis-server installed either it says so in one line and exits non-zero.
One real demo run: it builds the tiny model, starts moto, Redis and a worker (~1 min).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker.devtools.loopback import free_port
from worker.devtools.redis_server import redis_answers

pytestmark = pytest.mark.timeout(300)

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "caption-worker")


def demo(path: str | None = None) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the demo as ``make demo`` does, with Redis configured on a port nothing serves."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    # Nothing configured but the broker: no model, no S3 endpoint (the demo provides both).
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAPTION_", "AWS_ENDPOINT_URL"))
    }
    env |= {"CAPTION_BROKER_URL": closed, "CAPTION_RESULT_BACKEND": closed}
    env |= {"SDNQ_USE_TORCH_COMPILE": "0", "OMP_NUM_THREADS": "2"}
    if path is not None:
        env["PATH"] = path
    out = subprocess.run([CLI, "demo"], capture_output=True, text=True, timeout=280, env=env)
    return out, closed


def test_demo_starts_a_private_redis_and_prints_a_caption() -> None:
    out, closed = demo()

    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["task_id"] and result["text"].strip()
    assert result["image"] == "s3://caption-demo/sample.png"
    assert result["generated_tokens"] >= 1 and result["quantization"]["quant_method"] == "sdnq"
    started = re.search(
        rf"no Redis at {re.escape(closed)}: started a private redis-server at (redis://\S+)",
        out.stderr,
    )
    assert started, out.stderr[-3000:]
    assert "building a tiny random SDNQ model" in out.stderr
    assert "starting a loopback S3 server" in out.stderr
    # The private server went away with the demo.
    assert not redis_answers(f"{started.group(1)}/0")


def test_demo_without_redis_server_installed_says_so_in_one_line() -> None:
    assert not (VENV_BIN / "redis-server").exists()
    out, closed = demo(path=str(VENV_BIN))  # python and caption-worker, but no redis-server

    assert out.returncode != 0
    assert out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr[-3000:]
    assert "Redis" in lines[0] and closed in lines[0]
    assert "redis-server is not installed" in lines[0]
