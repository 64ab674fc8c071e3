"""``caption-worker bench``: captioning throughput, one image per call against batched.

Two measurements share one model directory and one set of images:

- ``engine``: the real engine and its model thread in this process (``--engine generate``
  or ``slots``). Images are prepared (decode, resize, processor) up front, then captioned
  one at a time and ``max_batch`` at once; the figure is model time only.
- ``path``: the whole product: images uploaded to S3 (loopback moto server unless
  ``AWS_ENDPOINT_URL_S3`` is set), tasks sent with ``send_task`` to Redis, a real worker
  process (started here, once with ``CAPTION_MAX_BATCH=1`` and once batched), results
  read from the result backend. Tasks/s runs from the first send to the last result.
  The batched worker then captions the same images as one bulk run (``bulk``: planned,
  started and followed to ``done``), and ``bulk_vs_tasks`` compares the two rates.

Generated length is fixed: the tiny and random-shape models never emit end-of-sequence
(their output heads are built that way) and the repetition guard is off, so every caption
is exactly as long as asked.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.errors import ConfigError
from worker.settings import Settings, describe_errors


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    mode: str = "all"  # engine | path | all | soak
    tasks: int = 32
    max_batch: int = 32
    new_tokens: int = 128
    image_px: int = 256
    random_shape: str | None = None  # 4b | 8b | 32b (GPU), else the tiny model
    engine: str = "slots"  # slots | generate
    weights: str = "sdnq"  # sdnq | bf16 | int8
    mixed: bool = False  # caption lengths cycle through 1/8, 1/4, 1/2 and all of new_tokens
    models_dir: Path | None = None  # keep the benchmark model here and reuse it
    single: bool = True  # also measure one image at a time (the batching speedup)


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
    if config.models_dir is not None:  # built once, reused by later runs
        workdir = config.models_dir
        kept = workdir / (f"random-{config.random_shape}" if config.random_shape else "tiny-model")
        if (kept / "config.json").exists():
            return kept
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
    try:
        return _bench_settings(config, model_dir, gpu, pixels)
    except ValidationError as exc:  # e.g. --engine slots with CAPTION_MEMORY_MODE=lowvram
        raise ConfigError(f"invalid configuration: {describe_errors(exc)}") from None


def _bench_settings(config: BenchConfig, model_dir: Path, gpu: bool, pixels: int) -> Settings:
    return Settings(
        model=str(model_dir),
        dtype="bfloat16" if gpu else "float32",
        auto_download=False,
        max_pixels=max(pixels, 1024),
        min_pixels=min(pixels, 65_536),
        max_new_tokens_limit=max(config.new_tokens, 1),
        engine=config.engine,
        weights=config.weights,
        max_batch=config.max_batch,
        # The benchmark models loop by construction; lengths must stay what was asked.
        repetition_span=0,
        # Submissions are announced with expect(), so no quiet time is needed to end a burst.
        batch_linger_ms=0,
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


def new_tokens_for(config: BenchConfig, index: int) -> int:
    """Caption length of image ``index``: fixed, or with --mixed 1/8, 1/4, 1/2 and all of it."""
    if not config.mixed:
        return config.new_tokens
    return max(1, config.new_tokens // (8, 4, 2, 1)[index % 4])


def bench_engine(config: BenchConfig, settings: Settings, images: list[bytes]) -> dict[str, Any]:
    """Model time for the same prepared inputs, one at a time and all together."""
    from concurrent.futures import as_completed

    from worker.contract import parse_request
    from worker.runtime.bootstrap import build_runtime

    runtime = build_runtime(settings, "bench")
    engine = runtime.engine
    engine.warm_up()
    started = time.perf_counter()
    items = []
    for i, data in enumerate(images):
        kwargs = {"image": "bench", "max_new_tokens": new_tokens_for(config, i)}
        items.append(runtime.service.prepare(parse_request(kwargs, settings), data)[0])
    prepare_s = time.perf_counter() - started
    graphs = getattr(engine, "graphs", None)
    result: dict[str, Any] = {
        "engine": settings.engine,
        # The slots the KV cache was sized to (fewer than --max-batch when the GPU lacks room).
        "slots": getattr(engine, "slots", None),
        "cuda_graphs": len(graphs.shapes) if graphs is not None else 0,
        "prompt_tokens": items[0].prompt_tokens,
        "prepare_ms_per_image": round(1000 * prepare_s / len(items), 2),
    }
    runtime.start()
    try:
        for label, size in sizes(config):
            latencies, tokens = [], 0
            started = time.perf_counter()
            for at in range(0, len(items), size):
                t0 = time.perf_counter()
                with runtime.runner.expect():  # the batch starts once all are submitted
                    futures = [
                        runtime.runner.submit(item, time.monotonic() + 3600)
                        for item in items[at : at + size]
                    ]
                for future in as_completed(futures):  # in the order they finish
                    tokens += future.result().generated_tokens
                    latencies.append(time.perf_counter() - t0)
            wall = time.perf_counter() - started
            result[label] = {"batch": size, **_summary(latencies, wall, len(items), tokens)}
    finally:
        runtime.stop()
    if "one_at_a_time" in result:
        result["speedup"] = round(
            result["batched"]["images_per_s"] / result["one_at_a_time"]["images_per_s"], 2
        )
    result["peak_memory_gib"] = _peak_memory_gib()
    return result


def sizes(config: BenchConfig) -> list[tuple[str, int]]:
    """The batch sizes to measure: one at a time (unless ``single`` is off), then batched."""
    batched = [("batched", config.max_batch)]
    return [("one_at_a_time", 1), *batched] if config.single else batched


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the configured measurements and return the report (also printed by the CLI)."""
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    import torch

    gpu = torch.cuda.is_available()
    if config.random_shape not in (None, "tiny-test") and not gpu:
        raise SystemExit("--random-shape 4b|8b|32b needs a CUDA GPU (tiny-test runs anywhere)")
    report: dict[str, Any] = {
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items()},
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
            from worker.devtools.bench_path import bench_path

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
