#!/usr/bin/env python3
"""Record a burst of captions with a real Prometheus, and plot it (the picture in docs/img).

The stack is tests/process/test_dashboard.py's: the tiny SDNQ Qwen3-VL on the CPU, the
loopback S3 server, a private Redis, real ``celery worker`` processes (the fault engine of
tests/support/faulty_engine.py: every task's prompt carries ``[slow]``, so each decode step
sleeps ``--step-delay`` seconds, as a slow GPU would), the real ``caption-worker exporter``,
and ``/usr/bin/prometheus`` scraping them all every second. After a quiet baseline it sends
``--tasks`` captions in one burst, waits until every one has finished and the queue has been
empty a while, then plots images/s, queue depth and queued work with scripts/plot_run.py.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/record_run.py        # about 2 minutes

Needs Debian's ``prometheus`` package, ``redis-server`` and the ``dev`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts")]
# sdnq's import-time torch.compile self-test costs ~20 s on a CPU and changes nothing here.
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

from plot_run import plot  # noqa: E402

from tests.process.test_dashboard import (  # noqa: E402
    ExporterProcess,
    Prometheus,
    prometheus_config,
)
from tests.support.stack import WorkerStack  # noqa: E402
from tests.support.waits import READY_TIMEOUT_S, wait_until  # noqa: E402
from worker.devtools.loopback import LoopbackS3, free_port  # noqa: E402
from worker.devtools.tiny_model import build_tiny_model  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "img" / "run-throughput-queue.png"
PROMPT = "[slow] Describe this image."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8, help="CAPTION_MAX_BATCH")
    parser.add_argument("--step-delay", type=float, default=0.35, help="seconds per decode step")
    parser.add_argument("--baseline", type=float, default=10.0, help="quiet seconds before")
    parser.add_argument("--tail", type=float, default=20.0, help="quiet seconds after")
    parser.add_argument("--rate-window", default="10s")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and TSDB here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="record-run-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        model = build_tiny_model(workdir / "tiny-qwen3-vl")
        with (
            LoopbackS3(log_path=workdir / "s3.log") as s3,
            WorkerStack(
                model,
                s3,
                workdir / "stack",
                name="record",
                faulty=True,
                CAPTION_MAX_BATCH=str(args.max_batch),
                FAULT_STEP_DELAY_S=f"{args.step_delay:g}",
                OMP_NUM_THREADS="1",
            ) as stack,
        ):
            record(stack, args, workdir)


def record(stack: WorkerStack, args: argparse.Namespace, workdir: Path) -> None:
    ports = [free_port() for _ in range(args.workers)]
    workers = [
        stack.worker(f"worker-{i + 1}", CAPTION_METRICS_PORT=str(port)).start()
        for i, port in enumerate(ports)
    ]
    exporter = ExporterProcess(stack.env(), stack.queue, workdir / "exporter.log").wait_ready()
    config = prometheus_config(
        [f"127.0.0.1:{port}" for port in ports], f"127.0.0.1:{exporter.port}", stack.queue
    )
    prom = Prometheus(config, workdir / "prometheus").start()
    try:
        for worker in workers:
            worker.wait_ready(READY_TIMEOUT_S)
        print(f"{args.workers} workers ready; quiet baseline of {args.baseline:g}s")
        time.sleep(args.baseline)

        image = stack.upload("plain.png")
        client = stack.client()
        sent = time.time()
        try:
            ids = [
                client.submit(image, prompt=PROMPT, max_new_tokens=args.max_new_tokens)
                for _ in range(args.tasks)
            ]
        finally:
            client.close()
        print(f"sent {len(ids)} tasks in {time.time() - sent:.1f}s")

        backend = stack.producer.backend

        def finished() -> int:
            metas = [backend.get_task_meta(task_id, cache=False) for task_id in ids]
            return sum(m["status"] in ("SUCCESS", "FAILURE") for m in metas)

        wait_until(lambda: finished() == len(ids), 30 + args.tasks * 5, "every task finishes")
        drained = time.time()
        failed = [
            task_id
            for task_id in ids
            if backend.get_task_meta(task_id, cache=False)["status"] != "SUCCESS"
        ]
        print(f"drained in {drained - sent:.1f}s ({len(failed)} failed)")
        time.sleep(args.tail)
        end = time.time()

        note = (
            f"{args.tasks} captions sent at once to {args.workers} CPU workers (tiny SDNQ "
            f"Qwen3-VL, CAPTION_MAX_BATCH={args.max_batch}, {args.max_new_tokens} tokens, "
            f"{args.step_delay:g} s per decode step) on a 2-core machine; Prometheus scrapes "
            f"every 1 s. Drained in {drained - sent:.0f} s. scripts/record_run.py"
        )
        series = plot(
            prom.url,
            sent - args.baseline,
            end,
            args.output,
            queue=stack.queue,
            rate_window=args.rate_window,
            title="A burst of captions drains: throughput and queue",
            note=note,
            origin=sent,
            origin_label="the burst was sent",
        )
        peak = max(series["images"].values, default=0.0)
        depth = max(series["depth"].values, default=0.0)
        work = max(series["work"].values, default=0.0)
        print(
            f"wrote {args.output}: peak {peak:.1f} images/s, peak depth {depth:.0f}, "
            f"peak queued work {work:.1f}s"
        )
    finally:
        prom.stop()
        exporter.stop()


if __name__ == "__main__":
    main()
