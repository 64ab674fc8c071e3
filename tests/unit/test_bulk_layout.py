"""Run names and keys, the on-disk indexes, and refusals that happen before any S3 request."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker.bulk.errors import BucketNotAllowed, InvalidBulkOption
from worker.bulk.identity import Identity
from worker.bulk.layout import RUN_ID_RE, OutputPrefix, new_run_id, parse_prefix
from worker.bulk.plan import BulkOptions, plan_run, redact
from worker.bulk.skips import DoneIndex, Scratch, SeenIds
from worker.settings import Settings


class NoStore:
    """A client that fails the test if planning touches S3."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"S3 was called ({name}) although the run was refused")


def test_run_ids_sort_by_utc_time_and_do_not_collide() -> None:
    at = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    run_id = new_run_id(at)
    assert re.fullmatch(r"20250304-050607-[0-9a-f]{6}", run_id)
    assert RUN_ID_RE.fullmatch(run_id)
    assert len({new_run_id(at) for _ in range(50)}) > 45


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("s3://out-bucket", "out-bucket", ""),
        ("s3://out-bucket/", "out-bucket", ""),
        ("s3://out-bucket/runs", "out-bucket", "runs/"),
        ("s3://out-bucket/runs/", "out-bucket", "runs/"),
        ("s3://out-bucket/a/b/c", "out-bucket", "a/b/c/"),
    ],
)
def test_prefixes_name_folders(uri: str, bucket: str, prefix: str) -> None:
    assert parse_prefix(uri, "--out") == (bucket, prefix)


@pytest.mark.parametrize("uri", ["out/runs", "https://out/runs", "s3://", "s3://B/runs"])
def test_bad_prefixes_are_refused(uri: str) -> None:
    with pytest.raises(InvalidBulkOption, match="--out"):
        OutputPrefix.parse(uri)


def test_a_run_layout_names_every_file() -> None:
    run = OutputPrefix.parse("s3://out-bucket/runs").run("20250304-050607-abcdef")
    assert run.uri == "s3://out-bucket/runs/20250304-050607-abcdef/"
    assert run.run_json == "runs/20250304-050607-abcdef/run.json"
    assert run.input(0) == "runs/20250304-050607-abcdef/inputs/00000.jsonl"
    assert run.input(123) == "runs/20250304-050607-abcdef/inputs/00123.jsonl"
    assert run.skipped(1) == "runs/20250304-050607-abcdef/skipped/00001.jsonl"
    assert run.output(7) == "runs/20250304-050607-abcdef/shards/00007.output.jsonl"
    assert run.checkpoint(7) == "runs/20250304-050607-abcdef/shards/00007.checkpoint.jsonl"
    assert run.manifest == "runs/20250304-050607-abcdef/manifest.json"
    assert run.is_output(run.output(99_999))
    assert not run.is_output(run.checkpoint(7)) and not run.is_output(run.input(7))


def test_keys_inside_run_directories_are_recognised() -> None:
    out = OutputPrefix.parse("s3://photos-bucket/photos/captions")
    assert out.run_id_of("photos/captions/20250304-050607-abcdef/run.json")
    assert out.run_id_of("photos/captions/notes/run.json") is None
    assert out.run_id_of("photos/cat.jpg") is None
    root = OutputPrefix.parse("s3://photos-bucket")
    assert root.run_id_of("20250304-050607-abcdef/inputs/00000.jsonl")
    assert root.run_id_of("2025/cat.jpg") is None


def test_argv_is_recorded_without_user_info() -> None:
    assert redact("https://user:pa55@host/x") == "https://***@host/x"
    assert redact("--endpoint=http://k:s@minio:9000") == "--endpoint=http://***@minio:9000"
    assert redact("s3://bucket/photos/") == "s3://bucket/photos/"


def test_seen_ids_report_the_first_line_of_a_duplicate(tmp_path: Path) -> None:
    with Scratch(tmp_path) as scratch:
        seen = SeenIds(scratch)
        assert seen.add("a", 1) is None
        assert seen.add("b", 2) is None
        assert seen.add("a", 9) == 1
    assert not any(tmp_path.iterdir())  # the scratch file is gone


def test_the_done_index_matches_whole_identities(tmp_path: Path) -> None:
    with Scratch(tmp_path) as scratch:
        done = DoneIndex(scratch)
        done.add(iter([Identity("s3://b/a.jpg", "e1", "c1"), Identity("s3://b/a.jpg", "e1", "c1")]))
        assert Identity("s3://b/a.jpg", "e1", "c1") in done
        assert Identity("s3://b/a.jpg", "e2", "c1") not in done  # new bytes
        assert Identity("s3://b/a.jpg", "e1", "c2") not in done  # new config
        assert Identity("s3://b/b.jpg", "e1", "c1") not in done


SETTINGS = Settings(allowed_buckets=("photos",), output_buckets=("captions",))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (BulkOptions("s3://photos/p/", "s3://elsewhere/runs"), BucketNotAllowed,
         "--out: bucket 'elsewhere' is not in CAPTION_OUTPUT_BUCKETS"),
        (BulkOptions("s3://secret/p/", "s3://captions/runs"), BucketNotAllowed,
         "SOURCE: bucket 'secret' is not in CAPTION_ALLOWED_BUCKETS"),
        (BulkOptions("s3://secret/list.txt", "s3://captions/runs"), BucketNotAllowed,
         "manifest: bucket 'secret' is not in CAPTION_ALLOWED_BUCKETS"),
        (BulkOptions("s3://photos/p/", "s3://captions/r", sidecars="s3://photos/side"),
         BucketNotAllowed, "--sidecars: bucket 'photos' is not in CAPTION_OUTPUT_BUCKETS"),
        (BulkOptions("s3://photos/p/", "s3://captions/r", sidecars="next-to-image"),
         BucketNotAllowed, "bucket 'photos' is not in CAPTION_OUTPUT_BUCKETS"),
        (BulkOptions("s3://photos/p/", "s3://captions/r", sidecars="beside"),
         InvalidBulkOption, "--sidecars must be none, next-to-image or s3://"),
        (BulkOptions("s3://photos/p/", "s3://captions/r", if_exists="replace"),
         InvalidBulkOption, "--if-exists must be one of skip, overwrite"),
        (BulkOptions("s3://photos/p/", "s3://captions/r", shard_size=0),
         InvalidBulkOption, "--shard-size must be at least 1"),
        (BulkOptions("s3://photos/p/", "s3://captions/r", arguments={"max_new_tokens": 0}),
         InvalidBulkOption, "max_new_tokens"),
        (BulkOptions("m.txt", "s3://captions/r", include=("*.jpg",)),
         InvalidBulkOption, "a manifest lists its images itself"),
        (BulkOptions("photos/", "s3://captions/r"), InvalidBulkOption, "SOURCE 'photos/'"),
    ],
)  # fmt: skip
def test_refusals_happen_before_any_request(
    options: BulkOptions, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        plan_run(SETTINGS, options, client=NoStore())
    assert message in str(caught.value)
