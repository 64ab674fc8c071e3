"""The whole-path half of ``caption-worker bench``: producer, Redis, S3 and a real worker.

Images are uploaded to S3 (the loopback moto server unless ``AWS_ENDPOINT_URL_S3`` is
set), tasks sent with ``send_task`` to Redis (a private ``redis-server`` when none answers),
a real worker process started once with ``CAPTION_MAX_BATCH=1`` and once batched, and
results read from the result backend. Tasks/s runs from the first send to the last result.

The batched worker then captions the same images once more as one bulk run (docs/bulk.md):
planned with ``plan_run``, recorded in Redis and its first window of shards sent as
``caption-worker bulk submit`` does, and watched until its state is ``done``. Its images/s
against the tasks' is ``bulk_vs_tasks``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.devtools.bench import BenchConfig, new_tokens_for, sizes
from worker.settings import Settings, load_settings


def bench_path(
    config: BenchConfig, settings: Settings, model_dir: Path, images: list[bytes], workdir: Path
) -> dict[str, Any]:
    """Tasks/s through producer, Redis, S3 and a real worker process."""
    from contextlib import ExitStack

    from celery import Celery

    from worker.devtools.loopback import LoopbackS3
    from worker.devtools.processes import WorkerProcess
    from worker.devtools.redis_server import reachable_redis

    base = load_settings()  # broker and backend URLs from the environment
    with ExitStack() as stack:
        broker = reachable_redis(base.broker_url, stack, workdir / "redis")
        backend = base.result_backend if broker == base.broker_url else broker
        if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
            s3_env: dict[str, str] = {}
        else:
            loopback = stack.enter_context(LoopbackS3(workdir / "moto.log"))
            s3_env = loopback.env()
        s3 = _s3_client(s3_env)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        # Uploaded once: the tasks of both sizes and the bulk run read these same objects.
        uris = []
        for i, data in enumerate(images):
            key = f"{IMAGES_PREFIX}img-{i:05d}.png"
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            uris.append(f"s3://{bucket}/{key}")
        lengths = [new_tokens_for(config, i) for i in range(len(uris))]
        result: dict[str, Any] = {}
        for label, size in sizes(config):
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            # Only the batched worker takes shards, from a queue of its own: never the shared
            # default, where it could take (or be handed) a real run's shards.
            bulk_queue = f"{queue}-bulk" if label == "batched" else ""
            env = {
                **s3_env,
                "CAPTION_BROKER_URL": broker,
                "CAPTION_RESULT_BACKEND": backend,
                "CAPTION_QUEUE": queue,
                "CAPTION_BULK_QUEUE": bulk_queue,
                "CAPTION_OUTPUT_BUCKETS": bucket,
                "CAPTION_MODEL": str(model_dir),
                "CAPTION_DTYPE": settings.dtype,
                "CAPTION_AUTO_DOWNLOAD": "false",
                "CAPTION_MAX_BATCH": str(size),
                "CAPTION_CONCURRENCY": str(max(config.max_batch, 1) + 4),
                "CAPTION_MAX_PIXELS": str(settings.max_pixels),
                "CAPTION_MIN_PIXELS": str(settings.min_pixels),
                "CAPTION_LOG_LEVEL": "WARNING",
                "CAPTION_ENGINE": settings.engine,
                "CAPTION_WEIGHTS": settings.weights,
                "CAPTION_REPETITION_SPAN": str(settings.repetition_span),
                "CAPTION_SLOTS": str(size),  # one at a time means one slot
                "SDNQ_USE_TORCH_COMPILE": os.environ.get("SDNQ_USE_TORCH_COMPILE", "0"),
            }
            worker = WorkerProcess(env, workdir / f"worker-{label}.log")
            with worker:
                producer = Celery("bench", broker=broker, backend=backend)
                producer.conf.update(task_serializer="json", accept_content=["json"])
                try:
                    result[label] = _drive(producer, queue, uris, lengths)
                    if bulk_queue:
                        bench = BulkBench(
                            settings=_bulk_settings(settings, bucket),
                            producer=producer,
                            backend=backend,
                            s3=s3,
                            bucket=bucket,
                            queue=bulk_queue,
                            max_batch=size,
                            workdir=workdir,
                            worker=worker,
                        )
                        result["bulk"] = bench.run(uris, lengths)
                finally:
                    producer.close()
        if "one_at_a_time" in result:
            result["speedup"] = round(
                result["batched"]["tasks_per_s"] / result["one_at_a_time"]["tasks_per_s"], 2
            )
        if "bulk" in result:
            result["bulk_vs_tasks"] = round(
                result["bulk"]["images_per_s"] / result["batched"]["tasks_per_s"], 3
            )
        return result


#: Where the images go in the bench bucket (a bulk run over equal lengths lists this prefix).
IMAGES_PREFIX = "images/"
#: Bulk runs go beneath this prefix of the bench bucket (outside the images' prefix).
RUNS_PREFIX = "runs"
#: How often the bench asks Redis whether the run is done (the end time is the worker's own
#: ``finished_at``, so polling adds nothing to the figure).
POLL_S = 0.05
BULK_TIMEOUT_S = 3600.0


def bulk_shape(images: int, max_batch: int) -> tuple[int, int]:
    """Shard size and window for ``images`` images on a worker batching ``max_batch``.

    What is fair to bulk is what an operator would choose for a run of this size on one
    worker; the tasks had every image queued at once, so the worker must never starve for
    rows for reasons a real run would not have:

    - A shard keeps about ``2 * max_batch`` rows in flight (``ShardCaptioner``), so a shard
      of fewer than that never fills the model; at least ``2 * max_batch`` items a shard.
    - Shards carry fixed costs (read run.json and the inputs, write the output, a Redis
      script, the next message), and in a real run of thousands of images they are small
      against a shard's captioning. About four shards (``images / 4``) keeps those costs
      rare here too, while the run still sends shards from the worker (the window moves),
      so that part of the bulk path is measured, not only a single shard.
    - A window of 2 (3 with more shards) keeps a second shard captioning while one drains
      its last rows and writes its output, and while the next message travels; more would
      only queue rows the model cannot take yet.
    """
    shard_size = max(2 * max(max_batch, 1), math.ceil(images / 4))
    shards = math.ceil(images / shard_size)
    window = min(shards, 2 if shards <= 4 else 3)
    return shard_size, max(window, 1)


@dataclass
class BulkBench:
    """One bulk run over the bench's images on the already-running batched worker."""

    settings: Settings  # the bench's, with the bench bucket allowed for output
    producer: Any  # a Celery app on the bench broker
    backend: str  # the result backend URL: where runs are recorded
    s3: Any
    bucket: str
    queue: str  # the worker's bulk queue
    max_batch: int
    workdir: Path
    worker: Any = None  # the WorkerProcess, to show its log when the run fails

    def run(self, uris: list[str], lengths: list[int]) -> dict[str, Any]:
        """Plan, start and wait for the run; its figures."""
        from worker.bulk.control import ShardSender, start_run
        from worker.bulk.plan import BulkOptions, plan_run
        from worker.bulk.runfiles import RunFiles, layout_of
        from worker.bulk.state import RunState, redis_for

        shard_size, window = bulk_shape(len(uris), self.max_batch)
        if len(set(lengths)) == 1:  # one length: the prefix is the source, as a user would
            source = f"s3://{self.bucket}/{IMAGES_PREFIX}"
            arguments: dict[str, Any] = {"max_new_tokens": lengths[0]}
        else:  # each image its own length, exactly as the tasks asked
            manifest = self.workdir / f"bulk-{uuid.uuid4().hex[:8]}.jsonl"
            with manifest.open("w") as out:
                for uri, n in zip(uris, lengths, strict=True):
                    out.write(json.dumps({"image": uri, "max_new_tokens": n}) + "\n")
            source = str(manifest)
            arguments = {"max_new_tokens": max(lengths)}
        options = BulkOptions(
            source=source,
            out=f"s3://{self.bucket}/{RUNS_PREFIX}",
            arguments=arguments,
            shard_size=shard_size,
            if_exists="overwrite",  # a fresh bucket: there is nothing to skip
            queue=self.queue,
            argv=("caption-worker", "bench"),
        )
        client = redis_for(self.settings.model_copy(update={"result_backend": self.backend}))
        try:
            ledger = RunState(client)
            planned = time.time()
            summary = plan_run(self.settings, options, client=self.s3)
            assert summary.run_id is not None  # not a dry run
            enqueued = time.time()
            files = RunFiles(self.s3, layout_of(summary.output))
            sent = start_run(
                ledger, files, ShardSender(self.producer), counts=summary.counts,
                max_new_tokens=summary.max_new_tokens, queue=self.queue, window=window,
            )  # fmt: skip
            record = self._wait(ledger, summary.run_id)
        finally:
            client.close()
        finished = float(record.get("finished_at") or time.time())
        images = int(record["succeeded"]) + int(record["failed"])
        if record["failed"] or images != len(uris):
            raise RuntimeError(
                f"bulk run {summary.run_id}: {record['succeeded']} of {len(uris)} images "
                f"captioned, {record['failed']} failed; first error: "
                f"{self._first_error(summary.output)}"
            )
        total = finished - planned
        from_enqueue = finished - enqueued
        return {
            "images": images,
            "run_id": summary.run_id,
            "source": "manifest" if source.endswith(".jsonl") else "prefix",
            "shard_size": shard_size,
            "shards": summary.shards,
            "window": window,
            "enqueued": sent,
            "seconds": round(total, 3),
            "images_per_s": round(images / total, 3),
            "plan_seconds": round(enqueued - planned, 3),
            "enqueue_to_done_seconds": round(from_enqueue, 3),
            "images_per_s_from_enqueue": round(images / from_enqueue, 3),
            "generated_tokens": int(record["generated_tokens"]),
        }

    def _wait(self, ledger: Any, run_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + BULK_TIMEOUT_S
        while time.monotonic() < deadline:
            record = ledger.snapshot(run_id)
            if record is None:
                raise RuntimeError(f"bulk run {run_id} is not recorded in Redis")
            if record.get("error"):
                raise RuntimeError(f"bulk run {run_id} failed: {record['error']}{self._log()}")
            if record.get("state") == "done":
                return dict(record)
            if record.get("state") not in ("running", None):
                raise RuntimeError(f"bulk run {run_id} ended {record['state']!r}{self._log()}")
            time.sleep(POLL_S)
        raise TimeoutError(f"bulk run {run_id} not done in {BULK_TIMEOUT_S:g}s{self._log()}")

    def _first_error(self, output: str) -> Any:
        """The error of the first failed item in the run's outputs, or None."""
        from worker.bulk.runfiles import RunFiles, layout_of

        files = RunFiles(self.s3, layout_of(output))
        shard = 0
        while (lines := files.output(shard)) is not None:
            for line in lines:
                if line.get("status") == "error":
                    return line.get("error")
            shard += 1
        return None

    def _log(self) -> str:
        return f"; worker log:\n{self.worker.log()[-4000:]}" if self.worker is not None else ""


def _bulk_settings(settings: Settings, bucket: str) -> Settings:
    """The bench's settings for planning: the bench bucket allowed for output, and the model
    by the name the worker reports. run.json records ``CAPTION_MODEL`` as given, and a worker
    matches an item's model against its resolved name, so a model directory reached through
    a symlink (``--models-dir``) would make every item a ModelMismatch."""
    from worker.engine.catalogue import resolve_model

    return settings.model_copy(
        update={"output_buckets": (bucket,), "model": resolve_model(settings.model).name}
    )


def _s3_client(s3_env: dict[str, str]) -> Any:
    """A boto3 client for the bench's S3 (the loopback server's environment, or boto3's own
    when empty) with a pool for the planner's HeadObject and upload threads."""
    import boto3
    from botocore.config import Config

    from worker.bulk.plan import UPLOAD_WORKERS
    from worker.bulk.sources import HEAD_WORKERS

    config = Config(max_pool_connections=HEAD_WORKERS + UPLOAD_WORKERS + 2)
    if not s3_env:
        return boto3.client("s3", config=config)
    return boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"],
        region_name=s3_env["AWS_REGION"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        config=config,
    )


def _drive(producer: Any, queue: str, uris: list[str], lengths: list[int]) -> dict[str, Any]:
    sent = time.time()
    pending = [
        producer.send_task("caption", kwargs={"image": u, "max_new_tokens": n}, queue=queue)
        for u, n in zip(uris, lengths, strict=True)
    ]
    latencies, batch_sizes, tokens = [], [], 0
    for res in pending:
        value = res.get(timeout=3600)
        tokens += int(value.get("generated_tokens") or 0)
        done = res.date_done
        finished = done.timestamp() if isinstance(done, datetime) else time.time()
        latencies.append(finished - sent)
        batch_sizes.append(value["batch_size"])
    wall = max(latencies)
    ordered = sorted(latencies)
    return {
        "tasks": len(uris),
        "seconds": round(wall, 3),
        "tasks_per_s": round(len(uris) / wall, 3),
        "p50_latency_s": round(statistics.median(ordered), 3),
        "p95_latency_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "mean_batch_size": round(statistics.mean(batch_sizes), 2),
        "generated_tokens": tokens,
    }
