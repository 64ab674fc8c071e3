"""``caption-worker bench``: captioning throughput, one image per call against batched.

Two measurements share one model directory and one set of images:

- ``engine``: the real engine in this process. Images are prepared (decode, resize,
  processor) up front, then captioned one per generate call and in batches of
  ``max_batch``; the figure is generate time only.
- ``path``: the whole product: images uploaded to S3 (loopback moto server unless
  ``AWS_ENDPOINT_URL_S3`` is set), tasks sent with ``send_task`` to Redis, a real worker
  process (started here, once with ``CAPTION_MAX_BATCH=1`` and once batched), results
  read from the result backend. Tasks/s runs from the first send to the last result.

Generated length is fixed: the tiny and random-shape models never emit end-of-sequence
(their output heads are built that way), so every caption is ``new_tokens`` long.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.settings import Settings, load_settings


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    mode: str = "all"  # engine | path | all | soak
    tasks: int = 32
    max_batch: int = 32
    new_tokens: int = 128
    image_px: int = 256
    random_shape: str | None = None  # 4b | 8b | 32b (GPU), else the tiny model


def machine() -> dict[str, Any]:
    """The CPU model, core count and GPU name the figures came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
    return info


def _images(count: int, side: int) -> list[bytes]:
    """Distinct PNG images: seeded noise under a few shapes."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        draw.ellipse(
            (side // 8, side // 8, side // 2 + i % (side // 2), side // 2),
            fill=(i * 7 % 255, 90, 200),
        )
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _model_dir(config: BenchConfig, workdir: Path, gpu: bool) -> Path:
    if config.random_shape is None:
        from worker.devtools.tiny_model import build_tiny_model

        return build_tiny_model(workdir / "tiny-model")
    from worker.devtools.shapes import random_model_dir

    return random_model_dir(
        config.random_shape,
        workdir / f"random-{config.random_shape}",
        device="cuda" if gpu else "cpu",
    )


def _settings(config: BenchConfig, model_dir: Path, gpu: bool) -> Settings:
    pixels = config.image_px * config.image_px
    return Settings(
        model=str(model_dir),
        dtype="bfloat16" if gpu else "float32",
        auto_download=False,
        max_pixels=max(pixels, 1024),
        min_pixels=min(pixels, 65_536),
        max_new_tokens_limit=max(config.new_tokens, 1),
    )


def _peak_memory_gib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _summary(latencies: list[float], wall: float, images: int, tokens: int) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "images": images,
        "seconds": round(wall, 3),
        "images_per_s": round(images / wall, 3),
        "generated_tokens_per_s": round(tokens / wall, 1),
        "p50_latency_s": round(statistics.median(ordered), 3),
        "p95_latency_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
    }


def bench_engine(config: BenchConfig, settings: Settings, images: list[bytes]) -> dict[str, Any]:
    """Generate time for the same prepared inputs, one per call and batched."""
    from worker.contract import parse_request
    from worker.runtime.bootstrap import build_runtime

    runtime = build_runtime(settings, "bench")  # not started: generate is called directly
    engine = runtime.engine
    engine.warm_up()
    request = parse_request({"image": "bench", "max_new_tokens": config.new_tokens}, settings)
    started = time.perf_counter()
    items = [runtime.service.prepare(request, data)[0] for data in images]
    prepare_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "prompt_tokens": items[0].prompt_tokens,
        "prepare_ms_per_image": round(1000 * prepare_s / len(items), 2),
    }
    for label, size in (("one_at_a_time", 1), ("batched", config.max_batch)):
        latencies, tokens = [], 0
        started = time.perf_counter()
        for at in range(0, len(items), size):
            chunk = items[at : at + size]
            t0 = time.perf_counter()
            outputs = engine.generate(chunk)
            latencies += [time.perf_counter() - t0] * len(chunk)
            tokens += sum(o.generated_tokens for o in outputs)
        wall = time.perf_counter() - started
        result[label] = {"batch": size, **_summary(latencies, wall, len(items), tokens)}
    result["speedup"] = round(
        result["batched"]["images_per_s"] / result["one_at_a_time"]["images_per_s"], 2
    )
    result["peak_memory_gib"] = _peak_memory_gib()
    return result


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
        for label, size in (("one_at_a_time", 1), ("batched", config.max_batch)):
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
                "SDNQ_USE_TORCH_COMPILE": os.environ.get("SDNQ_USE_TORCH_COMPILE", "0"),
            }
            worker = WorkerProcess(env, workdir / f"worker-{label}.log")
            with worker:
                producer = Celery("bench", broker=broker, backend=backend)
                try:
                    result[label] = _drive(producer, queue, uris, config.new_tokens)
                finally:
                    producer.close()
        result["speedup"] = round(
            result["batched"]["tasks_per_s"] / result["one_at_a_time"]["tasks_per_s"], 2
        )
        return result


def _drive(producer: Any, queue: str, uris: list[str], new_tokens: int) -> dict[str, Any]:
    sent = time.time()
    pending = [
        producer.send_task(
            "caption", kwargs={"image": u, "max_new_tokens": new_tokens}, queue=queue
        )
        for u in uris
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


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the configured measurements and return the report (also printed by the CLI)."""
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    import torch

    gpu = torch.cuda.is_available()
    if config.random_shape not in (None, "tiny-test") and not gpu:
        raise SystemExit("--random-shape 4b|8b|32b needs a CUDA GPU (tiny-test runs anywhere)")
    report: dict[str, Any] = {
        "machine": machine(),
        "config": {**config.__dict__},
        "model": config.random_shape or "tiny (random, SDNQ uint4+SVD)",
    }
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = _model_dir(config, workdir, gpu)
        settings = _settings(config, model_dir, gpu)
        if config.mode == "soak":
            from worker.devtools.soak import run_soak

            images = _images(min(config.tasks, 16), config.image_px)
            report["soak"] = run_soak(settings, model_dir, workdir, images, config.tasks, 10)
            return report
        images = _images(config.tasks, config.image_px)
        if config.mode in ("engine", "all"):
            report["engine"] = bench_engine(config, settings, images)
        if config.mode in ("path", "all"):
            report["path"] = bench_path(config, settings, model_dir, images, workdir)
        if "engine" in report and "path" in report:
            report["path_vs_engine_batched"] = round(
                report["path"]["batched"]["tasks_per_s"]
                / report["engine"]["batched"]["images_per_s"],
                3,
            )
    return report


if __name__ == "__main__":
    print(json.dumps(run_bench(BenchConfig()), indent=2))
