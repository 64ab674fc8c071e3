"""One bulk shard's execution (worker.bulk.shard) with a fake engine, store, S3 and ledger.

The real service pieces run (validation, decode, the Batcher in the bulk lane); what is fake
is the model (``caption <prompt length>``), the image store and the run's S3 directory.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.batching import running
from tests.support.fake_engine import FakeEngine
from tests.support.images import png_bytes
from worker.bulk.identity import RunConfig
from worker.bulk.layout import RunLayout
from worker.bulk.runfiles import RunFiles, dumps_lines
from worker.bulk.shard import RunPlan, ShardReport, error_line, execute_shard, resume_from
from worker.bulk.sidecars import SidecarTarget
from worker.bulk.state import ShardFinish
from worker.errors import ImageNotFound, StorageUnavailable
from worker.runtime.service import CaptionService
from worker.settings import Settings
from worker.storage.s3 import S3Location

RUN_ID = "20260101-000000-abcdef"
BUCKET = "out"
SRC = "s3://photos"
CORRUPT = b"not an image"


def settings(**more: Any) -> Settings:
    return Settings(
        model="fake-model", storage_retries=2, storage_retry_backoff_s=0.0, max_batch=4, **more
    )


class MemoryS3:
    """The few boto3 calls RunFiles makes, over a dict of keys (one bucket)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts: list[str] = []

    @staticmethod
    def _missing(op: str) -> ClientError:
        return ClientError(
            {"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}},  # type: ignore[typeddict-item]
            op,
        )

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key not in self.objects:
            raise self._missing("GetObject")
        return {"Body": io.BytesIO(self.objects[Key])}

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key not in self.objects:
            raise self._missing("HeadObject")
        return {}

    def put_object(self, Bucket: str, Key: str, Body: bytes, **_: Any) -> None:
        self.objects[Key] = Body
        self.puts.append(Key)

    def delete_object(self, Bucket: str, Key: str) -> None:
        self.objects.pop(Key, None)

    def lines(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.objects[key].decode().splitlines()]


class FakeStore:
    """The image store: bytes per key, or a list of errors to raise first."""

    def __init__(self, images: dict[str, bytes], failures: dict[str, int] | None = None) -> None:
        self.images = images
        self.failures = dict(failures or {})
        self.fetched: list[str] = []
        self._lock = threading.Lock()

    def fetch(self, loc: S3Location) -> bytes:
        with self._lock:
            self.fetched.append(loc.key)
            if self.failures.get(loc.key, 0) > 0:
                self.failures[loc.key] -= 1
                raise StorageUnavailable(f"{loc}: the store answered SlowDown")
        if loc.key not in self.images:
            raise ImageNotFound(f"{loc} does not exist (NoSuchKey)")
        return self.images[loc.key]


class FakeLedger:
    """RunState's contract in memory."""

    def __init__(self, shards: int, sent: int) -> None:
        self.shards = shards
        self.next_shard = sent
        self.done: set[int] = set()
        self.counts: dict[str, int] = {}
        self.progress: dict[int, dict[str, int]] = {}
        self.run_state = "running"
        self.leases: dict[int, str] = {}
        self.lease_log: list[tuple[str, int, str]] = []
        self.retry: set[int] = set()
        self.finished_runs = 0

    def is_done(self, run_id: str, shard: int) -> bool:
        return shard in self.done

    def state(self, run_id: str) -> str | None:
        return self.run_state

    def retrying(self, run_id: str, shard: int) -> bool:
        return shard in self.retry

    def acquire(self, run_id: str, shard: int, holder: str, ttl_s: float) -> str | None:
        self.lease_log.append(("acquire", shard, holder))
        if shard in self.leases:
            return self.leases[shard]
        self.leases[shard] = holder
        return None

    def renew(self, run_id: str, shard: int, holder: str, ttl_s: float) -> bool:
        return self.leases.get(shard) == holder

    def release(self, run_id: str, shard: int, holder: str) -> None:
        if self.leases.get(shard) == holder:
            del self.leases[shard]
            self.lease_log.append(("release", shard, holder))

    def checkpoint(self, run_id: str, shard: int, counts: dict[str, int]) -> None:
        self.progress[shard] = counts

    def finish_shard(self, run_id: str, shard: int, counts: dict[str, int]) -> ShardFinish:
        if shard in self.done:
            return ShardFinish(False, None, False)
        self.done.add(shard)
        self.progress.pop(shard, None)
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        nxt = None
        if self.next_shard < self.shards:
            nxt, self.next_shard = self.next_shard, self.next_shard + 1
        return ShardFinish(True, nxt, len(self.done) == self.shards)

    def mark_done(self, run_id: str, finished_at: float) -> None:
        self.run_state = "done"
        self.finished_runs += 1

    def snapshot(self, run_id: str) -> dict[str, Any] | None:
        return {
            "state": self.run_state, "shards_done": len(self.done), "total": 0,
            "to_caption": 0, "skipped": 0, "started_at": 0.0, "shards": self.shards,
            **self.counts,
        }  # fmt: skip


class Run:
    """A planned run in memory: run.json, inputs, the fakes, and a service to run it."""

    def __init__(self, keys: list[list[str]], store: FakeStore, **items_extra: Any) -> None:
        self.settings = settings()
        config = RunConfig.from_arguments(self.settings, {"max_new_tokens": 4})
        self.config = config
        self.s3 = MemoryS3()
        self.layout = RunLayout(BUCKET, f"runs/{RUN_ID}/", RUN_ID)
        total = sum(len(k) for k in keys)
        run = {
            "run_id": RUN_ID, **config.to_json(), "config_hash": config.config_hash,
            "queue": "bulk-q",
            "counts": {"total": total, "to_caption": total, "skipped": 0, "shards": len(keys),
                       "skipped_shards": 0},
        }  # fmt: skip
        self.s3.objects[self.layout.run_json] = json.dumps(run).encode()
        for shard, shard_keys in enumerate(keys):
            lines = [
                {"id": k, "image": f"{SRC}/{k}", "etag": f"e-{k}", "size": 1,
                 **items_extra.get(k, {})}
                for k in shard_keys
            ]  # fmt: skip
            self.s3.objects[self.layout.input(shard)] = dumps_lines(lines)
        self.files = RunFiles(self.s3, self.layout)
        self.store = store
        self.ledger = FakeLedger(len(keys), sent=1)
        self.sent: list[tuple[int, str]] = []

    def execute(self, shard: int = 0, **kwargs: Any) -> ShardReport:
        engine = FakeEngine()
        with running(engine, max_batch=4, wait_s=0.01) as batcher:
            service = CaptionService(self.settings, engine, self.store, batcher, "test")  # type: ignore[arg-type]
            return execute_shard(
                service,
                self.files,
                self.ledger,
                shard,
                enqueue=lambda n, q: self.sent.append((n, q)),
                workers=3,
                **kwargs,
            )

    def output(self, shard: int = 0) -> list[dict[str, Any]]:
        return self.s3.lines(self.layout.output(shard))


@pytest.fixture()
def images() -> Iterator[dict[str, bytes]]:
    yield {f"{i:03d}.png": png_bytes() for i in range(12)}


def test_every_item_gets_one_line_in_input_order_and_bad_images_are_error_lines(
    images: dict[str, bytes],
) -> None:
    images["003.png"] = CORRUPT
    images["007.png"] = b""
    keys = [*sorted(images), "missing.png"]
    run = Run([keys, ["x.png"]], FakeStore(images))
    report = run.execute()
    lines = run.output()
    assert [line["id"] for line in lines] == keys
    assert report.status == "done" and report.items == 13 and report.captioned == 13
    by_id = {line["id"]: line for line in lines}
    ok = by_id["000.png"]
    assert ok == {
        "id": "000.png", "image": f"{SRC}/000.png", "etag": "e-000.png", "status": "ok",
        "text": ok["text"], "finish_reason": "length", "prompt_tokens": 40,
        "generated_tokens": 4, "model": "fake-model", "config": run.config.config_hash,
        "error": None,
    }  # fmt: skip
    assert ok["text"].startswith("caption ")
    for key, kind in (("003.png", "InvalidImage"), ("007.png", "InvalidImage"),
                      ("missing.png", "ImageNotFound")):  # fmt: skip
        line = by_id[key]
        assert line["status"] == "error" and line["text"] is None
        assert line["error"]["type"] == kind and line["error"]["message"]
        assert line["config"] == run.config.config_hash
    assert run.ledger.counts == {
        "succeeded": 10, "failed": 3, "prompt_tokens": 400, "generated_tokens": 40,
    }  # fmt: skip
    # The window: shard 1 was not sent yet, so finishing shard 0 sends it, on the run's queue.
    assert run.sent == [(1, "bulk-q")]
    assert not report.run_finished and run.layout.manifest not in run.s3.objects


def test_the_last_shard_writes_the_manifest_and_marks_the_run_done(
    images: dict[str, bytes],
) -> None:
    run = Run([["000.png"], ["001.png", "002.png"]], FakeStore(images))
    run.ledger.done.add(0)
    run.ledger.next_shard = 2
    report = run.execute(1)
    assert report.run_finished and run.sent == []
    manifest = json.loads(run.s3.objects[run.layout.manifest])
    assert manifest["outputs"] == ["shards/00000.output.jsonl", "shards/00001.output.jsonl"]
    assert manifest["succeeded"] == 2 and manifest["state"] == "done"
    assert run.ledger.run_state == "done"


def test_a_failing_store_is_retried_then_recorded_as_the_items_error(
    images: dict[str, bytes],
) -> None:
    store = FakeStore(images, failures={"001.png": 2, "002.png": 10})
    run = Run([["000.png", "001.png", "002.png"]], store)
    lines = {line["id"]: line for line in (run.execute(), run.output())[1]}
    assert lines["001.png"]["status"] == "ok"
    assert lines["002.png"]["error"]["type"] == "StorageUnavailable"
    assert store.fetched.count("001.png") == 3  # two failures, then the bytes
    assert store.fetched.count("002.png") == 3  # the first try and two retries


def test_checkpoints_are_written_and_a_restarted_shard_resumes_after_its_checkpoint(
    images: dict[str, bytes],
) -> None:
    keys = sorted(images)[:10]
    run = Run([keys], FakeStore(images))
    seen: list[int] = []
    original = run.files.write_checkpoint

    def recording(shard: int, lines: list[dict[str, Any]]) -> None:
        seen.append(len(lines))
        original(shard, lines)

    run.files.write_checkpoint = recording  # type: ignore[method-assign]
    run.execute(checkpoint_every=3)
    assert seen == [3, 6, 9]
    assert run.layout.checkpoint(0) not in run.s3.objects  # removed once the output exists
    full = run.output()

    # A worker died after its checkpoint of 4 items: the next one takes those lines as they
    # are and fetches only the rest.
    again = Run([keys], FakeStore(images))
    done = [dict(line, text=f"from checkpoint {i}") for i, line in enumerate(full[:4])]
    again.s3.objects[again.layout.checkpoint(0)] = dumps_lines(done)
    report = again.execute()
    assert report.captioned == 6
    assert sorted(again.store.fetched) == keys[4:]
    assert again.output()[:4] == done and again.output()[4:] == full[4:]


def test_a_stopping_worker_pauses_the_shard_at_a_checkpoint(images: dict[str, bytes]) -> None:
    keys = sorted(images)[:8]
    run = Run([keys, ["x.png"]], FakeStore(images))
    calls = iter(range(100))
    report = run.execute(should_stop=lambda: next(calls) >= 5)
    assert report.status == "paused" and report.items == 5
    assert run.layout.output(0) not in run.s3.objects
    assert [line["id"] for line in run.s3.lines(run.layout.checkpoint(0))] == keys[:5]
    assert run.ledger.progress[0]["succeeded"] == 5 and not run.ledger.done
    assert run.sent == []
    assert run.execute().captioned == 3  # the continuation finishes the rest
    assert [line["id"] for line in run.output()] == keys


def test_a_finished_shard_does_nothing_and_a_written_output_is_only_counted(
    images: dict[str, bytes],
) -> None:
    run = Run([["000.png", "001.png"], ["x.png"]], FakeStore(images))
    run.execute()
    puts = list(run.s3.puts)
    assert run.execute().status == "already-done"
    assert run.s3.puts == puts and run.sent == [(1, "bulk-q")]

    # The output was written but the worker died before counting it: count, don't caption.
    again = Run([["000.png", "001.png"], ["x.png"]], FakeStore(images))
    again.s3.objects[again.layout.output(0)] = run.s3.objects[run.layout.output(0)]
    report = again.execute()
    assert report.status == "done" and report.captioned == 0 and again.store.fetched == []
    assert again.ledger.counts["succeeded"] == 2


def test_item_overrides_get_their_own_config_and_a_model_mismatch_fails_the_items(
    images: dict[str, bytes],
) -> None:
    run = Run([["000.png", "001.png"]], FakeStore(images), **{"001.png": {"prompt": "Short."}})
    run.execute()
    first, second = run.output()
    assert first["config"] == run.config.config_hash
    assert second["config"] == run.config.item_config("Short.", None) != first["config"]
    assert second["text"] == f"caption {len('Short.')}"

    other = Run([["000.png"]], FakeStore(images))
    run_json = json.loads(other.s3.objects[other.layout.run_json])
    other.s3.objects[other.layout.run_json] = json.dumps({**run_json, "model": "x/y"}).encode()
    [line] = (other.execute(), other.output())[1]
    assert line["error"]["type"] == "ModelMismatch" and other.store.fetched == []


def test_resume_takes_a_checkpoint_only_when_it_is_a_prefix_of_the_items() -> None:
    items = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    assert resume_from([{"id": "a"}, {"id": "b"}], items) == [{"id": "a"}, {"id": "b"}]
    assert resume_from([{"id": "b"}], items) == []
    assert resume_from(None, items) == []
    assert resume_from([{"id": x} for x in "abcd"], items) == []


def test_an_unexpected_failure_is_reported_as_caption_failed() -> None:
    plan = RunPlan(RunConfig.from_arguments(settings(), {}), "h", "q", 1)
    line = error_line({"id": "a", "image": "s3://b/a"}, plan, ValueError("boom"))
    assert line["error"] == {"type": "CaptionFailed", "message": "ValueError: boom"}


def with_run_json(run: Run, **changes: Any) -> None:
    run_json = json.loads(run.s3.objects[run.layout.run_json])
    run.s3.objects[run.layout.run_json] = json.dumps({**run_json, **changes}).encode()


def test_a_shard_runs_under_its_lease_and_one_leased_elsewhere_is_left_alone(
    images: dict[str, bytes],
) -> None:
    run = Run([["000.png", "001.png"]], FakeStore(images))
    run.ledger.leases[0] = "other-host/7"
    report = run.execute()
    assert (report.status, report.holder) == ("busy", "other-host/7")
    assert run.store.fetched == [] and run.layout.output(0) not in run.s3.objects

    del run.ledger.leases[0]
    assert run.execute().status == "done"
    # Each execution took the lease under its own id (the worker's name and a suffix), and
    # the one that ran gave it back once the shard was done.
    (_, _, first), (_, _, second), released = run.ledger.lease_log
    assert first.startswith("test/") and second.startswith("test/") and first != second
    assert released == ("release", 0, second)
    assert run.ledger.leases == {}


def test_a_cancelled_run_drops_queued_shards_and_stops_running_ones_at_a_checkpoint(
    images: dict[str, bytes],
) -> None:
    keys = sorted(images)[:8]
    run = Run([keys, ["x.png"]], FakeStore(images))
    run.ledger.run_state = "cancelled"
    assert run.execute().status == "cancelled" and run.store.fetched == []

    run.ledger.run_state = "running"
    calls = iter(range(100))

    def cancel_midway() -> bool:  # cancelled while the shard runs
        if next(calls) == 3:
            run.ledger.run_state = "cancelled"
        return False

    import worker.bulk.shard as shard_module

    original = shard_module.STATE_POLL_S
    shard_module.STATE_POLL_S = 0.0  # look at the run's state before every item
    try:
        report = run.execute(should_stop=cancel_midway)
    finally:
        shard_module.STATE_POLL_S = original
    assert report.status == "cancelled" and 3 <= report.items < len(keys)
    saved = run.s3.lines(run.layout.checkpoint(0))
    assert [line["id"] for line in saved] == keys[: report.items]
    assert run.layout.output(0) not in run.s3.objects and run.sent == []


def test_retry_failed_captions_only_the_failed_items_again_into_the_same_output(
    images: dict[str, bytes],
) -> None:
    keys = sorted(images)[:5]
    store = FakeStore(images, failures={"001.png": 10})
    run = Run([keys], store)
    run.execute()
    first = run.output()
    assert first[1]["error"]["type"] == "StorageUnavailable"
    run.ledger.done.clear()  # what `bulk resume --retry-failed` does: reopen the shard
    run.ledger.retry.add(0)
    store.fetched.clear()
    store.failures.clear()  # the store is back
    report = run.execute()
    assert report.status == "done" and report.captioned == 1
    assert store.fetched == ["001.png"]
    again = run.output()
    assert [line["id"] for line in again] == keys
    assert again[1]["status"] == "ok" and again[0] == first[0] and again[2:] == first[2:]


class FlakyS3(MemoryS3):
    """Refuses puts of the keys in ``refuse`` with SlowDown."""

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse

    def put_object(self, Bucket: str, Key: str, Body: bytes, **more: Any) -> None:
        if Key in self.refuse:
            raise ClientError(
                {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}},  # type: ignore[typeddict-item]
                "PutObject",
            )
        super().put_object(Bucket, Key, Body, **more)


