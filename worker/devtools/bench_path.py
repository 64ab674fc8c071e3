"""The whole-path half of ``caption-worker bench``: producer, Redis, S3 and a real worker.

Images are uploaded to S3 (the loopback moto server unless ``AWS_ENDPOINT_URL_S3`` is
set), tasks sent with ``send_task`` to Redis (a private ``redis-server`` when none answers),
a real worker process started once with ``CAPTION_MAX_BATCH=1`` and once batched, and
results read from the result backend. Tasks/s runs from the first send to the last result.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
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
            import boto3

            s3, s3_env = boto3.client("s3"), {}
        else:
            loopback = stack.enter_context(LoopbackS3(workdir / "moto.log"))
            s3, s3_env = loopback.client(), loopback.env()
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        uris = []
        for i, data in enumerate(images):
            s3.put_object(Bucket=bucket, Key=f"img-{i:05d}.png", Body=data)
            uris.append(f"s3://{bucket}/img-{i:05d}.png")
        result: dict[str, Any] = {}
        for label, size in sizes(config):
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            env = {
                **s3_env,
                "CAPTION_BROKER_URL": broker,
                "CAPTION_RESULT_BACKEND": backend,
                "CAPTION_QUEUE": queue,
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
                "CAPTION_SLOTS": str(config.max_batch),
                "SDNQ_USE_TORCH_COMPILE": os.environ.get("SDNQ_USE_TORCH_COMPILE", "0"),
            }
            worker = WorkerProcess(env, workdir / f"worker-{label}.log")
            with worker:
                producer = Celery("bench", broker=broker, backend=backend)
                try:
                    lengths = [new_tokens_for(config, i) for i in range(len(uris))]
                    result[label] = _drive(producer, queue, uris, lengths)
                finally:
                    producer.close()
        if "one_at_a_time" in result:
            result["speedup"] = round(
                result["batched"]["tasks_per_s"] / result["one_at_a_time"]["tasks_per_s"], 2
            )
        return result


def _drive(producer: Any, queue: str, uris: list[str], lengths: list[int]) -> dict[str, Any]:
    sent = time.time()
    pending = [
        producer.send_task("caption", kwargs={"image": u, "max_new_tokens": n}, queue=queue)
        for u, n in zip(uris, lengths, strict=True)
    ]
    latencies, batch_sizes = [], []
    for res in pending:
        value = res.get(timeout=3600)
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
    }
