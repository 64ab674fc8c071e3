"""One worker stack for every test that runs real ``celery worker`` processes.

A ``WorkerStack`` owns a queue of its own, a bucket on the loopback S3 server, the tiny
model, a Redis (the shared one, a caller's private server, or a private server of its own),
a producer built as a web backend would build it, and every worker process it started.
Leaving it stops the workers, the producer and the Redis it started, in that order.
"""

from __future__ import annotations

import json
import os
import ssl
import uuid
from pathlib import Path
from typing import Any, Self, cast

import redis
from celery import Celery
from celery.result import AsyncResult
from kombu import Connection

from tests.support.images import png_bytes
from tests.support.waits import READY_TIMEOUT_S
from worker.client import CaptionClient
from worker.devtools.loopback import LoopbackS3
from worker.devtools.processes import WorkerProcess
from worker.devtools.redis_server import RedisServer
from worker.queue.keys import (
    CRASH_KEY,
    DELIVERY_KEY,
    QUEUED_KEY,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    queue_lists,
)
from worker.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Worker processes load this engine factory with CAPTION_ENGINE_FACTORY (prompt markers).
FAULTY_ENGINE = "tests.support.faulty_engine:load_faulty_engine"
BROKER_DB, BACKEND_DB = 0, 1
#: The machine's RabbitMQ (dev and CI machines run one); results stay in Redis with it.
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def pythonpath() -> str:
    """PYTHONPATH for a worker process that must import ``tests.support``."""
    parts = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def worker_env(
    *, model_dir: Path, s3: LoopbackS3, redis_base: str, queue: str, **extra: str
) -> dict[str, str]:
    """Environment for a worker process and its producer: tiny model, loopback S3, Redis."""
    defaults = Settings.model_fields
    env = {
        **s3.env(),
        "CAPTION_BROKER_URL": f"{redis_base}/{BROKER_DB}",
        "CAPTION_RESULT_BACKEND": f"{redis_base}/{BACKEND_DB}",
        "CAPTION_QUEUE": queue,
        # Workers also consume a bulk queue; each stack has its own, so no stack takes
        # another's shards (or a developer's, on the machine's shared Redis).
        "CAPTION_BULK_QUEUE": f"{queue}-bulk",
        "CAPTION_MODEL": str(model_dir),
        "CAPTION_DTYPE": "float32",
        "CAPTION_AUTO_DOWNLOAD": "false",
        "CAPTION_MAX_BATCH": "8",
        "CAPTION_TASK_DEADLINE_S": "60",
        "CAPTION_VISIBILITY_TIMEOUT_S": "300",
        # The pinned result depends on these: the defaults, whatever this shell exports.
        "CAPTION_MAX_PIXELS": str(defaults["max_pixels"].default),
        "CAPTION_MIN_PIXELS": str(defaults["min_pixels"].default),
        "SDNQ_USE_TORCH_COMPILE": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "2",
        "PYTHONPATH": pythonpath(),
    }
    env.update(extra)
    return env


def producer(env: dict[str, str], ca_file: Path | None = None) -> Celery:
    """A producer as a web backend would build it: Celery and two URLs, no ``worker`` import.

    ``ca_file``: verify a ``rediss://`` broker and backend against this CA.
    """
    app = Celery(
        "producer", broker=env["CAPTION_BROKER_URL"], backend=env["CAPTION_RESULT_BACKEND"]
    )
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    if ca_file is not None:
        verify = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca_file)}
        app.conf.update(broker_use_ssl=verify, redis_backend_use_ssl=verify)
    return app


