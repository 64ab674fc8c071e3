"""``caption-worker bulk submit`` run as a user runs it, against a real S3 server (moto)."""

from __future__ import annotations

import json
from typing import Any

from tests.integration.test_bulk_plan import listing, put_many
from tests.process.test_cli import run
from worker.devtools.loopback import LoopbackS3

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


def test_submit_plans_in_s3_prints_the_run_id_and_says_nothing_runs_it_yet(
    s3_server: LoopbackS3, bucket: str, s3_client: Any
) -> None:
    put_many(s3_server, bucket, KEYS)
    env = {**s3_server.env(), "CAPTION_OUTPUT_BUCKETS": bucket}
    out = run("bulk", "submit", f"s3://{bucket}/photos/", "--out", f"s3://{bucket}/runs", env=env)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    assert "not available yet" in out.stderr
    root = f"runs/{run_id}/"
    assert [k for k, _ in listing(s3_client, bucket, root)] == [
        f"{root}inputs/00000.jsonl", f"{root}run.json",
    ]  # fmt: skip
    run_json = json.loads(s3_client.get_object(Bucket=bucket, Key=root + "run.json")["Body"].read())
    assert run_json["argv"][:3] == ["caption-worker", "bulk", "submit"]
    assert run_json["counts"]["to_caption"] == 3


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