@pytest.mark.parametrize(
    ("sidecars", "key"), [("next-to-image", "001.txt"), ("s3://out/side/", "side/001.txt")]
)
def test_sidecars_hold_each_caption_and_one_that_cannot_be_written_fails_its_item(
    images: dict[str, bytes], sidecars: str, key: str
) -> None:
    keys = sorted(images)[:4]
    run = Run([keys], FakeStore(images))
    refused = key.replace("001", "000")  # in the first checkpoint's lines
    flaky = FlakyS3({refused})
    flaky.objects = run.s3.objects
    run.s3 = flaky
    run.files = RunFiles(flaky, run.layout)
    with_run_json(run, sidecars=sidecars, source_kind="manifest")
    run.execute(checkpoint_every=2)
    lines = {line["id"]: line for line in run.output()}
    assert flaky.objects[key].decode() == lines["001.png"]["text"]
    assert refused not in flaky.objects
    assert lines["000.png"]["status"] == "error"
    assert lines["000.png"]["error"]["type"] == "StorageUnavailable"
    assert lines["000.png"]["text"]  # the caption is kept; a retry writes its sidecar
    assert run.ledger.counts["failed"] == 1 and run.ledger.counts["succeeded"] == 3
    written = [k for k in flaky.objects if k.endswith(".txt")]
    assert len(written) == 3


