"""``bulk report`` (worker.bulk.report) over a run's files on a real S3 HTTP server (moto):
counts, error groups and examples, finish reasons, missing items, duplicate ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.bulk.errors import SourceNotFound
from worker.bulk.layout import RunLayout
from worker.bulk.report import build_report, format_report
from worker.bulk.runfiles import RunFiles, dumps_lines

pytestmark = pytest.mark.timeout(60)

RUN_ID = "20260101-000000-abc123"
CONFIG = "23ca84476c38f980"


def ok(item: str, reason: str = "stop") -> dict[str, Any]:
    return {
        "id": item, "image": f"s3://photos/{item}", "etag": "e", "status": "ok",
        "text": f"A picture of {item}.", "finish_reason": reason, "prompt_tokens": 100,
        "generated_tokens": 7, "model": "m", "config": CONFIG, "error": None,
    }  # fmt: skip


def error(item: str, error_type: str) -> dict[str, Any]:
    return {
        "id": item, "image": f"s3://photos/{item}", "etag": "e", "status": "error",
        "text": None, "finish_reason": None, "prompt_tokens": None, "generated_tokens": None,
        "model": "m", "config": CONFIG,
        "error": {"type": error_type, "message": f"{item}: {error_type.lower()} here"},
    }  # fmt: skip


def skipped(item: str) -> dict[str, Any]:
    return {**ok(item), "status": "skipped", "text": None, "prompt_tokens": None}


def plan(files: RunFiles, *, shards: int, to_caption: int, skipped_shards: int = 1) -> None:
    counts = {
        "total": to_caption + 2, "to_caption": to_caption, "skipped": 2, "shards": shards,
        "skipped_shards": skipped_shards,
    }  # fmt: skip
    run = {"format": 1, "run_id": RUN_ID, "output": files.uri, "counts": counts}
    layout = files.layout
    files.client.put_object(Bucket=layout.bucket, Key=layout.run_json, Body=json.dumps(run))
    if skipped_shards:
        body = dumps_lines([skipped("old/1.jpg"), skipped("old/2.jpg")])
        files.client.put_object(Bucket=layout.bucket, Key=layout.skipped(0), Body=body)


@pytest.fixture()
def files(s3_client: Any, bucket: str) -> RunFiles:
    return RunFiles(s3_client, RunLayout(bucket, f"runs/{RUN_ID}/", RUN_ID))


def write_finished_run(files: RunFiles) -> None:
    """Three shards of four items: 8 ok (one cut at the token limit), 3 InvalidImage, 1
    ImageNotFound."""
    plan(files, shards=3, to_caption=12)
    files.write_output(0, [ok("a/0.jpg"), error("a/1.jpg", "InvalidImage"), ok("a/2.jpg"),
                           ok("a/3.jpg", "length")])  # fmt: skip
    files.write_output(1, [error("b/0.png", "InvalidImage"), error("b/1.png", "ImageNotFound"),
                           ok("b/2.png"), ok("b/3.png")])  # fmt: skip
    files.write_output(2, [ok("c/0.gif"), error("c/1.gif", "InvalidImage"), ok("c/2.gif"),
                           ok("c/3.gif")])  # fmt: skip


def test_a_finished_run_counts_groups_and_reasons(files: RunFiles) -> None:
    write_finished_run(files)
    report = build_report(files)
    assert {name: report[name] for name in ("state", "total", "lines", "ok", "error")} == {
        "state": "done", "total": 14, "lines": 12, "ok": 8, "error": 4,
    }  # fmt: skip
    assert (report["skipped"], report["missing"], report["duplicates"]) == (2, 0, 0)
    assert (report["prompt_tokens"], report["generated_tokens"]) == (800, 56)
    assert report["finish_reasons"] == {"stop": 7, "length": 1}
    assert (report["run_id"], report["output"]) == (RUN_ID, files.uri)
    assert report["shards_done"] == report["shards"] == 3 and report["unreadable"] == []
    # The most frequent error first; examples in the order the run wrote them.
    assert [(group["type"], group["count"]) for group in report["errors"]] == [
        ("InvalidImage", 3), ("ImageNotFound", 1),
    ]  # fmt: skip
    assert report["errors"][1]["examples"] == [
        {"id": "b/1.png", "image": "s3://photos/b/1.png", "message": "b/1.png: imagenotfound here"}
    ]
    assert json.loads(json.dumps(report)) == report  # what --json prints


def test_examples_are_limited_per_error_type(files: RunFiles) -> None:
    write_finished_run(files)
    groups = build_report(files, examples=2)["errors"]
    assert [example["id"] for example in groups[0]["examples"]] == ["a/1.jpg", "b/0.png"]
    assert groups[0]["count"] == 3
    assert all(group["examples"] == [] for group in build_report(files, examples=0)["errors"])


def test_a_run_with_a_shard_still_running_is_incomplete(files: RunFiles) -> None:
    plan(files, shards=3, to_caption=10, skipped_shards=0)
    files.write_output(0, [ok("a/0.jpg"), ok("a/1.jpg"), ok("a/2.jpg"), ok("a/3.jpg")])
    files.write_output(2, [ok("c/0.gif"), error("c/1.gif", "InvalidImage")])
    # A checkpoint is not an output: its lines are not counted.
    files.write_checkpoint(1, [ok("b/0.png")])
    report = build_report(files)
    assert (report["state"], report["lines"], report["missing"]) == ("incomplete", 6, 4)
    assert (report["skipped"], report["shards_done"]) == (0, 2)


def test_ids_written_twice_are_counted_once_each(files: RunFiles) -> None:
    plan(files, shards=2, to_caption=3)
    files.write_output(0, [ok("a.jpg"), ok("b.jpg"), ok("a.jpg")])
    # A retried shard that wrote another's items, and a skipped item captioned again.
    files.write_output(1, [ok("a.jpg"), error("b.jpg", "InvalidImage"), ok("old/1.jpg")])
    report = build_report(files)
    assert report["duplicates"] == 3  # a.jpg (three times), b.jpg, old/1.jpg
    assert report["missing"] == 0  # never negative, though more lines than items
    assert "3 ids appear more than once" in format_report(report)


def test_a_damaged_output_is_reported_not_fatal(files: RunFiles) -> None:
    plan(files, shards=2, to_caption=2, skipped_shards=0)
    files.write_output(0, [ok("a.jpg")])
    key = files.layout.output(1)
    files.client.put_object(Bucket=files.layout.bucket, Key=key, Body=b'{"id": "b.jpg", "sta')
    report = build_report(files)
    assert report["unreadable"] == ["shards/00001.output.jsonl"]
    assert (report["state"], report["lines"], report["missing"]) == ("incomplete", 1, 1)


def test_format_report_names_every_error_type(files: RunFiles) -> None:
    write_finished_run(files)
    text = format_report(build_report(files))
    first = text.splitlines()[0]
    assert first.startswith(f"{RUN_ID} done: 14 items, 8 ok, 4 error, 2 skipped, 0 missing")
    assert "  InvalidImage: 3  e.g. s3://photos/a/1.jpg: a/1.jpg: invalidimage here" in text
    assert "  ImageNotFound: 1  e.g. s3://photos/b/1.png" in text
    assert "finish reasons: stop 7, length 1" in text and "warning" not in text


def test_a_run_without_run_json_or_with_a_missing_skipped_file(files: RunFiles) -> None:
    with pytest.raises(SourceNotFound, match=r"run\.json"):
        build_report(files)
    plan(files, shards=1, to_caption=1, skipped_shards=2)  # skipped/00001.jsonl is absent
    with pytest.raises(SourceNotFound, match=r"skipped/00001\.jsonl"):
        build_report(files)
