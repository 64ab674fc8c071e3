"""``caption-worker worker``: one Celery worker process per visible GPU, supervised.

Each process owns one GPU (``CUDA_VISIBLE_DEVICES``), loads the model once and runs the
threads pool. If one of them fails the host is degraded, so the rest are stopped too and
the supervisor (compose, Kubernetes, systemd) restarts the whole unit. Processes on one host
must not share what identifies them to a probe or a scraper: process ``i`` serves its
metrics on the base port + ``i`` and writes its ready file with its node's suffix.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


def worker_command(
    queue: str, node: str, log_level: str = "INFO", bulk_queue: str = ""
) -> list[str]:
    """The ``celery worker`` command line for one device: its queue, then the bulk queue
    (``CAPTION_BULK_QUEUE``; empty: none), in the order the worker asks them."""
    queues = ",".join(dict.fromkeys(q for q in (queue, bulk_queue) if q))
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--queues", queues, "--hostname", node, "--loglevel", log_level,
        # Gossip and mingle only add start-up delay and broker chatter for this workload.
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def visible_gpus() -> list[str]:
    """GPU indices this host offers: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process to start: its command and the environment it adds."""

    command: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        """The plan as one shell line (``--dry-run``)."""
        prefix = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{prefix} {' '.join(self.command)}"


def plan_workers(
    devices: list[str],
    queue: str,
    log_level: str,
    *,
    metrics_port: int = 0,
    ready_file: str | None = None,
    bulk_queue: str = "",
) -> list[WorkerPlan]:
    """One process per GPU index, or one CPU process when there is none.

    ``metrics_port`` (CAPTION_METRICS_PORT; 0: off): process ``i`` gets ``metrics_port + i``.
    ``ready_file`` (CAPTION_READY_FILE): each process gets ``<ready_file>.<gpuN|cpu>``.
    """
    labels = [f"gpu{gpu}" for gpu in devices] or ["cpu"]
    plans = []
    for index, label in enumerate(labels):
        env = {"CUDA_VISIBLE_DEVICES": devices[index] if devices else ""}
        if metrics_port:
            env["CAPTION_METRICS_PORT"] = str(metrics_port + index)
        if ready_file:
            env["CAPTION_READY_FILE"] = f"{ready_file}.{label}"
        command = worker_command(queue, f"{label}@%h", log_level, bulk_queue)
        plans.append(WorkerPlan(command, env))
    return plans


def run_workers(plans: list[WorkerPlan]) -> int:
    """Start every planned process, forward signals, and return the unit's exit code."""
    procs = [subprocess.Popen(p.command, env={**os.environ, **p.env}) for p in plans]

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    code = 0
    while any(p.poll() is None for p in procs):
        for proc in procs:
            if proc.poll() not in (None, 0) and code == 0:
                code = proc.returncode
                forward(signal.SIGTERM, None)
        time.sleep(0.5)
    codes = [p.returncode for p in procs]
    return code or max(codes, key=abs)
