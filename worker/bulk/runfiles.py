"""A run's files in S3, read and written by workers and ``bulk status``: run.json, shard inputs,
checkpoints, outputs and the manifest (key names in ``worker.bulk.layout``).

Every failure is a typed CaptionError (``s3_error``): a missing file reads as None where a
missing file is an answer (a checkpoint, an output), and as ``SourceNotFound`` elsewhere.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from worker.bulk.errors import InvalidBulkOption
from worker.bulk.layout import RUN_ID_RE, RunLayout, parse_prefix
from worker.bulk.sources import NOT_FOUND_CODES, s3_error
from worker.bulk.state import ShardCounts

Line = dict[str, Any]


def layout_of(run_uri: str) -> RunLayout:
    """The layout of the run directory ``s3://bucket/prefix/RUN_ID/``."""
    bucket, root = parse_prefix(run_uri, "run")
    run_id = root.rstrip("/").rpartition("/")[2]
    if not RUN_ID_RE.fullmatch(run_id):
        raise InvalidBulkOption(
            f"{run_uri!r:.200} is not a run directory (s3://bucket/prefix/YYYYMMDD-HHMMSS-xxxxxx/)"
        )
    return RunLayout(bucket, root, run_id)


def _missing(exc: Exception) -> bool:
    if not isinstance(exc, ClientError):
        return False
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code")) in NOT_FOUND_CODES or status == 404


def dumps_lines(lines: list[Line]) -> bytes:
    """JSON lines, one object each, as every run file holds them."""
    return "".join(
        json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n" for line in lines
    ).encode()


class RunFiles:
    """Reads and writes one run's directory through a boto3 client (thread-safe)."""

    def __init__(self, client: Any, layout: RunLayout) -> None:
        self.client = client
        self.layout = layout

    @property
    def uri(self) -> str:
        return self.layout.uri

    def _get(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.layout.bucket, Key=key)
            body: bytes = response["Body"].read()
            return body
        except (ClientError, BotoCoreError) as exc:
            if _missing(exc):
                return None
            raise s3_error(f"reading s3://{self.layout.bucket}/{key}", exc) from exc

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        try:
            self.client.put_object(
                Bucket=self.layout.bucket, Key=key, Body=body, ContentType=content_type
            )
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(f"writing s3://{self.layout.bucket}/{key}", exc) from exc

    def _lines(self, key: str) -> list[Line] | None:
        body = self._get(key)
        if body is None:
            return None
        return [json.loads(line) for line in body.decode().splitlines() if line.strip()]

    def run_json(self) -> dict[str, Any] | None:
        body = self._get(self.layout.run_json)
        return None if body is None else dict(json.loads(body))

    def inputs(self, shard: int) -> list[Line] | None:
        return self._lines(self.layout.input(shard))

    def checkpoint(self, shard: int) -> list[Line] | None:
        """Shard N's checkpoint lines; None when there is none or it does not parse."""
        try:
            return self._lines(self.layout.checkpoint(shard))
        except ValueError:  # a damaged checkpoint only costs its items again
            return None

    def output(self, shard: int) -> list[Line] | None:
        return self._lines(self.layout.output(shard))

    def output_counts(self) -> dict[int, ShardCounts]:
        """The counters of every shard whose output exists (each output read once)."""
        return {shard: ShardCounts.of(self.output(shard) or []) for shard in self.output_shards()}

    def skipped(self, number: int) -> list[Line] | None:
        return self._lines(self.layout.skipped(number))

    def has_output(self, shard: int) -> bool:
        try:
            self.client.head_object(Bucket=self.layout.bucket, Key=self.layout.output(shard))
            return True
        except (ClientError, BotoCoreError) as exc:
            if _missing(exc):
                return False
            where = f"checking s3://{self.layout.bucket}/{self.layout.output(shard)}"
            raise s3_error(where, exc) from exc

    def write_checkpoint(self, shard: int, lines: list[Line]) -> None:
        self._put(self.layout.checkpoint(shard), dumps_lines(lines), "application/x-ndjson")

    def write_output(self, shard: int, lines: list[Line]) -> None:
        self._put(self.layout.output(shard), dumps_lines(lines), "application/x-ndjson")

    def delete_checkpoint(self, shard: int) -> None:
        """Remove shard N's checkpoint once its output is written (best effort: a leftover
        checkpoint is never read once the output exists)."""
        with contextlib.suppress(ClientError, BotoCoreError):
            self.client.delete_object(Bucket=self.layout.bucket, Key=self.layout.checkpoint(shard))

    def manifest(self) -> dict[str, Any] | None:
        body = self._get(self.layout.manifest)
        return None if body is None else dict(json.loads(body))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        body = (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode()
        self._put(self.layout.manifest, body, "application/json")

    def output_shards(self) -> list[int]:
        """The shard numbers whose output file exists, in order."""
        shards = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=self.layout.bucket, Prefix=self.layout.outputs_dir
            ):
                for entry in page.get("Contents", ()):
                    key = entry["Key"]
                    if self.layout.is_output(key):
                        shards.append(int(key[len(self.layout.outputs_dir) :][:5]))
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(f"listing {self.uri}{self.layout.outputs_dir}", exc) from exc
        return sorted(shards)
