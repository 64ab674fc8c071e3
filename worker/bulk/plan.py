"""Plan a bulk run: check it, stream its source into shards, write ``inputs/`` and ``run.json``.

Order matters for safety: every check that can refuse the run (allowlists, options, the
whole manifest) runs before the first write, so a refused run leaves nothing in S3. Then
items stream from the source through the skip index into shard buffers of ``shard_size``
lines, each put to S3 as it fills (a few puts in flight). ``run.json`` is written last: a
run directory without it is an interrupted plan that nothing else reads.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from worker.bulk.errors import BucketNotAllowed, DuplicateItemId, InvalidBulkOption
from worker.bulk.identity import Identity, RunConfig
from worker.bulk.layout import MAX_SHARDS, OutputPrefix, RunLayout, new_run_id, parse_prefix
from worker.bulk.skips import DoneIndex, Scratch, SeenIds
from worker.bulk.sources import (
    DEFAULT_INCLUDE,
    HEAD_WORKERS,
    Item,
    KeyFilter,
    ManifestEntry,
    fetch_manifest,
    head_items,
    is_manifest,
    list_prefix,
    read_manifest,
    s3_error,
)
from worker.errors import InvalidRequest
from worker.settings import Settings
from worker.storage.s3 import SCHEME, S3Location, s3_client

#: The queue bulk shard tasks go to (the bulk lane of docker/k8s consumes it).
DEFAULT_QUEUE = "captions-bulk"
DEFAULT_SHARD_SIZE = 1_000
#: Bumped when run.json or the line formats change incompatibly.
FORMAT_VERSION = 1
SIDECARS_NONE = "none"
SIDECARS_NEXT_TO_IMAGE = "next-to-image"
IF_EXISTS = ("skip", "overwrite")
READ_ALLOWLIST = "CAPTION_ALLOWED_BUCKETS"
WRITE_ALLOWLIST = "CAPTION_OUTPUT_BUCKETS"
#: Shard puts in flight at once; each holds one shard's bytes.
UPLOAD_WORKERS = 4
VERSIONED_PACKAGES = ("sdnq-caption-worker", "transformers", "sdnq", "celery")
# user:password@ in any URL-like argument is dropped before argv is recorded.
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


@dataclass(frozen=True)
class BulkOptions:
    """What ``caption-worker bulk submit`` was asked to do."""

    source: str  # s3://bucket/prefix/, or a .txt / .jsonl manifest (local path or s3://)
    out: str  # s3://bucket/prefix: runs are directories beneath it
    include: tuple[str, ...] | None = None  # None: DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    #: Caption-task arguments for the whole run (prompt, max_new_tokens, do_sample, ...).
    arguments: dict[str, Any] = field(default_factory=dict)
    shard_size: int = DEFAULT_SHARD_SIZE
    sidecars: str = SIDECARS_NONE  # none | next-to-image | s3://bucket/prefix
    if_exists: str = "skip"  # skip | overwrite
    queue: str = DEFAULT_QUEUE
    argv: tuple[str, ...] = ()
    dry_run: bool = False
    page_size: int = 1_000  # keys per list_objects_v2 page (S3's maximum is 1,000)


@dataclass(frozen=True)
class PlanSummary:
    """What a plan found; ``to_json`` is what ``bulk submit --json`` prints."""

    run_id: str | None  # None for a dry run
    total: int
    to_caption: int
    skipped: int
    shards: int
    source: str
    output: str  # the run directory, or the --out prefix for a dry run
    config_hash: str
    max_new_tokens: int  # the run's caption length cap (items may override it)

    @property
    def counts(self) -> dict[str, int]:
        """The plan's counts as the run's Redis record keeps them."""
        return {
            "total": self.total, "to_caption": self.to_caption, "skipped": self.skipped,
            "shards": self.shards,
        }  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "total": self.total,
            "to_caption": self.to_caption,
            "skipped": self.skipped,
            "shards": self.shards,
            "source": self.source,
            "output": self.output,
            "config_hash": self.config_hash,
        }


def make_client(settings: Settings) -> Any:
    """The worker's S3 client, with a connection pool large enough for the HeadObject
    threads and the shard uploads."""
    return s3_client(settings, max_pool_connections=HEAD_WORKERS + UPLOAD_WORKERS + 2)


def check_bucket(bucket: str, allowed: tuple[str, ...], what: str, variable: str) -> None:
    """Refuse ``bucket`` when the allowlist ``variable`` is set and does not name it."""
    if allowed and bucket not in allowed:
        raise BucketNotAllowed(
            f"{what}: bucket {bucket!r} is not in {variable}; the run was refused and "
            "nothing was written"
        )


def plan_run(
    settings: Settings,
    options: BulkOptions,
    client: Any | None = None,
    *,
    on_start: Callable[[RunLayout], None] | None = None,
) -> PlanSummary:
    """Check, list and shard a bulk run; write ``inputs/`` and ``run.json`` unless dry.

    ``on_start`` is called with the run's layout once every check has passed, before the
    listing starts (``bulk submit`` records the run as ``planning`` there).

    Raises a CaptionError subclass (BucketNotAllowed, ManifestError, InvalidBulkOption,
    InvalidRequest, SourceNotFound, StorageUnavailable, ...) and writes nothing when a check
    fails before planning starts.
    """
    _check_options(options)
    out = OutputPrefix.parse(options.out)
    check_bucket(out.bucket, settings.output_buckets, "--out", WRITE_ALLOWLIST)
    sidecars = _sidecars(options.sidecars, settings)
    try:
        config = RunConfig.from_arguments(settings, options.arguments)
    except InvalidRequest as exc:
        raise InvalidBulkOption(str(exc)) from None
    manifest = is_manifest(options.source)
    prefix_source: tuple[str, str] | None = None
    if manifest:
        if options.include is not None or options.exclude:
            raise InvalidBulkOption(
                "--include and --exclude select keys under a prefix; a manifest lists its "
                "images itself"
            )
        if options.source.startswith(SCHEME):
            loc = S3Location.parse(options.source)
            check_bucket(loc.bucket, settings.allowed_buckets, "manifest", READ_ALLOWLIST)
    else:
        prefix_source = parse_prefix(options.source, "SOURCE")
        check_bucket(prefix_source[0], settings.allowed_buckets, "SOURCE", READ_ALLOWLIST)
        if sidecars == SIDECARS_NEXT_TO_IMAGE:
            check_bucket(
                prefix_source[0], settings.output_buckets, "--sidecars next-to-image",
                WRITE_ALLOWLIST,
            )  # fmt: skip

    client = client if client is not None else make_client(settings)
    run_id = None if options.dry_run else new_run_id()
    layout = out.run(run_id) if run_id is not None else None
    if layout is not None and on_start is not None:
        on_start(layout)
    with Scratch() as scratch:
        if prefix_source is not None:
            key_filter = KeyFilter(options.include or DEFAULT_INCLUDE, options.exclude)
            items = list_prefix(
                client, *prefix_source, key_filter, page_size=options.page_size, runs=out
            )
        else:
            items = _manifest_items(client, settings, options, sidecars, scratch)
        done = DoneIndex(scratch)
        if options.if_exists == "skip":
            done.load_earlier_runs(client, out)
        counts = _write_shards(client, layout, options, config, items, done)
        summary = PlanSummary(
            run_id=run_id,
            total=counts["total"],
            to_caption=counts["to_caption"],
            skipped=counts["skipped"],
            shards=counts["shards"],
            source=options.source,
            output=layout.uri if layout is not None else out.uri,
            config_hash=config.config_hash,
            max_new_tokens=config.max_new_tokens,
        )
        if layout is not None:
            record = run_record(options, config, layout, out, sidecars, counts)
            _put(client, layout.bucket, layout.run_json, _json_bytes(record, indent=2))
    return summary


def _check_options(options: BulkOptions) -> None:
    if options.shard_size < 1:
        raise InvalidBulkOption(f"--shard-size must be at least 1, not {options.shard_size}")
    if not 1 <= options.page_size <= 1_000:
        raise InvalidBulkOption(f"page size must be 1..1000, not {options.page_size}")
    if options.if_exists not in IF_EXISTS:
        raise InvalidBulkOption(
            f"--if-exists must be one of {', '.join(IF_EXISTS)}, not {options.if_exists!r}"
        )
    if not options.queue.strip():
        raise InvalidBulkOption("--queue must not be empty")


def _sidecars(value: str, settings: Settings) -> str:
    if value in (SIDECARS_NONE, SIDECARS_NEXT_TO_IMAGE):
        return value
    if not value.startswith(SCHEME):
        raise InvalidBulkOption(
            f"--sidecars must be none, next-to-image or s3://bucket/prefix, not {value!r:.120}"
        )
    sidecars = OutputPrefix.parse(value)
    check_bucket(sidecars.bucket, settings.output_buckets, "--sidecars", WRITE_ALLOWLIST)
    return sidecars.uri


def _manifest_items(
    client: Any, settings: Settings, options: BulkOptions, sidecars: str, scratch: Scratch
) -> Iterator[Item]:
    path = fetch_manifest(client, options.source, scratch.path.parent)
    kind = Path(options.source).suffix.lower()
    seen = SeenIds(scratch)

    def check(entry: ManifestEntry) -> None:
        where = f"manifest line {entry.line}"
        bucket = entry.location.bucket
        check_bucket(bucket, settings.allowed_buckets, where, READ_ALLOWLIST)
        if sidecars == SIDECARS_NEXT_TO_IMAGE:
            check_bucket(bucket, settings.output_buckets, where, WRITE_ALLOWLIST)
        if entry.prompt is not None or entry.max_new_tokens is not None:
            overrides = {"prompt": entry.prompt, "max_new_tokens": entry.max_new_tokens}
            RunConfig.from_arguments(settings, {**options.arguments, **overrides})
        first = seen.add(entry.id, entry.line)
        if first is not None:
            raise DuplicateItemId(
                f"manifest line {entry.line}: id {entry.id!r} was already given on line "
                f"{first}; ids must be unique in a run"
            )

    # First pass: the whole manifest is checked before any request or write, so a bad line
    # anywhere refuses the run with nothing written.
    for _ in read_manifest(path, kind, check):
        pass
    return head_items(client, read_manifest(path, kind))


def _write_shards(
    client: Any,
    layout: RunLayout | None,
    options: BulkOptions,
    config: RunConfig,
    items: Iterator[Item],
    done: DoneIndex,
) -> dict[str, int]:
    uploader = Uploader(client, layout.bucket) if layout is not None else None
    inputs = ShardWriter(uploader, layout.input if layout else None, options.shard_size)
    skipped = ShardWriter(uploader, layout.skipped if layout else None, options.shard_size)
    skip = options.if_exists == "skip"
    total = 0
    try:
        for item in items:
            total += 1
            item_config = config.item_config(item.prompt, item.max_new_tokens)
            # An item with no etag (its object was missing) has no identity to match.
            etag = item.etag
            if skip and etag is not None and Identity(item.image, etag, item_config) in done:
                skipped.add(skipped_line(item, item_config, config.model))
                continue
            inputs.add(item.to_json())
        inputs.close()
        skipped.close()
        if uploader is not None:
            uploader.close()
    except BaseException:
        if uploader is not None:
            uploader.abort()
        raise
    return {
        "total": total,
        "to_caption": inputs.lines,
        "skipped": skipped.lines,
        "shards": inputs.shards,
        "skipped_shards": skipped.shards,
    }


def skipped_line(item: Item, config: str, model: str) -> dict[str, Any]:
    """The output line of an item an earlier run already captioned (the caption itself is
    in that run's shard outputs)."""
    return {
        "id": item.id,
        "image": item.image,
        "etag": item.etag,
        "status": "skipped",
        "text": None,
        "finish_reason": None,
        "prompt_tokens": None,
        "generated_tokens": None,
        "model": model,
        "config": config,
        "error": None,
    }


def run_record(
    options: BulkOptions,
    config: RunConfig,
    layout: RunLayout,
    out: OutputPrefix,
    sidecars: str,
    counts: dict[str, int],
) -> dict[str, Any]:
    """The content of ``run.json``. It holds no credential: URIs, options, argv with any
    ``user:password@`` removed, and package versions."""
    manifest = is_manifest(options.source)
    return {
        "format": FORMAT_VERSION,
        "run_id": layout.run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": options.source,
        "source_kind": "manifest" if manifest else "prefix",
        "include": None if manifest else list(options.include or DEFAULT_INCLUDE),
        "exclude": None if manifest else list(options.exclude),
        "out": out.uri,
        "output": layout.uri,
        **config.to_json(),
        "config_hash": config.config_hash,
        "shard_size": options.shard_size,
        "sidecars": sidecars,
        "if_exists": options.if_exists,
        "queue": options.queue,
        "argv": [redact(arg) for arg in options.argv],
        "versions": package_versions(),
        "counts": counts,
    }


def redact(text: str) -> str:
    """``text`` with the user info of any URL in it replaced by ``***``."""
    return _USERINFO_RE.sub(r"\g<scheme>***@", text)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a caption (read from metadata, so
    nothing heavy is imported)."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _json_bytes(value: Any, indent: int | None = None) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=indent) + "\n").encode()


def _put(client: Any, bucket: str, key: str, body: bytes) -> None:
    content_type = "application/json" if key.endswith(".json") else "application/x-ndjson"
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(f"writing s3://{bucket}/{key}", exc) from exc


class Uploader:
    """Puts objects from a few threads with at most ``2 * workers`` bodies held at once."""

    def __init__(self, client: Any, bucket: str, workers: int = UPLOAD_WORKERS) -> None:
        self._client = client
        self._bucket = bucket
        self._limit = 2 * workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bulk-put")
        self._pending: deque[Future[None]] = deque()

    def put(self, key: str, body: bytes) -> None:
        """Queue a put; blocks while too many are in flight, and raises an earlier put's
        failure."""
        self._pending.append(self._pool.submit(_put, self._client, self._bucket, key, body))
        while len(self._pending) > self._limit:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for every put; raise the first failure."""
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()

    def abort(self) -> None:
        """Drop queued puts (planning failed)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class ShardWriter:
    """Buffers JSON lines and emits them ``shard_size`` at a time as numbered shard files."""

    def __init__(
        self, uploader: Uploader | None, key_for: Callable[[int], str] | None, shard_size: int
    ) -> None:
        self._uploader = uploader
        self._key_for = key_for
        self._size = shard_size
        self._buffer: list[str] = []
        self.shards = 0
        self.lines = 0

    def add(self, line: dict[str, Any]) -> None:
        self._buffer.append(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
        self.lines += 1
        if len(self._buffer) >= self._size:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self.shards >= MAX_SHARDS:
            raise InvalidBulkOption(
                f"more than {MAX_SHARDS:,} shards of {self._size:,} items; raise --shard-size"
            )
        if self._uploader is not None and self._key_for is not None:
            body = ("\n".join(self._buffer) + "\n").encode()
            self._uploader.put(self._key_for(self.shards), body)
        self.shards += 1
        self._buffer.clear()
