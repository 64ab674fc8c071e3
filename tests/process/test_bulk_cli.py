"""``caption-worker bulk submit`` run as a user runs it, against a real S3 server (moto)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis

from tests.integration.test_bulk_plan import fabricate_outputs, listing, put_many
from tests.process.test_cli import run
from worker.bulk.plan import BulkOptions, plan_run
from worker.devtools.loopback import LoopbackS3
from worker.queue.keys import BULK_RUN_KEY, BULK_RUNS_KEY
from worker.settings import Settings

KEYS = ["photos/a.jpg", "photos/b/c.PNG", "photos/d.webp", "photos/notes.txt"]


def test_dry_run_json_counts_and_writes_nothing(
    s3_server: LoopbackS3, bucket: str, s3_client: Any
) -> None:
    put_many(s3_server, bucket, KEYS)
    env = {**s3_server.env(), "CAPTION_OUTPUT_BUCKETS": bucket, "CAPTION_ALLOWED_BUCKETS": bucket}
    out = run(
        "bulk", "submit", f"s3://{bucket}/photos/", "--out", f"s3://{bucket}/runs",
        "--exclude", "b/*", "--dry-run", "--json", env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary == {
        "run_id": None,
        "total": 2,
        "to_caption": 2,
        "skipped": 0,
        "shards": 1,
        "source": f"s3://{bucket}/photos/",
        "output": f"s3://{bucket}/runs/",
        "config_hash": summary["config_hash"],
    }
    assert len(summary["config_hash"]) == 16
    assert [k for k, _ in listing(s3_client, bucket)] == KEYS


def test_submit_plans_in_s3_starts_the_first_window_and_prints_the_run_id(
    s3_server: LoopbackS3, bucket: str, s3_client: Any, redis_url: str
) -> None:
    put_many(s3_server, bucket, [*KEYS, "photos/e.gif", "photos/f.bmp"])
    queue = f"bulk-cli-{uuid.uuid4().hex[:8]}"
    env = {
        **s3_server.env(),
        "CAPTION_OUTPUT_BUCKETS": bucket,
        "CAPTION_BROKER_URL": f"{redis_url}/0",
        "CAPTION_RESULT_BACKEND": f"{redis_url}/1",
    }
    out = run(
        "bulk", "submit", f"s3://{bucket}/photos/", "--out", f"s3://{bucket}/runs",
        "--shard-size", "2", "--window", "2", "--queue", queue, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    root = f"runs/{run_id}/"
    assert [k for k, _ in listing(s3_client, bucket, root)] == [
        f"{root}inputs/00000.jsonl", f"{root}inputs/00001.jsonl", f"{root}inputs/00002.jsonl",
        f"{root}run.json",
    ]  # fmt: skip
    run_json = json.loads(s3_client.get_object(Bucket=bucket, Key=root + "run.json")["Body"].read())
    assert run_json["argv"][:3] == ["caption-worker", "bulk", "submit"]
    assert run_json["counts"]["to_caption"] == 5
    broker = redis.Redis.from_url(f"{redis_url}/0")
    backend = redis.Redis.from_url(f"{redis_url}/1")
    run_key = BULK_RUN_KEY.format(run_id=run_id)
    try:
        # The first window of shards is queued (no result will be kept for them) ...
        messages = [json.loads(m) for m in broker.lrange(queue, 0, -1)]
        assert [m["headers"]["task"] for m in messages] == ["caption_bulk_shard"] * 2
        kwargs = sorted(json.loads(base64.b64decode(m["body"]))[1]["shard"] for m in messages)
        assert kwargs == [0, 1]
        # ... and the run is recorded as running, with the window's cursor past them.
        record = {k.decode(): v.decode() for k, v in backend.hgetall(run_key).items()}
        assert record["state"] == "running" and record["next_shard"] == "2"
        assert record["shards"] == "3" and record["to_caption"] == "5"
        assert record["output"] == f"s3://{bucket}/{root}"
        status = run("bulk", "status", run_id, "--json", env=env)
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert (shown["state"], shown["remaining"], shown["succeeded"]) == ("running", 5, 0)
    finally:
        broker.delete(queue)
        backend.delete(run_key)
        backend.srem(BULK_RUNS_KEY, run_id)


def test_status_of_a_run_redis_does_not_know_is_read_from_s3(
    s3_server: LoopbackS3, bucket: str, s3_client: Any
) -> None:
    put_many(s3_server, bucket, KEYS)
    settings = Settings(output_buckets=(bucket,))
    summary = plan_run(
        settings,
        BulkOptions(f"s3://{bucket}/photos/", f"s3://{bucket}/runs", shard_size=2),
        s3_server.client(),
    )
    env = {**s3_server.env(), "CAPTION_RESULT_BACKEND": "redis://127.0.0.1:1/0"}
    status = run("bulk", "status", summary.output, "--json", env=env)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["state"] == "incomplete" and shown["remaining"] == 3
    fabricate_outputs(s3_client, bucket, summary, {"d.webp": "error"})
    shown = json.loads(run("bulk", "status", summary.output, "--json", env=env).stdout)
    assert shown["state"] == "done" and shown["from"] == "s3"
    assert (shown["succeeded"], shown["failed"], shown["remaining"]) == (2, 1, 0)
    # A run id alone needs Redis to find the run.
    missing = run("bulk", "status", summary.run_id or "", env=env)
    assert missing.returncode == 1 and "ConnectionError" in missing.stderr


def test_a_refused_run_exits_2_with_the_typed_error_and_writes_nothing(
    s3_server: LoopbackS3, bucket: str, s3_client: Any
) -> None:
    put_many(s3_server, bucket, KEYS)
    env = {**s3_server.env(), "CAPTION_OUTPUT_BUCKETS": "somewhere-else"}
    out = run(
        "bulk", "submit", f"s3://{bucket}/photos/", "--out", f"s3://{bucket}/runs", "--json",
        env=env,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stdout == ""
    assert "BucketNotAllowed" in out.stderr and "CAPTION_OUTPUT_BUCKETS" in out.stderr
    assert [k for k, _ in listing(s3_client, bucket)] == KEYS


def test_operating_a_run_that_does_not_exist_exits_2_with_the_typed_error(
    s3_server: LoopbackS3, redis_url: str
) -> None:
    env = {
        **s3_server.env(),
        "CAPTION_BROKER_URL": f"{redis_url}/0",
        "CAPTION_RESULT_BACKEND": f"{redis_url}/1",
    }
    unknown = "20990101-000000-0a0b0c"
    for command in ("resume", "cancel", "report"):
        out = run("bulk", command, unknown, env=env)
        assert out.returncode == 2, (command, out.stderr)
        assert out.stderr.startswith("error: SourceNotFound: ") and unknown in out.stderr
        assert out.stdout == ""
    bad = run("bulk", "status", "yesterday", env=env)
    assert bad.returncode == 2 and "InvalidBulkOption" in bad.stderr
