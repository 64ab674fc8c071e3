"""``caption-worker bench --mode soak``: Redis footprint and worker memory under sustained load.

Sends N tasks through the bundled client (so each also gets its ``caption:queued`` marker)
to a real worker process, in waves, and after each wave records: tasks finished, tasks/s,
Redis keys (``DBSIZE`` and by prefix) and ``used_memory`` in the result database, and the
worker's resident memory. The curve shows whether anything grows per task besides the one
result each task must keep. Redis is a private ``redis-server`` on a free port, so nothing
else's keys are counted; S3 is the loopback server unless one is configured.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from worker.settings import Settings

RESULT_DB = 1


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _prefix(key: bytes) -> str:
    """The key family: ``caption:deliveries:<id>:0`` -> ``caption:deliveries``."""
    text = key.decode(errors="replace")
    if text.startswith("celery-task-meta-"):
        return "celery-task-meta"
    parts = text.split(":")
    return ":".join(parts[:2]) if len(parts) > 2 else text


def _footprint(client: Any) -> dict[str, Any]:
    prefixes = Counter(_prefix(k) for k in client.scan_iter(count=1000))
    return {
        "keys": int(client.dbsize()),
        "used_memory_bytes": int(client.info("memory")["used_memory"]),
        "keys_by_prefix": dict(sorted(prefixes.items())),
    }


def run_soak(
    settings: Settings, model_dir: Path, workdir: Path, images: list[bytes], tasks: int, waves: int
) -> dict[str, Any]:
    """Send ``tasks`` tasks in ``waves`` waves through a real worker; return the samples."""
    from worker.client import CaptionClient
    from worker.devtools.loopback import LoopbackS3
    from worker.devtools.processes import WorkerProcess
    from worker.devtools.redis_server import RedisServer

    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer(workdir / "redis", appendonly=False))
        s3 = stack.enter_context(LoopbackS3(workdir / "moto.log"))
        bucket = f"soak-{uuid.uuid4().hex[:8]}"
        store = s3.client()
        store.create_bucket(Bucket=bucket)
        uris = []
        for i, data in enumerate(images):
            store.put_object(Bucket=bucket, Key=f"img-{i:03d}.png", Body=data)
            uris.append(f"s3://{bucket}/img-{i:03d}.png")
        env = {
            **s3.env(),
            "CAPTION_BROKER_URL": f"{redis.url}/0",
            "CAPTION_RESULT_BACKEND": f"{redis.url}/{RESULT_DB}",
            "CAPTION_MODEL": str(model_dir),
            "CAPTION_DTYPE": settings.dtype,
            "CAPTION_AUTO_DOWNLOAD": "false",
            "CAPTION_MAX_PIXELS": str(settings.max_pixels),
            "CAPTION_MIN_PIXELS": str(settings.min_pixels),
            "CAPTION_LOG_LEVEL": "WARNING",
            "SDNQ_USE_TORCH_COMPILE": os.environ.get("SDNQ_USE_TORCH_COMPILE", "0"),
        }
        worker = stack.enter_context(WorkerProcess(env, workdir / "worker-soak.log"))
        assert worker.proc is not None
        pid = worker.proc.pid
        client = CaptionClient(
            settings.model_copy(
                update={"broker_url": env["CAPTION_BROKER_URL"],
                        "result_backend": env["CAPTION_RESULT_BACKEND"]}
            )
        )  # fmt: skip
        stack.callback(client.close)
        results = redis.client(RESULT_DB)
        baseline = _footprint(results)
        samples: list[dict[str, Any]] = [
            {"finished": 0, "seconds": 0.0, "worker_rss_mib": _rss_mib(pid), **baseline}
        ]
        started = time.perf_counter()
        per_wave = max(1, tasks // waves)
        finished = 0
        while finished < tasks:
            wave = min(per_wave, tasks - finished)
            ids = [
                client.submit(
                    uris[(finished + i) % len(uris)], max_new_tokens=settings.max_new_tokens_limit
                )
                for i in range(wave)
            ]
            for task_id in ids:
                client.result(task_id, timeout=600)
            finished += wave
            elapsed = time.perf_counter() - started
            samples.append(
                {
                    "finished": finished,
                    "seconds": round(elapsed, 2),
                    "tasks_per_s": round(finished / elapsed, 2),
                    "worker_rss_mib": _rss_mib(pid),
                    **_footprint(results),
                }
            )
    return _summary(samples, baseline)


def _summary(samples: list[dict[str, Any]], baseline: dict[str, Any]) -> dict[str, Any]:
    last = samples[-1]
    half = min(samples[1:], key=lambda s: abs(s["finished"] - last["finished"] / 2))
    finished = last["finished"]
    return {
        "tasks": finished,
        "tasks_per_s": last["tasks_per_s"],
        "keys_per_finished_task": round((last["keys"] - baseline["keys"]) / finished, 3),
        "bytes_per_finished_task": round(
            (last["used_memory_bytes"] - baseline["used_memory_bytes"]) / finished, 1
        ),
        "worker_rss_growth_second_half_pct": round(
            100 * (last["worker_rss_mib"] - half["worker_rss_mib"]) / half["worker_rss_mib"], 2
        ),
        "samples": samples,
    }
