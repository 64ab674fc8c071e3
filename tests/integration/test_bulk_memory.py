"""Planning streams: a 12,000-key listing is planned holding one page and a few shards,
never the listing. Real moto S3 over HTTP; Python allocations measured with tracemalloc."""

from __future__ import annotations

import time
import tracemalloc
import uuid
from typing import Any

import pytest

from tests.integration.test_bulk_plan import listing, put_many
from worker.bulk.plan import BulkOptions, make_client, plan_run
from worker.bulk.sources import DEFAULT_INCLUDE, KeyFilter, list_prefix
from worker.devtools.loopback import LoopbackS3
from worker.settings import Settings

# Creating 12,000 objects takes moto about 50 s on a 2-core machine.
pytestmark = pytest.mark.timeout(600)

KEYS = 12_000
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
    # the key count. Holding the listing is O(keys): 12,000 items of ~340 bytes each, before
    # any shard text. A quarter of that leaves room for boto3's per-request objects while
    # still failing if anything grows with the listing. (SQLite's page cache is C memory,
    # unseen by tracemalloc; it is bounded by SQLite's cache_size, about 2 MiB.)
    assert peak < held_bytes / 4, (peak, held_bytes)
