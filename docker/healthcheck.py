#!/usr/bin/env python3
"""Health check for a caption-worker container (Docker HEALTHCHECK, Kubernetes probes).

Healthy means: every Celery node that ``caption-worker worker`` starts in this container
(``gpuN@<hostname>`` per visible GPU, or ``cpu@<hostname>``) answers a remote-control ping
through the broker. A node answers only once its model has loaded and warmed up (the model
loads before the consumer starts), so this doubles as a readiness check; during the load it
fails, which is what Docker's start period and Kubernetes' startupProbe are for.

When CAPTION_READY_FILE is set (the image sets it), each worker process writes its own file
(``<file>.gpuN`` or ``<file>.cpu``) after the warm-up caption and removes it when a shutdown
begins; a missing one answers "not ready" at once without touching the broker. The files
alone are not enough (a process killed outright leaves its file behind when Docker restarts
the same container), so when they exist the ping still decides.

The node names come from ``caption-worker worker --dry-run``, the same code that names the
workers, so this check cannot drift from the worker command. A plain "is the process alive"
check adds nothing: the container already exits when a worker process dies, and the worker's
own watchdog ends a process whose generate call hangs.

    caption-healthcheck              exit 0 when every node answers, else 1
    caption-healthcheck --liveness   as above, but exit 0 when the broker itself is
                                     unreachable: the worker reconnects on its own, and
                                     restarting every pod during a Redis outage would only
                                     reload the model (minutes) for nothing

Environment: HEALTHCHECK_PING_TIMEOUT_S (default 10) bounds the wait for replies; keep the
probe's own timeout above it plus about 10 s for the imports and the broker connection.
"""

from __future__ import annotations

import os
import subprocess
import sys

EX_HEALTHY, EX_UNHEALTHY = 0, 1


def planned_workers() -> list[tuple[str, str | None]]:
    """(node name with %h expanded as Celery expands it, its ready file or None) for each
    worker process this container runs."""
    from celery.utils.nodenames import host_format

    out = subprocess.run(
        ["caption-worker", "worker", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    planned = []
    for line in out.splitlines():
        args = line.split()
        if "--hostname" in args:
            # Each process gets its own ready file (CAPTION_READY_FILE=<file>.gpuN), printed
            # among the environment assignments that start the line.
            ready = next(
                (a.split("=", 1)[1] for a in args if a.startswith("CAPTION_READY_FILE=")), None
            )
            planned.append((host_format(args[args.index("--hostname") + 1]), ready))
    return planned


def main(argv: list[str]) -> int:
    liveness = "--liveness" in argv
    timeout = float(os.environ.get("HEALTHCHECK_PING_TIMEOUT_S", "10"))
    try:
        planned = planned_workers()
    except subprocess.CalledProcessError as exc:
        # A configuration error: the worker refuses to start with it too.
        print(f"unhealthy: caption-worker worker --dry-run failed: {exc.stderr.strip()}")
        return EX_UNHEALTHY
    if not planned:
        print("unhealthy: caption-worker worker --dry-run named no worker node")
        return EX_UNHEALTHY
    missing_files = [f for _, f in planned if f and not os.path.exists(f)]
    if missing_files and not liveness:
        print(
            f"unhealthy: {', '.join(missing_files)} missing "
            "(model not loaded yet, or shutting down)"
        )
        return EX_UNHEALTHY
    nodes = [node for node, _ in planned]

    from kombu.exceptions import OperationalError

    from worker.app import app

    try:
        # Addressed to our own nodes only: a broadcast would make every worker in the
        # fleet answer every probe of every pod.
        replies = app.control.ping(destination=nodes, timeout=timeout)
    except OperationalError as exc:
        if liveness:
            print(f"broker unreachable, not restarting for it: {exc}")
            return EX_HEALTHY
        print(f"unhealthy: broker unreachable: {exc}")
        return EX_UNHEALTHY
    answered = {name for reply in replies for name in reply}
    missing = [n for n in nodes if n not in answered]
    if missing:
        print(f"unhealthy: no ping reply within {timeout:g}s from {', '.join(missing)}")
        return EX_UNHEALTHY
    print(f"healthy: {', '.join(nodes)}")
    return EX_HEALTHY


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
