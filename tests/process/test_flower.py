"""Monitors see the worker and its caption tasks from task events, without switching them on.

Flower (from PyPI) runs listen-only (``--enable_events=False``): it never sends the
``enable_events`` broadcast, so everything it lists the worker sent on its own. The same
holds for celery-exporter and any other event consumer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.stack import WorkerStack
from tests.support.waits import TASK_TIMEOUT_S, wait_for_value
from worker.devtools.loopback import LoopbackS3, free_port, terminate, wait_for_http

pytestmark = pytest.mark.timeout(180)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_listen_only_flower_lists_the_worker_and_caption_tasks(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> None:
    with WorkerStack(tiny_model_dir, s3_server, tmp_path, name="flower") as stack:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = (tmp_path / "flower.log").open("wb")
        flower = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "--broker", stack.base_env["CAPTION_BROKER_URL"]),
                *("flower", f"--port={port}", "--address=127.0.0.1"),
                *("--enable_events=False", "--inspect=False"),
            ],
            env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(f"{base}/healthcheck", 60, flower)
            worker = stack.start_worker("watched")
            node = worker.node.replace("%h", os.uname().nodename)

            # The worker's own events (online, heartbeats) make it appear.
            def alive() -> dict[str, bool]:
                rows = get_json(f"{base}/workers?json=1")["data"]
                return {row["hostname"]: row["status"] for row in rows}

            wait_for_value(alive, lambda w: w.get(node) is True, 60, f"{node} alive in Flower")

            uri = stack.upload("watched.png")
            sent = [stack.send(image=uri, max_new_tokens=3) for _ in range(3)]
            for task in sent:
                assert task.get(timeout=TASK_TIMEOUT_S)["generated_tokens"] == 3

            def succeeded() -> dict[str, Any]:
                tasks: dict[str, Any] = get_json(f"{base}/api/tasks")
                return {k: v for k, v in tasks.items() if v.get("state") == "SUCCESS"}

            tasks = wait_for_value(succeeded, lambda t: len(t) == 3, 30, "3 tasks in Flower")
        finally:
            terminate(flower, 10)
            log.close()
    assert set(tasks) == {t.id for t in sent}
    for info in tasks.values():
        assert info["name"] == "caption"
        assert info["worker"] == node
        assert info["received"] and info["started"] and info["succeeded"]
    assert "enable_events" not in (tmp_path / "flower.log").read_text()