class WorkerStack:
    """A queue, a bucket, a Redis, a producer, and the worker processes started on them.

    ``redis``: a URL base such as ``redis://127.0.0.1:6379`` (a shared server: only this
    stack's queue and keys are touched), a running ``RedisServer`` the caller owns, or None
    for a private server this stack starts (``appendonly`` for its AOF) and stops.
    ``faulty``: workers load ``tests.support.faulty_engine`` (faults through prompt markers).
    ``task_defaults``: kwargs every ``send`` starts from. ``env``: more worker environment.
    """

    def __init__(
        self,
        model_dir: Path,
        s3: LoopbackS3,
        workdir: Path,
        *,
        name: str = "stack",
        redis: str | RedisServer | None = None,
        appendonly: bool = False,
        faulty: bool = False,
        task_defaults: dict[str, Any] | None = None,
        **env: str,
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.queue = f"{name}-{tag}"
        self.bucket = f"{name}-{tag}"
        self.s3 = s3
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.task_defaults = dict(task_defaults or {})
        self._model_dir = model_dir
        self._redis_arg = redis
        self._appendonly = appendonly
        self._extra_env = {"CAPTION_ENGINE_FACTORY": FAULTY_ENGINE} if faulty else {}
        self._extra_env.update(env)
        self._owned_redis: RedisServer | None = None
        self.redis: RedisServer | None = None
        self.redis_base = ""
        self.base_env: dict[str, str] = {}
        self._producer: Celery | None = None
        self.workers: list[WorkerProcess] = []
        self.sent: list[AsyncResult] = []

    # --- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.s3.client().create_bucket(Bucket=self.bucket)
            if isinstance(self._redis_arg, str):
                self.redis_base = self._redis_arg
            else:
                if self._redis_arg is None:
                    server = RedisServer(self.workdir / "redis", appendonly=self._appendonly)
                    self._owned_redis = server.start()
                    self.redis = server
                else:
                    self.redis = self._redis_arg
                self.redis_base = self.redis.url
            self.base_env = worker_env(
                model_dir=self._model_dir,
                s3=self.s3,
                redis_base=self.redis_base,
                queue=self.queue,
                **self._extra_env,
            )
            tls = self.redis.tls if self.redis is not None else None
            self._producer = producer(self.base_env, tls.ca_file if tls else None)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers, then the producer, then the Redis this stack started."""
        for proc in self.workers:
            proc.stop(timeout_s=30)
        if self._producer is not None:
            # send_task subscribed to each result's channel; unsubscribe while Redis still
            # runs, or AsyncResult.__del__ tries it later against a stopped server.
            for task in self.sent:
                self._producer.backend.remove_pending_result(task)
            self._producer.close()
            self._producer = None
        if self.amqp and self.base_env:
            # The queue lives on the shared RabbitMQ: leave nothing of this stack there.
            with Connection(self.base_env["CAPTION_BROKER_URL"]) as conn:
                conn.default_channel.queue_delete(self.queue)
                if self.bulk_queue:
                    conn.default_channel.queue_delete(self.bulk_queue)
        if self._owned_redis is not None:
            self._owned_redis.stop()
            self._owned_redis = None

    # --- workers and tasks ------------------------------------------------------------------

    @property
    def amqp(self) -> bool:
        """Whether the broker is RabbitMQ (results are in Redis either way)."""
        return self.base_env.get("CAPTION_BROKER_URL", "").startswith("amqp")

    @property
    def bulk_queue(self) -> str:
        """The bulk queue this stack's workers consume after their own."""
        return self.base_env.get("CAPTION_BULK_QUEUE", "")

    @property
    def producer(self) -> Celery:
        assert self._producer is not None, "use the stack in a with block"
        return self._producer

    def env(self, **extra: str) -> dict[str, str]:
        """The worker and producer environment, with ``extra`` on top."""
        return {**self.base_env, **extra}

    def worker(self, name: str | None = None, **extra: str) -> WorkerProcess:
        """A worker process (not started) on this stack's queue, node ``name@%h``.

        Its log is ``<workdir>/<name>.log``; the stack stops it on exit.
        """
        name = name or f"worker-{len(self.workers) + 1}"
        proc = WorkerProcess(self.env(**extra), self.workdir / f"{name}.log", node=f"{name}@%h")
        self.workers.append(proc)
        return proc

    def start_worker(self, name: str | None = None, **extra: str) -> WorkerProcess:
        """A worker process, started and ready (model loaded, consumer connected)."""
        return self.worker(name, **extra).start().wait_ready(READY_TIMEOUT_S)

    def client(self, **settings: Any) -> CaptionClient:
        """The bundled producer client on this stack's broker, backend and queue."""
        env = self.env()
        return CaptionClient(
            Settings(
                broker_url=env["CAPTION_BROKER_URL"],
                result_backend=env["CAPTION_RESULT_BACKEND"],
                queue=self.queue,
                **settings,
            )
        )

    def send(self, task_id: str | None = None, **kwargs: Any) -> AsyncResult:
        """Queue one caption task as a producer would (``task_defaults`` under ``kwargs``)."""
        result = self.producer.send_task(
            "caption", kwargs={**self.task_defaults, **kwargs}, queue=self.queue, task_id=task_id
        )
        self.sent.append(result)
        return result

    def upload(self, key: str, data: bytes | None = None) -> str:
        """Put ``data`` (default: the standard test PNG) in the stack's bucket; its URI."""
        self.s3.client().put_object(
            Bucket=self.bucket, Key=key, Body=png_bytes() if data is None else data
        )
        return f"s3://{self.bucket}/{key}"

    # --- what Redis holds -------------------------------------------------------------------

    def redis_client(self, db: int) -> redis.Redis:
        """A client for one database of this stack's Redis."""
        if self.redis is not None:
            return self.redis.client(db)
        return redis.Redis.from_url(f"{self.redis_base}/{db}")

    def broker(self) -> redis.Redis:
        return self.redis_client(BROKER_DB)

    def backend(self) -> redis.Redis:
        return self.redis_client(BACKEND_DB)

    def meta(self, task_id: str) -> dict[str, Any]:
        """The task's stored state, read from Redis now (no client-side cache)."""
        meta: dict[str, Any] = self.producer.backend.get_task_meta(task_id, cache=False)
        return meta

    def waiting(self) -> int:
        """Messages still in the queue's Redis lists (not reserved by any worker)."""
        broker = self.broker()
        return sum(int(broker.llen(name)) for name in queue_lists(self.queue))

    def unacked(self) -> list[str]:
        """Ids of tasks reserved by some worker and not yet acknowledged."""
        raw = self.broker().hvals(UNACKED_KEY)
        return [json.loads(v)[0]["headers"]["id"] for v in raw]

    def leftovers(self) -> dict[str, int]:
        """Messages still in the broker: queued, or delivered and never acknowledged."""
        broker = self.broker()
        return {
            "queued": self.waiting(),
            "unacked": int(broker.hlen(UNACKED_KEY)),
            "unacked_index": int(broker.zcard(UNACKED_INDEX_KEY)),
        }

    def delivery_times(self) -> list[float]:
        """When each unacknowledged message was handed to a worker (kombu's index)."""
        index = self.broker().zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
        return [float(score) for _, score in cast(list[tuple[bytes, float]], index)]

    def deliveries(self, task_id: str) -> int:
        """The worker's delivery counter for this task (exists only while it is unfinished)."""
        value = self.backend().get(DELIVERY_KEY.format(task_id=task_id, retry=0))
        return int(value) if value is not None else 0

    def bookkeeping(self, task_id: str) -> list[str]:
        """Every per-task key besides the result that Redis still holds for this task."""
        names = [QUEUED_KEY.format(task_id=task_id)] + [
            key.format(task_id=task_id, retry=retry)
            for key in (DELIVERY_KEY, CRASH_KEY)
            for retry in range(4)
        ]
        backend = self.backend()
        return [name for name in names if backend.exists(name)]

    def log_events(self, task_id: str, event: str) -> int:
        """Lines of every worker's log that report ``event`` for this task.

        Celery logs ``Task caption[<id>] received`` per delivery and ``... succeeded in`` per
        run that stored a result.
        """
        needle = f"[{task_id}] {event}"
        return sum(proc.log().count(needle) for proc in self.workers)

    def captions(self, task_id: str) -> int:
        """How often a worker really captioned this task (stored-result replays excluded)."""
        replays = sum(
            proc.log().count(f"task {task_id} already succeeded") for proc in self.workers
        )
        return self.log_events(task_id, "succeeded in") - replays
