"""On-disk indexes for planning with bounded memory: what earlier runs captioned, ids seen.

Both live in one temporary SQLite file (stdlib ``sqlite3``), so 10 million entries cost disk,
not memory: SQLite keeps only its page cache (a few MiB) in RAM. The file is scratch: no
journal, no fsync, deleted when planning ends.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from botocore.exceptions import BotoCoreError, ClientError

from worker.bulk.identity import Identity
from worker.bulk.layout import RUN_ID_RE, OutputPrefix
from worker.bulk.sources import s3_error

#: Rows inserted per transaction while loading earlier outputs.
BATCH_ROWS = 10_000
#: Error types an item keeps whatever runs again: the bytes behind an etag do not decode, and
#: the same etag means the same bytes. Every other error (a missing object, a store or model
#: failure, limits that settings may change) is planned again.
SETTLED_ERRORS = frozenset({"InvalidImage"})


def settled(line: dict[str, Any]) -> bool:
    """Whether an earlier output line means its identity needs no caption again: ``ok``, or
    an error that would only repeat."""
    status = line.get("status")
    if status == "ok":
        return True
    error = line.get("error")
    return status == "error" and isinstance(error, dict) and error.get("type") in SETTLED_ERRORS


class Scratch:
    """The temporary SQLite database: ``done`` (earlier ``ok`` outputs) and ``ids``."""

    def __init__(self, directory: Path | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="caption-bulk-", dir=directory)
        self.path = Path(self._dir.name) / "plan.sqlite3"
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA temp_store = FILE;
            CREATE TABLE done (image TEXT, etag TEXT, config TEXT,
                               PRIMARY KEY (image, etag, config)) WITHOUT ROWID;
            CREATE TABLE ids (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID;
            """
        )

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DoneIndex:
    """Identities (image, etag, config) that earlier runs under one ``--out`` settled."""

    def __init__(self, scratch: Scratch) -> None:
        self._db = scratch.db
        self.loaded = 0  # ok lines read (duplicates across runs included)
        self.runs = 0  # earlier runs whose outputs were read

    def add(self, identities: Iterator[Identity]) -> None:
        """Insert identities, committing every BATCH_ROWS rows."""
        insert = "INSERT OR IGNORE INTO done VALUES (?, ?, ?)"
        batch: list[Identity] = []
        for identity in identities:
            batch.append(identity)
            if len(batch) >= BATCH_ROWS:
                self._db.executemany(insert, batch)
                self._db.commit()
                self.loaded += len(batch)
                batch.clear()
        self._db.executemany(insert, batch)
        self._db.commit()
        self.loaded += len(batch)

    def __contains__(self, identity: Identity) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM done WHERE image = ? AND etag = ? AND config = ?", identity
        ).fetchone()
        return row is not None

    def load_earlier_runs(self, client: Any, out: OutputPrefix) -> None:
        """Stream every earlier run's ``shards/NNNNN.output.jsonl`` under ``out`` into the index.

        ``ok`` lines count, and errors that would only repeat (``settled``); a line that is
        not JSON or lacks a field is ignored, so the worst a damaged output file does is
        caption its items again.
        """
        for run_id in _run_ids(client, out):
            self.runs += 1
            layout = out.run(run_id)
            for key in _keys(client, out.bucket, layout.outputs_dir):
                if layout.is_output(key):
                    self.add(_settled_identities(client, out.bucket, key))


def _run_ids(client: Any, out: OutputPrefix) -> Iterator[str]:
    # Delimiter "/" lists the run directories themselves, not the millions of files inside.
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=out.bucket, Prefix=out.prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", ()):
                name = common["Prefix"][len(out.prefix) :].rstrip("/")
                if RUN_ID_RE.fullmatch(name):
                    yield name
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(f"listing earlier runs under {out.uri}", exc) from exc


def _keys(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                yield obj["Key"]
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(f"listing s3://{bucket}/{prefix}", exc) from exc


def _settled_identities(client: Any, bucket: str, key: str) -> Iterator[Identity]:
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        for raw in body.iter_lines(chunk_size=256 * 1024):
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict) or not settled(line):
                continue
            image, etag, config = line.get("image"), line.get("etag"), line.get("config")
            if isinstance(image, str) and isinstance(etag, str) and isinstance(config, str):
                yield Identity(image, etag, config)
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(f"reading s3://{bucket}/{key}", exc) from exc


class SeenIds:
    """Item ids already planned in this run, to refuse a manifest's duplicates."""

    def __init__(self, scratch: Scratch) -> None:
        self._db = scratch.db
        self._pending = 0

    def add(self, item_id: str, line: int) -> int | None:
        """Record ``item_id`` as given on ``line``; the earlier line if it was seen before."""
        cursor = self._db.execute("INSERT OR IGNORE INTO ids VALUES (?, ?)", (item_id, line))
        self._pending += 1
        if self._pending >= BATCH_ROWS:  # one transaction per batch: far faster on disk
            self._db.commit()
            self._pending = 0
        if cursor.rowcount == 1:
            return None
        row = self._db.execute("SELECT line FROM ids WHERE id = ?", (item_id,)).fetchone()
        return int(row[0])
