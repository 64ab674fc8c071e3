"""The Celery application: configuration, the model-loading hooks, the task module.

``celery -A worker.app worker`` imports this module (through ``worker/app.py``). The app
carries the process's ``Lifecycle``, which tasks reach as ``self.app.lifecycle``. The model
loads in
``celeryd_after_setup``, which runs in the main process once logging is configured and
before the consumer starts, so nothing is reserved until the model answers, and no process
forks after CUDA is initialised (the pool is threads).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    task_received,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from worker.errors import CaptionError
from worker.ops.http import serve_operations
from worker.queue.liveness import Liveness, start_liveness
from worker.runtime.lifecycle import Lifecycle
from worker.settings import get_settings

log = logging.getLogger(__name__)

EXIT_START_FAILED = 3

try:
    # Read the environment here, once, so a bad value stops the process with one line
    # naming the variable instead of a traceback from inside Celery's option parsing.
    get_settings()
except CaptionError as exc:
    print(f"caption worker cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
    raise SystemExit(EXIT_START_FAILED) from None


class CaptionApp(Celery):  # type: ignore[misc]
    """A Celery app that carries the worker process's lifecycle (and so its service)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lifecycle = Lifecycle()
        self.liveness: Liveness | None = None


app = CaptionApp("sdnq_caption_worker")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["worker.queue"], related_name="tasks", force=True)
app.autodiscover_tasks(["worker.queue"], related_name="bulk_task", force=True)


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _start(sender: Any = None, instance: Any = None, **_: Any) -> None:
    name = sender if isinstance(sender, str) else socket.gethostname()
    bulk_queue = get_settings().bulk_queue
    if bulk_queue and instance is not None:
        # Every worker also serves bulk shards, after its own queue (however it was
        # started: caption-worker worker names both, a plain ``celery worker -Q`` one).
        instance.app.amqp.queues.select_add(bulk_queue)
    worker_id = f"{name}/{os.getpid()}"
    try:
        # Before the model loads, so /readyz answers 503 (not nothing) while it does.
        serve_operations(get_settings(), app.lifecycle)
        app.lifecycle.start(get_settings(), worker_id)
        app.liveness = start_liveness(app, get_settings(), worker_id, app.lifecycle.metrics.busy)
    except CaptionError as exc:
        # SystemExit passes through Celery's signal dispatch (it catches Exception only)
        # and becomes the worker's exit code before the consumer has reserved anything.
        log.critical("caption worker cannot start: %s: %s", type(exc).__name__, exc)
        print(f"caption worker cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_START_FAILED) from None
    except Exception as exc:
        log.critical("caption worker cannot start", exc_info=True)
        print(f"caption worker cannot start: {exc!r}", file=sys.stderr)
        raise SystemExit(EXIT_START_FAILED) from None


@worker_ready.connect  # type: ignore[untyped-decorator]
def _consuming(**_: Any) -> None:
    app.lifecycle.mark_consuming()


@task_received.connect  # type: ignore[untyped-decorator]
def _received(request: Any = None, **_: Any) -> None:
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    if app.liveness is not None and tag:
        app.liveness.received(str(tag))


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _draining(**_: Any) -> None:
    # Sent as a warm shutdown begins, before in-flight tasks finish: /readyz turns 503 now.
    app.lifecycle.begin_shutdown()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop(**_: Any) -> None:
    app.lifecycle.stop()
    if app.liveness is not None:
        app.liveness.stop()
