"""Bulk runs under faults, through the real CLI and real worker processes (tiny model, real
Redis, moto over HTTP): a worker SIGKILLed mid-run and the waiting submitter killed, then
``bulk resume``; interactive captions during the run; cancel; a run Redis forgot, resumed
from its files."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_bulk_plan import put_many
from tests.process.test_bulk_run import outputs
from tests.process.test_cli import CLI, run
from tests.support.images import png_bytes
from tests.support.stack import WorkerStack
from tests.support.waits import READY_TIMEOUT_S, wait_for_value
from worker.bulk.state import RunState
from worker.devtools.loopback import LoopbackS3
from worker.queue.keys import BULK_RUNS_KEY, UNACKED_KEY, queue_lists

pytestmark = pytest.mark.timeout(900)

ITEMS = 2_000
CORRUPT = 20
RUN_TIMEOUT_S = 600.0


def upload_images(s3: LoopbackS3, bucket: str, good: int, corrupt: int) -> set[str]:
    """``good`` PNGs (four sizes) and ``corrupt`` empty or garbage objects with image
    names under ``photos/``; the corrupt keys."""
    for shade in range(4):
        body = png_bytes((96 + 16 * shade, 64 + 8 * shade), (50 * shade, 120, 200))
        put_many(s3, bucket, (f"photos/{i:05d}.png" for i in range(shade, good, 4)), body)
    bad = {f"photos/bad-{i:03d}.png": (b"" if i % 2 else b"garbage %d" % i) for i in range(corrupt)}
    for key, body in bad.items():
        s3.client().put_object(Bucket=bucket, Key=key, Body=body)
    return set(bad)


def cli_json(*args: str, env: dict[str, str]) -> Any:
    shown = run(*args, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def latency_s(stack: WorkerStack, uri: str) -> float:
    started = time.monotonic()
    stack.send(image=uri, max_new_tokens=4).get(timeout=120)
    return time.monotonic() - started


def test_a_killed_worker_and_submitter_lose_nothing_and_resume_finishes_every_item_once(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> None:
    # Workers count as dead (and their shard leases lapse) after 3 s of silence.
    fast_liveness = {"CAPTION_HEARTBEAT_INTERVAL_S": "1", "CAPTION_WORKER_DEAD_AFTER_S": "3"}
    with WorkerStack(tiny_model_dir, s3_server, tmp_path, name="bulk-2k", **fast_liveness) as stack:
        doomed, survivor = stack.worker("doomed").start(), stack.worker("survivor").start()
        bucket = stack.bucket
        bad = upload_images(s3_server, bucket, ITEMS - CORRUPT, CORRUPT)
        doomed.wait_ready(READY_TIMEOUT_S)
        survivor.wait_ready(READY_TIMEOUT_S)
        env = stack.env(CAPTION_OUTPUT_BUCKETS=bucket)
        source, out = f"s3://{bucket}/photos/", f"s3://{bucket}/runs"
        probe = stack.upload("probe/one.png")
        lone = [latency_s(stack, probe) for _ in range(3)]

        waiter = subprocess.Popen(
            [CLI, "bulk", "submit", source, "--out", out, "--shard-size", "100",
             "--window", "4", "--max-new-tokens", "4", "--queue", stack.bulk_queue, "--wait"],
            env={**env, "SDNQ_USE_TORCH_COMPILE": "0"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        backend = stack.backend()
        state = RunState(backend)
        run_id = wait_for_value(
            state.run_ids, lambda ids: len(ids) == 1, 120, "the run to be recorded"
        )[0]

        def succeeded() -> int:
            return int((state.snapshot(run_id) or {}).get("succeeded", 0))

        wait_for_value(succeeded, lambda n: n >= 200, RUN_TIMEOUT_S, "200 captions")
        # Interactive captions while both workers hold bulk shards.
        during = [latency_s(stack, probe) for _ in range(5)]
        # No per-image result for bulk items: the only result keys are the interactive ones.
        interactive = {f"celery-task-meta-{task.id}" for task in stack.sent}
        assert {k.decode() for k in backend.keys("celery-task-meta-*")} <= interactive

        wait_for_value(succeeded, lambda n: n >= 500, RUN_TIMEOUT_S, "500 captions")
        doomed.signal(signal.SIGKILL)
        waiter.send_signal(signal.SIGKILL)
        assert doomed.wait(30) == -signal.SIGKILL and waiter.wait(30) == -signal.SIGKILL
        killed_at = succeeded()
        time.sleep(5)  # the dead worker's lease (3 s) lapses
        resumed = cli_json("bulk", "resume", run_id, env=env)
        assert resumed["state"] == "running" and not resumed["restored"]

        final = wait_for_value(
            lambda: cli_json("bulk", "status", run_id, env=env),
            lambda s: s["state"] == "done", RUN_TIMEOUT_S, "the run to finish", interval_s=2.0,
        )  # fmt: skip
        assert (final["total"], final["remaining"]) == (ITEMS, 0)
        assert (final["succeeded"], final["failed"]) == (ITEMS - CORRUPT, CORRUPT)

        root = final["output"].split("/", 3)[3]
        lines = outputs(s3_server.client(), bucket, root)
        assert len(lines) == ITEMS and len({line["id"] for line in lines}) == ITEMS
        errors = [line for line in lines if line["status"] == "error"]
        assert sum(line["status"] == "ok" for line in lines) == ITEMS - CORRUPT
        assert {line["image"] for line in errors} == {f"s3://{bucket}/{k}" for k in bad}
        assert {line["error"]["type"] for line in errors} == {"InvalidImage"}

        report = cli_json("bulk", "report", run_id, env=env)
        assert [(g["type"], g["count"]) for g in report["errors"]] == [("InvalidImage", CORRUPT)]
        assert report["duplicates"] == 0 and report["ok"] == ITEMS - CORRUPT
        watched = run("bulk", "status", run_id, "--watch", env=env)
        assert watched.returncode == 0 and "done" in watched.stderr

        again = cli_json("bulk", "submit", source, "--out", out, "--max-new-tokens", "4",
                         "--dry-run", env=env)  # fmt: skip
        assert (again["total"], again["to_caption"], again["skipped"]) == (ITEMS, 0, ITEMS)
        changed = cli_json("bulk", "submit", source, "--out", out, "--max-new-tokens", "4",
                           "--prompt", "Name the main colour.", "--dry-run", env=env)  # fmt: skip
        assert changed["to_caption"] == ITEMS

        lone_s, during_s = statistics.median(lone), statistics.median(during)
        print(
            f"\n{ITEMS} items, 2 workers, one SIGKILLed at {killed_at} captions: done in "
            f"{final['seconds']:.1f}s ({final['images_per_second']} images/s)"
            f"\ninteractive caption latency: alone {lone_s:.2f}s (median of 3), during the "
            f"bulk run {during_s:.2f}s (median of 5, max {max(during):.2f}s)"
        )
        # An interactive row joins the next batch ahead of bulk rows: it waits for about the
        # batch in progress, not for the shard.
        assert during_s < lone_s + 5.0


def test_cancel_stops_a_run_and_resume_from_s3_finishes_it_after_redis_forgot_it(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> None:
    items = 600
    with WorkerStack(tiny_model_dir, s3_server, tmp_path, name="bulk-cancel") as stack:
        worker = stack.worker().start()
        put_many(
            s3_server, stack.bucket, (f"photos/{i:04d}.png" for i in range(items)), png_bytes()
        )
        worker.wait_ready(READY_TIMEOUT_S)
        env = stack.env()
        plan = cli_json(
            "bulk", "submit", f"s3://{stack.bucket}/photos/", "--out", f"s3://{stack.bucket}/runs",
            "--shard-size", "100", "--window", "3", "--max-new-tokens", "4",
            "--queue", stack.bulk_queue, env=env,
        )  # fmt: skip
        run_id, backend, broker = plan["run_id"], stack.backend(), stack.broker()
        state = RunState(backend)
        wait_for_value(
            lambda: (state.snapshot(run_id) or {}).get("succeeded", 0), lambda n: n >= 150,
            RUN_TIMEOUT_S, "150 captions", interval_s=0.1,
        )  # fmt: skip
        cancelled = run("bulk", "cancel", run_id, env=env)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout

        # Running shards stop at their next item; queued ones are dropped: the run holds.
        def settled() -> tuple[int, int]:
            record = state.snapshot(run_id) or {}
            queued = sum(int(broker.llen(name)) for name in queue_lists(stack.bulk_queue))
            return record.get("succeeded", 0), queued + int(broker.hlen(UNACKED_KEY))

        wait_for_value(settled, lambda s: s[1] == 0, 60, "the run's messages to be dropped")
        held = settled()[0]
        time.sleep(3)
        assert settled()[0] == held < items
        status = cli_json("bulk", "status", run_id, env=env)
        assert status["state"] == "cancelled" and status["remaining"] == items - held

        # Redis loses everything it knew of the run; its files are enough to finish it.
        for key in list(backend.scan_iter(f"caption:bulk:{run_id}*")):
            backend.delete(key)
        backend.srem(BULK_RUNS_KEY, run_id)
        resumed = cli_json("bulk", "resume", plan["output"], env=env)
        assert resumed["restored"] and resumed["sent"] >= 1
        final = wait_for_value(
            lambda: cli_json("bulk", "status", run_id, env=env),
            lambda s: s["state"] == "done", RUN_TIMEOUT_S, "the resumed run to finish",
            interval_s=1.0,
        )  # fmt: skip
        assert (final["succeeded"], final["failed"], final["remaining"]) == (items, 0, 0)
        lines = outputs(s3_server.client(), stack.bucket, plan["output"].split("/", 3)[3])
        assert sorted(line["id"] for line in lines) == [f"{i:04d}.png" for i in range(items)]
        listed = cli_json("bulk", "list", env=env)
        assert [(r["run_id"], r["state"]) for r in listed] == [(run_id, "done")]
