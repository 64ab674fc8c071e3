"""Where a bulk run stands (``caption-worker bulk status``), and its end (``manifest.json``).

Status comes from Redis (``worker.bulk.state``) while Redis knows the run; otherwise it is
rebuilt from S3: ``manifest.json`` when the run finished, else run.json and the shard
outputs that exist.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from worker.bulk.errors import InvalidBulkOption, SourceNotFound
from worker.bulk.layout import RUN_ID_RE, RunLayout
from worker.bulk.runfiles import RunFiles, layout_of
from worker.bulk.state import CANCELLED, DONE, RunState, ShardCounts
from worker.settings import Settings
from worker.storage.s3 import SCHEME

#: Fields ``bulk status`` prints, in order.
STATUS_FIELDS = (
    "run_id", "state", "total", "succeeded", "failed", "skipped", "remaining",
    "images_per_second", "eta_seconds", "prompt_tokens", "generated_tokens", "output",
)  # fmt: skip
FORMAT_VERSION = 1


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def _rate(done: int, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0:
        return None
    return round(done / seconds, 3)


def status_from_record(
    run_id: str, record: dict[str, Any], now: float | None = None
) -> dict[str, Any]:
    """A status object from the run's Redis snapshot (``RunState.snapshot``)."""
    now = time.time() if now is None else now
    processed = int(record.get("succeeded", 0)) + int(record.get("failed", 0))
    remaining = max(int(record.get("to_caption", 0)) - processed, 0)
    started = record.get("started_at")
    end = record.get("finished_at") or record.get("cancelled_at") or now
    seconds = end - started if started is not None else None
    rate = _rate(processed, seconds)
    if remaining == 0:
        eta: float | None = 0.0
    elif record.get("state") == CANCELLED:
        eta = None
    elif rate:
        eta = round(remaining / rate, 1)
    else:
        eta = None
    return {
        "run_id": run_id,
        "state": record.get("state", "unknown"),
        "total": int(record.get("total", 0)),
        "succeeded": int(record.get("succeeded", 0)),
        "failed": int(record.get("failed", 0)),
        "skipped": int(record.get("skipped", 0)),
        "remaining": remaining,
        "images_per_second": rate,
        "eta_seconds": eta,
        "prompt_tokens": int(record.get("prompt_tokens", 0)),
        "generated_tokens": int(record.get("generated_tokens", 0)),
        "output": record.get("output"),
        "shards": int(record.get("shards", 0)),
        "shards_done": int(record.get("shards_done", 0)),
        "seconds": round(seconds, 3) if seconds is not None else None,
        "from": "redis",
    }


def status_from_s3(files: RunFiles) -> dict[str, Any]:
    """A status object rebuilt from the run's files (Redis has no record of the run)."""
    run = files.run_json()
    if run is None:
        raise SourceNotFound(f"{files.uri}run.json does not exist: not a planned run")
    counts = run["counts"]
    manifest = files.manifest()
    if manifest is not None:
        status = {name: manifest.get(name) for name in STATUS_FIELDS}
        status.update(
            state=DONE, remaining=0, eta_seconds=0.0, shards=counts["shards"],
            shards_done=counts["shards"], seconds=manifest.get("seconds"), output=files.uri,
        )  # fmt: skip
        return {**status, "from": "s3"}
    done = files.output_counts()
    total = sum(done.values(), ShardCounts())
    succeeded, failed = total.succeeded, total.failed
    shards = int(counts["shards"])
    complete = len([s for s in done if s < shards]) >= shards
    return {
        "run_id": run["run_id"],
        "state": DONE if complete else "incomplete",
        "total": int(counts["total"]),
        "succeeded": succeeded,
        "failed": failed,
        "skipped": int(counts["skipped"]),
        "remaining": max(int(counts["to_caption"]) - succeeded - failed, 0),
        "images_per_second": None,
        "eta_seconds": 0.0 if complete else None,
        "prompt_tokens": total.prompt_tokens,
        "generated_tokens": total.generated_tokens,
        "output": files.uri,
        "shards": shards,
        "shards_done": len(done),
        "seconds": None,
        "from": "s3",
    }


def resolve_run(run: str) -> tuple[str, RunLayout | None]:
    """``RUN`` (a run id or the run's s3:// URI) as its id and, for a URI, its layout."""
    if run.startswith(SCHEME):
        layout = layout_of(run)
        return layout.run_id, layout
    if not RUN_ID_RE.fullmatch(run):
        raise InvalidBulkOption(
            f"{run!r:.120} is neither a run id (YYYYMMDD-HHMMSS-xxxxxx) nor a run's s3:// URI"
        )
    return run, None


def run_status(settings: Settings, run: str, redis_client: Any, s3_client: Any) -> dict[str, Any]:
    """The status of ``run`` (a run id or s3:// URI): from Redis, else from S3."""
    from redis.exceptions import RedisError

    run_id, layout = resolve_run(run)
    try:
        record = RunState(redis_client).snapshot(run_id) if redis_client is not None else None
    except RedisError:
        if layout is None:
            raise
        record = None  # Redis is down: the run's files still answer
    if record is not None:
        return status_from_record(run_id, record)
    if layout is None:
        raise SourceNotFound(
            f"Redis has no record of run {run_id}; give the run's s3:// URI to read it from S3"
        )
    return status_from_s3(RunFiles(s3_client, layout))


def build_manifest(
    run: dict[str, Any], record: dict[str, Any], layout: RunLayout
) -> dict[str, Any]:
    """manifest.json: the run's totals, timing and files."""
    status = status_from_record(layout.run_id, record)
    counts = run["counts"]
    return {
        "format": FORMAT_VERSION,
        "run_id": layout.run_id,
        "output": layout.uri,
        "state": DONE,
        "total": status["total"],
        "to_caption": int(counts["to_caption"]),
        "succeeded": status["succeeded"],
        "failed": status["failed"],
        "skipped": status["skipped"],
        "prompt_tokens": status["prompt_tokens"],
        "generated_tokens": status["generated_tokens"],
        "started_at": _iso(record.get("started_at")),
        "finished_at": _iso(record.get("finished_at")),
        "seconds": status["seconds"],
        "images_per_second": status["images_per_second"],
        "config_hash": run["config_hash"],
        "model": run["model"],
        "outputs": [
            layout.output(shard)[len(layout.root) :] for shard in range(int(counts["shards"]))
        ],
        "skipped_files": [
            layout.skipped(shard)[len(layout.root) :]
            for shard in range(int(counts.get("skipped_shards", 0)))
        ],
    }


def finish_run(files: RunFiles, ledger: Any, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's last shard is counted: write manifest.json and mark the run done."""
    run = run if run is not None else files.run_json()
    if run is None:
        raise SourceNotFound(f"{files.uri}run.json does not exist")
    finished_at = time.time()
    record = ledger.snapshot(files.layout.run_id) or {}
    record["finished_at"] = finished_at
    manifest = build_manifest(run, record, files.layout)
    files.write_manifest(manifest)
    ledger.mark_done(files.layout.run_id, finished_at)
    return manifest
