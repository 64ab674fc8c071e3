"""``bulk status`` arithmetic and the run argument (worker.bulk.status), without services."""

from __future__ import annotations

import pytest

from worker.bulk.errors import InvalidBulkOption
from worker.bulk.layout import RunLayout
from worker.bulk.status import STATUS_FIELDS, build_manifest, resolve_run, status_from_record

RUN_ID = "20260101-000000-abcdef"
RECORD = {
    "state": "running", "output": f"s3://out/runs/{RUN_ID}/", "total": 110, "to_caption": 100,
    "skipped": 10, "shards": 4, "shards_done": 1, "succeeded": 27, "failed": 3,
    "prompt_tokens": 2_700, "generated_tokens": 270, "started_at": 1_000.0,
}  # fmt: skip


def test_status_counts_rate_and_eta_from_the_record() -> None:
    status = status_from_record(RUN_ID, RECORD, now=1_010.0)
    assert list(status)[: len(STATUS_FIELDS)] == list(STATUS_FIELDS)
    assert (status["remaining"], status["images_per_second"], status["eta_seconds"]) == (
        70, 3.0, 23.3,
    )  # fmt: skip
    assert status["from"] == "redis" and status["seconds"] == 10.0
    # Nothing finished yet: no rate, no ETA; a done run: rate over its whole time, ETA 0.
    fresh = status_from_record(RUN_ID, {**RECORD, "succeeded": 0, "failed": 0}, now=1_005.0)
    assert (fresh["images_per_second"], fresh["eta_seconds"]) == (0.0, None)
    done = {**RECORD, "state": "done", "succeeded": 97, "finished_at": 1_050.0}
    assert status_from_record(RUN_ID, done, now=9_999.0)["images_per_second"] == 2.0
    assert status_from_record(RUN_ID, done)["eta_seconds"] == 0.0


def test_run_is_an_id_or_the_run_directory() -> None:
    assert resolve_run(RUN_ID) == (RUN_ID, None)
    run_id, layout = resolve_run(f"s3://out/runs/{RUN_ID}")
    assert run_id == RUN_ID and layout == RunLayout("out", f"runs/{RUN_ID}/", RUN_ID)
    for bad in ("latest", "s3://out/runs/", "s3://out/runs/not-a-run/"):
        with pytest.raises(InvalidBulkOption):
            resolve_run(bad)


def test_the_manifest_lists_totals_timing_and_files() -> None:
    layout = RunLayout("out", f"runs/{RUN_ID}/", RUN_ID)
    run = {"counts": {"to_caption": 100, "shards": 2, "skipped_shards": 1},
           "config_hash": "h", "model": "m"}  # fmt: skip
    manifest = build_manifest(run, {**RECORD, "finished_at": 1_015.0}, layout)
    assert manifest["outputs"] == ["shards/00000.output.jsonl", "shards/00001.output.jsonl"]
    assert manifest["skipped_files"] == ["skipped/00000.jsonl"]
    assert (manifest["seconds"], manifest["images_per_second"]) == (15.0, 2.0)
    assert manifest["started_at"] == "1970-01-01T00:16:40+00:00"
