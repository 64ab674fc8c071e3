"""A bulk run end to end: ``bulk submit`` through the real CLI, a real worker process with the
tiny model, real Redis and a real S3 server (moto); ``bulk status`` until it is done."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_bulk_plan import listing, put_many
from tests.process.test_cli import run
from tests.support.images import png_bytes
from tests.support.stack import WorkerStack
from tests.support.waits import READY_TIMEOUT_S, wait_for_value
from worker.bulk.state import RunState
from worker.devtools.loopback import LoopbackS3
from worker.queue.keys import UNACKED_KEY, queue_lists

pytestmark = pytest.mark.timeout(420)

GOOD = 120
#: Objects with image names whose bytes are not images: each must become an error line.
CORRUPT = {
    "photos/bad/empty.png": b"",
    "photos/bad/text.png": b"not an image at all",
    "photos/bad/truncated.png": png_bytes()[:60],
    "photos/bad/noise.jpg": bytes(range(256)) * 2,
}
RUN_TIMEOUT_S = 240.0


def outputs(client: Any, bucket: str, root: str) -> list[dict[str, Any]]:
    """Every output line of a run, in shard order."""
    found = []
    for key, _ in listing(client, bucket, root + "shards/"):
        if key.endswith(".output.jsonl"):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            found += [json.loads(line) for line in body.splitlines()]
    return found


def test_a_bulk_run_captions_every_image_once_and_finishes_without_the_submitter(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> None:
    with WorkerStack(tiny_model_dir, s3_server, tmp_path, name="bulk") as stack:
        worker = stack.worker().start()  # loads the model while the images go up
        bucket = stack.bucket
        for shade in range(4):  # a few different images, 30 keys each
            body = png_bytes((96 + 8 * shade, 64), (40 * shade, 120, 200))
            keys = [f"photos/{i:03d}.png" for i in range(shade, GOOD, 4)]
            put_many(s3_server, bucket, keys, body)
        for key, body in CORRUPT.items():
            stack.upload(key, body)
        worker.wait_ready(READY_TIMEOUT_S)
        env = stack.env(CAPTION_OUTPUT_BUCKETS=bucket)
        source, out = f"s3://{bucket}/photos/", f"s3://{bucket}/runs"

        started = time.monotonic()
        submitted = run(
            "bulk", "submit", source, "--out", out, "--shard-size", "25", "--window", "2",
            "--max-new-tokens", "4", "--queue", stack.bulk_queue, "--json", env=env,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        plan = json.loads(submitted.stdout)
        assert (plan["to_caption"], plan["shards"], plan["enqueued"]) == (124, 5, 2)
        run_id = plan["run_id"]

        def status() -> dict[str, Any]:
            shown = run("bulk", "status", run_id, "--json", env=env)
            assert shown.returncode == 0, shown.stderr
            return dict(json.loads(shown.stdout))

        # The window: two shard messages queued or held, three for the moment between a
        # finished shard sending the next one and its own acknowledgement.
        broker = stack.broker()
        most = 0

        def window() -> None:
            nonlocal most
            held = sum(int(broker.llen(name)) for name in queue_lists(stack.bulk_queue))
            most = max(most, held + int(broker.hlen(UNACKED_KEY)))

        final = wait_for_value(
            status, lambda s: s["state"] == "done", RUN_TIMEOUT_S, "the bulk run to finish",
            tick=window, interval_s=2.0,
        )  # fmt: skip
        seconds = time.monotonic() - started
        assert 1 <= most <= 3
        assert final["total"] == 124 and final["remaining"] == 0
        assert (final["succeeded"], final["failed"], final["skipped"]) == (120, 4, 0)
        assert final["output"] == plan["output"]
        assert final["generated_tokens"] > 0 and final["images_per_second"] > 0

        client = s3_server.client()
        root = plan["output"].split("/", 3)[3]
        lines = outputs(client, bucket, root)
        assert len(lines) == 124 and len({line["id"] for line in lines}) == 124
        ok = [line for line in lines if line["status"] == "ok"]
        errors = [line for line in lines if line["status"] == "error"]
        assert len(ok) == 120 and all(line["text"] and line["generated_tokens"] for line in ok)
        assert {line["image"] for line in errors} == {f"s3://{bucket}/{k}" for k in CORRUPT}
        assert {line["error"]["type"] for line in errors} == {"InvalidImage"}
        assert {line["config"] for line in lines} == {plan["config_hash"]}
        body = client.get_object(Bucket=bucket, Key=root + "manifest.json")["Body"].read()
        manifest = json.loads(body)
        assert (manifest["succeeded"], manifest["failed"]) == (120, 4)
        assert len(manifest["outputs"]) == 5
        assert not [k for k, _ in listing(client, bucket, root) if "checkpoint" in k]

        # No per-image (or per-shard) Celery result was stored.
        assert stack.backend().keys("celery-task-meta-*") == []
        # Nothing is left in the broker once the run is done.
        wait_for_value(stack.leftovers, lambda left: not any(left.values()), 30, "an empty broker")
        assert sum(int(broker.llen(name)) for name in queue_lists(stack.bulk_queue)) == 0

        # --retry-failed captions the four failures again, into the same outputs: they fail
        # the same way (the bytes are not images), every other line stays as it was.
        manifest_before = body
        retried = run("bulk", "resume", run_id, "--retry-failed", "--json", env=env)
        assert retried.returncode == 0, retried.stderr
        assert json.loads(retried.stdout)["retrying"] >= 1
        again_done = wait_for_value(
            status, lambda s: s["state"] == "done", RUN_TIMEOUT_S, "the retry to finish"
        )
        assert (again_done["succeeded"], again_done["failed"]) == (120, 4)
        relines = outputs(client, bucket, root)
        assert [line["id"] for line in relines] == [line["id"] for line in lines]
        assert [line for line in relines if line["status"] == "ok"] == ok
        assert {line["error"]["type"] for line in relines if line["status"] == "error"} == {
            "InvalidImage"
        }
        rewritten = client.get_object(Bucket=bucket, Key=root + "manifest.json")["Body"].read()
        assert json.loads(rewritten)["finished_at"] >= json.loads(manifest_before)["finished_at"]

        # A second submit skips every image the run settled: the captions, and the four
        # InvalidImage errors, which the same bytes would only repeat (docs/bulk.md,
        # "Skipping what is done").
        again = run("bulk", "submit", source, "--out", out, "--max-new-tokens", "4",
                    "--dry-run", "--json", env=env)  # fmt: skip
        assert again.returncode == 0, again.stderr
        counts = json.loads(again.stdout)
        assert (counts["total"], counts["skipped"], counts["to_caption"]) == (124, 124, 0)
        print(f"\nbulk run: 124 items in {seconds:.1f}s ({124 / seconds:.2f} images/s end to end)")


def test_a_shard_paused_by_a_warm_shutdown_resumes_on_another_worker_after_its_checkpoint(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path
) -> None:
    items = 300  # one shard: checkpoints after 100 and 200 items
    with WorkerStack(tiny_model_dir, s3_server, tmp_path, name="bulk-pause") as stack:
        first = stack.worker("first").start()
        keys = [f"photos/{i:03d}.png" for i in range(items)]
        put_many(s3_server, stack.bucket, keys, png_bytes())
        first.wait_ready(READY_TIMEOUT_S)
        env = stack.env()
        submitted = run(
            "bulk", "submit", f"s3://{stack.bucket}/photos/", "--out",
            f"s3://{stack.bucket}/runs", "--shard-size", str(items), "--max-new-tokens", "4",
            "--queue", stack.bulk_queue, "--json", env=env,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        plan = json.loads(submitted.stdout)

        def status() -> dict[str, Any]:
            return dict(json.loads(run("bulk", "status", plan["run_id"], "--json", env=env).stdout))

        # Once the first checkpoint is counted, stop the worker (warm shutdown). Redis is
        # polled directly: a CLI call per poll could miss the middle of the shard.
        state = RunState(stack.backend())
        wait_for_value(
            lambda: state.snapshot(plan["run_id"]) or {},
            lambda record: record.get("succeeded", 0) >= 100,
            RUN_TIMEOUT_S,
            "the first checkpoint",
            interval_s=0.05,
        )
        first.signal(signal.SIGTERM)
        assert first.wait(60) == 0
        paused = status()
        assert paused["state"] == "running" and 100 <= paused["succeeded"] < items
        client = s3_server.client()
        root = plan["output"].split("/", 3)[3]
        assert [k for k, _ in listing(client, stack.bucket, root + "shards/")] == [
            f"{root}shards/00000.checkpoint.jsonl"
        ]
        # The shard sent itself again; another worker resumes it after the checkpoint.
        assert stack.broker().llen(stack.bulk_queue) == 1
        second = stack.start_worker("second")
        final = wait_for_value(status, lambda s: s["state"] == "done", RUN_TIMEOUT_S, "done")
        assert (final["succeeded"], final["failed"], final["remaining"]) == (items, 0, 0)
        lines = outputs(client, stack.bucket, root)
        assert [line["id"] for line in lines] == [k.removeprefix("photos/") for k in keys]
        resumed = [line for line in second.log().splitlines() if "resumes after item" in line]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 100
