"""Bulk runs are bounded: planning a 20,000-key listing holds one page and a few shards, never
the listing (Python allocations measured with tracemalloc), and a started run costs Redis
about the same whatever its size. Real moto S3 over HTTP, a private redis-server."""

from __future__ import annotations

import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.test_bulk_plan import listing, put_many
from worker.bulk.control import ShardSender, start_run
from worker.bulk.plan import BulkOptions, make_client, plan_run
from worker.bulk.runfiles import RunFiles, layout_of
from worker.bulk.sources import DEFAULT_INCLUDE, KeyFilter, list_prefix
from worker.bulk.state import RunState
from worker.devtools.loopback import LoopbackS3
from worker.devtools.redis_server import RedisServer
from worker.settings import Settings

# Creating 20,000 objects takes moto about 85 s on a 2-core machine.
pytestmark = pytest.mark.timeout(900)

KEYS = 20_000
PAGE_SIZE = 100
SHARD_SIZE = 500


@pytest.fixture(scope="module")
def big_prefix(s3_server: LoopbackS3) -> str:
    name = f"big-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    put_many(s3_server, name, (f"images/{i // 1000:03d}/photo-{i:06d}.jpg" for i in range(KEYS)))
    return name


def test_planning_a_large_listing_holds_a_page_not_the_listing(
    big_prefix: str, bucket: str, s3_env: dict[str, str], s3_client: Any
) -> None:
    settings = Settings(allowed_buckets=(big_prefix,), output_buckets=(bucket,))
    client = make_client(settings)
    source, out = f"s3://{big_prefix}/images/", f"s3://{bucket}/runs"

    # A dry run first, untraced: it loads botocore's S3 model and paginator once (several
    # MiB, cached for the process), which is no part of what planning holds per key.
    started = time.perf_counter()
    dry = plan_run(settings, BulkOptions(source, out, dry_run=True), client)
    seconds = time.perf_counter() - started
    assert dry.total == KEYS
    print(f"\ndry-run planning: {KEYS / seconds:,.0f} keys/s ({seconds:.2f} s, pages of 1,000)")

    options = BulkOptions(source, out, shard_size=SHARD_SIZE, page_size=PAGE_SIZE)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        summary = plan_run(settings, options, client)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (summary.total, summary.to_caption, summary.shards) == (KEYS, KEYS, KEYS // SHARD_SIZE)
    assert len(listing(s3_client, bucket, f"runs/{summary.run_id}/inputs/")) == KEYS // SHARD_SIZE

    # What holding the listing would take: the same items, materialised.
    tracemalloc.start()
    try:
        held = list(list_prefix(client, big_prefix, "images/", KeyFilter(DEFAULT_INCLUDE)))
        held_bytes, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(held) == KEYS
    del held
    print(
        f"planned and wrote {KEYS:,} keys in {seconds:.2f} s under tracemalloc "
        f"({KEYS / seconds:,.0f} keys/s); peak {peak / 2**20:.2f} MiB; holding the items "
        f"alone: {held_bytes / 2**20:.2f} MiB"
    )
    # Planning holds one parsed page (PAGE_SIZE keys), one shard buffer per writer and at
    # most 2 x UPLOAD_WORKERS shard bodies in flight: O(page + shards in flight), whatever
    # the key count. Holding the listing is O(keys): 20,000 items of ~340 bytes each, before
    # any shard text. A quarter of that leaves room for boto3's per-request objects while
    # still failing if anything grows with the listing. (SQLite's page cache is C memory,
    # unseen by tracemalloc; it is bounded by SQLite's cache_size, about 2 MiB.)
    assert peak < held_bytes / 4, (peak, held_bytes)


def test_redis_holds_about_the_same_for_a_run_ten_times_larger(
    big_prefix: str, bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        settings = Settings(
            allowed_buckets=(big_prefix,), output_buckets=(bucket,),
            broker_url=f"{server.url}/0", result_backend=f"{server.url}/1",
        )  # fmt: skip
        admin = redis.Redis.from_url(f"{server.url}/0")
        client = make_client(settings)
        used, keys = {}, {}
        for items, include in ((2_000, ("000/*", "001/*")), (KEYS, None)):
            admin.flushall()
            options = BulkOptions(
                f"s3://{big_prefix}/images/", f"s3://{bucket}/sized", include=include,
                shard_size=100, if_exists="overwrite",
            )  # fmt: skip
            plan = plan_run(settings, options, client)
            assert plan.to_caption == items
            files = RunFiles(client, layout_of(plan.output))
            ledger_client = redis.Redis.from_url(settings.result_backend)
            with ShardSender.for_broker(settings.broker_url) as sender:
                sent = start_run(
                    RunState(ledger_client), files, sender, counts=plan.counts,
                    max_new_tokens=plan.max_new_tokens, queue="bulk-sized", window=16,
                )  # fmt: skip
            ledger_client.close()
            assert sent == 16 and admin.llen("bulk-sized") == 16
            used[items] = int(admin.info("memory")["used_memory"])
            keys[items] = key_bytes(server.url)
        print(
            f"\nRedis for a started run of 2,000 items (20 shards) / {KEYS:,} items (200 "
            f"shards): used_memory {used[2_000]:,} / {used[KEYS]:,} bytes; the run's keys "
            f"{keys[2_000]:,} / {keys[KEYS]:,} bytes"
        )
        # Per run, Redis holds a hash, a done bitmap (one bit a shard) and the window's 16
        # shard messages: nothing per item.
        assert used[KEYS] <= 2 * used[2_000], used
        assert keys[KEYS] <= 2 * keys[2_000], keys
        admin.close()
    finally:
        server.stop()


def key_bytes(url: str) -> int:
    """MEMORY USAGE summed over every key of databases 0 (broker) and 1 (results)."""
    total = 0
    for db in (0, 1):
        client = redis.Redis.from_url(f"{url}/{db}")
        total += sum(int(client.memory_usage(key) or 0) for key in client.scan_iter())
        client.close()
    return total
