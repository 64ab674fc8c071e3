"""Helpers for fault tests with real worker processes: images, waits, who captioned what."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from celery.result import AsyncResult

from tests.support.images import png_bytes
from tests.support.stack import WorkerStack
from worker.devtools.processes import WorkerProcess


def upload(stack: WorkerStack, count: int) -> list[str]:
    """``count`` different small PNGs; their s3:// URIs."""
    uris = []
    for i in range(count):
        color = (40 + 37 * i % 200, 200 - 23 * i % 180, 60 + 51 * i % 190)
        uris.append(stack.upload(f"faults/{i}.png", png_bytes(color=color)))
    return uris


def state(task: AsyncResult) -> str:
    return str(task.state)


def log_excerpt(proc: WorkerProcess, size: int = 6000) -> str:
    """The worker's log around its first crashed thread, or its tail."""
    text = proc.log()
    crash = text.find("Exception in thread")
    return text[crash : crash + size] if crash >= 0 else text[-size:]


def wait_for(
    tasks: list[AsyncResult],
    done: Callable[[list[str]], bool],
    timeout_s: float,
    what: str,
    worker: WorkerProcess,
) -> float:
    """Poll the tasks' states until ``done(states)``; the seconds it took.

    Fails at once, with the worker's log, if a task fails or the worker exits.
    """
    assert worker.proc is not None
    started = time.monotonic()
    while True:
        states = summary(tasks)
        if done(states):
            return time.monotonic() - started
        failed = [t for t, s in zip(tasks, states, strict=True) if s == "FAILURE"]
        if failed:
            pytest.fail(
                f"a task failed while waiting for {what}: {failed[0].result!r}; "
                f"states {states}\n{log_excerpt(worker)}"
            )
        if worker.proc.poll() is not None:
            pytest.fail(
                f"worker exited with code {worker.proc.returncode} while waiting for {what}; "
                f"states {states}\n{log_excerpt(worker)}"
            )
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"no {what} within {timeout_s:g}s; states {states}\n{log_excerpt(worker)}")
        time.sleep(0.1)


def summary(tasks: list[AsyncResult]) -> list[str]:
    return [state(t) for t in tasks]


def result_of(task: AsyncResult) -> dict[str, Any]:
    """A finished task's result, read from the backend (no pub/sub subscription)."""
    assert task.state == "SUCCESS", task.state
    result: dict[str, Any] = task.result
    return result


def all_success(states: list[str]) -> bool:
    return all(s == "SUCCESS" for s in states)


def captioned_by(result: dict[str, Any], proc: WorkerProcess) -> bool:
    assert proc.proc is not None
    name: str = result["worker"]
    return name.startswith(proc.node.split("@")[0] + "@") and name.endswith(f"/{proc.proc.pid}")


def log_count(proc: WorkerProcess, needle: str) -> int:
    return proc.log().count(needle)