def test_a_sidecar_prefix_mirrors_keys_relative_to_the_source_prefix() -> None:
    target = SidecarTarget("s3://out/captions/", "photos/")
    assert target.location("s3://src/photos/a/b.jpg") == S3Location("out", "captions/a/b.txt")
    beside = SidecarTarget("next-to-image", None)
    assert beside.location("s3://src/photos/cat.jpeg") == S3Location("src", "photos/cat.txt")
    assert beside.location("s3://src/README") == S3Location("src", "README.txt")


def test_a_redelivered_last_shard_writes_the_manifest_its_first_execution_could_not(
    images: dict[str, bytes],
) -> None:
    run = Run([["000.png"]], FakeStore(images))
    run.ledger.done.add(0)  # counted, but the manifest PUT failed and the task was retried
    assert run.execute().status == "already-done"
    assert run.layout.manifest in run.s3.objects and run.ledger.run_state == "done"
    run.execute()
    assert run.ledger.finished_runs == 1  # a done run is not finished again


def test_an_execution_whose_lease_was_taken_stops_and_saves_nothing(
    images: dict[str, bytes],
) -> None:
    keys = sorted(images)
    run = Run([keys], FakeStore(images))
    # Renewals every 50 ms, and each finds another execution holding the lease (this one
    # stalled past its TTL and the shard went elsewhere).
    run.settings = settings(heartbeat_interval_s=0.05, worker_dead_after_s=0.2)
    run.ledger.renew = lambda *args: False  # type: ignore[method-assign]

    def slowly() -> bool:
        time.sleep(0.03)
        return False

    report = run.execute(should_stop=slowly, checkpoint_every=2)
    assert report.status == "lost" and report.items < len(keys)
    assert run.layout.output(0) not in run.s3.objects
    assert not run.ledger.done and run.sent == []


def test_a_sidecar_outside_the_output_allowlist_fails_its_item_and_writes_nothing(
    images: dict[str, bytes],
) -> None:
    run = Run([["000.png"]], FakeStore(images))
    run.settings = settings(output_buckets=("out",))  # the images' bucket is not in it
    with_run_json(run, sidecars="next-to-image", source_kind="manifest")
    run.execute()
    [line] = run.output()
    assert line["status"] == "error" and line["error"]["type"] == "BucketNotAllowed"
    assert "CAPTION_OUTPUT_BUCKETS" in line["error"]["message"] and line["text"]
    assert not [key for key in run.s3.objects if key.endswith(".txt")]
